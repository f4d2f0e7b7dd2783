"""Adapter registry: how ARNN gets into host models.

An adapter recognises sites in a model and builds what goes there:

- ``kind="swap"``: ``match(module)`` finds an attention module;
  ``build(module, mode=..., **arnn_kwargs)`` returns its replacement.
- ``kind="insert"``: ``match(module)`` finds an insertion point (a block);
  ``build(module, **arnn_kwargs)`` returns the new gate module, which
  :func:`insert_attention` attaches to that block as child ``arnn_gate`` and
  applies to the block's output with a forward hook (so the block's own
  parameter names, and hence pretrained checkpoints, are unchanged).
  ``build`` receives the block's qualified ``name`` and may return ``None``
  to skip a block (e.g. a stage the user left out); it must pop its own
  options (such as ``stages``) before passing the rest to ARNN.

Both functions then put what an adapter built on the device and floating
dtype, and in the train/eval mode, of the module it replaces or the block it
joins (:func:`place_like`), so adapters build on the CPU in float32 and a
``.half()``, CUDA, ``meta`` or ``eval()`` host still gets matching layers.

Adapters for the hosts this package knows are registered when
:func:`list_adapters`, :func:`swap_attention` or :func:`insert_attention` is
first called (each host module is imported only if its library is there).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch.nn as nn

from .checks import SWAP_MODES, check_swap_mode

__all__ = [
    "Adapter",
    "register_adapter",
    "list_adapters",
    "get_adapter",
    "swap_attention",
    "insert_attention",
    "remove_attention",
    "place_like",
    "GATE_NAME",
    "SWAP_MODES",
]

GATE_NAME = "arnn_gate"

# Host modules imported lazily; an ImportError (library not installed) just
# means that host's adapters are not offered.
_BUILTIN_ADAPTER_MODULES = (
    "arnn_plugins.adapters.timm_cbam",
    "arnn_plugins.adapters.timm_resnet",
    "arnn_plugins.adapters.torchvision_resnet",
    "arnn_plugins.adapters.hf_vision",
    "arnn_plugins.adapters.vqa_mcb",
    "arnn_plugins.adapters.modular_gan",
    "arnn_plugins.adapters.pan_local",
)


@dataclass
class Adapter:
    """One way of putting ARNN into a host (see module docstring)."""

    name: str
    kind: str
    match: Callable[[nn.Module], bool]
    build: Callable[..., nn.Module]
    description: str = ""
    host: str = ""


_ADAPTERS: Dict[str, Adapter] = {}
_loaded = False


def register_adapter(
    name: str,
    *,
    kind: str,
    match: Callable[[nn.Module], bool],
    build: Callable[..., nn.Module],
    description: str = "",
    host: str = "",
    override: bool = False,
) -> Adapter:
    """Register an adapter; returns it. ``kind`` is ``"swap"`` or ``"insert"``."""
    if kind not in ("swap", "insert"):
        raise ValueError(f"register_adapter: kind must be 'swap' or 'insert', got {kind!r}")
    if not callable(match) or not callable(build):
        raise TypeError("register_adapter: match and build must be callables")
    if name in _ADAPTERS and not override:
        raise ValueError(f"register_adapter: an adapter named {name!r} exists; pass override=True to replace it")
    adapter = Adapter(name, kind, match, build, description, host)
    _ADAPTERS[name] = adapter
    return adapter


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_ADAPTER_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def list_adapters(kind: Optional[str] = None) -> List[str]:
    """Names of the registered adapters (optionally only ``"swap"`` or ``"insert"``)."""
    _load_builtin()
    return [n for n, a in _ADAPTERS.items() if kind is None or a.kind == kind]


def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name``."""
    _load_builtin()
    if name not in _ADAPTERS:
        raise KeyError(f"no adapter named {name!r}; known: {list(_ADAPTERS)}")
    return _ADAPTERS[name]


def _select(kind: str, adapters: Optional[Sequence[str]], caller: str) -> List[Adapter]:
    _load_builtin()
    if adapters is None:
        return [a for a in _ADAPTERS.values() if a.kind == kind]
    if isinstance(adapters, str):
        adapters = [adapters]  # one name; iterating it would try its letters
    out = []
    for n in adapters:
        if not isinstance(n, str):
            raise TypeError(f"{caller}: adapters must be adapter names (str), got {type(n).__name__} {n!r}")
        a = get_adapter(n)
        if a.kind != kind:
            raise ValueError(f"adapter {n!r} is a {a.kind!r} adapter, not {kind!r}")
        out.append(a)
    return out


def _find(model: nn.Module, adapters: List[Adapter], skip_inside: Sequence[type] = ()):
    """(qualified name, module, adapter) for every matching submodule, outermost first."""
    sites = []
    taken: List[str] = []
    for name, module in model.named_modules():
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue  # never adapt inside something already adapted
        for adapter in adapters:
            if adapter.match(module):
                sites.append((name, module, adapter))
                taken.append(name)
                break
    return sites


def _reference_tensor(module: nn.Module):
    """The first floating point parameter (else buffer) of ``module``, or ``None``."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t
    return None


def place_like(new: nn.Module, site: nn.Module, model: Optional[nn.Module] = None) -> nn.Module:
    """Put ``new`` on the device and floating dtype, and in the train/eval mode, of ``site``; returns ``new``.

    The one placement step of :func:`swap_attention` (``site``: the replaced
    module) and :func:`insert_attention` (``site``: the block the gate joins).
    Device and dtype come from ``site``'s first floating point parameter or
    buffer, else from ``model``'s (a parameter-free site); with neither,
    ``new`` keeps its own.
    """
    ref = _reference_tensor(site)
    if ref is None and model is not None:
        ref = _reference_tensor(model)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    return new.train(site.training)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_attention(
    model: nn.Module, mode: str = "residual", adapters: Optional[Sequence[str]] = None, **arnn_kwargs
) -> List[str]:
    """Replace every known attention module in ``model`` by its ARNN version.

    Args:
        model: any ``nn.Module``; changed in place.
        mode: ``"residual"`` keeps the original spatial map as a prior and
            adds a zero-initialised ARNN correction (the model's function is
            unchanged at the moment of the swap); ``"replace"`` is the
            paper's plain replacement.
        adapters: names of the swap adapters to use (default: all); one name may be
            given as a string.
        **arnn_kwargs: options for :class:`~arnn_plugins.AttentionRNN`.

    Returns:
        Qualified names of the replaced modules.

    Raises:
        ValueError: nothing in ``model`` matched; the model is left as it was
        (also when building a replacement fails).
    """
    check_swap_mode("swap_attention", mode)
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_attention: expected an nn.Module, got {type(model).__name__}")
    chosen = _select("swap", adapters, "swap_attention")
    sites = _find(model, chosen)
    if not sites:
        raise ValueError(
            f"swap_attention: found no attention module that an adapter knows in {type(model).__name__}; "
            f"adapters tried: {[a.name for a in chosen]}"
        )
    # Build everything before touching the model, so a failure changes nothing.
    new = [(name, place_like(adapter.build(module, mode=mode, **arnn_kwargs), module, model))
           for name, module, adapter in sites]
    for name, module in new:
        _set_submodule(model, name, module)
    return [name for name, _ in new]


def _apply_gate(block: nn.Module, args, output):
    gate = getattr(block, GATE_NAME, None)
    return output if gate is None else gate(output)


def insert_attention(
    model: nn.Module, adapters: Optional[Sequence[str]] = None, **arnn_kwargs
) -> List[str]:
    """Add an ARNN gate after every block that an insert adapter recognises.

    Each gate is the identity at initialisation and becomes the block's child
    ``arnn_gate`` (so checkpoints of the original model load with only the
    gates' keys missing), on the block's device and dtype and in its
    train/eval mode. Adapter-specific options (e.g. ``stages``) go in
    ``arnn_kwargs`` alongside the ARNN options; ``adapters`` as in
    :func:`swap_attention`.

    Returns:
        Qualified names of the added gate modules.

    Raises:
        ValueError: no insertion point found, or a block already has a gate;
        the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"insert_attention: expected an nn.Module, got {type(model).__name__}")
    chosen = _select("insert", adapters, "insert_attention")
    sites = _find(model, chosen)
    built = []
    for name, block, adapter in sites:
        if hasattr(block, GATE_NAME):
            raise ValueError(f"insert_attention: {name or type(model).__name__} already has an ARNN gate")
        gate = adapter.build(block, name=name, **arnn_kwargs)
        if gate is not None:
            built.append((name, block, place_like(gate, block, model)))
    if not built:
        raise ValueError(
            f"insert_attention: found no insertion point in {type(model).__name__}; "
            f"adapters tried: {[a.name for a in chosen]}"
        )
    for name, block, gate in built:
        block.add_module(GATE_NAME, gate)
        block.register_forward_hook(_apply_gate)
    return [f"{name}.{GATE_NAME}" if name else GATE_NAME for name, _, _ in built]


def remove_attention(model: nn.Module) -> List[str]:
    """Undo :func:`insert_attention`: drop every ``arnn_gate`` and its hook."""
    removed = []
    for name, module in list(model.named_modules()):
        if hasattr(module, GATE_NAME) and isinstance(getattr(module, GATE_NAME), nn.Module):
            delattr(module, GATE_NAME)
            for key, hook in list(module._forward_hooks.items()):
                if hook is _apply_gate:
                    del module._forward_hooks[key]
            removed.append(f"{name}.{GATE_NAME}" if name else GATE_NAME)
    return removed
