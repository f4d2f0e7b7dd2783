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

from ._stages import register_resnet_gates

# The registry skips hosts that are not installed.
if importlib.util.find_spec("torchvision") is None:
    raise ImportError("torchvision is not installed")

__all__ = ["ADAPTER_NAME", "DEFAULT_STAGES", "match", "build"]

ADAPTER_NAME, DEFAULT_STAGES = "torchvision_resnet", (2, 3, 4)
match, build = register_resnet_gates(ADAPTER_NAME, "torchvision.models.resnet", "torchvision", DEFAULT_STAGES)
