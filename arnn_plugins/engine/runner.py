"""Configs in, mmengine Runners out: what ``arnn-plugins train / eval / show`` and the experiments share."""

from __future__ import annotations

import contextlib
import os
import os.path as osp
import warnings
from typing import Dict, Optional

import torch

from ..checks import check_device

__all__ = ["load_config", "build_runner", "prepare_runner", "build_model", "last_checkpoint", "checkpoint_loading"]


def load_config(path: str, options: Optional[Dict] = None):
    """Read an mmengine config file and merge ``options`` (``{'a.b': value}``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file does not parse, or an option names no key of the
            config (a typo would otherwise be silently added).
    """
    from mmengine.config import Config

    if not osp.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        cfg = Config.fromfile(path)
    except Exception as e:  # mmengine raises SyntaxError, ImportError, ... for broken files
        raise ValueError(f"could not read config {path}: {type(e).__name__}: {e}") from e
    if options:
        top = {k: cfg[k] for k in cfg.keys()}
        for key in options:
            parent = top
            parts = key.split(".")
            for p in parts[:-1]:
                if isinstance(parent, (list, tuple)) and p.isdigit() and int(p) < len(parent):
                    parent = parent[int(p)]
                elif isinstance(parent, dict) and p in parent:
                    parent = parent[p]
                else:
                    raise ValueError(f"option {key!r}: the config has no key {p!r} there")
            if not isinstance(parent, dict):
                raise ValueError(f"option {key!r}: {'.'.join(parts[:-1])} is not a dict")
            # New keys are allowed inside model / dataset dicts (extra
            # keyword arguments) but not at the top level, where a typo
            # would silently do nothing.
            if len(parts) == 1 and parts[0] not in top:
                raise ValueError(f"option {key!r}: the config has no top-level key {key!r}")
        cfg.merge_from_dict(options)
    return cfg


def build_runner(cfg, work_dir: Optional[str] = None, device: Optional[str] = None, amp: bool = False,
                 resume: bool = False, load_from: Optional[str] = None):
    """An mmengine :class:`~mmengine.runner.Runner` from a loaded config.

    ``device`` ``"cpu"`` hides CUDA from the Runner (it picks CUDA whenever
    it sees one); ``amp`` switches the optimiser wrapper to mmengine's
    ``AmpOptimWrapper`` (float16 autocast; CUDA only).
    """
    from mmengine.runner import Runner

    cfg = cfg.copy()
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
    if resume:
        cfg.resume = True
    if load_from is not None:
        cfg.load_from = load_from
    cfg.setdefault("custom_imports", dict(imports=["arnn_plugins.engine"], allow_failed_imports=False))
    return Runner.from_cfg(cfg)


def prepare_runner(config: str, options: Optional[Dict] = None, **runner_kwargs):
    """:func:`load_config` then :func:`build_runner` (``work_dir``, ``device``, ``amp``, ``resume``, ``load_from``).

    What ``arnn-plugins train`` and ``eval`` run; a name that no registry
    knows (``type='...'`` typo) becomes a ``ValueError`` naming the config.
    """
    cfg = load_config(config, options)
    try:
        return build_runner(cfg, **runner_kwargs)
    except KeyError as e:  # mmengine's registries say "X is not in the Y registry"
        raise ValueError(f"bad config {config}: {e.args[0] if e.args else e}") from e


def build_model(cfg, checkpoint: Optional[str] = None, device: Optional[str] = None):
    """The config's model (``cfg.model``), with ``checkpoint``'s weights, on ``device`` (default CPU), in eval mode."""
    from mmengine.registry import MODELS
    from mmengine.runner import load_checkpoint

    check_device(device)
    if checkpoint is not None and not osp.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    try:
        model = MODELS.build(cfg.model)
    except KeyError as e:
        raise ValueError(f"bad config {cfg.filename}: {e.args[0] if e.args else e}") from e
    if checkpoint is not None:
        with checkpoint_loading():
            load_checkpoint(model, checkpoint, map_location="cpu", logger="silent")
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
    """Let ``torch.load`` read mmengine checkpoints in this block.

    torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine
    0.10 checkpoints hold its message hub (logging buffers, numpy values),
    which that refuses; mmengine does not pass ``weights_only``. Only load
    checkpoints you trust (as with any pickle).
    """
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
            yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
