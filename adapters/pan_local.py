"""PAN's local attention -> query-conditioned AttentionRNN (adapter ``"pan_local"``).

Swaps every :class:`~arnn_plugins.models.pan.LocalAttention` (the ``ctx`` /
``noctx`` kinds of :class:`~arnn_plugins.models.pan.PAN`)::

    from arnn_plugins import swap_attention
    swap_attention(PAN("ctx"))                  # LocalARNNAttention: local logits + ARNN correction
    swap_attention(PAN("ctx"), mode="replace")  # plain AttentionRNN, as the paper's ARNN kind
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..arnn import AttentionRNN
from ..gate import zero_init_attention
from ..models.pan import LocalAttention
from ..registry import register_adapter

__all__ = ["LocalARNNAttention"]


class LocalARNNAttention(LocalAttention):
    """Local attention plus a zero-initialised AttentionRNN correction.

    ``a = local(x, q) + arnn(x, q)``: the original local logits act as a
    prior, so right after :func:`~arnn_plugins.swap_attention` (``mode=
    "residual"``) the model computes exactly what it did. Parameter names of
    the local part are unchanged, so checkpoints of the original model load
    (only ``arnn.*`` keys are new).

    Shape:
        as :class:`~arnn_plugins.models.pan.LocalAttention`: ``(B, C, h, w)``,
        query ``(B, Q)`` -> ``(B, 1, h, w)``.
    """

    def __init__(self, in_channels: int, query_channels: int, context_kernel: int = 3,
                 hidden_channels: int = 32, **arnn_kwargs) -> None:
        super().__init__(in_channels, query_channels, context_kernel, hidden_channels)
        arnn_kwargs.setdefault("query_channels", query_channels)
        self.arnn = zero_init_attention(AttentionRNN(in_channels, **arnn_kwargs))

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)``, ``(B, Q)`` -> ``(B, 1, h, w)``."""
        return super().forward(x, query) + self.arnn(x, query)


def _match(module: nn.Module) -> bool:
    # Exact type: an already swapped LocalARNNAttention is not swapped again.
    return type(module) is LocalAttention


def _build(module: LocalAttention, mode: str = "residual", **arnn_kwargs) -> nn.Module:
    if mode == "replace":
        arnn_kwargs.setdefault("query_channels", module.query_channels)
        return AttentionRNN(module.in_channels, **arnn_kwargs)
    new = LocalARNNAttention(
        module.in_channels, module.query_channels, module.context_kernel, module.hidden_channels, **arnn_kwargs
    )
    # Only the ARNN's keys are new, so copy the rest over as is.
    missing, unexpected = new.load_state_dict(module.state_dict(), strict=False)
    if unexpected or any(not k.startswith("arnn.") for k in missing):
        raise RuntimeError(f"pan_local: could not carry over LocalAttention weights ({missing}, {unexpected})")
    return new


register_adapter(
    "pan_local",
    kind="swap",
    match=_match,
    build=_build,
    description="PAN local attention (ctx / noctx) -> query-conditioned AttentionRNN",
    host="arnn_plugins.models.pan",
    override=True,
)
