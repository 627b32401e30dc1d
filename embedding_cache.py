"""Embeddings of a text list cached on disk, chunk by chunk: the miner's embedding stage (every rank
of a launch shares the chunks) and evaluate.py --cache-dir (a killed evaluation resumes, a second
one of the same model on the same texts reads them).

A cache folder is named by a key that covers everything that changes the numbers (the model's
identity, pooling, attention, dtype, the prompt, the max length, the texts themselves, the storage
dtype, the chunking), so a stale folder is never read. Inside: meta.json (the key's fields),
rows.npy (each chunk's rows, chunk after chunk) and chunks/NNNNNN.npy, one file per chunk, written
whole by the one rank that embedded it (fsync, then an atomic rename): a file there is complete.
"""

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from common import atomic_file, write_atomic
from distributed import barrier, broadcast, rank, world_size

CACHE_VERSION = 2  # 2: one file per chunk (chunks/NNNNNN.npy) and rows.npy
# Storage dtypes of the cached embeddings. numpy has no bfloat16: its bits are stored as int16.
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}
CHUNK_SIZE = 4096  # texts per chunk: the unit of resume


def model_identity(name: str, files: Path | None = None) -> str:
    """What a cache key knows of the weights. A local folder: its config.json and the name, size and
    mtime of each weight file. A hub name: the name and the revision (commit) its files came from
    (`files`: the snapshot folder model_files fetched, .../snapshots/<commit>), so that a new release
    of the model is never served from the cache."""
    folder = Path(name)
    if not folder.is_dir():
        if files is not None and Path(files).parent.name == "snapshots":
            return f"{name}@{Path(files).name}"
        return name
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{folder.resolve()}@{h.hexdigest()[:16]}"


def texts_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed: ["ab", "c"] != ["a", "bc"]
        h.update(b)
    return h.hexdigest()


def chunk_plan(lengths: np.ndarray, chunk_size: int) -> list[np.ndarray]:
    """Row indices of each chunk: longest texts first (`lengths`: in characters), so a chunk's texts
    have similar lengths and the last chunks are short; deterministic."""
    order = np.argsort(-np.asarray(lengths, np.int64), kind="stable")
    return [order[s : s + chunk_size] for s in range(0, len(order), chunk_size)]


class TextColumn:
    """A list of texts as the ranks embed them: take(rows) gives some of them. Backed by an Arrow array,
    memory-mapped from a file rank 0 wrote (the miner's share_task), so that a rank reads only the texts
    it embeds, or built from a list in memory; `lengths` (characters) and `digest` (texts_digest) come
    with it."""

    def __init__(self, array: pa.Array, lengths: np.ndarray, digest: str):
        self.array, self.lengths, self.digest = array, lengths, digest

    @classmethod
    def from_list(cls, texts: list[str]) -> "TextColumn":
        lengths = np.fromiter((len(t) for t in texts), np.int64, len(texts))
        return cls(pa.array(texts, pa.large_string()), lengths, texts_digest(texts))

    def __len__(self) -> int:
        return len(self.array)

    def take(self, rows: np.ndarray) -> list[str]:
        return self.array.take(pa.array(np.asarray(rows, np.int64))).to_pylist()


class ChunkedRows:
    """The (n, D) embeddings of a text list, read from a complete cache folder's chunk files:
    rows[idx] (an index array or a slice) gathers the rows from the chunks that hold them. Each chunk
    file is written whole by one rank and never touched again, so no two ranks (or nodes) ever write
    the same file or page. rows.npy (written once, by rank 0) lists each chunk's rows, chunk after chunk."""

    def __init__(self, folder: Path):
        meta = json.loads((folder / "meta.json").read_text())
        self.files = [np.load(chunk_file(folder, c), mmap_mode="r") for c in range(meta["num_chunks"])]
        self.shape, self.dtype = (meta["num_texts"], meta["dim"]), np.dtype(STORAGE[meta["embedding_dtype"]])
        order = np.load(folder / "rows.npy")
        sizes = [len(f) for f in self.files]
        self.chunk_of = np.empty(len(order), np.int32)
        self.pos_of = np.empty(len(order), np.int64)
        self.chunk_of[order] = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        self.pos_of[order] = np.concatenate([np.arange(n) for n in sizes]) if sizes else []

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(*rows.indices(self.shape[0])) if isinstance(rows, slice) else np.asarray(rows)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        which = self.chunk_of[rows]
        for c in np.unique(which):
            sel = which == c
            out[sel] = self.files[c][self.pos_of[rows[sel]]]
        return out


def chunk_file(folder: Path, c: int) -> Path:
    return folder / "chunks" / f"{c:06d}.npy"


def embed_cached(
    encode: Callable[[list[str], str, int], torch.Tensor],
    enc,
    identity: str,
    texts: TextColumn | list[str],
    role: str,
    prompt: str,
    max_length: int,
    cache_root: Path,
    embedding_dtype: str = "float32",
    chunk_size: int = CHUNK_SIZE,
) -> tuple[ChunkedRows, dict]:
    """(n, D) embeddings of `texts` (role: "corpus" or "queries"), computed chunk by chunk by
    encode(texts, prompt, max_length) -> (n, D) float32, or read from the cache.

    enc: the model.BiEncoder that `encode` runs (its pooling, attention, dtype and width enter the
    key); identity: model_identity of the folder or hub name it was loaded from. Under a launcher,
    rank 0 decides which chunks are done and broadcasts it, and the ranks share the others, whatever
    their number was in an earlier, interrupted run. Returns (ChunkedRows, a report for the logs)."""
    texts = texts if isinstance(texts, TextColumn) else TextColumn.from_list(texts)
    key_fields = {
        "version": CACHE_VERSION,
        "teacher": identity,
        "pooling": enc.pooling,
        "bidirectional": enc.bidirectional,
        "prompt": prompt,
        "max_length": max_length,
        "texts": texts.digest,
        "num_texts": len(texts),
        "embedding_dtype": embedding_dtype,
        "compute_dtype": str(next(enc.parameters()).dtype),
        "chunk_size": chunk_size,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(cache_root) / f"{role}-{key}"
    chunks = chunk_plan(texts.lengths, chunk_size)
    done = None
    if rank() == 0:
        (folder / "chunks").mkdir(parents=True, exist_ok=True)
        if not (folder / "meta.json").is_file():  # written once, by rank 0: no other rank writes them
            with atomic_file(folder / "rows.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, np.concatenate([np.sort(c) for c in chunks]) if chunks else np.zeros(0, np.int64))
            meta = {**key_fields, "dim": enc.encoder.config.hidden_size, "num_chunks": len(chunks)}
            write_atomic(folder / "meta.json", json.dumps(meta, indent=1))
        done = [c for c in range(len(chunks)) if chunk_file(folder, c).is_file()]
    done = set(broadcast(done))
    todo = [c for c in range(len(chunks)) if c not in done]
    mine = todo[rank() :: world_size()]
    t0 = time.perf_counter()
    n_mine = sum(len(chunks[c]) for c in mine)
    bar = tqdm(
        total=n_mine,
        desc=f"{role} ({len(chunks)} chunks)",
        unit="text",
        disable=rank() != 0 or len(chunks) < 2 or not n_mine or bool(os.environ.get("TQDM_DISABLE")),
    )
    for c in mine:
        idx = np.sort(chunks[c])  # ascending rows
        out = encode(texts.take(idx), prompt, max_length)
        if embedding_dtype == "bfloat16":
            rows = out.to(torch.bfloat16).view(torch.int16).numpy()
        else:
            rows = out.numpy().astype(STORAGE[embedding_dtype])
        with atomic_file(chunk_file(folder, c)) as tmp, open(tmp, "wb") as f:
            np.save(f, rows)
        bar.update(len(idx))
    bar.close()
    barrier()
    missing = None
    if rank() == 0:
        missing = [c for c in range(len(chunks)) if not chunk_file(folder, c).is_file()]
    missing = broadcast(missing)
    if missing:
        raise RuntimeError(f"{folder}: chunks {missing[:10]} missing after every rank finished")
    seconds = time.perf_counter() - t0
    info = {"cache": str(folder), "chunks": len(chunks), "chunks_cached": len(done), "seconds": round(seconds, 2)}
    return ChunkedRows(folder), info
