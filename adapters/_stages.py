"""Helpers shared by the insert adapters: the ``stages`` option and lazy class lookup."""

from __future__ import annotations

import re
import sys
from typing import FrozenSet, Optional, Sequence, Tuple, Union

import torch.nn as nn

from arnn_plugins.gate import ARNNGate

__all__ = ["StagesArg", "parse_stages", "stage_of", "stage_gate", "loaded_classes", "is_instance_of_loaded",
           "ALL_STAGES"]

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
