"""AttentionRNN and Block AttentionRNN (Khandelwal & Sigal, ICCV 2019, sec. 3).

The whole layer, in order:

1. local context ``Xc = K_c * X`` (a ``delta x delta`` conv, or any module),
   with an optional query projected and broadcast over space, concatenated;
2. input part of the LSTM gates for both directions in one grouped 1x1 conv
   (``K_x``; it commutes with skewing and mirroring, so it runs on the image);
3. two diagonal LSTMs (:func:`arnn_plugins.ops.diagonal_lstm`): left-to-right
   on the image (top-left quadrant) and on the mirrored image (top-right),
   the second mirrored back and shifted down one row;
4. per-direction Gaussian heads ``(mu, sigma)``, ``sigma > 0``;
5. combination Gamma: learned per-location network, or the closed-form
   product of the two Gaussians;
6. output the mean, or a reparameterised sample.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import (
    check_bool,
    check_choice,
    check_float,
    check_image,
    check_int,
    check_like,
    check_odd_kernel,
    check_query,
)
from .ops import ScanFn, check_backend, projected_lstm

__all__ = ["AttentionRNN", "BlockAttentionRNN", "ARNNStats", "COMBINE_MODES"]

COMBINE_MODES = ("learned", "independent")


class ARNNStats(NamedTuple):
    """Everything AttentionRNN computes per location; each field ``(B, 1, H, W)``."""

    a: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    mu_l: torch.Tensor
    sigma_l: torch.Tensor
    mu_r: torch.Tensor
    sigma_r: torch.Tensor


def _positive(raw: torch.Tensor, floor: float) -> torch.Tensor:
    return F.softplus(raw) + floor


def product_of_gaussians(mu_l, sigma_l, mu_r, sigma_r):
    """Closed-form product ``N(mu_l, sigma_l) N(mu_r, sigma_r) ∝ N(mu, sigma)``.

    Precisions add, and the mean is the precision-weighted mean. All inputs
    broadcast together; returns ``(mu, sigma)``.
    """
    var_l, var_r = sigma_l * sigma_l, sigma_r * sigma_r
    total = var_l + var_r
    mu = (mu_l * var_r + mu_r * var_l) / total
    sigma = sigma_l * sigma_r / total.sqrt()
    return mu, sigma


def check_input(layer: str, x, in_channels: int, query=None, query_channels: int = 0, *,
                like: Optional[torch.Tensor] = None) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``layer`` for a bad ``x`` ``(B, C, H, W)`` or ``query`` ``(B, Q)``.

    With ``like`` (one of the layer's parameters), ``x`` must also be on its
    device and of its dtype (outside autocast), and ``query`` on its device;
    a query of another floating dtype is cast, as every attention layer of
    the package does with its small conditioning vector.
    """
    check_image(layer, x, in_channels)
    check_query(layer, query, x.shape[0], query_channels)
    if like is not None:
        check_like(layer, x, like)
        if query is not None:
            check_like(layer, query, like, what="query", dtype=False)


def fx_leaf(module: nn.Module, x: "torch.fx.Proxy", query, return_stats: bool):
    """Record ``module(x, query, return_stats)`` as one ``call_module`` node of an FX trace.

    ``torch.fx.symbolic_trace`` (and torchvision's ``create_feature_extractor``)
    keep only ``torch.nn``'s own layers as leaves; traced through, the input
    checks and the scan would meet a Proxy, whose shape is unknown. So an
    ARNN layer records itself, as a leaf would, without the user naming it.
    """
    tracer = x.tracer
    kwargs = {"return_stats": True} if return_stats else {}
    args = (x,) if query is None else (x, query)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)


def _per_location(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Apply ``module`` to feature planes ``x`` ``(C_in, N)`` -> ``(C_out, N)``, ``N`` locations.

    ``module`` is a 1x1 ``nn.Conv2d`` (ungrouped), a pointwise layer, or an
    ``nn.Sequential`` of those: the same map as on ``(B, C, H, W)``, as
    matrix products whose long side is the locations.
    """
    if isinstance(module, nn.Sequential):
        for m in module:
            x = _per_location(x, m)
        return x
    if isinstance(module, nn.Conv2d):
        weight = module.weight.flatten(1)
        return weight @ x if module.bias is None else torch.addmm(module.bias[:, None], weight, x)
    if type(module) is nn.Tanh:
        # tanh(x) = 2 sigmoid(2x) - 1: on CPU torch's tanh took 8x sigmoid's
        # time (0.88 against 0.11 ms for 16 x 16384 floats, one thread).
        return torch.sigmoid(2 * x) * 2 - 1
    return module(x)


class AttentionRNN(nn.Module):
    """Structured spatial attention: ``a[i, j]`` conditioned on the raster-scan past.

    Args:
        in_channels: channels ``C`` of the input features.
        hidden_channels: LSTM features ``t`` per direction.
        context_kernel: odd size ``delta`` of the local context conv (1: the
            location alone).
        context_net: optional module ``(B, C, H, W) -> (B, Cc, H, W)`` used
            instead of the context conv (e.g. a small U-Net).
        context_channels: ``Cc``; defaults to ``hidden_channels``, or to
            ``context_net.out_channels`` when that exists.
        query_channels: size ``Q`` of an optional query vector; 0 for none.
        combine: ``"learned"`` (paper's ARNN, a small per-location network) or
            ``"independent"`` (closed-form product of Gaussians, ARNN_ind).
        sample: draw ``a ~ N(mu, sigma)`` (reparameterised) in training mode
            (ARNN~). In eval mode the mean is returned, so inference is
            deterministic.
        shift: shift the right-to-left direction down one row so that
            ``a[i, j]`` sees only the raster-scan past. With ``shift=False``
            it sees every row above and the whole of row ``i``.
        backend: recurrence backend, one of ``"auto"``, ``"reference"``,
            ``"fused"``, ``"triton"`` (or another registered name), or a
            callable ``fn(gx, weight_hh) -> h`` (see :func:`arnn_plugins.ops.diagonal_lstm`).
        combine_hidden: width of the learned combination network.
        min_sigma: floor added to every predicted standard deviation.

    Shape:
        - x: ``(B, C, H, W)``; query: ``(B, Q)`` when ``query_channels > 0``.
        - output: ``(B, 1, H, W)`` attention values before any gate, or an
          :class:`ARNNStats` of such maps with ``return_stats=True``.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int = 16,
        context_kernel: int = 3,
        context_net: Optional[nn.Module] = None,
        context_channels: Optional[int] = None,
        query_channels: int = 0,
        combine: str = "learned",
        sample: bool = False,
        shift: bool = True,
        backend: str | ScanFn = "auto",
        combine_hidden: int = 16,
        min_sigma: float = 1e-3,
    ) -> None:
        super().__init__()
        check_int("AttentionRNN", "in_channels", in_channels)
        check_int("AttentionRNN", "hidden_channels", hidden_channels)
        check_int("AttentionRNN", "query_channels", query_channels, minimum=0)
        check_int("AttentionRNN", "combine_hidden", combine_hidden)
        check_bool("AttentionRNN", "sample", sample)
        check_bool("AttentionRNN", "shift", shift)
        if context_channels is not None:
            check_int("AttentionRNN", "context_channels", context_channels)
        if context_net is None:
            check_odd_kernel("AttentionRNN", "context_kernel", context_kernel)
        elif not isinstance(context_net, nn.Module):
            raise TypeError(f"AttentionRNN: context_net must be an nn.Module, got {type(context_net).__name__}")
        check_choice("AttentionRNN", "combine", combine, COMBINE_MODES)
        check_backend("AttentionRNN", backend)
        # NaN would pass a "<= 0" test and make every output NaN.
        min_sigma = check_float("AttentionRNN", "min_sigma", min_sigma, minimum=0.0)

        t = hidden_channels
        if context_channels is None:
            context_channels = getattr(context_net, "out_channels", None) if context_net is not None else t
            if context_channels is None:
                raise ValueError(
                    "AttentionRNN: pass context_channels (the channels context_net outputs); "
                    "context_net has no out_channels attribute"
                )
            check_int("AttentionRNN", "context_channels (context_net.out_channels)", context_channels)
        self.in_channels = in_channels
        self.hidden_channels = t
        self.context_kernel = context_kernel if context_net is None else None
        self.context_channels = context_channels
        self.query_channels = query_channels
        self.combine = combine
        self.sample = sample
        self.shift = shift
        self.backend = backend
        self.min_sigma = float(min_sigma)

        if context_net is None:
            context_net = nn.Conv2d(in_channels, context_channels, context_kernel, padding=context_kernel // 2)
        self.context = context_net
        self.query_proj = nn.Linear(query_channels, t) if query_channels else None
        # K_x for both directions at once, a grouped 1x1 conv over
        # [context, mirrored context]: output channels [left 4t | right 4t],
        # each already in its own scan frame.
        cin = context_channels + (t if query_channels else 0)
        self.input_proj = nn.Conv2d(2 * cin, 2 * 4 * t, 1, groups=2)
        # K_h per direction, a 2x1 kernel: [..., 0] upper neighbour, [..., 1] left.
        self.weight_hh = nn.Parameter(torch.empty(2, 4 * t, t, 2))
        # (mu, raw sigma) per direction from that direction's hidden state.
        self.heads = nn.Conv2d(2 * t, 4, 1, groups=2)
        if combine == "learned":
            self.combiner = nn.Sequential(
                nn.Conv2d(4, combine_hidden, 1), nn.Tanh(), nn.Conv2d(combine_hidden, 2, 1)
            )
        else:
            self.combiner = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LSTM-style uniform init; forget-gate bias 1 in both directions."""
        t = self.hidden_channels
        bound = t ** -0.5
        nn.init.uniform_(self.weight_hh, -bound, bound)
        with torch.no_grad():
            bias = self.input_proj.bias.view(2, 4, t)  # gate order [o, f, i, g]
            bias.zero_()
            bias[:, 1] = 1.0

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, hidden_channels={self.hidden_channels}"
        if self.context_kernel is not None:
            s += f", context_kernel={self.context_kernel}"
        else:
            s += f", context_channels={self.context_channels}"
        if self.query_channels:
            s += f", query_channels={self.query_channels}"
        # A callable backend by its name: its repr holds a memory address.
        backend = getattr(self.backend, "__name__", None) if callable(self.backend) else None
        backend = backend or repr(self.backend)
        s += f", combine={self.combine!r}, sample={self.sample}, shift={self.shift}, backend={backend}"
        return s

    def forward(
        self, x: torch.Tensor, query: Optional[torch.Tensor] = None, return_stats: bool = False
    ):
        """``(B, C, H, W)`` (+ query ``(B, Q)``) -> attention ``(B, 1, H, W)`` or :class:`ARNNStats`."""
        if isinstance(x, torch.fx.Proxy):
            return fx_leaf(self, x, query, return_stats)
        check_input("AttentionRNN", x, self.in_channels, query, self.query_channels, like=self.weight_hh)
        b, _, h, w = x.shape
        t = self.hidden_channels
        xc = self.context(x)
        if xc.dim() != 4 or xc.shape[0] != b or xc.shape[1] != self.context_channels or xc.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"AttentionRNN: context_net must map (B, C, H, W) to (B, {self.context_channels}, H, W), "
                f"got {tuple(xc.shape)} for input {tuple(x.shape)}"
            )
        if self.query_proj is not None:
            q = self.query_proj(query.to(xc.dtype))
            xc = torch.cat([xc, q[:, :, None, None].expand(b, t, h, w).to(xc.dtype)], dim=1)

        # The right-to-left direction scans the mirrored image. Mirroring the
        # (narrow) context instead of the (8t-wide) gates saves a large copy.
        # The grouped 1x1 conv runs as one batched matmul (its backward is
        # about twice as fast as the conv's on CPU), or inside the C kernel,
        # and leaves each cell's gate vector contiguous, the layout the scan
        # backends read best.
        cin = xc.shape[1]
        weight = self.input_proj.weight.view(2, 4 * t, cin)
        bias = self.input_proj.bias.view(2, 4 * t)
        hid = projected_lstm(xc.permute(0, 2, 3, 1), weight, bias, self.weight_hh, self.backend)  # (B, 2, t, H, W)

        # Heads, mirror, shift and combination all act per location. The
        # heads read the hidden states where the scan left them (features
        # last: no layout copy, and their gradient goes back to the scan in
        # that layout); their 4 outputs then become planes (4, B, H, W), so
        # the mirror, the shift and the combiner move 2-4 values per
        # location, not t features (whose select / flip / pad backwards each
        # filled and copied a full-size gradient), and every pointwise op
        # runs on dense planes. The bias comes after the shift: the zero
        # hidden state the shift brings into row 0 has heads equal to it.
        rows = hid.permute(0, 3, 4, 1, 2).reshape(b, h, w, 2 * t)
        heads = F.linear(rows, torch.block_diag(*self.heads.weight.view(2, 2, t))).permute(3, 0, 1, 2).contiguous()
        right = heads[2:4].flip(-1)  # (2, B, H, W) in image coordinates
        if self.shift:
            # Row i of the right direction may only see rows above i.
            right = F.pad(right, (0, 0, 1, 0))[:, :, :h]
        bias = self.heads.bias.to(heads.dtype)[:, None, None, None]
        left, right = heads[0:2] + bias[0:2], right + bias[2:4]
        mu_l, sigma_l = left[0], _positive(left[1], self.min_sigma)
        mu_r, sigma_r = right[0], _positive(right[1], self.min_sigma)
        if self.combiner is None:
            mu, sigma = product_of_gaussians(mu_l, sigma_l, mu_r, sigma_r)
        else:
            planes = torch.stack([mu_l, sigma_l, mu_r, sigma_r]).view(4, b * h * w)
            out = _per_location(planes, self.combiner).view(2, b, h, w)
            mu, sigma = out[0], _positive(out[1], self.min_sigma)
        mu, sigma, mu_l, sigma_l, mu_r, sigma_r = (m.unsqueeze(1) for m in (mu, sigma, mu_l, sigma_l, mu_r, sigma_r))

        a = mu + sigma * torch.randn_like(mu) if (self.sample and self.training) else mu
        if return_stats:
            return ARNNStats(a, mu, sigma, mu_l, sigma_l, mu_r, sigma_r)
        return a


class BlockAttentionRNN(nn.Module):
    """Block AttentionRNN (paper 3.3): attention on a ``gamma``-times smaller map.

    A ``gamma x gamma`` conv with stride ``gamma`` shrinks the input, an
    :class:`AttentionRNN` runs on the small map and a transposed conv brings
    the mask back. Any ``H, W``: the input is zero-padded to a multiple of
    ``gamma`` and the mask cropped back.

    Args:
        in_channels: channels ``C`` of the input.
        block_size: ``gamma >= 1``.
        **arnn_kwargs: passed to :class:`AttentionRNN`.

    Shape:
        ``(B, C, H, W)`` (+ query ``(B, Q)``) -> ``(B, 1, H, W)``, or
        :class:`ARNNStats` whose fields are all ``(B, 1, H, W)`` (the
        per-direction fields and ``sigma`` are repeated over each block).
    """

    def __init__(self, in_channels: int, block_size: int = 2, **arnn_kwargs) -> None:
        super().__init__()
        check_int("BlockAttentionRNN", "in_channels", in_channels)
        check_int("BlockAttentionRNN", "block_size", block_size)
        self.in_channels = in_channels
        self.block_size = block_size
        self.arnn = AttentionRNN(in_channels, **arnn_kwargs)
        self.down = nn.Conv2d(in_channels, in_channels, block_size, stride=block_size)
        self.up = nn.ConvTranspose2d(1, 1, block_size, stride=block_size)

    @property
    def query_channels(self) -> int:
        return self.arnn.query_channels

    def extra_repr(self) -> str:
        return f"{self.in_channels}, block_size={self.block_size}"

    def forward(
        self, x: torch.Tensor, query: Optional[torch.Tensor] = None, return_stats: bool = False
    ):
        """``(B, C, H, W)`` (+ query) -> ``(B, 1, H, W)`` or :class:`ARNNStats`."""
        if isinstance(x, torch.fx.Proxy):
            return fx_leaf(self, x, query, return_stats)
        check_input("BlockAttentionRNN", x, self.in_channels, query, self.arnn.query_channels, like=self.down.weight)
        g = self.block_size
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % g, 0, (-h) % g))
        stats = self.arnn(self.down(x), query, return_stats=True)
        a = self.up(stats.a)[..., :h, :w]
        if not return_stats:
            return a
        return ARNNStats(
            a, self.up(stats.mu)[..., :h, :w],
            *(_repeat_blocks(m, g, h, w) for m in stats[2:]),
        )


def _repeat_blocks(m: torch.Tensor, g: int, h: int, w: int) -> torch.Tensor:
    """``(B, 1, h', w')`` -> ``(B, 1, h, w)``: each value repeated over its block."""
    return m.repeat_interleave(g, -2).repeat_interleave(g, -1)[..., :h, :w]
