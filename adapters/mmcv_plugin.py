"""MMCV plugin layers: ARNN gates for the plugin slots of mmdet / mmseg ResNets.

Importing this module registers two plugin layers in mmengine's root
``MODELS`` registry, the one :func:`mmcv.cnn.build_plugin_layer` searches
(mmdet's and mmseg's ``MODELS`` are its children and fall back to it):

=====================  =========  ==========================================
``type``               ``_abbr_``  layer
=====================  =========  ==========================================
``'AttentionRNN'``     ``arnn``   :class:`AttentionRNNPlugin`
``'BlockAttentionRNN'`` ``brnn``  :class:`BlockAttentionRNNPlugin`
=====================  =========  ==========================================

Each is a gate ``y = x * 2 sigmoid(a)`` with ``a`` from ARNN (see
:class:`~arnn_plugins.ARNNGate`): it returns features of the input's shape
and is the identity at initialisation, so it can go into a pretrained
backbone. In a config::

    custom_imports = dict(imports=['arnn_plugins.adapters.mmcv_plugin'],
                          allow_failed_imports=False)
    model = dict(backbone=dict(
        type='ResNet', depth=50,
        plugins=[dict(cfg=dict(type='AttentionRNN', hidden_channels=16),
                      stages=(False, True, True, True),
                      position='after_conv2')]))

Plugins go into Bottleneck ResNets (depth 50+); mmdet's and mmseg's
``BasicBlock`` have no plugin slots.
"""

from __future__ import annotations

from mmengine.registry import MODELS

from arnn_plugins.checks import check_int
from arnn_plugins.gate import ARNNGate, zero_init_attention

__all__ = ["AttentionRNNPlugin", "BlockAttentionRNNPlugin", "register_plugins"]


def _plugin_arnn_kwargs(layer: str, arnn_kwargs: dict) -> dict:
    """Check options that make no sense in a plugin slot; build a config-dict ``context_net``."""
    if arnn_kwargs.get("query_channels", 0):
        raise ValueError(
            f"{layer} plugin: query_channels must be 0; plugin slots pass the features (B, C, H, W) alone"
        )
    net = arnn_kwargs.get("context_net")
    if isinstance(net, dict):
        arnn_kwargs = dict(arnn_kwargs, context_net=MODELS.build(net))
    return arnn_kwargs


class _PluginGate(ARNNGate):
    """Shared part of the plugins: re-initialisation after a host's ``init_cfg``."""

    def init_weights(self) -> None:
        """Fresh ARNN init with a zero attention map, i.e. the identity again.

        mmengine calls this after the host's ``init_cfg`` (e.g. the ResNet's
        ``Kaiming`` on every ``Conv2d``) has run over the plugin's layers and
        before any ``Pretrained`` checkpoint is loaded, so a backbone built
        from a config and initialised by a runner still starts with its
        plugins acting as the identity.
        """
        # Children before parents, so AttentionRNN's own LSTM-style init
        # (forget-gate bias) comes after its input conv's default reset.
        for m in reversed(list(self.attn.modules())):
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
        zero_init_attention(self.attn)


class AttentionRNNPlugin(_PluginGate):
    """MMCV plugin ``type='AttentionRNN'``: ARNN spatial gate, identity at init.

    Args:
        in_channels: channels ``C`` of the features at the plugin's position
            (passed by the host block).
        **arnn_kwargs: options of :class:`~arnn_plugins.AttentionRNN`
            (``hidden_channels``, ``context_kernel``, ``combine``, ``sample``,
            ``shift``, ``backend``, ...). ``context_net`` may be a config
            dict, built with ``MODELS``. ``query_channels`` must stay 0.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    _abbr_ = "arnn"

    def __init__(self, in_channels: int, **arnn_kwargs) -> None:
        check_int("AttentionRNN plugin", "in_channels", in_channels)
        if "block_size" in arnn_kwargs:
            raise TypeError("AttentionRNN plugin: no block_size option; use type='BlockAttentionRNN' for blocks")
        super().__init__(in_channels, **_plugin_arnn_kwargs("AttentionRNN", arnn_kwargs))


class BlockAttentionRNNPlugin(_PluginGate):
    """MMCV plugin ``type='BlockAttentionRNN'``: Block ARNN gate (paper 3.3), identity at init.

    ARNN runs on a ``block_size``-times smaller map, which cuts the length
    of its sequential scan on large feature maps by the same factor.

    Args:
        in_channels: channels ``C`` of the features at the plugin's position.
        block_size: ``gamma >= 2`` (``1`` gives the plain ARNN gate).
        **arnn_kwargs: as for :class:`AttentionRNNPlugin`.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``, any ``H, W``.
    """

    _abbr_ = "brnn"

    def __init__(self, in_channels: int, block_size: int = 2, **arnn_kwargs) -> None:
        check_int("BlockAttentionRNN plugin", "in_channels", in_channels)
        check_int("BlockAttentionRNN plugin", "block_size", block_size)
        super().__init__(
            in_channels, block_size=block_size, **_plugin_arnn_kwargs("BlockAttentionRNN", arnn_kwargs)
        )
        self.block_size = block_size


PLUGINS = {"AttentionRNN": AttentionRNNPlugin, "BlockAttentionRNN": BlockAttentionRNNPlugin}


def register_plugins(registry=MODELS) -> None:
    """Register the plugins in ``registry`` (default: mmengine's root ``MODELS``).

    Idempotent for these classes (a module reload replaces them); raises
    ``KeyError`` if another class already holds one of the names, rather
    than shadowing it.
    """
    for name, cls in PLUGINS.items():
        existing = registry.module_dict.get(name)
        if existing is cls:
            continue
        same = existing is not None and (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
        if existing is not None and not same:
            raise KeyError(
                f"{registry.name} registry already has a {name!r} ({existing.__module__}.{existing.__qualname__}); "
                "refusing to replace it"
            )
        registry.register_module(name=name, module=cls, force=same)


register_plugins()
