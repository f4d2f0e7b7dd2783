"""Reversible patch teaching timm's attention factory the ARNN layers.

While enabled, ``timm.layers.get_attn`` (and so ``create_attn``) also
resolves these ``attn_layer`` names:

=============  ==========================================================
``arnn``       :class:`~arnn_plugins.adapters.timm_cbam.ARNNAttn`, a
               spatial ARNN gate, the identity at initialisation
``cbam_arnn``  :class:`~arnn_plugins.adapters.timm_cbam.CbamARNN`, CBAM
               with an ARNN spatial branch (residual: a CBAM at init)
``lcbam_arnn`` :class:`~arnn_plugins.adapters.timm_cbam.LightCbamARNN`
=============  ==========================================================

Example::

    from arnn_plugins.patches import timm as arnn_timm

    with arnn_timm.patched():
        model = timm.create_model("resnet50", block_args=dict(attn_layer="cbam_arnn"))

The layers restore their own initialisation (and the zero start of the
residual correction / gate) from timm's ``zero_init_last`` init hook, which
ResNet calls by default; with ``zero_init_last=False`` call
:func:`~arnn_plugins.adapters.timm_cbam.reset_arnn_layers` on the model.

Other options go through a class instead of a name, e.g.
``attn_layer=functools.partial(CbamARNN, mode="replace", hidden_channels=8)``
(timm passes classes through unchanged, no patch needed).

How: timm modules bind ``get_attn`` by import (``timm.layers``,
``timm.models.layers``, ``timm.models.cspnet``, ``_efficientnet_builder``,
``resnet``, ...), so every module in ``sys.modules`` whose global ``get_attn``
is the original function gets the patched one; ``create_attn`` looks
``get_attn`` up in its own module at call time, so it follows
(``timm.models.resnet`` and ``sknet`` import ``create_attn`` directly). :func:`disable` puts the original
back wherever the patched function is found, including modules imported
while the patch was on. Unknown names still reach timm's own ``get_attn``, so
they fail exactly as without the patch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import threading
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Optional, Tuple

__all__ = ["ATTN_LAYERS", "enable", "disable", "is_enabled", "patched"]

_NAME = "get_attn"
_lock = threading.RLock()
# (original get_attn, patched get_attn) while enabled.
_state: Optional[Tuple[Callable, Callable]] = None


def _attn_layers() -> Dict[str, type]:
    from ..adapters.timm_cbam import ARNNAttn, CbamARNN, LightCbamARNN

    return {"arnn": ARNNAttn, "cbam_arnn": CbamARNN, "lcbam_arnn": LightCbamARNN}


#: Names the patch adds to timm's ``attn_layer`` vocabulary.
ATTN_LAYERS: Tuple[str, ...] = ("arnn", "cbam_arnn", "lcbam_arnn")


def _make_get_attn(original: Callable, layers: Dict[str, type]) -> Callable:
    @functools.wraps(original)
    def get_attn(attn_type):
        if isinstance(attn_type, str):
            cls = layers.get(attn_type.lower())
            if cls is not None:
                return cls
        return original(attn_type)

    get_attn._arnn_patch = True  # type: ignore[attr-defined]
    return get_attn


def _holders(fn: Callable) -> List[ModuleType]:
    """Every loaded module whose global ``get_attn`` is ``fn``.

    Only that name: a module keeping the function under another name (say, to
    compare against) is left alone.
    """
    out = []
    for mod in list(sys.modules.values()):
        # vars(), not getattr(): lazy modules (transformers, ...) would import on getattr.
        if isinstance(mod, ModuleType) and vars(mod).get(_NAME) is fn:
            out.append(mod)
    return out


def _set(mod: ModuleType, value: Callable) -> None:
    setattr(mod, _NAME, value)


def is_enabled() -> bool:
    """Whether the patch is on."""
    return _state is not None


def enable() -> bool:
    """Teach timm the ARNN ``attn_layer`` names; returns ``False`` if already on.

    Atomic: if anything fails midway, every replaced reference is restored
    before the error propagates, leaving timm as it was.
    """
    global _state
    with _lock:
        if _state is not None:
            return False
        # Not ``import timm.layers.create_attn as m``: timm.layers re-exports
        # the function create_attn under the submodule's name.
        create_attn_mod = importlib.import_module("timm.layers.create_attn")

        original = create_attn_mod.get_attn
        if getattr(original, "_arnn_patch", False):
            raise RuntimeError("arnn_plugins.patches.timm.enable: timm's get_attn is already patched elsewhere")
        patched_fn = _make_get_attn(original, _attn_layers())
        done: List[ModuleType] = []
        try:
            for mod in _holders(original):
                _set(mod, patched_fn)
                done.append(mod)
        except BaseException:
            for mod in reversed(done):
                setattr(mod, _NAME, original)
            raise
        _state = (original, patched_fn)
        return True


def disable() -> bool:
    """Undo :func:`enable`; returns ``False`` if the patch was off."""
    global _state
    with _lock:
        if _state is None:
            return False
        original, patched_fn = _state
        for mod in _holders(patched_fn):
            setattr(mod, _NAME, original)
        _state = None
        return True


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """Context manager: the patch is on inside; on exit it is off again unless it was on before."""
    turned_on = enable()
    try:
        yield
    finally:
        if turned_on:
            disable()
