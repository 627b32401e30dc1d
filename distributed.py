"""The ranks of a job launched by `deepspeed` (or torchrun), for the scripts that run under it.

One definition of who this process is (rank, world size, node), of rank-0 logging, and of the
check that every rank sees a folder through which the ranks hand files over: on several nodes a
path names a different folder on each node unless it lies on a filesystem that every node mounts.
torch.distributed only (no DeepSpeed): the miner runs under the launcher without an engine.
"""

import os
import secrets
import socket
import time
from pathlib import Path

import torch.distributed as dist
from tqdm.auto import tqdm

from common import UserError

PROBE_WAIT_S = 10  # how long a rank looks for rank 0's probe file before it reports that it cannot see it


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its node (the launcher's LOCAL_RANK): 0 is the node's first process."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def end_process_group() -> None:
    """At the end of a run that succeeded: release the process group while the interpreter is still
    whole. Left to the exit, gloo's worker threads can be torn down still joinable, and a rank that has
    finished its work aborts ("terminate called without an active exception", exit status 250 under
    the launcher). Not after an error: another rank may still wait in a collective."""
    if dist.is_initialized():
        dist.destroy_process_group()


def log0(*args) -> None:
    if rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))


def gather(value) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast(value):
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def where(r: int, hosts: list[str]) -> str:
    return f"rank {r} on {hosts[r]}"


def stop_unless_all(problems: list[str | None], hosts: list[str], what: str) -> None:
    """`problems[r]`: rank r's problem (None when it has none), gathered from every rank. All ranks raise
    the same UserError when any has one, so that none of them waits in a collective for the others."""
    bad = [f"{where(r, hosts)}: {p}" for r, p in enumerate(problems) if p]
    if bad:
        raise UserError(f"{what}: " + "; ".join(bad))


def check_shared_folder(folder: Path, flag: str, advice: str) -> None:
    """Every rank must see the files rank 0 writes in `folder`: rank 0 writes a probe with a fresh
    random name, every rank looks for it, and all of them stop with one message naming the ranks and
    hosts that cannot see it. A probe left by another run cannot pass: its name is new each time."""
    if world_size() == 1:
        return
    name = None
    if rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        name = f".shared-check-{secrets.token_hex(8)}"
        (folder / name).write_text(socket.gethostname())
    name = broadcast(name)
    deadline = time.monotonic() + PROBE_WAIT_S  # a network filesystem may show a new file a little late
    while not (folder / name).is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = gather(((folder / name).is_file(), socket.gethostname()))
    barrier()
    if rank() == 0:
        (folder / name).unlink()
    blind = [where(r, [host for _, host in seen]) for r, (ok, _) in enumerate(seen) if not ok]
    if blind:
        raise UserError(
            f"{flag} {folder}: {', '.join(blind)} cannot see the files rank 0 ({seen[0][1]}) writes there. {advice}"
        )
