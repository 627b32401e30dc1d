"""The bi-encoder architecture: encoder, pooling, loss. No training infrastructure here."""

from .attention import ATTN_IMPLEMENTATION
from .biencoder import (
    BiEncoder,
    check_vocab_covers_tokenizer,
    load_encoder,
    make_bidirectional,
    mean_pool,
    pack,
    segment_mean_pool,
)
from .loss import contrastive_loss

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BiEncoder",
    "check_vocab_covers_tokenizer",
    "contrastive_loss",
    "load_encoder",
    "make_bidirectional",
    "mean_pool",
    "pack",
    "segment_mean_pool",
]
