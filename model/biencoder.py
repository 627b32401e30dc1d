"""The bi-encoder: a bidirectional transformer, mean pooling, L2 normalisation.

One shared encoder embeds queries and passages. For Llama-family models the causal mask is
removed in every layer (``config.is_causal = False`` for transformers' mask builder and
``is_causal = False`` on every attention module, since transformers' SDPA wrapper falls back to
the module flag when a batch has no padding). BERT-family encoders are bidirectional already and
are used as they are.

Two forwards give the same embeddings:
- ``forward(input_ids, cu_seqlens)``: padding-free. Many sequences packed into one (T,) tensor,
  RoPE / absolute positions restarting at each segment, attention block-diagonal.
- ``forward_padded(input_ids, attention_mask)``: the reference, (B, L) with a padding mask
  (left or right padding).

For the miner's teachers, ``BiEncoder(encoder, pooling="cls" | "lasttoken", bidirectional=False)``
embeds a model the way its sentence-transformers configuration says (e.g. a causal decoder with
last-token pooling, as e5-mistral and Qwen3-Embedding are); training always uses the defaults.

Reading checkpoints, configs and sentence-transformers files is model/loading.py's.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from common import UserError

from .attention import ATTN_IMPLEMENTATION, skip_mask_when_packed
from .loading import POOLINGS, load_encoder, model_files, stored_pooling


def make_bidirectional(encoder: nn.Module) -> nn.Module:
    """Remove the causal mask of a decoder in every layer; no-op for encoders."""
    encoder.config.is_causal = False
    for module in encoder.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return encoder


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over non-pad tokens, in fp32, then L2-normalised. (B, L, D), (B, L) -> (B, D)"""
    mask = mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.float() * mask).sum(dim=1)
    return F.normalize(summed / mask.sum(dim=1).clamp(min=1.0), dim=-1)


def segment_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """One vector per packed segment, in fp32, L2-normalised: the mean of its tokens, its first token
    (cls) or its last token (lasttoken). (T, D), (S+1,) -> (S, D)"""
    if pooling == "mean":
        return segment_mean_pool(hidden, cu_seqlens)
    rows = cu_seqlens[:-1] if pooling == "cls" else cu_seqlens[1:] - 1
    return F.normalize(hidden[rows.long()].float(), dim=-1)


def segment_mean_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean over each packed segment, in fp32, then L2-normalised. (T, D), (S+1,) -> (S, D)"""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    summed = hidden.new_zeros(len(lengths), hidden.shape[-1], dtype=torch.float32)
    summed.index_add_(0, segment, hidden.float())
    return F.normalize(summed / lengths.unsqueeze(-1).to(torch.float32), dim=-1)


def pack(sequences: list, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (input_ids (T,) int64, cu_seqlens (S+1,) int32)."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int32)
    if (lengths == 0).any():
        raise ValueError("cannot embed an empty sequence")
    cu = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    ids = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]))
    return ids.to(device), cu.to(device)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """0, 1, ..., L_i - 1 for every segment: (S+1,) -> (T,)"""
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    return torch.arange(total, device=cu_seqlens.device) - starts


# Tokens per packed forward on a CPU: smaller packs stay in cache. Measured (all-MiniLM-L6-v2, 600
# SciFact documents at 256 tokens, 2 threads): 29.6 s at 2,048 against 38.3 s for batches of 64 texts
# and 46.0 s at 32,768, the same embeddings.
CPU_PACK_TOKENS = 2048
# On a GPU: bounds a forward's transient memory whatever the texts' length (an 8B model's MLP holds
# about 32,768 x 3 x 14,336 bf16 values, 2.8 GB, at a time), where a count of texts alone would let
# 64 texts of 8,192 tokens put half a million tokens in one forward.
GPU_PACK_TOKENS = 32768


def pack_budget(max_tokens: int | None, device: torch.device) -> int:
    """Tokens per packed forward: max_tokens when given, else the device's default (CPU_PACK_TOKENS on
    the CPU, GPU_PACK_TOKENS elsewhere). A text longer than the budget is embedded alone."""
    if max_tokens is not None:
        return max_tokens
    return CPU_PACK_TOKENS if device.type == "cpu" else GPU_PACK_TOKENS


def token_batches(lengths: list[int], max_texts: int | None, max_tokens: int | None) -> list[tuple[int, int]]:
    """Consecutive [a, b) slices of texts (in the given order) of at most max_texts texts and at most
    max_tokens tokens each (a longer text alone); neither given: one batch."""
    batches, a, tokens = [], 0, 0
    for b, n in enumerate(lengths):
        full = (max_texts is not None and b - a >= max_texts) or (max_tokens is not None and tokens + n > max_tokens)
        if b > a and full:
            batches.append((a, b))
            a, tokens = b, 0
        tokens += n
    if len(lengths) > a:
        batches.append((a, len(lengths)))
    return batches


class BiEncoder(nn.Module):
    """Bidirectional encoder + mean pooling + L2 normalisation.

    >>> enc = BiEncoder.from_pretrained("path/or/hub-name", dtype=torch.bfloat16)
    >>> emb = enc.encode(["text"], prompt="Instruct: ...\\nQuery: ")  # (n, d) float32
    """

    def __init__(self, encoder: nn.Module, tokenizer=None, pooling: str = "mean", bidirectional: bool = True):
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        # The project's attention: non-causal SDPA for padded batches, block-diagonal varlen
        # attention for packed ones. Other implementations would ignore the packing.
        encoder.set_attn_implementation(ATTN_IMPLEMENTATION)
        # A packed forward builds no (T, T) mask (transformers would, from the packed position_ids, for a
        # causal model or a BERT-family encoder; the packed attention never reads it).
        skip_mask_when_packed(encoder)
        # bidirectional=False keeps the model's own attention (causal for a decoder): teachers only.
        self.encoder = make_bidirectional(encoder) if bidirectional else encoder
        self.pooling = pooling
        self.bidirectional = bidirectional
        self.encoder.config.use_cache = False  # an encoder: no KV cache
        self.tokenizer = tokenizer
        # Absolute position embeddings (BERT) have a hard limit; RoPE models have none.
        self.max_positions = getattr(encoder.config, "max_position_embeddings", None)

    @classmethod
    def from_pretrained(
        cls, path: str, dtype=torch.float32, tokenizer: bool = True, pooling: str = "mean", bidirectional: bool = True
    ) -> "BiEncoder":
        encoder = load_encoder(str(path), dtype=dtype)
        # The tokenizer files are plain; never run (or ask about) an export's remote code for them.
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False) if tokenizer else None
        return cls(encoder, tok, pooling, bidirectional)

    @classmethod
    def from_stored(cls, name: str, dtype=torch.float32) -> "BiEncoder":
        """A model embedded as its sentence-transformers files say (`stored_pooling`): any embedding
        model for evaluation or mining; from_pretrained's defaults are the recipe's, for training."""
        pooling, bidirectional = stored_pooling(name, model_files(name))
        return cls.from_pretrained(name, dtype=dtype, pooling=pooling, bidirectional=bidirectional)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Packed forward: input_ids (T,), cu_seqlens (S+1,) int32 -> (S, D) float32, L2-normalised."""
        positions = positions_from_cu_seqlens(cu_seqlens, input_ids.shape[0])
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        out = self.encoder(
            input_ids=input_ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
        )
        return segment_pool(out.last_hidden_state[0], cu_seqlens, self.pooling)

    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Padded forward: (B, L), (B, L) with 1 = token, 0 = pad -> (B, D) float32, L2-normalised."""
        if self.pooling != "mean":
            raise NotImplementedError("forward_padded pools by mean only; use the packed forward (encode)")
        # Positions count real tokens only, so left and right padding give the same embeddings
        # (and absolute-position encoders such as BERT see what the packed path shows them).
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        return mean_pool(out.last_hidden_state, attention_mask)

    @torch.no_grad()
    def encode(
        self,
        texts: list[str],
        prompt: str = "",
        batch_size: int | None = 32,
        max_length: int = 512,
        show_progress: bool | None = None,
        max_tokens: int | None = None,
    ) -> torch.Tensor:
        """Embed texts (each prefixed with `prompt` as given) -> (n, D) float32 on the CPU.

        Texts are sorted by length (longest first) and packed without padding, batch_size texts at a
        time, or with max_tokens as many as fit in that many tokens (at most batch_size when both are
        given; a text longer than max_tokens goes alone); the result is in the input order and does
        not depend on the batching.
        """
        if self.tokenizer is None:
            raise ValueError("this BiEncoder has no tokenizer; load it with BiEncoder.from_pretrained(path)")
        if isinstance(texts, str):
            texts = [texts]
        if self.max_positions:
            max_length = min(max_length, self.max_positions)
        ids = self.tokenizer([prompt + t for t in texts], truncation=True, max_length=max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = torch.empty(len(ids), self.encoder.config.hidden_size, dtype=torch.float32)
        batches = token_batches([len(ids[i]) for i in order], batch_size, max_tokens)
        if show_progress is None:
            show_progress = len(batches) > 10 and not os.environ.get("TQDM_DISABLE")
        for a, b in tqdm(batches, desc="embedding", unit="batch", disable=not show_progress):
            chunk = order[a:b]
            input_ids, cu = pack([ids[i] for i in chunk], device)
            out[chunk] = self(input_ids, cu).cpu()
        self.train(was_training)
        return out
