"""The packed (varlen) forward of BiEncoder against its padded forward, on a random Llama: same results, time, memory.

In:  a random Llama of --shape (bench/bench_setup.py; default 1b on a GPU, tiny on the CPU), built
     directly on the device, and real lengths: the first --queries queries of the recipe order with
     their passages, from a prepared folder (default: SciFact prepared by bench_train.py's rules).
Out: a summary on the console and --output-json (JSON):
     - embeddings of BiEncoder.forward (packed, varlen attention) and forward_padded (left padding,
       SDPA) in --dtype, each compared with an fp32 padded reference and with each other
       (max |diff|, min cosine), and the gradients of one contrastive loss (min cosine per parameter);
     - time and peak memory of forward + loss + backward of each path with gradient checkpointing
       on, as in training, and the share of padding the padded path computes.
     It exits 1 when the two paths disagree beyond the tolerance of --dtype.

    python bench/bench_packed_vs_padded.py --data prepared --output-json /tmp/packed_vs_padded.json  # GPU: 1b, bf16
    python bench/bench_packed_vs_padded.py                                                          # CPU: tiny, fp32
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_setup import SHAPES, llama_config, prepare_scifact, total_params  # noqa: E402
from transformers import LlamaModel  # noqa: E402

from batches import epoch_order  # noqa: E402
from common import run_cli, write_atomic  # noqa: E402
from dataset import PreparedData  # noqa: E402
from model import BiEncoder, contrastive_loss, pack  # noqa: E402

CUDA = torch.cuda.is_available()
# min cosine between the packed and the padded embeddings / gradients that passes, per dtype
TOLERANCE = {"bfloat16": 0.99, "float32": 0.99999}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b" if CUDA else "tiny", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16" if CUDA else "float32", choices=sorted(TOLERANCE))
    p.add_argument("--data", help="prepared folder (default: SciFact, prepared into --workdir)")
    p.add_argument("--workdir", default="/tmp/bench_train", help="scratch folder (default: %(default)s)")
    p.add_argument("--queries", type=int, default=16 if CUDA else 4, help="queries (each with 1 + k passages)")
    p.add_argument("--repeats", type=int, default=3 if CUDA else 1, help="timed forward + backward passes per path")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.add_argument("--output-json", help="result JSON file (default: WORKDIR/packed_vs_padded.json)")
    p.add_argument("--output", dest="output_json", help=argparse.SUPPRESS)  # the former name, kept for scripts
    return p.parse_args(argv)


def batch(data: PreparedData, num_queries: int, seed: int = 125) -> tuple[list, int]:
    """The first queries of the recipe order and their 1 + k passages: (sequences, number of queries)."""
    queries = epoch_order(len(data), seed, 0)[:num_queries]
    docs = data.query_docs[queries].reshape(-1)
    seqs = [np.asarray(data.query(i), dtype=np.int64) for i in queries]
    seqs += [np.asarray(data.doc(j), dtype=np.int64) for j in docs]
    return seqs, len(queries)


def left_pad(seqs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :] = torch.from_numpy(s)
        mask[i, L - len(s) :] = 1
    return ids.to(device), mask.to(device)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    return {"max_abs_diff": (a - b).abs().max().item(), "min_cosine": F.cosine_similarity(a, b, dim=-1).min().item()}


def sync():
    if CUDA:
        torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = getattr(torch, args.dtype)
    data = PreparedData(args.data or prepare_scifact(Path(args.workdir) / "prepared_scifact"))
    seqs, B = batch(data, args.queries)
    config = llama_config(args.shape)
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialised on the GPU: seconds for 1B
        model = BiEncoder(LlamaModel._from_config(config, dtype=dtype))
    packed_inputs = pack([s.tolist() for s in seqs], device)
    padded_inputs = left_pad(seqs, config.eos_token_id, device)
    real = sum(len(s) for s in seqs)
    print(
        f"{torch.cuda.get_device_name() if CUDA else 'CPU'}: {args.shape} ({total_params(config) / 1e6:,.1f}M "
        f"parameters, {args.dtype}); {B} queries + {len(seqs) - B} passages = {real:,} tokens"
    )

    # 1. Embeddings: packed and padded in --dtype against an fp32 padded reference.
    model.eval()
    with torch.no_grad():
        emb_packed = model(*packed_inputs)
        emb_padded = model.forward_padded(*padded_inputs)
        reference = copy.deepcopy(model).float()
        emb_fp32 = reference.forward_padded(*padded_inputs)
        del reference
    embeddings = {
        "packed_vs_padded": compare(emb_packed, emb_padded),
        "packed_vs_fp32": compare(emb_packed, emb_fp32),
        "padded_vs_fp32": compare(emb_padded, emb_fp32),
    }

    # 2. Forward + loss + backward of each path, gradient checkpointing on as in training.
    model.train()
    kwargs = {"use_reentrant": False}  # as train_biencoder.build_engine (renamed in transformers 5.x)
    if hasattr(model.encoder, "activation_checkpointing_enable"):
        model.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def step(path: str):
        emb = model(*packed_inputs) if path == "packed" else model.forward_padded(*padded_inputs)
        loss = contrastive_loss(emb[:B], emb[B:])
        loss.backward()
        return loss

    paths, grads = {}, {}
    for path in ("packed", "padded"):
        model.zero_grad(set_to_none=True)
        step(path)  # warm-up, and the gradients to compare
        grads[path] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        if CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            model.zero_grad(set_to_none=True)
            step(path)
        sync()
        seconds = (time.perf_counter() - t0) / args.repeats
        computed = real if path == "packed" else padded_inputs[0].numel()
        paths[path] = {
            "step_time_s": seconds,
            "real_tokens_per_s": real / seconds,
            "computed_tokens": computed,
            "pad_share": 1 - real / computed,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None,
        }
    grad_cos = min(
        F.cosine_similarity(g.float().flatten(), grads["padded"][n].float().flatten(), dim=0).item()
        for n, g in grads["packed"].items()
        if g.abs().sum() > 0
    )
    ok = min(embeddings["packed_vs_padded"]["min_cosine"], grad_cos) >= TOLERANCE[args.dtype]
    result = {
        "device": torch.cuda.get_device_name() if CUDA else "CPU",
        "shape": args.shape,
        "dtype": args.dtype,
        "params": total_params(config),
        "queries": B,
        "sequences": len(seqs),
        "real_tokens": real,
        "max_len": max(len(s) for s in seqs),
        "embeddings": embeddings,
        "gradients_min_cosine_packed_vs_padded": grad_cos,
        "tolerance_min_cosine": TOLERANCE[args.dtype],
        "ok": ok,
        "paths": paths,
        "speedup_packed": paths["padded"]["step_time_s"] / paths["packed"]["step_time_s"],
        "torch": torch.__version__,
    }
    if not CUDA:
        result["label"] = "CPU: timings not meaningful"
    for name, c in embeddings.items():
        print(f"  embeddings {name}: max |diff| {c['max_abs_diff']:.2e}, min cosine {c['min_cosine']:.6f}")
    print(f"  gradients packed vs padded: min cosine over parameters {grad_cos:.6f}")
    for path, r in paths.items():
        mem = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "-"
        print(
            f"  {path:<7} fwd+bwd {r['step_time_s'] * 1e3:8.1f} ms, {r['real_tokens_per_s']:>12,.0f} real tok/s, "
            f"pad {r['pad_share']:.1%}, peak {mem}"
        )
    print(f"  packed is {result['speedup_packed']:.2f}x the padded speed; {'OK' if ok else 'MISMATCH'}")
    output = Path(args.output_json or Path(args.workdir) / "packed_vs_padded.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
