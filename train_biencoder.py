"""Train a bi-encoder embedding model with DeepSpeed ZeRO-3: the llama-embed-nemotron-8b recipe.

In:  a base model (a Hugging Face hub name or local folder) and a folder written by prepare_data.py.
Out: OUTPUT_DIR/ with config.json (the resolved config), metrics.jsonl (one line per optimizer
     step) and checkpoints/<tag>/ (DeepSpeed ZeRO-3 shards + train_state.json), which
     export_hf.py turns into a Hugging Face model.

The recipe, on one 8-GPU node (every default is the published recipe's):
    deepspeed --num_gpus 8 train_biencoder.py
Several nodes, through DeepSpeed's hostfile:
    deepspeed --hostfile hostfile train_biencoder.py
A tiny CPU run:
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 train_biencoder.py --model tiny_llama/ --data prepared/ \
        --deepspeed ds_configs/zero3_bf16.json --global-batch-size 8 --max-steps 3

Re-running the same command after a crash resumes from the last complete checkpoint and ends with
the same weights as an uninterrupted run.

Math (README, "The recipe"): optimizer step k takes the queries at positions [G*k, G*(k+1)) of
randperm(N, seed + epoch); loss = mean over those G queries of the cross-entropy of each query over
its own positive and k hard negatives; AdamW; LR of step s = f(s - 1), linear warmup then linear
decay to 0 at the last step; clipping at the global grad norm. How the G queries are split across
GPUs and micro-batches does not change the math (see `micro_batch_loss_scale`).
"""

import atexit
import dataclasses
import json
import math
import os
import resource
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

import options
from batches import collate, epoch_order, example_lengths, split_step
from common import UserError, load_pretrained, read_json_file, run_cli, write_atomic
from dataset import PreparedData, data_fingerprint, data_summary, subset_prompts
from distributed import (
    SUPPORTED_LAUNCHES,
    adopt_launch,
    barrier,
    broadcast,
    check_rendezvous,
    check_shared_folder,
    end_process_group,
    gather,
    launch_env,
    local_rank,
    log0,
    rank,
    set_device,
    single_process_rendezvous,
    stop_unless_all,
    where,
    world_size,
)
from model import (
    BiEncoder,
    check_rotary_buffers,
    check_vocab_covers_tokenizer,
    contrastive_loss,
    load_config,
    packed_kernel_name,
)
from options import option, resume_fields
from plan import model_sizes, print_plan
from train_eval import better, check_eval_options, evaluate, load_eval_sets

CKPT_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"  # --keep-best: the tag of the best checkpoint so far


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    """Every training option: its flag is --field-name; resume=True: a resumed run must use the value
    the checkpoint was written with (they define the data order, the loss and the optimizer's path)."""

    model: str = option(
        "meta-llama/Llama-3.1-8B",
        "base model: Hugging Face hub name or local folder, Llama-family or BERT-family",
        resume=True,
    )
    data: str = option("prepared", "folder written by prepare_data.py", resume=True)
    output_dir: str = option(
        "output/llama_embed_nemotron_8b",
        "run folder: config.json, metrics.jsonl, checkpoints/ (a re-run resumes from it)",
    )
    deepspeed: str = option(
        "ds_configs/zero3_bf16.json", "DeepSpeed JSON with engine settings only (ZeRO stage, bf16, buckets, offload)"
    )
    global_batch_size: int = option(
        128, "queries per optimizer step, all GPUs together; divisible by the number of GPUs", resume=True
    )
    micro_batch_size: int | None = option(
        None,
        "queries per GPU per forward, with gradient accumulation; unset: pack by --max-tokens-per-gpu",
        resume=True,
    )
    max_tokens_per_gpu: int = option(
        49152, "token budget of one packed micro-batch (queries and their passages) per GPU", resume=True
    )
    num_negatives: int = option(4, "hard negatives per query (at most what --data holds)", resume=True)
    temperature: float = option(0.02, "logits = cosine / temperature", resume=True)
    in_batch_negatives: bool = option(
        False, "also score each query against the other queries' passages of its micro-batch", resume=True
    )
    lr: float = option(2e-6, "peak learning rate", resume=True)
    warmup_steps: int = option(2, "linear warmup steps, then linear decay to 0 at the last step", resume=True)
    weight_decay: float = option(0.01, "decoupled (AdamW) weight decay, on all parameters", resume=True)
    adam_beta1: float = option(0.9, "AdamW beta1", resume=True)
    adam_beta2: float = option(0.999, "AdamW beta2", resume=True)
    adam_eps: float = option(1e-8, "AdamW epsilon", resume=True)
    max_grad_norm: float = option(1.0, "clip gradients to this global norm", resume=True)
    epochs: int = option(1, "passes over --data; the LR schedule spans them all", resume=True)
    max_steps: int | None = option(
        None, "stop after this many optimizer steps (the LR schedule still spans every epoch)"
    )
    seed: int = option(125, "random seed (torch); epoch e's data order is randperm(N, seed + e)", resume=True)
    save_every: int = option(3000, "write a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = option(2, "newest checkpoints kept; older ones are deleted")
    gradient_checkpointing: bool = option(
        True, "recompute activations in the backward pass (less memory, same math)", resume=True
    )
    tensorboard: bool = option(False, "also log to OUTPUT_DIR/tensorboard (needs the tensorboard package)")
    dry_run: bool = option(
        False,
        "check the data, model, tokenizer, ZeRO JSON and batch arithmetic, print the plan (steps, tokens, "
        "micro-batches, memory per GPU and host memory per node) and exit; no GPU needed, no weights loaded",
    )
    gpu_memory_gb: float | None = option(
        None,
        "with --dry-run: memory of one GPU in GB = 1e9 bytes (80 for an 80 GB H100), where this machine has no GPU",
    )
    host_memory_gb: float | None = option(
        None, "with --dry-run: RAM of one node in GB = 1e9 bytes, to plan for a node other than this machine"
    )

    eval_beir: list[str] | None = option(
        None,
        "BEIR folders (corpus.jsonl, queries.jsonl, qrels/test.tsv): full-corpus retrieval at step 0, every "
        "--eval-every steps and at the end; NDCG@10, Recall@10/100, MRR@10 as evaluate.py gives on the export",
        metavar="DIR",
    )
    eval_data: list[str] | None = option(
        None,
        "prepared folders (held-out splits): the recipe's validation loss, acc@1 and MRR over each query's "
        "positive and --num-negatives negatives",
        metavar="PREPARED",
    )
    eval_every: int | None = option(None, "evaluate every this many steps; unset: at step 0 and at the end only")
    eval_max_queries: int | None = option(
        None, "evaluate on a fixed random sample (seed 0) of this many queries of each BEIR folder; unset: all"
    )
    eval_max_docs: int | None = option(
        None, "corpus sample of each BEIR folder: every document the queries judge, then random others up to this"
    )
    eval_max_tokens: int | None = option(
        None,
        "token budget of the evaluation's packed forwards (no activations are kept: it can exceed "
        "--max-tokens-per-gpu; each forward gathers the ZeRO-3 parameters once); unset: --max-tokens-per-gpu",
    )
    eval_prompts: str | None = option(
        None,
        'JSON {"<folder name>": {"query": ..., "document": ... | "prompt_name": subset, "max_length": n}}; '
        "unset: the prompts and max length the export gets (the data's)",
    )
    keep_best: str | None = option(
        None,
        "keep the checkpoint with the best value of this metric (e.g. eval/scifact/ndcg@10; a loss: the lowest) "
        "besides the newest --keep-checkpoints, never pruned; export it with export_hf.py --tag best",
    )

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise UserError(msg)

        need(self.global_batch_size >= 1, f"--global-batch-size must be >= 1, got {self.global_batch_size}")
        need(
            self.micro_batch_size is None or self.micro_batch_size >= 1,
            f"--micro-batch-size must be >= 1, got {self.micro_batch_size}",
        )
        need(self.max_tokens_per_gpu >= 1, f"--max-tokens-per-gpu must be >= 1, got {self.max_tokens_per_gpu}")
        need(self.num_negatives >= 0, f"--num-negatives must be >= 0, got {self.num_negatives}")
        need(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        need(self.lr >= 0 and self.weight_decay >= 0, "--lr and --weight-decay must be >= 0")
        need(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        need(self.save_every >= 1, f"--save-every must be >= 1, got {self.save_every}")
        need(self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        need(self.gpu_memory_gb is None or self.gpu_memory_gb > 0, "--gpu-memory-gb must be > 0")
        need(self.host_memory_gb is None or self.host_memory_gb > 0, "--host-memory-gb must be > 0")
        for name in ("eval_every", "eval_max_queries", "eval_max_docs", "eval_max_tokens"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")


RESUME_FIELDS = resume_fields(TrainConfig)


def parse_config(argv=None) -> TrainConfig:
    """CLI flags, optionally on top of a JSON file (--config) with the same keys."""
    return options.parse_config(TrainConfig, argv, __doc__, config_file=True)


def schedule_length(num_queries: int, global_batch_size: int, epochs: int) -> int:
    """T, the recipe's `total_steps` = (epochs x micro-batches per rank) // accumulation: the number
    of FULL optimizer steps, floor(epochs x N / G) (28,614 for the recipe's 3,662,695 queries).

    The run itself takes epochs x ceil(N / G) steps. When G does not divide N, every epoch ends with
    a partial step and the run's last step uses f(T) = 0; when it does, the last step uses f(T - 1) > 0.
    """
    return max(1, epochs * num_queries // global_batch_size)


def lr_at(n: int, cfg: TrainConfig, T: int) -> float:
    """f(n) of the recipe (README, "The recipe"); optimizer step s (1-based) uses f(s - 1).

    Linear warmup from 0 to lr over warmup_steps, then linear decay reaching 0 at n = T
    (`schedule_length`): f(n) = lr * (1 - (n - warmup) / (T - warmup)).
    """
    if n <= cfg.warmup_steps:
        return cfg.lr * n / cfg.warmup_steps if cfg.warmup_steps else cfg.lr
    return cfg.lr * max(0.0, 1.0 - (n - cfg.warmup_steps) / max(T - cfg.warmup_steps, 1))


# ----------------------------------------------------------------------------------------------
# Distributed bookkeeping


def micro_batch_loss_scale(step_queries: int, world: int) -> float:
    """Factor that turns a micro-batch's SUM of per-query losses into its share of the step's loss.

    Wanted: grad = (1/G) * sum over the step's G queries of grad(CE_q), for any split.
    DeepSpeed (backward with scale_wrt_gas=False, manual accumulation boundary) sums gradients over
    a rank's micro-batches, then averages over the W data-parallel ranks: grad = (1/W) * sum_r sum_m
    grad(L_rm). With L_rm = (W / G) * sum_{q in micro-batch} CE_q this is exactly (1/G) sum_q grad(CE_q).
    No query sees another's passages (unless --in-batch-negatives), so each CE_q depends only on its
    own micro-batch and the split cannot change the math. G is the step's real query count (the last
    step of an epoch may hold fewer than --global-batch-size).
    """
    return world / step_queries


# ----------------------------------------------------------------------------------------------
# Checks before any GPU work


def check_inputs(cfg: TrainConfig, world: int) -> tuple[PreparedData, object]:
    """The data, the model's config and tokenizer, the batch arithmetic -> (data, model config)."""
    data_path = Path(cfg.data)
    if not (data_path / "meta.json").is_file():
        raise UserError(
            f"--data {cfg.data}: no prepared data (meta.json missing). "
            f"Run: python prepare_data.py --output-dir {cfg.data}"
        )
    data = PreparedData(data_path)
    stored = data.meta["num_negatives"]
    if cfg.num_negatives > stored:
        raise UserError(
            f"--num-negatives {cfg.num_negatives} but {cfg.data} holds {stored} negatives per query; "
            f"re-run prepare_data.py with --num-negatives {cfg.num_negatives} or lower --num-negatives"
        )
    model_path = Path(cfg.model)
    if model_path.exists():
        weights = list(model_path.glob("*.safetensors")) + list(model_path.glob("*.bin"))
        if not (model_path / "config.json").is_file() or not weights:
            raise UserError(f"--model {cfg.model}: a model folder needs config.json and *.safetensors/*.bin weights")
    tok = load_pretrained(AutoTokenizer.from_pretrained, cfg.model, "--model", "tokenizer")
    model_config = load_pretrained(load_config, cfg.model, "--model", "config")
    check_vocab_covers_tokenizer(len(tok), model_config.vocab_size, cfg.model)
    if len(tok) != data.meta["vocab_size"]:
        raise UserError(
            f"{cfg.data} was tokenized with {data.meta['tokenizer']} (vocab {data.meta['vocab_size']}) but the "
            f"tokenizer of --model {cfg.model} has {len(tok)} tokens; re-run prepare_data.py --tokenizer {cfg.model}"
        )
    G = cfg.global_batch_size
    if G % world:
        raise UserError(f"--global-batch-size {G} is not divisible by the {world} GPUs")
    if cfg.micro_batch_size is not None:
        share = G // world
        if cfg.micro_batch_size > share:
            raise UserError(
                f"--micro-batch-size {cfg.micro_batch_size} exceeds a GPU's share of the step ({G} / {world} = {share})"
            )
        if share % cfg.micro_batch_size:
            raise UserError(
                f"--global-batch-size {G} != per-GPU x accumulation x GPUs: {share} queries per GPU do not "
                f"divide into micro-batches of {cfg.micro_batch_size}"
            )
    if len(data) == 0:
        raise UserError(f"{cfg.data} holds no queries")
    return data, model_config


ENGINE_ONLY_KEYS = ("optimizer", "scheduler")
BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def bucket_sizes(model_config) -> dict:
    """ZeRO-3 bucket sizes from the model's shapes, for the keys a JSON sets to "auto".

    - stage3_prefetch_bucket_size = one transformer layer's parameters, so that the next layer is
      gathered while this one computes (Llama-3.1-8B: 218,112,000; DeepSpeed's fixed 5e7 is below
      one of its 58.7M-element MLP matrices, which would leave almost nothing prefetched);
    - reduce_bucket_size = one layer too: a layer's gradients leave in one reduce-scatter;
    - stage3_param_persistence_threshold = 10 x hidden size: norm weights and biases stay whole on
      every GPU instead of being gathered one tiny tensor at a time (it must be >= hidden size).
    """
    _, layer = model_sizes(model_config)
    return {
        "reduce_bucket_size": layer,
        "stage3_prefetch_bucket_size": layer,
        "stage3_param_persistence_threshold": 10 * model_config.hidden_size,
    }


def several_micro_batches(cfg: TrainConfig, world: int) -> bool:
    """Can a step run more than one micro-batch per GPU? Packed mode may split a long step."""
    return cfg.micro_batch_size is None or cfg.global_batch_size // world > cfg.micro_batch_size


def build_ds_config(cfg: TrainConfig, world: int, model_config=None) -> dict:
    """The JSON engine settings + the batch arithmetic and clipping, whose one source is this script.

    Bucket sizes given as "auto" are computed from the model's shapes (`bucket_sizes`). With bf16 and
    several micro-batches per step, gradients accumulate in fp32 (data_types.grad_accum_dtype) unless
    the JSON says otherwise: summing micro-batch gradients in bf16 would round them at every addition.
    """
    if not Path(cfg.deepspeed).is_file():
        raise UserError(f"--deepspeed {cfg.deepspeed}: no such file (see ds_configs/)")
    ds = read_json_file(cfg.deepspeed, "--deepspeed")
    for key in ENGINE_ONLY_KEYS:
        if key in ds:
            raise UserError(f"{cfg.deepspeed}: remove '{key}'; the optimizer and LR schedule are set by the script")
    micro = cfg.micro_batch_size or 1
    gas = max(cfg.global_batch_size // (micro * world), 1)
    wanted = {
        "train_batch_size": micro * gas * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in wanted.items():
        if key in ds and ds[key] != value and ds[key] != "auto":
            raise UserError(
                f"{cfg.deepspeed}: '{key}': {ds[key]} contradicts the script's batch arithmetic ({value}); "
                f"remove it from the JSON and set --global-batch-size / --micro-batch-size / --max-grad-norm"
            )
        if ds.get(key) == "auto":
            raise UserError(f"{cfg.deepspeed}: '{key}': \"auto\" is only resolved by the HF Trainer; remove it")
    ds.update(wanted)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise UserError(f"{cfg.deepspeed}: this script trains with ZeRO stage 3 (zero_optimization.stage = 3)")
    if any(zero.get(key) == "auto" for key in BUCKET_KEYS):
        sizes = bucket_sizes(model_config or load_config(cfg.model))
        zero.update({key: sizes[key] for key in BUCKET_KEYS if zero.get(key) == "auto"})
    if ds.get("bf16", {}).get("enabled") and several_micro_batches(cfg, world):
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    return ds


# ----------------------------------------------------------------------------------------------
# Checkpoints


def read_latest(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / LATEST
    return f.read_text().strip() if f.is_file() else None


def node_local_checkpoints(ds_config: dict) -> bool:
    """DeepSpeed's `"checkpoint": {"use_node_local_storage": true}`: --output-dir is a folder on each
    node's own disk. Each node then holds its own ranks' shards, and its first process writes
    train_state.json and `latest` and prunes there; otherwise --output-dir must be one folder that
    every node sees, and rank 0 alone writes them."""
    return bool(ds_config.get("checkpoint", {}).get("use_node_local_storage", False))


def checkpoint_writer(node_local: bool) -> bool:
    """Does this process write train_state.json and `latest`, and prune, in its --output-dir?"""
    return local_rank() == 0 if node_local else rank() == 0


SHARED_OR_NODE_LOCAL = (
    "On several nodes, put --output-dir on a filesystem that every node mounts (NFS, Lustre), or keep "
    'checkpoints on each node\'s own disk with "checkpoint": {"use_node_local_storage": true} in the --deepspeed JSON'
)


def check_run_folder(cfg: TrainConfig, node_local: bool, data: PreparedData) -> None:
    """Before any model is built, every rank at once: the same --output-dir (unless checkpoints are
    node-local) and the same prepared data as rank 0. Otherwise all ranks stop with one message
    naming the ranks and hosts: a rank that resumed from another folder, or trained on other data,
    would be a hang at best and a silently wrong model at worst."""
    if not node_local:
        check_shared_folder(Path(cfg.output_dir), "--output-dir", SHARED_OR_NODE_LOCAL)
    hosts = gather(socket.gethostname())
    prints = gather(data_fingerprint(data.meta))
    problems = [None if f == prints[0] else f"--data {cfg.data} holds other data than rank 0's" for f in prints]
    stop_unless_all(problems, hosts, "every rank must read the same prepared data (copy the same folder to each node)")


def save_checkpoint(
    engine,
    cfg: TrainConfig,
    step: int,
    num_steps: int,
    final_loss: float | None,
    data_meta: dict,
    node_local: bool,
    best: dict | None = None,
):
    """DeepSpeed's shards + our state; `latest` (and `best`, --keep-best's) move only after every rank
    finished writing."""
    ckpt_dir = Path(cfg.output_dir) / CKPT_DIR
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    tag_dir = ckpt_dir / tag
    # Per-rank RNG (dropout in BERT-family encoders): restored on resume for bitwise equality.
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tag_dir / f"rng_rank{rank():05d}.pt")
    writer = checkpoint_writer(node_local)
    if writer:
        state = train_state(step, num_steps, final_loss, world_size(), dataclasses.asdict(cfg), data_meta)
        write_atomic(tag_dir / "train_state.json", json.dumps({**state, "best": best}, indent=2))
    barrier()
    if writer:
        write_atomic(ckpt_dir / LATEST, tag)
        if best:
            write_atomic(ckpt_dir / BEST, best["tag"])
        prune_checkpoints(ckpt_dir, tag, cfg.keep_checkpoints, best["tag"] if best else None)
    barrier()


def train_state(step: int, num_steps: int, final_loss, world: int, config: dict, data_meta: dict) -> dict:
    """train_state.json of a checkpoint: what a resume checks and what export_hf.py reads (the base model
    config["model"], the prompts, the token limits). tests/ds_tiny_checkpoint.py writes its checkpoints' with it."""
    return {
        "step": step,
        "num_steps": num_steps,
        "final_loss": final_loss,
        "world_size": world,
        "config": config,
        "data": data_summary(data_meta),  # what the data was: a resume on other data stops
        # What the export gives sentence-transformers: each subset's exact query and passage prompt
        # strings (query None: JSONL lines with prompts of their own) and the data's token limits.
        "prompts": subset_prompts(data_meta),
        "max_len": {"query": data_meta["query_max_len"], "passage": data_meta["passage_max_len"]},
        "command": " ".join(sys.argv),
    }


def prune_checkpoints(ckpt_dir: Path, latest: str, keep: int, best: str | None = None):
    """Keep the newest `keep` complete checkpoints up to `latest`, and `best`; drop the rest (and crash
    leftovers)."""
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
    complete = [t for t in tags if t <= latest and (ckpt_dir / t / "train_state.json").is_file()]
    for t in tags:
        if t not in complete[-keep:] and t != best:
            shutil.rmtree(ckpt_dir / t, ignore_errors=True)


def missing_for_resume(tag_dir: Path, r: int) -> str | None:
    """What rank r cannot read of checkpoint `tag_dir` in its own view of the folder (None: nothing)."""
    if not tag_dir.is_dir():
        return f"no folder {tag_dir.resolve()}"
    wanted = {
        "train_state.json": ["train_state.json"],
        f"rng_rank{r:05d}.pt": [f"rng_rank{r:05d}.pt"],
        f"zero_pp_rank_{r}_mp_rank_00_model_states.pt": [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"],
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt": [
            f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for prefix in ("bf16_", "")
        ],
    }
    missing = [
        label
        for label, names in wanted.items()
        if not any((tag_dir / n).is_file() and os.access(tag_dir / n, os.R_OK) for n in names)
    ]
    return f"cannot read {', '.join(missing)} in {tag_dir.resolve()}" if missing else None


def find_resume_point(cfg: TrainConfig, data: PreparedData) -> tuple[str, dict] | None:
    """The checkpoint every rank resumes from, decided before any model is built: rank 0's `latest`,
    broadcast. The settings, the data (fingerprint) and the number of GPUs must be those of the run
    that wrote it (rank 0's train_state.json, broadcast); then each rank checks that it can read its
    part of it (its shards, its RNG state, train_state.json), and all stop together, naming the ranks
    and hosts, if any cannot. Returns (tag, train_state) or None to start from step 0."""
    ckpt_dir = Path(cfg.output_dir) / CKPT_DIR
    hosts = gather(socket.gethostname())
    latest = gather(read_latest(ckpt_dir))
    tag = broadcast(latest[0])
    if tag is None:
        seen = [f"{where(r, hosts)} has {t}" for r, t in enumerate(latest) if t]
        if seen:
            raise UserError(
                f"rank 0 ({hosts[0]}) finds no checkpoint in {ckpt_dir.resolve()}, but {'; '.join(seen)}: "
                "the ranks would start from different weights. Restore rank 0's folder to resume, or give every "
                "rank a new --output-dir to start anew"
            )
        return None
    state_file = ckpt_dir / tag / "train_state.json"
    state = broadcast(json.loads(state_file.read_text()) if rank() == 0 and state_file.is_file() else None)
    if state is not None:  # when rank 0 cannot read it, that is said with the other ranks' problems below
        check_resume_settings(cfg, data, state, ckpt_dir / tag)
    stop_unless_all(
        gather(missing_for_resume(ckpt_dir / tag, rank())),
        hosts,
        f"cannot resume from checkpoint {tag} (rank 0's latest): every rank needs its own shards of it. "
        + SHARED_OR_NODE_LOCAL,
    )
    others = [f"{where(r, hosts)}: {t}" for r, t in enumerate(latest) if t != tag]
    if others:
        log0(f"resuming every rank from rank 0's latest checkpoint {tag}; other ranks' latest: {'; '.join(others)}")
    return tag, state


def check_resume_settings(cfg: TrainConfig, data: PreparedData, state: dict, tag_dir: Path) -> None:
    """The settings that define the run, its data (fingerprint) and its number of GPUs must be those of
    the run that wrote the checkpoint (its train_state.json)."""
    diff = [
        f"{k}: checkpoint {state['config'].get(k)!r} vs now {getattr(cfg, k)!r}"
        for k in RESUME_FIELDS
        if state["config"].get(k) != getattr(cfg, k)
    ]
    now = data_summary(data.meta)
    then = state.get("data")  # absent in checkpoints written before it was recorded
    if then is not None and then["fingerprint"] != now["fingerprint"]:
        changed = [f"{k} {then.get(k)!r} -> {now[k]!r}" for k in now if k != "fingerprint" and then.get(k) != now[k]]
        diff.append(
            f"data: --data {cfg.data} holds other data than the checkpoint was trained on (fingerprint "
            f"{then['fingerprint'][:12]} -> {now['fingerprint'][:12]}"
            + (f"; {', '.join(changed)}" if changed else "; same sizes and settings, other tokens")
            + ")"
        )
    if diff:
        raise UserError(
            f"{tag_dir} was written with other settings ({'; '.join(diff)}); "
            f"use the same settings and data to resume, or another --output-dir to start a new run"
        )
    if state["world_size"] != world_size():
        raise UserError(
            f"{tag_dir} was written by {state['world_size']} GPUs, this run has {world_size()}: "
            "ZeRO-3 checkpoints resume on the same number of GPUs"
        )


def load_checkpoint(engine, cfg: TrainConfig, tag: str) -> int:
    """Load checkpoint `tag` (find_resume_point's) into the engine; return the number of steps done."""
    ckpt_dir = Path(cfg.output_dir) / CKPT_DIR
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:  # DeepSpeed only warns when it cannot load
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng = torch.load(ckpt_dir / tag / f"rng_rank{rank():05d}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(client["step"])


def keep_best_state(cfg: TrainConfig, state: dict | None, node_local: bool) -> dict | None:
    """--keep-best's record ({metric, value, step, tag}) as the resumed checkpoint knew it; None when
    starting, or when the run kept another metric (then the best is searched anew)."""
    best = (state or {}).get("best")
    if not cfg.keep_best or not best:
        return None
    if best["metric"] != cfg.keep_best:
        log0(f"--keep-best {cfg.keep_best}: the checkpoint kept {best['metric']}; the best is searched anew")
        return None
    if checkpoint_writer(node_local):  # a crash after `latest` moved may have left `best` one save behind
        write_atomic(Path(cfg.output_dir) / CKPT_DIR / BEST, best["tag"])
    log0(f"best {best['metric']} so far: {best['value']:.4f} at step {best['step']} ({best['tag']})")
    return best


# ----------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """metrics.jsonl (rank 0), one fixed-format console line per step, optional TensorBoard."""

    def __init__(self, cfg: TrainConfig, start_step: int):
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        self.tb = None
        if rank() != 0:
            return
        # A crash may have logged steps after the last checkpoint: those steps will run again.
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
            write_atomic(self.path, "".join(ln + "\n" for ln in kept))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tb = SummaryWriter(str(Path(cfg.output_dir) / "tensorboard"))

    def log_eval(self, row: dict, bar, keep_best: str | None):
        """One evaluation: its row in metrics.jsonl (step and eval/<name>/<metric>), TensorBoard, a
        console line per set, and the kept metric (or the first) on the progress bar."""
        if rank() != 0:
            return
        self.write(row, tb_prefix="")  # already eval/<name>/<metric>
        for name in dict.fromkeys(k.split("/")[1] for k in row if k.startswith("eval/")):
            prefix = f"eval/{name}/"
            shown = [(k[len(prefix) :], v) for k, v in row.items() if k.startswith(prefix)]
            values = " ".join(f"{m} {v:.4f}" for m, v in shown if m != "seconds")
            tqdm.write(f"eval step {row['step']} | {name} | {values} | {row[prefix + 'seconds']:.1f} s")
        shown = keep_best or next(k for k in row if k.startswith("eval/") and not k.endswith("/seconds"))
        bar.set_postfix_str(f"{shown.removeprefix('eval/')} {row[shown]:.4f}")

    def write(self, row: dict, tb_prefix: str) -> None:
        """The row as a line of metrics.jsonl, and each of its values as a TensorBoard scalar."""
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(tb_prefix + k, v, row["step"])

    def log(self, row: dict, num_steps: int):
        if rank() != 0:
            return
        self.write(row, tb_prefix="train/")
        tqdm.write(
            f"step {row['step']}/{num_steps} | loss {row['loss']:.4f} | lr {row['lr']:.3e} | "
            f"grad_norm {row['grad_norm']:.3f} | tok/s {row['tokens_per_s']:.0f} | mem {row['peak_mem_gb']:.2f} GB"
        )


def peak_memory_gb() -> float:
    """Peak accelerator memory of this rank in GB (1e9 bytes, as everywhere in the logs and the dry
    run); on the CPU, the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


# ----------------------------------------------------------------------------------------------
# Model and engine


def build_engine(cfg: TrainConfig, ds_config: dict):
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    # HfDeepSpeedConfig makes from_pretrained load under deepspeed.zero.Init: each rank only ever
    # holds its partition of the weights, so an 8B model never sits whole on one GPU or process.
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must stay alive while the model loads)
    model = BiEncoder.from_pretrained(cfg.model, dtype=torch.bfloat16 if bf16 else torch.float32, tokenizer=False)
    if cfg.gradient_checkpointing:
        # Recompute each layer in the backward pass (math-neutral); renamed in transformers 5.x.
        kwargs = {"use_reentrant": False}
        if hasattr(model.encoder, "activation_checkpointing_enable"):
            model.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    if model.encoder.dropped_heads:
        log0(f"--model {cfg.model}: not part of the encoder, dropped: {model.encoder.dropped_heads}")
    return model, build_optimizer(cfg, model, ds_config)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, ds_config: dict):
    """AdamW with decoupled weight decay on all parameters, norms and embeddings included, as the
    recipe does. With the optimizer offloaded to the CPU, DeepSpeed's CPU Adam (vectorised C++, the
    same AdamW math, tested against torch's) instead of torch's, which is far slower on the CPU."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    offload = ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(model.parameters(), adamw_mode=True, **kwargs)
    return torch.optim.AdamW(model.parameters(), **kwargs)


def check_rope(module: torch.nn.Module):
    """RoPE must stay fp32 under bf16: DeepSpeed before 0.19.2 cast every buffer with the weights."""
    checked, fixed = check_rotary_buffers(module)
    if fixed:
        log0(f"warning: rotary buffers were not fp32 or not the config's values; recomputed in fp32: {fixed}")
    if checked:
        log0(f"rotary buffers: {len(checked)} checked, fp32 and equal to the values computed from the config")


def cpu_shm_buffer() -> Path:
    """The shared-memory file DeepSpeed's CPU communication backend maps for this rank (its allreduce
    workspace, ~66 MB; ops/csrc/cpu/comm/shm.cpp names it by uid, MASTER_ADDR, MASTER_PORT, rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{os.environ.get('RANK', '0')}"


def remove_cpu_shm_buffer() -> None:
    """At exit: DeepSpeed never removes that file, so every CPU run would leave ~66 MB per rank in
    /dev/shm (RAM) until the machine restarts. Every rank mapped the others' at start-up; removing the
    name now frees the memory once the last rank exits."""
    cpu_shm_buffer().unlink(missing_ok=True)


def setup_cuda(announce: bool):
    """Allocator settings and the attention kernel (said when `announce`), before any CUDA memory is used."""
    # Every packed micro-batch has another length: expandable segments let the caching allocator grow
    # a block instead of leaving fragments of every past shape. A user's own setting wins.
    if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    kernel = packed_kernel_name()
    if announce:
        print(f"packed attention kernel: {kernel}", flush=True)
        if "fallback" in kernel:
            print(
                "WARNING: the packed path runs per-segment SDPA, several times slower than a varlen kernel. "
                "Install torch >= 2.11 (torch.nn.attention.varlen) or flash-attn.",
                file=sys.stderr,
                flush=True,
            )


def main(argv=None):
    cfg = parse_config(argv)
    launch = launch_env()  # world size and rank from the launcher's variables, before any process group
    adopt_launch(launch)
    W = launch.world
    data, model_config = check_inputs(cfg, W)  # user errors surface here, before any GPU work
    ds_config = build_ds_config(cfg, W, model_config)
    steps_per_epoch = math.ceil(len(data) / cfg.global_batch_size)
    num_steps = cfg.epochs * steps_per_epoch  # steps of the whole run (the last of an epoch may be partial)
    T = schedule_length(len(data), cfg.global_batch_size, cfg.epochs)  # the LR schedule's length
    last_step = min(num_steps, cfg.max_steps or num_steps)  # where this run stops
    lengths = example_lengths(data, cfg.num_negatives)
    check_eval_options(cfg, data.meta, model_config)
    if cfg.dry_run:
        if launch.rank == 0:
            print_plan(cfg, data, model_config, ds_config, W, lengths, T)
        return
    check_rendezvous(launch, mpi_discovery=True)
    single_process_rendezvous(launch)
    set_device(launch)  # before the process group: NCCL's first object collective runs on the current device
    if torch.cuda.is_available():
        setup_cuda(announce=launch.rank == 0)
    deepspeed.init_distributed()
    atexit.register(remove_cpu_shm_buffer)
    # DeepSpeed's MPI discovery (mpi4py, when MASTER_ADDR is missing) sets RANK, WORLD_SIZE and LOCAL_RANK
    # anew, LOCAL_RANK from host names: it must agree with the launcher's, or the group is on another GPU
    found = (world_size(), rank(), int(os.environ.get("LOCAL_RANK", launch.local_rank)))
    if found != (W, launch.rank, launch.local_rank):
        raise UserError(
            f"the launcher ({launch.launcher}) said world size {W}, rank {launch.rank}, local rank "
            f"{launch.local_rank}; the process group has {found[0]}, {found[1]}, {found[2]}: launch one process per "
            "GPU with one of: "
            f"{SUPPORTED_LAUNCHES}"
        )
    node_local = node_local_checkpoints(ds_config)
    check_run_folder(cfg, node_local, data)
    resume_from = find_resume_point(cfg, data)  # (tag, state) or None; every check before the model loads
    beir_sets, group_sets = [], []
    if cfg.eval_beir or cfg.eval_data:
        tok = load_pretrained(AutoTokenizer.from_pretrained, cfg.model, "--model", "tokenizer")
        beir_sets, group_sets = load_eval_sets(cfg, tok, data.meta, model_config)
        for s in beir_sets:
            log0(f"eval set {s.description}")
        for g in group_sets:
            log0(f"eval set {g.name}: {len(g.data)} queries x (1 + {cfg.num_negatives}) candidates, from {g.data.path}")
    torch.manual_seed(cfg.seed)

    model, optimizer = build_engine(cfg, ds_config)
    # LambdaLR's factor at its n-th step() is f(n)/lr; DeepSpeed calls step() after each optimizer
    # step, so optimizer step s runs with f(s - 1): 0, lr/2, lr, ... for the recipe.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: lr_at(n, cfg, T) / cfg.lr if cfg.lr else 0.0)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    device = engine.device
    check_rope(engine.module)

    start_step = load_checkpoint(engine, cfg, resume_from[0]) if resume_from else 0
    if rank() == 0:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(cfg.output_dir) / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    mode = (
        f"per-GPU {cfg.micro_batch_size} x accumulation {cfg.global_batch_size // (cfg.micro_batch_size * W)}"
        if cfg.micro_batch_size
        else f"packed micro-batches of <= {cfg.max_tokens_per_gpu} tokens"
    )
    log0(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    log0(
        f"queries/step = {cfg.global_batch_size} over {W} GPUs ({mode}); {len(data)} queries, {num_steps} steps, "
        f"LR schedule length T = {T}"
    )
    if start_step:
        log0(f"resumed from step {start_step}")
    metrics = Metrics(cfg, start_step)
    best = keep_best_state(cfg, resume_from[1] if resume_from else None, node_local)

    final_loss = None
    bar = tqdm(total=last_step, initial=start_step, desc="train", unit="step", disable=rank() != 0)

    def run_eval(step: int) -> dict:
        """Every evaluation set on the current weights; the row is logged (metrics.jsonl, console, bar)."""
        t0 = time.perf_counter()
        row = {"step": step, **evaluate(engine, beir_sets, group_sets, cfg, device)}
        row["eval_seconds"] = time.perf_counter() - t0
        metrics.log_eval(row, bar, cfg.keep_best)
        return row

    evaluating = bool(beir_sets or group_sets)
    if evaluating and start_step == 0:
        run_eval(0)  # the starting model (a resumed run logged it before its first checkpoint)
    for step in range(start_step + 1, last_step + 1):  # step is 1-based
        epoch, k = divmod(step - 1, steps_per_epoch)
        queries = epoch_order(len(data), cfg.seed, epoch)[k * cfg.global_batch_size : (k + 1) * cfg.global_batch_size]
        t0 = time.perf_counter()
        loss_sum, tokens = train_step(engine, data, cfg, queries, lengths, device)
        totals = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=device)
        dist.all_reduce(totals)  # for logging and the NaN check only; gradients are DeepSpeed's
        loss = totals[0].item() / len(queries)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"step {step}: loss is {loss}; the step was not applied. Last complete checkpoint: "
                f"{read_latest(Path(cfg.output_dir) / CKPT_DIR)}. Lower --lr or check the data."
            )
        lr = engine.get_lr()[0]
        engine.step()
        elapsed = time.perf_counter() - t0
        final_loss = loss
        row = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(engine.get_global_grad_norm()),
            "num_queries": len(queries),
            "tokens": int(totals[1].item()),
            "tokens_per_s": totals[1].item() / elapsed,
            "step_time_s": elapsed,
            "peak_mem_gb": peak_memory_gb(),
        }
        metrics.log(row, num_steps)
        bar.update(1)
        new_best = False
        if evaluating and ((cfg.eval_every and step % cfg.eval_every == 0) or step == last_step):
            value = run_eval(step).get(cfg.keep_best)
            if cfg.keep_best and better(cfg.keep_best, value, best["value"] if best else None):
                best = {"metric": cfg.keep_best, "value": value, "step": step, "tag": f"step_{step:08d}"}
                new_best = True
                log0(f"best {cfg.keep_best} so far: {value:.4f} at step {step} (kept as checkpoints/{BEST})")
        if step % cfg.save_every == 0 or step == last_step or new_best:
            save_checkpoint(engine, cfg, step, num_steps, final_loss, data.meta, node_local, best)
    bar.close()
    log0(f"done: {last_step} steps, final loss {final_loss}, checkpoints in {Path(cfg.output_dir) / CKPT_DIR}")
    end_process_group()


def train_step(engine, data, cfg: TrainConfig, queries: np.ndarray, lengths: np.ndarray, device) -> tuple:
    """Forward/backward every micro-batch of this rank for one optimizer step (no optimizer update).

    Returns this rank's sum of per-query losses and its number of tokens computed.
    """
    W = world_size()
    micro_batches = split_step(queries, lengths[queries], W, cfg.micro_batch_size, cfg.max_tokens_per_gpu)[rank()]
    scale = micro_batch_loss_scale(len(queries), W)
    loss_sum, tokens = 0.0, 0
    for i, mb in enumerate(micro_batches):
        engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
        dummy = len(mb) == 0  # this rank got no query in this micro-batch: run one, count it 0 times
        mb = queries[:1] if dummy else mb
        input_ids, cu_seqlens, doc_ids = collate(data, mb, cfg.num_negatives, device)
        emb = engine(input_ids, cu_seqlens)  # queries and passages in one call: (B + B*(1+k), D)
        q, p = emb[: len(mb)], emb[len(mb) :]
        loss = contrastive_loss(q, p, cfg.temperature, cfg.in_batch_negatives, doc_ids, reduction="sum")
        engine.backward(loss * (0.0 if dummy else scale), scale_wrt_gas=False)
        if not dummy:
            loss_sum += loss.item()
            tokens += input_ids.numel()
    return loss_sum, tokens


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a UserError: "train_biencoder.py: error: ...", exit status 2
