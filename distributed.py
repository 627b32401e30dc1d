"""The ranks of a job launched by `deepspeed` (or torchrun, mpirun, srun), for the scripts that run under it.

One definition of who this process is (rank, world size, node) before and after the process group
exists, of the GPU it drives, of rank-0 logging, and of the check that every rank sees a folder
through which the ranks hand files over: on several nodes a path names a different folder on each
node unless it lies on a filesystem that every node mounts. torch.distributed only (no DeepSpeed):
the miner runs under the launcher without an engine.
"""

import importlib.util
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from common import UserError

PROBE_WAIT_S = 10  # how long a rank looks for rank 0's probe file before it reports that it cannot see it


# How each launcher tells a process who it is: (launcher, world size, rank, local rank(s), ranks on the node).
# The first row whose world size and rank are both set wins; torch's names first, so that the deepspeed
# launcher or torchrun inside a Slurm allocation or an MPI job is still read from its own variables.
# DeepSpeed's MPICH and Intel MPI runners set RANK and LOCAL_RANK themselves: the first row.
LAUNCHER_VARIABLES = (
    ("deepspeed / torchrun", "WORLD_SIZE", "RANK", ("LOCAL_RANK",), "LOCAL_WORLD_SIZE"),
    ("Open MPI", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_LOCAL_RANK",),
     "OMPI_COMM_WORLD_LOCAL_SIZE"),  # fmt: skip
    ("MVAPICH", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", ("MV2_COMM_WORLD_LOCAL_RANK",),
     "MV2_COMM_WORLD_LOCAL_SIZE"),  # fmt: skip
    # PMI: Hydra (MPICH, Intel MPI) sets MPI_LOCALRANKID; Cray PALS its own; srun --mpi=pmi2 only PMI_RANK
    # and PMI_SIZE, beside Slurm's SLURM_LOCALID
    ("MPICH / Intel MPI / PMI", "PMI_SIZE", "PMI_RANK", ("MPI_LOCALRANKID", "PALS_LOCAL_RANKID", "SLURM_LOCALID"),
     "MPI_LOCALNRANKS"),  # fmt: skip
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: only srun sets it, so a plain `python` in a batch script
    # that asked for 8 tasks is one process, not rank 0 of 8 waiting for 7 that never come.
    ("Slurm srun", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", ("SLURM_LOCALID",), "SLURM_STEP_TASKS_PER_NODE"),
)
SUPPORTED_LAUNCHES = (
    "deepspeed --num_gpus N | --hostfile (pdsh), torchrun, or an MPI / Slurm launch (deepspeed --launcher "
    "openmpi|mvapich|mpich|impi|slurm, mpirun, srun) with MASTER_ADDR and MASTER_PORT exported to every rank"
)


@dataclass(frozen=True)
class Launch:
    """Who this process is, as its launcher said, before any process group exists."""

    launcher: str  # "none" for a plain `python script.py`
    world: int
    rank: int
    local_rank: int
    local_world: int | None  # ranks on this node, where the launcher says


def tasks_per_node(value: str | None) -> int | None:
    """Ranks on a node: a number, or Slurm's SLURM_STEP_TASKS_PER_NODE ("8(x2)", "8,8"; the first node's)."""
    if not value:
        return None
    first = value.split(",")[0].split("(")[0]
    return int(first) if first.isdigit() else None


def launch_env(environ=None) -> Launch:
    """This process's place in the job from the launcher's variables (LAUNCHER_VARIABLES).

    The deepspeed launcher and torchrun set WORLD_SIZE, RANK and LOCAL_RANK; mpirun and srun (also under
    `deepspeed --launcher openmpi|mvapich|slurm`) set only their own, and DeepSpeed would learn the world
    size from them inside init_distributed, too late for the batch arithmetic and the checks that run
    first. A WORLD_SIZE given beside another launcher's rank (DeepSpeed's MPICH runner, or
    `WORLD_SIZE=8 python train_biencoder.py --dry-run` in an interactive srun shell) is the world size.
    Without any launcher: one process, or a planned world of WORLD_SIZE for --dry-run (rank 0)."""
    env = os.environ if environ is None else environ
    for launcher, world, rank_, locals_, local_world in LAUNCHER_VARIABLES:
        if world in env and rank_ in env:
            W = int(env.get("WORLD_SIZE", env[world]))
            local = next((int(env[v]) for v in locals_ if v in env), None)
            if local is None and W > 1:
                raise UserError(
                    f"launched by {launcher} ({W} ranks) but none of {', '.join(locals_)} says this process's rank "
                    f"on its node, which picks its GPU. Supported launches: {SUPPORTED_LAUNCHES}"
                )
            return Launch(launcher, W, int(env[rank_]), local or 0, tasks_per_node(env.get(local_world)))
    return Launch("none", int(env.get("WORLD_SIZE", "1")), 0, 0, None)


def adopt_launch(launch: Launch) -> None:
    """Export the launch as torch's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), so that
    torch, DeepSpeed (which binds the process group to cuda:LOCAL_RANK) and this module agree on it.
    Another launcher's values replace any left in the environment: a stale LOCAL_RANK would put
    DeepSpeed's group on another GPU than `set_device`'s."""
    if launch.launcher == "none":
        return
    env = {"RANK": launch.rank, "WORLD_SIZE": launch.world, "LOCAL_RANK": launch.local_rank}
    if launch.local_world:
        env["LOCAL_WORLD_SIZE"] = launch.local_world
    for key, value in env.items():
        os.environ[key] = str(value)


def single_process_rendezvous(launch: Launch) -> bool:
    """A plain `python script.py` (no launcher, one process): torch's variables for a world of one on
    this machine, so that deepspeed.init_distributed starts a group of one instead of looking for MPI.
    True when it did (the process was started without a launcher)."""
    if launch.launcher != "none" or launch.world != 1:
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    for key, value in env.items():
        os.environ.setdefault(key, str(value))
    return True


def mpi4py_installed() -> bool:
    return importlib.util.find_spec("mpi4py") is not None


def check_rendezvous(launch: Launch, mpi_discovery: bool) -> None:
    """Stop with one line, before any process group is started, when the ranks cannot find each other.

    mpi_discovery: the caller starts the group through deepspeed.init_distributed, which finds
    MASTER_ADDR/MASTER_PORT itself through mpi4py when they are missing; the miner's plain gloo group
    cannot. Without either, torch would wait for its rendezvous until its timeout."""
    if launch.world == 1 or ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        return
    if mpi_discovery and launch.launcher != "none" and mpi4py_installed():
        return
    if launch.launcher == "none":
        raise UserError(
            f"WORLD_SIZE={launch.world} but no launcher started this process (no rank given); "
            f"WORLD_SIZE without a launcher is only for --dry-run. Supported launches: {SUPPORTED_LAUNCHES}"
        )
    raise UserError(
        f"launched by {launch.launcher} ({launch.world} ranks) without MASTER_ADDR and MASTER_PORT: export both to "
        "every rank (the first node's address and a free port, e.g. mpirun -x MASTER_ADDR=node1 -x MASTER_PORT=29500)"
        + (", or install mpi4py for DeepSpeed's MPI discovery" if mpi_discovery else "")
        + f". Supported launches: {SUPPORTED_LAUNCHES}"
    )


def set_device(launch: Launch, one_gpu_per_process: bool = False) -> torch.device:
    """Make this rank's GPU (cuda:LOCAL_RANK) current, before the process group exists.

    deepspeed.init_distributed binds NCCL's group to cuda:LOCAL_RANK (device_id) but does not make that
    device current, and torch.distributed's object collectives (all_gather_object, broadcast_object_list:
    the checks before the engine is built) put their bytes on the current device: every rank would send
    from cuda:0, and NCCL stops. torchrun's documentation sets the device first for the same reason.
    one_gpu_per_process: the caller has no NCCL group (the miner): LOCAL_RANK modulo the GPUs it sees,
    so that a launcher that gives each process its own GPU (srun --gpus-per-task=1) works too."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if one_gpu_per_process:
        torch.cuda.set_device(launch.local_rank % count)
        return torch.device("cuda", launch.local_rank % count)
    if launch.local_rank >= count:
        raise UserError(
            f"rank {launch.rank} has local rank {launch.local_rank} but sees {count} GPU(s): start one process per GPU "
            "with every GPU of the node visible to each (no per-process CUDA_VISIBLE_DEVICES)"
        )
    torch.cuda.set_device(launch.local_rank)
    return torch.device("cuda", launch.local_rank)


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
