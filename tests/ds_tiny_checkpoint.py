"""Write a real ZeRO-3 checkpoint of a tiny BiEncoder, in the trainer's layout, for export tests.

Launched by tests/test_export.py (and bench/bench_export.py) as

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/ds_tiny_checkpoint.py --model DIR --output-dir OUT

It runs a few AdamW steps on random token sequences through `model.BiEncoder` under ZeRO-3 and
saves with `engine.save_checkpoint` exactly where train_biencoder.py saves:

    OUT/checkpoints/step_{step:08d}/  DeepSpeed's files + train_state.json
    OUT/checkpoints/latest            tag of the last complete checkpoint

With --probe-out it also embeds a few probe texts with the training-time model (parameters
gathered from all ranks, the prompt as in training) and saves them: the reference that an
export must reproduce.

Several runs in one launch (each with its own engine, one after the other): their arguments
separated by `--then`, e.g. `--model A --output-dir X --then --model B --output-dir Y --bf16`.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_atomic  # noqa: E402
from dataset import ARRAYS  # noqa: E402
from distributed import end_process_group  # noqa: E402
from model import BiEncoder, contrastive_loss, pack  # noqa: E402
from train_biencoder import train_state  # noqa: E402

QUERY_INSTRUCTION = "Instruct: Given a question, retrieve passages that answer the question\nQuery:"
# What train_biencoder.py takes from the prepared data's meta.json for a checkpoint: one subset's prompts, the limits.
DATA_META = {  # the meta.json of the prepared data such a run would read (no data is read here)
    "subsets": [{"name": "tiny", "query_prompt": QUERY_INSTRUCTION + " ", "passage_prompt": ""}],
    "query_max_len": 512,
    "passage_max_len": 512,
    "num_queries": 0,
    "num_docs": 0,
    "files": {f"{name}.npy": {"sha256": hashlib.sha256(name.encode()).hexdigest()} for name in ARRAYS},
}
PROBE_QUERIES = ["how do bi-encoders pool token states?", "what is ZeRO-3?"]
PROBE_DOCUMENTS = ["Mean pooling averages the final hidden states.", "ZeRO-3 shards parameters across ranks.", "x"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model folder (tiny Llama or MiniLM)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--steps", type=int, default=2, help="0: save right after deepspeed.initialize (no Adam moments)")
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    p.add_argument("--bf16", action="store_true", help="bf16 params with fp32 master weights")
    p.add_argument("--random-init", action="store_true", help="random weights from --model's config.json only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-2, help="large, so that the weights move visibly")
    p.add_argument("--probe-out", help="save the training-time model's probe embeddings here (.pt)")
    p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    return p.parse_args(argv)


def random_batch(step, vocab, num_docs=2):
    """One query and its passages as random token sequences, the same on every rank for a step."""
    g = torch.Generator().manual_seed(1000 + step)
    seqs = []
    for _ in range(1 + num_docs):
        n = int(torch.randint(3, 12, (1,), generator=g))
        seqs.append(torch.randint(0, vocab, (n,), generator=g).tolist())
    return seqs


def save(engine, ckpt_dir: Path, step: int, num_steps: int, loss: float, config: dict):
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    dist.barrier()  # every rank has written its files
    if dist.get_rank() == 0:
        state = train_state(step, num_steps, loss, dist.get_world_size(), config, DATA_META)  # as train_biencoder.py
        write_atomic(ckpt_dir / tag / "train_state.json", json.dumps(state, indent=2))
        write_atomic(ckpt_dir / "latest", tag)  # as train_biencoder.py: moves only once the tag is complete
    dist.barrier()


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    runs, run = [], []
    for arg in sys.argv[1:]:
        if arg == "--then":
            runs.append(run)
            run = []
        else:
            run.append(arg)
    for argv in [*runs, run]:
        write_checkpoint(parse_args(argv))
    end_process_group()


def write_checkpoint(args: argparse.Namespace) -> None:
    """One run: train args.steps steps, save where train_biencoder.py saves, embed the probe texts."""
    torch.manual_seed(args.seed)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # Buckets of 5e7 elements: DeepSpeed's default 5e8 (2 GB of fp32 per buffer) is much for CPU ranks.
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "reduce_bucket_size": 50_000_000,
            "stage3_prefetch_bucket_size": 50_000_000,
        },
        "bf16": {"enabled": args.bf16},
        "zero_force_ds_cpu_optimizer": False,
    }
    if args.random_init:
        # Partitioned as it is built: no rank ever holds the whole model (the 0.6B benchmark model).
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = BiEncoder(AutoModel.from_config(AutoConfig.from_pretrained(args.model)))
        model.tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        model = BiEncoder.from_pretrained(args.model)
    # Different seeds give different runs (for merge tests): nudge the base weights per seed.
    if args.seed and not args.random_init:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * args.seed * torch.randn_like(p))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    vocab = model.encoder.config.vocab_size
    config = {"model": args.model, "data": "random tokens", "output_dir": args.output_dir, "lr": args.lr}
    config.update(global_batch_size=dist.get_world_size(), micro_batch_size=1, num_negatives=1, temperature=0.02)
    ckpt_dir = Path(args.output_dir) / "checkpoints"
    loss = None
    for step in range(1, args.steps + 1):
        seqs = random_batch(step * dist.get_world_size() + dist.get_rank(), vocab)
        emb = engine(*pack(seqs))
        loss = contrastive_loss(emb[:1], emb[1:])
        engine.backward(loss)
        engine.step()
        loss = loss.item()
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            save(engine, ckpt_dir, step, args.steps, loss, config)
    if args.steps == 0:
        save(engine, ckpt_dir, 0, 0, None, config)

    if args.probe_out:
        # The training-time model: full parameters gathered from all ranks, in the training dtype.
        module = engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            if dist.get_rank() == 0:
                module.eval()
                with torch.no_grad():
                    prompt = QUERY_INSTRUCTION + " "
                    out = {
                        "query": module.encode(PROBE_QUERIES, prompt=prompt).float(),
                        "document": module.encode(PROBE_DOCUMENTS).float(),
                        "queries": PROBE_QUERIES,
                        "documents": PROBE_DOCUMENTS,
                        "query_prompt": prompt,
                    }
                torch.save(out, args.probe_out)
        dist.barrier()
    engine.destroy()


if __name__ == "__main__":
    main()
