"""Gates that put an AttentionRNN map onto features, identity at initialisation."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .arnn import AttentionRNN, BlockAttentionRNN, check_input
from .checks import check_int

__all__ = ["ARNNGate", "create_attention", "zero_init_attention"]


def create_attention(in_channels: int, block_size: int = 1, layer: str = "create_attention", **arnn_kwargs) -> nn.Module:
    """:class:`AttentionRNN`, or :class:`BlockAttentionRNN` when ``block_size > 1``.

    ``layer`` names the caller in the error for a bad ``block_size``.
    Both map ``(B, C, H, W)`` (+ query ``(B, Q)``) to ``(B, 1, H, W)``.
    """
    check_int(layer, "block_size", block_size)
    if block_size > 1:
        return BlockAttentionRNN(in_channels, block_size=block_size, **arnn_kwargs)
    return AttentionRNN(in_channels, **arnn_kwargs)


def zero_init_attention(layer: nn.Module) -> nn.Module:
    """Make an :class:`AttentionRNN` (or block variant) output ``mu = 0`` everywhere.

    Zeroes the last layer that produces the mean (the learned combiner's
    output conv, or the per-direction heads for the closed-form
    combination), so a gate or correction built on it starts as a no-op
    while gradients still reach that layer. Returns ``layer``.
    """
    arnn = layer.arnn if isinstance(layer, BlockAttentionRNN) else layer
    if not isinstance(arnn, AttentionRNN):
        raise TypeError(f"zero_init_attention: expected AttentionRNN or BlockAttentionRNN, got {type(layer).__name__}")
    with torch.no_grad():
        if arnn.combiner is not None:
            last = arnn.combiner[-1]
            last.weight[0].zero_()
            last.bias[0].zero_()
        else:
            # mu channels of both heads: 0 (left) and 2 (right).
            arnn.heads.weight[[0, 2]] = 0.0
            arnn.heads.bias[[0, 2]] = 0.0
        if isinstance(layer, BlockAttentionRNN):
            # The transposed conv would add its bias to a zero map.
            layer.up.bias.zero_()
    return layer


class ARNNGate(nn.Module):
    """Multiplicative spatial gate ``y = x * 2 sigmoid(a)``, ``a`` from AttentionRNN.

    ``a`` starts at zero (see :func:`zero_init_attention`), so the gate is the
    identity at initialisation and can be inserted into pretrained networks.

    Args:
        in_channels: channels ``C`` of the gated features.
        block_size: ``> 1`` uses :class:`BlockAttentionRNN` with that block.
        **arnn_kwargs: passed to the attention layer.

    Shape:
        ``(B, C, H, W)`` (+ query ``(B, Q)``) -> ``(B, C, H, W)``.
    """

    def __init__(self, in_channels: int, block_size: int = 1, **arnn_kwargs) -> None:
        super().__init__()
        check_int(type(self).__name__, "in_channels", in_channels)
        self.in_channels = in_channels
        self.attn = zero_init_attention(create_attention(in_channels, block_size, type(self).__name__, **arnn_kwargs))

    def forward(self, x: torch.Tensor, query: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, C, H, W)`` (+ query ``(B, Q)``) -> gated ``(B, C, H, W)``."""
        # Checked here too, so that a bad input names the gate the user added
        # (not under FX tracing, where x is a Proxy and the layer records itself).
        if not isinstance(x, torch.fx.Proxy):
            check_input(type(self).__name__, x, self.in_channels, query, self.attn.query_channels,
                        like=next(self.attn.parameters()))
        a = self.attn(x, query)
        return x * (2.0 * torch.sigmoid(a)).to(x.dtype)
