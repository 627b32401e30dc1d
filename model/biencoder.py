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
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, LlamaConfig, LlamaModel

from .attention import ATTN_IMPLEMENTATION

# config.json of an export in the reference's format (see export_hf.py)
BIDIRECTIONAL_LLAMA_TYPE = "llama_bidirec"
# The model families this project trains and exports, by config.json model_type. Llama-family
# models are made bidirectional; encoders are bidirectional already and used as they are.
LLAMA_TYPES = ("llama", BIDIRECTIONAL_LLAMA_TYPE)
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra")
# The keys an export adds to its base model's Llama config (export_hf.write_model_files).
EXPORT_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "pooling", "is_causal")


def base_llama_fields(fields: dict) -> dict:
    """config.json fields of an export (model_type llama_bidirec) -> the LlamaConfig fields it was built
    from, without model_type (EXPORT_CONFIG_KEYS dropped)."""
    return {k: v for k, v in fields.items() if k not in EXPORT_CONFIG_KEYS}


def make_bidirectional(encoder: nn.Module) -> nn.Module:
    """Remove the causal mask of a decoder in every layer; no-op for encoders."""
    encoder.config.is_causal = False
    for module in encoder.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return encoder


def check_vocab_covers_tokenizer(num_tokens: int, vocab_size: int, model: str) -> None:
    """Every id the tokenizer can emit must have an embedding row. A token id >= vocab_size fails
    only when a text contains it (an index error on the CPU, a device-side assert on CUDA), and
    llama.cpp's converter refuses such a model outright: check it before any work instead."""
    if num_tokens > vocab_size:
        raise ValueError(
            f"the tokenizer of {model} has {num_tokens} tokens but the model has {vocab_size} embedding rows "
            f"(config.json vocab_size): ids {vocab_size}..{num_tokens - 1} have no embedding. Use the tokenizer "
            "the model was trained with, or grow the embedding to the tokenizer "
            "(model.resize_token_embeddings(len(tokenizer)); model.save_pretrained(folder)) and train from that folder"
        )


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over non-pad tokens, in fp32, then L2-normalised. (B, L, D), (B, L) -> (B, D)"""
    mask = mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.float() * mask).sum(dim=1)
    return F.normalize(summed / mask.sum(dim=1).clamp(min=1.0), dim=-1)


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


def load_encoder(path: str, dtype=torch.float32, attn_implementation: str = ATTN_IMPLEMENTATION) -> nn.Module:
    """A Hugging Face base model (no head) from a hub name, a local folder or an export."""
    config_file = Path(path) / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == BIDIRECTIONAL_LLAMA_TYPE:
        # The reference's export format: a LlamaModel's weights under a custom model_type.
        config = LlamaConfig(**base_llama_fields(json.loads(config_file.read_text())))
        return LlamaModel.from_pretrained(path, config=config, dtype=dtype, attn_implementation=attn_implementation)
    config = AutoConfig.from_pretrained(path)
    extra = {}
    if config.model_type in ENCODER_TYPES:
        extra["add_pooling_layer"] = False  # mean pooling; the [CLS] pooler would be dead weight
    if config.model_type == "distilbert":
        extra.pop("add_pooling_layer")
    return AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, **extra)


class BiEncoder(nn.Module):
    """Bidirectional encoder + mean pooling + L2 normalisation.

    >>> enc = BiEncoder.from_pretrained("path/or/hub-name", dtype=torch.bfloat16)
    >>> emb = enc.encode(["text"], prompt="Instruct: ...\\nQuery: ")  # (n, d) float32
    """

    def __init__(self, encoder: nn.Module, tokenizer=None):
        super().__init__()
        # The project's attention: non-causal SDPA for padded batches, block-diagonal varlen
        # attention for packed ones. Other implementations would ignore the packing.
        encoder.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.encoder = make_bidirectional(encoder)
        self.encoder.config.use_cache = False  # an encoder: no KV cache
        self.tokenizer = tokenizer
        # Absolute position embeddings (BERT) have a hard limit; RoPE models have none.
        self.max_positions = getattr(encoder.config, "max_position_embeddings", None)

    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, tokenizer: bool = True, **kwargs) -> "BiEncoder":
        encoder = load_encoder(str(path), dtype=dtype, **kwargs)
        # The tokenizer files are plain; never run (or ask about) an export's remote code for them.
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False) if tokenizer else None
        return cls(encoder, tok)

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
        return segment_mean_pool(out.last_hidden_state[0], cu_seqlens)

    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Padded forward: (B, L), (B, L) with 1 = token, 0 = pad -> (B, D) float32, L2-normalised."""
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
        batch_size: int = 32,
        max_length: int = 512,
        show_progress: bool | None = None,
    ) -> torch.Tensor:
        """Embed texts (each prefixed with `prompt` as given) -> (n, D) float32 on the CPU.

        Texts are sorted by length and packed batch_size at a time (no padding); the result is in
        the input order and does not depend on batch_size.
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
        if show_progress is None:
            show_progress = len(ids) > 10 * batch_size and not os.environ.get("TQDM_DISABLE")
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="embedding", unit="batch", disable=not show_progress):
            chunk = order[start : start + batch_size]
            input_ids, cu = pack([ids[i] for i in chunk], device)
            out[chunk] = self(input_ids, cu).cpu()
        self.train(was_training)
        return out
