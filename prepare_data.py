"""Tokenize the embed-nemotron dataset (or your own data) once into memory-mapped token arrays.

In: the Hugging Face dataset repo `nvidia/embed-nemotron-dataset-v1` (downloaded into
--download-path, files already there are kept; `ids_only` subsets get their text restored from
the public source their source_config.json names), any local folder in that layout, or JSONL
files in the FlagEmbedding style ({"query": str, "pos": [str], "neg": [str], "prompt": str}).
Out: --output-dir with query/document token arrays, per-query positive + negatives and
meta.json; the format is described in dataset.py, which reads it. Examples are built exactly as
the published recipe builds them (README, "The recipe"):
query = f"{query_instruction} {question}", passage = f"{passage_instruction} {text}" (raw text
when an instruction is empty), positive = pos_doc[0], negatives = the first --num-negatives of
neg_doc cycled when fewer, BOS as the tokenizer adds it, truncated to 512 tokens, BOS included.

Full dataset (a CPU box; 3.66M queries, 9.1M documents):
    python prepare_data.py --download-path ./embed_nemotron_dataset_v1 --output-dir prepared --num-proc 16
Tiny, offline (the SciFact subset shipped in data/, any local HF tokenizer folder):
    python prepare_data.py --download-path data --subsets scifact --tokenizer PATH/TO/TOKENIZER \
        --output-dir prepared/scifact --num-proc 2
Your own data:
    python prepare_data.py --jsonl train.jsonl --output-dir prepared/mine
Look at the result:
    python prepare_data.py --inspect prepared              # summary
    python prepare_data.py --inspect prepared --index 0    # query 0 decoded, as JSON
"""

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import resource
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from common import (
    UserError,
    atomic_dir,
    atomic_file,
    load_pretrained,
    prompt_prefix,
    run_cli,
    with_prompt,
)
from dataset import ARRAYS, FORMAT_VERSION, PreparedData, sha256_of
from options import option, parse_config
from sources import (
    DataError,
    doc_id_lists,
    first_true,
    jsonl_lines,
    parquet_schema,
    parse_jsonl_line,
    read_json,
    read_parquet,
    string_ids,
    subset_files,
    subset_metadata,
)

REPO_ID = "nvidia/embed-nemotron-dataset-v1"
DEFAULT_DOWNLOAD_PATH = "embed_nemotron_dataset_v1"
# The recipe's 14 subsets in the recipe's order (README, "The recipe").
RECIPE_SUBSETS = [
    "EmotionClassification",
    "FEVER",
    "GooAQ",
    "HotpotQA",
    "MAmmoTH2",
    "MIRACL",
    "MSMARCO",
    "NaturalQuestions",
    "NFCorpus",
    "PAQ",
    "SciFact",
    "SQuAD",
    "SyntheticClassificationData",
    "TriviaQA",
]
# Texts per task sent to a worker: ~0.5-1 s of tokenization, small enough that the ordered,
# bounded queue keeps every worker busy and the parent's memory flat.
SHARD_TEXTS = 2048
# Texts longer than LONG_CHARS * max_len characters are tokenized from their first
# CUT_CHARS * max_len characters only when that provably gives the same first max_len tokens
# (see ShardTokenizer.encode); a web page of 100k characters then costs ~1k tokens, not ~25k.
LONG_CHARS, CUT_CHARS = 16, 8
# Settings that must match for an existing output to count as "already prepared".
SETTINGS = ("tokenizer", "query_max_len", "passage_max_len", "num_negatives", "subsets", "skip_invalid")


@dataclass
class Config:
    """Every option of prepare_data.py: its flag is --field-name."""

    download_path: str | None = option(
        None,
        f"HF-layout folder; missing subsets are downloaded from {REPO_ID}; "
        f"unset: ./{DEFAULT_DOWNLOAD_PATH}, unless only --jsonl is given",
    )
    jsonl: list[str] = option([], "JSONL files {query, pos, neg, prompt}; one subset each")
    subsets: list[str] | None = option(None, "subsets of --download-path, in this order; unset: the recipe's 14")
    output_dir: str = option("prepared", "output folder")
    tokenizer: str = option("meta-llama/Llama-3.1-8B", "HF name or local folder")
    query_max_len: int = option(512, "tokens, BOS included")
    passage_max_len: int = option(512, "tokens, BOS included")
    num_negatives: int = option(4, "hard negatives kept per query")
    num_proc: int = option(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        "tokenizer processes (this machine's cores)",
    )
    skip_invalid: bool = option(False, "skip queries with an empty pos_doc/neg_doc")
    overwrite: bool = option(False, "rebuild --output-dir even if it is complete")
    inspect: str | None = option(None, "print the summary of a prepared folder", metavar="OUTPUT_DIR")
    index: int | None = option(None, "with --inspect: print query INDEX (0-based) decoded, as JSON")

    def validate(self) -> None:
        if self.inspect is None and self.index is not None:
            raise UserError("--index only goes with --inspect OUTPUT_DIR")
        if self.inspect is not None:
            return
        if self.download_path is None and not self.jsonl:
            self.download_path = DEFAULT_DOWNLOAD_PATH
        if self.download_path is None and self.subsets is not None:
            raise UserError("--subsets picks subsets of --download-path; give --download-path too")
        if self.download_path is not None and self.subsets is None:
            self.subsets = list(RECIPE_SUBSETS)
        for name in ("query_max_len", "passage_max_len"):
            if getattr(self, name) < 2:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} must be >= 2 (BOS + one token), got {getattr(self, name)}")
        if self.num_negatives < 0:
            raise UserError(f"--num-negatives must be >= 0, got {self.num_negatives}")
        if self.num_proc < 1:
            raise UserError(f"--num-proc must be >= 1, got {self.num_proc}")
        for path in self.jsonl:
            if not Path(path).is_file():
                raise UserError(f"--jsonl {path}: no such file")
        names = self.subset_names()
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UserError(f"subset names must be unique (a JSONL file is named by its stem): {duplicates}")

    def subset_names(self) -> list[str]:
        return list(self.subsets or []) + [Path(p).stem for p in self.jsonl]

    def settings(self) -> dict:
        return {
            "tokenizer": self.tokenizer,
            "query_max_len": self.query_max_len,
            "passage_max_len": self.passage_max_len,
            "num_negatives": self.num_negatives,
            "subsets": self.subset_names(),
            "skip_invalid": self.skip_invalid,
        }


def parse_args(argv=None) -> Config:
    return parse_config(Config, argv, __doc__.split("\n\n")[0])


# ----------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(name: str):
    from transformers import AutoTokenizer  # slow import, only where needed

    tok = load_pretrained(AutoTokenizer.from_pretrained, name, "--tokenizer", "tokenizer")
    if not tok.is_fast:
        raise UserError(f"--tokenizer {name}: needs a fast (Rust) tokenizer, got {type(tok).__name__}")
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id; Llama-3's 128,256 ids need uint32."""
    for dtype in (np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise UserError(f"vocab size {vocab_size} does not fit uint32")


class ShardTokenizer:
    """Tokenizes lists of texts exactly as `tokenizer(texts, truncation=True, max_length=L)` does.

    It calls the tokenizer's Rust backend directly (the object transformers calls, minus the
    Python BatchEncoding), enabling truncation the way transformers enables it. Worker processes
    rebuild the backend with `tokenizers` alone (see backend_source), without transformers.
    """

    def __init__(self, backend, vocab_size: int, truncation_side: str, tokenizer_name: str):
        self.backend, self.vocab_size, self.name = backend, vocab_size, tokenizer_name
        self.truncation_side = truncation_side
        self.num_cut = 0  # texts tokenized from their first CUT_CHARS * max_len characters
        self.backend.no_padding()
        # Cutting long texts is exact for tokenizers like Llama-3's: special tokens only in front
        # (BOS), truncation keeping the head, no normalizer, and added tokens (<|eot_id|>, ...)
        # matched literally, with no whitespace stripping around them.
        added = list(backend.get_added_tokens_decoder().values())
        self.max_added = max((len(t.content) for t in added), default=0)
        probe = self._truncate(None).encode("a b", add_special_tokens=True)
        self.cut_long_texts = (
            truncation_side == "right"
            and probe.special_tokens_mask[-1] == 0
            and backend.normalizer is None
            and not any(t.lstrip or t.rstrip or t.single_word for t in added)
        )

    def _truncate(self, max_len: int | None):
        """The backend with truncation set as transformers sets it (or off); a no-op when already so."""
        if max_len is None:
            if self.backend.truncation is not None:
                self.backend.no_truncation()
        else:
            target = {
                "max_length": max_len,
                "stride": 0,
                "strategy": "longest_first",
                "direction": self.truncation_side,
            }
            current = self.backend.truncation
            if current is None or {k: current.get(k) for k in target} != target:
                self.backend.enable_truncation(**target)
        return self.backend

    @staticmethod
    def _cut_is_exact(e, limit: int, max_len: int) -> bool:
        """Whether the first max_len tokens of a cut text are those of the whole text.

        Tokenization first splits out added tokens (matched literally, at most max_added
        characters long, so every match starting before `limit` = cut - max_added is the same in
        the cut and the whole text), then splits each piece into words with a regex and tokenizes
        each word on its own. A word whose regex match ended by looking at the cut (the last one,
        and one before it, e.g. "\\s*[\\r\\n]+" backing off a run of blanks) can differ; so the kept
        tokens must come from words at least two before the last word that ends before `limit`.
        """
        w, offsets = e.word_ids, e.offsets
        kept = w[max_len - 1]
        before = [w[t] for t in range(max_len, len(w)) if w[t] is not None and offsets[t][1] <= limit]
        return kept is not None and bool(before) and kept + 2 <= max(before)

    def encode(self, texts: list[str], max_len: int) -> list[list[int]]:
        ids = [None] * len(texts)
        long = [i for i, t in enumerate(texts) if len(t) > LONG_CHARS * max_len] if self.cut_long_texts else []
        if long:
            cut = [texts[i][: CUT_CHARS * max_len] for i in long]
            for i, text, e in zip(long, cut, self._truncate(None).encode_batch(cut), strict=True):
                if len(e.ids) > max_len and self._cut_is_exact(e, len(text) - self.max_added, max_len):
                    ids[i] = e.ids[:max_len]
                    self.num_cut += 1
        backend = self._truncate(max_len)
        if not long:
            return [e.ids for e in backend.encode_batch_fast(texts)]
        rest = [i for i, x in enumerate(ids) if x is None]
        for i, e in zip(rest, backend.encode_batch_fast([texts[i] for i in rest]), strict=True):
            ids[i] = e.ids
        return ids

    def encode_flat(self, texts: list[str], prompt: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of prompt + text (common.prompt_prefix: "" or the instruction and one space),
        back to back, and lengths."""
        if prompt:
            texts = [prompt + t for t in texts]
        ids = self.encode(texts, max_len)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise UserError(
                f"tokenizer {self.name} produced token id {int(tokens.max())} >= its vocab size {self.vocab_size} "
                f"(len(tokenizer)); its vocabulary is inconsistent, use another tokenizer"
            )
        return tokens, lengths


_worker: ShardTokenizer | None = None  # one per process, set by init_worker


def backend_source(tok, name: str) -> tuple[str, str]:
    """How a worker rebuilds the tokenizer's backend: ("file", path) of the tokenizer.json it was
    loaded from when that file gives the very same backend, else ("json", the backend's JSON).
    The file is worth the check: a backend rebuilt from re-serialized JSON tokenizes ~15% slower
    (measured with Llama-3's tokenizer, tokenizers 0.23; same ids)."""
    from tokenizers import Tokenizer

    backend_json = tok.backend_tokenizer.to_str()
    path = Path(name) / "tokenizer.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "tokenizer.json")
        path = Path(cached) if isinstance(cached, str) else None
    if path is not None and Tokenizer.from_file(str(path)).to_str() == backend_json:
        return "file", str(path)
    return "json", backend_json


def init_worker(source: tuple[str, str], vocab_size: int, truncation_side: str, name: str) -> None:
    """Pool initializer: one ShardTokenizer per worker process."""
    from tokenizers import Tokenizer

    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process: --num-proc decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    kind, value = source
    backend = Tokenizer.from_file(value) if kind == "file" else Tokenizer.from_str(value)
    _worker = ShardTokenizer(backend, vocab_size, truncation_side, name)


def encode_shard(texts: list[str], prompt: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    return _worker.encode_flat(texts, prompt, max_len)


# ----------------------------------------------------------------------------------------------
# Inputs: download, ids_only restore, reading with checks


def missing_files(subset_dir: Path) -> list[str]:
    """Files of the HF layout absent from a subset folder (source_config.json only for ids_only)."""
    missing = [
        f for f in ("dataset_metadata.json", "queries.parquet", "corpus.parquet") if not (subset_dir / f).is_file()
    ]
    meta_path = subset_dir / "dataset_metadata.json"
    if meta_path.is_file() and not (subset_dir / "source_config.json").is_file():
        try:
            if json.loads(meta_path.read_text()).get("ids_only"):
                missing.append("source_config.json")
        except (OSError, ValueError):
            pass  # there but unreadable: reading it later gives the error that names it
    return missing


def subset_is_downloaded(subset_dir: Path) -> bool:
    return not missing_files(subset_dir)


def fetch_hf_subsets(root: Path, names: list[str]) -> None:
    """Download the subsets not yet in `root` (resumable, with progress bars), then restore ids_only text."""
    missing = [n for n in names if not subset_is_downloaded(root / n)]
    if missing:
        print(f"downloading {missing} from {REPO_ID} into {root}", flush=True)
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(REPO_ID, repo_type="dataset", local_dir=root, allow_patterns=[f"{n}/*" for n in missing])
        except Exception as e:  # network, auth, unknown repo: all end here, with the cause attached
            absent = [str(root / n / f) for n in missing for f in missing_files(root / n)]
            raise DataError(
                f"missing {absent}, and downloading them from {REPO_ID} failed ({type(e).__name__}: {e}); "
                f"offline, put those subset folders under {root}"
            ) from e
        for n in missing:
            if not subset_is_downloaded(root / n):
                raise DataError(
                    f"{root / n}: still missing {missing_files(root / n)} after the download "
                    f"(is {n!r} a subset of {REPO_ID}?)"
                )
    for n in names:
        if read_json(root / n / "dataset_metadata.json").get("ids_only"):
            queries, corpus = subset_files(root / n)
            if not (queries.is_file() and corpus.is_file()):
                restore_ids_only(root / n)


def _lookup_text(ids: pa.ChunkedArray, texts: pa.ChunkedArray, prefix: str, path: Path) -> pa.ChunkedArray:
    """Texts for ids "{prefix}{i}" = row i of `texts` (the convention of embed-nemotron's ids_only subsets)."""
    ids = pc.cast(ids, pa.string())
    ok = pc.match_substring_regex(ids, rf"^{prefix}[0-9]+$").fill_null(False)
    if not pc.all(ok).as_py():
        bad = ids.filter(pc.invert(ok))[0].as_py()
        raise DataError(f"{path}: id {bad!r} is not of the form {prefix}<row>")
    rows = pc.cast(pc.utf8_slice_codeunits(ids, len(prefix)), pa.int64())
    too_big = pc.greater_equal(rows, len(texts))
    if pc.any(too_big).as_py():
        bad = ids.filter(too_big)[0].as_py()
        raise DataError(f"{path}: id {bad!r} is past the {len(texts)} rows of the source")
    return pc.cast(texts, pa.large_string()).take(rows)


def restore_ids_only(subset_dir: Path) -> None:
    """Write queries/corpus.restored.parquet with the text of an ids_only subset's public source.

    source_config.json: {"loader_config": "mteb", "source_repo": R} (queries = load_dataset(R,
    "queries")["text"], corpus = load_dataset(R, "corpus")["text"]) or {"loader_config": "column",
    "source_repo": R, ["subset": S,] "split": P, "query_column": Q, "document_column": D}; in both
    the subset's question "q_{i}" / document id "d_{i}" is row i. The downloaded files stay as they
    are, so the download stays resumable and checkable.
    """
    import datasets

    config_path = subset_dir / "source_config.json"
    config = read_json(config_path)
    loader, repo = config.get("loader_config"), config.get("source_repo")
    if loader not in ("mteb", "column") or not isinstance(repo, str):
        raise DataError(f"{config_path}: needs loader_config 'mteb' or 'column' and a source_repo, got {config}")
    print(f"restoring the text of {subset_dir.name} from {repo} ({loader})", flush=True)
    try:
        if loader == "mteb":
            q_texts = datasets.load_dataset(repo, "queries", split="queries").data.column("text")
            d_texts = datasets.load_dataset(repo, "corpus", split="corpus").data.column("text")
        else:
            source = datasets.load_dataset(repo, *[config["subset"]] * ("subset" in config), split=config["split"])
            q_texts = source.data.column(config["query_column"])
            d_texts = source.data.column(config["document_column"])
    except KeyError as e:
        raise DataError(f"{config_path}: missing key or column {e}") from e
    except Exception as e:  # network, auth, unknown repo: all end here, with the cause attached
        raise DataError(f"{config_path}: cannot load the source {repo} ({type(e).__name__}: {e})") from e
    queries_path, corpus_path = subset_dir / "queries.parquet", subset_dir / "corpus.parquet"
    queries = read_parquet(queries_path, ["question"], everything=True)  # every column, as downloaded
    corpus = read_parquet(corpus_path, ["id"])
    question = _lookup_text(queries["question"], q_texts, "q_", queries_path)
    queries = queries.set_column(queries.schema.get_field_index("question"), "question", question)
    corpus = pa.table({"id": corpus["id"], "text": _lookup_text(corpus["id"], d_texts, "d_", corpus_path)})
    for table, name in ((queries, "queries.restored.parquet"), (corpus, "corpus.restored.parquet")):
        with atomic_file(subset_dir / name) as tmp:  # a crash leaves no half-restored file
            pq.write_table(table, tmp)


# ----------------------------------------------------------------------------------------------
# Pass 1: plan every subset (validate, pick the examples, number the documents); no text kept


class DocIndex:
    """Numbers documents globally in first-reference order; a key (group, id) gets one number.

    group = (corpus_id, passage_instruction) for the HF layout, ("<jsonl>", "") for JSONL where
    the id is the text itself: the same document with the same prompt is tokenized once.
    """

    def __init__(self):
        self.groups: dict[tuple, tuple[pa.Array, np.ndarray]] = {}
        self.size = 0

    def assign(self, group: tuple, refs: pa.Array) -> tuple[np.ndarray, pa.Array, np.ndarray]:
        """Global index of every ref, the ids new to the index (in order) and each one's first ref position."""
        encoded = refs.dictionary_encode()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        uniq, first = np.unique(codes, return_index=True)
        order = np.argsort(first, kind="stable")  # first-reference order
        uniq, first = uniq[order], first[order]
        ids = encoded.dictionary.take(pa.array(uniq))
        known_ids, known_index = self.groups.get(group, (ids.slice(0, 0), np.zeros(0, np.int64)))
        pos = pc.index_in(ids, value_set=known_ids).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        is_new = pos < 0
        index = np.empty(len(ids), np.int64)
        index[~is_new] = known_index[pos[~is_new]]
        index[is_new] = self.size + np.arange(int(is_new.sum()))
        self.size += int(is_new.sum())
        new_ids = ids.filter(pa.array(is_new))
        self.groups[group] = (pa.concat_arrays([known_ids, new_ids]), np.concatenate([known_index, index[is_new]]))
        code_index = np.empty(len(encoded.dictionary), np.int64)
        code_index[uniq] = index
        return code_index[codes], new_ids, first[is_new]


@dataclass
class Plan:
    """One subset, ready to tokenize: which queries, which new documents, and their doc indices."""

    name: str
    source: str
    corpus_id: str | None
    query_instruction: str | None
    passage_instruction: str
    query_docs: np.ndarray  # (n, 1 + num_negatives) global document indices
    skipped: int
    # HF layout: rows to take from the parquet files in pass 2 (text is not kept in memory); the new
    # documents come from one or more corpora (rows naming another subset's corpus_id), part by part
    queries_file: Path | None = None
    query_rows: np.ndarray | None = None
    doc_parts: list[tuple[Path, np.ndarray]] | None = None  # (corpus.parquet, rows) in document order
    # what the reference accepts and this preparation does the same way, counted (see plan_hf_subset)
    quirks: dict | None = None
    # JSONL: the texts themselves (query text with its prompt already applied)
    query_texts: list[str] | None = None
    doc_texts: pa.Array | None = None

    @property
    def query_prompt(self) -> str | None:
        """The exact string before every query's text; None for JSONL lines with prompts of their own."""
        return None if self.query_instruction is None else prompt_prefix(self.query_instruction)

    @property
    def passage_prompt(self) -> str:
        return prompt_prefix(self.passage_instruction)

    @property
    def num_queries(self) -> int:
        return len(self.query_docs)

    @property
    def num_new_docs(self) -> int:
        if self.doc_parts is not None:
            return sum(len(rows) for _, rows in self.doc_parts)
        return len(self.doc_texts)


def example_columns(rows: np.ndarray, pos_offsets: np.ndarray, neg_offsets: np.ndarray, k: int) -> np.ndarray:
    """(len(rows), 1 + k) positions into concat(pos ids, neg ids): pos_doc[0], then neg_doc[j % len(neg_doc)]."""
    n_neg = np.diff(neg_offsets)[rows]
    m = np.empty((len(rows), 1 + k), np.int64)
    m[:, 0] = pos_offsets[rows]
    for j in range(k):
        m[:, 1 + j] = pos_offsets[-1] + neg_offsets[rows] + j % n_neg
    return m


def invalid_rows(n_pos: np.ndarray, n_neg: np.ndarray, k: int, skip_invalid: bool, describe) -> np.ndarray:
    """Mask of queries with no positive (or no negative when k > 0); an error unless skip_invalid."""
    invalid = (n_pos == 0) | ((n_neg == 0) & (k > 0))
    if invalid.any() and not skip_invalid:
        row = int(np.flatnonzero(invalid)[0])
        field_name = "pos_doc" if n_pos[row] == 0 else "neg_doc"
        raise DataError(f"{describe(row)} has an empty {field_name}; pass --skip-invalid to skip such queries")
    return invalid


def corpus_rows(corpus_file: Path, ids: pa.Array) -> tuple[pa.Array, dict]:
    """Row of each id in corpus.parquet (null where absent), after checking the corpus's columns, and
    the corpus's duplicate ids ({"count", "example"}). As in the reference, which builds a dict of the
    corpus, the LAST row of a duplicate id is the document."""
    schema = parquet_schema(corpus_file)
    if "text" not in schema.names:
        raise DataError(f"{corpus_file}: missing column(s) ['text']; it has {schema.names}")
    text_type = schema.field("text").type  # the text itself is read in pass 2
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise DataError(f"{corpus_file}: column 'text' must hold strings, got {text_type}")
    corpus_ids = string_ids(read_parquet(corpus_file, ["id"])["id"].combine_chunks(), corpus_file, "id")
    if corpus_ids.null_count:
        raise DataError(f"{corpus_file}: row {first_true(corpus_ids.is_null())} has a null id")
    dup = duplicates(corpus_ids)
    last_first = corpus_ids[::-1]  # index_in finds the first occurrence: search the reversed ids
    found = pc.index_in(ids, value_set=last_first).to_numpy(zero_copy_only=False)
    rows = pa.array(len(corpus_ids) - 1 - found, pa.int64(), from_pandas=True)  # NaN (absent) -> null
    return rows, dup


def duplicates(ids: pa.Array) -> dict:
    """{"count": ids that occur more than once, "example": the first such id or None}."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return {"count": 0, "example": None}
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    return {"count": len(dup), "example": dup[0]["values"].as_py()}


def plan_hf_subset(subset_dir: Path, cfg: Config, docs: DocIndex, corpora: dict[str, Path] | None = None) -> Plan:
    """One subset of the HF layout. `corpora`: corpus_id -> subset folder, for every subset of the run.

    Where the published data may differ from a clean layout, this does what the reference does (and
    counts it in meta.json, with a warning): duplicate question ids are kept (queries are a plain
    list); of duplicate corpus ids the last row wins; a row whose corpus_id is not the subset's takes
    its documents from the corpus of that id (another subset of the run). A row naming a corpus that is
    not in the run cannot be trained on, there as here, and stops the preparation.
    """
    k = cfg.num_negatives
    meta_path = subset_dir / "dataset_metadata.json"
    meta = subset_metadata(subset_dir)
    corpora = corpora or {meta["corpus_id"]: subset_dir}
    if meta.get("class", "TextQADataset") != "TextQADataset":
        raise DataError(f"{meta_path}: class {meta['class']!r} is not supported (only TextQADataset)")
    instructions = {}
    for key in ("query_instruction", "passage_instruction"):
        value = meta.get(key) or ""
        if not isinstance(value, str):
            raise DataError(f"{meta_path}: {key} must be a string, got {type(value).__name__}")
        instructions[key] = value
    queries_file, corpus_file = subset_files(subset_dir)
    if meta.get("ids_only") and not queries_file.is_file():
        raise DataError(
            f"{queries_file}: missing; restore the ids_only subset first (prepare_data.py does it "
            f"when the source named in {subset_dir / 'source_config.json'} can be downloaded)"
        )

    columns = ["question_id", "question", "pos_doc", "neg_doc"]
    optional = [c for c in ["corpus_id"] if c in parquet_schema(queries_file).names]
    table = read_parquet(queries_file, columns + optional)
    qids = string_ids(table["question_id"].combine_chunks(), queries_file, "question_id")
    if qids.null_count:
        raise DataError(f"{queries_file}: row {first_true(qids.is_null())} has a null question_id")

    def describe(row: int) -> str:
        return f"{queries_file}: query {qids[row].as_py()!r} (row {row})"

    quirks = {"duplicate_question_ids": duplicates(qids)}
    question = table["question"]
    if not (pa.types.is_string(question.type) or pa.types.is_large_string(question.type)):
        raise DataError(f"{queries_file}: column 'question' must hold strings, got {question.type}")
    if question.null_count:
        raise DataError(f"{describe(first_true(question.is_null()))}: question is null")
    # The reference looks each query's documents up in the corpus its row names.
    if "corpus_id" in table.column_names:
        row_corpus = pc.cast(table["corpus_id"], pa.string()).combine_chunks().fill_null(meta["corpus_id"])
    else:
        row_corpus = pa.array([meta["corpus_id"]] * len(table), pa.string())
    other = pc.not_equal(row_corpus, meta["corpus_id"])
    quirks["rows_of_another_corpus"] = {
        "count": int(pc.sum(other).as_py() or 0),
        "example": row_corpus[first_true(other)].as_py() if pc.any(other).as_py() else None,
    }

    pos_off, pos_ids = doc_id_lists(table["pos_doc"], queries_file, "pos_doc", qids)
    neg_off, neg_ids = doc_id_lists(table["neg_doc"], queries_file, "neg_doc", qids)
    n_pos, n_neg = np.diff(pos_off), np.diff(neg_off)
    invalid = invalid_rows(n_pos, n_neg, k, cfg.skip_invalid, describe)
    rows = np.flatnonzero(~invalid)
    m = example_columns(rows, pos_off, neg_off, k)
    refs = pa.concat_arrays([pos_ids, neg_ids]).take(pa.array(m.reshape(-1)))
    row_corpus = row_corpus.take(pa.array(rows)).to_numpy(zero_copy_only=False)
    query_docs = np.empty((len(rows), 1 + k), np.int64)
    doc_parts, dup_docs = [], {"count": 0, "example": None}
    for corpus_id in dict.fromkeys(row_corpus):  # this subset's corpus first when its rows come first
        if corpus_id not in corpora:
            q = int(np.flatnonzero(row_corpus == corpus_id)[0])
            raise DataError(
                f"{describe(int(rows[q]))}: corpus_id {corpus_id!r} is neither {meta['corpus_id']!r} of {meta_path} "
                f"nor the corpus_id of another subset of this run ({sorted(corpora)})"
            )
        sel = np.flatnonzero(row_corpus == corpus_id)
        part_dir = corpora[corpus_id]
        part_meta = meta if part_dir == subset_dir else subset_metadata(part_dir)
        if (part_meta.get("passage_instruction") or "") != instructions["passage_instruction"]:
            raise DataError(
                f"{describe(int(rows[sel[0]]))}: its documents come from corpus {corpus_id!r} ({part_dir}), whose "
                f"passage_instruction differs from {meta_path}'s; such rows are not supported"
            )
        part_refs = refs.take(pa.array((sel[:, None] * (1 + k) + np.arange(1 + k)).reshape(-1)))
        index, new_ids, first_ref = docs.assign((corpus_id, instructions["passage_instruction"]), part_refs)
        query_docs[sel] = index.reshape(len(sel), 1 + k)
        part_file = subset_files(part_dir)[1]
        doc_rows, dup = corpus_rows(part_file, new_ids)
        if part_dir == subset_dir:  # counted for the subset that owns the corpus
            dup_docs = dup
        if doc_rows.null_count:
            at = first_true(doc_rows.is_null())
            q, col = divmod(int(first_ref[at]), 1 + k)
            role = "positive" if col == 0 else f"negative {col}"
            raise DataError(
                f"{describe(int(rows[sel[q]]))}: {role} document id {new_ids[at].as_py()!r} is not in {part_file}"
            )
        doc_parts.append((part_file, doc_rows.to_numpy(zero_copy_only=False).astype(np.int64)))
    quirks["duplicate_corpus_ids"] = dup_docs
    return Plan(
        name=subset_dir.name,
        source=str(subset_dir),
        corpus_id=meta["corpus_id"],
        query_instruction=instructions["query_instruction"],
        passage_instruction=instructions["passage_instruction"],
        query_docs=query_docs,
        skipped=int(invalid.sum()),
        queries_file=queries_file,
        query_rows=rows,
        doc_parts=doc_parts,
        quirks=quirks,
    )


def plan_jsonl(path: Path, cfg: Config, docs: DocIndex) -> Plan:
    """One FlagEmbedding-style JSONL file: {"query": str, "pos": [str], "neg": [str], "prompt": str}."""
    k = cfg.num_negatives
    queries, refs, prompts = [], [], set()
    skipped = 0
    for lineno, line in jsonl_lines(path):
        query, pos, neg, prompt = parse_jsonl_line(line, f"{path}:{lineno}")
        if not pos or (k > 0 and not neg):
            if not cfg.skip_invalid:
                empty = "pos" if not pos else "neg"
                raise DataError(f"{path}:{lineno}: empty {empty!r}; pass --skip-invalid to skip such queries")
            skipped += 1
            continue
        prompts.add(prompt)
        queries.append(with_prompt(prompt, query))
        refs.append(pos[0])
        refs.extend(neg[j % len(neg)] for j in range(k))
    index, new_texts, _ = docs.assign(("<jsonl>", ""), pa.array(refs, type=pa.large_string()))
    return Plan(
        name=path.stem,
        source=str(path),
        corpus_id=None,
        query_instruction=prompts.pop() if len(prompts) == 1 else (None if prompts else ""),  # None: per line
        passage_instruction="",
        query_docs=index.reshape(len(queries), 1 + k),
        skipped=skipped,
        query_texts=queries,
        doc_texts=new_texts,
    )


def plan_all(cfg: Config) -> list[Plan]:
    docs = DocIndex()
    plans = []
    if cfg.download_path is not None:
        root = Path(cfg.download_path)
        corpora = {subset_metadata(root / name)["corpus_id"]: root / name for name in cfg.subsets}
        plans += [plan_hf_subset(root / name, cfg, docs, corpora) for name in cfg.subsets]
    plans += [plan_jsonl(Path(p), cfg, docs) for p in cfg.jsonl]
    for p in plans:
        if p.skipped:
            print(f"{p.name}: skipped {p.skipped} queries with an empty pos_doc or neg_doc (--skip-invalid)")
        for what, seen in (p.quirks or {}).items():
            if seen["count"]:
                print(
                    f"warning: {p.name}: {seen['count']} {what.replace('_', ' ')} (e.g. {seen['example']!r}); "
                    "treated as the reference does (README: prepare_data.py)",
                    file=sys.stderr,
                )
    if sum(p.num_queries for p in plans) == 0:
        raise DataError(f"no queries to prepare in {[p.source for p in plans]}")
    return plans


# ----------------------------------------------------------------------------------------------
# Pass 2: tokenize in shards (in parallel), append to the arrays


def npy_header(dtype: np.dtype, length: int, size: int = 128) -> bytes:
    """A .npy v1.0 header of exactly `size` bytes for a 1-D array, so it can be rewritten in place."""
    descr = np.lib.format.dtype_to_descr(dtype)
    header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({length},), }}"
    header = header.ljust(size - 10 - 1) + "\n"
    assert len(header) == size - 10, header
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1")


class TokenFile:
    """Appends token ids to a .npy file; its header gets the final length on close."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype.newbyteorder("<")
        self.file = open(path, "wb")
        self.file.write(npy_header(self.dtype, 0))
        self.sha = hashlib.sha256()
        self.lengths: list[np.ndarray] = []
        self.size = 0

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens.astype(self.dtype, copy=False))
        self.file.write(data.data)
        self.sha.update(data.data)
        self.lengths.append(lengths)
        self.size += data.size

    def close(self) -> tuple[np.ndarray, dict]:
        """Offsets (n + 1,) int64 and this file's meta entry."""
        self.file.seek(0)
        self.file.write(npy_header(self.dtype, self.size))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        assert offsets[-1] == self.size
        entry = {"sha256": self.sha.hexdigest(), "shape": [self.size], "dtype": str(np.dtype(self.dtype.str))}
        return offsets, entry


def save_array(path: Path, array: np.ndarray) -> dict:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": sha256_of(array), "shape": list(array.shape), "dtype": str(array.dtype)}


def subset_texts(plan: Plan) -> tuple[pa.ChunkedArray | list, pa.ChunkedArray | list]:
    """(query texts, document texts) of a plan, read from the files in pass 2."""
    if plan.query_texts is not None:
        return plan.query_texts, plan.doc_texts
    question = pq.read_table(plan.queries_file, columns=["question"])["question"]
    question = pc.cast(question, pa.large_string()).take(pa.array(plan.query_rows))
    parts = []
    for corpus_file, rows in plan.doc_parts:
        text = pq.read_table(corpus_file, columns=["text"])["text"]
        text = pc.cast(text, pa.large_string()).take(pa.array(rows))
        if text.null_count:
            at = first_true(text.is_null())
            doc_id = pq.read_table(corpus_file, columns=["id"])["id"][int(rows[at])].as_py()
            raise DataError(f"{corpus_file}: document {doc_id!r} (row {int(rows[at])}) has a null text")
        parts += text.chunks
    return question, pa.chunked_array(parts, pa.large_string())


def shards(texts):
    for start in range(0, len(texts), SHARD_TEXTS):
        part = texts[start : start + SHARD_TEXTS]
        yield part if isinstance(part, list) else part.to_pylist()


def tokenize_all(cfg: Config, plans: list[Plan], tok, qf: TokenFile, df: TokenFile) -> list[tuple]:
    """Tokenize every plan's queries and new documents in order; returns samples for the final check."""
    samples = []  # (kind, global index, text) of the first and last query/new doc of each subset

    def tasks():
        q0, d0 = 0, 0
        for plan in plans:
            questions, texts = subset_texts(plan)
            q_prompt = "" if plan.query_texts is not None else plan.query_prompt  # JSONL: applied per line
            parts = (("query", questions, q_prompt, q0), ("doc", texts, plan.passage_prompt, d0))
            for kind, items, prompt, start in parts:
                if len(items):
                    for i in sorted({0, len(items) - 1}):
                        text = items[i] if isinstance(items, list) else items[i].as_py()
                        samples.append((kind, start + i, prompt + text))
                max_len = cfg.query_max_len if kind == "query" else cfg.passage_max_len
                for part in shards(items):
                    yield (qf if kind == "query" else df), part, prompt, max_len
            q0, d0 = q0 + plan.num_queries, d0 + plan.num_new_docs

    total = sum(p.num_queries + p.num_new_docs for p in plans)
    # A worker costs ~1 CPU second to start and a full task is ~0.5-1 s of work: no more workers
    # than full tasks, and none for inputs of a task or two (then this process tokenizes).
    num_tasks = sum(-(-n // SHARD_TEXTS) for p in plans for n in (p.num_queries, p.num_new_docs))
    num_proc = min(cfg.num_proc, total // SHARD_TEXTS)
    print(f"tokenizing {total:,} texts in {num_tasks:,} tasks with {num_proc} process(es)", flush=True)
    bar = tqdm(total=total, unit="text", desc="tokenizing", mininterval=1.0, smoothing=0.05)
    if num_proc <= 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, as each worker of --num-proc N
        encoder = ShardTokenizer(tok.backend_tokenizer, len(tok), tok.truncation_side, cfg.tokenizer)
        for out, part, prompt, max_len in tasks():
            out.append(*encoder.encode_flat(part, prompt, max_len))
            bar.update(len(part))
        bar.close()
        return samples
    worker_args = (backend_source(tok, cfg.tokenizer), len(tok), tok.truncation_side, cfg.tokenizer)
    # spawn, not fork: the parent holds pyarrow and tokenizer thread pools that fork would copy mid-state.
    pool = ProcessPoolExecutor(
        num_proc,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=worker_args,
    )
    pending = deque()
    try:
        for out, part, prompt, max_len in tasks():
            pending.append((out, len(part), pool.submit(encode_shard, part, prompt, max_len)))
            while len(pending) > 2 * num_proc or (pending and pending[0][2].done()):
                out_, n, future = pending.popleft()
                out_.append(*future.result())
                bar.update(n)
        while pending:
            out_, n, future = pending.popleft()
            out_.append(*future.result())
            bar.update(n)
    finally:
        pool.shutdown(wait=not pending, cancel_futures=True)
        bar.close()
    return samples


# ----------------------------------------------------------------------------------------------
# Output: build in a temp folder, check, then rename into place


def already_prepared(cfg: Config, out: Path) -> bool:
    """True when `out` is complete with these settings; an error when it holds anything else."""
    if not out.exists():
        return False
    if cfg.overwrite:
        return False
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("complete") is not True:
        raise UserError(
            f"--output-dir {out} exists but is not a complete prepared folder; remove it or pass --overwrite"
        )
    there = {k: meta.get(k) for k in SETTINGS}
    there["subsets"] = [s.get("name") for s in meta.get("subsets", [])]
    diffs = [f"{k}: {there[k]!r} there, {v!r} now" for k, v in cfg.settings().items() if there[k] != v]
    if meta.get("format_version") != FORMAT_VERSION:
        diffs.append(f"format_version: {meta.get('format_version')!r} there, {FORMAT_VERSION} now")
    if diffs:
        raise UserError(
            f"--output-dir {out} was prepared with other settings ({'; '.join(diffs)}); "
            f"pass --overwrite to rebuild it, or choose another --output-dir"
        )
    print(f"{out} is already prepared with these settings; nothing to do (--overwrite rebuilds it)")
    return True


def check_output(path: Path, tok, cfg: Config, samples: list[tuple]) -> None:
    """Re-read what was written: checksums, index ranges, and a few examples re-tokenized directly."""
    data = PreparedData(path)
    data.verify()
    assert data.query_docs.size == 0 or int(data.query_docs.max()) < data.num_docs
    assert np.all(np.diff(data.query_offsets) >= 0) and np.all(np.diff(data.doc_offsets) >= 0)
    for kind, i, text in samples:
        max_len = cfg.query_max_len if kind == "query" else cfg.passage_max_len
        expected = tok(text, truncation=True, max_length=max_len)["input_ids"]
        stored = (data.query(i) if kind == "query" else data.doc(i)).tolist()
        assert stored == expected, f"{kind} {i}: stored tokens differ from the tokenizer's"


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the tokenizer workers)."""
    me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + workers.ru_utime + workers.ru_stime


def write_prepared(cfg: Config, tok, plans: list[Plan], out: Path) -> dict:
    vocab_size = len(tok)
    dtype = token_dtype(vocab_size)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    # Built in <out>.tmp-<pid>, checked, then renamed into place (an existing folder, --overwrite, is
    # swapped only then); on any error, Ctrl-C included, the temp folder is removed.
    with atomic_dir(out) as tmp:
        qf, df = TokenFile(tmp / "query_tokens.npy", dtype), TokenFile(tmp / "doc_tokens.npy", dtype)
        samples = tokenize_all(cfg, plans, tok, qf, df)
        q_off, q_entry = qf.close()
        d_off, d_entry = df.close()
        query_docs = np.concatenate([p.query_docs for p in plans]).astype(np.int64)
        files = {
            "query_tokens.npy": q_entry,
            "query_offsets.npy": save_array(tmp / "query_offsets.npy", q_off),
            "doc_tokens.npy": d_entry,
            "doc_offsets.npy": save_array(tmp / "doc_offsets.npy", d_off),
            "query_docs.npy": save_array(tmp / "query_docs.npy", query_docs),
        }
        assert sorted(files) == sorted(f"{name}.npy" for name in ARRAYS)
        subsets, first = [], 0
        for p in plans:
            subsets.append(
                {
                    "name": p.name,
                    "source": p.source,
                    "corpus_id": p.corpus_id,
                    "query_instruction": p.query_instruction,
                    "passage_instruction": p.passage_instruction,
                    # the exact strings before each text, which the export gives sentence-transformers;
                    # query_prompt is null for JSONL files whose lines carry prompts of their own
                    "query_prompt": p.query_prompt,
                    "passage_prompt": p.passage_prompt,
                    "num_queries": p.num_queries,
                    "first_query": first,
                    "num_new_docs": p.num_new_docs,
                    "skipped": p.skipped,
                    **({"quirks": {k: v["count"] for k, v in p.quirks.items()}} if p.quirks else {}),
                }
            )
            first += p.num_queries
        meta = {
            "format_version": FORMAT_VERSION,
            "complete": True,
            **{k: v for k, v in cfg.settings().items() if k != "subsets"},  # subsets: below, with counts
            "vocab_size": vocab_size,
            "token_dtype": str(dtype),
            "num_queries": len(query_docs),
            "num_docs": len(d_off) - 1,
            "num_query_tokens": int(q_off[-1]),
            "num_doc_tokens": int(d_off[-1]),
            "bos_token_id": tok.bos_token_id,
            "pad_token_id": next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0),
            "subsets": subsets,
            "files": files,
        }
        with open(tmp / "meta.json", "w") as f:  # last: its presence marks the folder complete
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        check_output(tmp, tok, cfg, samples)
    dt, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    texts = meta["num_queries"] + meta["num_docs"]
    tokens = meta["num_query_tokens"] + meta["num_doc_tokens"]
    print(
        f"wrote {out}: {meta['num_queries']:,} queries, {meta['num_docs']:,} documents, {tokens:,} tokens "
        f"in {dt:.2f} s, {cpu:.2f} CPU s ({texts / dt:,.0f} texts/s, {tokens / dt:,.0f} tokens/s, "
        f"--num-proc {cfg.num_proc})"
    )
    return meta


# ----------------------------------------------------------------------------------------------
# Inspect


def inspect(cfg: Config) -> None:
    data = PreparedData(cfg.inspect)
    meta = data.meta
    if cfg.index is None:
        print(
            f"{data.path}: format {meta['format_version']}, tokenizer {meta['tokenizer']} "
            f"(vocab {meta['vocab_size']:,}, {meta['token_dtype']})"
        )
        print(
            f"queries {meta['num_queries']:,} ({meta['num_query_tokens']:,} tokens, max {meta['query_max_len']}), "
            f"documents {meta['num_docs']:,} ({meta['num_doc_tokens']:,} tokens, max {meta['passage_max_len']}), "
            f"1 positive + {meta['num_negatives']} negatives per query"
        )
        for s in meta["subsets"]:
            print(
                f"  {s['name']:<28} {s['num_queries']:>10,} queries from {s['first_query']:,}, "
                f"{s['num_new_docs']:,} new documents, {s['skipped']} skipped"
            )
        return
    if not 0 <= cfg.index < len(data):
        raise UserError(f"--index {cfg.index} is out of range: {data.path} has {len(data)} queries")
    tok = load_tokenizer(meta["tokenizer"])

    def decode(ids: np.ndarray) -> str:
        return tok.decode(ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    row = data.query_docs[cfg.index]
    example = {
        "query": decode(data.query(cfg.index)),
        "positive": decode(data.doc(int(row[0]))),
        "negatives": [decode(data.doc(int(j))) for j in row[1:]],
    }
    print(json.dumps(example, ensure_ascii=False))


def main(argv=None) -> None:
    """Errors a user can fix raise UserError (DataError included); run_cli prints them without a traceback."""
    cfg = parse_args(argv)
    if cfg.inspect is not None:
        inspect(cfg)
        return
    print("config:", json.dumps(dataclasses.asdict(cfg)), flush=True)
    out = Path(cfg.output_dir)
    if already_prepared(cfg, out):
        return
    tok = load_tokenizer(cfg.tokenizer)
    if cfg.download_path is not None:
        fetch_hf_subsets(Path(cfg.download_path), cfg.subsets)
    plans = plan_all(cfg)
    write_prepared(cfg, tok, plans, out)


if __name__ == "__main__":
    sys.exit(run_cli(main))
