"""timm ResNets: an ARNN gate on the output of each residual block.

Adapter ``timm_resnet`` (``kind="insert"``) matches timm's ResNet
``BasicBlock`` and ``Bottleneck`` (resnet18 ... resnet200, the ``d`` /
``t`` variants, ResNeXt, SE- and ECA-ResNets, ...). Each selected block gets
an :class:`~arnn_plugins.ARNNGate` over its output channels, the identity
at initialisation, so a pretrained model keeps its function and its
checkpoints load with only the gates' keys new::

    import timm, arnn_plugins
    model = timm.create_model("resnet50", pretrained=True, num_classes=10)
    arnn_plugins.insert_attention(model)                  # layer2..layer4

For ResNets with CBAM (``attn_layer="cbam"``) the ``timm_cbam`` swap adapter
replaces CBAM's spatial branch instead (``swap_attention``).

Options (popped before the rest goes to ARNN):

- ``stages``: which of ``layer1`` .. ``layer4`` get gates, as 1-based stage
  numbers (default ``(2, 3, 4)``), a bool per stage, or ``"all"``/``None``,
  as for ``torchvision_resnet``.
"""

from __future__ import annotations

import importlib.util

from ._stages import register_resnet_gates

# The registry skips hosts that are not installed.
if importlib.util.find_spec("timm") is None:
    raise ImportError("timm is not installed")

__all__ = ["ADAPTER_NAME", "DEFAULT_STAGES", "match", "build"]

ADAPTER_NAME, DEFAULT_STAGES = "timm_resnet", (2, 3, 4)
match, build = register_resnet_gates(ADAPTER_NAME, "timm.models.resnet", "timm", DEFAULT_STAGES)
