"""Reading checkpoint files safely: ``torch.load(weights_only=True)`` that also reads mmengine's.

A checkpoint is a pickle, and unpickling can run code. Every file the package
reads goes through :func:`read_checkpoint`, which allows only tensors and the
few plain types mmengine's training checkpoints hold, and turns every way a
file can be wrong (empty, truncated, not a checkpoint, asking for code) into
a :class:`CheckpointError` that names the file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from typing import Any, Iterable, List, Mapping, Tuple, Union

import torch

__all__ = ["CheckpointError", "checkpoint_safe_globals", "key_differences", "read_checkpoint", "safe_checkpoint_globals",
           "summarise_keys"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file and what is wrong with it."""


def _history_buffer_attribute(obj, name):
    """``getattr`` while unpickling a checkpoint, for mmengine's log buffers only.

    mmengine's ``HistoryBuffer`` pickles its statistics methods as
    ``getattr(HistoryBuffer, 'mean')``. A plain ``getattr`` would let a file
    walk from any allowed object to arbitrary code, so this stand-in answers
    only for public methods of that one class.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    if obj is HistoryBuffer and isinstance(name, str) and not name.startswith("_"):
        attr = getattr(HistoryBuffer, name, None)
        if callable(attr):
            return attr
    raise pickle.UnpicklingError(f"getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r})")


def checkpoint_safe_globals() -> List[Any]:
    """What ``torch.load(weights_only=True)`` must also allow to read an mmengine training checkpoint.

    mmengine 0.10 puts its message hub in every checkpoint: log buffers
    (``HistoryBuffer`` objects holding numpy arrays, their statistics methods
    pickled through ``getattr``) and numpy scalars. Allowed here: numpy's
    array and scalar reconstruction, dtypes, ``HistoryBuffer`` and a
    ``getattr`` limited to its methods; none of them runs code from the file.
    Entries are ``(object, "module.name")`` pairs as
    :func:`torch.serialization.safe_globals` takes them.
    """
    import importlib

    import numpy as np

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")  # numpy 2 renamed numpy.core
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
    out: List[Any] = []
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray._reconstruct, f"{mod}._reconstruct"), (multiarray.scalar, f"{mod}.scalar")]
    out += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by their class
    for name in getattr(dtypes, "__all__", ()):
        out.append((getattr(dtypes, name), f"numpy.dtypes.{name}"))
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:
        return out
    out += [(HistoryBuffer, "mmengine.logging.history_buffer.HistoryBuffer"),
            (_history_buffer_attribute, "builtins.getattr")]
    return out


@contextlib.contextmanager
def safe_checkpoint_globals():
    """Within this block, ``torch.load`` with ``weights_only=True`` reads mmengine checkpoints too.

    Adds :func:`checkpoint_safe_globals` to torch's allow-list for the
    block only (mmengine's own loaders call ``torch.load`` with torch's
    default, ``weights_only=True`` from torch 2.6 on).
    """
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: no scoped allow-list, nothing extra is allowed
        yield
        return
    with safe_globals(checkpoint_safe_globals()):
        yield


# The part of torch.load's weights_only refusal that says what the file held.
_REFUSED = (
    re.compile(r"GLOBAL ([\w.]+)"),
    re.compile(r"unrecognized function ([^\n]+?)(?: which belongs|\n|$)"),
    re.compile(r"(?:Can only build|Can only create new object)[^\n]*? but got ([^\n]+)"),
    re.compile(r"(getattr\([^)\n]*\))"),  # refused by _history_buffer_attribute
)


def _load_error(path: str, size: int, e: BaseException) -> CheckpointError:
    """A :class:`CheckpointError` naming ``path`` for what ``torch.load`` raised.

    torch's own message for a refused object advises loading with
    ``weights_only=False``, which runs whatever code the file holds; it is
    never passed on.
    """
    msg = str(e)
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in msg:
        for pattern in _REFUSED:
            m = pattern.search(msg)
            if m:
                return CheckpointError(
                    f"{path}: refusing to unpickle {m.group(1).strip().rstrip('.')}; a checkpoint needs only "
                    "tensors, numbers, strings, containers, numpy arrays and mmengine's log buffers, and unpickling "
                    "anything else can run code from the file (or the file is damaged)"
                )
        detail = msg.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
        detail = " ".join(detail.split()) if "WeightsUnpickler error:" in msg else "unreadable pickle data"
        return CheckpointError(f"{path} is damaged or not a PyTorch checkpoint ({size} bytes; {detail})")
    first = (msg.strip().splitlines() or [""])[0]
    what = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return CheckpointError(f"{path} is damaged or truncated ({size} bytes; torch.load: {what})")


def read_checkpoint(path: Union[str, os.PathLike]) -> Any:
    """What ``torch.save`` wrote to ``path``, read without running code from the file.

    ``torch.load(weights_only=True)`` on CPU, with mmengine's checkpoint
    types allowed (:func:`checkpoint_safe_globals`), so the package's own
    training checkpoints read as well as plain state_dicts.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: (a ``ValueError``) the file is empty, truncated
            (e.g. a write cut short), not a PyTorch file, or holds objects
            other than tensors, containers, numbers, strings, numpy arrays
            and mmengine log buffers; the message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint (an interrupted write leaves such files)")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; its directory sits at the end, so a
    # file cut short is recognisable before torch.load fails on it (with a
    # bare "[Errno 22] Invalid argument").
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path} is truncated or damaged ({size} bytes; the zip archive that torch.save writes has no "
                "end record, as when a write is cut short)"
            )
    elif not head.startswith(b"\x80"):  # torch's older format is a pickle (protocol 2+)
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with the bytes {head!r})")
    allowed = safe_checkpoint_globals()
    try:
        with allowed:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, OSError, EOFError, UnpicklingError, KeyError, ...
        raise _load_error(path, size, e) from None


def key_differences(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
                    ) -> Tuple[List[str], List[str], List[str]]:
    """How ``state_dict`` differs from a model's ``own`` state dict (keys in the order of their dict).

    Returns:
        ``(missing, unexpected, mismatched)``: keys of ``own`` not in
        ``state_dict``, keys of ``state_dict`` not in ``own``, and
        ``"key: checkpoint (shape) vs model (shape)"`` for shared keys whose
        shapes differ.
    """
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    return missing, unexpected, mismatched


def summarise_keys(keys: Iterable[str], limit: int = 8) -> str:
    """The first ``limit`` of ``keys`` in the order given, comma-separated, and how many more there are."""
    keys = list(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more

