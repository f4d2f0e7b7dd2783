"""Argument checks shared by every layer and host of the package.

As in ``torch.nn``: a value of the wrong type raises ``TypeError``, a value
of the right type that is out of range or of the wrong shape raises
``ValueError``. Every message starts with the name of the layer (or
function) that was called and says what was expected, so a user never has
to read a conv's or a matmul's error to find the mistake.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = [
    "FLOAT_DTYPES",
    "SWAP_MODES",
    "check_choice",
    "check_device",
    "check_int",
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


def check_odd_kernel(layer: str, name: str, value) -> int:
    """An odd kernel size ``>= 1`` (so that ``padding = k // 2`` keeps the map's size)."""
    check_int(layer, name, value)
    if value % 2 == 0:
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
