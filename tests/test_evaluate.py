"""evaluate.py: metrics against hand-computed values, chunked top-k, BEIR reading, the CLI end to end.

The metric functions were also checked against pytrec_eval (pytrec-eval-terrier) on 200 random
qrels/runs with graded relevance and tied scores: identical values.
"""

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate as ev
import retrieval
import sources
from model import BiEncoder
from tiny_models import minilm_dir, save_tiny_last_token_model

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO / "data" / "scifact-beir"


# ----------------------------------------------------------------------------------------------
# Metrics


def test_ndcg_graded_hand_computed():
    rels = {"a": 2, "b": 1, "c": 0}
    ranking = ["c", "a", "z", "b"]  # c judged not relevant, z not judged
    dcg = 0 + 2 / math.log2(3) + 0 + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert retrieval.ndcg_at_k(ranking, rels, 10) == pytest.approx(dcg / idcg)
    assert retrieval.ndcg_at_k(ranking, rels, 10) == pytest.approx(0.643322, abs=1e-6)
    # cut at 2: b (rank 4) no longer counts, the ideal still holds both relevant documents
    assert retrieval.ndcg_at_k(ranking, rels, 2) == pytest.approx((2 / math.log2(3)) / idcg)
    assert retrieval.ndcg_at_k(["a", "b"], rels, 10) == pytest.approx(1.0)
    assert retrieval.ndcg_at_k(["a"], {"a": 0}, 10) == 0.0  # no relevant document: 0, not a division by 0


def test_recall_and_mrr_hand_computed():
    rels = {"a": 1, "b": 3, "c": 0}
    ranking = [f"n{i}" for i in range(10)] + ["b", "c", "a"]  # b at rank 11, a at rank 13
    assert retrieval.recall_at_k(ranking, rels, 10) == 0.0
    assert retrieval.recall_at_k(ranking, rels, 11) == 0.5
    assert retrieval.recall_at_k(ranking, rels, 100) == 1.0
    assert retrieval.mrr_at_k(ranking, rels, 10) == 0.0
    assert retrieval.mrr_at_k(["c", "x", "a"], rels, 10) == pytest.approx(1 / 3)  # c has score 0: not relevant
    assert retrieval.recall_at_k(["c"], {"c": 0}, 10) == 0.0


def test_ties_are_broken_by_doc_id_descending_as_trec_eval():
    assert retrieval.ranked({"w": 0.2, "x": 0.2, "a": 0.9, "y": 0.1}) == ["a", "x", "w", "y"]
    # the relevant x comes before w at the same score: MRR 1, not 1/2
    assert retrieval.retrieval_metrics({"q": {"x": 1}}, {"q": {"w": 0.2, "x": 0.2}})["MRR@10"] == 1.0
    assert retrieval.retrieval_metrics({"q": {"w": 1}}, {"q": {"w": 0.2, "x": 0.2}})["MRR@10"] == 0.5


def test_averages_over_qrels_queries_missing_ones_score_zero():
    qrels = {
        "q1": {"a": 2, "b": 1, "c": 0},
        "q2": {"x": 1},
        "q3": {"y": 1},  # not in the run: scores 0 and counts
        "q4": {"z": 0},  # no relevant document: scores 0 and counts
    }
    run = {
        "q1": {"a": 0.5, "c": 0.9, "b": 0.1, "z": 0.3},  # c, a, z, b
        "q2": {"x": 0.8, "w": 0.2},
        "q9": {"x": 1.0},  # not in qrels: ignored
    }
    m = retrieval.retrieval_metrics(qrels, run)
    ndcg_q1 = (2 / math.log2(3) + 1 / math.log2(5)) / (2 + 1 / math.log2(3))
    assert m["NDCG@10"] == pytest.approx((ndcg_q1 + 1) / 4)
    assert m["Recall@10"] == pytest.approx(2 / 4)
    assert m["Recall@100"] == pytest.approx(2 / 4)
    assert m["MRR@10"] == pytest.approx((1 / 2 + 1) / 4)
    with pytest.raises(ValueError, match="no queries"):
        retrieval.retrieval_metrics({}, run)


# ----------------------------------------------------------------------------------------------
# Search


@pytest.mark.parametrize("chunk_size,query_block", [(7, 3), (50, 1000), (1000, 5), (1, 2)])
def test_chunked_topk_equals_full_sort(chunk_size, query_block):
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(13, 16, generator=g), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(103, 16, generator=g), dim=-1)
    k = 10
    scores, idx, _, _ = retrieval.search([q.numpy()], [d.numpy()], k, doc_block=chunk_size, query_block=query_block)
    full = q @ d.T
    ref_scores, ref_idx = full.sort(dim=1, descending=True)
    torch.testing.assert_close(torch.from_numpy(scores), ref_scores[:, :k])
    assert torch.equal(torch.from_numpy(idx), ref_idx[:, :k])  # random floats: no ties, so the order is unique


def test_chunked_topk_with_ties_and_k_above_corpus():
    d = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])  # three identical docs
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores, idx, _, _ = retrieval.search([q.numpy()], [d.numpy()], 10, doc_block=2, query_block=1)  # k > N
    assert scores.shape == (2, 10) and (idx[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    torch.testing.assert_close(torch.from_numpy(scores[:, :5]), (q @ d.T).sort(dim=1, descending=True).values)
    assert idx[0, :3].tolist() == [0, 1, 3]  # the tied docs, in corpus order
    assert sorted(idx[1, :5].tolist()) == [0, 1, 2, 3, 4]


def test_build_run_drops_the_query_itself():
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    idx = torch.tensor([[1, 0, 2]])
    run = retrieval.build_run(["d1"], ["d0", "d1", "d2"], scores, idx, k=2)
    assert list(run["d1"]) == ["d0", "d2"]


# ----------------------------------------------------------------------------------------------
# Data


def test_doc_text_rules():
    assert sources.doc_text("A title", "Body.") == "A title. Body."
    assert sources.doc_text("Is it?", "Body.") == "Is it? Body."
    assert sources.doc_text("Done.", " Body. ") == "Done. Body."
    assert sources.doc_text("Wow!", "Body") == "Wow! Body"
    assert sources.doc_text("", "Body") == "Body"
    assert sources.doc_text("  ", "Body") == "Body"


def test_doc_text_matches_scifact_corpus_parquet():
    """data/README.md: the baseline embeds documents as in data/scifact/corpus.parquet."""
    data = sources.load_beir(SCIFACT)
    ref = pd.read_parquet(REPO / "data" / "scifact" / "corpus.parquet")
    ref = dict(zip(ref["id"].astype(str), ref["text"], strict=True))
    assert len(data["docs"]) == len(ref) == 5183
    assert all(text == ref[i] for i, text in zip(data["doc_ids"], data["docs"], strict=True))
    assert len(data["query_ids"]) == 300


def write_beir(root: Path, corpus: list[dict], queries: list[dict], qrels_lines: list[str], newline="\n") -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries))
    with open(root / "qrels" / "test.tsv", "w", newline="") as f:
        f.write("".join(line + newline for line in ["query-id\tcorpus-id\tscore", *qrels_lines]))
    return root


def test_load_beir_skips_and_counts(tmp_path):
    corpus = [{"_id": "d1", "title": "T", "text": "one"}, {"_id": "d2", "title": "", "text": "two"}]
    queries = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}, {"_id": "q3", "text": "no qrels"}]
    qrels = ["q1\td1\t1", "q1\td404\t2", "q2\td2\t0", "q404\td1\t1"]
    data = sources.load_beir(write_beir(tmp_path, corpus, queries, qrels, newline="\r\n"))  # CRLF as in BEIR's zip
    assert data["query_ids"] == ["q1", "q2"]  # q3 has no judgments: not evaluated
    assert data["queries"] == ["first", "second"]
    assert data["docs"] == ["T. one", "two"]
    assert data["qrels"] == {"q1": {"d1": 1, "d404": 2}, "q2": {"d2": 0}}
    assert data["skipped_queries"] == 1  # q404 is not in queries.jsonl
    assert data["judgments_missing_doc"] == 1  # d404 is not in the corpus (kept, as BEIR does)
    assert data["queries_without_relevant"] == 1  # q2


def test_load_beir_errors(tmp_path):
    with pytest.raises(ValueError, match=r"corpus\.jsonl.*BEIR layout"):
        sources.load_beir(tmp_path)
    root = write_beir(tmp_path, [{"_id": "d", "text": "x"}], [{"_id": "q", "text": "y"}], ["q\td\thigh"])
    with pytest.raises(ValueError, match=r"test\.tsv:2: score 'high'"):
        sources.load_beir(root)
    (root / "corpus.jsonl").write_text('{"_id": "d", "text": "x"}\n{"_id": "d"\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: not valid JSON"):
        sources.load_beir(root)


def test_settings_from_the_model_folder(tmp_path):
    bert = [SimpleNamespace(max_positions=512)]
    # the packaged MiniLM: sentence_bert_config.json says 256 tokens, no prompts
    assert ev.resolve_settings(minilm_dir(), bert, None, None, None) == ("", "", 256)
    folder = tmp_path / "export"
    folder.mkdir()
    prompts = {"prompts": {"query": "Instruct: find\nQuery: ", "document": ""}}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(prompts))
    assert ev.resolve_settings(folder, bert, None, None, None) == ("Instruct: find\nQuery: ", "", 512)
    assert ev.resolve_settings(folder, bert, "", "passage: ", 9999) == ("", "passage: ", 512)  # capped
    rope = [SimpleNamespace(max_positions=None)]
    assert ev.resolve_settings(None, rope, None, None, 4096) == ("", "", 4096)


# ----------------------------------------------------------------------------------------------
# Embedding, the CLI end to end


@pytest.fixture(scope="module")
def minilm():
    return BiEncoder.from_pretrained(str(minilm_dir()))


def test_embed_on_two_replicas_matches_one_and_keeps_order(minilm):
    texts = [("word " * n).strip() for n in (5, 40, 1, 17, 3, 60, 8, 2, 33, 9, 12, 4)]
    one = ev.embed([minilm], texts, "q: ", batch_size=2, max_length=64, show_progress=False)
    two = ev.embed([minilm, copy.deepcopy(minilm)], texts, "q: ", batch_size=1, max_length=64, show_progress=False)
    ref = minilm.encode(texts, prompt="q: ", max_length=64)
    torch.testing.assert_close(one, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(two, ref, atol=1e-5, rtol=0)


def test_a_causal_last_token_model_is_embedded_as_sentence_transformers_embeds_it(tmp_path, llama_tokenizer_path):
    """evaluate.py reads the model folder's sentence-transformers files (`BiEncoder.from_stored`): a
    decoder with last-token pooling stays causal, pooled at each text's last token, with the stored
    max length; its embeddings equal sentence-transformers' own."""
    from sentence_transformers import SentenceTransformer

    folder = save_tiny_last_token_model(tmp_path / "model")
    (enc,) = ev.load_replicas(folder, "cpu", "float32")
    assert (enc.pooling, any(getattr(m, "is_causal", False) for m in enc.modules())) == ("lasttoken", True)
    _, _, max_length = ev.resolve_settings(folder, [enc], None, None, None)
    assert max_length == 64  # sentence-transformers 6 keeps it in tokenizer_config.json
    texts = [("word " * n).strip() for n in (5, 40, 1, 90, 3)]  # 90 words: cut at 64 tokens
    ours = ev.embed([enc], texts, "", batch_size=2, max_length=max_length, show_progress=False)
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=3, convert_to_tensor=True)
    assert (ours * ref).sum(-1).min() > 0.99999


@pytest.fixture(scope="module")
def scifact_subset(tmp_path_factory):
    """20 SciFact test queries, the documents they judge, and 200 others, in the BEIR layout."""
    queries = {r["_id"]: r for r in map(json.loads, open(SCIFACT / "queries.jsonl"))}
    lines = (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:]
    keep = list(dict.fromkeys(line.split("\t")[0] for line in lines))[:20]
    qrels = [line for line in lines if line.split("\t")[0] in keep]
    judged = {line.split("\t")[1] for line in qrels}
    corpus = [json.loads(line) for line in open(SCIFACT / "corpus.jsonl")]
    others = [row for row in corpus if row["_id"] not in judged][:200]
    docs = [row for row in corpus if row["_id"] in judged] + others
    root = tmp_path_factory.mktemp("scifact-subset")
    return write_beir(root, docs, [queries[q] for q in keep], qrels)


def test_cli_end_to_end_on_a_scifact_subset(scifact_subset, tmp_path, capsys):
    out = tmp_path / "eval" / "result.json"
    args = ["--model", str(minilm_dir()), "--beir", str(scifact_subset), "--query-prompt", ""]
    result = ev.main([*args, "--output-json", str(out), "--batch-size", "16"])
    stdout = capsys.readouterr().out.strip().splitlines()
    assert json.loads(stdout[-1]) == json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert any(line.startswith("| NDCG@10 | Recall@10 | Recall@100 | MRR@10 |") for line in stdout)
    assert result["num_queries"] == 20 and result["num_docs"] > 200
    assert result["skipped_queries"] == result["judgments_missing_doc"] == 0
    assert (result["query_prompt"], result["max_length"], result["devices"]) == ("", 256, ["cpu"])
    m = result["metrics"]
    assert set(m) == {"NDCG@10", "Recall@10", "Recall@100", "MRR@10"}
    # ~220 documents: retrieval is easy, and Recall@100 covers almost half the corpus
    assert 0.6 < m["NDCG@10"] <= 1 and m["Recall@100"] >= m["Recall@10"] > 0.6 and 0.5 < m["MRR@10"] <= 1

    # The same numbers from an independent pipeline: sentence-transformers embeddings of the
    # corpus.parquet texts, a full sort, no chunking.
    from sentence_transformers import SentenceTransformer

    data = sources.load_beir(scifact_subset)
    ref_text = pd.read_parquet(REPO / "data" / "scifact" / "corpus.parquet").set_index("id")["text"]
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    q = st.encode(data["queries"], convert_to_tensor=True, normalize_embeddings=True)
    d = st.encode([ref_text[i] for i in data["doc_ids"]], convert_to_tensor=True, normalize_embeddings=True)
    scores = (q @ d.T).tolist()
    run = {
        qid: dict(zip(data["doc_ids"], row, strict=True)) for qid, row in zip(data["query_ids"], scores, strict=True)
    }
    ref = retrieval.retrieval_metrics(data["qrels"], run)
    for name in m:
        assert m[name] == pytest.approx(ref[name], abs=1e-6), name


def test_cli_sample_is_the_training_sample_scored_whole(scifact_subset, tmp_path, capsys):
    """--max-queries / --max-docs score sources.sample_beir's sample (the one --eval-max-* takes):
    the same numbers as the sampled set written out as a BEIR folder of its own and scored whole."""
    args = ["--model", str(minilm_dir()), "--beir", str(scifact_subset), "--query-prompt", "", "--max-length", "64"]
    result = ev.main([*args, "--max-queries", "8", "--max-docs", "60", "--max-tokens", "512"])
    assert capsys.readouterr().out.count("(sample (seed 0): 8 of 20 queries, 60 of ") == 1  # the table says so
    assert (result["num_queries"], result["num_docs"]) == (8, 60)
    data, _ = sources.sample_beir(sources.load_beir(scifact_subset), 8, 60)
    qrels = [f"{q}\t{d}\t{r}" for q, rels in data["qrels"].items() for d, r in rels.items()]
    corpus = [{"_id": i, "title": "", "text": t} for i, t in zip(data["doc_ids"], data["docs"], strict=True)]
    queries = [{"_id": i, "text": t} for i, t in zip(data["query_ids"], data["queries"], strict=True)]
    whole = ev.main([*args[:3], str(write_beir(tmp_path / "sampled", corpus, queries, qrels)), *args[4:]])
    assert whole["sample"] == "full set" and whole["num_docs"] == 60
    assert result["metrics"] == pytest.approx(whole["metrics"], abs=1e-6)
    with pytest.raises(SystemExit):
        ev.main([*args, "--max-docs", "0"])


def test_cache_dir_reads_the_miners_corpus_and_resumes(tmp_path):
    """--cache-dir: the miner's embedding cache. Evaluating a teacher on the corpus it mined reads the
    miner's corpus chunks; a rerun reads everything; another query prompt embeds only the queries; and
    every way gives the metrics of an evaluation without a cache."""
    import pyarrow.parquet as pq
    from test_mine import run_mine, small_subset

    subset = small_subset(tmp_path / "SciFact", num_queries=12, num_docs=80)
    cache = tmp_path / "cache"
    common = ["--model", minilm_dir(), "--max-length", 48, "--num-negatives", 2, "--cache-dir", cache]
    assert run_mine("--data", subset, *common, "--output-dir", tmp_path / "mined") == 0
    # the same corpus, in its order, as a BEIR folder; the mined queries, judged by their positives
    ids = set(pq.read_table(subset / "corpus.parquet")["id"].to_pylist())
    corpus = [row for row in map(json.loads, open(SCIFACT / "corpus.jsonl")) if row["_id"] in ids]
    rows = pq.read_table(subset / "queries.parquet").to_pylist()
    queries = [{"_id": r["question_id"], "text": r["question"]} for r in rows]
    qrels = [f"{r['question_id']}\t{d['id']}\t1" for r in rows for d in r["pos_doc"]]
    beir = write_beir(tmp_path / "beir", corpus, queries, qrels)

    def run(cache_dir, query_prompt=""):
        return ev.evaluate_beir(
            minilm_dir(), beir, query_prompt=query_prompt, max_length=48, show_progress=False, cache_dir=cache_dir
        )

    plain = run(None)
    assert "embedding_cache" not in plain
    first, again, other = run(cache), run(cache), run(cache, query_prompt="query: ")
    read = {
        role: [r["embedding_cache"][role]["chunks_cached"] for r in (first, again, other)]
        for role in ("queries", "corpus")
    }
    # the corpus and the queries (the mined ones) are the miner's chunks; "query: " is embedded anew
    assert read == {"queries": [1, 1, 0], "corpus": [1, 1, 1]}
    assert first["metrics"] == pytest.approx(plain["metrics"], abs=1e-6)
    assert again["metrics"] == first["metrics"]
    assert other["metrics"] == pytest.approx(run(None, query_prompt="query: ")["metrics"], abs=1e-6)
    mined = {p.name.split("-")[0] for p in cache.glob("*-*") if (p / "meta.json").is_file()}
    assert mined == {"corpus", "queries"} and len(list(cache.glob("queries-*"))) == 2  # "", "query: "


def test_cli_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"qrels/test\.tsv"):
        ev.main(["--model", str(minilm_dir()), "--beir", str(tmp_path)])
    with pytest.raises(SystemExit):
        ev.main(["--model", str(minilm_dir())])  # neither --beir nor --mteb


def test_prompt_name_takes_one_subsets_stored_prompts(tmp_path):
    """An export of several subsets with different prompts has no default: --prompt-name picks one."""
    prompts = {"SciFact-query": "Q: ", "SciFact-document": "P: ", "NQ-query": "N: ", "NQ-document": ""}
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    replicas = [SimpleNamespace(max_positions=None)]
    assert ev.resolve_settings(tmp_path, replicas, None, None, None, "SciFact") == ("Q: ", "P: ", 512)
    assert ev.resolve_settings(tmp_path, replicas, None, None, None) == ("", "", 512)
    assert ev.resolve_settings(tmp_path, replicas, "x ", None, 64, "SciFact") == ("x ", "P: ", 64)
    with pytest.raises(ValueError, match=r"--prompt-name 'MSMARCO': .* prompts: \['NQ', 'SciFact'\]"):
        ev.resolve_settings(tmp_path, replicas, None, None, None, "MSMARCO")


def test_mteb_wrapper_on_mock_tasks():
    """mteb's own mock tasks (no network), on the CPU."""
    pytest.importorskip("mteb")
    from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
    from mteb.mocks.mock_tasks.sts import MockSTSTask

    replicas = ev.load_replicas(minilm_dir(), "cpu", "float32")
    scores = ev.run_mteb(replicas, [MockRetrievalTask(), MockSTSTask()], "", "", 8, 256)
    assert set(scores) == {"MockRetrievalTask", "MockSTSTask"}
    assert all(0 <= s <= 1 + 1e-6 for s in scores.values())
