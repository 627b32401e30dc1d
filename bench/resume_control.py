"""The negative controls of run_gpu.sh's resume check: train_biencoder.py resumed with a broken restore.

    deepspeed --num_gpus 1 bench/resume_control.py --restore nothing|weights-only <train_biencoder.py flags>

--restore nothing:      the run starts at the checkpoint's step, but from the initial weights and a fresh
                        optimizer (a resume that restored no weights);
--restore weights-only: the weights are restored, the AdamW moments are not (DeepSpeed's
                        load_optimizer_states=False: a resume that lost the optimizer state; under ZeRO-3
                        DeepSpeed then rebuilds the fp32 master weights from the checkpoint's consolidated
                        weights and copies them through the bf16 parameters, so they come back rounded to
                        bf16 too).

The resume check passes only when the real resume repeats the uninterrupted run's losses within its
tolerance AND both controls differ from them by more than it: a tolerance too loose to see a broken
resume is itself a failure. Nothing here is part of the product: train_biencoder.py runs unchanged,
with its load_checkpoint wrapped from outside (as tests/fault_runner.py injects faults).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_biencoder as tb  # noqa: E402
from common import run_cli  # noqa: E402

MODES = ("nothing", "weights-only")


def broken_load_checkpoint(mode: str):
    restore = tb.load_checkpoint

    def load(engine, cfg, tag: str) -> int:
        if mode == "nothing":
            return int(tag.removeprefix("step_"))  # the step count alone: no weights, no optimizer state
        load_all = engine.load_checkpoint
        engine.load_checkpoint = lambda path, tag: load_all(path, tag=tag, load_optimizer_states=False)
        return restore(engine, cfg, tag)

    return load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restore", choices=MODES, required=True, help="what the broken resume restores")
    args, train_args = parser.parse_known_args()  # the rest (the launcher's --local_rank too) is train_biencoder.py's
    tb.load_checkpoint = broken_load_checkpoint(args.restore)
    print(f"resume control: --restore {args.restore}", flush=True)
    return run_cli(tb.main, train_args)


if __name__ == "__main__":
    sys.exit(main())
