"""Exact retrieval and its metrics, shared by evaluate.py, mine_negatives.py and the evaluation during
training: a blockwise top-k search that never holds the (queries x corpus) score matrix, with optional
thresholds, exclusions and several teachers (the miner's rule), and NDCG / Recall / MRR as BEIR scores
them."""

import math
from contextlib import contextmanager

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
# One score per pair: every decision (threshold, rank, reported score) is taken on it


def as_float(block: np.ndarray, device) -> torch.Tensor:
    """Stored rows -> float32 on the device (bfloat16 is stored as its int16 bits)."""
    x = torch.from_numpy(np.array(block))  # a copy: the cache is mapped read-only
    if x.dtype == torch.int16:
        x = x.view(torch.bfloat16)
    return x.to(device).float()


def fixed_order_sum(x: torch.Tensor) -> torch.Tensor:
    """Row sums of a (P, D) float64 tensor, added in one order on every device: zero columns up to a power
    of two (exact), then the second half added onto the first until one column is left (a pairwise tree).
    Only elementwise IEEE additions, each correctly rounded: no reduction kernel, whose order depends on
    the device, the thread count and the vector width."""
    w = 1 << max(0, (x.shape[1] - 1).bit_length())
    if w != x.shape[1]:
        x = torch.nn.functional.pad(x, (0, w - x.shape[1]))
    while w > 1:
        w //= 2
        x = x[:, :w] + x[:, w:]
    return x[:, 0]


PIECE = 1 << 23  # float64 elements per piece of canonical_scores: 64 MB
SCORE_BLOCK = 1 << 24  # fp32 scores of one (query rows x corpus block) score block at most: 64 MB


def canonical_scores(q: list[torch.Tensor], d: list[torch.Tensor], r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """THE score of the pairs (q row r[j], d row c[j]), q[t] and d[t] teacher t's fp32 rows (any device):
    per teacher the products of the fp32 entries in float64 (a product of two fp32 numbers is exact
    there) summed by fixed_order_sum; the teachers' sums added in float64 in teacher order and divided
    by their number; rounded once to fp32. Returns (len(r),) float32.

    Why this definition: it depends on the two rows only, so the block shape, the batch, the rank count
    and the device cannot change it (a GEMM's or a torch.sum's order depends on all of them), and it
    equals the exact mean of the dot products rounded to fp32 except where that lies within
    ceil(log2 D) 2^-53 x |q| |d| of a rounding boundary."""
    out = torch.empty(len(r), dtype=torch.float32, device=r.device)
    step = max(1, PIECE // (1 << max(0, (max(x.shape[1] for x in q) - 1).bit_length())))
    for a in range(0, len(r), step):
        rr, cc = r[a : a + step], c[a : a + step]
        total = None
        for qt, dt in zip(q, d, strict=True):
            s = fixed_order_sum(qt[rr].double().mul_(dt[cc]))  # fp32 x fp32 in float64: exact
            total = s if total is None else total + s
        out[a : a + step] = (total / len(q) if len(q) > 1 else total).float()
    return out


def pair_scores(qs: list, ds: list, rows: np.ndarray, cols: np.ndarray, device="cpu") -> np.ndarray:
    """canonical_scores of given (query row, document row) pairs of stored rows, computed on `device`
    (the same numbers on every device), 8,192 pairs at a time."""
    out = np.empty(len(rows), np.float32)
    for s in range(0, len(rows), 8192):
        r, c = rows[s : s + 8192], cols[s : s + 8192]
        j = torch.arange(len(r), device=device)
        q, d = [as_float(x[r], device) for x in qs], [as_float(x[c], device) for x in ds]
        out[s : s + 8192] = canonical_scores(q, d, j, j).cpu().numpy()
    return out


# ----------------------------------------------------------------------------------------------
# The filter: a GEMM whose error against the canonical score is bounded


U_BF16, U_TF32, U_FP32 = 2.0**-8, 2.0**-11, 2.0**-24  # unit roundoffs: 8, 11 and 24 significant bits
FILTERS = {
    "fp32": "fp32 GEMM",
    "bf16": "bf16 GEMM, bf16 output",
    "bf16-fp32": "bf16 GEMM, fp32 output",
}


def filter_error_bound(dims, q_norms, d_norms, input_roundoff: float, output_rounded: bool):
    """e >= |low - c| for every pair of rows whose norms are at most q_norms[t] and d_norms[t] (teacher t,
    dims[t] dimensions), c the canonical score and low the filter's: per teacher a GEMM of the rows
    rounded with unit roundoff `input_roundoff` (0: fp32 as stored; U_TF32; U_BF16), accumulated in fp32,
    its output rounded to bfloat16 when output_rounded; the teachers' results added in fp32 and divided
    by their number in fp32. Norms: floats or tensors (e is then a tensor on their device).

    Per teacher, with N = q_norm x d_norm (Cauchy-Schwarz: every sum of |q_i d_i| is at most N), u the
    input roundoff and P = (1 + u)^2 N (the sum of |products| of the rounded rows):
      inputs rounded                   (2u + u^2) N
      fp32 accumulation                g P,  g = 2 D 2^-23 / (1 - 2 D 2^-23)
      output rounded to bfloat16       2^-8 (1 + g) P                      (output_rounded only)
      subnormals flushed (FTZ / DAZ)   D 2^-124 (1 + q_norm) (1 + d_norm)
      the canonical float64 sum        ceil(log2 D) 2^-52 N
    g counts the accumulation as tensor cores do it (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior
    of NVIDIA tensor cores", PeerJ CS 2021): a block FMA adds n products to the accumulator after aligning
    them to the largest addend, TRUNCATING the bits shifted out, and truncates its result. Each step loses
    less than (n + 1) 2^-23 of the sum of its addends' magnitudes; D / n steps give at most g P for any
    n >= 1. Round-to-nearest fp32 accumulation in any order (the CPU, CUDA cores: Higham's D 2^-24) and
    split-K (partial chains, then their sum) stay within it.
    Then the mean over T teachers (M = the mean of N, E = the mean of the teachers' e):
      the filter's T - 1 fp32 additions and its division by T   (T + 1) 2^-24 (M + E)   (T > 1)
      the canonical score's one rounding to fp32                2^-24 (M + E)
      the canonical score's float64 additions and division,
      and a margin                                              2^-21 (M + E)
    About 0.0088 for unit rows of 4,096 dimensions in bf16 with an fp32 output, 0.0128 with a bf16 output
    (the output rounding is a third of it), 0.00098 for the fp32 GEMM (0.0020 if it may use TF32)."""
    u, T = input_roundoff, len(dims)
    e_sum, n_sum = 0.0, 0.0
    for D, qn, dn in zip(dims, q_norms, d_norms, strict=True):
        assert 2 * D * 2.0**-23 < 0.5, f"{D} dimensions: the accumulation bound needs D < 2^20"
        g = 2 * D * 2.0**-23 / (1 - 2 * D * 2.0**-23)
        n = qn * dn
        p = (1 + u) ** 2 * n
        e = (2 * u + u * u) * n + g * p + D * 2.0**-124 * (1 + qn) * (1 + dn) + math.ceil(math.log2(D)) * 2.0**-52 * n
        if output_rounded:
            e = e + U_BF16 * (1 + g) * p
        e_sum, n_sum = e_sum + e, n_sum + n
    e, m = e_sum / T, n_sum / T
    return e + ((T + 1) * U_FP32 if T > 1 else 0.0) * (m + e) + U_FP32 * (m + e) + 2.0**-21 * (m + e)


def fp32_matmul_roundoff(device) -> float:
    """What an fp32 matmul on `device` may round its inputs to under the caller's settings: nothing
    ("highest", "ieee"), TF32 ("high", "tf32") or bfloat16 ("medium", "bf16")."""
    said = {torch.get_float32_matmul_precision(), getattr(torch.backends, "fp32_precision", "none")}
    backend = torch.backends.cuda.matmul if torch.device(device).type == "cuda" else None
    backend = backend or getattr(torch.backends.mkldnn, "matmul", None)
    said.add(getattr(backend, "fp32_precision", "none"))
    if said & {"medium", "bf16"}:
        return U_BF16
    if said & {"high", "tf32"}:
        return U_TF32
    return 0.0


def fp32_output_supported(device) -> bool:
    """torch.mm(bf16, bf16, out_dtype=torch.float32): a bf16 GEMM whose fp32 accumulator is the output, on
    CUDA with a torch that has it."""
    if torch.device(device).type != "cuda":
        return False
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):  # no out_dtype argument, or not for these types
        return False


def block_scores(q: list[torch.Tensor], d: list[torch.Tensor], mode: str) -> torch.Tensor:
    """The filter's (rows, docs) fp32 scores: the mean over teachers of q[t] @ d[t].T (FILTERS[mode]).
    "bf16-fp32" off CUDA runs the same arithmetic as an fp32 GEMM of the bf16 values (exact in fp32):
    products exact, fp32 sums, an fp32 output."""
    s = None
    for qt, dt in zip(q, d, strict=True):
        if mode == "bf16":
            x = (qt @ dt.T).float()
        elif mode == "bf16-fp32":
            x = torch.mm(qt, dt.T, out_dtype=torch.float32) if qt.is_cuda else qt.float() @ dt.float().T
        else:
            x = qt @ dt.T
        s = x if s is None else s.add_(x)
    return s.div_(len(q)) if len(q) > 1 else s


@contextmanager
def fp32_reductions():
    """bf16 GEMMs accumulate in fp32 for the duration (the bound assumes it: cuBLAS may otherwise reduce
    split-K partials in bf16); the caller's setting is restored, both halves of the pair (reduced
    precision allowed, split-K allowed) where this torch has the second."""
    m = torch.backends.cuda.matmul
    try:
        saved = (m.allow_bf16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction_split_k)
    except AttributeError:  # a torch without the split-K half
        saved = (m.allow_bf16_reduced_precision_reduction,)
    m.allow_bf16_reduced_precision_reduction = (False, *saved[1:]) if len(saved) > 1 else False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction = saved if len(saved) > 1 else saved[0]


def rounded(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float64 -> the next float32 at or above x (up) or at or below it: fp32 comparisons against it never
    cross x."""
    return torch.nextafter(x.float(), torch.tensor(math.inf if up else -math.inf, device=x.device))


def max_norms(x: list[torch.Tensor]) -> torch.Tensor:
    """(T,) float64: a bound on the largest row norm of each teacher's rows. The fp32 norm's own error
    (a D-term fp32 sum of squares, then a square root) is below D 2^-23 of it: added."""
    return torch.stack(
        [(t.norm(dim=1).max().double() if len(t) else torch.zeros((), dtype=torch.float64, device=t.device))
         * (1 + (t.shape[1] + 2) * 2.0**-23) for t in x]
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Search: blocks of queries x blocks of the corpus, a running top-k


def merge_top_k(best_v: torch.Tensor, best_i: torch.Tensor, r, cols, v, k: int) -> None:
    """Add candidates (query row r[j], corpus row cols[j], score v[j]) to the running top k (best_v, best_i:
    (rows, k), score descending, corpus row ascending; in place). Every candidate's corpus row is above
    those already in best, so on equal scores best's stay first (a stable sort)."""
    if not len(r):
        return
    order = torch.argsort(cols, stable=True)  # stable sorts, the last key first: row, score desc, corpus row
    order = order[torch.argsort(v[order], descending=True, stable=True)]
    order = order[torch.argsort(r[order], stable=True)]
    r, cols, v = r[order], cols[order], v[order]
    counts = torch.bincount(r, minlength=len(best_v))
    rank = torch.arange(len(r), device=r.device) - (torch.cumsum(counts, 0) - counts)[r]
    take = rank < k
    new_v, new_i = torch.full_like(best_v, -math.inf), torch.full_like(best_i, -1)
    new_v[r[take], rank[take]] = v[take]
    new_i[r[take], rank[take]] = cols[take]
    v2, i2 = torch.cat([best_v, new_v], 1), torch.cat([best_i, new_i], 1)
    o = torch.argsort(v2, dim=1, descending=True, stable=True)[:, :k]
    best_v.copy_(v2.gather(1, o))
    best_i.copy_(i2.gather(1, o))


def block_work_bytes(width: int, query_block: int, doc_block: int) -> int:
    """Device bytes one step of the search works in, for teachers of `width` dimensions together: a query
    block and a corpus block with their filter copies, the score blocks, canonical_scores' float64 pieces."""
    return width * (6 * query_block + 10 * doc_block) + 4 * 4 * SCORE_BLOCK + 4 * 8 * PIECE


def corpus_plan(ds: list, device, lowp: bool, query_blocks: int, query_block: int, doc_block: int) -> str:
    """Where the corpus lives during the search. "stream": each query block reads every corpus block from
    the host again (the CPU, one query block, or a corpus the device cannot hold); "all": the first query
    block's pass leaves the fp32 rows and their filter copy on the device; "filter" (bf16 only): only the
    bf16 copy stays, and rescoring gathers the fp32 rows it needs from the host (e.g. 3.6M x 4,096: 59 GB
    in fp32, 29.5 GB in bf16). Budget: the free device memory less twice one block's work and 2 GiB."""
    if torch.device(device).type != "cuda" or query_blocks < 2:
        return "stream"
    free, _ = torch.cuda.mem_get_info(device)
    width = sum(x.shape[1] for x in ds)
    budget = free - 2 * block_work_bytes(width, query_block, doc_block) - (1 << 31)
    if ds[0].shape[0] * width * (4 + 2 * lowp) <= budget:
        return "all"
    if lowp and ds[0].shape[0] * width * 2 <= budget:
        return "filter"
    return "stream"


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
    corpus_on_device: str | None = None,
    fp32_output: bool | None = None,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """For the queries `rows` (ascending; default all): the top k documents by canonical score (the mean
    over teachers: qs[t] and ds[t] are teacher t's query and document embeddings, stored rows of as_float)
    that are not excluded (the miner's positives and kept negatives) and score below the query's threshold
    (default none), ordered by (score desc, corpus row asc), and how many non-excluded documents score at
    or above the threshold. thr and the exclusions (CSR: excl_off, excl_idx) are in the order of `rows`.

    Every precision is the same machinery. A GEMM scores each block ("fp32"; "bf16": tensor cores on a
    GPU, with an fp32 output where torch.mm has out_dtype, unless fp32_output says otherwise), and
    filter_error_bound gives e >= |GEMM score - canonical score|. A document is dropped outright when
    low - e >= threshold; it is rescored (canonical_scores) when low is within e of the threshold, or when
    low + e reaches the k-th best lower bound known (the k-th largest low - e below the threshold in the
    block, or the k-th canonical score kept so far); every other one provably has k documents strictly
    above it. So the result is that of the canonical scores of every pair, bit for bit, whatever the
    precision, the block sizes, the split of the queries (ranks) and the device.

    Memory on the device: one query block, one corpus block (or the whole corpus: corpus_plan, forced by
    corpus_on_device), one (score_rows x doc_block) score block; never the (queries x corpus) matrix.
    Returns scores (n, k) (-inf where none), doc rows (n, k) (-1), dropped (n,), and a report: the
    filter, pairs rescored, the largest bound used and the one for unit rows, the corpus plan and the
    bytes read from the host for each query block.
    """
    if rows is None:
        rows = np.arange(qs[0].shape[0])
    if thr is None:
        thr = np.full(len(rows), np.inf, np.float32)
    if excl_off is None:
        excl_off, excl_idx = np.zeros(len(rows) + 1, np.int64), np.zeros(0, np.int64)
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    dims = [x.shape[1] for x in ds]
    if [x.shape[1] for x in qs] != dims:
        raise ValueError(f"query and document widths differ: {[x.shape[1] for x in qs]} vs {dims}")
    n, N, T = len(rows), ds[0].shape[0], len(ds)
    k_eff = min(k, N)
    lowp = precision == "bf16"
    out32 = (fp32_output_supported(device) if fp32_output is None else fp32_output) if lowp else True
    mode = ("bf16-fp32" if out32 else "bf16") if lowp else "fp32"
    u_in = U_BF16 if lowp else fp32_matmul_roundoff(device)
    row_bytes = sum(x.shape[1] * np.dtype(x.dtype).itemsize for x in ds)  # one row of every teacher, stored
    out_v = np.full((n, k), -np.inf, np.float32)
    out_i = np.full((n, k), -1, np.int64)
    out_drop = np.zeros(n, np.int64)
    score_rows = max(1, min(query_block, SCORE_BLOCK // max(doc_block, 1)))  # <= 64 MB of fp32 scores
    blocks = [(a, min(a + query_block, n)) for a in range(0, n, query_block)]
    plan = corpus_on_device or corpus_plan(ds, device, lowp, len(blocks), query_block, doc_block)
    if plan not in ("stream", "all", "filter") or (plan == "filter" and not lowp):
        raise ValueError(f"corpus_on_device: stream, all, or filter (bf16 only); got {plan!r} with {precision}")
    bar = tqdm(total=len(blocks) * math.ceil(N / doc_block), desc="search", unit="block", disable=not show_progress)
    kept, moved, rescored = {}, [], 0
    bound_max = torch.zeros((), dtype=torch.float64, device=device)

    def corpus_block(c0: int, c1: int):
        """Corpus rows [c0, c1) on the device: (the filter's copy, the fp32 rows or None, their norms)."""
        if c0 in kept:
            return kept[c0]
        d = [as_float(x[c0:c1], device) for x in ds]
        moved[-1] += (c1 - c0) * row_bytes
        block = ([x.to(torch.bfloat16) for x in d] if lowp else d, d, max_norms(d))
        if plan != "stream":
            kept[c0] = block if plan == "all" else (block[0], None, block[2])
        return block

    def gathered(c0: int, cols: torch.Tensor):
        """fp32 rows of corpus rows c0 + cols, gathered from the host: (rows, each col's row among them)."""
        uc, inv = torch.unique(cols, return_inverse=True)
        at = c0 + uc.cpu().numpy()
        moved[-1] += len(at) * row_bytes
        return [as_float(x[at], device) for x in ds], inv

    with fp32_reductions():
        for a, b in blocks:
            moved.append(0)
            r = rows[a:b]
            q = [as_float(x[r], device) for x in qs]
            moved[-1] += len(r) * sum(x.shape[1] * np.dtype(x.dtype).itemsize for x in qs)
            qf = [x.to(torch.bfloat16) for x in q] if lowp else q
            q_norm = max_norms(q)
            th = torch.from_numpy(thr[a:b]).to(device).unsqueeze(1)
            # excluded (local row, doc) pairs of this query block, by doc for the per-block selection
            er = np.repeat(np.arange(len(r)), np.diff(excl_off[a : b + 1]))
            ec = excl_idx[excl_off[a] : excl_off[b]]
            best_v = torch.full((len(r), k_eff), -math.inf, device=device)
            best_i = torch.full((len(r), k_eff), -1, dtype=torch.long, device=device)
            dropped = torch.zeros(len(r), dtype=torch.long, device=device)
            for c0 in range(0, N, doc_block):
                c1 = min(c0 + doc_block, N)
                df, d32, d_norm = corpus_block(c0, c1)
                e64 = filter_error_bound(dims, q_norm, d_norm, u_in, mode == "bf16")
                bound_max = torch.maximum(bound_max, e64)
                sel = (ec >= c0) & (ec < c1)
                pr = torch.from_numpy(er[sel]).to(device)
                pc_ = torch.from_numpy(ec[sel] - c0).to(device)
                need_r, need_c = [], []
                for s0 in range(0, len(r), score_rows):
                    s1 = min(s0 + score_rows, len(r))
                    low = block_scores([x[s0:s1] for x in qf], df, mode)  # (rows, docs)
                    m = (pr >= s0) & (pr < s1)
                    low[pr[m] - s0, pc_[m]] = -math.inf  # never a negative, never counted as dropped
                    # the canonical score c lies in [low - e, low + e]: per-row cuts on low, rounded outwards
                    t = th[s0:s1].double()
                    # a lower bound on the k-th best c below the threshold: the k-th kept one (from earlier
                    # corpus blocks); while a row has fewer, the k-th largest low - e among the block's sure
                    # candidates (low + e < t)
                    floor = best_v[s0:s1, -1:]
                    if c1 - c0 >= k_eff and bool(torch.isneginf(floor).any()):
                        sure = low.masked_fill(low >= rounded(t - e64, up=False), -math.inf)
                        kth = sure.topk(k_eff, dim=1).values[:, -1:]
                        floor = torch.maximum(floor, rounded(kth.double() - e64, up=False))
                    # every pair whose c can reach the k-th best (low + e >= floor, a cut below the threshold)
                    cut = rounded(floor.double() - e64, up=False).clamp(min=torch.finfo(torch.float32).min)
                    cr, cc = (low >= cut).nonzero(as_tuple=True)
                    above = low[cr, cc] >= rounded(t + e64, up=True)[cr, 0]  # low - e >= t: c >= t, dropped
                    dropped[s0:s1] += torch.bincount(cr[above], minlength=s1 - s0)
                    need_r.append(cr[~above] + s0)  # the rest: rescored
                    need_c.append(cc[~above])
                nr, nc = torch.cat(need_r), torch.cat(need_c)
                rescored += len(nr)
                if len(nr):
                    d_rows, at = (d32, nc) if d32 is not None else gathered(c0, nc)
                    v = canonical_scores(q, d_rows, nr, at)
                    above = v >= th[nr, 0]
                    dropped += torch.bincount(nr[above], minlength=len(r))
                    below = ~above
                    merge_top_k(best_v, best_i, nr[below], nc[below] + c0, v[below], k_eff)
                bar.update()
            out_v[a:b, :k_eff] = best_v.cpu().numpy()
            out_i[a:b, :k_eff] = best_i.cpu().numpy()
            out_drop[a:b] = dropped.cpu().numpy()
    bar.close()
    out_i[~np.isfinite(out_v)] = -1
    report = {
        "filter": FILTERS[mode],
        "pairs_rescored": int(rescored),
        "bound_max": float(bound_max),
        "bound_unit_rows": float(filter_error_bound(dims, [1.0] * T, [1.0] * T, u_in, mode == "bf16")),
        "corpus_on_device": plan,
        "bytes_moved": moved,
    }
    return out_v, out_i, out_drop, report
