"""Configs in, mmengine Runners out: what ``arnn-plugins train / eval / show`` and the experiments share."""

from __future__ import annotations

import contextlib
import copy
import os
import os.path as osp
import sys
from typing import Dict, Optional, Sequence

import torch

from ..checks import check_device, check_int
from ..serialization import safe_checkpoint_globals
from .config import RUNNER_OPTIONS, load_config

__all__ = ["load_config", "build_runner", "prepare_runner", "build_model", "last_checkpoint", "checkpoint_loading",
           "RUNNER_OPTIONS"]


def build_runner(cfg, work_dir: Optional[str] = None, device: Optional[str] = None, amp: bool = False,
                 resume: bool = False, load_from: Optional[str] = None, launcher: Optional[str] = None,
                 threads: Optional[int] = None, verbose: bool = True):
    """An mmengine :class:`~mmengine.runner.Runner` from a loaded config.

    ``verbose=False`` keeps mmengine's start-up tables (environment, config,
    hooks) and INFO lines off the console; the work dir's log has them all.

    ``device`` ``"cpu"`` hides CUDA from the Runner (it picks CUDA whenever
    it sees one); ``amp`` switches the optimiser wrapper to mmengine's
    ``AmpOptimWrapper`` (float16 autocast; CUDA only).

    The runner is a :class:`~.checkpoints.CheckpointRunner` (checkpoints
    written atomically); the work dir must be a writable folder
    (``ValueError`` otherwise); ``resume`` continues from the last
    checkpoint, or, if that is damaged, from the newest one that reads
    (:func:`~.checkpoints.find_resume_checkpoint`, reported on stderr).

    ``launcher`` (default: the config's ``launcher``, else ``"none"``):
    ``"pytorch"`` (torchrun), ``"slurm"`` (srun) or ``"mpi"`` makes this
    process one rank of a distributed run (:mod:`arnn_plugins.engine.distributed`):
    the process group starts with ``env_cfg.dist_cfg.backend`` (``"auto"``
    or unset: NCCL on CUDA, gloo on CPU), the model is wrapped in
    mmengine's DistributedDataParallel (``find_unused_parameters`` from the
    config, default ``False``; ``sync_bn='torch'`` converts BatchNorm on
    CUDA), BatchNorm statistics are averaged across ranks after every step
    (:class:`~arnn_plugins.engine.distributed.BufferSyncHook`), evaluators
    gather results through the process group, and each process uses
    ``threads`` CPU threads for torch and the C kernel (default: the
    machine's cores divided by its processes). Only rank 0 writes logs and
    checkpoints (mmengine).

    Raises:
        ValueError: a bad launcher, ``sync_bn``, ``randomness`` or backend
            for this device, or ``--launcher none`` under torchrun / srun /
            mpirun with several processes.
    """
    from .checkpoints import CheckpointRunner, QuietCheckpointRunner, check_work_dir
    from .distributed import check_launcher

    # Deep: the distributed set-up below fills in nested dicts (env_cfg,
    # evaluators), which must not change the caller's config.
    cfg = copy.deepcopy(cfg)
    if work_dir is not None:
        cfg.work_dir = work_dir
    if not cfg.get("work_dir"):
        cfg.work_dir = osp.join("work_dirs", osp.splitext(osp.basename(cfg.filename or "config"))[0])
    check_device(device)
    if device == "cpu":
        # mmengine's get_device() looks at torch.cuda.is_available() only.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if amp:
        if device == "cpu" or not torch.cuda.is_available():
            raise ValueError("--amp needs a CUDA device (mmengine's AmpOptimWrapper runs on accelerators only)")
        ow = cfg.get("optim_wrapper")
        if ow is None or ow.get("constructor") is not None:
            raise ValueError("--amp: this config builds its own optimiser wrappers; set their type in the config")
        ow.type = "AmpOptimWrapper"
    check_work_dir(cfg.work_dir)
    if resume:
        cfg.resume = True
        if load_from is None and not cfg.get("load_from"):
            # mmengine resumes from whatever last_checkpoint names, even a
            # damaged file; pass that over for the newest one that reads.
            cfg.load_from = _resume_from(cfg.work_dir)
    if load_from is not None:
        cfg.load_from = load_from
    launcher = launcher if launcher is not None else cfg.get("launcher", "none")
    check_launcher(launcher)
    cfg.launcher = launcher
    _check_randomness(cfg.get("randomness"))
    sync_bn = cfg.get("sync_bn")
    if sync_bn is not None and sync_bn not in ("torch", "mmcv"):
        raise ValueError(f"sync_bn must be 'torch', 'mmcv' or None, got {sync_bn!r}")
    if threads is not None:
        check_int("build_runner", "threads", threads)
    if launcher == "none":
        dist_setup = None
        if threads is not None:
            torch.set_num_threads(threads)
    else:
        dist_setup = _setup_distributed(cfg, launcher, device, threads)
    cfg.setdefault("custom_imports", dict(imports=["arnn_plugins.engine"], allow_failed_imports=False))
    # mmengine's Runner, checkpoints written atomically
    runner = (CheckpointRunner if verbose else QuietCheckpointRunner).from_cfg(cfg)
    if dist_setup is not None:
        info, backend = dist_setup
        runner.logger.info(
            f"distributed: launcher {launcher}, backend {backend}, {info.world_size} "
            f"processes ({info.local_world_size} on this machine), {torch.get_num_threads()} CPU threads each")
    return runner


def _resume_from(work_dir: str) -> Optional[str]:
    """The checkpoint to resume from (:func:`~.checkpoints.find_resume_checkpoint`); damage is reported on stderr."""
    from .checkpoints import find_resume_checkpoint

    path, skipped = find_resume_checkpoint(work_dir)
    for _, reason in skipped:
        print(f"warning: --resume: passing over {reason}", file=sys.stderr)
    if path is None and skipped:
        raise ValueError(f"--resume: no checkpoint in {work_dir} can be read ({len(skipped)} tried; first: "
                         f"{skipped[0][1]}); train without --resume to start again")
    if skipped:
        print(f"warning: --resume: resuming from {path}, the newest checkpoint that reads; the iterations "
              "after it are trained again", file=sys.stderr)
    return path


def _check_randomness(randomness) -> None:
    """``randomness`` is what mmengine's ``Runner.set_randomness`` takes; a misspelt key would be dropped silently."""
    if randomness is None:
        return
    if not isinstance(randomness, dict):
        raise ValueError(f"randomness must be a dict (seed, diff_rank_seed, deterministic), got {randomness!r}")
    unknown = sorted(set(randomness) - {"seed", "diff_rank_seed", "deterministic"})
    if unknown:
        raise ValueError(f"randomness: unknown key(s) {', '.join(map(repr, unknown))}; "
                         "known: 'seed', 'diff_rank_seed', 'deterministic'")
    seed = randomness.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"randomness.seed must be an int or None, got {seed!r}")


def _setup_distributed(cfg, launcher: str, device: Optional[str], threads: Optional[int]):
    """Start the process group and fill in the config's distributed parts (see :func:`build_runner`)."""
    from torch.nn.parallel import DistributedDataParallel

    from mmengine.registry import MODEL_WRAPPERS

    from .distributed import init_distributed, pick_backend, threads_per_process

    if device is not None and device.startswith("cuda:"):
        raise ValueError(f"--device {device}: in a distributed run each process uses the GPU of its local rank; "
                         "pass --device cuda")
    cuda = device != "cpu" and torch.cuda.is_available()
    env_cfg = cfg.setdefault("env_cfg", dict())
    dist_cfg = env_cfg.setdefault("dist_cfg", dict())
    backend = pick_backend(dist_cfg.get("backend"), cuda)
    sync_bn = cfg.get("sync_bn")
    if sync_bn is not None and not cuda:
        raise ValueError(f"sync_bn={sync_bn!r} needs CUDA: SyncBatchNorm synchronises GPU tensors only. On CPU "
                         "leave sync_bn unset; BatchNorm statistics are then averaged across ranks after every step")
    extra = {k: v for k, v in dist_cfg.items() if k not in ("backend", "init_backend", "port")}
    if dist_cfg.get("init_backend", "torch") != "torch":
        raise ValueError(f"env_cfg.dist_cfg.init_backend={dist_cfg['init_backend']!r} is not supported here; "
                         "use 'torch'")
    if dist_cfg.get("port") is not None:
        os.environ["MASTER_PORT"] = str(dist_cfg["port"])
    dist_cfg["backend"] = backend
    info = init_distributed(launcher, backend, **extra)
    # Both ARNN's scan kernel and torch's ops use torch's thread count; N
    # processes with all cores each would oversubscribe the machine N times.
    torch.set_num_threads(threads if threads is not None else threads_per_process(info.local_world_size))
    # mmengine passes device_ids=[LOCAL_RANK], which DDP refuses for a CPU
    # module, and which names a GPU this process cannot see when srun gives
    # each task its own (--gpus-per-task 1). The wrapper config's own keys
    # take precedence over that: the device init_distributed selected.
    wrapper = cfg.get("model_wrapper_cfg") or dict(
        type="MMDistributedDataParallel", broadcast_buffers=False,
        find_unused_parameters=cfg.get("find_unused_parameters", False))
    wrapper_type = MODEL_WRAPPERS.get(wrapper.get("type", "MMDistributedDataParallel"))
    if isinstance(wrapper_type, type) and issubclass(wrapper_type, DistributedDataParallel):
        wrapper.setdefault("device_ids", [torch.cuda.current_device()] if cuda else None)
    cfg.model_wrapper_cfg = wrapper
    hooks = list(cfg.get("custom_hooks") or [])
    if not any(h.get("type") == "BufferSyncHook" for h in hooks):
        hooks.append(dict(type="BufferSyncHook"))
    cfg.custom_hooks = hooks
    # mmengine's default collect_device 'cpu' gathers validation results
    # through a temporary folder that every rank must see, which machines
    # without a shared /tmp do not; 'gpu' gathers through the process group
    # (all_gather_object), which gloo does on CPU too.
    for key in ("val_evaluator", "test_evaluator"):
        ev = cfg.get(key)
        for metric in (ev if isinstance(ev, (list, tuple)) else [ev]):
            if isinstance(metric, dict) and "type" in metric:
                metric.setdefault("collect_device", "gpu")
    return info, backend


# What each of mmengine's loops needs from a config (its Runner asks for all or none of them).
LOOP_PARTS = {
    "train": ("train_dataloader", "train_cfg", "optim_wrapper"),
    "val": ("val_dataloader", "val_cfg", "val_evaluator"),
    "test": ("test_dataloader", "test_cfg", "test_evaluator"),
}


def _bad_config(config: str, e: BaseException) -> ValueError:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    return ValueError(f"bad config {config}: {msg}")


def prepare_runner(config: str, options: Optional[Dict] = None, loops: Sequence[str] = (), **runner_kwargs):
    """:func:`load_config` then :func:`build_runner` (``work_dir``, ``device``, ``amp``, ``resume``, ``load_from``,
    ``launcher``, ``threads``), then build ``loops`` (``"train"``, ``"val"``, ``"test"``: see :func:`build_loop`).

    What ``arnn-plugins train`` and ``eval`` run. A mistake in the config
    becomes a ``ValueError`` naming the config: a name that no registry knows
    (``type='...'`` typo), an argument a class refuses, or missing parts for
    a loop. Building the loops here, before any work, is what makes a bad
    data set or loop argument such an error rather than a traceback later.
    """
    cfg = load_config(config, options)
    for loop in loops:
        missing = [k for k in LOOP_PARTS[loop] if not cfg.get(k)]
        if missing:
            raise ValueError(f"config {config} has no {', '.join(missing)}: it cannot {_LOOP_VERB[loop]}")
    try:
        runner = build_runner(cfg, **runner_kwargs)
    except (KeyError, TypeError) as e:  # registries: "X is not in the Y registry"; classes: bad arguments
        raise _bad_config(config, e) from e
    for loop in loops:
        build_loop(runner, loop, config)
    return runner


_LOOP_VERB = {"train": "train", "val": "validate", "test": "test"}


def build_loop(runner, loop: str, config: str = "the config"):
    """Build ``runner``'s ``"train"``, ``"val"`` or ``"test"`` loop now (its data set and evaluator with it).

    mmengine builds them lazily, when the loop first runs; building them
    here turns a bad data set or loop argument into a ``ValueError`` naming
    ``config``. Returns the loop.
    """
    if getattr(runner, f"_{loop}_loop") is None:
        raise ValueError(f"config {config} has no {', '.join(LOOP_PARTS[loop])}: it cannot {_LOOP_VERB[loop]}")
    try:
        return getattr(runner, f"{loop}_loop")
    except (KeyError, TypeError, ValueError) as e:
        raise _bad_config(config, e) from e


def build_model(cfg, checkpoint: Optional[str] = None, device: Optional[str] = None, strict: bool = True):
    """The config's model (``cfg.model``), with ``checkpoint``'s weights, on ``device`` (default CPU), in eval mode.

    The checkpoint is read safely and must fit the model key by key and
    shape by shape (``strict``; see :func:`~.checkpoints.load_weights`).

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: a bad config, a damaged checkpoint (the message names the
            file and what is wrong), or one that does not fit the model (the
            message lists the keys).
    """
    from mmengine.registry import MODELS

    from .checkpoints import load_weights

    check_device(device)
    if checkpoint is not None and not osp.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    try:
        model = MODELS.build(cfg.model)
    except (KeyError, TypeError) as e:
        raise _bad_config(cfg.filename, e) from e
    if checkpoint is not None:
        load_weights(model, checkpoint, strict=strict)
    return model.to(device or "cpu").eval()


def last_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint path mmengine recorded in ``work_dir/last_checkpoint``, if any."""
    path = osp.join(work_dir, "last_checkpoint")
    if osp.isfile(path):
        with open(path) as f:
            return f.read().strip()
    return None


@contextlib.contextmanager
def checkpoint_loading():
    """Let ``torch.load`` read mmengine checkpoints in this block, safely.

    torch >= 2.6 loads with ``weights_only=True`` by default and mmengine
    calls it without ``weights_only``; mmengine 0.10 checkpoints hold its
    message hub (log buffers, numpy values), which torch's allow-list lacks.
    This block adds exactly those types
    (:func:`arnn_plugins.finetune.checkpoint_safe_globals`), so resuming and
    ``load_from`` work while a file holding anything else is still refused.
    """
    with safe_checkpoint_globals():
        yield
