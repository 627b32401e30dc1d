"""mine_negatives.py: the rule against a brute-force reference, ranks, resume, bad input, SciFact.

The reference in this file scores every (query, document) pair at once (the full matrix), ranks
each row with a stable sort and applies the rule as the README states it: positives (and kept
negatives) out, documents below margin x lowest positive score (perc) or lowest positive - margin
(abs), at most k, in rank order, ties in corpus order.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import embedding_cache
import mine_negatives as mn
import retrieval
from common import USER_ERROR_STATUS, run_cli
from tiny_models import (
    REPO,
    TwoNodes,
    deepspeed_launcher,
    free_port,
    minilm_dir,
    save_sentence_transformer,
    save_tiny_last_token_model,
    save_tiny_llama,
)

SCIFACT = REPO / "data" / "scifact"


# ----------------------------------------------------------------------------------------------
# Helpers


def reference(S: np.ndarray, pos: list[list[int]], kept: list[list[int]], k: int, margin: float, margin_type: str):
    """The rule on a full score matrix S (queries x documents): (negatives, dropped) per query."""
    out = []
    for i, row in enumerate(S):
        low = np.float32(min(row[j] for j in pos[i]))
        if margin_type == "abs":
            thr = low - np.float32(margin)
        else:  # a lowest positive <= 0: as far below it as margin x low is below a positive one
            thr = low * np.float32(margin) if low > 0 else low * np.float32(2 - margin)
        excluded = set(pos[i]) | set(kept[i])
        order = np.argsort(-row, kind="stable")  # ties: corpus order
        mined = [int(j) for j in order if j not in excluded and row[j] < thr][: max(0, k - len(kept[i]))]
        dropped = sum(1 for j in range(len(row)) if j not in excluded and row[j] >= thr)
        out.append((list(kept[i]) + mined, dropped))
    return out


def small_subset(dst: Path, num_queries: int, num_docs: int, keep_neg: bool = True) -> Path:
    """The first SciFact training queries and a corpus of their documents plus others, in the
    embed-nemotron layout; corpus ids as strings, as in data/scifact."""
    dst.mkdir(parents=True)
    queries = pq.read_table(SCIFACT / "queries.parquet").slice(0, num_queries)
    corpus = pq.read_table(SCIFACT / "corpus.parquet")
    used = {d["id"] for col in ("pos_doc", "neg_doc") for docs in queries[col].to_pylist() for d in docs}
    ids = corpus["id"].to_pylist()
    keep = [i for i, x in enumerate(ids) if x in used]
    keep += [i for i, x in enumerate(ids) if x not in used][: max(0, num_docs - len(keep))]
    pq.write_table(corpus.take(sorted(keep)), dst / "corpus.parquet")
    if not keep_neg:
        queries = queries.drop_columns(["neg_doc"])
    pq.write_table(queries, dst / "queries.parquet")
    (dst / "dataset_metadata.json").write_text((SCIFACT / "dataset_metadata.json").read_text())
    return dst


def run_mine(*args) -> int:
    return run_cli(mn.main, [str(a) for a in args])


def cached(stats: dict, t: int, role: str) -> np.ndarray:
    return embedding_cache.ChunkedRows(Path(stats["embedding"][t][role]["cache"]))[:].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The rule and the search, exact: small integer vectors make every score exact, with many ties


def make_task(n: int, N: int, rng, kept: bool, lowest: int) -> mn.Task:
    pos = [sorted(rng.choice(N, rng.integers(1, 4), replace=False).tolist()) for _ in range(n)]
    pos[0] = pos[0] + pos[0][:1]  # a duplicate in pos_doc counts once
    pos[1] = [lowest]  # query 1's positive scores lowest of all: few documents fall below it
    negs = [rng.choice(N, rng.integers(0, 4), replace=False).tolist() if kept else [] for _ in range(n)]

    def csr(lists):
        return np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64), np.array(
            [j for x in lists for j in x], np.int64
        )

    (po, pi), (no, ni) = csr(pos), csr(negs)
    return mn.Task("subset", "t", [str(j) for j in range(N)], [""] * N, [str(i) for i in range(n)], [""] * n,
                   po, pi, no, ni)  # fmt: skip


@pytest.mark.parametrize("margin_type,margin", [("perc", 0.95), ("abs", 0.25)])
@pytest.mark.parametrize("teachers", [1, 2])
@pytest.mark.parametrize("kept", [False, True])
def test_rule_equals_brute_force_with_ties(tmp_path, margin_type, margin, teachers, kept):
    rng = np.random.default_rng(7)
    n, N, D, k = 37, 211, 6, 5
    # entries in {-1, -0.5, 0, 0.5, 1}: every product and sum is exact in float32, and duplicate
    # documents (rows 0..19 repeated) make exact ties
    docs = [rng.integers(-2, 3, (N, D)).astype(np.float32) / 2 for _ in range(teachers)]
    for d in docs:
        d[100:120] = d[0:20]
    queries = [rng.integers(-2, 3, (n, D)).astype(np.float32) / 2 for _ in range(teachers)]
    S = sum(q.astype(np.float64) @ d.astype(np.float64).T for q, d in zip(queries, docs, strict=True)) / teachers
    task = make_task(n, N, rng, kept, lowest=int(np.argmin(S[1])))
    pos = [task.pos_idx[task.pos_off[i] : task.pos_off[i + 1]].tolist() for i in range(n)]
    negs = [task.neg_idx[task.neg_off[i] : task.neg_off[i + 1]].tolist() for i in range(n)]
    want = reference(S.astype(np.float32), pos, negs, k, margin, margin_type)
    # blocks smaller than the data, and a score block cut inside a query block
    cfg = mn.MineConfig(num_negatives=k, margin=margin, margin_type=margin_type, query_block=8, doc_block=23)
    res = mn.mine(task, queries, docs, cfg, torch.device("cpu"), tmp_path / "scratch")
    got = [res["neg_idx"][res["neg_off"][i] : res["neg_off"][i + 1]].tolist() for i in range(n)]
    assert got == [w[0] for w in want]
    assert res["dropped"].tolist() == [w[1] for w in want]
    assert np.allclose(res["neg_scores"], [S[i, j] for i in range(n) for j in got[i]])
    assert len(got[1]) < k and any(w[1] > 0 for w in want)  # a short list, and drops, occur
    # a mined negative's score is the search's, strictly below its query's threshold; the threshold is
    # never above the lowest positive, also where that is <= 0 (which these data contain)
    neg_q = np.repeat(np.arange(n), np.diff(res["neg_off"]))
    mined = np.ones(len(neg_q), bool)
    for i in range(n):
        mined[res["neg_off"][i] : res["neg_off"][i] + len(negs[i])] = False  # kept negatives come first
    assert (res["neg_scores"][mined] < res["threshold"][neg_q[mined]]).all()
    assert (res["threshold"] <= res["pos_min"]).all() and (res["pos_min"] < 0).any()


def test_a_query_left_without_negatives_is_said_with_the_flag_that_skips_it(tmp_path, capsys):
    # query 0's only positive is the lowest-scoring document: every other one scores above its threshold
    docs = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [-1.0, 0.0]], np.float32)
    queries = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    task = mn.Task("subset", "t", ["a", "b", "c", "d"], [""] * 4, ["q0", "q1"], [""] * 2,
                   np.array([0, 1, 2]), np.array([3, 0]), np.zeros(3, np.int64), np.zeros(0, np.int64))  # fmt: skip
    cfg = mn.MineConfig(data=str(tmp_path / "t"), num_negatives=2, margin=0.95)
    res = mn.mine(task, [queries], [docs], cfg, torch.device("cpu"), tmp_path / "scratch")
    assert np.diff(res["neg_off"]).tolist() == [0, 2] and res["threshold"][0] == np.float32(-1.0) * np.float32(1.05)
    stats = mn.summary(task, res, cfg, [])
    stats["seconds"] = {}
    mn.print_summary(stats)
    out = capsys.readouterr().out
    assert "queries left without any negative: 1 " in out and "prepare_data.py" in out and "--skip-invalid" in out
    # query 0's lowest positive scores -1: threshold -1 x (2 - 0.95), below it, and counted
    assert stats["queries_with_lowest_positive_at_or_below_0"]["count"] == 1
    assert "queries whose lowest positive scores <= 0 (threshold s - (1 - margin)|s|, not margin x s): 1" in out


def test_a_hub_teacher_is_cached_by_name_and_revision(tmp_path):
    snapshot = tmp_path / "models--org--teacher" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert embedding_cache.model_identity("org/teacher", snapshot) == "org/teacher@0123abcd"
    assert embedding_cache.model_identity("org/teacher", tmp_path / "elsewhere") == "org/teacher"


@pytest.mark.parametrize("margin_type,margin", [("abs", 2.0**-6), ("perc", 0.95)])
@pytest.mark.parametrize("teachers", [1, 2])
def test_bf16_search_decides_exactly_as_fp32(tmp_path, margin_type, margin, teachers):
    """bf16 block scores, decisions on fp32 rescores: the negatives, their order, their scores and the
    dropped counts equal the fp32 brute force. Entries are multiples of 2^-10 below 1/2 in magnitude:
    bfloat16 (8 significant bits) rounds many of them, so the bf16 scores are off, while every fp32
    product and sum is exact; few distinct values and duplicated documents give exact ties and near
    ties (2^-20 apart) at the threshold and at the k-th place."""
    rng = np.random.default_rng(11)
    n, N, D, k = 29, 300, 6, 7
    docs = [rng.integers(-511, 512, (N, D)).astype(np.float32) / 1024 for _ in range(teachers)]
    for d in docs:
        d[150:200] = d[0:50]  # exact ties
        d[200:230, 0] = d[0:30, 0] + np.float32(2.0**-10)  # near ties
    queries = [rng.integers(-511, 512, (n, D)).astype(np.float32) / 1024 for _ in range(teachers)]
    S = sum(q.astype(np.float64) @ d.astype(np.float64).T for q, d in zip(queries, docs, strict=True)) / teachers
    assert np.array_equal(S.astype(np.float32).astype(np.float64), S)  # every score is exact in fp32
    low = sum(
        torch.from_numpy(q).bfloat16().float().double().numpy()
        @ torch.from_numpy(d).bfloat16().float().double().numpy().T
        for q, d in zip(queries, docs, strict=True)
    )
    assert np.abs(low / teachers - S).max() > 1e-4  # bfloat16 really rounds these rows
    task = make_task(n, N, rng, False, lowest=int(np.argmin(S[1])))
    pos = [task.pos_idx[task.pos_off[i] : task.pos_off[i + 1]].tolist() for i in range(n)]
    want = reference(S.astype(np.float32), pos, [[] for _ in range(n)], k, margin, margin_type)
    cfg = mn.MineConfig(num_negatives=k, margin=margin, margin_type=margin_type, query_block=8, doc_block=41)
    res = mn.mine(task, queries, docs, cfg, torch.device("cpu"), tmp_path / "scratch", precision="bf16")
    got = [res["neg_idx"][res["neg_off"][i] : res["neg_off"][i + 1]].tolist() for i in range(n)]
    assert got == [w[0] for w in want]
    assert res["dropped"].tolist() == [w[1] for w in want]
    assert res["neg_scores"].tolist() == [np.float32(S[i, j]) for i in range(n) for j in got[i]]
    assert res["search"]["precision"] == "bf16" and 0 < res["search"]["pairs_rescored"] < n * N
    thr = res["threshold"][:, None].astype(np.float64)
    e = retrieval.filter_error_bound([D], [0.5 * D**0.5], [0.5 * D**0.5], retrieval.U_BF16, True)
    assert ((np.abs(S - thr) < e) & (S != thr)).any()  # near ties at the threshold: decided by the fp32 rescores
    scores = [res["neg_scores"][res["neg_off"][i] : res["neg_off"][i + 1]] for i in range(n)]
    assert any(len(x) > 1 and (np.diff(x) == 0).any() for x in scores)  # exact ties, in corpus order


# ----------------------------------------------------------------------------------------------
# One score per pair: realistic rows that fp32 does not sum exactly, decisions within ulps


def canonical_matrix(qs: list[np.ndarray], ds: list[np.ndarray]) -> np.ndarray:
    """Every pair's score from the definition the README states, written here apart from the code: per
    teacher the fp32 entries' products in float64 (exact), summed pairwise (the second half onto the
    first, zeros up to a power of two), the teachers' sums added in order, divided by their number,
    rounded once to fp32."""
    S = np.zeros((len(qs[0]), len(ds[0])))
    for q, d in zip(qs, ds, strict=True):
        w = 1 << (q.shape[1] - 1).bit_length()
        for i in range(len(q)):
            x = np.zeros((len(d), w))
            x[:, : q.shape[1]] = d.astype(np.float64) * q[i].astype(np.float64)
            while x.shape[1] > 1:
                x = x[:, : x.shape[1] // 2] + x[:, x.shape[1] // 2 :]
            S[i] += x[:, 0]
    return (S / len(qs)).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def close_calls(dims: tuple[int, ...], n: int = 24, base: int = 300, seed: int = 0):
    """Teachers' rows of widths `dims` (Gaussian, normalised: fp32 sums them inexactly) where decisions are
    close. Query i's positive is row i; its cluster (rows n + 6i ...) sits around it at several distances,
    some near the perc-0.95 threshold. Appended after `base` rows, in blocks of other shapes, per query:
    an exact duplicate and a 1-ulp variant of a cluster document, the positive scaled by 0.95 in fp32 (a
    score at the threshold within a few ulps) and its two 1-ulp variants. Returns (queries, docs, dup),
    dup[i] = (a cluster row of query i, its duplicate's row)."""
    rng = np.random.default_rng(seed)
    sigmas = np.array([0.3, 0.35, 0.4, 0.5, 0.7, 1.0])[:, None]
    qs, ds = [], []
    for D in dims:
        d = unit(rng.standard_normal((base, D)))
        for i in range(n):  # noise of norm ~sigma around the positive
            d[n + 6 * i : n + 6 * i + 6] = unit(d[i] + sigmas * rng.standard_normal((6, D)) / np.sqrt(D))
        extra = []
        for i in range(n):
            near, at = d[n + 6 * i + 3].copy(), d[i] * np.float32(0.95)
            near[0] = np.nextafter(near[0], np.float32(1))
            up, down = at.copy(), at.copy()
            up[0], down[0] = np.nextafter(at[0], np.float32(1)), np.nextafter(at[0], np.float32(-1))
            extra += [d[n + 6 * i + 2], near, at, up, down]
        ds.append(np.concatenate([d, np.stack(extra)]))
        qs.append(unit(d[:n] + 0.5 * rng.standard_normal((n, D)) / np.sqrt(D)))
    return qs, ds, [(n + 6 * i + 2, base + 5 * i) for i in range(n)]


def one_positive_task(n: int, N: int, pos: list[int]) -> mn.Task:
    none = np.zeros(n + 1, np.int64), np.zeros(0, np.int64)
    return mn.Task("subset", "t", [str(j) for j in range(N)], [""] * N, [str(i) for i in range(n)], [""] * n,
                   np.arange(n + 1), np.array(pos, np.int64), *none)  # fmt: skip


def negatives(res: dict) -> list[list[int]]:
    return [res["neg_idx"][res["neg_off"][i] : res["neg_off"][i + 1]].tolist() for i in range(len(res["neg_off"]) - 1)]


FILTER_RUNS = [  # precision, --query-block, --doc-block, fp32 GEMM output, where the corpus stays
    ("fp32", 5, 37, None, "stream"),
    ("fp32", 64, 4096, None, "stream"),
    ("bf16", 7, 41, False, "stream"),
    ("bf16", 16, 64, True, "stream"),
    ("bf16", 6, 50, False, "filter"),
]


@pytest.mark.parametrize("dims", [(64,), (4096,), (64, 1024), (1024, 64), (256, 64, 768)])
def test_one_score_whatever_the_filter_blocks_and_corpus_plan(tmp_path, monkeypatch, dims):
    """The negatives, their order, their scores, the dropped counts and the thresholds are the rule applied
    to the canonical scores, bit for bit, with the fp32 GEMM and the bf16 GEMM as the filter (bf16 or fp32
    output; the corpus streamed, or only its bf16 copy kept and the fp32 rows gathered from the host),
    whatever the blocks; one teacher, teachers of different widths in both orders, three teachers."""
    qs, ds, dup = close_calls(dims)
    n, N, k = len(qs[0]), len(ds[0]), 8
    S = canonical_matrix(qs, ds)
    assert (sum(q @ d.T for q, d in zip(qs, ds, strict=True)) / len(dims) != S).mean() > 0.2  # fp32 GEMMs differ
    thr = S[np.arange(n), np.arange(n)] * np.float32(0.95)
    assert (np.abs(S - thr[:, None]) <= 4 * np.spacing(thr[:, None])).sum() >= n  # documents within ulps of it
    want = reference(S, [[i] for i in range(n)], [[]] * n, k, 0.95, "perc")
    assert sum(a in w[0] and b in w[0] for (a, b), w in zip(dup, want, strict=True)) >= 3  # exact ties listed
    task = one_positive_task(n, N, list(range(n)))
    for precision, qb, db, out32, plan in FILTER_RUNS:
        monkeypatch.setattr(retrieval, "fp32_output_supported", lambda device, v=out32: v, raising=False)
        monkeypatch.setattr(retrieval, "corpus_plan", lambda *args, v=plan: v, raising=False)
        cfg = mn.MineConfig(num_negatives=k, margin=0.95, query_block=qb, doc_block=db)
        res = mn.mine(task, qs, ds, cfg, torch.device("cpu"), tmp_path / "scratch", precision=precision)
        run = (precision, qb, db, out32, plan)
        got = negatives(res)
        assert got == [w[0] for w in want], run
        assert res["neg_scores"].tolist() == [S[i, j] for i in range(n) for j in got[i]], run
        assert res["dropped"].tolist() == [w[1] for w in want], run
        assert res["threshold"].tolist() == thr.tolist(), run
        assert res["pos_scores"].tolist() == S[np.arange(n), np.arange(n)].tolist(), run
        search = res["search"]
        assert search["filter"] == {"fp32": "fp32 GEMM", True: "bf16 GEMM, fp32 output"}.get(
            out32 if precision == "bf16" else "fp32", "bf16 GEMM, bf16 output"
        )
        assert search["corpus_on_device"] == [plan] and 0 < search["pairs_rescored"] < n * N
        moved = search["bytes_moved_per_query_block"]
        row = sum(4 * D for D in dims)
        assert moved["query_blocks"] == len(range(0, n, qb)) and moved["first"] >= N * row
        if plan == "filter":  # later query blocks read only the rows rescoring needs
            assert moved["total"] - moved["first"] < (moved["query_blocks"] - 1) * N * row


@pytest.mark.parametrize("N,doc_block,query_block", [(371, 37, 7), (401, 50, 1), (300, 299, 30)])
def test_exact_duplicates_in_blocks_of_other_shapes_tie_by_corpus_row(N, doc_block, query_block):
    """Rows 0-29 copied to the end of the corpus, into blocks of another width (down to one column, or one
    query row: a matrix-vector product): each copy scores exactly as its original and comes right after it."""
    rng = np.random.default_rng(1)
    n, D = 30, 768
    d = unit(rng.standard_normal((N, D)))
    d[N - n :] = d[:n]
    q = unit(d[:n] + 0.6 * rng.standard_normal((n, D)) / np.sqrt(D))
    for precision in ("fp32", "bf16"):
        v, i, _, _ = retrieval.search([q], [d], 10, doc_block=doc_block, query_block=query_block, precision=precision)
        for r in range(n):
            row = i[r].tolist()
            a, b = row.index(r), row.index(N - n + r)  # both copies are in the top 10
            assert b == a + 1 and v[r, a] == v[r, b], (precision, r, row, v[r].tolist())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("margin_type,margin", [("perc", 1.0), ("abs", 0.0)])
def test_a_duplicate_of_the_positive_is_never_mined(tmp_path, precision, margin_type, margin):
    """At margin 1.0 (perc) or 0 (abs) the threshold is the positive's own score: an exact duplicate of the
    positive (appended to the corpus) scores exactly that, so it is dropped and counted, never mined."""
    qs, ds, _ = close_calls((1024,), n=30)
    n = len(qs[0])
    ds = [np.concatenate([ds[0], ds[0][:n]])]
    N = len(ds[0])
    S = canonical_matrix(qs, ds)
    want = reference(S, [[i] for i in range(n)], [[]] * n, 8, margin, margin_type)
    cfg = mn.MineConfig(num_negatives=8, margin=margin, margin_type=margin_type, query_block=7, doc_block=37)
    task = one_positive_task(n, N, list(range(n)))
    res = mn.mine(task, qs, ds, cfg, torch.device("cpu"), tmp_path / "scratch", precision=precision)
    got = negatives(res)
    assert not any(N - n + i in got[i] for i in range(n)) and (res["dropped"] >= 1).all()
    assert got == [w[0] for w in want] and res["dropped"].tolist() == [w[1] for w in want]
    assert res["neg_scores"].tolist() == [S[i, j] for i in range(n) for j in got[i]]


@pytest.mark.parametrize("dims", [(64,), (4096,), (4096, 64), (64, 4096, 512)])
def test_the_filter_error_bound_holds(dims):
    """|filter score - canonical score| <= filter_error_bound for each filter, on rows that make the error
    large: entries of one sign (the products' magnitudes add up, no cancellation) and norms far from 1."""
    rng = np.random.default_rng(3)
    qs = [np.abs(rng.standard_normal((16, D))).astype(np.float32) * 3 for D in dims]
    ds = [np.abs(rng.standard_normal((200, D))).astype(np.float32) / 5 for D in dims]
    ds[-1][:100] = unit(rng.standard_normal((100, dims[-1])))  # and signs mixed
    S = canonical_matrix(qs, ds).astype(np.float64)
    q32, d32 = [torch.from_numpy(x) for x in qs], [torch.from_numpy(x) for x in ds]
    qn, dn = retrieval.max_norms(q32), retrieval.max_norms(d32)
    for mode, u in (("fp32", 0.0), ("bf16", retrieval.U_BF16), ("bf16-fp32", retrieval.U_BF16)):
        cast = (lambda x: x.bfloat16()) if u else (lambda x: x)  # noqa: E731
        low = retrieval.block_scores([cast(x) for x in q32], [cast(x) for x in d32], mode).double().numpy()
        e = float(retrieval.filter_error_bound(dims, qn, dn, u, mode == "bf16"))
        assert np.abs(low - S).max() <= e, (mode, np.abs(low - S).max(), e)
    # the README's figures: unit rows of 4,096 dimensions
    unit_bound = lambda u, rounded: retrieval.filter_error_bound([4096], [1.0], [1.0], u, rounded)  # noqa: E731
    assert (round(unit_bound(retrieval.U_BF16, False), 4), round(unit_bound(retrieval.U_BF16, True), 4)) == (
        0.0088, 0.0128
    )  # fmt: skip
    assert round(unit_bound(0.0, False), 5) == 0.00098


def test_search_accumulates_bf16_in_fp32_and_restores_both_halves_of_the_setting(monkeypatch):
    m = torch.backends.cuda.matmul
    before = (m.allow_bf16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction_split_k)
    seen = []
    scores = getattr(retrieval, "block_scores", None)

    def spy(*args):
        seen.append(m.allow_bf16_reduced_precision_reduction)
        return scores(*args)

    monkeypatch.setattr(retrieval, "block_scores", spy, raising=False)
    q = unit(np.random.default_rng(0).standard_normal((4, 64)))
    try:
        for setting in ((False, False), (True, True)):  # (reduced precision allowed, split-K allowed)
            m.allow_bf16_reduced_precision_reduction = setting
            retrieval.search([q], [q], 2, precision="bf16")
            after = (m.allow_bf16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction_split_k)
            assert after == setting and seen.pop() is False
    finally:
        m.allow_bf16_reduced_precision_reduction = before


# ----------------------------------------------------------------------------------------------
# End to end: the CLI, real teachers, outputs ready for prepare_data.py


def test_cli_two_teachers_keep_existing_matches_reference_and_prepares(tmp_path, capsys):
    subset = small_subset(tmp_path / "raw" / "SciFact", num_queries=24, num_docs=160)
    minilm = minilm_dir()
    out = tmp_path / "mined"
    # the same model twice with different query prompts: two teachers, scores averaged
    status = run_mine("--data", subset, "--model", minilm, minilm, "--query-prompt", "", "claim: ",
                      "--num-negatives", 6, "--keep-existing", "--max-length", 96, "--chunk-size", 40,
                      "--query-block", 8, "--doc-block", 50, "--output-dir", out)  # fmt: skip
    assert status == 0, capsys.readouterr().err
    stats = json.loads((out / "SciFact" / "mining_stats.json").read_text())
    assert [t["query_prompt"] for t in stats["teachers"]] == ["", "claim: "]
    assert [t["max_length"] for t in stats["teachers"]] == [96, 96]
    search = stats["search"]  # the CPU: the fp32 GEMM as the filter, 3 query blocks of 8
    assert (search["precision"], search["filter"], search["corpus_on_device"]) == ("fp32", "fp32 GEMM", ["stream"])
    assert search["pairs_rescored_per_query"] > 0 and search["bytes_moved_per_query_block"]["query_blocks"] == 3
    unit_rows = retrieval.filter_error_bound([384, 384], [1.0, 1.0], [1.0, 1.0], 0.0, False)
    assert search["error_bound"]["unit_rows"] == unit_rows and 0 < search["error_bound"]["max_used"] < 1.01 * unit_rows
    assert stats["queries_with_lowest_positive_at_or_below_0"]["count"] == 0
    chunks = -(-stats["num_docs"] // 40)  # the second teacher reads the first one's corpus chunks: same key
    assert stats["embedding"][1]["corpus"]["chunks_cached"] == stats["embedding"][1]["corpus"]["chunks"] == chunks

    # embeddings: what BiEncoder.encode gives for the whole list at once
    from model import BiEncoder

    enc = BiEncoder.from_pretrained(str(minilm))
    corpus = pq.read_table(subset / "corpus.parquet")
    qtab = pq.read_table(subset / "queries.parquet")
    assert np.allclose(cached(stats, 0, "corpus"), enc.encode(corpus["text"].to_pylist(), max_length=96), atol=1e-5)
    assert np.allclose(
        cached(stats, 1, "queries"),
        enc.encode(qtab["question"].to_pylist(), prompt="claim: ", max_length=96),
        atol=1e-5,
    )

    # the rule, on the full matrix of the cached embeddings
    S = sum(cached(stats, t, "queries").astype(np.float64) @ cached(stats, t, "corpus").astype(np.float64).T
            for t in (0, 1)) / 2  # fmt: skip
    row = {x: i for i, x in enumerate(corpus["id"].to_pylist())}
    pos = [[row[d["id"]] for d in docs] for docs in qtab["pos_doc"].to_pylist()]
    kept = [[row[d["id"]] for d in docs] for docs in qtab["neg_doc"].to_pylist()]
    want = reference(S.astype(np.float32), pos, kept, 6, 0.95, "perc")
    mined = pq.read_table(out / "SciFact" / "queries.parquet")
    got = [[row[d["id"]] for d in docs] for docs in mined["neg_doc"].to_pylist()]
    assert mined["question_id"].to_pylist() == qtab["question_id"].to_pylist()
    assert got == [w[0] for w in want]
    assert got[0][:8] == kept[0]  # the 8 stored negatives first, as stored
    assert mined["num_dropped"].to_pylist() == [w[1] for w in want]
    scores = mined["neg_scores"].to_pylist()
    assert all(np.allclose(scores[i], [S[i, j] for j in got[i]], atol=1e-5) for i in range(len(got)))

    # ready for prepare_data.py, and the summary was printed
    import prepare_data

    prepared = tmp_path / "prepared"
    assert run_cli(prepare_data.main, ["--download-path", str(out), "--subsets", "SciFact", "--tokenizer",
                                       str(minilm), "--output-dir", str(prepared), "--num-proc", "1"]) == 0  # fmt: skip
    assert json.loads((prepared / "meta.json").read_text())["num_queries"] == 24
    assert "probably false negatives" in capsys.readouterr().out


def test_cli_jsonl_abs_margin_with_corpus_file(tmp_path, capsys):
    corpus = pq.read_table(SCIFACT / "corpus.parquet").slice(0, 120)["text"].to_pylist()
    rows = [
        {"query": f"claim about {t[:40]}", "pos": [t], "prompt": "Q:", "extra": i} for i, t in enumerate(corpus[:6])
    ]
    rows[1]["pos"].append("a positive that is not in the corpus file")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus + corpus[:3]))  # duplicates: once
    out = tmp_path / "mined"
    args = ["--data", data, "--corpus", pool, "--model", minilm_dir(), "--margin-type", "abs", "--margin", 0.05]
    assert run_mine(*args, "--num-negatives", 4, "--max-length", 64, "--output-dir", out) == 0
    lines = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [x["extra"] for x in lines] == list(range(6)) and all(x["prompt"] == "Q:" for x in lines)
    stats = json.loads((out / "train.mining_stats.json").read_text())
    assert stats["num_docs"] == 121  # 120 distinct texts + the positive that was not there
    S = cached(stats, 0, "queries") @ cached(stats, 0, "corpus").T
    pool_texts = corpus + ["a positive that is not in the corpus file"]
    pos = [[pool_texts.index(p) for p in r["pos"]] for r in rows]
    want = reference(S, pos, [[] for _ in rows], 4, 0.05, "abs")
    assert [[pool_texts.index(t) for t in x["neg"]] for x in lines] == [w[0] for w in want]
    assert all(len(x["pos_scores"]) == len(r["pos"]) and len(x["neg_scores"]) == len(x["neg"]) for x, r in
               zip(lines, rows, strict=True))  # fmt: skip
    assert all(max(x["neg_scores"]) < min(x["pos_scores"]) - 0.05 for x in lines if x["neg"])


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error, status 2, nothing written


def bad_case(tmp_path, name: str) -> tuple[list, str]:
    subset = small_subset(tmp_path / "raw" / "SciFact", num_queries=4, num_docs=20)
    q = pq.read_table(subset / "queries.parquet")
    model = minilm_dir()
    args = ["--data", subset, "--model", model]
    if name == "missing_file":
        (subset / "corpus.parquet").unlink()
        return args, "corpus.parquet: missing file"
    if name == "missing_column":
        pq.write_table(q.drop_columns(["pos_doc"]), subset / "queries.parquet")
        return args, "missing column(s) ['pos_doc']"
    if name == "missing_neg_doc_to_keep":
        pq.write_table(q.drop_columns(["neg_doc"]), subset / "queries.parquet")
        return args + ["--keep-existing"], "missing column(s) ['neg_doc']"
    if name == "id_not_in_corpus":
        pos = q["pos_doc"].to_pylist()
        pos[2] = [{"id": "no-such-doc"}]
        pq.write_table(q.set_column(q.schema.get_field_index("pos_doc"), "pos_doc", pa.array(pos, q["pos_doc"].type)),
                       subset / "queries.parquet")  # fmt: skip
        return args, "pos_doc document id 'no-such-doc' is not in"
    if name == "empty_pos":
        pos = q["pos_doc"].to_pylist()
        pos[1] = []
        pq.write_table(q.set_column(q.schema.get_field_index("pos_doc"), "pos_doc", pa.array(pos, q["pos_doc"].type)),
                       subset / "queries.parquet")  # fmt: skip
        return args, "has an empty pos_doc"
    if name == "jsonl_empty_pos":
        f = tmp_path / "x.jsonl"
        f.write_text(json.dumps({"query": "a", "pos": ["b"]}) + "\n" + json.dumps({"query": "c", "pos": []}) + "\n")
        return ["--data", f, "--model", model], "x.jsonl:2: empty 'pos'"
    if name == "teacher_without_config":
        (tmp_path / "teacher").mkdir()
        return ["--data", subset, "--model", tmp_path / "teacher"], "no config.json there"
    if name == "teacher_unloadable":
        bad = tmp_path / "teacher"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))  # no weights, no tokenizer
        return ["--data", subset, "--model", bad], f"--model {bad}: cannot load"
    if name == "prompt_count":
        return args + [model, "--query-prompt", "a: ", "b: ", "c: "], "3 prompts for 2 teachers"
    if name == "prompt_near_miss":
        teacher = save_tiny_llama(tmp_path / "teacher")
        (teacher / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "Query: "}}))
        return ["--data", subset, "--model", teacher, "--query-prompt", "Query:"], "only by whitespace"
    if name == "prompt_mixed_export":
        teacher = save_tiny_llama(tmp_path / "teacher")
        prompts = {"SciFact-query": "S: ", "NQ-query": "N: ", "document": ""}
        (teacher / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
        return ["--data", subset, "--model", teacher], "several query prompts (NQ-query, SciFact-query)"
    if name == "no_data":
        return ["--data", tmp_path / "nope", "--model", model], "no such file or folder"
    raise AssertionError(name)


BAD = ["missing_file", "missing_column", "missing_neg_doc_to_keep", "id_not_in_corpus", "empty_pos", "jsonl_empty_pos",
       "teacher_without_config", "teacher_unloadable", "prompt_count", "prompt_near_miss", "prompt_mixed_export",
       "no_data"]  # fmt: skip


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, name):
    args, message = bad_case(tmp_path, name)
    out = tmp_path / "mined"
    assert run_mine(*args, "--output-dir", out) == USER_ERROR_STATUS
    err = capsys.readouterr().err
    assert "mine_negatives.py: error: " in err and message in err and "Traceback" not in err, err
    assert not (out / "SciFact").exists() and not list(out.glob("*.jsonl"))


def test_existing_output_needs_overwrite(tmp_path, capsys):
    subset = small_subset(tmp_path / "raw" / "SciFact", num_queries=3, num_docs=12)
    out = tmp_path / "mined"
    (out / "SciFact").mkdir(parents=True)
    (out / "SciFact" / "keep.txt").write_text("x")
    assert run_mine("--data", subset, "--model", minilm_dir(), "--output-dir", out) == USER_ERROR_STATUS
    assert "--overwrite" in capsys.readouterr().err and (out / "SciFact" / "keep.txt").exists()
    args = ["--data", subset, "--model", minilm_dir(), "--output-dir", out, "--overwrite", "--max-length", 32]
    assert run_mine(*args, "--num-negatives", 2) == 0
    assert sorted(p.name for p in (out / "SciFact").iterdir()) == [
        "corpus.parquet", "dataset_metadata.json", "mining_stats.json", "queries.parquet"
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Teachers embedded as their sentence-transformers files say (the paper's teachers, e5-mistral and
# Qwen3-Embedding, are causal decoders with last-token pooling); sentence-transformers is the reference

TEACHER_TEXTS = [
    "a", "short text", "Vitamin D deficiency is associated with a higher risk of fractures in older adults.",
    "Ribosomes " * 60, "The protein folds.", "Mitochondria are the powerhouse of the cell; " * 3, "q: 42",
]  # fmt: skip


def teacher_vs_sentence_transformers(folder: Path) -> tuple[mn.Teacher, torch.Tensor]:
    """(the resolved teacher, per-text cosine between the miner's embeddings and sentence-transformers')."""
    from sentence_transformers import SentenceTransformer

    t = mn.resolve_teacher(str(folder), None, None, None)
    enc, _ = mn.load_teacher(t, "float32", torch.device("cpu"))
    ours = enc.encode(TEACHER_TEXTS, batch_size=3, max_length=t.max_length)  # packed, sorted by length
    ref = SentenceTransformer(str(folder), device="cpu").encode(TEACHER_TEXTS, batch_size=4, convert_to_tensor=True)
    return t, (ours * ref.float()).sum(-1)


def test_causal_last_token_teacher_is_embedded_as_sentence_transformers_does(tmp_path, llama_tokenizer_path):
    """A decoder with last-token pooling (e5-mistral's and Qwen3-Embedding's kind): a tiny random Qwen3
    stays causal and is pooled at each text's last token, packed; equal to sentence-transformers' padded
    batches. Made bidirectional with mean pooling (the old way) it would be another model."""
    folder = save_tiny_last_token_model(tmp_path / "qwen3_st")
    t, cos = teacher_vs_sentence_transformers(folder)
    assert (t.pooling, t.bidirectional, t.max_length) == ("lasttoken", False, 64)
    assert cos.min() > 0.99999, cos
    from model import BiEncoder

    old_way = BiEncoder.from_pretrained(str(folder)).encode(TEACHER_TEXTS, batch_size=3, max_length=64)
    new_way = mn.load_teacher(t, "float32", torch.device("cpu"))[0].encode(TEACHER_TEXTS, max_length=64)
    assert (old_way * new_way).sum(-1).min() < 0.99  # the check above can fail
    # the CLI: the cached corpus embeddings are sentence-transformers', the teacher's settings are reported
    from sentence_transformers import SentenceTransformer

    subset = small_subset(tmp_path / "raw" / "SciFact", num_queries=6, num_docs=40)
    out = tmp_path / "mined"
    assert run_mine("--data", subset, "--model", folder, "--output-dir", out, "--num-negatives", 3) == 0
    stats = json.loads((out / "SciFact" / "mining_stats.json").read_text())
    assert {k: stats["teachers"][0][k] for k in ("pooling", "bidirectional", "max_length")} == {
        "pooling": "lasttoken", "bidirectional": False, "max_length": 64
    }  # fmt: skip
    docs = pq.read_table(subset / "corpus.parquet")["text"].to_pylist()
    ref = SentenceTransformer(str(folder), device="cpu").encode(docs, batch_size=8)
    assert ((cached(stats, 0, "corpus") * ref).sum(-1) > 0.99999).all()


def test_cls_teacher_and_refused_sentence_transformers_configs(tmp_path):
    """A BERT-family teacher with CLS pooling equals sentence-transformers; what the miner cannot
    embed as the teacher's files say (max pooling, prompt tokens left out, a Dense layer) is refused."""
    folder = save_sentence_transformer(tmp_path / "minilm_cls", minilm_dir(), "cls")
    t, cos = teacher_vs_sentence_transformers(folder)
    assert (t.pooling, t.bidirectional) == ("cls", False)
    assert cos.min() > 0.99999, cos
    pooling_cfg = folder / "1_Pooling" / "config.json"
    cfg = json.loads(pooling_cfg.read_text())
    for change, message in (
        ({"pooling_mode": "max"}, "pooling max in its sentence-transformers config"),
        ({"pooling_mode": ["mean", "cls"]}, r"pooling mean\+cls"),
        ({"pooling_mode": "mean", "include_prompt": False}, "leaves the prompt's tokens out"),
    ):
        pooling_cfg.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=message):
            mn.resolve_teacher(str(folder), None, None, None)
    pooling_cfg.write_text(json.dumps(cfg))
    modules = json.loads((folder / "modules.json").read_text())
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    (folder / "modules.json").write_text(json.dumps(modules + [dense]))
    with pytest.raises(ValueError, match="Pooling -> Normalize -> Dense; supported: Transformer"):
        mn.resolve_teacher(str(folder), None, None, None)
    # all-MiniLM-L6-v2 as shipped: the old-style pooling_mode_mean_tokens flag, mean pooling
    shipped = mn.resolve_teacher(str(minilm_dir()), None, None, None)
    assert (shipped.pooling, shipped.bidirectional) == ("mean", False)


def test_llama_export_teacher_stays_bidirectional_with_mean_pooling(tmp_path, llama_tokenizer_path):
    """An export of this project (and llama-embed-nemotron-8b: model_type llama_bidirec, mean pooling
    in its sentence-transformers files) is embedded bidirectionally; a plain decoder with the same
    files keeps its causal attention, as sentence-transformers would run it."""
    import hf_files

    folder = save_tiny_llama(tmp_path / "export")
    hf_files.write_sentence_transformers(folder, 64, {"query": "", "document": ""}, 48)
    plain = mn.resolve_teacher(str(folder), None, None, None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama_bidirec"}))
    export = mn.resolve_teacher(str(folder), None, None, None)
    assert (export.pooling, export.bidirectional, export.max_length) == ("mean", True, 48)
    assert (plain.pooling, plain.bidirectional) == ("mean", False)
    enc, _ = mn.load_teacher(export, "float32", torch.device("cpu"))
    attention = [m for m in enc.modules() if hasattr(m, "is_causal")]
    assert attention and not any(m.is_causal for m in attention)


# ----------------------------------------------------------------------------------------------
# Ranks and resume (subprocesses: a tiny random Llama teacher with the real Llama-3 tokenizer)


def mine_cmd(subset: Path, teacher: Path, out: Path, *extra) -> list[str]:
    args = ["--data", subset, "--model", teacher, "--output-dir", out, "--num-negatives", 5, "--chunk-size", 16]
    return [str(a) for a in (*args, "--query-block", 8, "--doc-block", 40, "--max-length", 64, *extra)]


def env(**extra) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **extra}


def read_mined(out: Path) -> tuple[list, list]:
    t = pq.read_table(out / "SciFact" / "queries.parquet")
    return [[d["id"] for d in x] for x in t["neg_doc"].to_pylist()], t["neg_scores"].to_pylist()


@pytest.mark.slow(minutes=0.4)
def test_two_ranks_give_the_negatives_of_one(tmp_path, llama_tokenizer_path):
    """Bit for bit: 1 rank with the fp32 filter and 2 ranks with the bf16 filter and other blocks give the
    same negatives, scores, positive scores and dropped counts (one canonical score per pair)."""
    subset = small_subset(tmp_path / "raw" / "SciFact", num_queries=20, num_docs=120)
    teacher = save_tiny_llama(tmp_path / "tiny_llama")
    one = tmp_path / "one"
    assert run_mine(*mine_cmd(subset, teacher, one, "--search-precision", "fp32")) == 0
    cmd = [deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "mine_negatives.py")]
    blocks = ["--query-block", 3, "--doc-block", 17]
    two = mine_cmd(subset, teacher, tmp_path / "two", "--search-precision", "bf16", *blocks)
    res = subprocess.run(cmd + two, env=env(), capture_output=True, text=True, timeout=600, start_new_session=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    tables = [pq.read_table(out / "SciFact" / "queries.parquet") for out in (one, tmp_path / "two")]
    for col in ("neg_doc", "neg_scores", "pos_scores", "num_dropped"):
        assert tables[0][col].to_pylist() == tables[1][col].to_pylist(), col
    stats = json.loads((tmp_path / "two" / "SciFact" / "mining_stats.json").read_text())
    assert stats["world_size"] == 2 and stats["search"]["precision"] == "bf16"
    assert stats["search"]["bytes_moved_per_query_block"]["query_blocks"] == 7  # 20 queries, <= 3 a block


@pytest.mark.slow(minutes=0.3)
def test_ranks_that_cannot_share_the_cache_folder_all_stop_with_a_message(tmp_path):
    """On several nodes the cache folder must be on a shared filesystem. Two nodes with their own
    disks (two launches from two working directories, a relative --cache-dir): both ranks stop before
    any work, status 2, with the message that says what to do."""
    subset = small_subset(tmp_path / "raw" / "SciFact", num_queries=4, num_docs=20)
    nodes = TwoNodes(tmp_path / "nodes")
    args = mine_cmd(subset, tmp_path / "no_teacher", tmp_path / "out", "--cache-dir", "cache")
    for code, log in nodes.run([REPO / "mine_negatives.py", *args], env(), timeout=300):
        assert code != 0
        assert "--cache-dir cache: rank 1 on " in log and "cannot see the files rank 0" in log, log[-3000:]
        assert "filesystem that every node mounts" in log and "Traceback" not in log
    assert not (tmp_path / "out").exists()
    assert list((nodes.dirs[0] / "cache").iterdir()) == []  # rank 0's probe is removed
    assert not (nodes.dirs[1] / "cache").exists() or list((nodes.dirs[1] / "cache").iterdir()) == []


@pytest.mark.slow(minutes=0.6)
def test_killed_during_embedding_resumes_without_redoing_chunks(tmp_path, llama_tokenizer_path):
    subset = small_subset(tmp_path / "raw" / "SciFact", num_queries=20, num_docs=120)
    teacher = save_tiny_llama(tmp_path / "tiny_llama")
    out, cache = tmp_path / "mined", tmp_path / "cache"
    runner = str(REPO / "tests" / "fault_runner.py")  # mine_negatives.py with a fault injected from outside
    cmd = [sys.executable, runner, *mine_cmd(subset, teacher, out, "--cache-dir", cache)]
    fault = env(FAULT="kill_after_chunks:3", FAULT_SCRIPT="mine_negatives")  # a crash after 3 chunk files
    res = subprocess.run(cmd, env=fault, capture_output=True, text=True, timeout=600)
    assert res.returncode == -9, res.stderr[-3000:]  # SIGKILL
    assert not (out / "SciFact").exists()
    (corpus_cache,) = cache.glob("corpus-*")
    assert len(list((corpus_cache / "chunks").glob("*.npy"))) == 3  # chunk files, each whole: no temp left
    assert [f.name for f in (corpus_cache / "chunks").iterdir()] == [
        f.name for f in (corpus_cache / "chunks").glob("*.npy")
    ]
    # resumed with another number of ranks (1 crashed, 2 finish): rank 0 says which chunks are done
    launch = [
        deepspeed_launcher(),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "mine_negatives.py"),
    ]
    launch += mine_cmd(subset, teacher, out, "--cache-dir", cache)
    res = subprocess.run(launch, env=env(), capture_output=True, text=True, timeout=600, start_new_session=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stats = json.loads((out / "SciFact" / "mining_stats.json").read_text())
    corpus = stats["embedding"][0]["corpus"]
    assert stats["world_size"] == 2
    assert corpus["chunks_cached"] == 3 and corpus["chunks"] == -(-stats["num_docs"] // 16) > 3
    fresh = tmp_path / "fresh"
    assert run_mine(*mine_cmd(subset, teacher, fresh, "--cache-dir", tmp_path / "cache2")) == 0
    (n1, s1), (n2, s2) = read_mined(out), read_mined(fresh)
    assert n1 == n2 and all(np.allclose(a, b, atol=1e-5) for a, b in zip(s1, s2, strict=True))
    # a changed setting (here the prompt) is another cache entry, never the stale one
    assert run_mine(*mine_cmd(subset, teacher, out, "--cache-dir", cache, "--overwrite", "--query-prompt", "q: ")) == 0
    assert len(list(cache.glob("queries-*"))) == 2 and len(list(cache.glob("corpus-*"))) == 1


def test_half_precision_cache(tmp_path):
    subset = small_subset(tmp_path / "raw" / "SciFact", num_queries=6, num_docs=60)
    common = ["--data", subset, "--model", minilm_dir(), "--num-negatives", 4, "--max-length", 48]
    assert run_mine(*common, "--output-dir", tmp_path / "fp32") == 0
    full = json.loads((tmp_path / "fp32" / "SciFact" / "mining_stats.json").read_text())
    _, s32 = read_mined(tmp_path / "fp32")
    for dtype, stored, atol in (("float16", np.float16, 2e-3), ("bfloat16", np.int16, 1e-2)):  # bfloat16: its bits
        out = tmp_path / dtype
        assert (
            run_mine(*common, "--output-dir", out, "--embedding-dtype", dtype, "--cache-dir", tmp_path / "cache") == 0
        )
        stats = json.loads((out / "SciFact" / "mining_stats.json").read_text())
        raw = embedding_cache.ChunkedRows(Path(stats["embedding"][0]["corpus"]["cache"]))[:]
        assert raw.dtype == stored
        assert np.allclose(retrieval.as_float(raw, "cpu").numpy(), cached(full, 0, "corpus"), atol=atol)
        _, s16 = read_mined(out)
        assert all(np.allclose(a[:1], b[:1], atol=2 * atol) for a, b in zip(s32, s16, strict=True) if a and b)
