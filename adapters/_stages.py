"""Helpers shared by the insert adapters: the ``stages`` option and lazy class lookup."""

from __future__ import annotations

import re
import sys
from typing import FrozenSet, Optional, Sequence, Tuple, Union

import torch.nn as nn

from arnn_plugins.gate import ARNNGate

__all__ = ["StagesArg", "parse_stages", "stage_of", "stage_gate", "loaded_classes", "is_instance_of_loaded",
           "block_out_channels", "ResNetBlockGates", "register_resnet_gates", "ALL_STAGES"]

StagesArg = Union[None, str, int, Sequence[int], Sequence[bool]]
ALL_STAGES = "all"


def parse_stages(stages: StagesArg, adapter: str) -> Optional[FrozenSet[int]]:
    """Normalise a ``stages`` option to a set of 1-based stage numbers.

    Accepted forms: ``None`` or ``"all"`` (every stage, returned as ``None``);
    one int or a sequence of ints ``>= 1`` (``(2, 3, 4)``: the second, third
    and fourth stage); a sequence of bools, one per stage, as in MMCV's
    plugin configs (``(False, True, True, True)``).

    Raises:
        TypeError / ValueError naming ``adapter`` for anything else.
    """
    if stages is None or (isinstance(stages, str) and stages == ALL_STAGES):
        return None
    if isinstance(stages, str):
        raise ValueError(f"{adapter}: stages must be 'all', None, ints >= 1 or a bool per stage, got {stages!r}")
    if isinstance(stages, int) and not isinstance(stages, bool):
        stages = (stages,)
    try:
        items = tuple(stages)
    except TypeError:
        raise TypeError(
            f"{adapter}: stages must be 'all', None, ints >= 1 or a bool per stage, got {type(stages).__name__}"
        ) from None
    if items and all(isinstance(s, bool) for s in items):
        return frozenset(i + 1 for i, s in enumerate(items) if s)
    for s in items:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(
                f"{adapter}: stages must be 'all', None, ints >= 1 (1 = first stage) or a bool per stage, "
                f"got {stages!r}"
            )
    return frozenset(items)


def stage_of(name: str, pattern: str, offset: int = 0) -> Optional[int]:
    """1-based stage number read from a qualified module name, or ``None``.

    ``pattern`` is a regular expression with one group of digits that must
    match a whole run of dotted components (e.g. ``r"layer(\\d+)"`` or
    ``r"stages\\.(\\d+)"``); the last match counts, so wrappers that nest the
    whole backbone (``backbone.body.layer3.1``) still work. ``offset`` is
    added to the number (``1`` for 0-based indices).
    """
    found = None
    for m in re.finditer(rf"(?:^|\.)(?:{pattern})(?=\.|$)", name):
        found = int(m.group(1)) + offset
    return found


def loaded_classes(module_name: str, class_names: Sequence[str]) -> Tuple[type, ...]:
    """The named classes of ``module_name`` if that module is already imported.

    A host's block classes can only appear in a model once their module has
    been imported, so matching never needs to import a large library (and
    ``insert_attention`` on a torchvision model does not pull in
    transformers, or the other way round).
    """
    mod = sys.modules.get(module_name)
    if mod is None:
        return ()
    return tuple(c for c in (getattr(mod, n, None) for n in class_names) if isinstance(c, type))


def is_instance_of_loaded(module: nn.Module, module_name: str, class_names: Sequence[str]) -> bool:
    """``isinstance(module, <those classes>)`` without importing ``module_name``."""
    classes = loaded_classes(module_name, class_names)
    return bool(classes) and isinstance(module, classes)


def stage_gate(adapter: str, name: str, stages: StagesArg, pattern: str, channels: int, offset: int = 0,
               **arnn_kwargs) -> Optional[ARNNGate]:
    """An :class:`~arnn_plugins.ARNNGate` over ``channels`` for the block ``name``, or ``None`` if its stage is left out.

    ``pattern`` and ``offset`` find the block's stage in its name (see
    :func:`stage_of`); ``arnn_kwargs`` go to the gate.
    """
    chosen = parse_stages(stages, adapter)
    if chosen is not None and stage_of(name, pattern, offset) not in chosen:
        return None
    return ARNNGate(channels, **arnn_kwargs)


def block_out_channels(adapter: str, block: nn.Module) -> int:
    """Channels ``C`` of a ResNet block's output ``(B, C, H, W)``: its last conv's ``out_channels``.

    Bottleneck blocks end in ``conv3``, basic blocks in ``conv2`` (torchvision
    and timm alike). ``TypeError`` naming ``adapter`` if neither is a conv.
    """
    last = getattr(block, "conv3", None)
    if not isinstance(last, nn.Conv2d):
        last = getattr(block, "conv2", None)
    if not isinstance(last, nn.Conv2d):
        raise TypeError(
            f"{adapter}: {type(block).__name__} has no conv3/conv2 Conv2d to read its output channels from"
        )
    return last.out_channels


class ResNetBlockGates:
    """An insert adapter's ``match`` and ``build`` for one library's ResNet blocks.

    One :class:`~arnn_plugins.ARNNGate` over each selected block's output
    channels (:func:`block_out_channels`), its stage read from a ``layerN``
    name. Blocks are ``class_names`` of ``module_name``, looked up only if
    that module is loaded (:func:`is_instance_of_loaded`).
    """

    def __init__(self, adapter: str, module_name: str, class_names: Sequence[str] = ("BasicBlock", "Bottleneck"),
                 default_stages: StagesArg = (2, 3, 4)) -> None:
        self.adapter, self.module_name, self.class_names = adapter, module_name, tuple(class_names)
        self.default_stages = default_stages

    def match(self, module: nn.Module) -> bool:
        """True for the library's ResNet blocks (and subclasses)."""
        return is_instance_of_loaded(module, self.module_name, self.class_names)

    def build(self, block: nn.Module, name: str = "", stages: StagesArg = "default",
              **arnn_kwargs) -> Optional[ARNNGate]:
        """Gate for ``block`` (output ``(B, C, H, W)``), or ``None`` if its stage is not selected.

        Args:
            block: one of the library's ResNet blocks.
            name: the block's qualified name in the model (gives its stage).
            stages: as :func:`parse_stages` takes it; ``"default"``: the
                adapter's default stages.
            **arnn_kwargs: options for :class:`~arnn_plugins.ARNNGate` /
                :class:`~arnn_plugins.AttentionRNN` (``hidden_channels``, ``block_size``, ...).
        """
        if isinstance(stages, str) and stages == "default":
            stages = self.default_stages
        return stage_gate(self.adapter, name, stages, r"layer(\d+)", block_out_channels(self.adapter, block),
                          **arnn_kwargs)


def register_resnet_gates(adapter: str, module_name: str, host: str, default_stages: StagesArg = (2, 3, 4)):
    """Register the insert adapter ``adapter`` for ``module_name``'s ResNet blocks; returns its ``(match, build)``."""
    from arnn_plugins.registry import register_adapter

    gates = ResNetBlockGates(adapter, module_name, ("BasicBlock", "Bottleneck"), default_stages)
    register_adapter(adapter, kind="insert", match=gates.match, build=gates.build, host=host,
                     description=f"ARNN gate after each {host} ResNet BasicBlock/Bottleneck "
                                 f"(stages: default {default_stages})")
    return gates.match, gates.build
