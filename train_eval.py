"""Evaluation during training (train_biencoder.py --eval-beir / --eval-data): full-corpus retrieval on
BEIR folders, with the metrics, prompts and token limits evaluate.py uses on an export of the same
weights, and the recipe's loss, acc@1 and MRR over each query's own candidate group on a held-out
prepared split.

Under ZeRO-3 every forward gathers each layer's parameters from all ranks, so every rank takes part
in every forward: the texts are cut into packed micro-batches (the training's padding-free path),
dealt round-robin to the ranks, and a rank with fewer runs one-token dummy forwards until all have
made the same number of calls. No gradients, eval() mode (no dropout), nothing random: the training's
RNG stream, data order and losses are those of a run without evaluation. Each rank searches its own
share of the corpus (retrieval.search) and the rank-local top-k lists are merged; the corpus is
never gathered on one rank.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from batches import collate, example_lengths, split_step
from common import UserError, read_json_file
from dataset import PreparedData, subset_prompts
from distributed import gather, rank, world_size
from hf_files import export_max_seq_length, position_cap, prompt_pair, sentence_transformers_prompts
from model.biencoder import pack, token_batches
from retrieval import METRICS, TOP_K, build_run, retrieval_metrics, search
from sources import load_beir, sample_beir

BEIR_METRICS = {name: name.lower() for name in METRICS}  # NDCG@10 -> eval/<name>/ndcg@10
GROUP_METRICS = ("loss", "acc@1", "mrr")
LOWER_IS_BETTER = ("loss",)


@dataclass
class BeirSet:
    """A BEIR folder, tokenized as evaluate.py tokenizes it for the export: queries then documents."""

    name: str
    query_ids: list[str]
    doc_ids: list[str]
    qrels: dict
    tokens: list[list[int]]  # the queries' token ids, then the documents'
    description: str

    @property
    def num_queries(self) -> int:
        return len(self.query_ids)


@dataclass
class GroupSet:
    """A prepared folder scored as the recipe's validation: each query against its own candidates."""

    name: str
    data: PreparedData


def set_name(path: str) -> str:
    return Path(path).resolve().name


def metric_names(beir: list[str], groups: list[str]) -> list[str]:
    """Every metric the evaluations log: eval/<folder name>/<metric>."""
    names = [f"eval/{set_name(d)}/{m}" for d in beir for m in BEIR_METRICS.values()]
    return names + [f"eval/{set_name(d)}/{m}" for d in groups for m in GROUP_METRICS]


def better(metric: str, value: float, best: float | None) -> bool:
    """Is `value` an improvement on `best` (None: nothing yet)? Lower is better for a loss."""
    if best is None:
        return True
    return value < best if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else value > best


# ----------------------------------------------------------------------------------------------
# Checks and loading, before any GPU work


def check_eval_options(cfg, data_meta: dict | None = None, model_config=None) -> None:
    """The evaluation's options, checked before training starts: the folders exist and are readable,
    names are unique, --eval-prompts fits, --keep-best names a metric that will be logged."""
    beir, groups = cfg.eval_beir or [], cfg.eval_data or []
    names = [set_name(d) for d in beir + groups]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--eval-beir / --eval-data: two folders named {dup}; metrics are named by folder")
    for d in beir:
        load_beir(d)  # the layout and every file readable: a UserError names what is wrong
    for d in groups:
        if not (Path(d) / "meta.json").is_file():
            raise UserError(f"--eval-data {d}: no prepared data (meta.json missing); write it with prepare_data.py")
    prompts = read_eval_prompts(cfg.eval_prompts)
    unknown = sorted(set(prompts) - {set_name(d) for d in beir})
    if unknown:
        raise UserError(f"--eval-prompts {cfg.eval_prompts}: no --eval-beir folder named {unknown}")
    if data_meta is not None:
        for entry in prompts.values():
            export_settings(data_meta, model_config, entry)  # a prompt_name the data lacks: the error
    if (cfg.eval_every or cfg.eval_max_queries or cfg.eval_max_docs or cfg.eval_max_tokens) and not names:
        raise UserError(
            "--eval-every / --eval-max-queries / --eval-max-docs / --eval-max-tokens need --eval-beir or --eval-data"
        )
    if cfg.keep_best:
        logged = metric_names(beir, groups)
        if cfg.keep_best not in logged:
            raise UserError(
                f"--keep-best {cfg.keep_best}: no evaluation logs it; with these --eval-beir / --eval-data "
                f"the metrics are {', '.join(logged) or 'none (give --eval-beir or --eval-data)'}"
            )


PROMPT_KEYS = ("query", "document", "prompt_name", "max_length")


def read_eval_prompts(path: str | None) -> dict:
    """--eval-prompts JSON: {folder name: {"query": str, "document": str} or {"prompt_name": subset},
    optional "max_length"}; what is not given is the export's (the data's)."""
    if not path:
        return {}
    obj = read_json_file(path, "--eval-prompts")
    for name, entry in obj.items():
        if not isinstance(entry, dict) or set(entry) - set(PROMPT_KEYS):
            raise UserError(f"--eval-prompts {path}: {name!r} must be an object with keys among {PROMPT_KEYS}")
    return obj


def export_settings(data_meta: dict, model_config, entry: dict) -> tuple[str, str, int]:
    """(query prompt, document prompt, max length) as evaluate.py resolves them on the export of this
    run: the sentence-transformers prompts export_hf.py writes from the data's subsets ("query" /
    "document", or "<prompt_name>-query" / "-document"; none when the subsets differ) and its
    max_seq_length, the longer of the data's two token limits, capped by absolute positions."""
    stored = sentence_transformers_prompts(subset_prompts(data_meta))
    query, document = prompt_pair(stored, entry.get("prompt_name"), "--eval-prompts: prompt_name")
    query, document = entry.get("query", query or ""), entry.get("document", document or "")
    model_type = getattr(model_config, "model_type", "")
    positions = getattr(model_config, "max_position_embeddings", None)
    if "max_length" in entry:
        return query, document, position_cap(entry["max_length"], model_type, positions)
    limits = {"query": data_meta["query_max_len"], "passage": data_meta["passage_max_len"]}
    return query, document, export_max_seq_length(limits, model_type, positions)


def load_eval_sets(cfg, tokenizer, data_meta: dict, model_config) -> tuple[list[BeirSet], list[GroupSet]]:
    """Read and tokenize every --eval-beir folder (on every rank: the same texts, the same order)
    and open every --eval-data folder."""
    prompts = read_eval_prompts(cfg.eval_prompts)
    beir = []
    for folder in cfg.eval_beir or []:
        name = set_name(folder)
        data, note = sample_beir(load_beir(folder), cfg.eval_max_queries, cfg.eval_max_docs)
        query_prompt, doc_prompt, length = export_settings(data_meta, model_config, prompts.get(name, {}))
        texts = [query_prompt + t for t in data["queries"]] + [doc_prompt + t for t in data["docs"]]
        tokens = tokenizer(texts, truncation=True, max_length=length)["input_ids"]
        description = (
            f"{name}: {len(data['query_ids'])} queries, {len(data['doc_ids'])} documents ({note}); "
            f"query prompt {query_prompt!r}, document prompt {doc_prompt!r}, {length} tokens"
        )
        beir.append(BeirSet(name, data["query_ids"], data["doc_ids"], data["qrels"], tokens, description))
    groups = []
    for folder in cfg.eval_data or []:
        data = PreparedData(Path(folder))
        if data.meta["vocab_size"] != data_meta["vocab_size"] or data.meta["tokenizer"] != data_meta["tokenizer"]:
            raise UserError(
                f"--eval-data {folder} was tokenized with {data.meta['tokenizer']}, --data with "
                f"{data_meta['tokenizer']}: prepare both with the same --tokenizer"
            )
        if data.meta["num_negatives"] < cfg.num_negatives:
            raise UserError(
                f"--eval-data {folder} holds {data.meta['num_negatives']} negatives per query, the run uses "
                f"--num-negatives {cfg.num_negatives}: prepare it with at least as many"
            )
        groups.append(GroupSet(set_name(folder), data))
    return beir, groups


# ----------------------------------------------------------------------------------------------
# Embedding: every rank takes part in every forward


def rank_share(seqs: list, max_tokens: int) -> tuple[list[np.ndarray], int]:
    """This rank's packed micro-batches of `seqs` (indices, longest first, at most max_tokens tokens each,
    a longer text alone, dealt round-robin to the ranks) and the number of forward calls every rank makes."""
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    batches = token_batches([len(seqs[i]) for i in order], None, max_tokens)
    return [order[a:b] for a, b in batches[rank() :: world_size()]], math.ceil(len(batches) / world_size())


@torch.no_grad()
def embed_share(engine, seqs: list, max_tokens: int, device):
    """Embed this rank's share of `seqs` (`rank_share`): yields (indices into seqs, (n, D) float32
    embeddings in host memory) per micro-batch; every rank makes the same number of forward calls.

    Each micro-batch's embeddings leave the GPU as soon as they are made: a corpus of MS MARCO's 8.8M
    passages is 18 GB per rank at D = 4,096 on 8 ranks, which the GPU, holding the model states, has
    no room for."""
    mine, calls = rank_share(seqs, max_tokens)
    for j in range(calls):
        if j < len(mine):
            input_ids, cu = pack([seqs[i] for i in mine[j]], device)
        else:  # no text left for this rank: a one-token forward, so that its collectives still match
            input_ids, cu = pack([seqs[0][:1]], device)
        emb = engine(input_ids, cu)
        if j < len(mine):
            yield mine[j], emb.float().cpu().numpy()


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(x)
    return x


REDUCE_BLOCK_BYTES = 1 << 28  # 256 MiB: the most of a host array on the GPU at once while it is summed
QUERY_BLOCK, DOC_BLOCK = 1024, 16384  # the search's blocks (retrieval.search), on the GPU one at a time


def sum_rows_over_ranks(x: np.ndarray, device) -> np.ndarray:
    """Element-wise sum of a host float32 array over the ranks, in row blocks of at most
    REDUCE_BLOCK_BYTES through the device (NCCL reduces device memory only)."""
    if not (dist.is_initialized() and world_size() > 1):
        return x
    rows = max(1, REDUCE_BLOCK_BYTES // max(1, x[:1].nbytes))
    for a in range(0, len(x), rows):
        x[a : a + rows] = sum_over_ranks(torch.from_numpy(x[a : a + rows]).to(device)).cpu().numpy()
    return x


def local_top_k(queries: np.ndarray, docs: np.ndarray, rows: np.ndarray, k: int, device) -> tuple:
    """Top k of this rank's documents (docs[j] is corpus row rows[j], ascending) for every query:
    (scores (Q, k), corpus rows (Q, k)), -inf / -1 where it holds fewer than k."""
    if not len(rows):
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    v, i, _, _ = search([queries], [docs], k, query_block=QUERY_BLOCK, doc_block=DOC_BLOCK, device=device)
    return v, np.where(i >= 0, rows[np.maximum(i, 0)], -1)


def merge_top_k(parts: list[tuple], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ranks' local_top_k lists -> the top k over the whole corpus, score descending and ties to the
    lower corpus row: what one search over the whole corpus returns (retrieval.search's order)."""
    v = np.concatenate([p[0] for p in parts], axis=1)
    i = np.concatenate([p[1] for p in parts], axis=1)
    best = np.lexsort((i, -v), axis=1)[:, :k]
    return np.take_along_axis(v, best, 1), np.take_along_axis(i, best, 1)


def beir_metrics(engine, s: BeirSet, max_tokens: int, device) -> dict[str, float]:
    """NDCG@10, Recall@10/100, MRR@10 of the model on one BEIR set, exactly as evaluate.py scores an
    export: the same top-k (ties to the lower corpus row), without the query's own id."""
    Q = s.num_queries
    mine, _ = rank_share(s.tokens, max_tokens)
    idx = np.concatenate(mine) if mine else np.zeros(0, np.int64)
    rows = np.sort(idx[idx >= Q]) - Q  # this rank's documents, in corpus order
    slot = np.zeros(len(s.tokens), np.int64)
    slot[rows + Q] = np.arange(len(rows))
    hidden = engine.module.encoder.config.hidden_size
    queries = np.zeros((Q, hidden), np.float32)
    docs = np.empty((len(rows), hidden), np.float32)  # written in place: host memory holds one copy
    for chunk, emb in embed_share(engine, s.tokens, max_tokens, device):
        is_query = chunk < Q
        queries[chunk[is_query]] = emb[is_query]
        docs[slot[chunk[~is_query]]] = emb[~is_query]
    # Every rank needs every query: each row is filled by exactly one rank, so the sum is that row.
    queries = sum_rows_over_ranks(queries, device)
    k = TOP_K + 1  # + 1: build_run drops a document whose id is the query's own, as evaluate.py
    # Host arrays: the search streams blocks of them through the device (retrieval.search).
    v, i = merge_top_k(gather(local_top_k(queries, docs, rows, k, device)), k)
    run = build_run(s.query_ids, s.doc_ids, v, i, TOP_K)
    return {BEIR_METRICS[m]: value for m, value in retrieval_metrics(s.qrels, run).items()}


@torch.no_grad()
def group_metrics(engine, g: GroupSet, cfg, max_tokens: int, device) -> dict[str, float]:
    """The recipe's validation: each query against its own positive and --num-negatives negatives
    (no in-batch negatives), logits = cosine / --temperature. loss: mean cross-entropy; acc@1: the
    positive scores highest (a tie counts for it, as argmax picks the first); mrr: 1 / its rank."""
    data, k = g.data, cfg.num_negatives
    queries = np.arange(len(data))
    micro_batches = split_step(queries, example_lengths(data, k)[queries], world_size(), None, max_tokens)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for mb in micro_batches[rank()]:  # every rank has the same number of micro-batches
        dummy = len(mb) == 0
        input_ids, cu, _ = collate(data, queries[:1] if dummy else mb, k, device)
        emb = engine(input_ids, cu)
        if dummy:
            continue
        q, p = emb[: len(mb)], emb[len(mb) :]
        logits = torch.einsum("bd,bnd->bn", q, p.view(len(mb), 1 + k, -1)) / cfg.temperature
        rank_of_positive = 1 + (logits[:, 1:] > logits[:, :1]).sum(1)
        totals[0] += F.cross_entropy(logits, torch.zeros(len(mb), dtype=torch.long, device=device), reduction="sum")
        totals[1] += (rank_of_positive == 1).sum()
        totals[2] += (1.0 / rank_of_positive).sum()
    totals = sum_over_ranks(totals) / len(data)
    return dict(zip(GROUP_METRICS, totals.tolist(), strict=True))


def evaluate(engine, beir: list[BeirSet], groups: list[GroupSet], cfg, device) -> dict[str, float]:
    """Every evaluation set, in eval() mode; the metrics as eval/<name>/<metric>, with the seconds
    each set took (eval/<name>/seconds). The module is back in train() mode afterwards."""
    was_training = engine.module.training
    engine.module.eval()
    row = {}
    budget = cfg.eval_max_tokens or cfg.max_tokens_per_gpu  # tokens per packed forward
    try:
        for s in beir:
            t0 = time.perf_counter()
            row.update({f"eval/{s.name}/{m}": v for m, v in beir_metrics(engine, s, budget, device).items()})
            row[f"eval/{s.name}/seconds"] = time.perf_counter() - t0
        for g in groups:
            t0 = time.perf_counter()
            row.update({f"eval/{g.name}/{m}": v for m, v in group_metrics(engine, g, cfg, budget, device).items()})
            row[f"eval/{g.name}/seconds"] = time.perf_counter() - t0
    finally:
        engine.module.train(was_training)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the search's blocks: give the training back what the allocator keeps
    return row
