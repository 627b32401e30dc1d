"""Readers of the input layouts, shared by every script that reads them: the embed-nemotron v1
subsets (parquet, as on the Hugging Face Hub), FlagEmbedding-style JSONL, and BEIR folders. Each
reader checks what it reads and names the file, row or line of a problem (DataError / UserError).
The prepared format that training reads is dataset.py's."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import UserError, read_json_file


class DataError(UserError):
    """Bad input data; the message names the file and the row or id."""


# ----------------------------------------------------------------------------------------------
# embed-nemotron v1 subsets: dataset_metadata.json, queries.parquet, corpus.parquet


def read_json(path: Path) -> dict:
    return read_json_file(path, error=DataError)


def parquet_schema(path: Path) -> pa.Schema:
    if not path.is_file():
        raise DataError(f"{path}: missing file")
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e


def read_parquet(path: Path, columns: list[str], everything: bool = False) -> pa.Table:
    """The table's `columns` (or every column when `everything`), after checking that `columns` exist."""
    names = parquet_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; it has {names}")
    try:
        return pq.read_table(path, columns=None if everything else columns)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e


def subset_files(subset_dir: Path) -> tuple[Path, Path]:
    """(queries, corpus) parquet files of a subset: the restored copies for ids_only subsets."""
    meta = read_json(subset_dir / "dataset_metadata.json")
    if meta.get("ids_only"):
        return subset_dir / "queries.restored.parquet", subset_dir / "corpus.restored.parquet"
    return subset_dir / "queries.parquet", subset_dir / "corpus.parquet"


def subset_metadata(subset_dir: Path) -> dict:
    meta_path = subset_dir / "dataset_metadata.json"
    meta = read_json(meta_path)
    if not isinstance(meta.get("corpus_id"), str) or not meta["corpus_id"]:
        raise DataError(f"{meta_path}: needs a non-empty string 'corpus_id'")
    return meta


def first_true(mask) -> int:
    """Index of the first true value of a boolean (pyarrow or numpy) array."""
    return int(
        np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False) if hasattr(mask, "to_numpy") else mask))[0]
    )


def string_ids(values: pa.Array, path: Path, what: str) -> pa.Array:
    """Ids as strings ("Ids may be strings or ints: compare them as strings": the published data layout)."""
    if not (
        pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_integer(values.type)
    ):
        raise DataError(f"{path}: {what} must be strings or integers, got {values.type}")
    return pc.cast(values, pa.string())


def doc_id_lists(column: pa.ChunkedArray, path: Path, name: str, question_ids: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(offsets (n+1,), flat string ids) of a list<struct<id>> (or list<id>) column; null lists are empty."""
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise DataError(f"{path}: column {name!r} must be a list of {{'id': ...}}, got {column.type}")
    lists = column.combine_chunks()
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = lists.flatten()
    if pa.types.is_null(values.type) and len(values) == 0:  # every list empty: no element type was inferred
        values = pa.array([], pa.string())
    if pa.types.is_struct(values.type):
        if values.type.get_field_index("id") < 0:
            raise DataError(f"{path}: column {name!r} holds structs without an 'id' field ({values.type})")
        values = pc.struct_field(values, "id")
    values = string_ids(values, path, f"{name} ids")
    if values.null_count:
        row = int(np.searchsorted(offsets, first_true(values.is_null()), side="right") - 1)
        raise DataError(f"{path}: query {question_ids[row].as_py()!r} (row {row}): a {name} entry has a null id")
    return offsets, values


# ----------------------------------------------------------------------------------------------
# JSONL: {query, pos, neg, prompt} per line


def jsonl_lines(path: Path):
    """(line number, text) of every non-blank line of a UTF-8 JSONL file, read line by line."""
    with open(path, "rb") as f:  # bytes, so that a decoding error names its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e})") from e
            if line.strip():
                yield lineno, line


def parse_jsonl_line(line: str, where: str) -> tuple[str, list[str], list[str], str]:
    """(query, pos, neg, prompt) of one line, checked; a missing "neg" is an empty list."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("query", "pos"):
        if key not in obj:
            raise DataError(f"{where}: missing key {key!r}")
    query, pos, neg, prompt = obj["query"], obj["pos"], obj.get("neg", []), obj.get("prompt") or ""
    for key, value in (("query", query), ("prompt", prompt)):
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    for key, value in (("pos", pos), ("neg", neg)):
        if not isinstance(value, list):
            raise DataError(f"{where}: {key!r} must be a list of strings, got {type(value).__name__}")
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise DataError(f"{where}: {key}[{i}] must be a string, got {type(text).__name__}")
    return query, pos, neg, prompt


# ----------------------------------------------------------------------------------------------
# BEIR: corpus.jsonl, queries.jsonl, qrels/<split>.tsv


def doc_text(title: str, text: str) -> str:
    """title + ". " + text; just a space when the title already ends in . ? or !; text alone
    when there is no title. Matches data/scifact/corpus.parquet (see data/README.md)."""
    title, text = title.strip(), text.strip()
    if not title:
        return text
    sep = " " if title.endswith((".", "?", "!")) else ". "
    return (title + sep + text).strip()


def read_beir_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
            if "_id" not in row or "text" not in row:
                raise UserError(f"{path}:{n}: every line needs '_id' and 'text' (BEIR layout)")
            rows.append(row)
    return rows


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """qrels/<split>.tsv -> {query id: {doc id: relevance}}. The header line is optional."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\r\n").split("\t")
            if fields == [""]:
                continue
            if len(fields) != 3:
                raise UserError(f"{path}:{n}: expected 3 tab-separated fields (query-id, corpus-id, score)")
            try:
                score = int(fields[2])
            except ValueError:
                if n == 1:
                    continue  # the header: query-id, corpus-id, score
                raise UserError(f"{path}:{n}: score {fields[2]!r} is not an integer") from None
            qrels.setdefault(fields[0], {})[fields[1]] = score
    return qrels


def beir_files(beir_dir: str | Path, split: str = "test") -> list[Path]:
    """corpus.jsonl, queries.jsonl and qrels/<split>.tsv of a BEIR folder; an error if one is missing."""
    beir_dir = Path(beir_dir)
    files = [beir_dir / "corpus.jsonl", beir_dir / "queries.jsonl", beir_dir / "qrels" / f"{split}.tsv"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(
            f"missing {', '.join(missing)}: --beir must be a folder in the BEIR layout "
            f"(corpus.jsonl, queries.jsonl, qrels/{split}.tsv), e.g. data/scifact-beir"
        )
    return files


def load_beir(beir_dir: str | Path, split: str = "test") -> dict:
    """Read a BEIR folder; keep the queries that have judgments; count what had to be skipped."""
    files = beir_files(beir_dir, split)
    corpus = read_beir_jsonl(files[0])
    doc_ids = [str(row["_id"]) for row in corpus]
    if len(set(doc_ids)) != len(doc_ids):
        raise UserError(f"{files[0]}: {len(doc_ids) - len(set(doc_ids))} duplicate document ids")
    queries = {str(row["_id"]): row["text"] for row in read_beir_jsonl(files[1])}
    all_qrels = read_qrels(files[2])

    # A judged query absent from queries.jsonl cannot be embedded: skip it and say so.
    qrels = {q: rels for q, rels in all_qrels.items() if q in queries}
    # A judged document absent from the corpus stays relevant (it can never be retrieved), as in BEIR.
    known = set(doc_ids)
    missing_docs = sum(d not in known for rels in qrels.values() for d in rels)
    return {
        "doc_ids": doc_ids,
        "docs": [doc_text(row.get("title") or "", row["text"]) for row in corpus],
        "query_ids": list(qrels),
        "queries": [queries[q] for q in qrels],
        "qrels": qrels,
        "skipped_queries": len(all_qrels) - len(qrels),
        "judgments_missing_doc": missing_docs,
        "queries_without_relevant": sum(not any(r > 0 for r in rels.values()) for rels in qrels.values()),
    }


SAMPLE_SEED = 0  # sample_beir: the same sample in every run


def sample_beir(data: dict, max_queries: int | None, max_docs: int | None) -> tuple[dict, str]:
    """A fixed, seeded sample of a BEIR set (load_beir's dict): at most max_queries judged queries,
    and a corpus of every document they judge plus others up to max_docs, in corpus order. The same
    sample in every run and in both tools (train_biencoder.py --eval-max-*, evaluate.py --max-*)."""
    rng = np.random.default_rng(SAMPLE_SEED)
    n, N = len(data["query_ids"]), len(data["doc_ids"])
    notes = []
    if max_queries is not None and max_queries < n:
        keep = np.sort(rng.choice(n, max_queries, replace=False))
        ids = [data["query_ids"][i] for i in keep]
        data = {**data, "query_ids": ids, "queries": [data["queries"][i] for i in keep]}
        data["qrels"] = {q: data["qrels"][q] for q in ids}
        notes.append(f"{max_queries} of {n} queries")
    if max_docs is not None and max_docs < N:
        judged = {d for rels in data["qrels"].values() for d in rels}
        is_judged = np.array([d in judged for d in data["doc_ids"]])
        others = np.flatnonzero(~is_judged)
        extra = max(0, max_docs - int(is_judged.sum()))
        chosen = rng.choice(others, min(extra, len(others)), replace=False)
        keep = np.sort(np.concatenate([np.flatnonzero(is_judged), chosen]))
        data = {**data, "doc_ids": [data["doc_ids"][i] for i in keep], "docs": [data["docs"][i] for i in keep]}
        notes.append(f"{len(keep)} of {N} documents (every judged one, then random others)")
    note = f"sample (seed {SAMPLE_SEED}): {', '.join(notes)}" if notes else "full set"
    return data, note
