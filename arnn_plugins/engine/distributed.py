"""Multi-process training through mmengine: launchers, process groups, threads, buffers.

mmengine's Runner starts the process group itself, but its ``init_dist``
calls ``torch.cuda.set_device`` for every launcher and wraps the model with
``device_ids=[LOCAL_RANK]``; both fail on a machine without CUDA. So
:func:`arnn_plugins.engine.build_runner` starts the group here first (the
Runner then skips its own start) and wraps CPU models without device ids.
Everything else (DistributedDataParallel, the samplers, rank-0-only logs and
checkpoints, resume) is mmengine's.

Environment each launcher provides (the ones read here):

===========  ==================================================================
``pytorch``  ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
             ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``
``slurm``    ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
             ``SLURM_NODEID``, ``SLURM_STEP_TASKS_PER_NODE``, ``SLURM_NODELIST``
             (``MASTER_ADDR`` from ``scontrol``, ``MASTER_PORT`` default 29500)
``mpi``      Open MPI's ``mpirun``: ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}``;
             ``MASTER_ADDR`` must be set (``MASTER_PORT`` default 29500)
===========  ==================================================================
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from typing import Dict, NamedTuple, Optional

import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

__all__ = [
    "LAUNCHERS",
    "DistInfo",
    "dist_info",
    "check_launcher",
    "pick_backend",
    "init_distributed",
    "threads_per_process",
    "available_cores",
    "average_buffers",
    "BufferSyncHook",
]

LAUNCHERS = ("none", "pytorch", "slurm", "mpi")

# What each launcher must have set, to say so when it has not.
_REQUIRED = {
    "pytorch": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_NODELIST"),
    "mpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
}
_HOW = {"pytorch": "torchrun", "slurm": "srun", "mpi": "Open MPI's mpirun"}


class DistInfo(NamedTuple):
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` of ``local_world_size`` on its machine."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def _slurm_tasks_on_node(spec: str, node: int) -> int:
    """Tasks on node ``node`` from Slurm's compressed list, e.g. ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"--launcher slurm: cannot read the tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node < len(counts):
        raise ValueError(f"--launcher slurm: node {node} is not in the tasks per node {spec!r}")
    return counts[node]


def dist_info(launcher: str, env: Optional[Dict[str, str]] = None) -> DistInfo:
    """Rank, world size, local rank and processes on this machine, from ``launcher``'s environment.

    Args:
        launcher: one of :data:`LAUNCHERS`; ``"none"`` is one process.
        env: the environment to read (default ``os.environ``).

    Raises:
        ValueError: an unknown launcher, or a variable the launcher sets is
            missing (the program was not started by that launcher).
    """
    env = os.environ if env is None else env
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if launcher == "none":
        return DistInfo(0, 1, 0, 1)
    missing = [k for k in _REQUIRED[launcher] if k not in env]
    if missing:
        raise ValueError(f"--launcher {launcher}: {', '.join(missing)} not set; start the command "
                         f"with {_HOW[launcher]} (see the README's 'Distributed training')")
    if launcher == "pytorch":
        world = int(env["WORLD_SIZE"])
        return DistInfo(int(env["RANK"]), world, int(env["LOCAL_RANK"]), int(env.get("LOCAL_WORLD_SIZE", world)))
    if launcher == "mpi":
        world = int(env["OMPI_COMM_WORLD_SIZE"])
        return DistInfo(int(env["OMPI_COMM_WORLD_RANK"]), world, int(env["OMPI_COMM_WORLD_LOCAL_RANK"]),
                        int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", world)))
    world = int(env["SLURM_NTASKS"])
    rank = int(env["SLURM_PROCID"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    local_size = _slurm_tasks_on_node(spec, int(env.get("SLURM_NODEID", 0))) if spec else world
    local_rank = int(env.get("SLURM_LOCALID", rank % local_size))
    return DistInfo(rank, world, local_rank, local_size)


def check_launcher(launcher: str, env: Optional[Dict[str, str]] = None) -> None:
    """Refuse ``launcher="none"`` in a process that a multi-process launcher started.

    Without this, ``torchrun --nproc_per_node 2 arnn-plugins train ...``
    runs two independent trainings that write the same work dir.

    Raises:
        ValueError: an unknown launcher, or ``"none"`` under torchrun / srun /
            mpirun with more than one process.
    """
    env = os.environ if env is None else env
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if launcher != "none":
        return
    for key, name in (("WORLD_SIZE", "pytorch"), ("SLURM_STEP_NUM_TASKS", "slurm"), ("OMPI_COMM_WORLD_SIZE", "mpi")):
        n = env.get(key, "1")
        if n.isdigit() and int(n) > 1:
            raise ValueError(f"{_HOW[name]} started {n} processes ({key}={n}) but the launcher is 'none': each "
                             f"would train alone and write the same work dir; pass --launcher {name}, or start "
                             "one process")


def pick_backend(backend: Optional[str], cuda: bool) -> str:
    """The process-group backend: ``"auto"`` (or ``None``) is NCCL on CUDA, gloo on CPU.

    An explicit backend is kept, except NCCL for a CPU run.

    Raises:
        ValueError: NCCL asked for on CPU.
    """
    if backend in (None, "auto"):
        return "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError("env_cfg.dist_cfg.backend='nccl' needs CUDA devices, and this run is on CPU; "
                         "use backend='auto' (gloo on CPU) or 'gloo'")
    return backend


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[01-04]`` -> ``node01``), which hosts the rendezvous."""
    try:
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"--launcher slurm: cannot run scontrol to find the first host of {nodelist!r} ({e}); "
                         "set MASTER_ADDR") from None
    hosts = r.stdout.split()
    if r.returncode != 0 or not hosts:
        raise ValueError(f"--launcher slurm: scontrol found no host in {nodelist!r}: {r.stderr.strip()}; "
                         "set MASTER_ADDR")
    return hosts[0]


def init_distributed(launcher: str, backend: str, timeout: Optional[float] = None, **kwargs) -> DistInfo:
    """Start this process's group (``env://`` rendezvous) from ``launcher``'s environment.

    Does what mmengine's ``init_dist`` does for the three launchers (slurm:
    ``MASTER_ADDR`` from ``scontrol``, ``MASTER_PORT`` 29500 unless set; mpi:
    ``RANK`` / ``WORLD_SIZE`` from Open MPI), but selects a CUDA device only
    for NCCL, so it also works where there is no GPU. A group already
    started is left as it is.

    Args:
        launcher: ``"pytorch"``, ``"slurm"`` or ``"mpi"``.
        backend: ``"nccl"``, ``"gloo"`` or ``"mpi"`` (see :func:`pick_backend`).
        timeout: seconds a collective may wait (torch's default when ``None``).
        **kwargs: more ``torch.distributed.init_process_group`` arguments.
    """
    if launcher == "none":
        raise ValueError("init_distributed: launcher 'none' has no process group")
    info = dist_info(launcher)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank, info.local_world_size)
    env = os.environ
    if launcher == "slurm":
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host(env["SLURM_NODELIST"])
        env.setdefault("MASTER_PORT", "29500")
    elif launcher == "mpi":
        if "MASTER_ADDR" not in env:
            raise ValueError("--launcher mpi: set MASTER_ADDR (the first host's address) for the rendezvous")
        env.setdefault("MASTER_PORT", "29500")
    env["RANK"], env["WORLD_SIZE"] = str(info.rank), str(info.world_size)
    env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"] = str(info.local_rank), str(info.local_world_size)
    if backend == "nccl":
        # One GPU per process; mmengine's wrapper and model.to('cuda') use this device.
        torch.cuda.set_device(info.local_rank % max(torch.cuda.device_count(), 1))
    if timeout is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout)
    dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return info


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: what srun / taskset / cgroups give it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_process(local_world_size: int, cores: Optional[int] = None) -> int:
    """Torch (and C kernel) threads per process so that ``local_world_size`` processes share ``cores``.

    ``max(1, cores // local_world_size)``: on 16 cores, 4 processes get 4
    threads each; more processes than cores get one each.
    """
    if local_world_size < 1:
        raise ValueError(f"threads_per_process: local_world_size must be >= 1, got {local_world_size}")
    cores = available_cores() if cores is None else cores
    return max(1, cores // local_world_size)


def average_buffers(model: torch.nn.Module) -> int:
    """All-reduce (mean) every floating-point buffer of ``model`` across ranks; returns how many.

    Integer buffers (BatchNorm's ``num_batches_tracked``) count steps, the
    same on every rank, and are left alone. One flat all-reduce per dtype.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    groups: Dict[tuple, list] = {}
    for b in model.buffers():
        if b.is_floating_point():
            groups.setdefault((b.dtype, b.device), []).append(b)
    world = dist.get_world_size()
    for bufs in groups.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        with torch.no_grad():
            for b in bufs:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
    return sum(len(v) for v in groups.values())


@HOOKS.register_module()
class BufferSyncHook(Hook):
    """Average BatchNorm statistics (every float buffer) across ranks after each training step.

    mmengine's DistributedDataParallel does not broadcast buffers, so each
    rank's running statistics follow its own share of the batch. Validation
    would then score each rank's share with a different model, and the
    checkpoint (rank 0's) would not be the model that was scored. Averaged
    after every step, before the checkpoint hook (priority ``VERY_LOW``)
    saves and before validation runs, every rank holds the same buffers,
    and for running means that is exactly what SyncBatchNorm would have.
    :func:`~arnn_plugins.engine.build_runner` adds it to distributed runs.
    """

    priority = "NORMAL"

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        average_buffers(runner.model)
