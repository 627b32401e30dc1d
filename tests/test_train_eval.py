"""train_eval.py's pieces that need no DeepSpeed launch: the merge of rank-local top-k lists, the
fixed sample, the settings the export gets, the checks before training, and --keep-best's pruning.
The evaluation inside a 2-rank ZeRO-3 run is tested in test_train.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import train_biencoder as tb
import train_eval as te
from common import UserError
from retrieval import search
from sources import load_beir, sample_beir
from tiny_models import REPO

SCIFACT_BEIR = REPO / "data" / "scifact-beir"


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_merged_rank_local_top_k_equals_one_search_with_ties(world):
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(9, 8, generator=g), dim=1).numpy()
    d = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1).numpy()
    d[[5, 17, 40, 41]] = d[3]  # exact ties: one search orders them by corpus row
    k = 12
    want_v, want_i, _, _ = search([q], [d], k, doc_block=7)
    owner = np.random.default_rng(world).integers(0, world, len(d))  # any split of the corpus over ranks
    parts = [te.local_top_k(q, d[owner == r], np.flatnonzero(owner == r), k, "cpu") for r in range(world)]
    v, i = te.merge_top_k(parts, k)
    assert np.array_equal(i, want_i)
    assert np.array_equal(v, want_v)  # the canonical score: other block shapes change no bit
    tied = [3, 5, 17, 40, 41]  # the tie is in some query's top k, in corpus order
    assert any(tied == row[row.index(3) : row.index(3) + 5] for row in i.tolist() if 3 in row)


def test_a_rank_without_documents_and_a_corpus_smaller_than_k():
    q, d = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)[:2]
    parts = [
        te.local_top_k(q, d, np.array([0, 1]), 5, "cpu"),
        te.local_top_k(q, d[:0], np.zeros(0, np.int64), 5, "cpu"),
    ]
    v, i = te.merge_top_k(parts, 5)
    assert i[0].tolist() == [0, 1, -1, -1, -1] and np.isneginf(v[:, 2:]).all()


def test_sample_is_fixed_and_keeps_every_judged_document():
    full = load_beir(SCIFACT_BEIR)
    a, note = sample_beir(full, 50, 400)
    b, _ = sample_beir(full, 50, 400)
    assert a == b and "50 of 300 queries" in note and "400 of 5183 documents" in note
    assert len(a["query_ids"]) == 50 and len(a["doc_ids"]) == 400
    judged = {d for q in a["query_ids"] for d in full["qrels"][q]}
    assert judged <= set(a["doc_ids"])
    positions = [full["doc_ids"].index(d) for d in a["doc_ids"]]
    assert positions == sorted(positions)  # corpus order kept: ties break as in the full corpus
    assert sample_beir(full, None, None) == (full, "full set")


def test_export_settings_are_what_evaluate_reads_from_the_export():
    meta = {
        "query_max_len": 64,
        "passage_max_len": 128,
        "subsets": [{"name": "SciFact", "query_prompt": "Instruct: x\nQuery: ", "passage_prompt": ""}],
    }
    llama = type("C", (), {"model_type": "llama", "max_position_embeddings": 100})()
    bert = type("C", (), {"model_type": "bert", "max_position_embeddings": 100})()
    assert te.export_settings(meta, llama, {}) == ("Instruct: x\nQuery: ", "", 128)
    assert te.export_settings(meta, bert, {}) == ("Instruct: x\nQuery: ", "", 100)  # absolute positions end
    assert te.export_settings(meta, llama, {"prompt_name": "SciFact", "max_length": 32})[2] == 32
    assert te.export_settings(meta, llama, {"query": "q: ", "document": "d: "})[:2] == ("q: ", "d: ")
    two = {**meta, "subsets": [*meta["subsets"], {"name": "B", "query_prompt": "other", "passage_prompt": ""}]}
    assert te.export_settings(two, llama, {})[0] == ""  # the subsets differ: the export has no default
    with pytest.raises(UserError, match="prompt_name"):
        te.export_settings(meta, llama, {"prompt_name": "nope"})


def test_bad_evaluation_options_stop_before_training(tmp_path):
    no_qrels = tmp_path / "no_qrels"
    no_qrels.mkdir()
    for name in ("corpus.jsonl", "queries.jsonl"):
        (no_qrels / name).write_text((SCIFACT_BEIR / name).read_text())
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"elsewhere": {"query": "q: "}}))
    cases = [
        (["--eval-beir", no_qrels], "qrels/test.tsv"),
        (["--eval-beir", SCIFACT_BEIR, "--keep-best", "eval/scifact/ndcg@10"], "eval/scifact-beir/ndcg@10"),
        (["--keep-best", "eval/x/loss"], "--keep-best eval/x/loss"),
        (["--eval-every", "5"], "need --eval-beir or --eval-data"),
        (["--eval-data", tmp_path], "meta.json missing"),
        (["--eval-beir", SCIFACT_BEIR, SCIFACT_BEIR], "two folders named"),
        (["--eval-beir", SCIFACT_BEIR, "--eval-prompts", prompts], "no --eval-beir folder named ['elsewhere']"),
        (["--eval-every", "0"], "--eval-every must be >= 1"),
    ]
    for extra, words in cases:
        with pytest.raises(UserError) as e:
            te.check_eval_options(tb.parse_config([str(a) for a in extra]))
        assert words in str(e.value), (extra, str(e.value))
    te.check_eval_options(
        tb.parse_config(["--eval-beir", str(SCIFACT_BEIR), "--keep-best", "eval/scifact-beir/mrr@10"])
    )


def test_keep_best_compares_in_the_metric_direction():
    assert te.better("eval/a/ndcg@10", 0.5, None) and te.better("eval/a/ndcg@10", 0.6, 0.5)
    assert not te.better("eval/a/ndcg@10", 0.5, 0.5)  # a tie keeps the earlier checkpoint
    assert te.better("eval/a/loss", 0.4, 0.5) and not te.better("eval/a/loss", 0.6, 0.5)


def test_pruning_never_removes_the_best_checkpoint(tmp_path):
    for step in range(1, 7):
        tag = tmp_path / f"step_{step:08d}"
        tag.mkdir()
        (tag / "train_state.json").write_text("{}")
    tb.prune_checkpoints(tmp_path, "step_00000006", keep=1, best="step_00000002")
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["step_00000002", "step_00000006"]
    tb.prune_checkpoints(tmp_path, "step_00000006", keep=1)
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["step_00000006"]


class FakeEngine(torch.nn.Module):
    """Stands in for the DeepSpeed engine: a packed forward -> one unit vector per text (a hash of its tokens)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.module = self
        self.encoder = torch.nn.Module()
        self.encoder.config = type("Config", (), {"hidden_size": hidden})()

    def forward(self, input_ids, cu_seqlens):
        out = []
        for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
            g = torch.Generator().manual_seed(int(input_ids[a:b].sum()) * 1000 + (b - a))
            out.append(torch.randn(self.encoder.config.hidden_size, generator=g))
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def test_eval_keeps_the_corpus_embeddings_off_the_device(monkeypatch):
    """The largest tensor the BEIR evaluation makes does not grow with the corpus: embeddings leave the
    device after each forward and the search streams blocks of the host copy (an MS MARCO-sized corpus
    would not fit beside the model states). Counted over every torch operation, against a corpus of
    N x D = 12 x the search's document block."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    Q, N, D, doc_block = 40, 12000, 16, 1000
    monkeypatch.setattr(te, "search", lambda *a, **kw: search(*a, **{**kw, "doc_block": doc_block}))
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, 1000, rng.integers(1, 5)).tolist() for _ in range(Q + N)]
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(Q)}
    s = te.BeirSet("fake", [f"q{i}" for i in range(Q)], [f"d{i}" for i in range(N)], qrels, tokens, "fake")
    largest = [0]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            largest[0] = max([largest[0], *sizes])
            return out

    with Watch():
        parts = list(te.embed_share(FakeEngine(D), tokens, 64, "cpu"))
        metrics = te.beir_metrics(FakeEngine(D), s, 64, "cpu")
    idx = np.concatenate([i for i, _ in parts])
    emb = np.concatenate([e for _, e in parts])
    bound = Q * doc_block * 2  # a score block and its copies, or a block of documents
    assert largest[0] <= bound < N * D / 2, (largest[0], bound)
    assert isinstance(emb, np.ndarray) and emb.shape == (Q + N, D) and sorted(idx) == list(range(Q + N))
    assert 0 <= metrics["ndcg@10"] <= 1
