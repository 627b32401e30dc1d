"""export_hf.py: real ZeRO-3 checkpoints (deepspeed --num_gpus 2 on the CPU) -> Hugging Face folders.

What the eye cannot check: the tensors equal DeepSpeed's own zero_to_fp32 result; transformers
(remote code), sentence-transformers and BiEncoder reproduce the training-time embeddings; the
loaded model is bidirectional; merging is the average by hand; bad input fails cleanly.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import export_hf
import hf_files
from common import USER_ERROR_STATUS, run_cli
from tiny_models import REPO, deepspeed_launcher, free_port, minilm_dir, save_tiny_llama

QUERY_INSTRUCTION = "Instruct: Given a question, retrieve passages that answer the question\nQuery:"


# ----------------------------------------------------------------------------------------------
# Fast unit tests (no DeepSpeed)


def test_parse_size():
    assert export_hf.parse_size("5GB") == 5 * 10**9
    assert export_hf.parse_size("2GiB") == 2 * 2**30
    assert export_hf.parse_size("1.5MB") == 1_500_000
    assert export_hf.parse_size("123") == 123
    for bad in ("", "-1GB", "5XB", "GB"):
        with pytest.raises(ValueError, match="max-shard-size"):
            export_hf.parse_size(bad)


def test_plan_shards_bounds_bytes_and_keeps_order():
    specs = [(f"t{i}", torch.Size([n]), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5])]
    shards = export_hf.plan_shards(specs, max_bytes=80)
    assert [[s[0] for s in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_prompts_are_the_training_datas_strings():
    one = {"SciFact": {"query": "Q: ", "passage": "P: "}}
    assert hf_files.sentence_transformers_prompts(one) == {
        "query": "Q: ",
        "document": "P: ",
        "SciFact-query": "Q: ",
        "SciFact-document": "P: ",
    }
    # Subsets with different prompts: no default, each subset's own by name; a JSONL file whose lines
    # carry their own prompts (query None) has no query prompt at all
    mixed = {**one, "NQ": {"query": "N: ", "passage": ""}, "mine": {"query": None, "passage": ""}}
    got = hf_files.sentence_transformers_prompts(mixed)
    assert "query" not in got and "document" not in got and "mine-query" not in got
    assert got["NQ-query"] == "N: " and got["SciFact-document"] == "P: " and got["mine-document"] == ""


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, capsys):
    base = save_tiny_llama(tmp_path / "tiny", vocab_size=128256)  # Llama-3.1's rows; the tokenizer has 128,257
    assert run_export("--checkpoint", base, "--output-dir", tmp_path / "out") == USER_ERROR_STATUS
    err = capsys.readouterr().err
    assert "128257 tokens" in err and "128256 embedding rows" in err and "resize_token_embeddings" in err
    assert not (tmp_path / "out").exists()


class FakeSource:
    """Tensors in memory, read through the same interface as a checkpoint."""

    def __init__(self, tensors):
        self.tensors, self.label = tensors, "memory"
        self.shapes = {k: v.shape for k, v in tensors.items()}

    def read(self, name, start, end):
        x = self.tensors[name].reshape(-1)[start:end]
        return x.float() if x.is_floating_point() else x.clone()

    def release(self):
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_safetensors_file_reads_back(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(export_hf, "CHUNK_ELEMS", 7)  # many chunks, rows split across them
    tensors = {"a": torch.randn(13, 5), "b": torch.randn(3), "c": torch.arange(6).reshape(2, 3)}
    avg = export_hf.Average.__new__(export_hf.Average)
    avg.sources, avg.weights, avg.names = [FakeSource(tensors)], [1.0], [{k: k for k in tensors}]
    specs = [(k, v.shape, dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()]

    class Progress:
        def update(self, n):
            pass

    export_hf.write_safetensors(tmp_path / "x.safetensors", specs, avg, Progress())
    back = load_file(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        torch.testing.assert_close(back[k], v.to(dtype) if v.is_floating_point() else v, atol=0, rtol=0)


def test_average_weights_and_integer_buffers():
    a = {"w": torch.randn(4, 3), "i": torch.arange(3)}
    b = {"w": torch.randn(4, 3), "i": torch.arange(3)}
    avg = export_hf.Average.__new__(export_hf.Average)
    avg.sources, avg.weights, avg.names = [FakeSource(a), FakeSource(b)], [0.5, 0.5], [{"w": "w", "i": "i"}] * 2
    torch.testing.assert_close(avg.read("w", 0, 12), ((a["w"] + b["w"]) / 2).reshape(-1), atol=0, rtol=0)
    assert torch.equal(avg.read("i", 0, 3), torch.arange(3))
    b["i"] = torch.arange(3) + 1
    with pytest.raises(ValueError, match="buffer i differs"):
        avg.read("i", 0, 3)


class NotATensor:
    pass


def test_pickles_with_foreign_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(2), "payload": NotATensor()}, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        export_hf.load_pickle(path)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        export_hf.load_pickle(tmp_path / "cut.pt")


# ----------------------------------------------------------------------------------------------
# Real checkpoints: one DeepSpeed launch writing three runs, shared by the module

# The checks of real checkpoints: about 2.5 minutes for their 30 tests, most of it the launch they share
slow = pytest.mark.slow(minutes=0.1)


def deepspeed_runs(root: Path, runs: dict[str, tuple[Path, list]]) -> dict[str, tuple[Path, dict]]:
    """tests/ds_tiny_checkpoint.py under `deepspeed --num_gpus 2` (ZeRO-3, CPU), one launch writing every
    run's checkpoints: {name: (model, its arguments)} -> {name: (root / name, its probe embeddings)}."""
    cmd = [deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [str(REPO / "tests" / "ds_tiny_checkpoint.py")]
    for i, (name, (base, extra)) in enumerate(runs.items()):
        out = root / name
        cmd += ["--then"] * (i > 0) + ["--model", str(base), "--output-dir", str(out)]
        cmd += ["--probe-out", str(out / "probe.pt"), *[str(a) for a in extra]]
    env = dict(os.environ, DS_ACCELERATOR="cpu", TQDM_DISABLE="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {name: (root / name, torch.load(root / name / "probe.pt")) for name in runs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base = save_tiny_llama(root / "tiny_llama")
    runs = {
        # fp32 training; checkpoints at steps 2 and 3
        "a": (base, ["--steps", "3", "--save-every", "2", "--seed", "0"]),
        # bf16 training (bf16 params, fp32 master weights), another seed: the second run to merge
        "b": (base, ["--steps", "2", "--bf16", "--seed", "1"]),
        # a BERT-family encoder
        "bert": (minilm_dir(), ["--steps", "2", "--lr", "1e-3"]),
    }
    return deepspeed_runs(root, runs)  # one launch, three engines one after the other


def run_export(*args: str) -> int:
    """export_hf.py's exit status: 0, or USER_ERROR_STATUS with "export_hf.py: error: ..." on stderr."""
    return run_cli(export_hf.main, [str(a) for a in args])


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    a, b, bert = runs["a"][0], runs["b"][0], runs["bert"][0]
    # Small shards, so that the fp32 export is sharded with an index as an 8B export is.
    assert run_export("--run", a, "--output-dir", out / "a32", "--dtype", "float32", "--max-shard-size", "10MB") == 0
    assert run_export("--run", b, "--output-dir", out / "b16") == 0
    assert run_export("--run", bert, "--output-dir", out / "bert32", "--dtype", "float32") == 0
    return {"a32": out / "a32", "b16": out / "b16", "bert32": out / "bert32"}


def zero_to_fp32(run: Path, tag=None) -> dict:
    """DeepSpeed's own consolidation, names mapped as the export maps them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)
    return {k.removeprefix("encoder."): v for k, v in state.items()}


def export_tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def mean_pool(hidden, mask):
    mask = mask.unsqueeze(-1).float()
    return F.normalize((hidden.float() * mask).sum(1) / mask.sum(1), dim=-1)


# ----------------------------------------------------------------------------------------------
# Tensors


@slow
@pytest.mark.parametrize("run,export,dtype", [("a", "a32", torch.float32), ("b", "b16", torch.bfloat16)])
def test_tensors_equal_deepspeed_zero_to_fp32(runs, exports, run, export, dtype):
    ref = zero_to_fp32(runs[run][0])
    got = export_tensors(exports[export])
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert got[name].dtype == dtype, name
        assert torch.equal(got[name], t.to(dtype)), name


@slow
def test_bert_tensors_equal_deepspeed_zero_to_fp32(runs, exports):
    ref = zero_to_fp32(runs["bert"][0])
    got = export_tensors(exports["bert32"])
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert torch.equal(got[name], t), name
    # The names BertModel.save_pretrained writes (the packaged MiniLM's), less its unused [CLS] pooler
    original = load_file(minilm_dir() / "model.safetensors")
    assert set(got) == {k for k in original if not k.startswith("pooler.") and k != "embeddings.position_ids"}


# ----------------------------------------------------------------------------------------------
# Format


@slow
def test_llama_export_has_the_reference_format(runs, exports):
    path = exports["a32"]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaBidirectionalModel"]
    assert config["model_type"] == "llama_bidirec"
    assert config["pooling"] == "avg"
    assert config["is_causal"] is False
    assert config["auto_map"] == hf_files.AUTO_MAP
    base = json.loads((runs["a"][0].parent / "tiny_llama" / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert config[key] == base[key], key
    assert config["rope_theta"] == 500000.0  # also for transformers 4.x readers
    assert (path / "llama_bidirectional_model.py").read_text() == hf_files.REMOTE_CODE.read_text()

    tok = json.loads((path / "tokenizer_config.json").read_text())
    assert tok["padding_side"] == "left" and tok["pad_token"] == tok["eos_token"] == "<|end_of_text|>"

    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {"embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "norm.weight"} <= set(index["weight_map"])

    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    st = json.loads((path / "config_sentence_transformers.json").read_text())
    q = QUERY_INSTRUCTION + " "
    assert st["prompts"] == {"query": q, "document": "", "tiny-query": q, "tiny-document": ""}
    assert json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"] == 512  # the data's
    assert tok["clean_up_tokenization_spaces"] is False  # BPE: transformers would warn at every load

    card = (path / "README.md").read_text()
    state = json.loads((runs["a"][0] / "checkpoints" / "step_00000003" / "train_state.json").read_text())
    for text in (state["config"]["model"], state["command"], "step 3/3", f"{state['final_loss']:.4f}"):
        assert text in card
    for text in ("trust_remote_code=True", "SentenceTransformer", "vllm", "encode_query", "--pooling mean"):
        assert text in card
    assert "base_model:" not in card  # a local path is no hub name (GGUF metadata would make it a URL)


# ----------------------------------------------------------------------------------------------
# Embeddings of every consumer = the training-time model's


def probe_batch(probe, tokenizer):
    texts = [probe["query_prompt"] + q for q in probe["queries"]] + probe["documents"]
    return tokenizer(texts, padding=True, return_tensors="pt")


@slow
@pytest.mark.parametrize("export,run,tol", [("a32", "a", 1e-5), ("b16", "b", 1e-2)])
def test_transformers_remote_code_gives_training_embeddings(runs, exports, export, run, tol):
    from transformers import AutoModel, AutoTokenizer

    probe = runs[run][1]
    tok = AutoTokenizer.from_pretrained(exports[export], trust_remote_code=True)
    model = AutoModel.from_pretrained(exports[export], trust_remote_code=True).eval()
    assert type(model).__name__ == "LlamaBidirectionalModel"
    batch = probe_batch(probe, tok)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the probes should be left-padded"
    with torch.no_grad():
        emb = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    ref = torch.cat([probe["query"], probe["document"]])
    torch.testing.assert_close(emb, ref, atol=tol, rtol=0)


@slow
@pytest.mark.parametrize("export,run,tol", [("a32", "a", 1e-5), ("b16", "b", 1e-2), ("bert32", "bert", 1e-5)])
def test_sentence_transformers_gives_training_embeddings(runs, exports, export, run, tol):
    from sentence_transformers import SentenceTransformer

    probe = runs[run][1]
    st = SentenceTransformer(str(exports[export]), device="cpu", trust_remote_code=(run != "bert"))
    q = st.encode_query(probe["queries"], convert_to_tensor=True).float()
    d = st.encode_document(probe["documents"], convert_to_tensor=True).float()
    torch.testing.assert_close(q, probe["query"], atol=tol, rtol=0)
    torch.testing.assert_close(d, probe["document"], atol=tol, rtol=0)


@slow
@pytest.mark.parametrize("export,run,tol", [("a32", "a", 1e-5), ("b16", "b", 1e-2), ("bert32", "bert", 1e-5)])
def test_biencoder_loads_export_with_training_embeddings(runs, exports, export, run, tol):
    from model import BiEncoder

    probe = runs[run][1]
    enc = BiEncoder.from_pretrained(exports[export])
    torch.testing.assert_close(
        enc.encode(probe["queries"], prompt=probe["query_prompt"]), probe["query"], atol=tol, rtol=0
    )
    torch.testing.assert_close(enc.encode(probe["documents"]), probe["document"], atol=tol, rtol=0)


# ----------------------------------------------------------------------------------------------
# Bidirectionality of the loaded model


def first_token_state(model, seq, padded):
    """Hidden state of the first token; with `padded`, in a batch with a shorter, padded second row."""
    ids = torch.tensor([seq, seq[:3] + [128001] * (len(seq) - 3)]) if padded else torch.tensor([seq])
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 3:] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state[0, 0]


@slow
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True])
def test_remote_code_model_is_bidirectional(exports, impl, padded):
    from transformers import AutoModel, LlamaConfig, LlamaModel

    seq = [128000, 5, 6, 7, 8, 9, 10]
    changed = seq[:-1] + [777]
    model = AutoModel.from_pretrained(exports["a32"], trust_remote_code=True, attn_implementation=impl)
    assert not torch.allclose(first_token_state(model, seq, padded), first_token_state(model, changed, padded))
    # Control: a stock (causal) LlamaModel with the same weights does not see the change.
    config = LlamaConfig.from_pretrained(exports["a32"])
    config.is_causal = True
    causal = LlamaModel.from_pretrained(exports["a32"], config=config, attn_implementation=impl)
    torch.testing.assert_close(first_token_state(causal, seq, padded), first_token_state(causal, changed, padded))


@slow
def test_loading_without_remote_code_as_documented(exports):
    """The model card's recipe (LlamaModel + is_causal = False) gives the remote-code model's states."""
    from transformers import AutoModel, LlamaConfig, LlamaModel

    path = exports["a32"]
    remote = AutoModel.from_pretrained(path, trust_remote_code=True)
    config = LlamaConfig.from_pretrained(path)
    plain = LlamaModel.from_pretrained(path, config=config)
    for m in plain.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = False
    seq = [128000, 5, 6, 7, 8, 9, 10]
    for padded in (False, True):
        torch.testing.assert_close(first_token_state(plain, seq, padded), first_token_state(remote, seq, padded))


# ----------------------------------------------------------------------------------------------
# Merging


@slow
def test_merge_equals_average_by_hand(runs, exports, tmp_path):
    a, b = runs["a"][0], runs["b"][0]
    ta, tb = zero_to_fp32(a), zero_to_fp32(b)
    # Two checkpoints, equal weights (with the built-in checks)
    assert run_export("--checkpoint", a, b, "--output-dir", tmp_path / "m", "--dtype", "float32") == 0
    got = export_tensors(tmp_path / "m")
    for name in ta:
        assert torch.equal(got[name], (ta[name] + tb[name]) / 2), name
    # An exported folder as a source, and weights
    args = ("--checkpoint", exports["a32"], b, "--weights", "3", "1", "--output-dir", tmp_path / "w")
    args += ("--dtype", "float32")
    assert run_export(*args, "--no-verify") == 0
    got = export_tensors(tmp_path / "w")
    for name in ta:
        torch.testing.assert_close(got[name], 0.75 * ta[name] + 0.25 * tb[name], atol=1e-7, rtol=1e-6)
    info = json.loads((tmp_path / "w" / "export_info.json").read_text())
    assert [s["weight"] for s in info["sources"]] == [0.75, 0.25]
    assert "average" in (tmp_path / "m" / "README.md").read_text()


@slow
def test_merge_refuses_different_architectures(runs, tmp_path, capsys):
    status = run_export("--checkpoint", runs["a"][0], runs["bert"][0], "--output-dir", tmp_path / "m")
    assert status == USER_ERROR_STATUS
    assert "different base model" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------------------------
# The command line, verification and bad input


@slow
def test_cli_defaults_write_run_export(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["a"][0] / "checkpoints", run / "checkpoints")
    cmd = [sys.executable, str(REPO / "export_hf.py"), "--run", str(run), "--tag", "step_00000002"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, TQDM_DISABLE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedding check" in result.stdout and "tensor check" in result.stdout
    info = json.loads((run / "export" / "export_info.json").read_text())
    assert info["dtype"] == "bfloat16" and info["sources"][0]["step"] == 2
    assert (run / "export" / "model.safetensors").is_file()  # 33 MB of bf16 < 5GB: one file, no index
    assert not list(tmp_path.glob("run/export.tmp-*"))


@slow
def test_verify_only_accepts_a_good_export_and_catches_damage(exports, tmp_path, capsys):
    assert run_export("--verify-only", exports["a32"]) == 0
    # One changed weight
    bad = tmp_path / "bad_weight"
    shutil.copytree(exports["a32"], bad)
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    assert run_export("--verify-only", bad) == USER_ERROR_STATUS
    assert "differs from the checkpoint" in capsys.readouterr().err
    # A lost query prompt: the tensors are right, the embeddings are not
    bad = tmp_path / "bad_prompt"
    shutil.copytree(exports["a32"], bad)
    st_config = json.loads((bad / "config_sentence_transformers.json").read_text())
    st_config["prompts"]["query"] = ""
    (bad / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    assert run_export("--verify-only", bad) == USER_ERROR_STATUS
    assert "embeddings differ" in capsys.readouterr().err


def partial_run(runs, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(runs["a"][0] / "checkpoints", run / "checkpoints")
    damage(run / "checkpoints" / "step_00000003")
    return run


@slow
@pytest.mark.parametrize(
    "case,message",
    [
        ("empty", "latest"),
        ("missing", "does not exist"),
        ("partial", "partial checkpoint"),
        ("truncated", "truncated"),
        ("no_state", "train_state.json"),
        ("tag", "no checkpoint tag 'step_00000099'"),
    ],
)
def test_bad_checkpoints_fail_cleanly(runs, tmp_path, capsys, case, message):
    args = []
    if case == "empty":
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        run = tmp_path / "run"
    elif case == "missing":
        run = tmp_path / "nowhere"
    elif case == "partial":
        run = partial_run(runs, tmp_path, lambda d: (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink())
    elif case == "truncated":

        def cut(d):
            f = d / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

        run = partial_run(runs, tmp_path, cut)
    elif case == "no_state":
        run = partial_run(runs, tmp_path, lambda d: (d / "train_state.json").unlink())
    else:
        run, args = runs["a"][0], ["--tag", "step_00000099"]
    out = tmp_path / "out"
    assert run_export("--run", run, "--output-dir", out, *args) == USER_ERROR_STATUS
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


@slow
def test_existing_output_needs_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_export("--run", runs["a"][0], "--output-dir", out, "--no-verify") == USER_ERROR_STATUS
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert run_export("--run", runs["a"][0], "--output-dir", out, "--no-verify", "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob("out.*"))


@slow
def test_full_disk_leaves_nothing_behind(runs, tmp_path):
    """Writes beyond RLIMIT_FSIZE fail like a full disk (Python ignores SIGXFSZ: write() raises)."""

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, 4 * 2**20))

    out = tmp_path / "out"
    # --out: the former name of --output-dir, still accepted
    cmd = [sys.executable, str(REPO / "export_hf.py"), "--run", str(runs["a"][0]), "--out", str(out), "--no-verify"]
    env = dict(os.environ, TQDM_DISABLE="1")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, preexec_fn=limit_file_size)
    assert result.returncode == USER_ERROR_STATUS, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "failed" in result.stderr and "unchanged" in result.stderr
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
