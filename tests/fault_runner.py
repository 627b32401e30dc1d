"""Run a script of the repository with a fault injected from outside: the crash tests' faults live
here, and the shipped scripts have no test-only branches.

    FAULT=<fault> FAULT_SCRIPT=<script> python tests/fault_runner.py [the script's arguments]
    FAULT=<fault> FAULT_SCRIPT=<script> deepspeed --num_gpus 2 tests/fault_runner.py [arguments]

The arguments (the launcher's --local_rank included) go to the script's main unchanged. Faults:
- train_biencoder, kill_before_latest:STEP   the whole job dies (SIGKILL to the launcher's process
  group) once every rank has written checkpoint STEP, before `latest` moves to it: a node failure
  in the middle of a save.
- train_biencoder, rope_bf16                 the rotary buffers are cast to bf16 before the check
  after deepspeed.initialize, as DeepSpeed before 0.19.2 left them.
- mine_negatives, kill_after_chunks:N        this process dies (SIGKILL) once it has written N chunk
  files of embeddings (embedding_cache.py writes them): a crash or a preempted node in the middle
  of embedding.
"""

import importlib
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def kill_before_latest(tb, step: int) -> None:
    tag = f"step_{step:08d}"
    write = tb.write_atomic

    def write_atomic(path, data):
        if Path(path).name == tb.LATEST and data == tag:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        write(path, data)

    tb.write_atomic = write_atomic


def rope_bf16(tb) -> None:
    import torch

    check = tb.check_rotary_buffers

    def check_rotary_buffers(module):
        for m in module.modules():
            for name in ("inv_freq", "original_inv_freq"):
                if isinstance(getattr(m, name, None), torch.Tensor):
                    m._buffers[name] = m._buffers[name].to(torch.bfloat16)
        return check(module)

    tb.check_rotary_buffers = check_rotary_buffers


def kill_after_chunks(_, n: int) -> None:
    import embedding_cache

    atomic_file = embedding_cache.atomic_file
    written = [0]

    @contextmanager
    def counted(path):
        with atomic_file(path) as tmp:
            yield tmp
        if Path(path).parent.name == "chunks":  # a chunk file of embeddings, complete and renamed
            written[0] += 1
            if written[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)

    embedding_cache.atomic_file = counted


def main() -> int:
    script = importlib.import_module(os.environ["FAULT_SCRIPT"])
    fault, _, value = os.environ["FAULT"].partition(":")
    inject = {"kill_before_latest": kill_before_latest, "rope_bf16": rope_bf16, "kill_after_chunks": kill_after_chunks}
    inject[fault](script, *([int(value)] if value else []))
    from common import run_cli

    return run_cli(script.main, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
