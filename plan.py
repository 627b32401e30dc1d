"""The dry run of train_biencoder.py (`print_plan`): what a run will do and whether it fits, per GPU and
per node, without a GPU or the weights; and the memory arithmetic behind it.

Units: GB = 10**9 bytes, in the output and in --gpu-memory-gb / --host-memory-gb. A GPU sold as
"80 GB" is --gpu-memory-gb 80 (80e9 bytes, 74.5 GiB: on the safe side, since torch reports 85.5e9
bytes for an H100 80GB).

Memory per GPU (`memory_plan`) = ZeRO-3 model states (`zero3_buffers`: counted from DeepSpeed's own
allocations) + the gathered parameters (bounded by stage3_max_live_parameters) + the gradient
reduction's buffers (`reduce_buffers`) + at its largest moment either a layer's backward
(activations, `activation_bytes_per_token`, an estimate; expanded K/V) or the embedding's backward
(its dense gradient and what builds and reduces it) or the optimizer step; + NCCL's buffers
(`nccl_buffers`, an estimate) and the CUDA context. Memory per node = what the optimizer offload
keeps in host RAM, summed over the node's ranks. Both are printed beside DeepSpeed's estimator
(`estimate_zero3_model_states_mem_needs`), and the host RAM check takes the larger of the two.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from batches import epoch_order, split_step
from common import UserError
from model.attention import packed_kernel_expands_kv, packed_kernel_name
from model.loading import empty_encoder, encoder_key_report, stored_tensor_names
from retrieval import block_work_bytes
from train_eval import DOC_BLOCK, QUERY_BLOCK, REDUCE_BLOCK_BYTES

GB = 10**9  # the unit of every figure here (not GiB = 2**30)
GPU_HEADROOM = 0.9  # of a GPU's memory: the rest is left to the allocator's fragmentation (reserved > allocated)
CUDA_CONTEXT = 2**30  # the CUDA context and the cuBLAS/cuDNN handles, outside torch's allocator
HOST_HEADROOM = 0.9  # of a node's RAM: the OS, the ranks' own processes (Python, torch, CUDA libraries), page cache
# DeepSpeed's defaults of zero_optimization (runtime/zero/config.py)
SUB_GROUP_SIZE = 10**9
REDUCE_BUCKET_SIZE = 5 * 10**8
MAX_LIVE_PARAMETERS = 10**9  # stage3_max_live_parameters


def gb(nbytes: float) -> str:
    return f"{nbytes / GB:,.1f} GB"


# ----------------------------------------------------------------------------------------------
# The model and the steps


def _sizes(encoder: torch.nn.Module) -> tuple[int, int]:
    layers = max((m for m in encoder.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    layer = max(sum(p.numel() for p in block.parameters()) for block in layers)
    return sum(p.numel() for p in encoder.parameters()), layer


def model_sizes(model_config) -> tuple[int, int]:
    """(parameters of the encoder, parameters of its largest transformer layer), from the config alone."""
    return _sizes(empty_encoder(model_config))


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs of a model (`model_shape`)."""

    params: int  # parameters of the encoder
    layer: int  # parameters of its largest transformer layer
    largest_param: int  # elements of its largest parameter tensor (Llama: the token embedding)
    vocab: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    act_per_token: float  # `activation_bytes_per_token`, bf16 bytes
    intermediate: int = 0  # the MLP's width (a no-grad forward's working set)


def model_shape(model_config) -> ModelShape:
    """The encoder's sizes, from the config alone (built on the meta device)."""
    encoder = empty_encoder(model_config)
    params, layer = _sizes(encoder)
    heads = model_config.num_attention_heads
    return ModelShape(
        params=params,
        layer=layer,
        largest_param=max(p.numel() for p in encoder.parameters()),
        vocab=model_config.vocab_size,
        hidden=model_config.hidden_size,
        heads=heads,
        kv_heads=getattr(model_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(model_config, "head_dim", None) or model_config.hidden_size // heads,
        act_per_token=activation_bytes_per_token(model_config),
        intermediate=getattr(model_config, "intermediate_size", 4 * model_config.hidden_size),
    )


def activation_bytes_per_token(config) -> float:
    """A rough model of bf16 activation bytes per token with gradient checkpointing: every layer's
    checkpointed input (2 d), one layer's recompute and backward working set (norms, q/k/v/o, the MLP's
    gate/up/product) and the fp32 pooling. An estimate, not a measurement."""
    d, i = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    kv *= head_dim
    return 2 * config.num_hidden_layers * d + 2 * (17 * d + 4 * kv + 6 * i) + 12 * d


def step_plans(cfg, data, W: int, lengths: np.ndarray, steps: int) -> list[dict]:
    """Per optimizer step of the first epoch: tokens, micro-batches per GPU, largest micro-batch, from
    the training's own order and split (batches.py), so the plan splits the steps as the run will."""
    order = epoch_order(len(data), cfg.seed, 0)
    out = []
    for k in tqdm(range(steps), desc="plan", unit="step", disable=steps < 2000):
        queries = order[k * cfg.global_batch_size : (k + 1) * cfg.global_batch_size]
        where = {q: i for i, q in enumerate(queries)}
        step_lengths = lengths[queries]
        plan = split_step(queries, step_lengths, W, cfg.micro_batch_size, cfg.max_tokens_per_gpu)
        biggest = max(sum(int(step_lengths[where[q]]) for q in mb) for mbs in plan for mb in mbs)
        out.append({"tokens": int(step_lengths.sum()), "micro_batches": len(plan[0]), "max_mb_tokens": biggest})
    return out


# ----------------------------------------------------------------------------------------------
# ZeRO-3 model states, counted from DeepSpeed's code


@dataclass(frozen=True)
class Buffer:
    """One buffer ZeRO-3 allocates per parameter of a rank's partition (world size / parameters)."""

    name: str
    device: str  # "gpu" or "host"
    bytes_per_param: int
    pinned: bool = False  # page-locked host memory (`pinned_block`)
    step_only: bool = False  # exists only inside the optimizer step, one optimizer sub-group at a time
    per_sub_group: bool = False  # one allocation per optimizer sub-group instead of one per partition
    in_deepspeed_estimate: bool = True  # counted by estimate_zero3_model_states_mem_needs
    source: str = ""  # where DeepSpeed (or torch) allocates it


def dtype_name(ds_config: dict) -> str:
    if (ds_config.get("bf16") or ds_config.get("bfloat16") or {}).get("enabled"):
        return "bf16"
    return "fp16" if (ds_config.get("fp16") or {}).get("enabled") else "fp32"


def grad_accum_dtype_name(ds_config: dict) -> str:
    """data_types.grad_accum_dtype, else the model's dtype (DeepSpeed's engine.py get_data_types)."""
    from deepspeed.runtime.config import DtypeEnum

    name = (ds_config.get("data_types") or {}).get("grad_accum_dtype")
    if name is None:
        return dtype_name(ds_config)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[DtypeEnum(name).value]


def comm_dtype_name(ds_config: dict) -> str:
    """communication_data_type: the dtype ZeRO-3 reduce-scatters every micro-batch's gradients in; without
    it, the model's (DeepSpeed's engine.py communication_data_type). The ds_configs/ set fp32."""
    name = ds_config.get("communication_data_type")
    return dtype_name(ds_config) if name is None else str(name).lower()


BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def reduce_buffers(ds_config: dict, bucket: int) -> tuple[float, float]:
    """(bytes held, bytes of a reduction in flight) of ZeRO-3's gradient reduction with a reduce bucket
    of `bucket` elements, in communication_data_type (DeepSpeed 0.19.8):
    - held: with contiguous_gradients, the bucket itself, allocated once in that dtype
      (stage3.py:781-784); each gradient is copied into it, converted (:1626-1637);
    - in flight: reduce_scatter_coalesced interleaves the bucket's gradients into one flat copy of
      the same size and dtype (runtime/comm/coalesced_collectives.py:122). Without contiguous_gradients
      there is no bucket, but a gradient in another dtype is first converted, one more copy (:1920).
    So an fp32 reduction of bf16 gradients costs twice the bucket bytes of a bf16 one, in both."""
    zero = ds_config.get("zero_optimization") or {}
    c, m = BYTES[comm_dtype_name(ds_config)], BYTES[dtype_name(ds_config)]
    if zero.get("contiguous_gradients", True):
        return bucket * c, bucket * c
    return 0.0, bucket * c * (1 if c == m else 2)


def zero3_buffers(ds_config: dict) -> list[Buffer] | None:
    """Every per-parameter buffer of DeepSpeed's ZeRO-3 (DeepSpeedZeroOptimizer_Stage3, DeepSpeed
    0.19.8; line numbers of deepspeed/runtime/zero/stage3.py) for one rank's partition of the
    parameters; None for the settings this count does not cover (NVMe, parameter offload, a partial
    optimizer offload): DeepSpeed's estimate stands alone there.

    Without offload (ds_configs/zero3_bf16.json), on the GPU, in bytes per parameter:
      2  bf16 parameters: the partition, one flat buffer (lp_param_buffer, :972);
      4  fp32 master weights (_create_fp32_partitions, :1170);
      8  Adam exp_avg + exp_avg_sq: torch's AdamW state, fp32 like the master weights;
      4  gradient accumulation (grad_partitions_flat_buffer, :791), in data_types.grad_accum_dtype
         (fp32: build_ds_config sets it with bf16 and several micro-batches per step; else the model's);
     +4  during the step, the fp32 gradient of a sub-group: flatten(averaged_gradients).to(fp32)
         (_prepare_fp32_grad_for_sub_group, :2686; freed by _release_sub_group);
     +4  during the step, AdamW's sqrt(exp_avg_sq): torch._foreach_sqrt in _multi_tensor_adam (torch's
         default AdamW on CUDA).
      = 18 B/param through forward and backward, 26 inside the step (with bf16 accumulation 16 / 24).
      An fp32 model (zero3_fp32.json): 4 + 4 + 8 + 4, +8 in the step; the master weights are a copy
      there too (the alias test at :1162-1163 compares a torch.device with a string: never equal).

    With the optimizer offloaded to the CPU (ds_configs/zero3_offload.json; self.device is "cpu", :333):
      GPU: 2  bf16 parameters (the activations and gathered layers stay on the GPU too);
      host:
      4  fp32 master weights: the partition .to("cpu", fp32).clone() (:1157-1160), not pinned;
      8  Adam exp_avg + exp_avg_sq: DeepSpeedCPUAdam's state, zeros_like(fp32 partition)
         (ops/adam/cpu_adam.py:158-164, fp32_optimizer_states=True), created at the first step;
      4  fp32 gradients: the optimizer's .grad, one per sub-group (initialize_optimizer_states,
         :1338-1342), pinned (offload_optimizer.pin_memory, default true);
      4  gradient accumulation: grad_partitions_flat_buffer (:791-795) in grad_accum_dtype on
         self.device, i.e. in host memory under offload, pinned; micro-batch gradients are added into
         it (partition_grads, :2022-2037) and copied into the fp32 .grad at the boundary (:1456);
     +2  during the step, a bf16 copy of a sub-group's update: fp16 partition .copy_(fp32 partition)
         (_reassign_or_swap_out_partitioned_parameters, :2858): a blocking host-to-device copy converts
         the dtype on the CPU first (torch's aten/src/ATen/native/cuda/Copy.cu, copy_kernel_cuda).
      = 20 B/param of host memory (18 with bf16 accumulation), summed over a node's ranks:
        20 x parameters / nodes per node, +2 inside the step.

    DeepSpeed's estimate_zero3_model_states_mem_needs (:4016) counts 18 B/param on the GPU without
    offload, and 2 on the GPU + 16 per node on the host with it (x 1.5, its additional_buffer_factor):
    bf16 parameters, fp32 master weights, Adam's two moments and ONE fp32 gradient partition. It
    leaves out the gradient accumulation partition (with offload a second fp32 gradient partition,
    pinned in host memory), the step's temporaries and the rounding of pinned blocks
    (`pinned_block`); `in_deepspeed_estimate` marks what it does count.
    """
    zero = ds_config.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") or {}
    device = offload.get("device", "none") or "none"
    if (
        device not in ("none", "cpu")
        or ((zero.get("offload_param") or {}).get("device", "none") or "none") != "none"
        or offload.get("ratio", 1.0) != 1.0
    ):
        return None
    lp, acc = dtype_name(ds_config), grad_accum_dtype_name(ds_config)
    m, a = BYTES[lp], BYTES[acc]
    params = Buffer(f"{lp} parameters", "gpu", m, source="stage3.py:972 lp_param_buffer")
    moments = "Adam exp_avg + exp_avg_sq"
    if device == "none":
        return [
            params,
            Buffer("fp32 master weights", "gpu", 4, source="stage3.py:1170 _create_fp32_partitions"),
            Buffer(moments, "gpu", 8, source="torch.optim.AdamW state (fp32)"),
            Buffer(
                f"{acc} gradient accumulation", "gpu", a, in_deepspeed_estimate=False,
                source="stage3.py:791 grad_partitions_flat_buffer",
            ),
            Buffer(
                "fp32 gradient", "gpu", 4, step_only=True, per_sub_group=True,
                source="stage3.py:2686 _prepare_fp32_grad_for_sub_group",
            ),
            Buffer(
                "AdamW sqrt(exp_avg_sq)", "gpu", 4, step_only=True, per_sub_group=True, in_deepspeed_estimate=False,
                source="torch.optim.adam._multi_tensor_adam: torch._foreach_sqrt",
            ),
        ]  # fmt: skip
    pin = bool(offload.get("pin_memory", True))
    out = [
        params,
        Buffer("fp32 master weights", "host", 4, source="stage3.py:1157-1160 _create_fp32_partitions"),
        Buffer(moments, "host", 8, source="ops/adam/cpu_adam.py:158-164 DeepSpeedCPUAdam state (fp32)"),
        Buffer(
            "fp32 gradients", "host", 4, pinned=pin, per_sub_group=True,
            source="stage3.py:1338-1342 initialize_optimizer_states",
        ),
        Buffer(
            f"{acc} gradient accumulation", "host", a, pinned=pin, in_deepspeed_estimate=False,
            source="stage3.py:791-795 grad_partitions_flat_buffer",
        ),
    ]  # fmt: skip
    if m != 4:
        out.append(
            Buffer(
                f"{lp} copy of the update", "host", m, step_only=True, per_sub_group=True,
                in_deepspeed_estimate=False, source="stage3.py:2858 _reassign_or_swap_out_partitioned_parameters",
            )
        )  # fmt: skip
    return out


def bytes_per_param(buffers: list[Buffer], device: str, step_only: bool = False, estimated: bool | None = None) -> int:
    """Bytes per parameter of the partition on `device`: the buffers held throughout, or (step_only)
    the optimizer step's temporaries; `estimated` keeps only those DeepSpeed's estimator does (not) count."""
    return sum(
        b.bytes_per_param
        for b in buffers
        if b.device == device
        and b.step_only == step_only
        and (estimated is None or b.in_deepspeed_estimate == estimated)
    )


def pinned_block(nbytes: float) -> float:
    """Host bytes that a pinned (page-locked) buffer of `nbytes` takes: DeepSpeed pins with
    tensor.pin_memory() (accelerator pin_memory, unless DS_PIN_MEMORY_BACKEND=native), and torch's
    CachingHostAllocator rounds every block up to the next power of two (ATen/core/CachingHostAllocator.h,
    allocate: c10::llvm::PowerOf2Ceil): a 3.75e9-byte gradient partition takes 4 GiB (4.29e9 bytes)."""
    if nbytes <= 0 or os.environ.get("DS_PIN_MEMORY_BACKEND", "torch").strip().lower() == "native":
        return nbytes
    return float(1 << (math.ceil(nbytes) - 1).bit_length())


def allocated(buffer: Buffer, partition: float, sub_group_size: float, round_pinned: bool = True) -> float:
    """Bytes one rank allocates for `buffer` with `partition` parameters. A step-only buffer exists
    for one sub-group at a time; a sub-group is about sub_group_size parameters (it closes at the first
    parameter that reaches it); pinned blocks are rounded (`pinned_block`)."""
    if buffer.step_only:
        return buffer.bytes_per_param * min(partition, sub_group_size)
    pieces = max(1, math.ceil(partition / sub_group_size)) if buffer.per_sub_group else 1
    size = buffer.bytes_per_param * partition / pieces
    return pieces * (pinned_block(size) if buffer.pinned and round_pinned else size)


@dataclass
class Zero3Memory:
    """The model states of a run: GPU bytes per GPU, host bytes per node (`zero3_memory`)."""

    buffers: list[Buffer]
    partition: float  # parameters per rank
    gpu: float  # per GPU, held through forward and backward
    gpu_step: float  # per GPU, inside the optimizer step (held + step temporaries)
    host_node: float  # per node, held: bytes per parameter x parameters per node (no pinned rounding)
    host_node_pinned: float  # the same with pinned blocks rounded up
    host_node_step: float  # per node inside the optimizer step (pinned rounded + step temporaries)


def zero3_memory(
    total_params: int, world: int, per_node: int, ds_config: dict, round_pinned: bool = True
) -> Zero3Memory | None:
    """The count of `zero3_buffers` for `total_params` parameters over `world` ranks, `per_node` of them
    on each node; None where `zero3_buffers` does not count the settings."""
    buffers = zero3_buffers(ds_config)
    if buffers is None:
        return None
    partition = total_params / world
    sgs = (ds_config.get("zero_optimization") or {}).get("sub_group_size", SUB_GROUP_SIZE)

    def rank(device, step_only, rounded=True):
        return sum(
            allocated(b, partition, sgs, round_pinned and rounded)
            for b in buffers
            if b.device == device and b.step_only == step_only
        )

    gpu = rank("gpu", False)
    host = rank("host", False)
    return Zero3Memory(
        buffers=buffers,
        partition=partition,
        gpu=gpu,
        gpu_step=gpu + rank("gpu", True),
        host_node=per_node * rank("host", False, rounded=False),
        host_node_pinned=per_node * host,
        host_node_step=per_node * (host + rank("host", True)),
    )


def offloads(ds_config: dict) -> tuple[bool, bool]:
    """(optimizer offloaded, parameters offloaded)."""
    zero = ds_config.get("zero_optimization") or {}
    on = lambda key: ((zero.get(key) or {}).get("device", "none") or "none") != "none"
    return on("offload_optimizer"), on("offload_param")


def deepspeed_estimate(
    total_params: int, largest_layer_params: int, per_node: int, nodes: int, ds_config: dict
) -> tuple[int, int]:
    """(host bytes per node, GPU bytes per GPU) of DeepSpeed's estimate_zero3_model_states_mem_needs,
    zero_init=True as the run loads under deepspeed.zero.Init: with the optimizer offloaded 16 B/param
    per node x 1.5 (its additional_buffer_factor) on the host and 2 B/param + 4 x the largest layer on
    the GPU; without, 18 B/param + 4 x the largest layer on the GPU and 4 x the largest layer x GPUs per
    node x 1.5 on the host (loading). What it leaves out: `zero3_buffers`."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    opt, params = offloads(ds_config)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params, largest_layer_params, per_node, nodes, cpu_offload=opt, cpu_offload_params=params, zero_init=True
    )
    return cpu, gpu


# ----------------------------------------------------------------------------------------------
# The machine


def ranks_per_node(world: int) -> int:
    """Ranks on one node: LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (the deepspeed launcher); without
    either (a dry run as WORLD_SIZE=8 python train_biencoder.py --dry-run), all ranks on one node."""
    value = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    return min(max(int(value), 1), world) if value else world


def read_meminfo(path: str | Path = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo in bytes (its "kB" are KiB)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_memory(meminfo: str | Path = "/proc/meminfo", cgroup_limits=CGROUP_LIMITS) -> tuple[int, int | None, str]:
    """(bytes of RAM this machine gives this process, bytes available now or None, where from): MemTotal
    and MemAvailable of /proc/meminfo (else os.sysconf), capped by a container's cgroup memory limit."""
    try:
        info = read_meminfo(meminfo)
        total, available, source = info["MemTotal"], info.get("MemAvailable"), "this machine, /proc/meminfo"
    except (OSError, KeyError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        available, source = None, "this machine, sysconf"
    for path in cgroup_limits:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < total:
            total, source = int(text), f"the cgroup limit {path}"
            available = None if available is None else min(available, total)
        break
    return total, available, source


def gpu_memory(cfg) -> tuple[float, str] | None:
    """(bytes of one GPU, where from): the visible GPU, else --gpu-memory-gb (GB = 1e9 bytes)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    if cfg.gpu_memory_gb:
        return cfg.gpu_memory_gb * GB, f"--gpu-memory-gb {cfg.gpu_memory_gb:g}"
    return None


def host_ram(cfg) -> tuple[float, float | None, str]:
    """(bytes of one node's RAM, bytes available now or None, where from): --host-memory-gb (GB =
    1e9 bytes, for a node other than this machine), else this machine's (`host_memory`)."""
    if cfg.host_memory_gb:
        return cfg.host_memory_gb * GB, None, f"--host-memory-gb {cfg.host_memory_gb:g}"
    return host_memory()


# ----------------------------------------------------------------------------------------------
# The memory plan


# NCCL's device buffers, outside torch's allocator: an estimate from NCCL's own buffer sizes
# (src/include/device.h), not a measurement. Each connection to a peer holds one buffer per protocol:
# Simple's NCCL_BUFFSIZE (default 4 MiB), LL128's 120 elements x 640 threads x 8 steps x 8 B
# (4.6875 MiB) and LL's 8 lines x 512 threads x 8 steps x 16 B (0.5 MiB).
NCCL_BUFFSIZE = 4 * 2**20
NCCL_LL128_BYTES = 120 * 640 * 8 * 8
NCCL_LL_BYTES = 8 * 512 * 8 * 16
NCCL_CHANNELS = 32  # ring/tree channels on an NVLink node ("32 coll channels" in NCCL's INFO log; some show 24)
NCCL_CONNECTIONS_PER_CHANNEL = 3  # one ring peer and two tree peers (up and down the intra-node chain)
# NVLink SHARP, on by default on NVSwitch nodes (H100/H200) of more than 2 GPUs: 16 channels x 2 buffers of
# 1 MiB (128 KiB chunk x 8 steps) per GPU of the node, as recent NCCL logs it on 8 H100s ("NVLS comm ...
# nvlsTotalSize 268435456"); older releases used 4 MiB + 2 MiB buffers on more channels (nvlsTotalSize
# 2415919104 logged on 8 H200s in 2024): set NCCL_NVLS_ENABLE=0 there, or count 2 GB more per communicator.
NCCL_NVLS_CHANNELS = 16
NCCL_NVLS_BUFFER = 2**20
# torch's world group (ZeRO-3's all-gathers, the logging all-reduce) and DeepSpeed's clone of it (the
# gradient reduce-scatters: utils/groups.py _clone_world_group): each is a communicator with its own buffers.
NCCL_COMMUNICATORS = 2


def nccl_buffers(W: int, per_node: int, env=None) -> tuple[float, str]:
    """(bytes of NCCL buffers on each GPU, how they were counted): an estimate, see the constants above.
    NCCL_BUFFSIZE and NCCL_NVLS_ENABLE=0 in the environment change it as they change NCCL."""
    env = os.environ if env is None else env
    if W <= 1:
        return 0.0, "one GPU: no peers"
    connection = int(env.get("NCCL_BUFFSIZE", NCCL_BUFFSIZE)) + NCCL_LL128_BYTES + NCCL_LL_BYTES
    ring_tree = NCCL_CHANNELS * NCCL_CONNECTIONS_PER_CHANNEL * connection
    how = (
        f"{NCCL_COMMUNICATORS} communicators x ({NCCL_CHANNELS} channels x {NCCL_CONNECTIONS_PER_CHANNEL} "
        f"connections x {connection / 2**20:g} MiB"
    )
    nvls = 0
    if per_node > 2 and env.get("NCCL_NVLS_ENABLE", "1") != "0":
        nvls = NCCL_NVLS_CHANNELS * 2 * NCCL_NVLS_BUFFER * per_node
        how += f" + NVLink SHARP {nvls / 2**20:g} MiB"
    return NCCL_COMMUNICATORS * (ring_tree + nvls), how + ")"


def eval_buffers(shape: ModelShape, eval_tokens: int, m: int) -> tuple[float, float]:
    """(a no-grad forward's working set, the search's or the query sum's blocks) in bytes per GPU, for
    the evaluation during training's packs of `eval_tokens` tokens (train_eval.py). A forward holds one
    layer at a time: its normed input, q, k, v, the attention and o-projection outputs, and the MLP's
    gate, up and product, in the model's dtype. Then the queries are summed over the ranks in blocks of
    REDUCE_BLOCK_BYTES, or the search works on one block at a time (retrieval.block_work_bytes). The
    embeddings themselves stay in host memory, whatever the corpus."""
    kv = shape.kv_heads * shape.head_dim
    forward = eval_tokens * (4 * shape.hidden + 2 * kv + 3 * shape.intermediate) * m
    return forward, max(REDUCE_BLOCK_BYTES, block_work_bytes(shape.hidden, QUERY_BLOCK, DOC_BLOCK))


def memory_plan(
    shape: ModelShape,
    max_mb_tokens: int,
    ds_config: dict,
    W: int,
    per_node: int,
    kv_expanded: bool = False,
    eval_tokens: int | None = None,
) -> dict:
    """Bytes per GPU and per node of a run of the model `shape` with micro-batches of up to
    `max_mb_tokens` tokens, W ranks, `per_node` per node; `kv_expanded`: the packed attention kernel
    copies grouped KV heads up to the query heads (`packed_kernel_expands_kv`).

    GPU, the largest of three moments, each on top of the model states (`zero3_memory`), the gathered
    parameters (`live`) and the reduce bucket (`reduce_buffers`, held throughout):
    - a layer's backward, early in the backward: every layer's checkpointed input is still held
      (activations), + the reduce-scatter's copy of the bucket + the expanded K/V and their gradients;
    - the embedding's backward, last: the activations are gone, but torch builds the embedding's dense
      gradient (vocab x hidden, the model's dtype: at::zeros in EmbeddingBackwardKernel.cu) from fp32
      partial sums of T/10 + min(T, vocab) rows (max_partial_segment, NROWS_PER_THREAD = 10; above 3072
      tokens) of the output gradient (T x hidden); then, larger than the reduce bucket, that gradient is
      reduce-scattered on its own (stage3.py:1626 leaves it out of the bucket), first converted to
      communication_data_type (stage3.py:1920) and interleaved when W does not divide it
      (coalesced_collectives.py:102-122);
    - the optimizer step: the model states and the step's temporaries + the bucket;
    - with `eval_tokens` (the evaluation during training's packs), the evaluation: a no-grad forward's
      working set or the search's blocks (`eval_buffers`); the embeddings stay in host memory.
    Gathered parameters: ZeRO-3 stops prefetching at stage3_max_live_parameters, but adds a whole tensor
    at a time (partitioned_param_coordinator.py:453-457), so up to that + the largest parameter are
    gathered, and never more than the model. Outside torch's allocator: NCCL's buffers (`nccl_buffers`,
    an estimate) and the CUDA context. The planned peak is the largest moment + those; what the GPU has
    beyond it is the margin.

    Host: need = the larger of our count (pinned blocks rounded, inside the step) and DeepSpeed's
    estimate per node."""
    nodes = max(1, math.ceil(W / per_node))
    zero = ds_config.get("zero_optimization") or {}
    m, c = BYTES[dtype_name(ds_config)], BYTES[comm_dtype_name(ds_config)]
    T = max_mb_tokens
    largest_module = max(shape.layer, shape.vocab * shape.hidden)  # DeepSpeed's estimator's "largest layer"
    ds_host, ds_gpu = deepspeed_estimate(shape.params, largest_module, per_node, nodes, ds_config)
    states = zero3_memory(shape.params, W, per_node, ds_config)
    max_live = zero.get("stage3_max_live_parameters", MAX_LIVE_PARAMETERS)
    live = min(shape.params, max_live + shape.largest_param) * m
    bucket_numel = zero.get("reduce_bucket_size", REDUCE_BUCKET_SIZE)
    bucket_numel = shape.layer if bucket_numel == "auto" else bucket_numel  # as build_ds_config resolves it
    bucket, reducing = reduce_buffers(ds_config, bucket_numel)
    activations = shape.act_per_token * T * m / 2
    kv = 4 * T * shape.heads * shape.head_dim * m if kv_expanded and shape.kv_heads < shape.heads else 0
    embedding = shape.vocab * shape.hidden
    embedding_grad = embedding * m
    partials = (T // 10 + min(T, shape.vocab)) * shape.hidden * 4 if T > 3072 else 0
    output_grad = T * shape.hidden * m
    copies = (c != m) + (embedding % W != 0) if embedding > bucket_numel else 0
    embedding_reduce = embedding * c * copies
    gpu_states = states.gpu if states else ds_gpu
    layer_backward = gpu_states + live + bucket + reducing + activations + kv
    embedding_backward = (
        gpu_states + live + bucket + embedding_grad + max(output_grad + partials, reducing, embedding_reduce)
    )
    step = (states.gpu_step if states else ds_gpu) + bucket
    moments = {
        "a layer's backward": layer_backward,
        "the embedding's backward": embedding_backward,
        "the optimizer step": step,
    }
    eval_forward, eval_search = eval_buffers(shape, eval_tokens, m) if eval_tokens else (0, 0)
    if eval_tokens:
        moments["the evaluation"] = gpu_states + live + bucket + max(eval_forward, eval_search)
    when = max(moments, key=moments.get)
    nccl, nccl_how = nccl_buffers(W, per_node)
    host = states.host_node_step if states else 0
    return {
        "states": states,
        "offload": offloads(ds_config)[0],
        "nodes": nodes,
        "per_node": per_node,
        "gpu_states": gpu_states,
        "live": live,
        "max_live": max_live,
        "largest_param": shape.largest_param,
        "reduce_bucket": bucket,
        "reduce_copy": reducing,
        "reduce_dtype": comm_dtype_name(ds_config),
        "activations": activations,
        "kv_copies": kv,
        "embedding_grad": embedding_grad,
        "embedding_partials": partials,
        "embedding_output_grad": output_grad,
        "embedding_reduce_copy": embedding_reduce,
        "gpu_layer_backward": layer_backward,
        "gpu_embedding_backward": embedding_backward,
        "gpu_step": step,
        "eval_tokens": eval_tokens,
        "eval_forward": eval_forward,
        "eval_search": eval_search,
        "gpu_eval": moments.get("the evaluation", 0),
        "gpu_peak_when": when,
        "nccl": nccl,
        "nccl_how": nccl_how,
        "gpu_peak": moments[when] + nccl + CUDA_CONTEXT,
        "deepspeed_gpu": ds_gpu,
        "deepspeed_host": ds_host,
        "host_ours": host,
        "host_need": max(host, ds_host),
    }


def _terms(buffers: list[Buffer], device: str, step_only: bool = False) -> str:
    return ", ".join(
        f"{b.name} {b.bytes_per_param}" + (" pinned" if b.pinned else "")
        for b in buffers
        if b.device == device and b.step_only == step_only
    )


INDENT = " " * 11  # continuation lines of the plan, under its 11-character labels


def gpu_lines(p: dict, shape: ModelShape, max_mb_tokens: int, gpu: tuple | None) -> list[str]:
    """The plan's GPU lines: what one GPU holds at each moment (`memory_plan`), the planned peak, the margin."""
    s: Zero3Memory | None = p["states"]
    if s:
        states = (
            f"model states {gb(p['gpu_states'])} ({bytes_per_param(s.buffers, 'gpu')} B/param x {s.partition:,.0f} "
            f"parameters per GPU: {_terms(s.buffers, 'gpu')})"
        )
        step_terms = _terms(s.buffers, "gpu", True)
    else:
        states = f"model states {gb(p['gpu_states'])} (DeepSpeed's estimator; this ZeRO setting is not counted)"
        step_terms = ""
    c, T = p["reduce_dtype"], max_mb_tokens
    if p["kv_copies"]:
        kv = f" + K/V expanded to {shape.heads} heads and their gradients {gb(p['kv_copies'])}"
    elif shape.kv_heads < shape.heads:
        kv = f" (the packed kernel takes the {shape.kv_heads} KV heads as they are: no K/V copies)"
    else:
        kv = ""
    reduce_copy = (
        f"its {c} copy to reduce-scatter {gb(p['embedding_reduce_copy'])}, " if p["embedding_reduce_copy"] else ""
    )
    lines = [
        f"memory/GPU {states}",
        f"{INDENT}+ gathered parameters <= {gb(p['live'])} (stage3_max_live_parameters {p['max_live']:,} + the "
        f"largest parameter {p['largest_param']:,}) + {c} reduce bucket {gb(p['reduce_bucket'])} "
        f"(communication_data_type)",
        f"{INDENT}a layer's backward {gb(p['gpu_layer_backward'])}: + activations {gb(p['activations'])} (estimate for "
        f"{T:,} tokens) + the bucket's reduce-scatter copy {gb(p['reduce_copy'])}{kv}",
        f"{INDENT}the embedding's backward {gb(p['gpu_embedding_backward'])}: + its dense gradient "
        f"{gb(p['embedding_grad'])} ({shape.vocab:,} x {shape.hidden:,}) + the largest of: fp32 partial sums "
        f"{gb(p['embedding_partials'])} with the output gradient {gb(p['embedding_output_grad'])}, {reduce_copy}"
        f"the bucket's reduce-scatter copy {gb(p['reduce_copy'])}",
        f"{INDENT}the optimizer step {gb(p['gpu_step'])}" + (f" (+ {step_terms} B/param)" if step_terms else ""),
        *(
            [
                f"{INDENT}the evaluation {gb(p['gpu_eval'])}: + the larger of a no-grad forward of "
                f"{p['eval_tokens']:,} tokens {gb(p['eval_forward'])} (estimate) and the search's blocks "
                f"{gb(p['eval_search'])}; the embeddings stay in host memory, whatever the corpus"
            ]
            if p["eval_tokens"]
            else []
        ),
        f"{INDENT}outside torch's allocator: NCCL buffers {gb(p['nccl'])} (estimate: {p['nccl_how']}) + CUDA context "
        f"{gb(CUDA_CONTEXT)}",
        f"{INDENT}planned peak {gb(p['gpu_peak'])}: {p['gpu_peak_when']} + outside the allocator; DeepSpeed's "
        f"estimator {gb(p['deepspeed_gpu'])} (model states + the largest layer gathered, and its gradient)",
    ]
    if gpu is None:
        lines.append("GPU fits?  no GPU visible: pass --gpu-memory-gb (GB = 1e9 bytes; 80 for an 80 GB GPU) to check")
        return lines
    total, where = gpu
    margin, keep = total - p["gpu_peak"], (1 - GPU_HEADROOM) * total
    verdict = (
        "fits" if margin >= keep else "DOES NOT FIT: lower --max-tokens-per-gpu or use ds_configs/zero3_offload.json"
    )
    lines.append(
        f"GPU fits?  {verdict}: margin {gb(margin)} = {gb(total)} ({where}) - planned peak {gb(p['gpu_peak'])}; "
        f"at least {gb(keep)} ({1 - GPU_HEADROOM:.0%}) must stay for the allocator's fragmentation"
    )
    return lines


def host_lines(p: dict, host: tuple) -> list[str]:
    """The plan's host lines: what the optimizer offload keeps in each node's RAM, and whether it fits."""
    s: Zero3Memory | None = p["states"]
    ranks = f"{p['per_node']} rank(s) per node, {p['nodes']} node(s)"
    if s and bytes_per_param(s.buffers, "host"):
        host_b = bytes_per_param(s.buffers, "host")
        ours = (
            f"model states {gb(s.host_node)} ({host_b} B/param x {s.partition:,.0f} parameters per rank x "
            f"{p['per_node']}: {_terms(s.buffers, 'host')}), {gb(s.host_node_pinned)} with pinned blocks rounded up "
            f"to powers of two"
        )
        if bytes_per_param(s.buffers, "host", True):
            ours += f", {gb(s.host_node_step)} in the optimizer step (+ {_terms(s.buffers, 'host', True)} B/param)"
        est = f"DeepSpeed's estimator {gb(p['deepspeed_host'])} (without the gradient accumulation partition, x 1.5)"
    else:
        ours = "no model states in host memory"
        est = f"DeepSpeed's estimator {gb(p['deepspeed_host'])} (its allowance for loading under zero.Init)"
    lines = [f"host/node  {ranks}: {ours}; {est}; checked: the larger, {gb(p['host_need'])}"]
    ram, available, source = host
    usable = HOST_HEADROOM * ram
    now = f"; {gb(available)} available now" if available is not None else ""
    if p["host_need"] <= usable:
        verdict = "fits"
    elif p["offload"]:
        verdict = (
            "DOES NOT FIT: more nodes (the offloaded states per node fall with their number), or "
            "ds_configs/zero3_bf16.json on GPUs that hold the optimizer"
        )
    else:
        verdict = "DOES NOT FIT: fewer ranks per node, or a node with more RAM"
    lines.append(
        f"host fits? {verdict} ({gb(p['host_need'])} of {gb(usable)} usable = {HOST_HEADROOM:.0%} of {gb(ram)}, "
        f"{source}{now}; --host-memory-gb for another node)"
    )
    return lines


def memory_lines(p: dict, shape: ModelShape, max_mb_tokens: int, gpu: tuple | None, host: tuple) -> list[str]:
    """The plan's memory lines: per GPU, per node, and whether each fits."""
    return gpu_lines(p, shape, max_mb_tokens, gpu) + host_lines(p, host)


def print_plan(cfg, data, model_config, ds_config: dict, W: int, lengths, T: int):
    """--dry-run: what the run will do and whether it fits, per GPU and per node, without a GPU or
    the weights."""
    stored = stored_tensor_names(cfg.model)
    encoder = empty_encoder(model_config)
    if stored is None:
        keys = "not listed locally (a hub name not yet downloaded, or .bin weights): checked when the weights load"
    else:
        report = encoder_key_report(encoder, stored)
        if report["missing"] or report["unexpected"]:
            raise UserError(
                f"--model {cfg.model}: the checkpoint does not match the encoder: missing {report['missing'][:6]}, "
                f"unexpected {report['unexpected'][:6]}"
            )
        keys = f"all {len(encoder.state_dict())} encoder tensors present" + (
            f"; dropped (not part of the encoder): {report['dropped']}" if report["dropped"] else ""
        )
    shape = model_shape(model_config)
    steps_per_epoch = math.ceil(len(data) / cfg.global_batch_size)
    plans = step_plans(cfg, data, W, lengths, steps_per_epoch)
    tokens = np.array([p["tokens"] for p in plans])
    mbs = np.array([p["micro_batches"] for p in plans])
    max_mb = max(p["max_mb_tokens"] for p in plans)

    zero = ds_config["zero_optimization"]
    offload, _ = offloads(ds_config)
    # the kernel this machine's torch would run on CUDA: run the dry run where the training runs
    expands_kv = packed_kernel_expands_kv()
    eval_tokens = (cfg.eval_max_tokens or cfg.max_tokens_per_gpu) if (cfg.eval_beir or cfg.eval_data) else None
    memory = memory_plan(shape, max_mb, ds_config, W, ranks_per_node(W), expands_kv, eval_tokens)
    micro = (
        f"{cfg.micro_batch_size} queries per forward"
        if cfg.micro_batch_size
        else f"packed <= {cfg.max_tokens_per_gpu} tokens"
    )
    lines = [
        f"dry run: nothing trained; {W} GPU(s) (WORLD_SIZE; e.g. WORLD_SIZE=8 python train_biencoder.py --dry-run); "
        f"memory in GB = 1e9 bytes",
        f"data       {cfg.data}: {len(data)} queries, {cfg.num_negatives} negatives each, "
        f"tokenizer {data.meta['tokenizer']}",
        f"model      {cfg.model}: {model_config.model_type}, {shape.params:,} parameters, largest layer "
        f"{shape.layer:,}; {keys}",
        f"steps      {cfg.epochs} epoch(s) x {steps_per_epoch} = {cfg.epochs * steps_per_epoch} steps"
        + (f", stopping at --max-steps {cfg.max_steps}" if cfg.max_steps else "")
        + f"; LR schedule length T = {T} (warmup {cfg.warmup_steps}, lr {cfg.lr:g})",
        f"per step   {cfg.global_batch_size} queries = {cfg.global_batch_size // W} per GPU; tokens mean "
        f"{tokens.mean():,.0f}, max {tokens.max():,} (all GPUs, no padding)",
        f"micro      {micro}: micro-batches per GPU per step mean {mbs.mean():.2f}, max {mbs.max()}; "
        f"largest micro-batch {max_mb:,} tokens; packed attention on CUDA: {packed_kernel_name()}"
        + (" (KV heads expanded to the query heads)" if expands_kv else ""),
        f"zero       prefetch bucket {zero.get('stage3_prefetch_bucket_size')}, reduce bucket "
        f"{zero.get('reduce_bucket_size')}, persistence threshold {zero.get('stage3_param_persistence_threshold')}, "
        f"grad accumulation {ds_config.get('data_types', {}).get('grad_accum_dtype', 'model dtype')}, "
        f"gradient reduction {comm_dtype_name(ds_config)} (communication_data_type), "
        f"max live parameters {zero.get('stage3_max_live_parameters', MAX_LIVE_PARAMETERS):,}, "
        f"optimizer offload {'on' if offload else 'off'}",
        *memory_lines(memory, shape, max_mb, gpu_memory(cfg), host_ram(cfg)),
    ]
    print("\n".join(lines), flush=True)
