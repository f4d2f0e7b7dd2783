"""transformers vision backbones: ARNN gates in ResNet and ConvNeXt models.

Two ``kind="insert"`` adapters, each gate an :class:`~arnn_plugins.ARNNGate`
that is the identity at initialisation:

- ``hf_resnet``: one gate on the output of every residual layer
  (``ResNetBasicLayer`` / ``ResNetBottleNeckLayer``) of ``ResNetModel``,
  ``ResNetForImageClassification`` and ``ResNetBackbone``; channels are the
  layer's last conv's ``out_channels`` (``config.hidden_sizes[stage]``).
  Per residual block, as for torchvision and the MMCV plugin slots.
- ``hf_convnext``: one gate on the output of every ConvNeXt layer
  (``ConvNextLayer``, ``ConvNextV2Layer``), i.e. on the residual stream;
  channels from the layer's depthwise conv (``config.hidden_sizes[stage]``).
  Per layer rather than per stage: the next stage starts with a LayerNorm
  over channels at every location (as do ``ConvNextBackbone``'s feature-map
  norms), which removes a per-location scale, so a gate on a stage's output
  (equivalently, on its last layer) is almost entirely undone there; the
  gates on the layers before it act through the residual stream and the
  depthwise convs. Gating layers also keeps every gate inside the stages
  whose outputs transformers records with forward hooks of its own
  (``output_hidden_states``, ``ConvNextBackbone`` feature maps), so those
  records include the gates whatever the order of insertion.

Option ``stages`` (popped before the rest goes to ARNN): which stages, read
from the ``encoder.stages.<k>`` index in the module's name (``k + 1``), get
gates: 1-based numbers (default ``(2, 3, 4)``, leaving out the largest
maps), a bool per stage as in MMCV configs, or ``"all"``/``None``.

Checkpoints: gates are children named ``arnn_gate`` of the blocks, so a
checkpoint of the original model loads with ``from_pretrained`` first and
the gates are inserted after it::

    model = ResNetForImageClassification.from_pretrained(path)
    arnn_plugins.insert_attention(model)
"""

from __future__ import annotations

import importlib.util

import torch.nn as nn

from arnn_plugins.registry import register_adapter

from ._stages import StagesArg, is_instance_of_loaded, stage_gate

if importlib.util.find_spec("transformers") is None:  # the registry skips hosts that are not installed
    raise ImportError("transformers is not installed")

__all__ = [
    "RESNET_ADAPTER",
    "CONVNEXT_ADAPTER",
    "DEFAULT_STAGES",
    "match_resnet",
    "match_convnext",
    "build_resnet",
    "build_convnext",
]

RESNET_ADAPTER = "hf_resnet"
CONVNEXT_ADAPTER = "hf_convnext"
DEFAULT_STAGES = (2, 3, 4)
_STAGE_PATTERN = r"stages\.(\d+)"

_RESNET = ("transformers.models.resnet.modeling_resnet", ("ResNetBasicLayer", "ResNetBottleNeckLayer"))
_CONVNEXT = (
    ("transformers.models.convnext.modeling_convnext", ("ConvNextLayer",)),
    ("transformers.models.convnextv2.modeling_convnextv2", ("ConvNextV2Layer",)),
)


def match_resnet(module: nn.Module) -> bool:
    """True for a transformers ``ResNetBasicLayer`` / ``ResNetBottleNeckLayer``."""
    return is_instance_of_loaded(module, *_RESNET)


def match_convnext(module: nn.Module) -> bool:
    """True for a transformers ``ConvNextLayer`` / ``ConvNextV2Layer``."""
    return any(is_instance_of_loaded(module, mod, names) for mod, names in _CONVNEXT)


def resnet_layer_out_channels(layer: nn.Module) -> int:
    """Channels ``C`` of a ResNet layer's output ``(B, C, H, W)``."""
    try:
        conv = layer.layer[-1].convolution
    except (AttributeError, IndexError, TypeError):
        conv = None
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(
            f"{RESNET_ADAPTER}: {type(layer).__name__} has no layer[-1].convolution Conv2d "
            "to read its output channels from"
        )
    return conv.out_channels


def convnext_layer_out_channels(layer: nn.Module) -> int:
    """Channels ``C`` of a ConvNeXt layer's output ``(B, C, H, W)`` (its depthwise conv's)."""
    conv = getattr(layer, "dwconv", None)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(
            f"{CONVNEXT_ADAPTER}: {type(layer).__name__} has no dwconv Conv2d to read its output channels from"
        )
    return conv.out_channels


def build_resnet(layer: nn.Module, name: str = "", stages: StagesArg = DEFAULT_STAGES, **arnn_kwargs):
    """Gate for a ResNet layer with output ``(B, C, H, W)``, or ``None`` if its stage is left out.

    ``arnn_kwargs`` go to :class:`~arnn_plugins.ARNNGate` (e.g.
    ``hidden_channels``, ``block_size``).
    """
    return stage_gate(RESNET_ADAPTER, name, stages, _STAGE_PATTERN, resnet_layer_out_channels(layer), 1,
                      **arnn_kwargs)


def build_convnext(layer: nn.Module, name: str = "", stages: StagesArg = DEFAULT_STAGES, **arnn_kwargs):
    """Gate for a ConvNeXt layer with output ``(B, C, H, W)``, or ``None`` if its stage is left out."""
    return stage_gate(CONVNEXT_ADAPTER, name, stages, _STAGE_PATTERN, convnext_layer_out_channels(layer), 1,
                      **arnn_kwargs)


register_adapter(
    RESNET_ADAPTER,
    kind="insert",
    match=match_resnet,
    build=build_resnet,
    description="ARNN gate after each transformers ResNet layer (stages: default (2, 3, 4))",
    host="transformers",
)
register_adapter(
    CONVNEXT_ADAPTER,
    kind="insert",
    match=match_convnext,
    build=build_convnext,
    description="ARNN gate after each transformers ConvNeXt / ConvNeXt V2 layer (stages: default (2, 3, 4))",
    host="transformers",
)
