"""Checks of the paths that only run on a GPU, before anything is measured: PASS / FAIL / SKIP lines.

In:  nothing (a random Llama of --shape is built on the device).
Out: one line per check on stdout, `CHECK <name> PASS|FAIL|SKIP <detail>`, and exit status 1 if any failed.

- kernel:        which kernel the packed path runs (bf16 on CUDA), and that it is really called: the
                 varlen function is wrapped and counted during a packed forward and backward. The
                 slow per-segment fallback is a FAIL on a GPU.
- bidirectional: on that same packed bf16 path, changing the LAST token of a segment changes the
                 output at its FIRST token (no causal mask), and leaves the other segment untouched
                 (block-diagonal attention).
- causal_teacher: the packed path kept causal with last-token pooling (mine_negatives.py's teachers
                 such as e5-mistral, Qwen3-Embedding): the first token does not move when the last
                 one changes, each embedding equals a causal forward of its text alone, and a packed
                 forward of T = 16k tokens creates no tensor of T x T elements (no attention mask).

bench/run_gpu.sh runs it with the other checks (packed == padded, RoPE, resume, export):
    python bench/gpu_check.py                  # on a GPU
    python bench/gpu_check.py                  # on the CPU: kernel SKIP, bidirectional on the fp32 path
"""

import argparse
import functools
import inspect
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_setup import SHAPES, llama_config  # noqa: E402
from transformers import LlamaModel  # noqa: E402

import model.attention as attention  # noqa: E402
from model import BiEncoder, pack  # noqa: E402
from model.biencoder import positions_from_cu_seqlens  # noqa: E402

CUDA = torch.cuda.is_available()


def report(name: str, status: str, detail: str) -> bool:
    print(f"CHECK {name} {status} {detail}", flush=True)
    return status != "FAIL"


def count_varlen_calls() -> list[int]:
    """Wrap the varlen kernels the packed path may pick, so that their calls are counted."""
    calls = [0]

    def counted(fn):
        @functools.wraps(fn)  # keeps the signature: the adapter passes arguments by it
        def wrapper(*args, **kwargs):
            calls[0] += 1
            return fn(*args, **kwargs)

        return wrapper

    try:
        import torch.nn.attention.varlen as varlen

        varlen.varlen_attn = counted(varlen.varlen_attn)
    except ImportError:
        pass
    try:
        import flash_attn

        flash_attn.flash_attn_varlen_func = counted(flash_attn.flash_attn_varlen_func)
    except ImportError:
        pass
    attention._varlen_kernel.cache_clear()  # pick the kernel again, through the wrappers
    return calls


def varlen_signature() -> str:
    """torch's varlen_attn signature on this machine (it changed between releases; model.attention.adapt_varlen
    passes only what it has)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return "; torch has no varlen_attn"
    return f"; torch varlen_attn{inspect.signature(varlen_attn)}"


def token_states(enc: BiEncoder, seqs: list[list[int]], device) -> torch.Tensor:
    """Last hidden states of packed sequences, token by token: (T, D)."""
    ids, cu = pack(seqs, device)
    pos = positions_from_cu_seqlens(cu, ids.shape[0])
    max_len = int((cu[1:] - cu[:-1]).max())
    out = enc.encoder(input_ids=ids[None], position_ids=pos[None], cu_seqlens=cu, max_seqlen=max_len)
    return out.last_hidden_state[0]


def largest_new_tensor(fn) -> tuple[int, str]:
    """(elements, description) of the largest tensor any operation creates while fn() runs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    largest = [0, "none"]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.numel() > largest[0]:
                    largest[:] = [t.numel(), f"{func} {tuple(t.shape)}"]
            return out

    with Watch():
        fn()
    return largest[0], largest[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="random model shape (default: %(default)s)")
    args = p.parse_args(argv)
    # On the CPU (a rehearsal of this script) the same checks run on the fp32 per-segment path.
    calls = count_varlen_calls()
    device = torch.device("cuda" if CUDA else "cpu")
    torch.manual_seed(0)
    with device:
        dtype = torch.bfloat16 if CUDA else torch.float32
        enc = BiEncoder(LlamaModel._from_config(llama_config(args.shape), dtype=dtype)).to(device)
    vocab = enc.encoder.config.vocab_size
    a = torch.randint(0, vocab, (37,)).tolist()
    b = torch.randint(0, vocab, (23,)).tolist()
    ok = True

    # kernel: a packed forward and backward in bf16 must go through the varlen kernel
    name = attention.packed_kernel_name()
    ids, cu = pack([a, b], device)
    enc.train()
    enc(ids, cu).sum().backward()
    enc.eval()
    if not CUDA:
        ok &= report("kernel", "SKIP", "no GPU: the packed path runs per-segment SDPA in fp32 on the CPU")
    elif "fallback" in name:
        ok &= report("kernel", "FAIL", f"{name}: the packed path is the slow per-segment fallback")
    elif calls[0] == 0:
        ok &= report("kernel", "FAIL", f"{name} was picked but never called")
    else:
        ok &= report("kernel", "PASS", f"{name}, called {calls[0]} times in one forward + backward{varlen_signature()}")

    # bidirectional: the first token sees the last one, the other segment sees neither
    with torch.no_grad():
        before = token_states(enc, [a, b], device).float()
        changed = a[:-1] + [(a[-1] + 1) % vocab]
        after = token_states(enc, [changed, b], device).float()
    first_moved = (after[0] - before[0]).abs().max().item()
    other_moved = (after[len(a) :] - before[len(a) :]).abs().max().item()
    detail = f"first token moved {first_moved:.3g}, other segment moved {other_moved:.3g}"
    # exactly 0 expected; a leak across segments would move the other one about as much as the first token
    ok &= report("bidirectional", "PASS" if first_moved > 1e-3 and other_moved < 0.1 * first_moved else "FAIL", detail)

    # causal_teacher: the packed path kept causal with last-token pooling (the miner's e5-mistral /
    # Qwen3-Embedding kind of teacher): a token never sees later ones, and each text's embedding equals
    # a plain causal forward of that text alone (transformers' SDPA, another kernel)
    torch.manual_seed(0)
    with device:
        cfg = llama_config(args.shape)
        teacher = BiEncoder(LlamaModel._from_config(cfg, dtype=dtype), pooling="lasttoken", bidirectional=False)
    teacher = teacher.to(device).eval()
    with torch.no_grad():
        packed = teacher(*pack([a, b], device))
        alone = torch.stack([teacher.encoder(input_ids=torch.tensor([s], device=device)).last_hidden_state[0, -1]
                             for s in (a, b)])  # fmt: skip
        alone = torch.nn.functional.normalize(alone.float(), dim=-1)
        cos = (packed * alone).sum(-1).min().item()
        first_moved = (token_states(teacher, [changed, b], device) - token_states(teacher, [a, b], device))[0]
        first_moved = first_moved.abs().max().item()
        # no (T, T) mask: transformers would build one from the packed position_ids (bool: 256 MiB here)
        long_texts = [torch.randint(0, vocab, (512,)).tolist() for _ in range(32)]
        T = 32 * 512
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        largest, what = largest_new_tensor(lambda: teacher(*pack(long_texts, device)))
        peak = f", peak {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB" if CUDA else ""
    detail = (f"min cosine packed vs alone {cos:.6f}, first token moved by the last {first_moved:.3g}; "
              f"T = {T}: largest new tensor {largest / T**2:.3g} T^2 elements ({what}){peak}")  # fmt: skip
    ok &= report("causal_teacher", "PASS" if cos > 0.999 and first_moved == 0 and largest < T * T else "FAIL", detail)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
