"""Peak memory and wall time of export_hf.py against DeepSpeed's zero_to_fp32.py, side by side.

Builds a random Llama of about 0.6B parameters (Llama-3 vocabulary), saves a ZeRO-3 checkpoint of it
from `deepspeed --num_gpus 2` (CPU) with tests/ds_tiny_checkpoint.py, then consolidates the same
checkpoint with each tool, alternating, each in a fresh process. Peak RSS is the child's ru_maxrss
(memory-mapped file pages that were touched count, as they do for any process).

The model is built randomly under deepspeed.zero.Init and saved right after deepspeed.initialize
(--random-init --steps 0): fp32 master weights in the optimizer files as after training, but no Adam
moments yet, since two CPU ranks training this model do not fit in 23 GB. Neither tool reads the
moments.

    python bench/bench_export.py                       # ~0.6B, in /tmp/bench_export (about 12 GB of disk)
    python bench/bench_export.py --layers 2 --hidden 256 --repeats 1   # a quick smoke run
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from common import run_cli  # noqa: E402

# Runs the command given after it and prints its wall time and peak RSS as JSON.
MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
checks = [line for line in rc.stdout.splitlines() if "check" in line]
out = {"rc": rc.returncode, "wall_s": wall, "peak_rss_gib": peak_kib / 2**20, "checks": checks}
print(json.dumps({**out, "err": rc.stderr[-2000:]}))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/bench_export")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    return p.parse_args(argv)


def make_checkpoint(args, work: Path) -> Path:
    """The random base model and a 2-rank ZeRO-3 checkpoint of it (reused when present)."""
    run = work / "run"
    if (run / "checkpoints" / "latest").is_file():
        print(f"reusing {run}")
        return run
    from transformers import AutoTokenizer

    from tiny_models import free_port, llama_tokenizer_dir, tiny_llama_config

    shutil.rmtree(work, ignore_errors=True)
    sizes = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers)
    sizes.update(num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
    # The base "model" is its config and tokenizer: the ranks build random weights partitioned.
    tiny_llama_config(**sizes).save_pretrained(work / "base")
    AutoTokenizer.from_pretrained(llama_tokenizer_dir()).save_pretrained(work / "base")
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [str(REPO / "tests" / "ds_tiny_checkpoint.py")]
    cmd += ["--model", str(work / "base"), "--output-dir", str(run), "--steps", "0", "--random-init"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, DS_ACCELERATOR="cpu"), stdout=subprocess.DEVNULL)
    print(f"ZeRO-3 checkpoint saved in {time.perf_counter() - t:.0f} s")
    return run


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result['err']}")
    return result


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.workdir)
    run = make_checkpoint(args, work)
    ckpt = run / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    files = sorted((ckpt / tag).glob("*.pt"))
    ckpt_gib = sum(f.stat().st_size for f in files) / 2**30
    with open(os.devnull, "wb") as null:  # warm the page cache equally for every tool
        for f in files:
            null.write(f.read_bytes())

    # As a module: run as a file from its folder, its sibling types.py would shadow the stdlib's.
    z = [sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(ckpt), str(work / "z"), "--safe_serialization"]
    e = [sys.executable, str(REPO / "export_hf.py"), "--run", str(run), "--output-dir"]
    e32, e16, e16v = work / "e32", work / "e16", work / "e16v"
    tools = {  # name: (command, its output folder)
        "zero_to_fp32.py (fp32)": (z + ["-t", tag], work / "z"),
        "export_hf.py --dtype float32 --no-verify": (e + [str(e32), "--dtype", "float32", "--no-verify"], e32),
        "export_hf.py (bf16) --no-verify": (e + [str(e16), "--no-verify"], e16),
        "export_hf.py (bf16, with its checks)": (e + [str(e16v)], e16v),
    }
    results = {name: [] for name in tools}
    for i in range(args.repeats):
        for name, (cmd, out) in tools.items():
            shutil.rmtree(out, ignore_errors=True)  # every tool writes into a fresh folder
            r = measure(cmd)
            results[name].append(r)
            print(f"[{i + 1}/{args.repeats}] {name}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB")
            for line in r["checks"]:  # export_hf.py's own checks, or why one was skipped
                print(f"    {line}")

    # Same tensors: DeepSpeed's fp32 output against the fp32 export.
    import torch
    from safetensors.torch import load_file

    ours, theirs = {}, {}
    for f in (work / "e32").glob("*.safetensors"):
        ours.update(load_file(f))
    for f in (work / "z").glob("*.safetensors"):
        theirs.update({k.removeprefix("encoder."): v for k, v in load_file(f).items()})
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), "tensors differ"
    num_params = sum(t.numel() for t in ours.values())

    base = results["zero_to_fp32.py (fp32)"]
    base_rss, base_wall = min(r["peak_rss_gib"] for r in base), min(r["wall_s"] for r in base)
    print(
        f"\nmodel: {num_params / 1e9:.3f}B parameters; checkpoint: 2 ranks, {ckpt_gib:.1f} GiB; CPUs: {os.cpu_count()}"
    )
    print("| tool | wall s (best) | peak RSS GiB (min) | RSS vs zero_to_fp32 | time vs zero_to_fp32 |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, rs in results.items():
        rss, wall = min(r["peak_rss_gib"] for r in rs), min(r["wall_s"] for r in rs)
        summary[name] = {"wall_s": [r["wall_s"] for r in rs], "peak_rss_gib": [r["peak_rss_gib"] for r in rs]}
        print(f"| {name} | {wall:.1f} | {rss:.2f} | {rss / base_rss:.2f}x | {wall / base_wall:.2f}x |")
    summary.update(num_params=num_params, checkpoint_gib=ckpt_gib, cpus=os.cpu_count())
    (work / "bench_export.json").write_text(json.dumps(summary, indent=2))
    print(f"fp32 tensors identical to zero_to_fp32.py's; results in {work / 'bench_export.json'}")
    print(f"(ru_maxrss of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
