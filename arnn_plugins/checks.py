"""Argument checks shared by every layer and host of the package.

As in ``torch.nn``: a value of the wrong type raises ``TypeError``, a value
of the right type that is out of range or of the wrong shape raises
``ValueError``. Every message starts with the name of the layer (or
function) that was called and says what was expected, so a user never has
to read a conv's or a matmul's error to find the mistake.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence

import torch

__all__ = [
    "FLOAT_DTYPES",
    "SWAP_MODES",
    "check_bool",
    "check_choice",
    "check_device",
    "check_float",
    "check_int",
    "check_like",
    "check_odd_kernel",
    "check_swap_mode",
    "check_image",
    "check_query",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SWAP_MODES = ("residual", "replace")


def check_int(layer: str, name: str, value, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``: ``TypeError`` for a non-int (bools too), else ``ValueError``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{layer}: {name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{layer}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def check_float(layer: str, name: str, value, minimum: Optional[float] = None, inclusive: bool = False) -> float:
    """``value`` as a finite float (``> minimum``, or ``>= minimum`` with ``inclusive``).

    ``TypeError`` for anything that is not a real number (bools too, as in
    :func:`check_int`); ``ValueError`` for NaN, infinity or a value out of
    range (a NaN floor would make every output NaN without an error).
    """
    bound = "" if minimum is None else f" {'>=' if inclusive else '>'} {minimum}"
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{layer}: {name} must be a finite number{bound}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and (value < minimum or (value == minimum and not inclusive))):
        raise ValueError(f"{layer}: {name} must be a finite number{bound}, got {value!r}")
    return value


def check_bool(layer: str, name: str, value) -> bool:
    """``value`` is a bool (``TypeError`` otherwise: ``sample="no"`` would be true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{layer}: {name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_odd_kernel(layer: str, name: str, value) -> int:
    """An odd kernel size ``>= 1`` (so that ``padding = k // 2`` keeps the map's size)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{layer}: {name} must be an odd int >= 1, got {type(value).__name__} {value!r}")
    if value < 1 or value % 2 == 0:
        raise ValueError(f"{layer}: {name} must be an odd int >= 1, got {value!r}")
    return value


def check_choice(layer: str, name: str, value, choices: Sequence) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{layer}: {name} must be one of {tuple(choices)}, got {value!r}")


def check_swap_mode(layer: str, mode) -> None:
    """``mode`` of a swap: ``"residual"`` (keep the original map as a prior) or ``"replace"``."""
    check_choice(layer, "mode", mode, SWAP_MODES)


def check_image(layer: str, x, channels: Optional[int], what: str = "input", spatial: str = "H, W",
                allow_empty: bool = False) -> None:
    """A floating point ``(B, channels, *spatial)`` tensor, non-empty unless ``allow_empty``.

    ``channels=None`` accepts any channel count. ``spatial`` names the
    trailing dimensions in the message (``"h, w"``, ``"H, W"``).
    """
    if isinstance(x, torch.fx.Proxy):
        return  # an FX trace: nothing is known of the value until it runs
    c = "C" if channels is None else channels
    expect = f"(B, {c}, {spatial})"
    ndim = 2 + spatial.count(",") + 1
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: expected {what} a torch.Tensor of shape {expect}, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{layer}: expected a floating point {what} of shape {expect}, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{layer}: expected a {ndim}-D {what} of shape {expect}, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{layer}: expected {what} of shape {expect} ({channels} channels), got shape {tuple(x.shape)}")
    if not allow_empty and 0 in x.shape:
        raise ValueError(f"{layer}: expected a non-empty {what} of shape {expect}, got shape {tuple(x.shape)}")


def check_query(layer: str, query, batch: int, query_channels: int, what: str = "query") -> None:
    """A floating point ``(batch, query_channels)`` tensor; with ``query_channels == 0``, ``None``."""
    if isinstance(query, torch.fx.Proxy) or isinstance(batch, torch.fx.Proxy):
        return  # an FX trace
    if query_channels == 0:
        if query is not None:
            raise ValueError(f"{layer}: got a {what} but the layer was built with query_channels=0")
        return
    expect = f"({batch}, {query_channels})"
    if query is None:
        raise ValueError(f"{layer}: a {what} of shape {expect} is required (query_channels={query_channels})")
    if not isinstance(query, torch.Tensor) or query.dtype not in FLOAT_DTYPES:
        got = f"dtype {query.dtype}" if isinstance(query, torch.Tensor) else type(query).__name__
        raise TypeError(f"{layer}: expected a floating point {what} tensor of shape {expect}, got {got}")
    if query.dim() != 2 or query.shape[0] != batch or query.shape[1] != query_channels:
        raise ValueError(f"{layer}: expected {what} of shape {expect}, got shape {tuple(query.shape)}")


def check_device(device: Optional[str], what: str = "--device") -> None:
    """``None``, ``"cpu"`` or ``"cuda[:k]"`` with a CUDA device present; else ``ValueError``."""
    if device is None or device == "cpu":
        return
    if not isinstance(device, str) or not device.startswith("cuda"):
        raise ValueError(f"{what} must be cpu or cuda, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"{what} cuda asked for, but no CUDA device is available")


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4 takes no argument; "meta" has no autocast
        return device_type == "cuda" and torch.is_autocast_enabled()


def check_like(layer: str, x: torch.Tensor, like: torch.Tensor, what: str = "input", dtype: bool = True) -> None:
    """``x`` on the device of ``like`` (a parameter of ``layer``) and, with ``dtype``, of its dtype.

    A different device is a ``ValueError`` (a CPU layer given a ``meta``
    tensor would otherwise compute on CPU and return garbage); a different
    floating dtype is a ``TypeError`` unless autocast is on for ``x``'s
    device, where mixed dtypes are what autocast is for.
    """
    if isinstance(x, torch.fx.Proxy):
        return  # an FX trace
    if x.device != like.device:
        raise ValueError(
            f"{layer}: {what} is on {x.device} but the layer's parameters are on {like.device}; "
            f"move one to the other (layer.to({str(x.device)!r}) or {what}.to({str(like.device)!r}))"
        )
    if dtype and x.dtype != like.dtype and not _autocast_on(x.device.type):
        raise TypeError(
            f"{layer}: {what} has dtype {x.dtype} but the layer's parameters are {like.dtype}; "
            f"convert one of them ({what}.to({like.dtype}) or layer.to({x.dtype})), or run under torch.autocast"
        )
