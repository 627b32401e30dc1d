"""data/README.md's published numbers, reproduced on the whole of SciFact with the untouched
all-MiniLM-L6-v2 (256 tokens, no prompt): evaluate.py's baseline metrics on the test split, and the
hard negatives mine_negatives.py mines for the training queries, equal to the shipped ones.

Both embed the same 5,183 documents with the same model and settings, so they share one embedding
cache (`cache`, a module fixture; the cache is embedding_cache.py, which both scripts use): the first
test embeds the corpus (minutes on 2 CPU cores), the second reads it. Run alone, a test embeds it.
"""

import json

import pyarrow.parquet as pq
import pytest
from test_mine import run_mine

import evaluate as ev
from tiny_models import REPO, minilm_dir

pytestmark = pytest.mark.slow(minutes=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("minilm_scifact_cache")


def test_scifact_baseline_untouched_minilm(cache):
    """SciFact test: 300 queries, 5,183 documents."""
    scifact = REPO / "data" / "scifact-beir"
    result = ev.evaluate_beir(minilm_dir(), scifact, query_prompt="", show_progress=False, cache_dir=cache)
    assert result["max_length"] == 256 and result["num_queries"] == 300 and result["num_docs"] == 5183
    assert result["metrics"]["NDCG@10"] == pytest.approx(0.6497, abs=5e-4)
    assert result["metrics"]["Recall@100"] == pytest.approx(0.9250, abs=5e-4)


def test_minilm_on_scifact_reproduces_the_shipped_negatives(tmp_path, cache):
    """The settings of data/README.md: 256 tokens, raw queries, TopK-PercPos 95%, 8 per query."""
    scifact, out = REPO / "data" / "scifact", tmp_path / "mined"
    args = ["--model", minilm_dir(), "--num-negatives", 8, "--output-dir", out, "--cache-dir", cache]
    assert run_mine("--data", scifact, *args) == 0
    stats = json.loads((out / "scifact" / "mining_stats.json").read_text())
    assert stats["teachers"][0]["max_length"] == 256 and stats["teachers"][0]["query_prompt"] == ""
    shipped = [[d["id"] for d in x] for x in pq.read_table(scifact / "queries.parquet")["neg_doc"].to_pylist()]
    mined = [[d["id"] for d in x] for x in pq.read_table(out / "scifact" / "queries.parquet")["neg_doc"].to_pylist()]
    same = sum(a == b for a, b in zip(shipped, mined, strict=True)) / len(shipped)
    print(f"SciFact: mined negatives equal to the shipped ones for {same:.2%} of {len(shipped)} queries")
    assert same >= 0.99
    assert stats["queries_with_fewer_than_k"] == 0
