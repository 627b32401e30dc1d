"""The training benchmark's CPU command end to end (tiny shape), its FLOP counts, the packed/padded check,
and the verdicts of bench/run_gpu.sh (a crash or a stop is a FAIL, a failing variant does not stop the others).

Timings on the CPU mean nothing; these tests check that the commands run, that every variant
reports its fields, and the facts that do not depend on the hardware: the packed step computes no
padding, the reference port does, and the two compute the same loss.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tiny_models import REPO, llama_tokenizer_dir

sys.path.insert(0, str(REPO / "bench"))
import bench_setup  # noqa: E402

FIELDS = (
    "real_tokens_per_s_per_gpu", "pad_share", "model_tflops_per_gpu", "mfu", "peak_mem_gib", "step_time_s",
    "real_tokens_per_step", "computed_tokens_per_step", "steps_timed",
)  # fmt: skip


def run(args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


@pytest.mark.slow
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


@pytest.mark.slow(minutes=1)
def test_cpu_command_end_to_end(workdir, tmp_path):
    """The README's CPU command: tiny shape, 2 timed steps, ours + reference + st, with --build-from-config:
    the weights built under deepspeed.zero.Init from config.json, as for 1b / 8b. (The tiny shape's own
    path, weights saved and loaded, runs in test_run_gpu_bench_reports_a_failing_variant_and_runs_the_others.)"""
    out = tmp_path / "results.json"
    res = run(
        ["bench/bench_train.py", "--workdir", str(workdir), "--steps", "2", "--warmup-steps", "1"]
        + ["--global-batch-size", "8", "--variants", "ours,reference,st", "--output-json", str(out)]
        + ["--tokenizer", str(llama_tokenizer_dir()), "--build-from-config"]
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
    assert (workdir / "model_tiny_config_only" / "config.json").is_file()  # --build-from-config: no weights saved
    assert not any((workdir / "model_tiny_config_only").glob("*.safetensors"))


@pytest.mark.slow
def test_packed_and_padded_forwards_agree(workdir, tmp_path):
    """bench/bench_packed_vs_padded.py, the GPU check of run_gpu.sh, on the CPU: tiny shape, fp32."""
    llama_tokenizer_dir()  # skips without the tokenizer package
    out = tmp_path / "packed_vs_padded.json"
    run(["bench/bench_packed_vs_padded.py", "--workdir", str(workdir), "--output-json", str(out), "--queries", "2"])
    result = json.loads(out.read_text())
    assert result["ok"] and result["embeddings"]["packed_vs_padded"]["min_cosine"] > 0.99999
    assert result["paths"]["packed"]["pad_share"] == 0 < result["paths"]["padded"]["pad_share"]


@pytest.mark.slow
def test_gpu_check_script_runs_its_checks_on_the_cpu():
    """bench/gpu_check.py, the first checks of run_gpu.sh: on the CPU the kernel check is skipped and the
    bidirectionality check runs on the fp32 per-segment path."""
    llama_tokenizer_dir()  # skips without the tokenizer package (bench_setup needs it)
    res = run(["bench/gpu_check.py"])
    lines = [line for line in res.stdout.splitlines() if line.startswith("CHECK ")]
    assert lines[0].startswith("CHECK kernel SKIP")
    assert lines[1].startswith("CHECK bidirectional PASS first token moved")
    assert lines[2].startswith("CHECK causal_teacher PASS min cosine packed vs alone")


@pytest.mark.slow(minutes=0.6)
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
    assert search["queries_with_same_negatives"] >= 0.99 and search["fp32_and_bf16_identical"]


@pytest.mark.slow(minutes=1)
def test_mine_scale_benchmark_small(tmp_path):
    """bench/bench_mine.py --scale at a tiny size: the miner's CLI on 2 ranks under the launcher reports
    every stage, each rank's peak RSS and the memory model's; the 2-node simulation (two launches, two
    working directories, a shared absolute cache) gives the 1-rank output, and so does the 2-rank run."""
    llama_tokenizer_dir()  # skips without the tokenizer package
    out = tmp_path / "scale.json"
    args = ["--scale", "--passages", "2000", "--queries", "200", "--equality-passages", "2000"]
    args += ["--equality-queries", "200", "--chunk-size", "512", "--query-block", "64", "--doc-block", "512"]
    res = run(["bench/bench_mine.py", *args, "--workdir", str(tmp_path / "work"), "--output-json", str(out)])
    r = json.loads(out.read_text())
    run_ = r["run"]
    assert set(run_["seconds"]) >= {"read", "embed", "search", "write"}
    assert run_["search"]["precision"] == "fp32"  # the CPU
    assert len(run_["peak_rss_bytes"]) == len(r["memory_model"]["expected_peak_rss_bytes"]) == 2
    for measured, expected in zip(run_["peak_rss_bytes"], r["memory_model"]["expected_peak_rss_bytes"], strict=True):
        assert 0.5 < measured / expected < 2
    assert run_["disk_bytes"]["cache"] > 2200 * 32 * 4 and run_["disk_bytes"]["output"] > 0
    e = r["two_nodes_vs_one_rank"]
    assert e["equal"] and e["queries_with_identical_negatives"] == e["queries"] == 200
    assert e["two_node_world_size"] == 2 and e["scale_run_equal_to_1_rank"]
    p = r["projection_8xh100"]
    assert p["search_flops"] == 2 * 2 * 11_800_000 * 1_000_000 * 4096
    assert p["search_minutes_fp32"] > p["search_minutes_bf16"] > 0 and p["embedding_hours_bf16"] > 0
    assert p["rescoring_minutes"] > 0 and run_["search"]["pairs_rescored_per_query"] > 0
    assert "| search |" in res.stdout and "EQUAL" in res.stdout


# ----------------------------------------------------------------------------------------------
# bench/run_gpu.sh: its summary tells the truth. The scripts it runs are replaced by stand-ins on
# PATH (a `python3` and a `deepspeed` in front of the real ones), so these tests take seconds.

RUN_GPU_CHECKS = (
    "kernel", "bidirectional", "causal_teacher", "packed_vs_padded", "resume", "mine", "train", "rope", "export",
    "evaluate",
)  # fmt: skip

GPU_CHECK_STANDINS = {
    "all_pass": 'echo "CHECK kernel PASS stand-in"; echo "CHECK bidirectional PASS stand-in"\n'
    'echo "CHECK causal_teacher PASS stand-in"; exit 0',
    # a crash after its first line: a traceback, exit 1, two checks never reported
    "crash_after_first": 'echo "CHECK kernel PASS stand-in"\n'
    'echo "Traceback (most recent call last):" >&2\n'
    'echo "torch.AcceleratorError: CUDA error: an illegal memory access was encountered" >&2; exit 1',
    # every line printed, then a crash (at teardown): no check to blame, still a failure
    "crash_after_all": 'echo "CHECK kernel PASS stand-in"; echo "CHECK bidirectional PASS stand-in"\n'
    'echo "CHECK causal_teacher PASS stand-in"; echo "Segmentation fault" >&2; exit 139',
}


def write_standins(bin_dir, gpu_check: str):
    """`python3` and `deepspeed` for run_gpu.sh check: each script it runs succeeds quickly with what
    run_gpu.sh looks for (bench/gpu_check.py does what `gpu_check` says); the rest goes to this Python."""
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.write_text(f"""#!/usr/bin/env bash
case "$1" in
    bench/gpu_check.py)
        {gpu_check} ;;
    -c)
        case "$2" in
            *torch.cuda*) exit 1 ;;  # no GPU
            *"import deepspeed"*) exit 0 ;;  # nothing to install
            *tokenizer_dir*) echo /nonexistent/tokenizer; exit 0 ;;
        esac ;;
    -)
        [ $# = 1 ] && {{ cat > /dev/null; echo "# python stand-in"; exit 0; }} ;;  # the versions
    prepare_data.py)
        while [ $# -gt 0 ]; do [ "$1" = --output-dir ] && mkdir -p "$2" && echo {{}} > "$2/meta.json"; shift; done
        exit 0 ;;
    bench/bench_packed_vs_padded.py | bench/bench_setup.py) exit 0 ;;
    export_hf.py) echo "tensor check: stand-in"; exit 0 ;;
    evaluate.py)
        while [ $# -gt 0 ]; do [ "$1" = --output-json ] && echo '{{"metrics": {{"NDCG@10": 0.5}}}}' > "$2"; shift; done
        exit 0 ;;
    mine_negatives.py)  # the same output whatever the precision
        while [ $# -gt 0 ]; do [ "$1" = --output-dir ] && out=$2; shift; done
        exec {sys.executable} -c "import json, os, sys, pyarrow as pa, pyarrow.parquet as pq
d = sys.argv[1] + '/scifact'; os.makedirs(d)
pq.write_table(pa.table({{'neg_doc': [[1, 2]]}}), d + '/queries.parquet')
json.dump({{'pairs_rescored': 0}}, open(d + '/mining_stats.json', 'w'))" "$out" ;;
esac
exec {sys.executable} "$@"
""")
    # train_biencoder.py: --max-steps steps (an evaluation row with --eval-beir) and the step-2 checkpoint;
    # bench/resume_control.py: the losses after step 2 are off, as a broken restore's would be
    deepspeed = bin_dir / "deepspeed"
    deepspeed.write_text("""#!/usr/bin/env bash
loss=1.5 evaluated=0
while [ $# -gt 0 ]; do
    case $1 in
        --output-dir) out=$2 ;;
        --max-steps) steps=$2 ;;
        --eval-beir) evaluated=1 ;;
        bench/resume_control.py) loss=2.5 ;;
    esac
    shift
done
mkdir -p "$out/checkpoints/step_00000002"
for step in $(seq "$steps"); do
    [ "$step" -le 2 ] && l=1.5 || l=$loss
    echo "{\\"step\\": $step, \\"loss\\": $l, \\"grad_norm\\": 1, \\"tokens_per_s\\": 9, \\"peak_mem_gb\\": 1}"
done > "$out/metrics.jsonl"
[ "$evaluated" = 1 ] && echo "{\\"step\\": $steps, \\"eval/scifact-beir/ndcg@10\\": 0.5}" >> "$out/metrics.jsonl"
echo "rotary buffers: 2 checked, fp32 and equal to the values computed from the config"
""")
    python.chmod(0o755)
    deepspeed.chmod(0o755)


def run_gpu_sh(tmp_path, mode: str, env: dict | None = None, timeout=120) -> tuple[subprocess.CompletedProcess, str]:
    """bash bench/run_gpu.sh MODE with OUT and WORK in tmp_path: (the process, $OUT/results.txt)."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), WORK=str(tmp_path / "work"), SHAPE="tiny", **(env or {}))
    res = subprocess.run(
        ["bash", "bench/run_gpu.sh", mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    results = (out / "results.txt").read_text() if (out / "results.txt").exists() else ""
    return res, results


def check_lines(results: str) -> dict[str, str]:
    """{name: "STATUS detail"} of the CHECK lines; a name twice is a failure."""
    lines = [line.split(" ", 2) for line in results.splitlines() if line.startswith("CHECK ")]
    names = [name for _, name, _ in lines]
    assert len(names) == len(set(names)), names
    return {name: rest for _, name, rest in lines}


@pytest.mark.parametrize("gpu_check", sorted(GPU_CHECK_STANDINS))
def test_run_gpu_check_summary_counts_a_crash_as_failure(tmp_path, gpu_check):
    """A crash of bench/gpu_check.py after some PASS lines: the checks it never reported are FAIL
    (`did not run`), the crash itself is a FAIL when every line came, and the exit status is not 0;
    with every stand-in passing, the same run is all PASS and exits 0."""
    write_standins(tmp_path / "bin", GPU_CHECK_STANDINS[gpu_check])
    res, results = run_gpu_sh(tmp_path, "check", {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    log = res.stdout + res.stderr
    checks = check_lines(results)
    assert set(RUN_GPU_CHECKS) <= set(checks), log  # every check has its line in $OUT/results.txt
    assert results.rstrip().splitlines()[-1].startswith("SUMMARY check:"), results
    for name in RUN_GPU_CHECKS[3:]:
        assert checks[name].startswith("PASS"), (name, checks[name], log)
    assert checks["kernel"].startswith("PASS")
    if gpu_check == "all_pass":
        assert res.returncode == 0, log
        assert set(checks) == set(RUN_GPU_CHECKS) and all(v.startswith("PASS") for v in checks.values())
        assert "SUMMARY check: 10 PASS; exit 0" in results
    elif gpu_check == "crash_after_first":
        assert res.returncode == 1, log
        for name in ("bidirectional", "causal_teacher"):
            assert checks[name] == "FAIL did not run: bench/gpu_check.py exited 1 first (see run.log)"
        assert "gpu_check" not in checks  # the missing checks already carry the failure
        assert "illegal memory access" in (tmp_path / "out" / "run.log").read_text()  # the traceback is kept
        assert "SUMMARY check: 2 FAIL, 8 PASS; exit 1" in results
    else:
        assert res.returncode == 1, log
        assert checks["gpu_check"].startswith("FAIL bench/gpu_check.py exited 139 after reporting its checks")
    assert "== summary of run_gpu.sh check" in res.stdout


def test_run_gpu_that_never_started_fails_every_check(tmp_path):
    """No wheels to install the missing packages from: every check of the mode is `FAIL did not run`,
    with the reason, and the exit status is not 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"  # this Python, but deepspeed & co. cannot be imported
    python.write_text(
        f'#!/usr/bin/env bash\n[[ "$2" == *"import deepspeed"* ]] && exit 1\nexec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "WHEELS": str(tmp_path / "no_wheels"),
           "PYDEPS": str(tmp_path / "pydeps")}  # fmt: skip
    res, results = run_gpu_sh(tmp_path, "bench", env)
    assert res.returncode == 1, res.stdout + res.stderr
    checks = check_lines(results)
    assert set(checks) == {"throughput_ours", "throughput_reference", "throughput_st", "throughput"}
    assert all(v.startswith("FAIL did not run (cannot install") for v in checks.values()), checks


def test_run_gpu_stopped_by_the_time_limit_keeps_what_it_had(tmp_path):
    """SIGTERM to the command's process group (a time limit) during the training: the lines already
    known stay in $OUT/results.txt, the checks left are `FAIL did not run (stopped by a signal)`."""
    write_standins(tmp_path / "bin", GPU_CHECK_STANDINS["all_pass"])
    (tmp_path / "bin" / "deepspeed").write_text("#!/usr/bin/env bash\nsleep 60\n")  # a training that hangs
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), WORK=str(tmp_path / "work"), SHAPE="tiny")
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    proc = subprocess.Popen(
        ["bash", "bench/run_gpu.sh", "check"], cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        results = out / "results.txt"
        while "CHECK packed_vs_padded" not in (results.read_text() if results.exists() else ""):
            assert time.monotonic() < deadline and proc.poll() is None, "the run never reached the training"
            time.sleep(0.2)
        time.sleep(1)  # into the training
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143
    checks = check_lines((out / "results.txt").read_text())
    assert all(checks[name].startswith("PASS") for name in RUN_GPU_CHECKS[:4]), checks
    for name in RUN_GPU_CHECKS[4:]:
        assert checks[name] == "FAIL did not run (stopped by a signal)", checks
    assert "SUMMARY check: 6 FAIL, 4 PASS; exit 143" in (out / "results.txt").read_text()


def test_run_gpu_usage(tmp_path):
    res = subprocess.run(["bash", "bench/run_gpu.sh"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "usage: bash bench/run_gpu.sh check|bench" in res.stdout


@pytest.mark.slow(minutes=1.3)
def test_run_gpu_bench_reports_a_failing_variant_and_runs_the_others(tmp_path):
    """run_gpu.sh bench on the CPU (tiny shape) with sentence-transformers broken (a package of that
    name that fails on import, first on PYTHONPATH): st is a FAIL with its error, ours still runs and is
    written, the merged table has both, and the exit status is 1."""
    llama_tokenizer_dir()  # skips without the tokenizer package
    broken = tmp_path / "broken" / "sentence_transformers"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("stand-in: this sentence-transformers fails here")\n')
    pythonpath = os.pathsep.join(filter(None, [str(broken.parent), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": pythonpath, "BENCH_VARIANTS": "st ours", "BENCH_STEPS": "1",
           "BENCH_ARGS": "--global-batch-size 8 --warmup-steps 0", "DS_ACCELERATOR": "cpu"}  # fmt: skip
    res, results = run_gpu_sh(tmp_path, "bench", env, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 1, log[-5000:]
    checks = check_lines(results)
    assert checks["throughput_st"].startswith("FAIL exit 1: ImportError: stand-in: this sentence-transformers"), checks
    assert checks["throughput_ours"].startswith("PASS") and "real tok/s/GPU" in checks["throughput_ours"]
    assert checks["throughput"].startswith("PASS")
    out = tmp_path / "out"
    assert json.loads((out / "bench_train_ours.json").read_text())["variants"]["ours"]["status"] == "ok"
    assert not (out / "bench_train_st.json").exists()
    merged = json.loads((out / "bench_train.json").read_text())
    assert list(merged["variants"]) == ["st", "ours"]
    assert merged["variants"]["st"]["status"].startswith("FAIL")
    assert merged["variants"]["ours"]["status"] == "ok" and merged["memory_plan_8b"]
    assert "SUMMARY bench: 1 FAIL, 2 PASS; exit 1" in results
