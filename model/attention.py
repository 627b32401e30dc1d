"""Non-causal attention for padded batches and for packed, padding-free batches.

Registered with transformers' attention registry under the name ``biencoder``, so every
attention layer of a Llama- or BERT-family model calls it:

- padded batch (``cu_seqlens`` not given): PyTorch SDPA with the padding mask and
  ``is_causal=False``;
- packed batch (``cu_seqlens`` given, shape (S+1,), cumulative segment lengths of one
  (1, T) sequence): each segment attends only to itself (and, for a model kept causal, as a
  teacher of the miner may be, only to its earlier tokens). On CUDA this runs a variable-length
  flash kernel (flash-attn's ``flash_attn_varlen_func`` when installed, else torch's
  ``torch.nn.attention.varlen.varlen_attn``); elsewhere (CPU, fp32) SDPA segment by segment,
  which computes the same thing.

The mask transformers builds before the layers: for a padded batch, SDPA's (padding or causal) mask
(``sdpa_mask``); for a packed forward, none. transformers sees packing in the (1, T) ``position_ids``
and would otherwise build a (1, 1, T, T) block-diagonal mask (1 GiB at T = 32k) that the packed
attention ignores: for a causal model (``create_causal_mask``) and for BERT-family encoders
(``create_bidirectional_mask``). ``skip_mask_when_packed(encoder)`` marks an encoder's forwards that
get ``cu_seqlens``, for which the mask function then returns None.
"""

import contextvars
import functools
import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "biencoder"


def adapt_varlen(fn) -> "callable":
    """Wrap a torch-style `varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, ...)` so that it computes
    non-causal (or causal) attention with the given scale and grouped KV heads, passing only the
    keyword arguments the function has. Its signature changed between torch releases: 2.10 has `is_causal`
    and no `scale`, 2.11 adds `scale` and `window_size`, later releases add `enable_gqa`.

    The returned run(q (T, H, d), k (T, Hkv, d), v, cu_seqlens (S+1,), max_len, scale, causal) -> (T, H, d).
    """
    params = inspect.signature(fn).parameters

    def run(q, k, v, cu, max_len, scale, causal=False):
        extra = {}
        if "is_causal" in params:
            extra["is_causal"] = causal
        elif causal and "window_size" not in params:
            raise NotImplementedError(f"{fn.__name__} has neither is_causal nor window_size: no causal attention")
        if "window_size" in params:  # (left, right): (-1, -1) no window, (-1, 0) causal
            extra["window_size"] = (-1, 0) if causal and "is_causal" not in params else (-1, -1)
        if scale is not None:
            if "scale" in params:
                extra["scale"] = scale
            elif scale != q.shape[-1] ** -0.5:
                # No `scale` argument: the kernel uses 1/sqrt(d); fold the ratio into q instead.
                q = q * (scale * q.shape[-1] ** 0.5)
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                extra["enable_gqa"] = True
            else:  # expand the KV heads by hand
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return fn(q, k, v, cu, cu, max_len, max_len, **extra)

    return run


@functools.cache
def _varlen_kernel() -> tuple:
    """(name, run, expands_kv) of the fastest variable-length attention on CUDA; run is None when there
    is none. expands_kv: grouped KV heads are copied up to the query heads (repeat_interleave) before
    the kernel, as the per-segment fallback and a varlen_attn without `enable_gqa` need."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        # flash-attn and torch's varlen_attn (aten's flash kernel) need Ampere or newer: they would import
        # fine and fail at their first call
        sm = "".join(map(str, torch.cuda.get_device_capability()))
        return f"per-segment SDPA (slow fallback: this GPU is sm_{sm}, varlen kernels need sm_80+)", None, True
    try:
        from flash_attn import flash_attn_varlen_func

        def run(q, k, v, cu, max_len, scale, causal=False):  # flash-attn handles GQA itself
            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=causal)

        return "flash-attn flash_attn_varlen_func", run, False
    except ModuleNotFoundError as e:
        if e.name != "flash_attn":  # flash_attn is there but one of its own imports is not
            why = f"flash-attn not used: {type(e).__name__}: {e}"
        else:
            why = "flash-attn not installed"
    except Exception as e:  # noqa: BLE001  a broken build (undefined CUDA symbol, ABI mismatch, ...): not a reason to stop
        why = f"flash-attn not used: {type(e).__name__}: {str(e)[:200]}"
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"per-segment SDPA (slow fallback: torch {torch.__version__} has no varlen_attn; {why})", None, True
    gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters
    name = f"torch.nn.attention.varlen.varlen_attn (torch {torch.__version__}; {why})"
    return name, adapt_varlen(varlen_attn), not gqa


def packed_kernel_name() -> str:
    """Which kernel the packed path runs on CUDA in bf16/fp16 (CPU, fp32 and dropout always take the
    per-segment SDPA path)."""
    return _varlen_kernel()[0]


def packed_kernel_expands_kv() -> bool:
    """Does that kernel need the KV heads expanded to the query heads (a model with fewer KV heads
    than query heads then holds K and V copied up to all heads, and their gradients, in a layer's
    backward)?"""
    return _varlen_kernel()[2]


def packed_attention(q, k, v, cu_seqlens, max_seqlen, scale, dropout=0.0, causal=False):
    """Block-diagonal attention over packed segments: non-causal, or causal within each segment.

    q: (T, H, d), k and v: (T, Hkv, d), cu_seqlens: (S+1,) int32 -> (T, H, d)
    """
    fast = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0
    kernel = _varlen_kernel()[1] if fast else None
    if kernel is not None:
        return kernel(q, k, v, cu_seqlens, max_seqlen, scale, causal)
    # Reference path (CPU, fp32, attention dropout as BERT-family encoders train with): plain
    # SDPA per segment; no padding and no T x T mask. Heads first, (H, T, d): the caller's layout,
    # so a segment is a slice with contiguous rows (SDPA on the (T, H, d) view's strides was ~100x
    # slower on the CPU). Without dropout, a run of segments of one length (BiEncoder.encode sorts
    # by length) is one batched call.
    rep = q.shape[1] // k.shape[1]
    qh, kh, vh = (x.transpose(0, 1) for x in (q, k, v))
    if rep > 1:
        kh, vh = kh.repeat_interleave(rep, dim=0), vh.repeat_interleave(rep, dim=0)
    bounds = cu_seqlens.tolist()
    out, i, S = [], 0, len(bounds) - 1
    while i < S:
        L, j = bounds[i + 1] - bounds[i], i + 1
        while dropout == 0.0 and j < S and bounds[j + 1] - bounds[j] == L:
            j += 1
        a, b = bounds[i], bounds[j]
        seg = [x[:, a:b].unflatten(1, (j - i, L)).transpose(0, 1) for x in (qh, kh, vh)]  # (n, H, L, d)
        o = F.scaled_dot_product_attention(*seg, dropout_p=dropout, scale=scale, is_causal=causal)
        out.append(o.transpose(0, 1).flatten(1, 2))  # (H, n * L, d)
        i = j
    return torch.cat(out, dim=1).transpose(0, 1)  # (T, H, d)


def biencoder_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface: query (B, H, L, d), key/value (B, Hkv, L, d) -> (B, L, H, d)."""
    # Non-causal unless the module is still causal: BiEncoder makes every module non-causal; only a
    # model loaded with bidirectional=False (a causal teacher of the miner) keeps its own mask.
    causal = bool(getattr(module, "is_causal", False))
    cu_seqlens = kwargs.get("cu_seqlens")
    kwargs.pop("is_causal", None)
    if cu_seqlens is None:
        # Padded batch. is_causal is passed explicitly: transformers' SDPA wrapper falls back to the
        # module's own `is_causal` (True for Llama) whenever the mask is None, i.e. when a batch has
        # no padding. A causal model's padding mask is already causal.
        is_causal = causal and attention_mask is None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    assert query.shape[0] == 1, "a packed batch is one (1, T) sequence"
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, d)
    out = packed_attention(q, k, v, cu_seqlens, kwargs["max_seqlen"], scaling, dropout, causal)
    return out.unsqueeze(0), None


# One entry per encoder forward in progress (in this thread / context): whether it is packed.
_PACKED_FORWARDS: contextvars.ContextVar[tuple[bool, ...]] = contextvars.ContextVar("packed_forwards", default=())


def biencoder_mask(*args, **kwargs):
    """transformers mask interface: no mask inside a packed forward (no padding mask there; the packed
    attention is block-diagonal by cu_seqlens and never reads a mask), else `sdpa_mask`'s."""
    forwards = _PACKED_FORWARDS.get()
    if forwards and forwards[-1] and kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def _enter_forward(module, args, kwargs):
    _PACKED_FORWARDS.set(_PACKED_FORWARDS.get() + (kwargs.get("cu_seqlens") is not None,))


def _leave_forward(module, args, output):
    _PACKED_FORWARDS.set(_PACKED_FORWARDS.get()[:-1])


def skip_mask_when_packed(encoder: torch.nn.Module) -> torch.nn.Module:
    """Let `biencoder_mask` know which of the encoder's forwards are packed (called with cu_seqlens):
    there it builds no mask. Idempotent; returns the encoder."""
    if _enter_forward not in encoder._forward_pre_hooks.values():
        encoder.register_forward_pre_hook(_enter_forward, with_kwargs=True)
        encoder.register_forward_hook(_leave_forward, always_call=True)
    return encoder


AttentionInterface.register(ATTN_IMPLEMENTATION, biencoder_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, biencoder_mask)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "adapt_varlen",
    "biencoder_attention",
    "biencoder_mask",
    "packed_attention",
    "packed_kernel_name",
    "skip_mask_when_packed",
]
