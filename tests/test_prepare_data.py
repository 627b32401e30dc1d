"""prepare_data.py and dataset.py: the recipe's examples, token for token, and every bad input.

Each dataset is built in the test (HF layout, JSONL), prepared with the real Llama-3 tokenizer
and compared with a direct implementation of the recipe (README, "The recipe") that
calls the tokenizer itself. No network: the hub and load_dataset are replaced by fakes.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

import prepare_data
from dataset import PreparedData

REPO = Path(__file__).resolve().parents[1]
QI = "Instruct: Given a question, retrieve passages that answer the question\nQuery:"
LONG_TEXT = "The quick brown fox jumps over the lazy dog, again and again. " * 200  # ~2.4k tokens, 12k chars


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network in tests")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(datasets, "load_dataset", offline)


@pytest.fixture(scope="module")
def tok(llama_tokenizer_path):
    return AutoTokenizer.from_pretrained(llama_tokenizer_path)


def write_subset(root: Path, name: str, meta: dict, queries: list[dict], corpus: list[dict]) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "dataset_metadata.json").write_text(json.dumps({"class": "TextQADataset", "ids_only": False, **meta}))
    pq.write_table(pa.Table.from_pylist(queries), d / "queries.parquet")
    pq.write_table(pa.Table.from_pylist(corpus), d / "corpus.parquet")
    return d


def ids(*values):
    return [{"id": v} for v in values]


def make_dataset(root: Path) -> Path:
    """Two subsets. Alpha: query instruction, int corpus ids, a 12k-character document, shared
    documents, a query with 2 negatives and one with 1. Beta: passage instruction, string ids
    that collide with Alpha's ("1") but name other documents."""
    alpha_docs = {
        1: "Paris is the capital of France.",
        2: "Berlin is the capital of Germany.",
        3: "  Leading spaces, émojis 😀 and\nnewlines\tstay.",
        4: "Madrid is the capital of Spain.",
        5: "Rome is the capital of Italy.",
        6: "Unused: the sixth negative is never read.",
        7: "Lisbon is the capital of Portugal.",
        8: LONG_TEXT,
        9: "Never referenced.",
    }
    write_subset(
        root,
        "Alpha",
        {"corpus_id": "alpha", "query_instruction": QI, "passage_instruction": ""},
        [
            {
                "question_id": "a1",
                "question": "capital of France?",
                "corpus_id": "alpha",
                "pos_doc": ids("1"),
                "neg_doc": ids("2", "3", "4", "5", "6"),
            },
            {
                "question_id": "a2",
                "question": " two spaces then text ",
                "corpus_id": "alpha",
                "pos_doc": ids("2", "1"),
                "neg_doc": ids("7", "3"),
            },
            {
                "question_id": "a3",
                "question": "the fox " * 300,
                "corpus_id": "alpha",
                "pos_doc": ids("8"),
                "neg_doc": ids("1"),
            },
        ],
        [{"id": k, "text": v} for k, v in alpha_docs.items()],
    )
    write_subset(
        root,
        "Beta",
        {"corpus_id": "beta", "query_instruction": "", "passage_instruction": "passage:"},
        [
            {"question_id": 10, "question": "Wer ist da?", "pos_doc": ids("1"), "neg_doc": ids("2", "3", "4", "5")},
            {"question_id": 11, "question": "日本の首都は?", "pos_doc": ids("3"), "neg_doc": ids("1", "2", "4", "5")},
        ],
        [{"id": f"{i}", "text": f"beta document {i}: {'x' * i}"} for i in range(1, 6)],
    )
    return root


def recipe_examples(root: Path, names: list[str], k: int) -> list[dict]:
    """The recipe, written out plainly: prompt strings and document keys of every query."""
    out = []
    for name in names:
        meta = json.loads((root / name / "dataset_metadata.json").read_text())
        corpus = {str(r["id"]): r["text"] for r in pq.read_table(root / name / "corpus.parquet").to_pylist()}
        qi, pi = meta["query_instruction"], meta["passage_instruction"]
        for q in pq.read_table(root / name / "queries.parquet").to_pylist():
            doc_ids = [str(q["pos_doc"][0]["id"])] + [str(q["neg_doc"][j % len(q["neg_doc"])]["id"]) for j in range(k)]
            out.append(
                {
                    "query": f"{qi} {q['question']}" if qi else q["question"],
                    "docs": [f"{pi} {corpus[i]}" if pi else corpus[i] for i in doc_ids],
                    "keys": [(meta["corpus_id"], pi, i) for i in doc_ids],
                }
            )
    return out


def run(*args):
    prepare_data.main([str(a) for a in args])


def prepare(root, out, tokenizer, *extra, subsets=("Alpha", "Beta")):
    run(
        "--download-path",
        root,
        "--subsets",
        *subsets,
        "--tokenizer",
        tokenizer,
        "--output-dir",
        out,
        "--num-proc",
        1,
        *extra,
    )
    return PreparedData(out)


def fails(*args, match):
    """A user error: main raises UserError, which the command line prints as "prepare_data.py: error: ..."
    with exit status 2 (test_cli_exit_codes)."""
    with pytest.raises(ValueError) as e:
        run(*args)
    message = str(e.value)
    for part in match if isinstance(match, tuple) else (match,):
        assert part in message, message
    return message


def assert_no_output(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f"{out.name}.tmp-*")), "temp folder left behind"


def check_round_trip(data: PreparedData, examples: list[dict], tok, qlen=512, plen=512):
    assert len(data) == len(examples)
    key_to_doc = {}
    for i, ex in enumerate(examples):
        assert data.query(i).tolist() == tok(ex["query"], truncation=True, max_length=qlen)["input_ids"]
        row = data.query_docs[i].tolist()
        for j, (text, key) in enumerate(zip(ex["docs"], ex["keys"], strict=True)):
            assert data.doc(row[j]).tolist() == tok(text, truncation=True, max_length=plen)["input_ids"], (i, j)
            assert key_to_doc.setdefault(key, row[j]) == row[j], f"{key} stored twice"
    # each referenced document once, in first-reference order, nothing else
    assert sorted(key_to_doc.values()) == list(range(data.num_docs))
    flat = data.query_docs.reshape(-1).tolist()
    assert list(dict.fromkeys(flat)) == list(range(data.num_docs))


# ----------------------------------------------------------------------------------------------
# The tokenizer the recipe uses


def test_llama_tokenizer_adds_bos_and_no_eos(tok):
    ids = tok("hello world")["input_ids"]
    assert ids[0] == 128000 == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert tok(["a", "b c"])["input_ids"] == [[128000, 64], [128000, 65, 272]]
    assert len(tok) >= 128256  # this package's copy adds <|image|> = 128256, so 128,257
    assert prepare_data.token_dtype(len(tok)) == np.uint32


def test_token_dtype():
    assert prepare_data.token_dtype(65536) == np.uint16
    assert prepare_data.token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="does not fit uint32"):
        prepare_data.token_dtype(2**32 + 1)


# ----------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_hf_layout(tmp_path, tok, llama_tokenizer_path, capsys):
    root = make_dataset(tmp_path / "hf")
    data = prepare(root, tmp_path / "out", llama_tokenizer_path)
    examples = recipe_examples(root, ["Alpha", "Beta"], 4)
    check_round_trip(data, examples, tok)
    data.verify()

    meta = data.meta
    assert meta["num_queries"] == 5 and meta["num_negatives"] == 4 and meta["token_dtype"] == "uint32"
    assert meta["vocab_size"] == len(tok) and meta["bos_token_id"] == 128000
    assert [s["name"] for s in meta["subsets"]] == ["Alpha", "Beta"]
    assert [(s["num_queries"], s["first_query"], s["skipped"]) for s in meta["subsets"]] == [(3, 0, 0), (2, 3, 0)]
    assert meta["subsets"][0]["query_instruction"] == QI and meta["subsets"][1]["passage_instruction"] == "passage:"
    # the exact strings before each text, which the export hands to sentence-transformers
    assert [(s["query_prompt"], s["passage_prompt"]) for s in meta["subsets"]] == [(QI + " ", ""), ("", "passage: ")]
    # Alpha: 1..5, 7, 8 (not 6: the fifth negative, nor 9); Beta: 5; Alpha's 1 and Beta's "1" differ
    assert meta["num_docs"] == 7 + 5
    # cycling: a2 has negatives (7, 3) -> 7, 3, 7, 3; a3 has (1) -> 1, 1, 1, 1
    assert data.query_docs[1, 1:].tolist() == [data.query_docs[1, 1], data.query_docs[1, 2]] * 2
    assert len(set(data.query_docs[2, 1:].tolist())) == 1 and data.query_docs[2, 1] == data.query_docs[0, 0]
    # shared: a2's positive is a1's first negative
    assert data.query_docs[1, 0] == data.query_docs[0, 1]
    # truncation at 512 tokens, BOS included, for the long query and the long document
    assert len(tok(examples[2]["query"])["input_ids"]) > 512 and len(data.query(2)) == 512
    assert len(tok(LONG_TEXT)["input_ids"]) > 512 and len(data.doc(int(data.query_docs[2, 0]))) == 512
    for i in range(len(data)):
        assert data.query(i)[0] == 128000 and data.query(i)[-1] != tok.eos_token_id

    capsys.readouterr()
    run("--inspect", tmp_path / "out", "--index", 1)
    shown = json.loads(capsys.readouterr().out)
    assert shown == {
        "query": examples[1]["query"],
        "positive": examples[1]["docs"][0],
        "negatives": examples[1]["docs"][1:],
    }
    run("--inspect", tmp_path / "out")
    summary = capsys.readouterr().out
    assert "Alpha" in summary and "Beta" in summary and "128,257" in summary


def test_lengths_and_negatives_are_settings(tmp_path, tok, llama_tokenizer_path):
    root = make_dataset(tmp_path / "hf")
    data = prepare(
        root, tmp_path / "out", llama_tokenizer_path, "--query-max-len", 8, "--passage-max-len", 6, "--num-negatives", 2
    )
    check_round_trip(data, recipe_examples(root, ["Alpha", "Beta"], 2), tok, qlen=8, plen=6)
    assert data.query_docs.shape == (5, 3)
    assert max(len(data.query(i)) for i in range(len(data))) == 8


def test_subset_order_is_the_order_given(tmp_path, tok, llama_tokenizer_path):
    root = make_dataset(tmp_path / "hf")
    data = prepare(root, tmp_path / "out", llama_tokenizer_path, subsets=("Beta", "Alpha"))
    check_round_trip(data, recipe_examples(root, ["Beta", "Alpha"], 4), tok)


def test_same_corpus_in_two_subsets_is_stored_once(tmp_path, tok, llama_tokenizer_path):
    root = make_dataset(tmp_path / "hf")
    alpha = root / "Alpha"
    write_subset(
        root,
        "AlphaToo",
        json.loads((alpha / "dataset_metadata.json").read_text()),
        [{"question_id": "a1", "question": "again", "pos_doc": ids("1"), "neg_doc": ids("9")}],
        pq.read_table(alpha / "corpus.parquet").to_pylist(),
    )
    data = prepare(root, tmp_path / "out", llama_tokenizer_path, subsets=("Alpha", "AlphaToo"))
    check_round_trip(data, recipe_examples(root, ["Alpha", "AlphaToo"], 4), tok)
    assert data.meta["num_docs"] == 7 + 1  # only document 9 is new


def test_parallel_output_is_identical(tmp_path, llama_tokenizer_path, monkeypatch):
    root = make_dataset(tmp_path / "hf")
    monkeypatch.setattr(prepare_data, "SHARD_TEXTS", 2)  # several tasks per subset and kind
    one = prepare(root, tmp_path / "one", llama_tokenizer_path)
    run(
        "--download-path",
        root,
        "--subsets",
        "Alpha",
        "Beta",
        "--tokenizer",
        llama_tokenizer_path,
        "--output-dir",
        tmp_path / "two",
        "--num-proc",
        2,
    )
    assert PreparedData(tmp_path / "two").meta["files"] == one.meta["files"]


def test_long_texts_cut_exactly(tok):
    """Texts over LONG_CHARS * max_len characters are tokenized from their head: same tokens."""
    enc = prepare_data.ShardTokenizer(tok.backend_tokenizer, len(tok), tok.truncation_side, "llama")
    rng = random.Random(0)
    pieces = [
        "word",
        " ",
        "  ",
        "\n",
        "\r\n",
        " \n \n ",
        "\t",
        "123456",
        "3.14",
        "中文字符",
        "émoji😀",
        "'s",
        "...",
        "<|eot_id|>",
        "<|begin_of_text|>",
        "ABC",
        "don't",
        "  \n",
        "-",
        "http://x.org/a?b=c",
    ]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(100, 1500))) for _ in range(300)]
    texts += ["a" * 5000, " " * 5000, "x " * 2500, "\n" * 3000 + "end", "中" * 4000]
    for max_len in (16, 64):
        enc.num_cut = 0
        got = enc.encode(texts, max_len)
        assert got == tok(texts, truncation=True, max_length=max_len)["input_ids"]
        assert enc.num_cut > 50, f"the cut path was taken {enc.num_cut} times only"


# ----------------------------------------------------------------------------------------------
# JSONL and ids_only inputs


def test_jsonl(tmp_path, tok, llama_tokenizer_path, capsys):
    path = tmp_path / "mine.jsonl"
    lines = [
        {"query": "what is x", "pos": ["X is a letter.", "unused"], "neg": ["Y", "Z"], "prompt": QI},
        {"query": "q2", "pos": ["Y"], "neg": ["X is a letter.", "W", "V", "U", "T"]},
        {"query": "q3", "pos": ["Z"], "neg": ["Y"], "prompt": None},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    run("--jsonl", path, "--tokenizer", llama_tokenizer_path, "--output-dir", tmp_path / "out", "--num-proc", 1)
    data = PreparedData(tmp_path / "out")
    examples = []
    for x in lines:
        docs = [x["pos"][0]] + [x["neg"][j % len(x["neg"])] for j in range(4)]
        examples.append(
            {"query": f"{x['prompt']} {x['query']}" if x.get("prompt") else x["query"], "docs": docs, "keys": docs}
        )
    check_round_trip(data, examples, tok)
    assert data.num_docs == 6  # X, Y, Z, W, V, U once each; T (fifth negative) and "unused" never referenced
    assert data.meta["subsets"][0]["name"] == "mine" and data.meta["subsets"][0]["query_instruction"] is None
    assert data.meta["subsets"][0]["query_prompt"] is None  # per line: inside each query's tokens


def test_hf_layout_and_jsonl_together(tmp_path, tok, llama_tokenizer_path):
    root = make_dataset(tmp_path / "hf")
    path = tmp_path / "extra.jsonl"
    path.write_text(json.dumps({"query": "q", "pos": ["Paris is the capital of France."], "neg": ["n"]}) + "\n")
    data = prepare(root, tmp_path / "out", llama_tokenizer_path, "--jsonl", path)
    assert [s["name"] for s in data.meta["subsets"]] == ["Alpha", "Beta", "extra"]
    # JSONL texts are keyed by text: Alpha's document 1 (same text) is a different key, stored again
    assert data.num_docs == 12 + 2


def make_ids_only(root: Path, config: dict) -> Path:
    d = write_subset(
        root,
        "Gamma",
        {"corpus_id": "gamma", "query_instruction": "Q:", "passage_instruction": "", "ids_only": True},
        [
            {"question_id": "g1", "question": "q_1", "pos_doc": ids("d_2"), "neg_doc": ids("d_0")},
            {"question_id": "g2", "question": "q_0", "pos_doc": ids("d_0"), "neg_doc": ids("d_1", "d_2")},
        ],
        [{"id": f"d_{i}"} for i in range(3)],
    )
    (d / "source_config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("loader", ["mteb", "column"])
def test_ids_only_text_is_restored_from_the_source(tmp_path, tok, llama_tokenizer_path, monkeypatch, capsys, loader):
    calls = []

    def fake_load_dataset(*args, split):
        calls.append((*args, split))
        if loader == "column":
            return datasets.Dataset.from_dict(
                {"question": ["first q", "second q", "third q"], "answer": ["doc zero", "doc one", "doc two"]}
            )
        texts = {"queries": ["first q", "second q"], "corpus": ["doc zero", "doc one", "doc two"]}[args[1]]
        return datasets.Dataset.from_dict({"_id": list(range(len(texts))), "text": texts})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = {"loader_config": "mteb", "source_repo": "mteb/fake"}
    if loader == "column":
        config = {
            "loader_config": "column",
            "source_repo": "someone/qa",
            "subset": "en",
            "split": "train",
            "query_column": "question",
            "document_column": "answer",
        }
    d = make_ids_only(tmp_path / "hf", config)
    data = prepare(tmp_path / "hf", tmp_path / "out", llama_tokenizer_path, subsets=("Gamma",))
    expected = [("mteb/fake", "queries", "queries"), ("mteb/fake", "corpus", "corpus")]
    assert calls == (expected if loader == "mteb" else [("someone/qa", "en", "train")])
    assert (d / "queries.restored.parquet").is_file() and (d / "corpus.restored.parquet").is_file()
    capsys.readouterr()
    run("--inspect", tmp_path / "out", "--index", 0)
    assert json.loads(capsys.readouterr().out) == {
        "query": "Q: second q",
        "positive": "doc two",
        "negatives": ["doc zero"] * 4,
    }
    assert data.num_docs == 3
    # restored once: a second preparation does not load the source again
    run(
        "--download-path",
        tmp_path / "hf",
        "--subsets",
        "Gamma",
        "--tokenizer",
        llama_tokenizer_path,
        "--output-dir",
        tmp_path / "out2",
        "--num-proc",
        1,
    )
    assert len(calls) == len(expected if loader == "mteb" else [1])


def test_ids_only_bad_id_and_offline_source(tmp_path, llama_tokenizer_path, monkeypatch):
    make_ids_only(tmp_path / "hf", {"loader_config": "mteb", "source_repo": "mteb/fake"})
    args = (
        "--download-path",
        tmp_path / "hf",
        "--subsets",
        "Gamma",
        "--tokenizer",
        llama_tokenizer_path,
        "--output-dir",
        tmp_path / "out",
    )
    fails(*args, match=("source_config.json", "cannot load the source mteb/fake", "no network"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split: datasets.Dataset.from_dict({"text": ["only"]}))
    fails(*args, match=("queries.parquet", "'q_1' is past the 1 rows"))
    assert_no_output(tmp_path / "out")


def test_download_only_what_is_missing(tmp_path, llama_tokenizer_path, monkeypatch):
    root = make_dataset(tmp_path / "hf")
    source = make_dataset(tmp_path / "remote")
    (root / "Beta" / "corpus.parquet").unlink()
    calls = []

    def fake_snapshot_download(repo_id, repo_type, local_dir, allow_patterns):
        calls.append((repo_id, repo_type, allow_patterns))
        (Path(local_dir) / "Beta" / "corpus.parquet").write_bytes((source / "Beta" / "corpus.parquet").read_bytes())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    prepare(root, tmp_path / "out", llama_tokenizer_path)
    assert calls == [("nvidia/embed-nemotron-dataset-v1", "dataset", ["Beta/*"])]


# ----------------------------------------------------------------------------------------------
# Re-runs, crashes, settings


def test_rerun_is_a_no_op_and_other_settings_are_refused(tmp_path, llama_tokenizer_path, capsys):
    root = make_dataset(tmp_path / "hf")
    out = tmp_path / "out"
    prepare(root, out, llama_tokenizer_path)
    before = (out / "meta.json").stat().st_mtime_ns
    capsys.readouterr()
    prepare(root, out, llama_tokenizer_path)
    assert "nothing to do" in capsys.readouterr().out and (out / "meta.json").stat().st_mtime_ns == before
    base = (
        "--download-path",
        root,
        "--subsets",
        "Alpha",
        "Beta",
        "--tokenizer",
        llama_tokenizer_path,
        "--output-dir",
        out,
    )
    fails(*base, "--passage-max-len", 256, match=("passage_max_len: 512 there, 256 now", "--overwrite"))
    fails(
        *base[:4],
        "--tokenizer",
        llama_tokenizer_path,
        "--output-dir",
        out,
        match=("subsets: ['Alpha', 'Beta'] there, ['Alpha'] now",),
    )
    run(*base, "--passage-max-len", 256, "--overwrite", "--num-proc", 1)
    assert PreparedData(out).meta["passage_max_len"] == 256


def test_output_of_another_tokenizer_is_refused(tmp_path, llama_tokenizer_path, tiny_tokenizer):
    root = make_dataset(tmp_path / "hf")
    prepare(root, tmp_path / "out", llama_tokenizer_path)
    fails(
        "--download-path",
        root,
        "--subsets",
        "Alpha",
        "Beta",
        "--tokenizer",
        tiny_tokenizer,
        "--output-dir",
        tmp_path / "out",
        match=("tokenizer: ", tiny_tokenizer, "--overwrite"),
    )


def test_folder_that_is_not_ours_is_refused(tmp_path, llama_tokenizer_path):
    root = make_dataset(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    fails(
        "--download-path",
        root,
        "--subsets",
        "Alpha",
        "--tokenizer",
        llama_tokenizer_path,
        "--output-dir",
        tmp_path / "out",
        match=("not a complete prepared folder", "--overwrite"),
    )


def test_crash_leaves_nothing_and_keeps_the_old_output(tmp_path, llama_tokenizer_path, monkeypatch):
    root = make_dataset(tmp_path / "hf")
    out = tmp_path / "out"

    def interrupted(self, tokens, lengths):
        raise KeyboardInterrupt

    append = prepare_data.TokenFile.append
    monkeypatch.setattr(prepare_data.TokenFile, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, out, llama_tokenizer_path)
    assert_no_output(out)
    monkeypatch.setattr(prepare_data.TokenFile, "append", append)
    prepare(root, out, llama_tokenizer_path)
    meta = (out / "meta.json").read_text()
    monkeypatch.setattr(prepare_data.TokenFile, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, out, llama_tokenizer_path, "--overwrite", "--num-negatives", 1)
    assert (out / "meta.json").read_text() == meta  # the complete old folder is untouched
    assert not list(tmp_path.glob("out.tmp-*"))


def test_stale_temp_folder_of_a_killed_run_is_removed(tmp_path, llama_tokenizer_path):
    root = make_dataset(tmp_path / "hf")
    stale = tmp_path / "out.tmp-999999999"  # no such pid
    stale.mkdir()
    prepare(root, tmp_path / "out", llama_tokenizer_path)
    assert not stale.exists()


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file (and row or id), no output


def rewrite_queries(root, name, change):
    path = root / name / "queries.parquet"
    rows = pq.read_table(path).to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows), path)


def rewrite_corpus(root, name, rows):
    pq.write_table(pa.Table.from_pylist(rows), root / name / "corpus.parquet")


BAD_HF = {
    "missing file": (lambda r: (r / "Beta" / "corpus.parquet").unlink(), ("Beta/corpus.parquet", "no network")),
    "missing metadata": (lambda r: (r / "Beta" / "dataset_metadata.json").unlink(), ("Beta/dataset_metadata.json",)),
    "missing column": (
        lambda r: rewrite_queries(r, "Alpha", lambda rows: [x.pop("neg_doc") for x in rows]),
        ("Alpha/queries.parquet", "missing column(s) ['neg_doc']"),
    ),
    "missing text column": (
        lambda r: rewrite_corpus(r, "Beta", [{"id": "1"}]),
        ("Beta/corpus.parquet", "missing column(s) ['text']"),
    ),
    "unreadable parquet": (
        lambda r: (r / "Beta" / "queries.parquet").write_bytes(b"PAR1 not really"),
        ("Beta/queries.parquet", "not a readable parquet file"),
    ),
    "bad metadata json": (
        lambda r: (r / "Alpha" / "dataset_metadata.json").write_text("{oops"),
        ("Alpha/dataset_metadata.json", "not readable JSON"),
    ),
    "positive not in corpus": (
        lambda r: rewrite_queries(r, "Alpha", lambda rows: rows[1].update(pos_doc=ids("99"))),
        ("Alpha/queries.parquet", "query 'a2' (row 1)", "positive document id '99'", "Alpha/corpus.parquet"),
    ),
    "negative not in corpus": (
        lambda r: rewrite_queries(r, "Beta", lambda rows: rows[1].update(neg_doc=ids("1", "2", "nope"))),
        ("Beta/queries.parquet", "query '11' (row 1)", "negative 3 document id 'nope'"),
    ),
    "empty pos_doc": (
        lambda r: rewrite_queries(r, "Alpha", lambda rows: rows[2].update(pos_doc=[])),
        ("Alpha/queries.parquet", "query 'a3' (row 2) has an empty pos_doc", "--skip-invalid"),
    ),
    "empty neg_doc": (
        lambda r: rewrite_queries(r, "Beta", lambda rows: rows[0].update(neg_doc=[])),
        ("Beta/queries.parquet", "query '10' (row 0) has an empty neg_doc", "--skip-invalid"),
    ),
    "null question": (
        lambda r: rewrite_queries(r, "Alpha", lambda rows: rows[1].update(question=None)),
        ("Alpha/queries.parquet", "query 'a2' (row 1): question is null"),
    ),
    "non-string question": (
        lambda r: rewrite_queries(r, "Beta", lambda rows: [x.update(question=7) for x in rows]),
        ("Beta/queries.parquet", "column 'question' must hold strings, got int64"),
    ),
    "non-string text": (
        lambda r: rewrite_corpus(r, "Beta", [{"id": str(i), "text": i} for i in range(1, 6)]),
        ("Beta/corpus.parquet", "column 'text' must hold strings, got int64"),
    ),
    "null text": (
        lambda r: rewrite_corpus(r, "Beta", [{"id": str(i), "text": None if i == 3 else "t"} for i in range(1, 6)]),
        ("Beta/corpus.parquet", "document '3' (row 2) has a null text"),
    ),
    "row of a corpus not in the run": (
        lambda r: rewrite_queries(r, "Alpha", lambda rows: rows[0].update(corpus_id="gamma")),
        ("Alpha/queries.parquet", "query 'a1' (row 0): corpus_id 'gamma' is neither 'alpha'"),
    ),
    "row of a corpus with another passage instruction": (
        lambda r: rewrite_queries(r, "Alpha", lambda rows: rows[0].update(corpus_id="beta")),
        ("Alpha/queries.parquet", "query 'a1' (row 0): its documents come from corpus 'beta'"),
    ),
    "null id": (
        lambda r: rewrite_queries(r, "Alpha", lambda rows: rows[0].update(neg_doc=[{"id": None}])),
        ("Alpha/queries.parquet", "query 'a1' (row 0): a neg_doc entry has a null id"),
    ),
}


@pytest.mark.parametrize("case", BAD_HF)
def test_bad_hf_input(tmp_path, llama_tokenizer_path, case):
    root = make_dataset(tmp_path / "hf")
    damage, match = BAD_HF[case]
    damage(root)
    fails(
        "--download-path",
        root,
        "--subsets",
        "Alpha",
        "Beta",
        "--tokenizer",
        llama_tokenizer_path,
        "--output-dir",
        tmp_path / "out",
        "--num-proc",
        1,
        match=match,
    )
    assert_no_output(tmp_path / "out")


def test_reference_quirks_are_accepted_counted_and_warned(tmp_path, tok, llama_tokenizer_path, capsys):
    """What the reference accepts: duplicate question ids (kept: queries are a plain list), duplicate
    corpus ids (the last row wins) and a row naming another subset's corpus (its documents come from
    there). Each is counted per subset in meta.json and warned about with a first example."""
    root = make_dataset(tmp_path / "hf")
    meta = json.loads((root / "Beta" / "dataset_metadata.json").read_text())
    (root / "Beta" / "dataset_metadata.json").write_text(json.dumps({**meta, "passage_instruction": ""}))
    beta = [{"id": f"{i}", "text": f"beta document {i}"} for i in range(1, 6)] + [{"id": "1", "text": "last copy"}]
    rewrite_corpus(root, "Beta", beta)
    rewrite_queries(root, "Alpha", lambda rows: (rows[0].update(corpus_id="beta"), rows[2].update(question_id="a1")))
    data = prepare(root, tmp_path / "out", llama_tokenizer_path)
    err = capsys.readouterr().err
    assert "warning: Alpha: 1 duplicate question ids (e.g. 'a1')" in err
    assert "warning: Alpha: 1 rows of another corpus (e.g. 'beta')" in err
    assert "warning: Beta: 1 duplicate corpus ids (e.g. '1')" in err
    quirks = {s["name"]: s["quirks"] for s in data.meta["subsets"]}
    assert quirks == {
        "Alpha": {"duplicate_question_ids": 1, "rows_of_another_corpus": 1, "duplicate_corpus_ids": 0},
        "Beta": {"duplicate_question_ids": 0, "rows_of_another_corpus": 0, "duplicate_corpus_ids": 1},
    }
    assert len(data) == 5  # every query kept

    def doc(query, col):
        return tok.decode(data.doc(int(data.query_docs[query, col])).tolist(), skip_special_tokens=True)

    # query a1 (Alpha, row 0) reads Beta's corpus: positive "1" is its LAST row, negatives Beta's 2..5
    assert [doc(0, c) for c in range(5)] == ["last copy"] + [f"beta document {i}" for i in range(2, 6)]
    assert doc(0, 0) == doc(3, 0)  # Beta's own query 10 has the same positive, stored once
    assert doc(1, 0) == "Berlin is the capital of Germany."  # the other Alpha rows still read Alpha's corpus


def test_skip_invalid_skips_and_reports(tmp_path, tok, llama_tokenizer_path, capsys):
    root = make_dataset(tmp_path / "hf")
    examples = recipe_examples(root, ["Alpha", "Beta"], 4)
    rewrite_queries(root, "Alpha", lambda rows: (rows[0].update(neg_doc=[]), rows[2].update(pos_doc=[])))
    data = prepare(root, tmp_path / "out", llama_tokenizer_path, "--skip-invalid")
    assert "Alpha: skipped 2 queries" in capsys.readouterr().out
    assert [s["skipped"] for s in data.meta["subsets"]] == [2, 0] and len(data) == 3
    assert [s["first_query"] for s in data.meta["subsets"]] == [0, 1]
    check_round_trip(data, [examples[1]] + examples[3:], tok)


BAD_JSONL = {
    "unreadable line": ('{"query": "q", "pos": ["p"], "neg": ["n"]}\n{"query": oops}\n', "bad.jsonl:2: not valid JSON"),
    "not an object": ('["q", "p"]\n', "bad.jsonl:1: expected a JSON object, got list"),
    "missing key": ('{"query": "q", "neg": ["n"]}\n', "bad.jsonl:1: missing key 'pos'"),
    "non-string pos": ('{"query": "q", "pos": [1], "neg": ["n"]}\n', "bad.jsonl:1: pos[0] must be a string, got int"),
    "non-string query": ('{"query": null, "pos": ["p"], "neg": ["n"]}\n', "bad.jsonl:1: 'query' must be a string"),
    "empty neg": ('{"query": "q", "pos": ["p"], "neg": []}\n', "bad.jsonl:1: empty 'neg'; pass --skip-invalid"),
    "empty pos": ('{"query": "q", "pos": [], "neg": ["n"]}\n', "bad.jsonl:1: empty 'pos'"),
}


@pytest.mark.parametrize("case", BAD_JSONL)
def test_bad_jsonl_input(tmp_path, llama_tokenizer_path, case):
    text, match = BAD_JSONL[case]
    (tmp_path / "bad.jsonl").write_text(text)
    fails(
        "--jsonl",
        tmp_path / "bad.jsonl",
        "--tokenizer",
        llama_tokenizer_path,
        "--output-dir",
        tmp_path / "out",
        match=match,
    )
    assert_no_output(tmp_path / "out")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A word-level tokenizer whose ids run past its vocabulary (len 4, an id of 70,000)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<s>": 0, "<unk>": 1, "hello": 2, "far": 70000}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>").save_pretrained(path)
    return str(path)


def test_tokenizer_ids_must_fit_its_vocab(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"query": "hello", "pos": ["hello"], "neg": ["hello"]}) + "\n")
    run("--jsonl", path, "--tokenizer", tiny_tokenizer, "--output-dir", tmp_path / "ok", "--num-proc", 1)
    data = PreparedData(tmp_path / "ok")
    assert data.meta["token_dtype"] == "uint16" and data.query(0).tolist() == [0, 2]
    path.write_text(json.dumps({"query": "hello far", "pos": ["hello"], "neg": ["hello"]}) + "\n")
    fails(
        "--jsonl",
        path,
        "--tokenizer",
        tiny_tokenizer,
        "--output-dir",
        tmp_path / "out",
        "--num-proc",
        1,
        match=(tiny_tokenizer, "token id 70000 >= its vocab size"),
    )
    assert_no_output(tmp_path / "out")


def test_bad_settings():
    for args, match in [
        (["--num-negatives", "-1"], "--num-negatives must be >= 0"),
        (["--query-max-len", "1"], "--query-max-len must be >= 2"),
        (["--num-proc", "0"], "--num-proc must be >= 1"),
        (["--jsonl", "/nonexistent.jsonl"], "--jsonl /nonexistent.jsonl: no such file"),
        (["--index", "3"], "--index only goes with --inspect"),
        (["--subsets", "A", "A"], "subset names must be unique"),
    ]:
        fails(*args, match=match)


# ----------------------------------------------------------------------------------------------
# dataset.py


def test_prepared_data_refuses_missing_incomplete_or_corrupt(tmp_path, llama_tokenizer_path):
    with pytest.raises(ValueError, match="no meta.json.*prepare_data.py"):
        PreparedData(tmp_path / "nothing")
    out = tmp_path / "out"
    data = prepare(make_dataset(tmp_path / "hf"), out, llama_tokenizer_path)
    with pytest.raises(ValueError, match="tokenizer='.*' \\(this run: 'other'\\).*prepare_data.py"):
        data.check(tokenizer="other", query_max_len=512)
    data.check(query_max_len=512, num_negatives=4)
    with pytest.raises(IndexError):
        data.query(len(data))
    raw = bytearray((out / "doc_tokens.npy").read_bytes())
    raw[-1] ^= 1
    (out / "doc_tokens.npy").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="doc_tokens.npy: sha256 .* \\(corrupt\\)"):
        PreparedData(out).verify()
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        PreparedData(out)
    (out / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        PreparedData(out)


def test_cli_exit_codes(tmp_path, llama_tokenizer_path):
    out = tmp_path / "out"
    prepare(make_dataset(tmp_path / "hf"), out, llama_tokenizer_path)
    ok = subprocess.run(
        [sys.executable, "prepare_data.py", "--inspect", out, "--index", "0"], cwd=REPO, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["query"] == f"{QI} capital of France?"
    bad = subprocess.run(
        [sys.executable, "prepare_data.py", "--inspect", tmp_path / "nothing"], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("prepare_data.py: error: ") and "no meta.json" in bad.stderr
    assert "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------------------------
# A real dataset in the embed-nemotron layout


def scifact_root():
    root = REPO / "data"
    assert (root / "scifact" / "queries.parquet").is_file(), "data/scifact ships with the repository"
    return root


def test_scifact(tmp_path, tok, llama_tokenizer_path):
    root = scifact_root()
    data = prepare(root, tmp_path / "out", llama_tokenizer_path, subsets=("scifact",))
    assert len(data) == 809 and data.meta["subsets"][0]["skipped"] == 0
    examples = recipe_examples(root, ["scifact"], 4)
    keys = {key for ex in examples for key in ex["keys"]}
    assert data.num_docs == len(keys)
    # every example is the recipe's, token for token (full check on a sample, lengths on all)
    sample = list(range(0, 809, 40)) + [808]
    check_sample = PreparedDataView(data, sample)
    check_round_trip(check_sample, [examples[i] for i in sample], tok)
    q_lengths = np.diff(data.query_offsets)
    assert q_lengths.min() > 20 and q_lengths.max() <= 512 and np.diff(data.doc_offsets).max() == 512


class PreparedDataView:
    """The queries `rows` of a PreparedData, with its documents renumbered in first-reference order."""

    def __init__(self, data: PreparedData, rows: list[int]):
        self.data, self.rows = data, rows
        flat = data.query_docs[rows].reshape(-1).tolist()
        self.docs = list(dict.fromkeys(flat))
        new = {d: i for i, d in enumerate(self.docs)}
        self.query_docs = np.array([[new[d] for d in data.query_docs[r].tolist()] for r in rows])
        self.num_docs = len(self.docs)

    def __len__(self):
        return len(self.rows)

    def query(self, i):
        return self.data.query(self.rows[i])

    def doc(self, j):
        return self.data.doc(self.docs[j])


def test_skip_invalid_can_empty_a_whole_subset(tmp_path, tok, llama_tokenizer_path):
    root = make_dataset(tmp_path / "hf")
    examples = recipe_examples(root, ["Alpha"], 4)
    rewrite_queries(root, "Beta", lambda rows: [x.update(neg_doc=[]) for x in rows])
    data = prepare(root, tmp_path / "out", llama_tokenizer_path, "--skip-invalid")
    assert [(s["num_queries"], s["num_new_docs"], s["skipped"]) for s in data.meta["subsets"]] == [(3, 7, 0), (0, 0, 2)]
    check_round_trip(data, examples, tok)


def test_jsonl_that_is_not_utf8(tmp_path, llama_tokenizer_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"query": "q", "pos": ["p"], "neg": ["n"]}\n{"query": "caf\xe9", "pos": ["p"], "neg": ["n"]}\n')
    fails(
        "--jsonl",
        path,
        "--tokenizer",
        llama_tokenizer_path,
        "--output-dir",
        tmp_path / "out",
        match="latin1.jsonl:2: not UTF-8",
    )
    assert_no_output(tmp_path / "out")
