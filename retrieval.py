"""Exact retrieval and its metrics, shared by evaluate.py, mine_negatives.py and the evaluation during
training: a blockwise top-k search that never holds the (queries x corpus) score matrix, with optional
thresholds, exclusions and several teachers (the miner's rule), and NDCG / Recall / MRR as BEIR scores
them."""

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from common import UserError

METRICS = ("NDCG@10", "Recall@10", "Recall@100", "MRR@10")
TOP_K = 100  # documents retrieved per query: the largest cutoff in METRICS

# ----------------------------------------------------------------------------------------------
# Metrics (pure functions on dicts, as BEIR passes them to pytrec_eval)


def ranked(scores: dict[str, float]) -> list[str]:
    """Document ids by score, highest first; ties by document id, descending, as trec_eval does."""
    return [d for d, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def ndcg_at_k(ranking: list[str], rels: dict[str, int], k: int) -> float:
    """nDCG@k with gain = relevance score and a log2(rank + 1) discount; ideal DCG from the qrels."""
    dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking: list[str], rels: dict[str, int], k: int) -> float:
    """Relevant documents in the top k / all relevant documents of the query."""
    relevant = {d for d, r in rels.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def mrr_at_k(ranking: list[str], rels: dict[str, int], k: int) -> float:
    """1 / rank of the first relevant document in the top k, 0 if there is none."""
    for i, d in enumerate(ranking[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def retrieval_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """NDCG@10, Recall@10, Recall@100 and MRR@10 averaged over the queries in `qrels`.

    qrels: {query id: {doc id: relevance}}, relevance > 0 = relevant (0 = judged not relevant).
    run: {query id: {doc id: score}}, the retrieved documents with their scores.
    A query in qrels that is missing from the run, or that has no relevant document, scores 0
    (it still counts in the average); queries in the run but not in qrels are ignored.
    """
    if not qrels:
        raise UserError("no queries with relevance judgments to evaluate")
    totals = dict.fromkeys(METRICS, 0.0)
    for q, rels in qrels.items():
        ranking = ranked(run.get(q, {}))
        totals["NDCG@10"] += ndcg_at_k(ranking, rels, 10)
        totals["Recall@10"] += recall_at_k(ranking, rels, 10)
        totals["Recall@100"] += recall_at_k(ranking, rels, 100)
        totals["MRR@10"] += mrr_at_k(ranking, rels, 10)
    return {name: total / len(qrels) for name, total in totals.items()}


def build_run(
    query_ids: list[str], doc_ids: list[str], scores: torch.Tensor, idx: torch.Tensor, k: int
) -> dict[str, dict[str, float]]:
    """Top-k results per query as {query id: {doc id: score}}, without the document whose id is
    the query's own (BEIR's ignore_identical_ids), which is why search asks for k + 1. idx -1: no
    document (a corpus smaller than k)."""
    run = {}
    for q, row_scores, row_idx in zip(query_ids, scores.tolist(), idx.tolist(), strict=True):
        hits = [(doc_ids[j], s) for s, j in zip(row_scores, row_idx, strict=True) if j >= 0 and doc_ids[j] != q]
        run[q] = dict(hits[:k])
    return run


# ----------------------------------------------------------------------------------------------
# Search: blocks of queries x blocks of the corpus, a running top-k


def as_float(block: np.ndarray, device) -> torch.Tensor:
    """Stored rows -> float32 on the device (bfloat16 is stored as its int16 bits)."""
    x = torch.from_numpy(np.array(block))  # a copy: the cache is mapped read-only
    if x.dtype == torch.int16:
        x = x.view(torch.bfloat16)
    return x.to(device).float()


def topk_first(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row by value, ties broken by the lower column: (values, columns), best first.

    torch.topk picks among equal values arbitrarily; here the set is exact (the boundary value's
    first occurrences) and the order is (value descending, column ascending).
    """
    k = min(k, s.shape[1])
    vals, cols = s.topk(k, dim=1)
    kth = vals[:, -1:]
    eq_total = (s == kth).sum(1)
    eq_taken = (vals == kth).sum(1)
    ragged = torch.nonzero(eq_total > eq_taken).flatten()  # a tie at the boundary: pick the first columns
    if len(ragged):
        sub = s[ragged]
        gt = sub > kth[ragged]
        eq = sub == kth[ragged]
        need = k - gt.sum(1, keepdim=True)
        take = gt | (eq & (eq.cumsum(1, dtype=torch.int32) <= need))
        cols[ragged] = take.nonzero()[:, 1].view(len(ragged), k)
        vals[ragged] = sub.gather(1, cols[ragged])
    order = torch.argsort(cols, dim=1)  # columns ascending, then a stable sort by value
    vals, cols = vals.gather(1, order), cols.gather(1, order)
    order = torch.argsort(vals, dim=1, descending=True, stable=True)
    return vals.gather(1, order), cols.gather(1, order)


BF16_UNIT_ROUNDOFF = 2.0**-8  # bfloat16 keeps 8 significant bits: |fl(x) - x| <= 2^-8 |x|
FP32_UNIT_ROUNDOFF = 2.0**-24


def bf16_score_error(dim: int, q_norm: float, d_norm: float) -> float:
    """e: a bound on |low - exact| for one teacher's score of a query row and a document row whose norms
    are at most q_norm and d_norm, where exact is the fp32 dot product of the fp32 rows and low the
    product of the rows rounded to bfloat16, accumulated in fp32 and rounded to bfloat16 (a bf16 GEMM).

    With u = 2^-8, v = 2^-24 and g = D v / (1 - D v) (the bound on a D-term fp32 sum, Higham 3.1),
    and N = q_norm x d_norm (Cauchy-Schwarz bounds every sum of |q_i d_i| by it):
      rounding q and d to bf16             |q~.d~ - q.d| <= (2u + u^2) N
      fp32 accumulation of q~.d~           <= g (1 + u)^2 N
      the fp32 reference's own rounding     <= g N
      rounding the result to bf16          <= u (1 + u)^2 (1 + g) N
    e = N [2u + u^2 + g (1 + u)^2 + g + u (1 + u)^2 (1 + g)], about 0.0123 for unit rows of 4,096 dims.
    The mean over T teachers keeps the largest e plus the fp32 rounding of the mean (2 v N, added)."""
    u, v = BF16_UNIT_ROUNDOFF, FP32_UNIT_ROUNDOFF
    g = dim * v / (1 - dim * v)
    n = q_norm * d_norm
    return n * (2 * u + u * u + g * (1 + u) ** 2 + g + u * (1 + u) ** 2 * (1 + g) + 2 * v)


def exact_pair_scores(q: list[torch.Tensor], d: list[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor):
    """fp32 scores of the (rows[j], cols[j]) pairs of a block: the mean over teachers of the fp32 dot
    product, computed in pieces of at most 2^24 multiply-adds."""
    out = torch.zeros(len(rows), device=rows.device)
    step = max(1, (1 << 24) // q[0].shape[1])
    for a in range(0, len(rows), step):
        r, c = rows[a : a + step], cols[a : a + step]
        total = (q[0][r] * d[0][c]).sum(1)
        for t in range(1, len(q)):
            total += (q[t][r] * d[t][c]).sum(1)
        out[a : a + step] = total / len(q) if len(q) > 1 else total
    return out


@torch.no_grad()
def search(
    qs: list[np.ndarray],
    ds: list[np.ndarray],
    k: int,
    *,
    rows: np.ndarray | None = None,
    thr: np.ndarray | None = None,
    excl_off: np.ndarray | None = None,
    excl_idx: np.ndarray | None = None,
    query_block: int = 16384,
    doc_block: int = 16384,
    device="cpu",
    precision: str = "fp32",
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """For the queries `rows` (ascending; default all): the top k documents by combined score (the mean
    over teachers: qs[t] and ds[t] are teacher t's query and document embeddings, stored rows of
    as_float) that are not excluded (the miner's positives and kept negatives) and score below the
    query's threshold (default none), (value desc, row asc), and how many non-excluded documents
    scored at or above the threshold. thr and the exclusions (CSR: excl_off, excl_idx) are given in the
    order of `rows`.

    precision "fp32": every score is the fp32 matrix product. "bf16": blocks are scored by a bfloat16
    matrix product (tensor cores on a GPU), and every decision is taken on fp32 scores: with e the
    bound on the bf16 score's error (bf16_score_error), a document is dropped outright when
    low - e >= threshold, is no candidate when low + e < threshold... and can still be in the top k;
    it is rescored in fp32 when low is within e of the threshold, or low + e reaches the k-th best
    lower bound known (the k-th largest low - e among sure candidates, or the k-th fp32 score kept
    so far). Every other document provably has k documents strictly above it. The negatives, their
    order, their scores and the dropped counts are those of fp32 scores of the pairs.

    Memory on the device: query_block x D x teachers, doc_block x D x teachers, one
    (score_rows x doc_block) score block; never the (queries x corpus) matrix.
    Returns scores (n, k) (-inf where none), doc rows (n, k) (-1), dropped (n,), pairs rescored in fp32.
    """
    if rows is None:
        rows = np.arange(qs[0].shape[0])
    if thr is None:
        thr = np.full(len(rows), np.inf, np.float32)
    if excl_off is None:
        excl_off, excl_idx = np.zeros(len(rows) + 1, np.int64), np.zeros(0, np.int64)
    n, N, T = len(rows), ds[0].shape[0], len(qs)
    D = ds[0].shape[1]
    k_eff = min(k, N)
    lowp = precision == "bf16"
    out_v = np.full((n, k), -np.inf, np.float32)
    out_i = np.full((n, k), -1, np.int64)
    out_drop = np.zeros(n, np.int64)
    rescored = 0
    score_rows = max(1, min(query_block, (1 << 24) // max(doc_block, 1)))  # <= 64 MB of fp32 scores
    blocks = [(a, min(a + query_block, n)) for a in range(0, n, query_block)]
    bar = tqdm(total=len(blocks) * math.ceil(N / doc_block), desc="search", unit="block", disable=not show_progress)
    kept_blocks = {}
    keep_corpus = corpus_fits(ds, device, lowp) and len(blocks) > 1

    def corpus_block(c0: int, c1: int):
        """Corpus rows [c0, c1) on the device: fp32, bf16 (or the same fp32) and the largest row norm.
        Kept for the next query blocks when the whole corpus fits on the device (corpus_fits)."""
        if c0 in kept_blocks:
            return kept_blocks[c0]
        d = [as_float(x[c0:c1], device) for x in ds]
        block = (
            d,
            [x.to(torch.bfloat16) for x in d] if lowp else d,
            torch.stack([x.norm(dim=1).max() for x in d]).max() if lowp else 0.0,
        )
        if keep_corpus:
            kept_blocks[c0] = block
        return block

    reduced = getattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", None)
    if reduced is not None:  # the bound assumes fp32 accumulation inside the bf16 GEMM
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        for a, b in blocks:
            r = rows[a:b]
            q = [as_float(x[r], device) for x in qs]
            q16 = [x.to(torch.bfloat16) for x in q] if lowp else q
            # row norms stay on the device (no host synchronisation inside the block loops)
            q_norm = torch.stack([x.norm(dim=1).max() for x in q]).max() if lowp and len(r) else 0.0
            th = torch.from_numpy(thr[a:b]).to(device).unsqueeze(1)
            # excluded (local row, doc) pairs of this query block, by doc for the per-block selection
            er = np.repeat(np.arange(len(r)), np.diff(excl_off[a : b + 1]))
            ec = excl_idx[excl_off[a] : excl_off[b]]
            best_v = torch.full((len(r), k_eff), -math.inf, device=device)
            best_i = torch.full((len(r), k_eff), -1, dtype=torch.long, device=device)
            dropped = torch.zeros(len(r), dtype=torch.long, device=device)
            for c0 in range(0, N, doc_block):
                c1 = min(c0 + doc_block, N)
                d, d16, d_norm = corpus_block(c0, c1)
                e = bf16_score_error(D, q_norm, d_norm) if lowp else 0.0
                sel = (ec >= c0) & (ec < c1)
                pr = torch.from_numpy(er[sel]).to(device)
                pc_ = torch.from_numpy(ec[sel] - c0).to(device)
                for s0 in range(0, len(r), score_rows):
                    s1 = min(s0 + score_rows, len(r))
                    s = (q16[0][s0:s1] @ d16[0].T).float()  # (rows, docs)
                    for t in range(1, T):
                        s += (q16[t][s0:s1] @ d16[t].T).float()
                    if T > 1:
                        s /= T
                    m = (pr >= s0) & (pr < s1)
                    s[pr[m] - s0, pc_[m]] = -math.inf  # never a negative, never counted as dropped
                    if lowp:
                        s, n_rescored = rescore(s, e, th[s0:s1], best_v[s0:s1, -1:], k_eff, q, d, s0, dropped[s0:s1])
                        rescored += n_rescored
                    else:
                        above = s >= th[s0:s1]
                        dropped[s0:s1] += above.sum(1)
                        s.masked_fill_(above, -math.inf)
                    v, i = topk_first(s, k_eff)
                    # earlier blocks hold lower rows: a stable sort keeps ties in corpus order
                    v = torch.cat([best_v[s0:s1], v], 1)
                    i = torch.cat([best_i[s0:s1], i + c0], 1)
                    order = torch.argsort(v, dim=1, descending=True, stable=True)[:, :k_eff]
                    best_v[s0:s1], best_i[s0:s1] = v.gather(1, order), i.gather(1, order)
                bar.update()
            out_v[a:b, :k_eff] = best_v.cpu().numpy()
            out_i[a:b, :k_eff] = best_i.cpu().numpy()
            out_drop[a:b] = dropped.cpu().numpy()
    finally:
        if reduced is not None:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
    bar.close()
    out_i[~np.isfinite(out_v)] = -1
    return out_v, out_i, out_drop, rescored


def corpus_fits(ds: list, device, lowp: bool) -> bool:
    """Can the corpus stay on the device for the whole search (fp32, plus bf16 copies in bf16 mode),
    within half of the free memory? On the CPU it is read again for each query block instead."""
    if torch.device(device).type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    need = sum(x.shape[0] * x.shape[1] for x in ds) * (4 + (2 if lowp else 0))
    return need <= free // 2


def rescore(low, e, th, kth_kept, k, q, d, s0, dropped) -> tuple[torch.Tensor, int]:
    """One bf16 score block -> the block of fp32 scores that decide (search's "bf16" precision): -inf for
    every document that is dropped, excluded or provably outside the top k; `dropped` counts the
    dropped ones. low: (rows, docs) bf16 scores (-inf: excluded); th: (rows, 1) thresholds;
    kth_kept: (rows, 1) the k-th fp32 score kept from earlier blocks (-inf while fewer)."""
    finite = torch.isfinite(low)
    sure_above = finite & (low - e >= th)
    sure_below = finite & (low + e < th)
    near_threshold = finite & ~sure_above & ~sure_below
    dropped += sure_above.sum(1)
    # A lower bound on the k-th best fp32 score below the threshold: k sure candidates score at least
    # their low - e, and the k kept ones at least kth_kept.
    bound = torch.where(sure_below, low - e, -math.inf)
    kk = min(k, bound.shape[1])
    kth_here = bound.topk(kk, dim=1).values[:, -1:] if kk == k else torch.full_like(kth_kept, -math.inf)
    floor = torch.maximum(kth_here, kth_kept)
    need = near_threshold | (sure_below & (low + e >= floor))
    rows, cols = need.nonzero(as_tuple=True)
    exact = exact_pair_scores(q, d, rows + s0, cols)
    out = torch.full_like(low, -math.inf)
    out[rows, cols] = exact
    above = out >= th  # only rescored pairs are finite here
    dropped += above.sum(1)
    return out.masked_fill_(above, -math.inf), len(rows)
