"""Read-only access to a folder written by prepare_data.py.

The folder holds flat token arrays (`.npy`, opened memory-mapped) and `meta.json`:

    query_tokens.npy  uint16/uint32 (T_q,)        every query's token ids, back to back
    query_offsets.npy int64 (num_queries + 1,)    query i = query_tokens[off[i]:off[i + 1]]
    doc_tokens.npy    uint16/uint32 (T_d,)        every document once, back to back
    doc_offsets.npy   int64 (num_docs + 1,)
    query_docs.npy    int64 (num_queries, 1 + num_negatives)  column 0 = positive, 1.. = negatives
    meta.json         settings, counts, subsets, sha256 of each array's data bytes; written last

    data = PreparedData("prepared")
    data.query(0), data.doc(data.query_docs[0, 0])    # token ids, BOS included
    data.check(tokenizer="meta-llama/Llama-3.1-8B", query_max_len=512)  # meta against the run
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from common import UserError

FORMAT_VERSION = 2  # 2: meta.json subsets carry the exact query_prompt / passage_prompt strings
ARRAYS = ("query_tokens", "query_offsets", "doc_tokens", "doc_offsets", "query_docs")
PREPARE_COMMAND = "python prepare_data.py --download-path ./embed_nemotron_dataset_v1 --output-dir {path}"


def sha256_of(array: np.ndarray, chunk_bytes: int = 1 << 26) -> str:
    """sha256 of an array's data bytes (C order, no .npy header), read in 64 MiB pieces."""
    flat = array.reshape(-1)
    step = max(1, chunk_bytes // max(1, flat.itemsize))
    digest = hashlib.sha256()
    for start in range(0, flat.size, step):
        digest.update(np.ascontiguousarray(flat[start : start + step]).data)
    return digest.hexdigest()


def data_fingerprint(meta: dict) -> str:
    """What a prepared folder holds, in one string: a sha256 over the sha256 of every array that
    meta.json records. The same tokens give the same fingerprint wherever the folder lies; a folder
    re-prepared at the same path with other subsets, lengths or negatives gives another."""
    digest = hashlib.sha256()
    for name in ARRAYS:
        digest.update(f"{name}.npy {meta['files'][f'{name}.npy']['sha256']}\n".encode())
    return digest.hexdigest()


def data_summary(meta: dict) -> dict:
    """The fingerprint and the settings a person reads to tell two prepared folders apart."""
    return {
        "fingerprint": data_fingerprint(meta),
        "num_queries": meta["num_queries"],
        "num_docs": meta["num_docs"],
        "subsets": [s["name"] for s in meta["subsets"]],
        **{k: meta.get(k) for k in ("tokenizer", "query_max_len", "passage_max_len", "num_negatives")},
    }


def subset_prompts(meta: dict) -> dict:
    """Each subset's exact query and passage prompt strings ({name: {"query", "passage"}}; query None:
    JSONL lines with prompts of their own): what an export gives sentence-transformers."""
    return {s["name"]: {"query": s["query_prompt"], "passage": s["passage_prompt"]} for s in meta["subsets"]}


class PreparedData:
    def __init__(self, path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        command = PREPARE_COMMAND.format(path=self.path)
        if not meta_path.is_file():
            raise UserError(f"{self.path} is not a prepared data folder (no meta.json); create it with `{command}`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("complete") is not True:
            raise UserError(f"{self.path} is incomplete (meta.json lacks complete: true); rebuild it with `{command}`")
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{self.path} has format_version {self.meta.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}; rebuild it with `{command} --overwrite`"
            )
        arrays = {}
        for name in ARRAYS:
            info = self.meta["files"][f"{name}.npy"]
            array = np.load(self.path / f"{name}.npy", mmap_mode="r")
            if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"]:
                raise UserError(
                    f"{self.path / (name + '.npy')}: shape {list(array.shape)} dtype {array.dtype} differ from "
                    f"meta.json ({info['shape']} {info['dtype']}); rebuild it with `{command} --overwrite`"
                )
            arrays[name] = array
        self.query_tokens = arrays["query_tokens"]
        self.query_offsets = arrays["query_offsets"]
        self.doc_tokens = arrays["doc_tokens"]
        self.doc_offsets = arrays["doc_offsets"]
        self.query_docs = arrays["query_docs"]  # (num_queries, 1 + num_negatives)

    def __len__(self) -> int:
        return self.meta["num_queries"]

    @property
    def num_docs(self) -> int:
        return self.meta["num_docs"]

    def query(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"query index {i} out of range [0, {len(self)})")
        return self.query_tokens[self.query_offsets[i] : self.query_offsets[i + 1]]

    def doc(self, j: int) -> np.ndarray:
        if not 0 <= j < self.num_docs:
            raise IndexError(f"document index {j} out of range [0, {self.num_docs})")
        return self.doc_tokens[self.doc_offsets[j] : self.doc_offsets[j + 1]]

    def check(self, **expected) -> None:
        """Raise a ValueError naming every meta setting that differs from `expected`."""
        diffs = [f"{k}={self.meta.get(k)!r} (this run: {v!r})" for k, v in expected.items() if self.meta.get(k) != v]
        if diffs:
            command = PREPARE_COMMAND.format(path=self.path)
            raise UserError(
                f"{self.path} was prepared with {', '.join(diffs)}; rebuild it with the run's settings: "
                f"`{command} --overwrite` plus the matching options"
            )

    def verify(self) -> None:
        """Re-read every array and compare its sha256 with meta.json (a full read of the folder)."""
        for name in ARRAYS:
            expected = self.meta["files"][f"{name}.npy"]["sha256"]
            actual = sha256_of(getattr(self, name))
            if actual != expected:
                raise UserError(f"{self.path / (name + '.npy')}: sha256 {actual} != {expected} in meta.json (corrupt)")
