"""Checkpoints that never lie: atomic writes, safe reads, resume past damage, strict loading.

- :class:`CheckpointRunner`: mmengine's ``Runner`` writing each checkpoint to
  a hidden temporary file and renaming it into place, so a process killed
  mid-write (or a full disk) never leaves a truncated file under a
  checkpoint's name, and ``last_checkpoint`` only names complete files.
- :func:`find_resume_checkpoint`: what ``train --resume`` resumes from; a
  damaged or missing last checkpoint is passed over (and reported) for the
  newest one that reads.
- :func:`state_dict_of`, :func:`state_dict_problems`, :func:`load_weights`:
  a checkpoint's weights, checked key by key and shape by shape against a
  model before anything is copied (mmengine's own loader only logs
  mismatches).
- :func:`check_work_dir`: a work dir that is a file or cannot be written is
  a one-line ``ValueError`` before any work starts.

Files are read with :func:`arnn_plugins.finetune.read_checkpoint`
(``torch.load(weights_only=True)`` with mmengine's types allowed), which
names the file and what is wrong with it.
"""

from __future__ import annotations

import glob
import logging
import os
import os.path as osp
import re
import tempfile
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.dist import master_only
from mmengine.runner import Runner

from ..serialization import CheckpointError, key_differences, read_checkpoint, summarise_keys

__all__ = [
    "CheckpointRunner",
    "QuietCheckpointRunner",
    "check_work_dir",
    "find_resume_checkpoint",
    "fit_error",
    "load_weights",
    "state_dict_of",
    "state_dict_problems",
]

# CheckpointHook's default names: iter_<n>.pth, epoch_<n>.pth.
_NUMBERED = re.compile(r"^(iter|epoch)_(\d+)\.pth$")


def _fsync(path: str) -> None:
    # Renaming makes the write atomic for other processes; fsync first so
    # that after a power loss the new name does not point at missing data.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointRunner(Runner):
    """mmengine's :class:`~mmengine.runner.Runner` whose checkpoints appear only when complete.

    mmengine writes a checkpoint in place under its final name, so a kill
    during the write leaves a truncated file there. Here
    :meth:`save_checkpoint` writes ``.<name>.tmp-<pid>`` in the same folder,
    flushes it to disk and renames it over ``<name>`` (``os.replace`` is
    atomic); the ``last_checkpoint`` file that ``CheckpointHook`` writes
    afterwards therefore always names a complete checkpoint. Remote
    back ends (``s3://`` and such, which upload whole objects) are left to
    mmengine.
    """

    #: ``True``: the console shows warnings and errors only (the log file in
    #: the work dir still gets everything at the config's ``log_level``).
    quiet_console = False

    def build_logger(self, log_level="INFO", *args, **kwargs):
        """mmengine's logger; with :attr:`quiet_console`, its console handler raised to WARNING.

        Done here, before the Runner logs its environment, config and hook
        tables (about 200 lines) to the console. The console level is set
        either way: mmengine hands back the same logger to a runner of the
        same config started within the same second, quiet or not.
        """
        logger = super().build_logger(log_level, *args, **kwargs)
        level = logging.WARNING if self.quiet_console else logging._checkLevel(log_level)
        for handler in logger.handlers:
            # Not the FileHandler subclass; other ranks' consoles stay at ERROR.
            if type(handler) is logging.StreamHandler and handler.level < logging.ERROR:
                handler.setLevel(level)
        return logger

    @master_only
    def save_checkpoint(self, out_dir: str, filename: str, *args, **kwargs):
        """As mmengine's ``Runner.save_checkpoint``, written atomically to ``out_dir/filename``."""
        if "://" in str(out_dir) or "://" in str(filename):
            return super().save_checkpoint(out_dir, filename, *args, **kwargs)
        sub, base = osp.split(filename)
        tmp_name = osp.join(sub, f".{base}.tmp-{os.getpid()}")
        tmp, final = osp.join(out_dir, tmp_name), osp.join(out_dir, filename)
        try:
            super().save_checkpoint(out_dir, tmp_name, *args, **kwargs)
            _fsync(tmp)
            os.replace(tmp, final)
        finally:
            if osp.exists(tmp):
                os.remove(tmp)
        # Temporaries of this name left by an earlier, killed process.
        for stale in glob.glob(osp.join(glob.escape(osp.join(out_dir, sub)), f".{glob.escape(base)}.tmp-*")):
            try:
                os.remove(stale)
            except OSError:
                pass
        return None


def _resumable(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path`` if mmengine can resume from it, else :class:`CheckpointError`."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("meta") if isinstance(ckpt, Mapping) else None
    if not isinstance(meta, Mapping) or "iter" not in meta or "epoch" not in meta or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a training checkpoint (no meta.iter / meta.epoch / state_dict): it holds weights "
            "only, which load_from can load but --resume cannot continue from"
        )
    return ckpt


def find_resume_checkpoint(work_dir: str) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The checkpoint ``train --resume`` continues from, and those passed over with the reason.

    The file named in ``work_dir/last_checkpoint`` (what mmengine resumes
    from) if it reads; otherwise, newest first, the numbered checkpoints
    (``iter_<n>.pth`` / ``epoch_<n>.pth``) of ``work_dir``. Without a
    ``last_checkpoint`` file, ``(None, [])``: nothing was ever saved, and
    training starts afresh as mmengine does.

    Returns:
        ``(path or None, [(path, reason), ...])``: ``None`` with a non-empty
        list means no checkpoint reads.
    """
    pointer = osp.join(work_dir, "last_checkpoint")
    if not osp.isfile(pointer):
        return None, []
    skipped: List[Tuple[str, str]] = []
    try:
        with open(pointer) as f:
            named = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        named = ""
        skipped.append((pointer, f"{pointer} cannot be read ({e})"))
    if not named and not skipped:
        skipped.append((pointer, f"{pointer} is empty (a write cut short?)"))
    numbered = []
    for f in os.listdir(work_dir):
        m = _NUMBERED.match(f)
        if m:
            numbered.append((m.group(1) == "iter", int(m.group(2)), osp.join(work_dir, f)))
    candidates = ([named] if named else []) + [p for *_, p in sorted(numbered, reverse=True)]
    seen = set()
    for path in candidates:
        key = osp.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        try:
            _resumable(path)
        except (FileNotFoundError, CheckpointError) as e:
            skipped.append((path, str(e)))
            continue
        return path, skipped
    return None, skipped


def state_dict_of(checkpoint: Any, path: str = "checkpoint") -> "OrderedDict[str, torch.Tensor]":
    """The weights in what :func:`read_checkpoint` returned: ``checkpoint['state_dict']`` or the dict itself.

    A ``module.`` prefix (DataParallel) is dropped, as mmengine's loader does.
    """
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors (a checkpoint of weights was expected)")
    return OrderedDict((re.sub(r"^module\.", "", k), v) for k, v in sd.items())


def state_dict_problems(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """What keeps ``state_dict`` from loading strictly into ``model``: missing, unexpected, mis-shaped keys."""
    missing, unexpected, shapes = key_differences(model.state_dict(), state_dict)
    out = []
    if missing:
        out.append(f"{len(missing)} missing key(s): {summarise_keys(missing, 6)}")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected key(s): {summarise_keys(unexpected, 6)}")
    if shapes:
        out.append(f"{len(shapes)} shape mismatch(es): {summarise_keys(shapes, 4)}")
    return out


def fit_error(path: str, model: nn.Module, problems: List[str], hint: str = "") -> ValueError:
    """The ``ValueError`` for a checkpoint that does not fit ``model`` (see :func:`state_dict_problems`)."""
    return ValueError(
        f"{path} does not fit the model ({type(model).__name__}): " + "; ".join(problems)
        + " (trained with another config or --cfg-options?" + (f" {hint}" if hint else "") + ")"
    )


def load_weights(model: nn.Module, path: str, strict: bool = True) -> List[str]:
    """Copy the weights of checkpoint ``path`` into ``model``; returns the problems found (empty when it fits).

    Strict (the default): a checkpoint that does not fit raises before
    anything is copied. With ``strict=False`` the matching tensors are
    copied and the rest is returned for the caller to report.

    Raises:
        FileNotFoundError, CheckpointError: see :func:`read_checkpoint`.
        ValueError: strict, and the keys or shapes differ (the message lists them).
    """
    sd = state_dict_of(read_checkpoint(path), path)
    problems = state_dict_problems(model, sd)
    if problems and strict:
        raise fit_error(path, model, problems)
    if problems:
        own = model.state_dict()
        sd = OrderedDict((k, v) for k, v in sd.items() if k in own and v.shape == own[k].shape)
    model.load_state_dict(sd, strict=not problems)
    return problems


def check_work_dir(work_dir: str) -> None:
    """Create ``work_dir`` and check that files can be written there, else a one-line ``ValueError``."""
    if osp.exists(work_dir) and not osp.isdir(work_dir):
        raise ValueError(f"work dir {work_dir} is a file, not a folder")
    try:
        os.makedirs(work_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=work_dir):
            pass
    except OSError as e:
        raise ValueError(f"work dir {work_dir} cannot be written: {e.strerror or e}") from None


class QuietCheckpointRunner(CheckpointRunner):
    """:class:`CheckpointRunner` that prints only warnings and errors to the console (the CLI without ``--verbose``)."""

    quiet_console = True
