"""How the prepared data becomes the training's micro-batches: the recipe's epoch order, each example's
length, the split of one optimizer step over ranks and packed micro-batches, and the packing of a
micro-batch into one padding-free forward. Used by the trainer, its evaluation and the benchmarks."""

import functools
import math

import numpy as np
import torch

from dataset import PreparedData
from model import pack


def split_step(
    queries: np.ndarray, lengths: np.ndarray, world: int, micro_batch_size: int | None, max_tokens: int
) -> list[list[np.ndarray]]:
    """Split one optimizer step's queries into per-rank lists of micro-batches.

    Every rank gets the same number of micro-batches (ZeRO-3 needs the same collectives on every
    rank). With micro_batch_size: rank r takes a contiguous slice of the step, cut into micro-batches
    of at most micro_batch_size queries. Otherwise queries are balanced over ranks by tokens, then
    over the fewest micro-batches that fit max_tokens (a query that alone exceeds it runs alone).
    Deterministic, computed identically on every rank. `lengths`: tokens of each query's example.
    """
    if micro_batch_size is not None:
        per_rank = np.array_split(queries, world)
        m = max(math.ceil(len(r) / micro_batch_size) for r in per_rank)
        return [np.array_split(r, m) for r in per_rank]
    order = np.argsort(-lengths, kind="stable")  # longest first: greedy balancing (LPT)
    ranks = [[] for _ in range(world)]
    load = np.zeros(world, dtype=np.int64)
    for i in order:
        r = int(np.argmin(load))
        ranks[r].append(i)
        load[r] += lengths[i]

    def pack_bins(items, m):
        bins, bin_load = [[] for _ in range(m)], np.zeros(m, dtype=np.int64)
        for i in items:  # items are already longest first
            b = int(np.argmin(bin_load))
            bins[b].append(i)
            bin_load[b] += lengths[i]
        fits = all(bin_load[b] <= max_tokens or len(bins[b]) == 1 for b in range(m))
        return [sorted(b) for b in bins], fits

    m = max(1, max(math.ceil(int(load[r]) / max_tokens) for r in range(world)))
    while True:
        packed = [pack_bins(items, m) for items in ranks]
        if all(fits for _, fits in packed) or m >= max(len(items) for items in ranks):
            break
        m += 1
    # keep the step's order inside each micro-batch; drop nothing, empty bins stay empty
    return [[queries[np.array(b, dtype=np.int64)] for b in bins] for bins, _ in packed]


@functools.lru_cache(maxsize=1)
def epoch_order(num_queries: int, seed: int, epoch: int) -> np.ndarray:
    """The recipe's order: torch.randperm(N, generator=manual_seed(seed + epoch)).

    Cached: every step of an epoch slices the same permutation (3.66M entries for the recipe).
    """
    order = torch.randperm(num_queries, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
    order.flags.writeable = False  # shared by every caller of the cache
    return order


def example_lengths(data: PreparedData, num_negatives: int) -> np.ndarray:
    """Tokens of each query's example (query + positive + negatives), for token-budget packing."""
    q_len = np.diff(data.query_offsets)
    d_len = np.diff(data.doc_offsets)
    return q_len + d_len[data.query_docs[:, : 1 + num_negatives]].sum(axis=1)


def collate(data: PreparedData, queries: np.ndarray, num_negatives: int, device) -> tuple:
    """Queries then their passages, packed: (input_ids (T,), cu_seqlens (S+1,), doc_ids (B*(1+k),))."""
    docs = data.query_docs[queries, : 1 + num_negatives].reshape(-1)
    seqs = [data.query(i) for i in queries] + [data.doc(j) for j in docs]
    input_ids, cu = pack(seqs, device)
    return input_ids, cu, torch.as_tensor(docs, device=device)
