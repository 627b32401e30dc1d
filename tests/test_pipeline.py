"""The paper's pipeline in miniature, every hand-over checked (README, "The paper's pipeline").

mine (all-MiniLM-L6-v2 as the teacher, 160 SciFact training queries) -> prepare_data.py ->
stage 1 (recipes/stage1.json, 2 CPU ranks) -> export -> stage 2 (recipes/stage2_automodel.json) from the
stage-1 export -> export -> merge two stage-2 checkpoints (export_hf.py averages runs or checkpoints
alike). Sizes are cut on the command line; every other setting comes from the recipe files.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_mine import small_subset

import export_hf
import mine_negatives
import prepare_data
from common import run_cli
from tiny_models import REPO, deepspeed_launcher, free_port, minilm_dir

pytestmark = pytest.mark.slow(minutes=2)

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
SMALL = ["--deepspeed", str(REPO / "ds_configs" / "zero3_fp32.json"), "--global-batch-size", "16",
         "--no-gradient-checkpointing", "--save-every", "1000"]  # fmt: skip


def train(recipe: str, model: Path, data: Path, out: Path, *extra) -> dict:
    cmd = [deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "train_biencoder.py")]
    cmd += ["--config", str(REPO / "recipes" / recipe), "--model", str(model), "--data", str(data)]
    cmd += ["--output-dir", str(out), *SMALL, *[str(x) for x in extra]]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return json.loads((out / "config.json").read_text())


def export(out: Path, *sources: Path) -> dict:
    args = ["--dtype", "float32", "--no-verify", "--output-dir", str(out), "--checkpoint", *[str(s) for s in sources]]
    assert run_cli(export_hf.main, args) == 0
    return load_file(str(out / "model.safetensors"))


def test_mine_prepare_two_stages_and_merge(tmp_path):
    minilm = minilm_dir()
    subset = small_subset(tmp_path / "raw" / "SciFact", num_queries=160, num_docs=500, keep_neg=False)

    # 1. mine: the data has no negatives of its own
    mined = tmp_path / "mined"
    args = ["--data", subset, "--model", minilm, "--num-negatives", 4, "--max-length", 64, "--output-dir", mined]
    assert run_cli(mine_negatives.main, [str(a) for a in args]) == 0

    # 2. prepare: the mined folder is a subset like any other
    prepared = tmp_path / "prepared"
    args = ["--download-path", mined, "--subsets", "SciFact", "--tokenizer", minilm, "--output-dir", prepared]
    args += ["--query-max-len", 32, "--passage-max-len", 64, "--num-negatives", 4, "--num-proc", 1]
    assert run_cli(prepare_data.main, [str(a) for a in args]) == 0
    assert json.loads((prepared / "meta.json").read_text())["num_queries"] == 160

    # 3. stage 1 from the base model: the recipe's lr, 1 negative, 100 warm-up steps, unless overridden
    s1 = tmp_path / "stage1"
    cfg = train("stage1.json", minilm, prepared, s1, "--max-steps", 2, "--warmup-steps", 1)
    assert (cfg["lr"], cfg["num_negatives"], cfg["global_batch_size"]) == (1e-5, 1, 16)
    s1_weights = export(s1 / "export", s1)

    # 4. stage 2 from the stage-1 export (the recipe's 4 negatives, lr 2e-6), 3 steps, a checkpoint at each.
    # Step 1 of the recipe runs at lr 0, so its checkpoint must hold exactly the weights the run started from.
    s2 = tmp_path / "stage2"
    every_step = ["--max-steps", 3, "--save-every", 1, "--keep-checkpoints", 3]
    cfg = train("stage2_automodel.json", s1 / "export", prepared, s2, *every_step)
    assert (cfg["lr"], cfg["num_negatives"], cfg["model"]) == (2e-6, 4, str(s1 / "export"))
    a, b = s2 / "checkpoints" / "step_00000001", s2 / "checkpoints" / "step_00000003"
    wa, wb = export(tmp_path / "export_a", a), export(tmp_path / "export_b", b)
    assert wa.keys() == s1_weights.keys()
    assert all((wa[n] == s1_weights[n]).all() for n in wa), "stage 2 did not start from the stage-1 export"
    assert any(not (wb[n] == s1_weights[n]).all() for n in wb), "stage 2 did not train"

    # 5. merge two stage-2 checkpoints (as the paper merges runs): their parameter-wise average
    merged = export(tmp_path / "merged", a, b)
    for n, w in merged.items():
        assert (w - (wa[n] + wb[n]) / 2).abs().max() <= 1e-6, n
