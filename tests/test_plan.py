"""The dry run's memory arithmetic (plan.py): the ZeRO-3 count against DeepSpeed's own estimator, the
8B figures, GB = 1e9 bytes, the machine's RAM. Fast: nothing launched, no weights."""

import copy
import dataclasses
import functools
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from bench_setup import llama_config
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

import plan
import train_biencoder as tb
from tiny_models import REPO, free_port, tiny_llama_config

P_8B = 7_504_924_672  # Llama-3.1-8B without lm_head
LAYER_8B = 218_112_000  # one decoder layer
EMBED_8B = 128256 * 4096  # the largest module (DeepSpeed's estimator's "largest layer")
NCCL_CONNECTION = 4 * 2**20 + 4_915_200 + 2**19  # NCCL's Simple + LL128 + LL buffers of one connection


@functools.cache
def shape_8b() -> plan.ModelShape:
    return plan.model_shape(llama_config("8b"))


def ds_json(name: str, grad_accum: str | None = None) -> dict:
    ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    if grad_accum:
        ds["data_types"] = {"grad_accum_dtype": grad_accum}
    return ds


@pytest.fixture(autouse=True)
def torch_pinning(monkeypatch):
    monkeypatch.delenv("DS_PIN_MEMORY_BACKEND", raising=False)  # DeepSpeed pins through torch by default
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "NCCL_BUFFSIZE", "NCCL_NVLS_ENABLE"):
        monkeypatch.delenv(key, raising=False)


CASES = list(
    itertools.product(
        [P_8B, 1_235_814_400, 109_482_240, 3_000_000_001],  # 8B, 1B, BERT-base, one not divisible by the GPUs
        [1, 2, 8],  # GPUs per node
        [1, 2, 4],  # nodes
        ["zero3_bf16", "zero3_offload"],
        ["fp32", "bf16"],  # data_types.grad_accum_dtype
    )
)


@pytest.mark.parametrize("params, per_node, nodes, config, accum", CASES)
def test_the_count_is_deepspeeds_estimate_plus_what_it_leaves_out(params, per_node, nodes, config, accum):
    ds = ds_json(config, accum)
    offload = config == "zero3_offload"
    W = per_node * nodes
    cpu, gpu, largest_mem = estimate_zero3_model_states_mem_needs(
        params, EMBED_8B, per_node, nodes, cpu_offload=offload, cpu_offload_params=False, zero_init=True
    )
    assert plan.deepspeed_estimate(params, EMBED_8B, per_node, nodes, ds) == (cpu, gpu)
    buffers = plan.zero3_buffers(ds)
    per_param = lambda device, estimated: sum(
        plan.bytes_per_param(buffers, device, step_only, estimated) for step_only in (False, True)
    )
    # What DeepSpeed's estimator counts is exactly the buffers marked in_deepspeed_estimate ...
    assert per_param("gpu", True) * params / W == pytest.approx(gpu - largest_mem, abs=1)
    if offload:
        assert per_param("gpu", True) == 2 and per_param("host", True) == 16
        assert per_param("host", True) * params / nodes * 1.5 == pytest.approx(cpu, abs=2)
    else:
        assert per_param("gpu", True) == 18 and per_param("host", None) == 0
        assert cpu == int(4 * EMBED_8B * per_node * 1.5)  # its allowance for loading under zero.Init
    # ... and it leaves out the gradient accumulation partition (and the step's temporaries).
    left_out = {b.name: (b.device, b.bytes_per_param) for b in buffers if not b.in_deepspeed_estimate}
    assert left_out[f"{accum} gradient accumulation"] == ("host" if offload else "gpu", {"fp32": 4, "bf16": 2}[accum])
    assert all(b.step_only for b in buffers if not b.in_deepspeed_estimate and "accumulation" not in b.name)
    # zero3_memory: bytes per parameter x the partition, summed over a node's ranks (no pinned rounding)
    m = plan.zero3_memory(params, W, per_node, ds, round_pinned=False)
    assert m.gpu == pytest.approx(plan.bytes_per_param(buffers, "gpu") * params / W)
    assert m.host_node == pytest.approx(plan.bytes_per_param(buffers, "host") * params / nodes)
    assert m.host_node_pinned == pytest.approx(m.host_node)


def test_8b_recipe_with_zero3_offload_needs_20_bytes_per_parameter_of_host_memory():
    """bf16, the optimizer offloaded with pinned memory, fp32 gradient accumulation as build_ds_config
    sets it for the recipe: 4 fp32 master + 8 Adam + 4 fp32 gradients + 4 fp32 accumulation."""
    config = llama_config("8b")
    cfg = tb.TrainConfig(deepspeed=str(REPO / "ds_configs" / "zero3_offload.json"))
    ds = tb.build_ds_config(cfg, 8, config)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert plan.model_sizes(config) == (P_8B, LAYER_8B)
    buffers = plan.zero3_buffers(ds)
    assert {b.name: b.bytes_per_param for b in buffers if b.device == "host" and not b.step_only} == {
        "fp32 master weights": 4,
        "Adam exp_avg + exp_avg_sq": 8,
        "fp32 gradients": 4,
        "fp32 gradient accumulation": 4,
    }
    assert plan.bytes_per_param(buffers, "host") == 20 and plan.bytes_per_param(buffers, "gpu") == 2
    assert plan.bytes_per_param(buffers, "host", step_only=True) == 2  # the bf16 copy of the update

    m = plan.zero3_memory(P_8B, 8, 8, ds)
    assert m.gpu == 2 * P_8B / 8  # 1.9 GB per GPU
    assert m.host_node == 20 * P_8B  # 150.1 GB per node
    # the two pinned gradient partitions of each rank (3.75e9 bytes each) take 4 GiB blocks
    assert m.host_node_pinned == 12 * P_8B + 8 * 2 * 2**32  # 158.8 GB
    assert m.host_node_step == m.host_node_pinned + 2 * P_8B  # 173.8 GB (partition < sub_group_size)
    shape = shape_8b()
    p = plan.memory_plan(shape, 49152, ds, 8, 8)
    assert p["deepspeed_host"] == int(16 * P_8B * 1.5)  # 180.1 GB: larger than ours, the one checked
    assert p["host_need"] == p["deepspeed_host"]
    gpu, host = (80e9, "--gpu-memory-gb 80"), (256e9, None, "--host-memory-gb 256")
    lines = "\n".join(plan.memory_lines(p, shape, 49152, gpu, host))
    assert "150.1 GB (20 B/param x 938,115,584 parameters per rank x 8" in lines
    assert "158.8 GB with pinned blocks" in lines and "173.8 GB in the optimizer step" in lines
    assert "checked: the larger, 180.1 GB" in lines
    assert "host fits? fits (180.1 GB of 230.4 GB usable = 90% of 256.0 GB, --host-memory-gb 256" in lines
    assert "GPU fits?  fits: margin " in lines and " = 80.0 GB (--gpu-memory-gb 80) - planned peak " in lines
    # two nodes halve the host memory per node (and the partition per rank)
    two = plan.memory_plan(shape, 49152, ds, 16, 8)
    assert two["states"].host_node == 10 * P_8B and two["deepspeed_host"] == int(8 * P_8B * 1.5)
    small = "\n".join(plan.memory_lines(p, shape, 49152, None, (128e9, None, "--host-memory-gb 128")))
    assert "host fits? DOES NOT FIT: more nodes" in small and "no GPU visible: pass --gpu-memory-gb" in small


def test_8b_recipe_with_zero3_bf16_per_gpu():
    """What one GPU holds for the recipe on one node of 8 GPUs (bf16, fp32 reduction, micro-batches of
    up to 49,152 tokens, a varlen kernel without GQA), term by term, and beside DeepSpeed's estimator."""
    config = llama_config("8b")
    cfg = tb.TrainConfig(deepspeed=str(REPO / "ds_configs" / "zero3_bf16.json"))
    ds = tb.build_ds_config(cfg, 8, config)
    buffers = plan.zero3_buffers(ds)
    assert plan.bytes_per_param(buffers, "gpu") == 18  # 2 bf16 + 4 fp32 master + 8 Adam + 4 fp32 accumulation
    assert plan.bytes_per_param(buffers, "gpu", step_only=True) == 8  # fp32 gradient + AdamW's sqrt(exp_avg_sq)
    assert plan.bytes_per_param(buffers, "host") == 0
    shape, T = shape_8b(), 49152
    assert (shape.params, shape.layer, shape.largest_param) == (P_8B, LAYER_8B, EMBED_8B)
    p = plan.memory_plan(shape, T, ds, 8, 8, kv_expanded=True)
    assert p["gpu_states"] == 18 * P_8B / 8  # 16.9 GB
    # prefetching stops at stage3_max_live_parameters, a whole tensor at a time: the embedding can overshoot it
    assert p["live"] == (10**9 + EMBED_8B) * 2  # 3.1 GB
    assert p["reduce_bucket"] == p["reduce_copy"] == 4 * LAYER_8B  # one layer in fp32, 0.9 GB each
    # a layer's backward: the activations, and K and V expanded from 8 to 32 heads, with their gradients
    assert p["kv_copies"] == 4 * T * 32 * 128 * 2  # 1.6 GB
    held = p["gpu_states"] + p["live"] + p["reduce_bucket"]
    assert p["gpu_layer_backward"] == held + p["reduce_copy"] + p["activations"] + p["kv_copies"]  # 54.3 GB
    # the embedding's backward: its dense bf16 gradient, summed from fp32 partials of T/10 + T rows, then
    # reduce-scattered alone (larger than the bucket) after a conversion to fp32: the largest transient
    assert p["embedding_grad"] == 128256 * 4096 * 2  # 1.05 GB
    assert p["embedding_partials"] == (T // 10 + T) * 4096 * 4  # 0.89 GB
    assert p["embedding_output_grad"] == T * 4096 * 2  # 0.4 GB
    assert p["embedding_reduce_copy"] == 4 * EMBED_8B  # 2.1 GB
    assert p["gpu_embedding_backward"] == held + p["embedding_grad"] + p["embedding_reduce_copy"]  # 24.0 GB
    assert p["gpu_step"] == 26 * P_8B / 8 + 4 * LAYER_8B  # + the reduce bucket: 25.3 GB
    # NCCL: 2 communicators x (32 channels x 3 connections + NVLink SHARP: 16 channels x 2 MiB x 8 GPUs)
    assert p["nccl"] == 2 * (32 * 3 * NCCL_CONNECTION + 16 * 2 * 2**20 * 8)  # 2.4 GB
    assert p["gpu_peak_when"] == "a layer's backward"
    assert p["gpu_peak"] == p["gpu_layer_backward"] + p["nccl"] + 2**30  # 57.8 GB
    assert p["host_need"] == p["deepspeed_host"] == int(4 * EMBED_8B * 8 * 1.5)  # 25.2 GB
    lines = "\n".join(plan.memory_lines(p, shape, T, (80e9, "--gpu-memory-gb 80"), (256e9, None, "256")))
    for term in (
        "gathered parameters <= 3.1 GB (stage3_max_live_parameters 1,000,000,000 + the largest parameter 525,336,576)",
        "fp32 reduce bucket 0.9 GB (communication_data_type)",
        "a layer's backward 54.3 GB: + activations 31.0 GB (estimate for 49,152 tokens)",
        "K/V expanded to 32 heads and their gradients 1.6 GB",
        "the embedding's backward 24.0 GB: + its dense gradient 1.1 GB (128,256 x 4,096)",
        "fp32 partial sums 0.9 GB with the output gradient 0.4 GB, its fp32 copy to reduce-scatter 2.1 GB",
        "the optimizer step 25.3 GB",
        "NCCL buffers 2.4 GB (estimate: 2 communicators x (32 channels x 3 connections x 9.1875 MiB + NVLink SHARP",
        "planned peak 57.8 GB: a layer's backward + outside the allocator",
        "GPU fits?  fits: margin 22.2 GB = 80.0 GB (--gpu-memory-gb 80) - planned peak 57.8 GB; at least 8.0 GB (10%)",
    ):
        assert term in lines, term
    # DeepSpeed's estimator: 18 B/param + 4 B x the largest module, the embedding gathered and its gradient
    # (bf16). The plan holds the same 18 B/param (split otherwise: see the test of the count above), the
    # embedding gathered (within the live parameters) and its gradient, and more at every moment.
    assert p["deepspeed_gpu"] == 18 * P_8B / 8 + 4 * EMBED_8B  # 19.0 GB
    assert "DeepSpeed's estimator 19.0 GB (model states + the largest layer gathered, and its gradient)" in lines
    assert p["live"] >= 2 * EMBED_8B and p["embedding_grad"] == 2 * EMBED_8B
    assert min(p["gpu_layer_backward"], p["gpu_embedding_backward"], p["gpu_step"]) > p["deepspeed_gpu"]


def test_the_evaluation_during_training_is_counted_and_does_not_grow_with_the_corpus():
    """--eval-beir on the 8B recipe: a no-grad forward of the evaluation's packs or the search's blocks,
    on top of what is held; no term of the corpus (MS MARCO's 8.8M passages would be 18 GB per GPU at
    D = 4,096 on 8 ranks if the embeddings stayed on the device)."""
    cfg = tb.TrainConfig(deepspeed=str(REPO / "ds_configs" / "zero3_bf16.json"))
    ds = tb.build_ds_config(cfg, 8, llama_config("8b"))
    shape, T = shape_8b(), 49152
    p = plan.memory_plan(shape, T, ds, 8, 8, eval_tokens=T)
    # one layer's no-grad working set: normed input, q, o, attention output (4 d), k and v (2 x 1,024), the
    # MLP's gate, up and product (3 x 14,336), bf16
    assert p["eval_forward"] == T * (4 * 4096 + 2 * 1024 + 3 * 14336) * 2  # 6.0 GB
    # the search's blocks at D = 4,096 as the search itself budgets them (retrieval.block_work_bytes): 1,024
    # queries and 16,384 documents with their filter copies, four 64 MB score blocks, two float64 pieces
    assert p["eval_search"] == 4096 * (6 * 1024 + 10 * 16384) + 4 * 4 * 2**24 + 4 * 8 * 2**23  # 1.2 GB
    assert p["eval_search"] > 2**28  # more than the query sum's 256 MiB blocks
    held = p["gpu_states"] + p["live"] + p["reduce_bucket"]
    assert p["gpu_eval"] == held + p["eval_forward"]  # 26.8 GB: below a layer's backward
    assert p["gpu_peak_when"] == "a layer's backward" and p["gpu_eval"] < 30e9
    lines = "\n".join(plan.memory_lines(p, shape, T, (80e9, "--gpu-memory-gb 80"), (256e9, None, "256")))
    assert "the evaluation 26.8 GB: + the larger of a no-grad forward of 49,152 tokens 6.0 GB (estimate)" in lines
    assert "the embeddings stay in host memory, whatever the corpus" in lines
    # without evaluation, no such moment
    assert "the evaluation" not in "\n".join(
        plan.memory_lines(plan.memory_plan(shape, T, ds, 8, 8), shape, T, None, (256e9, None, "256"))
    )


def test_what_the_gpu_holds_follows_the_kernel_the_gpus_and_the_model():
    ds = tb.build_ds_config(
        tb.TrainConfig(deepspeed=str(REPO / "ds_configs" / "zero3_bf16.json")), 8, llama_config("8b")
    )
    # a kernel that takes grouped KV heads (flash-attn, varlen_attn with enable_gqa) copies nothing
    p = plan.memory_plan(shape_8b(), 49152, ds, 8, 8, kv_expanded=False)
    assert p["kv_copies"] == 0
    assert "(the packed kernel takes the 8 KV heads as they are: no K/V copies)" in "\n".join(
        plan.memory_lines(p, shape_8b(), 49152, None, (1e12, None, ""))
    )
    # NCCL: nothing on one GPU; NVLink SHARP only with more than 2 GPUs per node; NCCL's own settings
    assert plan.nccl_buffers(1, 1) == (0.0, "one GPU: no peers")
    assert plan.nccl_buffers(2, 2)[0] == 2 * 32 * 3 * NCCL_CONNECTION
    assert plan.nccl_buffers(16, 8)[0] == 2 * (32 * 3 * NCCL_CONNECTION + 16 * 2 * 2**20 * 8)
    assert plan.nccl_buffers(8, 8, {"NCCL_NVLS_ENABLE": "0"})[0] == 2 * 32 * 3 * NCCL_CONNECTION
    smaller = plan.nccl_buffers(8, 8, {"NCCL_BUFFSIZE": str(2**20)})[0]
    assert smaller == 2 * (32 * 3 * (NCCL_CONNECTION - 3 * 2**20) + 16 * 2 * 2**20 * 8)
    # a tiny Llama: all its parameters can be gathered at once (fewer than stage3_max_live_parameters);
    # 3,072 tokens or fewer take torch's embedding backward without partial sums; an embedding that fits in
    # the bucket is reduced through it; an fp32 model reduced in fp32 makes no copy of it
    tiny = plan.model_shape(tiny_llama_config())
    ds = tb.build_ds_config(
        tb.TrainConfig(deepspeed=str(REPO / "ds_configs" / "zero3_bf16.json")), 2, tiny_llama_config()
    )
    p = plan.memory_plan(tiny, 3072, ds, 2, 2, kv_expanded=True)
    assert p["live"] == tiny.params * 2 and p["embedding_partials"] == 0
    assert p["kv_copies"] == 4 * 3072 * tiny.heads * tiny.head_dim * 2 and tiny.kv_heads < tiny.heads
    assert p["embedding_reduce_copy"] == 4 * tiny.vocab * tiny.hidden  # larger than the one-layer bucket
    ds["zero_optimization"]["reduce_bucket_size"] = tiny.params
    assert plan.memory_plan(tiny, 3072, ds, 2, 2)["embedding_reduce_copy"] == 0
    fp32 = ds_json("zero3_fp32")
    assert plan.memory_plan(tiny, 3073, fp32, 2, 2)["embedding_partials"] == (3073 // 10 + 3073) * tiny.hidden * 4
    assert plan.memory_plan(tiny, 3073, fp32, 2, 2)["embedding_reduce_copy"] == 0  # fp32 gradient, divisible by 2
    assert plan.memory_plan(tiny, 3073, fp32, 3, 3)["embedding_reduce_copy"] == 4 * tiny.vocab * tiny.hidden  # padded


@pytest.mark.parametrize("kernel, expands", [("varlen_2_11", True), ("varlen_2_13", False), (None, True)])
def test_the_plan_knows_which_kernels_expand_kv_heads(monkeypatch, kernel, expands):
    """varlen_attn without enable_gqa (torch before 2.13) and the per-segment fallback (no varlen_attn) copy
    the KV heads up to the query heads; varlen_attn with enable_gqa does not (nor does flash-attn)."""
    import torch.nn.attention.varlen as varlen

    from model import attention

    def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        raise AssertionError("not called")

    def varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, enable_gqa=False):
        raise AssertionError("not called")

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # which would be picked first where installed
    if kernel is None:
        monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)
    else:
        monkeypatch.setattr(varlen, "varlen_attn", {"varlen_2_11": varlen_2_11, "varlen_2_13": varlen_2_13}[kernel])
    attention._varlen_kernel.cache_clear()
    try:
        assert attention.packed_kernel_expands_kv() is expands
    finally:
        monkeypatch.undo()
        attention._varlen_kernel.cache_clear()


def test_the_shipped_configs_reduce_gradients_in_fp32_and_the_plan_counts_it():
    """communication_data_type fp32 in every ds_configs/*.json: DeepSpeed reads it (its default would be
    the model's dtype, bf16), and the plan counts the reduce bucket and its reduce-scatter copy in fp32:
    twice the bytes of a bf16 reduction."""
    from deepspeed.runtime.config import get_communication_data_type

    for name in ("zero3_bf16", "zero3_offload", "zero3_fp32"):
        ds = ds_json(name)
        assert get_communication_data_type(ds) == torch.float32, name
        assert plan.comm_dtype_name(ds) == "fp32"
        assert plan.reduce_buffers(ds, LAYER_8B) == (4 * LAYER_8B, 4 * LAYER_8B)
    ds = ds_json("zero3_bf16")
    del ds["communication_data_type"]  # DeepSpeed's default: the model's dtype
    assert plan.comm_dtype_name(ds) == "bf16" and plan.reduce_buffers(ds, LAYER_8B) == (2 * LAYER_8B, 2 * LAYER_8B)
    ds["zero_optimization"]["contiguous_gradients"] = False  # no bucket; each gradient converted, then copied
    ds["communication_data_type"] = "fp32"
    assert plan.reduce_buffers(ds, LAYER_8B) == (0, 2 * 4 * LAYER_8B)
    config = llama_config("8b")
    ds = tb.build_ds_config(tb.TrainConfig(deepspeed=str(REPO / "ds_configs" / "zero3_bf16.json")), 8, config)
    p = plan.memory_plan(shape_8b(), 1000, ds, 8, 8)
    assert p["reduce_bucket"] + p["reduce_copy"] == 2 * 4 * LAYER_8B and p["reduce_dtype"] == "fp32"  # 1.7 GB


def test_fp32_model_and_settings_not_counted():
    buffers = plan.zero3_buffers(ds_json("zero3_fp32"))
    assert plan.bytes_per_param(buffers, "gpu") == 4 + 4 + 8 + 4  # the master weights are a second copy
    nvme = ds_json("zero3_offload")
    nvme["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": "/tmp"}
    params = ds_json("zero3_bf16")
    params["zero_optimization"]["offload_param"] = {"device": "cpu"}
    for ds in (nvme, params):
        assert plan.zero3_buffers(ds) is None
        p = plan.memory_plan(shape_8b(), 1000, ds, 8, 8)
        assert p["gpu_states"] == p["deepspeed_gpu"] and p["host_need"] == p["deepspeed_host"]
    unpinned = ds_json("zero3_offload", "fp32")
    unpinned["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
    m = plan.zero3_memory(P_8B, 8, 8, unpinned)
    assert m.host_node_pinned == m.host_node == 20 * P_8B


def test_pinned_blocks_are_powers_of_two(monkeypatch):
    assert plan.pinned_block(3_752_462_336) == 2**32
    assert plan.pinned_block(2**32) == 2**32 and plan.pinned_block(2**32 + 1) == 2**33
    monkeypatch.setenv("DS_PIN_MEMORY_BACKEND", "native")  # DeepSpeed's own page-locked allocator
    assert plan.pinned_block(3_752_462_336) == 3_752_462_336


def test_gb_means_1e9_bytes(monkeypatch):
    monkeypatch.setattr(plan.torch.cuda, "is_available", lambda: False)
    cfg = tb.parse_config(["--gpu-memory-gb", "80", "--host-memory-gb", "512"])
    assert plan.gpu_memory(cfg) == (80e9, "--gpu-memory-gb 80")  # an "80 GB" GPU: 80e9 bytes, 74.5 GiB
    assert plan.host_ram(cfg) == (512e9, None, "--host-memory-gb 512")
    assert plan.gb(80e9) == "80.0 GB" and plan.gb(2**30) == "1.1 GB"
    assert plan.gpu_memory(tb.parse_config([])) is None
    for field in ("gpu_memory_gb", "host_memory_gb"):
        assert "1e9 bytes" in {f.name: f.metadata["help"] for f in dataclasses.fields(tb.TrainConfig)}[field]
    with pytest.raises(ValueError, match="--host-memory-gb"):
        tb.parse_config(["--host-memory-gb", "0"])


def test_host_memory_reads_meminfo_and_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 500 kB\nHugePages_Total: 0\n")
    unlimited, limit = tmp_path / "memory.max", tmp_path / "limit"
    unlimited.write_text("max\n")
    limit.write_text("256000\n")
    assert plan.host_memory(meminfo, [unlimited]) == (1_024_000, 512_000, "this machine, /proc/meminfo")
    assert plan.host_memory(meminfo, [limit]) == (256_000, 256_000, f"the cgroup limit {limit}")
    assert plan.host_memory(meminfo, [tmp_path / "absent", unlimited])[0] == 1_024_000
    total, available, source = plan.host_memory(tmp_path / "absent", [])
    assert total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") and available is None
    real_total, real_available, _ = plan.host_memory()  # this machine
    assert 0 < real_available <= real_total


def test_ranks_per_node_from_the_launchers(monkeypatch):
    assert plan.ranks_per_node(8) == 8  # WORLD_SIZE=8 python train_biencoder.py --dry-run: one node
    monkeypatch.setenv("LOCAL_SIZE", "8")  # the deepspeed launcher
    assert plan.ranks_per_node(16) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun
    assert plan.ranks_per_node(16) == 4
    ds = ds_json("zero3_offload", "fp32")
    p = plan.memory_plan(shape_8b(), 1000, ds, 16, plan.ranks_per_node(16))
    assert p["nodes"] == 4 and p["states"].host_node == pytest.approx(20 * P_8B / 4)


def test_the_config_is_not_modified():
    ds = ds_json("zero3_offload", "fp32")
    before = copy.deepcopy(ds)
    plan.memory_plan(shape_8b(), 1000, ds, 8, 8)
    assert ds == before


# One rank of ZeRO-3 on the CPU accelerator: build the engine, take two optimizer steps, then sum the
# storage of every live tensor (each storage once). On the CPU, "gpu" and "host" buffers are all there.
LIVE_TENSORS = """
import gc, json, os, sys
import torch, deepspeed
from deepspeed.ops.adam import DeepSpeedCPUAdam
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(4)])
params = sum(p.numel() for p in model.parameters())
ds = json.loads(sys.argv[1])
offload = "offload_optimizer" in ds["zero_optimization"]
opt = (DeepSpeedCPUAdam if offload else torch.optim.AdamW)(model.parameters())
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
dtype = torch.bfloat16 if ds["bf16"]["enabled"] else torch.float32
for _ in range(2 * ds["gradient_accumulation_steps"]):
    engine.backward(engine(torch.randn(2, 1024, dtype=dtype)).float().square().mean())
    engine.step()
gc.collect()
storages = {}
for o in gc.get_objects():
    if isinstance(o, torch.Tensor) and o.device.type != "meta":
        storages[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
print(json.dumps({"params": params, "bytes": sum(storages.values())}))
"""


LIVE_CASES = [
    ("zero3_offload", "fp32", None),
    ("zero3_offload", "bf16", None),
    ("zero3_bf16", "fp32", None),  # the shipped fp32 reduction: a 4-byte bucket
    ("zero3_bf16", "fp32", "bf16"),  # DeepSpeed's default reduction, the model's dtype: a 2-byte bucket
    ("zero3_fp32", None, None),
]


@pytest.mark.slow
@pytest.mark.parametrize("config, accum, reduction", LIVE_CASES)
def test_the_count_is_what_deepspeed_allocates(config, accum, reduction):
    """After two optimizer steps, DeepSpeed's live tensors are the held buffers of `zero3_buffers`
    (the step's temporaries are gone) plus the reduce bucket, in communication_data_type."""
    ds = ds_json(config, accum)
    if reduction:
        ds["communication_data_type"] = reduction
    ds["zero_optimization"].update(
        reduce_bucket_size=2**20, stage3_prefetch_bucket_size=2**20, stage3_param_persistence_threshold=0
    )
    ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-c", LIVE_TENSORS, json.dumps(ds)], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    live = json.loads(res.stdout.strip().splitlines()[-1])
    buffers = plan.zero3_buffers(ds)
    held = plan.bytes_per_param(buffers, "gpu") + plan.bytes_per_param(buffers, "host")
    bucket = plan.reduce_buffers(ds, 2**20)[0] / live["params"]
    assert live["bytes"] / live["params"] == pytest.approx(held + bucket, abs=0.01)
