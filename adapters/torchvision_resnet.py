"""torchvision ResNets: an ARNN gate on the output of each residual block.

Adapter ``torchvision_resnet`` (``kind="insert"``) matches torchvision's
``BasicBlock`` and ``Bottleneck`` (so resnet18 ... resnet152, ResNeXt and
wide ResNets, and the ResNet bodies of torchvision's detection and
segmentation models). Each selected block gets an
:class:`~arnn_plugins.ARNNGate` over its output channels (``planes *
expansion``), the identity at initialisation::

    import torchvision, arnn_plugins
    model = torchvision.models.resnet50(weights="DEFAULT")
    arnn_plugins.insert_attention(model)                    # layer2..layer4
    arnn_plugins.insert_attention(model, stages="all", hidden_channels=8)

Options (popped before the rest goes to ARNN):

- ``stages``: which of ``layer1`` .. ``layer4`` get gates, as 1-based stage
  numbers (default ``(2, 3, 4)``), a bool per stage as in MMCV configs
  (``(False, True, True, True)``), or ``"all"``/``None``. The default leaves
  out ``layer1``: at stride 4 its maps are the largest, so the sequential
  scan there costs the most, and it matches the stage choice of the MMCV
  plugin configs. The stage is read from the block's qualified name
  (``...layer3.1`` is stage 3); blocks outside a ``layerN`` container are
  gated only with ``stages="all"``.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch.nn as nn

from arnn_plugins.gate import ARNNGate
from arnn_plugins.registry import register_adapter

from ._stages import StagesArg, is_instance_of_loaded, stage_gate

if importlib.util.find_spec("torchvision") is None:  # the registry skips hosts that are not installed
    raise ImportError("torchvision is not installed")

__all__ = ["ADAPTER_NAME", "DEFAULT_STAGES", "match", "build", "block_out_channels"]

ADAPTER_NAME = "torchvision_resnet"
DEFAULT_STAGES = (2, 3, 4)
_MODULE = "torchvision.models.resnet"
_BLOCKS = ("BasicBlock", "Bottleneck")


def match(module: nn.Module) -> bool:
    """True for torchvision ``BasicBlock`` / ``Bottleneck`` (and subclasses)."""
    return is_instance_of_loaded(module, _MODULE, _BLOCKS)


def block_out_channels(block: nn.Module) -> int:
    """Channels ``C`` of the block's output ``(B, C, H, W)``: its last conv's ``out_channels``."""
    # Bottleneck ends in conv3, BasicBlock in conv2.
    last = getattr(block, "conv3", None)
    if not isinstance(last, nn.Conv2d):
        last = getattr(block, "conv2", None)
    if not isinstance(last, nn.Conv2d):
        raise TypeError(
            f"{ADAPTER_NAME}: {type(block).__name__} has no conv3/conv2 Conv2d to read its output channels from"
        )
    return last.out_channels


def build(block: nn.Module, name: str = "", stages: StagesArg = DEFAULT_STAGES, **arnn_kwargs) -> Optional[ARNNGate]:
    """Gate for ``block`` (output ``(B, C, H, W)``), or ``None`` if its stage is not selected.

    Args:
        block: a torchvision ``BasicBlock`` or ``Bottleneck``.
        name: the block's qualified name in the model (gives its stage).
        stages: see the module docstring.
        **arnn_kwargs: options for :class:`~arnn_plugins.ARNNGate` /
            :class:`~arnn_plugins.AttentionRNN` (e.g. ``hidden_channels``,
            ``block_size``).
    """
    return stage_gate(ADAPTER_NAME, name, stages, r"layer(\d+)", block_out_channels(block), **arnn_kwargs)


register_adapter(
    ADAPTER_NAME,
    kind="insert",
    match=match,
    build=build,
    description="ARNN gate after each torchvision ResNet BasicBlock/Bottleneck (stages: default (2, 3, 4))",
    host="torchvision",
)
