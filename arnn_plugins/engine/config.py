"""Reading configs: one file plus ``--cfg-options``, every key and value checked before a Runner exists.

A typo in a nested key (``model.hiden_channels``, ``train_cfg.max_iter``)
would otherwise be added silently and do nothing; here it is refused with
the key's path and, where a key is close, a "did you mean".
"""

from __future__ import annotations

import difflib
import inspect
import os
import os.path as osp
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..checks import check_int

__all__ = ["config_path", "list_configs", "load_config", "RUNNER_OPTIONS"]

# Top-level keys mmengine's Runner reads that a config may leave out (they
# have defaults), so ``--cfg-options`` may set them even when the file does
# not: ``--cfg-options launcher=pytorch sync_bn=torch``.
RUNNER_OPTIONS = ("launcher", "sync_bn", "find_unused_parameters", "model_wrapper_cfg", "randomness", "env_cfg")


def _shipped_dir() -> str:
    from .. import configs

    return list(configs.__path__)[0]


def list_configs() -> Tuple[str, ...]:
    """Names of the configs shipped with the package (``pan_tiny``, ``pan_mbg_arnn``, ...)."""
    folder = _shipped_dir()
    return tuple(sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")))


def config_path(name: str) -> str:
    """The file a config argument means: a path that exists, else a shipped config by name.

    ``pan_tiny``, ``pan_tiny.py`` and ``configs/pan_tiny.py`` all name the
    shipped ``pan_tiny`` config from any directory (a file of that path in
    the current directory wins).

    Raises:
        FileNotFoundError: neither a file nor a shipped config's name; the
            message lists the shipped names.
    """
    if osp.isfile(name):
        return name
    stem = osp.basename(name)
    stem = stem[:-3] if stem.endswith(".py") else stem
    folder = osp.dirname(name)
    if folder in ("", "configs", "./configs") and stem in list_configs():
        return osp.join(_shipped_dir(), stem + ".py")
    raise FileNotFoundError(f"config file not found: {name} (not a file, nor one of the shipped configs: "
                            f"{', '.join(list_configs())}; `arnn-plugins list` lists them)")


def load_config(path: str, options: Optional[Dict] = None):
    """Read an mmengine config (a file, or a shipped config's name) and merge ``options`` (``{'a.b': value}``).

    Raises:
        FileNotFoundError: no such file or shipped config (:func:`config_path`).
        ValueError: the file does not parse; an option names no key of the
            config (a typo would otherwise be silently added: a new key is
            refused where the dict's ``type`` takes no such argument, or where
            it is close to a key that exists, with a "did you mean"); a loop
            length, interval or batch size is not a positive int.
    """
    from mmengine.config import Config

    path = config_path(path)
    try:
        cfg = Config.fromfile(path)
    except Exception as e:  # mmengine raises SyntaxError, ImportError, ... for broken files
        raise ValueError(f"could not read config {path}: {type(e).__name__}: {e}") from e
    if options:
        top = {k: cfg[k] for k in cfg.keys()}
        for key in options:
            _check_option_key(key, top)
        cfg.merge_from_dict(options)
    _check_config_values(cfg, path)
    return cfg


def _did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, [c for c in candidates if isinstance(c, str)], n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether ``b`` is ``a`` with one letter changed, added, dropped, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def _registered(type_name):
    """The class a config's ``type`` names, looked up in mmengine's root registries; ``None`` if not one."""
    if not isinstance(type_name, str):
        return type_name if callable(type_name) else None
    import mmengine.registry as registries
    import mmengine.runner  # noqa: F401  (registers the loops)

    found = []
    for reg in vars(registries).values():
        if isinstance(reg, registries.Registry):
            try:
                obj = reg.get(type_name)
            except Exception:  # a scope or an import that fails: not this registry
                obj = None
            if obj is not None and obj not in found:
                found.append(obj)
    return found[0] if len(found) == 1 else None


def _accepted_keys(parent: dict, path: Sequence[str]) -> Tuple[Optional[set], bool]:
    """``(keyword arguments the dict's target takes, whether it takes any **kwargs)``; ``(None, True)`` if unknown."""
    target = _registered(parent["type"]) if "type" in parent else None
    extra = {"type"}
    if target is None and len(path) == 1 and path[0].endswith("_dataloader"):
        target = torch.utils.data.DataLoader  # mmengine's build_dataloader passes the dict to it
        extra |= {"num_batch_per_epoch"}
    if target is None:
        return None, True
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None, True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} | extra
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _check_option_key(key: str, top: dict) -> None:
    """``ValueError`` for an option that would add a key nothing reads (see :func:`load_config`)."""
    parts = key.split(".")
    parent = top
    for depth, p in enumerate(parts[:-1]):
        where = ".".join(parts[:depth]) or "the top level"
        if isinstance(parent, (list, tuple)):
            if p.isdigit() and int(p) < len(parent):
                parent = parent[int(p)]
                continue
            raise ValueError(f"option {key!r}: {where} is a list of {len(parent)}, {p!r} is not an index of it")
        if isinstance(parent, dict) and p in parent:
            parent = parent[p]
            continue
        keys = list(parent) if isinstance(parent, dict) else []
        raise ValueError(f"option {key!r}: the config has no key {p!r} in {where}{_did_you_mean(p, keys)}")
    if not isinstance(parent, dict):
        raise ValueError(f"option {key!r}: {'.'.join(parts[:-1])} is not a dict")
    last = parts[-1]
    if last in parent:
        return
    if len(parts) == 1:
        # A top-level typo would silently do nothing.
        if last in RUNNER_OPTIONS:
            return
        raise ValueError(f"option {key!r}: the config has no top-level key {key!r}"
                         f"{_did_you_mean(last, list(top) + list(RUNNER_OPTIONS))}")
    where = ".".join(parts[:-1])
    accepted, open_ended = _accepted_keys(parent, parts[:-1])
    if accepted is not None and last in accepted:
        return  # a keyword argument the config leaves at its default
    if accepted is not None and not open_ended:
        owner = parent.get("type", "DataLoader")
        raise ValueError(f"option {key!r}: {where} ({owner}) takes no argument {last!r}"
                         f"{_did_you_mean(last, sorted(accepted))} (it takes {', '.join(sorted(accepted))})")
    # Extra keyword arguments (model and data set options) may be new, unless
    # one is a typo of a key that is there: one edit away (new names two
    # edits from an existing one are real, e.g. img_channels / in_channels).
    near = [k for k in list(parent) + sorted(accepted or ()) if isinstance(k, str) and _one_edit_apart(last, k)]
    if near:
        raise ValueError(f"option {key!r}: the config has no key {last!r} in {where}; did you mean {near[0]!r}?")


def _config_int(where: str, name: str, value, minimum: int) -> None:
    try:
        check_int(where, name, value, minimum)
    except TypeError as e:  # for the CLI every bad config value is a usage error
        raise ValueError(str(e)) from None


def _check_config_values(cfg, path: str) -> None:
    """Loop lengths, intervals and batch sizes that mmengine would take and then do nothing with (or divide by)."""
    where = f"config {path}"
    train_cfg = cfg.get("train_cfg")
    if isinstance(train_cfg, dict):
        for k in ("max_iters", "max_epochs", "val_interval"):
            if k in train_cfg:
                _config_int(where, f"train_cfg.{k}", train_cfg[k], 1)
    for split in ("train", "val", "test"):
        loader = cfg.get(f"{split}_dataloader")
        if isinstance(loader, dict):
            if "batch_size" in loader:
                _config_int(where, f"{split}_dataloader.batch_size", loader["batch_size"], 1)
            if "num_workers" in loader:
                _config_int(where, f"{split}_dataloader.num_workers", loader["num_workers"], 0)
    hooks = cfg.get("default_hooks")
    if isinstance(hooks, dict):
        for name in ("checkpoint", "logger"):
            hook = hooks.get(name)
            # CheckpointHook's interval -1 means "never" (mmengine's default).
            if isinstance(hook, dict) and "interval" in hook and not (name == "checkpoint" and hook["interval"] == -1):
                _config_int(where, f"default_hooks.{name}.interval", hook["interval"], 1)
