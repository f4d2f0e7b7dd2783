"""MCB+ATT -> MCB+ARNN: swap the glimpse attention of the MCB VQA model for ARNN.

The adapter ``"vqa_mcb_glimpse"`` matches
:class:`arnn_plugins.models.mcb.MCBGlimpseAttention` and replaces it by
:class:`ARNNGlimpseAttention`: one query-conditioned
:class:`~arnn_plugins.AttentionRNN` per glimpse (input: the image features,
query: the question embedding, ``context_kernel=1`` by default as the paper's
MCB+ARNN uses a delta = 1 context), softmax over space of its values.

- ``mode="residual"``: the original glimpse logits stay as a prior and each
  ARNN adds a zero-initialised correction, so the model computes exactly
  what it did before the swap. The original attention's parameters keep
  their names, so MCB+ATT checkpoints still load (only ``arnn.*`` is new).
- ``mode="replace"``: the glimpse logits are the ARNN values alone (the
  paper's MCB+ARNN).

Usage::

    from arnn_plugins import swap_attention
    swap_attention(mcb_model)                  # residual, warm start
    swap_attention(mcb_model, mode="replace")  # the paper's MCB+ARNN
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..arnn import AttentionRNN
from ..checks import check_int
from ..gate import zero_init_attention
from ..models.mcb import MCBGlimpseAttention, check_glimpse_input, local_glimpse_logits, spatial_softmax
from ..registry import register_adapter

__all__ = ["ARNNGlimpseAttention"]


class ARNNGlimpseAttention(nn.Module):
    """Glimpse attention from query-conditioned ARNNs, one per glimpse.

    Args:
        img_channels: image feature channels ``C``.
        query_channels: question embedding size ``Q``.
        glimpses: number of maps ``G``.
        prior: an :class:`MCBGlimpseAttention` whose logits are kept as a prior
            (residual mode); its submodules become this module's ``mcb``,
            ``conv1``, ``conv2`` so parameter names are unchanged. ``None``:
            plain ARNN logits.
        **arnn_kwargs: options for :class:`~arnn_plugins.AttentionRNN`
            (``context_kernel`` defaults to 1).

    Shape:
        ``x`` ``(B, C, H, W)``, ``q`` ``(B, Q)`` -> weights ``(B, G, H, W)``
        (softmax over space per glimpse).
    """

    def __init__(
        self,
        img_channels: int,
        query_channels: int,
        glimpses: int = 2,
        prior: Optional[MCBGlimpseAttention] = None,
        **arnn_kwargs,
    ) -> None:
        super().__init__()
        check_int("ARNNGlimpseAttention", "glimpses", glimpses)
        arnn_kwargs.setdefault("context_kernel", 1)
        if arnn_kwargs.pop("query_channels", query_channels) != query_channels:
            raise ValueError(
                f"ARNNGlimpseAttention: the ARNN query is the question embedding ({query_channels} channels)"
            )
        self.img_channels = img_channels
        self.query_channels = query_channels
        self.glimpses = glimpses
        self.residual = prior is not None
        if prior is not None:
            if not isinstance(prior, MCBGlimpseAttention):
                raise TypeError(
                    f"ARNNGlimpseAttention: prior must be an MCBGlimpseAttention, got {type(prior).__name__}"
                )
            if (prior.img_channels, prior.query_channels, prior.glimpses) != (img_channels, query_channels, glimpses):
                raise ValueError("ARNNGlimpseAttention: prior has different channels or glimpses")
            self.dropout = prior.dropout
            self.mcb, self.conv1, self.conv2 = prior.mcb, prior.conv1, prior.conv2
        self.arnn = nn.ModuleList(
            AttentionRNN(img_channels, query_channels=query_channels, **arnn_kwargs) for _ in range(glimpses)
        )
        if self.residual:
            for layer in self.arnn:
                zero_init_attention(layer)

    def extra_repr(self) -> str:
        return (
            f"img_channels={self.img_channels}, query_channels={self.query_channels}, "
            f"glimpses={self.glimpses}, residual={self.residual}"
        )

    def logits(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)``, ``(B, Q)`` -> glimpse logits ``(B, G, H, W)``."""
        check_glimpse_input("ARNNGlimpseAttention", x, q, self.img_channels, self.query_channels)
        a = torch.cat([layer(x, q) for layer in self.arnn], dim=1)
        if self.residual:
            prior = local_glimpse_logits(self.mcb, self.conv1, self.conv2, self.dropout, self.training, x, q)
            a = prior + a.to(prior.dtype)
        return a

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)``, ``(B, Q)`` -> attention weights ``(B, G, H, W)``."""
        return spatial_softmax(self.logits(x, q))


def _match(module: nn.Module) -> bool:
    # Exact type: an already swapped module is never matched again.
    return type(module) is MCBGlimpseAttention


def _build(module: MCBGlimpseAttention, mode: str = "residual", **arnn_kwargs) -> ARNNGlimpseAttention:
    return ARNNGlimpseAttention(
        module.img_channels,
        module.query_channels,
        module.glimpses,
        prior=module if mode == "residual" else None,
        **arnn_kwargs,
    )


register_adapter(
    "vqa_mcb_glimpse",
    kind="swap",
    match=_match,
    build=_build,
    description="MCB+ATT glimpse attention -> query-conditioned ARNN per glimpse (MCB+ARNN)",
    host="arnn_plugins.models.mcb",
)
