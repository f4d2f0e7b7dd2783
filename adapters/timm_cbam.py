"""timm CBAM with an AttentionRNN spatial branch.

timm's ``CbamModule`` / ``LightCbamModule`` (``timm/layers/cbam.py``) apply a
channel gate and then a spatial gate whose logits come from a ``k x k`` conv
over the channel-pooled map (``[mean, max]``, or ``0.5 mean + 0.5 max`` for the
light variant). The swap adapter registered here (``"timm_cbam"``) keeps the
channel branch (the very same module object, weights and state_dict keys) and
gives the spatial branch an AttentionRNN:

- ``mode="residual"`` (default): the original conv logits stay as a prior and
  a zero-initialised ARNN correction is added before the sigmoid gate, so the
  model computes exactly what it computed before the swap;
- ``mode="replace"``: the paper's plain replacement: the ARNN output is the
  spatial logit map (the original conv is dropped; its checkpoint keys are
  accepted and ignored when loading).

What ARNN reads (``reads``): by default (``"features"``) the spatial
branch's input, i.e. the features *after* the channel gate, all ``C``
channels: the paper's ARNN builds its local context from the feature map
itself. With ``reads="pooled"`` it reads what CBAM's own spatial conv reads,
the channel-pooled map (``[mean, max]``, or ``0.5 mean + 0.5 max`` for the
light variant), so the whole of CBAM's spatial branch, pooling included, is
replaced and only its ``k x k`` conv becomes the ARNN (the paper: "we replace
only the spatial attention in CBAM with ARNN ... a local context of 3 x 3 ...
for both CBAM and CBAM+ARNN" says no more). The context conv then has 2 (or
1) input channels instead of ``C``: on a timm ResNet18 at 128x128 the
features' context conv is about half of what the ARNN branches add over
CBAM's (``arnn-plugins bench --profile``; ``docs/speed.md``). The ARNN sits in the spatial branch as child ``arnn``,
so checkpoints of the original model load with only ``*.spatial.arnn.*``
missing.

The modules are registered as leaves for timm's FX feature extraction
(``features_only=True, feature_cls='fx'``, ``FeatureGraphNet``): the scan's
column loop is not symbolically traceable.

``ARNNAttn`` is the spatial ARNN gate in timm's attention-layer calling
convention (``attn_layer(channels, **kwargs)``); the timm patch
(:mod:`arnn_plugins.patches.timm`) offers it as ``attn_layer='arnn'`` and
:class:`CbamARNN` as ``'cbam_arnn'``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, create_act_layer, register_notrace_module
from timm.layers.cbam import (
    ChannelAttn,
    CbamModule,
    LightCbamModule,
    LightChannelAttn,
    LightSpatialAttn,
    SpatialAttn,
)

from ..arnn import AttentionRNN, BlockAttentionRNN, check_input
from ..checks import check_choice, check_int, check_swap_mode
from ..gate import ARNNGate, create_attention, zero_init_attention
from ..registry import register_adapter

__all__ = [
    "ARNNSpatialAttn",
    "CbamARNN",
    "LightCbamARNN",
    "ARNNAttn",
    "reset_arnn_parameters",
    "reset_arnn_layers",
]

_GateLayer = Union[str, Type[nn.Module]]

#: What the ARNN of a CBAM spatial branch may read (``ARNNSpatialAttn(reads=...)``).
READS = ("features", "pooled")


def reset_arnn_parameters(layer: nn.Module, zero_output: bool) -> None:
    """Give an AttentionRNN (or block variant) its own initialisation back.

    timm's model ``init_weights`` re-initialises every ``nn.Conv2d`` it finds
    (Kaiming normal), ARNN's included; that would also undo the zero-init of a
    residual correction. ``zero_output=True`` then zeroes the mean output
    (:func:`~arnn_plugins.zero_init_attention`).
    """
    with torch.no_grad():
        for m in layer.modules():
            if not isinstance(m, (AttentionRNN, BlockAttentionRNN)) and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        # After the sub-layers: AttentionRNN's own init overrides input_proj's bias.
        for m in layer.modules():
            if isinstance(m, AttentionRNN):
                m.reset_parameters()
    if zero_output:
        zero_init_attention(layer)


class ARNNSpatialAttn(nn.Module):
    """CBAM spatial attention whose logits come from (or are corrected by) AttentionRNN.

    ``residual``: ``y = x * gate(conv(pool(x)) + arnn(x))`` with ``arnn``
    zero-initialised, i.e. exactly the original CBAM spatial gate at init.
    ``replace``: ``y = x * gate(arnn(x))``.

    Args:
        channels: ``C`` of the features.
        kernel_size: spatial conv size of the CBAM prior (residual mode).
        gate_layer: gate nonlinearity (CBAM: sigmoid).
        light: pool as ``LightSpatialAttn`` (``0.5 mean + 0.5 max``, one
            channel) instead of ``SpatialAttn`` (``[mean, max]``).
        mode: ``"residual"`` or ``"replace"``.
        reads: what the ARNN reads: ``"features"`` (all ``C`` channels) or
            ``"pooled"`` (the channel-pooled map CBAM's conv reads: 2
            channels, 1 with ``light``).
        block_size: ``> 1`` uses :class:`~arnn_plugins.BlockAttentionRNN`.
        conv: an existing prior conv to keep (shared, not copied); built
            fresh when ``None`` in residual mode.
        gate: an existing gate module to keep.
        device, dtype: where to create the parameters.
        **arnn_kwargs: passed to :class:`~arnn_plugins.AttentionRNN`.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        gate_layer: _GateLayer = "sigmoid",
        light: bool = False,
        mode: str = "residual",
        reads: str = "features",
        block_size: int = 1,
        conv: Optional[nn.Module] = None,
        gate: Optional[nn.Module] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        **arnn_kwargs,
    ) -> None:
        super().__init__()
        check_swap_mode("ARNNSpatialAttn", mode)
        check_choice("ARNNSpatialAttn", "reads", reads, READS)
        if mode == "replace" and conv is not None:
            raise ValueError("ARNNSpatialAttn: mode='replace' has no prior conv; do not pass conv")
        self.channels = channels
        self.light = light
        self.mode = mode
        self.reads = reads
        pooled_channels = 1 if light else 2
        built_conv = mode == "residual" and conv is None
        if built_conv:
            conv = ConvNormAct(pooled_channels, 1, kernel_size, apply_act=False)
        self.conv = conv
        self.gate = gate if gate is not None else create_act_layer(gate_layer)
        arnn_in = channels if reads == "features" else pooled_channels
        self.arnn = create_attention(arnn_in, block_size, "ARNNSpatialAttn", **arnn_kwargs)
        if mode == "residual":
            zero_init_attention(self.arnn)
        if device is not None or dtype is not None:
            # A conv passed in belongs to the caller's model: never move it.
            self.arnn.to(device=device, dtype=dtype)
            if built_conv:
                self.conv.to(device=device, dtype=dtype)
        # In replace mode the original conv is gone: an original checkpoint's
        # ``conv.*`` keys are expected and dropped on load.
        self.ignored_checkpoint_prefixes: Tuple[str, ...] = ("conv.",) if mode == "replace" else ()

    @classmethod
    def from_cbam_spatial(cls, spatial: nn.Module, channels: int, mode: str = "residual", **arnn_kwargs):
        """Build from a timm ``SpatialAttn`` / ``LightSpatialAttn``, sharing its conv and gate."""
        if not isinstance(spatial, (SpatialAttn, LightSpatialAttn)):
            raise TypeError(
                f"ARNNSpatialAttn.from_cbam_spatial: expected timm SpatialAttn or LightSpatialAttn, "
                f"got {type(spatial).__name__}"
            )
        check_swap_mode("ARNNSpatialAttn", mode)
        ref = next(spatial.parameters(), None)
        new = cls(
            channels,
            light=isinstance(spatial, LightSpatialAttn),
            mode=mode,
            conv=spatial.conv if mode == "residual" else None,
            gate=spatial.gate,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
            **arnn_kwargs,
        )
        new.arnn.train(spatial.training)
        new.training = spatial.training
        return new

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for p in self.ignored_checkpoint_prefixes:
            for key in [k for k in state_dict if k.startswith(prefix + p)]:
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.channels}, mode={self.mode!r}, light={self.light}, reads={self.reads!r}"

    def zero_init_last(self) -> None:
        """timm init hook (ResNet, CSPNet): restore ARNN's init; zero the residual correction."""
        reset_arnn_parameters(self.arnn, zero_output=self.mode == "residual")

    def init_weights(self, zero_init_last: bool = False) -> None:
        """timm init hook (ByobNet): as :meth:`zero_init_last`."""
        self.zero_init_last()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """CBAM's channel pooling: ``(B, C, H, W)`` -> ``(B, 2, H, W)`` (``(B, 1, H, W)`` with ``light``)."""
        if self.light:
            return 0.5 * x.mean(dim=1, keepdim=True) + 0.5 * x.amax(dim=1, keepdim=True)
        return torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)

    def prior_logits(self, x: torch.Tensor) -> torch.Tensor:
        """CBAM's conv logits ``(B, 1, H, W)`` for ``x`` ``(B, C, H, W)`` (residual mode)."""
        return self.conv(self.pool(x))

    def attn_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial logits ``(B, 1, H, W)`` before the gate, for ``x`` ``(B, C, H, W)``."""
        check_input("ARNNSpatialAttn", x, self.channels)
        # One pooling serves both the ARNN (reads="pooled") and the prior conv.
        pooled = self.pool(x) if self.reads == "pooled" or self.conv is not None else None
        a = self.arnn(pooled if self.reads == "pooled" else x)
        return a if self.conv is None else self.conv(pooled) + a

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial mask ``(B, 1, H, W)`` (the gate applied to the logits)."""
        return self.gate(self.attn_logits(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        return x * self.gate(self.attn_logits(x))


class CbamARNN(nn.Module):
    """CBAM (channel gate, then spatial gate) with an AttentionRNN spatial branch.

    Same constructor as timm's ``CbamModule`` plus ``light``, ``mode``,
    ``block_size`` and ARNN options, so it works as a timm ``attn_layer``;
    :meth:`from_cbam` wraps an existing CBAM instead. Children ``channel`` and
    ``spatial`` keep CBAM's state_dict keys.

    Args:
        channels: ``C``.
        rd_ratio, rd_channels, rd_divisor, act_layer, gate_layer, mlp_bias:
            channel branch options, as in timm's ``CbamModule``.
        spatial_kernel_size: size of the CBAM prior conv (residual mode).
        light: ``LightCbamModule`` variant of both branches.
        mode: ``"residual"`` or ``"replace"`` (see :class:`ARNNSpatialAttn`).
        reads: ``"features"`` or ``"pooled"`` (see :class:`ARNNSpatialAttn`).
        block_size: ``> 1`` uses Block AttentionRNN.
        device, dtype: where to create the parameters.
        **arnn_kwargs: passed to :class:`~arnn_plugins.AttentionRNN`.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: Optional[int] = None,
        rd_divisor: int = 1,
        spatial_kernel_size: int = 7,
        act_layer: Type[nn.Module] = nn.ReLU,
        gate_layer: _GateLayer = "sigmoid",
        mlp_bias: bool = False,
        light: bool = False,
        mode: str = "residual",
        reads: str = "features",
        block_size: int = 1,
        channel: Optional[nn.Module] = None,
        spatial: Optional[ARNNSpatialAttn] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        **arnn_kwargs,
    ) -> None:
        super().__init__()
        check_int("CbamARNN", "channels", channels)
        if channel is None:
            channel_cls = LightChannelAttn if light else ChannelAttn
            channel = channel_cls(
                channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor,
                act_layer=act_layer, gate_layer=gate_layer, mlp_bias=mlp_bias,
            )
            if device is not None or dtype is not None:
                channel.to(device=device, dtype=dtype)
        if spatial is None:
            spatial = ARNNSpatialAttn(
                channels, spatial_kernel_size,
                # timm's LightSpatialAttn always gates with a sigmoid.
                gate_layer="sigmoid" if light else gate_layer,
                light=light, mode=mode, reads=reads, block_size=block_size, device=device, dtype=dtype,
                **arnn_kwargs,
            )
        elif not isinstance(spatial, ARNNSpatialAttn):
            raise TypeError(f"CbamARNN: spatial must be an ARNNSpatialAttn, got {type(spatial).__name__}")
        self.channel = channel
        self.spatial = spatial

    @classmethod
    def from_cbam(cls, module: nn.Module, mode: str = "residual", **arnn_kwargs) -> "CbamARNN":
        """Wrap a timm ``CbamModule`` / ``LightCbamModule``: same channel branch, ARNN spatial branch.

        ``module`` itself is not changed; the new module shares its channel
        branch (and, in residual mode, its spatial conv and gate).
        """
        if not _is_timm_cbam(module):
            raise TypeError(
                f"CbamARNN.from_cbam: expected a timm CbamModule or LightCbamModule, got {type(module).__name__}"
            )
        channels = module.channel.fc1.in_channels
        spatial = ARNNSpatialAttn.from_cbam_spatial(module.spatial, channels, mode=mode, **arnn_kwargs)
        new = cls(channels, light=isinstance(module, LightCbamModule), channel=module.channel, spatial=spatial)
        new.training = module.training
        return new

    @property
    def mode(self) -> str:
        """``"residual"`` or ``"replace"`` (the spatial branch's mode)."""
        return self.spatial.mode

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial mask ``(B, 1, H, W)`` for the block input ``x`` ``(B, C, H, W)``."""
        return self.spatial.attention(self.channel(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        return self.spatial(self.channel(x))


class LightCbamARNN(CbamARNN):
    """:class:`CbamARNN` with timm's light CBAM branches (``LightCbamModule``'s pooling).

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(self, channels: int, **kwargs) -> None:
        kwargs.setdefault("light", True)
        super().__init__(channels, **kwargs)


class ARNNAttn(ARNNGate):
    """Spatial ARNN gate ``y = x * 2 sigmoid(a)`` in timm's ``attn_layer`` convention.

    The identity at initialisation (see :class:`~arnn_plugins.ARNNGate`).
    timm passes squeeze-excite style options to attention layers
    (``rd_ratio``, ``act_layer``, ...); they describe a channel reduction that
    a spatial gate does not have and are accepted and unused.

    Args:
        channels: ``C``.
        block_size: ``> 1`` uses Block AttentionRNN.
        device, dtype: where to create the parameters.
        **arnn_kwargs: passed to :class:`~arnn_plugins.AttentionRNN`.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        *,
        block_size: int = 1,
        rd_ratio: Optional[float] = None,
        rd_channels: Optional[int] = None,
        rd_divisor: Optional[int] = None,
        act_layer: Optional[Type[nn.Module]] = None,
        gate_layer: Optional[_GateLayer] = None,
        mlp_bias: Optional[bool] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        **arnn_kwargs,
    ) -> None:
        super().__init__(channels, block_size=block_size, **arnn_kwargs)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}"

    def zero_init_last(self) -> None:
        """timm init hook (ResNet, CSPNet): restore ARNN's init, identity gate."""
        reset_arnn_parameters(self.attn, zero_output=True)

    def init_weights(self, zero_init_last: bool = False) -> None:
        """timm init hook (ByobNet): as :meth:`zero_init_last`."""
        self.zero_init_last()


def reset_arnn_layers(model: nn.Module) -> int:
    """Re-initialise every ARNN layer of this module's classes in ``model``; returns how many.

    timm's ResNet calls the layers' init hook only with ``zero_init_last=True``
    (its default); a model built with ``zero_init_last=False`` keeps timm's
    Kaiming init in ARNN's convs, so a residual correction does not start at
    zero. Call this after building such a model.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, (ARNNSpatialAttn, ARNNAttn)):
            m.zero_init_last()
            n += 1
    return n


def _is_timm_cbam(module: nn.Module) -> bool:
    return (
        isinstance(module, (CbamModule, LightCbamModule))
        and isinstance(getattr(module, "spatial", None), (SpatialAttn, LightSpatialAttn))
        and isinstance(getattr(getattr(module, "channel", None), "fc1", None), nn.Conv2d)
    )


def _build(module: nn.Module, mode: str = "residual", **arnn_kwargs) -> CbamARNN:
    return CbamARNN.from_cbam(module, mode=mode, **arnn_kwargs)


# The scan's column loop and the input checks are not symbolically traceable.
for _cls in (AttentionRNN, BlockAttentionRNN, ARNNGate, ARNNSpatialAttn):
    register_notrace_module(_cls)

register_adapter(
    "timm_cbam",
    kind="swap",
    match=_is_timm_cbam,
    build=_build,
    description="timm CbamModule / LightCbamModule: ARNN spatial branch, channel branch kept",
    host="timm",
    override=True,
)
