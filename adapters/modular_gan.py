"""ModularGAN -> MGAN+ARNN: swap the transformer modules' 3x3 mask for ARNN.

The adapter ``"modular_gan_mask"`` matches
:class:`arnn_plugins.models.modular_gan.LocalMask` and replaces it by
:class:`ARNNMask`, ``g = sigmoid(logits)`` with

- ``mode="residual"``: ``logits = conv_3x3(t) + ARNN(t)``, the ARNN term
  zero-initialised, so the generator is unchanged at the swap; the 3x3
  conv keeps its parameter names (old checkpoints load, only ``arnn.*`` is
  new);
- ``mode="replace"``: ``logits = ARNN(t)`` (the paper's MGAN+ARNN).

ARNN's ``context_kernel`` defaults to 3, the local context of the original
mask.

Usage::

    from arnn_plugins import swap_attention
    swap_attention(mgan)                  # every transformer module's mask
    swap_attention(mgan, mode="replace")
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..arnn import AttentionRNN
from ..checks import check_image
from ..gate import zero_init_attention
from ..models.modular_gan import LocalMask
from ..registry import register_adapter

__all__ = ["ARNNMask"]


class ARNNMask(nn.Module):
    """Spatial mask ``sigmoid(a)`` from an :class:`~arnn_plugins.AttentionRNN`.

    Args:
        in_channels: channels ``C`` of the transformed features.
        prior: a :class:`LocalMask` kept as a prior (residual mode; its conv
            becomes this module's ``conv``); ``None`` for plain ARNN.
        **arnn_kwargs: options for :class:`~arnn_plugins.AttentionRNN`
            (``context_kernel`` defaults to 3).

    Shape:
        ``(B, C, H, W)`` -> mask ``(B, 1, H, W)`` in ``[0, 1]``; :meth:`logits`
        gives the values before the sigmoid.
    """

    def __init__(self, in_channels: int, prior: Optional[LocalMask] = None, **arnn_kwargs) -> None:
        super().__init__()
        arnn_kwargs.setdefault("context_kernel", 3)
        if arnn_kwargs.get("query_channels", 0):
            raise ValueError("ARNNMask: the mask takes no query (the attribute is already in the features)")
        self.in_channels = in_channels
        self.residual = prior is not None
        if prior is not None:
            if not isinstance(prior, LocalMask):
                raise TypeError(f"ARNNMask: prior must be a LocalMask, got {type(prior).__name__}")
            if prior.in_channels != in_channels:
                raise ValueError(f"ARNNMask: prior has {prior.in_channels} channels, expected {in_channels}")
            self.conv = prior.conv
        self.arnn = AttentionRNN(in_channels, **arnn_kwargs)
        if self.residual:
            zero_init_attention(self.arnn)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, residual={self.residual}"

    def logits(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, 1, H, W)`` mask logits."""
        check_image("ARNNMask", t, self.in_channels, "features")
        a = self.arnn(t)
        if self.residual:
            prior = self.conv(t)
            a = prior + a.to(prior.dtype)
        return a

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> mask ``(B, 1, H, W)`` in ``[0, 1]``."""
        return torch.sigmoid(self.logits(t))


def _match(module: nn.Module) -> bool:
    return type(module) is LocalMask


def _build(module: LocalMask, mode: str = "residual", **arnn_kwargs) -> ARNNMask:
    return ARNNMask(module.in_channels, prior=module if mode == "residual" else None, **arnn_kwargs)


register_adapter(
    "modular_gan_mask",
    kind="swap",
    match=_match,
    build=_build,
    description="ModularGAN transformer-module 3x3 mask -> ARNN mask (MGAN+ARNN)",
    host="arnn_plugins.models.modular_gan",
)
