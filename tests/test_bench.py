"""The training benchmark's CPU command end to end (tiny shape), its FLOP counts, and the packed/padded check.

Timings on the CPU mean nothing; these tests check that the commands run, that every variant
reports its fields, and the facts that do not depend on the hardware: the packed step computes no
padding, the reference port does, and the two compute the same loss.
"""

import json
import os
import subprocess
import sys

import pytest

from tiny_models import REPO, llama_tokenizer_dir

sys.path.insert(0, str(REPO / "bench"))
import bench_setup  # noqa: E402

pytestmark = pytest.mark.slow

FIELDS = (
    "real_tokens_per_s_per_gpu", "pad_share", "model_tflops_per_gpu", "mfu", "peak_mem_gib", "step_time_s",
    "real_tokens_per_step", "computed_tokens_per_step", "steps_timed",
)  # fmt: skip


def run(args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def test_flops_and_parameter_counts_match_the_recipe():
    c8 = bench_setup.llama_config("8b")
    assert bench_setup.total_params(c8) == 7_504_924_672  # Llama-3.1-8B as a LlamaModel (the model card)
    N = bench_setup.matmul_params(c8)
    assert 6.9e9 < N < 7.0e9  # "N ~ 7.0B matmul parameters"
    # one sequence of 100 tokens: 8N per token + attention 4 * (4 * 100^2 * 4096) per layer
    expected = 8 * N * 100 + 32 * 4 * 4 * 100**2 * 4096
    assert bench_setup.train_flops(c8, [100]) == pytest.approx(expected)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Shared by the tests: SciFact is tokenized once, into WORKDIR/prepared_scifact."""
    return tmp_path_factory.mktemp("bench")


def test_cpu_command_end_to_end(workdir, tmp_path):
    """The README's CPU command: tiny shape, 2 timed steps, ours + reference + st (attempted)."""
    out = tmp_path / "results.json"
    res = run(
        ["bench/bench_train.py", "--workdir", str(workdir), "--steps", "2", "--warmup-steps", "1"]
        + ["--global-batch-size", "8", "--variants", "ours,reference,st", "--output-json", str(out)]
        + ["--tokenizer", str(llama_tokenizer_dir())]
    )
    assert "CPU: not meaningful" in res.stdout
    report = json.loads(out.read_text())
    assert report["label"] == "CPU: not meaningful" and report["shape"] == "tiny" and report["gpus"] == 1
    assert report["command"].startswith("python bench/bench_train.py")
    variants = report["variants"]
    assert set(variants) == {"ours", "reference", "st"}
    for name in ("ours", "reference"):
        row = variants[name]
        assert row["status"] == "ok" and row["label"] == "CPU: not meaningful"
        assert all(key in row for key in FIELDS), sorted(set(FIELDS) - set(row))
        assert row["steps_timed"] == 2 and row["real_tokens_per_s_per_gpu"] > 0
    assert variants["ours"]["pad_share"] == 0
    assert variants["reference"]["pad_share"] > 0
    # the same queries in both: the same real tokens; the reference runs 1 query per micro-batch
    assert variants["ours"]["real_tokens_per_step"] == variants["reference"]["real_tokens_per_step"]
    assert variants["reference"]["micro_batches_per_step"] == 8
    assert variants["ours"]["memory_slope"]["points"]
    st = variants["st"]  # a failure of this baseline fails the run: no "skipped" row to overlook
    assert st["status"] == "ok" and all(key in st for key in FIELDS) and st["pad_share"] > 0
    assert st["zero_stage"] == 3 and st["gradient_checkpointing"]
    # the same math: ours and the reference port log the same loss per step (bf16 rounding apart)
    losses = {
        name: [float(line.split("loss ")[1]) for line in res.stdout.splitlines() if f"  {name} step" in line]
        for name in ("ours", "reference")
    }
    assert len(losses["ours"]) == 3
    assert losses["ours"] == pytest.approx(losses["reference"], rel=2e-3)
    assert report["memory_plan_8b"]["params"] == 7_504_924_672


def test_random_init_path_of_the_large_shapes(workdir, tmp_path):
    """--build-from-config: weights built under deepspeed.zero.Init from config.json, as for 1b / 8b."""
    out = tmp_path / "results.json"
    run(
        ["bench/bench_train.py", "--workdir", str(workdir), "--steps", "1", "--warmup-steps", "1"]
        + ["--global-batch-size", "4", "--variants", "ours,st", "--build-from-config", "--output-json", str(out)]
        + ["--tokenizer", str(llama_tokenizer_dir())]
    )
    variants = json.loads(out.read_text())["variants"]
    assert variants["ours"]["status"] == "ok" and variants["ours"]["pad_share"] == 0
    assert variants["st"]["status"] == "ok"
    assert (workdir / "model_tiny_config_only" / "config.json").is_file()
    assert not any((workdir / "model_tiny_config_only").glob("*.safetensors"))


def test_packed_and_padded_forwards_agree(workdir, tmp_path):
    """bench/bench_packed_vs_padded.py, the GPU check of run_gpu.sh, on the CPU: tiny shape, fp32."""
    llama_tokenizer_dir()  # skips without the tokenizer package
    out = tmp_path / "packed_vs_padded.json"
    run(["bench/bench_packed_vs_padded.py", "--workdir", str(workdir), "--output-json", str(out), "--queries", "2"])
    result = json.loads(out.read_text())
    assert result["ok"] and result["embeddings"]["packed_vs_padded"]["min_cosine"] > 0.99999
    assert result["paths"]["packed"]["pad_share"] == 0 < result["paths"]["padded"]["pad_share"]


def test_gpu_check_script_runs_its_checks_on_the_cpu():
    """bench/gpu_check.py, the first checks of run_gpu.sh: on the CPU the kernel check is skipped and the
    bidirectionality check runs on the fp32 per-segment path."""
    llama_tokenizer_dir()  # skips without the tokenizer package (bench_setup needs it)
    res = run(["bench/gpu_check.py"])
    lines = [line for line in res.stdout.splitlines() if line.startswith("CHECK ")]
    assert lines[0].startswith("CHECK kernel SKIP")
    assert lines[1].startswith("CHECK bidirectional PASS first token moved")
    assert lines[2].startswith("CHECK causal_teacher PASS min cosine packed vs alone")


def test_mine_benchmark_compares_equal_embeddings_and_negatives(tmp_path):
    """bench/bench_mine.py at a small size: every text list is embedded by both sides with the same
    result, and the blocked search finds the full matrix's negatives."""
    from tiny_models import minilm_dir

    minilm_dir()  # skips without the packaged all-MiniLM-L6-v2
    out = tmp_path / "mine.json"
    args = ["--num-docs", "48", "--max-length", "64", "128", "--batch-size", "16", "--repeats", "1"]
    args += ["--num-queries", "300", "--search-docs", "5000", "--query-block", "128", "--doc-block", "1024"]
    run(["bench/bench_mine.py", *args, "--output-json", str(out)])
    result = json.loads(out.read_text())
    cases = [(e["texts_kind"], e["texts"], e["max_length"]) for e in result["embedding"]]
    assert cases == [("queries", 809, 64), ("documents", 48, 64), ("documents", 48, 128)]
    for e in result["embedding"]:
        assert e["min_cosine_between_the_two"] > 0.9999 and e["speedup"] > 0
        assert set(e["texts_per_s"]) == {"sentence-transformers", "mine_negatives"}
        assert e["sentence_transformers_attention"] == "sdpa"  # the CPU: padded batches
    assert result["embedding"][1]["texts_at_max_length"] > result["embedding"][2]["texts_at_max_length"]
    search = result["search"]
    assert (search["queries"], search["docs"]) == (300, 5000)
    assert search["queries_with_same_negatives"] >= 0.99
