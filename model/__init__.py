"""The bi-encoder: its architecture (biencoder.py, attention.py, loss.py) and how a model folder
becomes one (loading.py). No training infrastructure here."""

from .attention import ATTN_IMPLEMENTATION, packed_kernel_name
from .biencoder import BiEncoder, make_bidirectional, mean_pool, pack, segment_mean_pool
from .loading import (
    check_rotary_buffers,
    check_vocab_covers_tokenizer,
    empty_encoder,
    load_config,
    load_encoder,
)
from .loss import contrastive_loss

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BiEncoder",
    "check_rotary_buffers",
    "check_vocab_covers_tokenizer",
    "load_config",
    "contrastive_loss",
    "empty_encoder",
    "load_encoder",
    "make_bidirectional",
    "mean_pool",
    "pack",
    "packed_kernel_name",
    "segment_mean_pool",
]
