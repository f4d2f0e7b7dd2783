"""PAN-style attribute network for the multi-digit query task (paper 4.1).

A base CNN of ``num_stacks`` (4) stacks of 3x3 conv (32 channels) + ReLU
(+ optional BatchNorm) + 2x2 max-pool. A query (the digit class, or the
colour for the inverse task) conditions spatial attention. Attention kinds:

==============  ==========================================================
``none``        no attention; the head still sees the query
``san``         one soft attention on the last stack: softmax over space,
                the attended (weighted-sum) feature goes to the head
``noctx``       local attention after every pooling layer from the
                location alone (1x1, PAN's "-CTX")
``ctx``         local attention from a 3x3 context (PAN's "CTX")
``arnn``        :class:`~arnn_plugins.AttentionRNN`, learned combination
``arnn_ind``    AttentionRNN, closed-form (independent) combination
``arnn_sample`` AttentionRNN, sampled attention (ARNN~)
``brnn``        :class:`~arnn_plugins.BlockAttentionRNN` (block 2) where the
                map is at least 4x4, plain AttentionRNN below
==============  ==========================================================

Every attention module maps ``(features (B, C, h, w), query (B, Q))`` to
values ``(B, 1, h, w)``; the mask is their sigmoid (softmax over space for
``san``), multiplied onto the features. The head reads the last feature
map (flattened, or pooled with the last mask's weights: ``readout``; SAN's
attended vector for ``san``), appends the one-hot query and predicts
``num_classes`` logits.

``swap_attention(model)`` on a ``ctx`` / ``noctx`` model replaces its
:class:`LocalAttention` modules by ARNN ones (adapter ``"pan_local"`` in
:mod:`arnn_plugins.adapters.pan_local`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arnn import AttentionRNN, BlockAttentionRNN
from ..checks import check_bool, check_choice, check_float, check_image, check_int, check_odd_kernel, check_query

__all__ = [
    "ATTENTION_KINDS",
    "PAN",
    "LocalAttention",
    "SoftAttention",
    "mask_correctness",
    "evaluate_pan",
    "train_pan",
]

ATTENTION_KINDS = ("none", "san", "noctx", "ctx", "arnn", "arnn_ind", "arnn_sample", "brnn")


class LocalAttention(nn.Module):
    """PAN's local attention: ``a = w . relu(K_c * x + W_q q + b)`` per location.

    Args:
        in_channels: feature channels ``C``.
        query_channels: query size ``Q``.
        context_kernel: odd ``delta``; 1 looks at the location alone
            (``noctx``), 3 at a 3x3 context (``ctx``).
        hidden_channels: width of the hidden layer.

    Shape:
        ``(B, C, h, w)``, query ``(B, Q)`` -> ``(B, 1, h, w)`` attention values.
    """

    def __init__(self, in_channels: int, query_channels: int, context_kernel: int = 3, hidden_channels: int = 32):
        super().__init__()
        check_odd_kernel("LocalAttention", "context_kernel", context_kernel)
        self.in_channels = in_channels
        self.query_channels = query_channels
        self.context_kernel = context_kernel
        self.hidden_channels = hidden_channels
        self.context = nn.Conv2d(in_channels, hidden_channels, context_kernel, padding=context_kernel // 2)
        self.query_proj = nn.Linear(query_channels, hidden_channels, bias=False)
        self.out = nn.Conv2d(hidden_channels, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, query_channels={self.query_channels}, context_kernel={self.context_kernel}"

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)``, ``(B, Q)`` -> ``(B, 1, h, w)``."""
        check_features(type(self).__name__, x, self.in_channels, query, self.query_channels)
        hid = self.context(x) + self.query_proj(query.to(x.dtype))[:, :, None, None]
        return self.out(F.relu(hid))


class SoftAttention(nn.Module):
    """SAN-style soft attention values: ``a = w . tanh(W_x x + W_q q)`` per location.

    The network turns them into a softmax over space.

    Shape:
        ``(B, C, h, w)``, query ``(B, Q)`` -> ``(B, 1, h, w)``.
    """

    def __init__(self, in_channels: int, query_channels: int, hidden_channels: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.query_channels = query_channels
        self.proj = nn.Conv2d(in_channels, hidden_channels, 1)
        self.query_proj = nn.Linear(query_channels, hidden_channels, bias=False)
        self.out = nn.Conv2d(hidden_channels, 1, 1)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)``, ``(B, Q)`` -> ``(B, 1, h, w)``."""
        check_features(type(self).__name__, x, self.in_channels, query, self.query_channels)
        return self.out(torch.tanh(self.proj(x) + self.query_proj(query.to(x.dtype))[:, :, None, None]))


def check_features(layer: str, x, channels: int, query, query_channels: int) -> None:
    """Features ``(B, channels, h, w)`` and a query ``(B, query_channels)`` of a PAN attention layer."""
    check_image(layer, x, channels, spatial="h, w")
    check_query(layer, query, x.shape[0], query_channels)


class PAN(nn.Module):
    """Attribute network with query-conditioned spatial attention (paper 4.1).

    Args:
        attention: one of :data:`ATTENTION_KINDS`.
        num_classes: answer classes (5 colours; 10 digits for the inverse task).
        num_queries: query vocabulary (10 digits; 5 colours for the inverse task).
        image_size: input side ``H = W`` (the head's size depends on it).
        in_channels: image channels.
        channels: conv channels per stack.
        num_stacks: conv + pool stacks (4; 5 for the 224 px variant).
        batch_norm: add BatchNorm after each conv.
        hidden_channels: LSTM width of the ARNN kinds; the local and soft
            attention use twice this as their hidden width.
        block_size: BRNN block size ``gamma`` (``brnn`` only).
        head_hidden: width of the head's hidden layer.
        readout: how the head reads the last feature map: ``"flatten"``
            (all positions, position-specific weights) or ``"pool"`` (the
            average of the last map weighted by the last mask, as PAN's
            attended feature; the plain average for ``none``) or
            ``"softmax"`` (PAN's last layer: the last attention values
            are a softmax over space instead of a sigmoid, and the head
            reads the attended vector they weight; the plain average for
            ``none``). ``san`` always uses its attended vector.
        head_query: append the one-hot query to the head's input. Without
            it (PAN's classifier) the query reaches the answer only through
            the masks.
        mask_bias: added to every sigmoid mask's logits, so masks start near
            ``sigmoid(mask_bias)`` (0.5 by default; 2.0 starts them open at
            0.88). The softmax readout's last layer ignores it.
        query_film: also let the query scale the features each attention
            layer reads, per channel: ``x * (1 + W q)`` (FiLM), ``W`` zero
            at init, so the model starts as without it. The query then
            enters multiplicatively as well as through each layer's own
            additive (concatenated) projection. The masks still multiply
            the unscaled features.
        backend: ARNN recurrence backend.
        arnn_kwargs: more options for the ARNN layers.

    Shape:
        ``forward(image (B, in_channels, H, W), query (B,) int or (B, Q) float)``
        -> ``(logits (B, num_classes), masks)``, ``masks`` a list with one
        ``(B, 1, h, w)`` map in [0, 1] per attention layer (empty for
        ``none``).
    """

    def __init__(
        self,
        attention: str = "arnn",
        num_classes: int = 5,
        num_queries: int = 10,
        image_size: int = 100,
        in_channels: int = 3,
        channels: int = 32,
        num_stacks: int = 4,
        batch_norm: bool = False,
        hidden_channels: int = 16,
        block_size: int = 2,
        head_hidden: int = 64,
        readout: str = "flatten",
        head_query: bool = True,
        mask_bias: float = 0.0,
        query_film: bool = False,
        backend: str = "auto",
        arnn_kwargs: Optional[Dict] = None,
    ) -> None:
        super().__init__()
        check_choice("PAN", "attention", attention, ATTENTION_KINDS)
        for name, v in (("num_classes", num_classes), ("num_queries", num_queries), ("num_stacks", num_stacks),
                        ("channels", channels), ("image_size", image_size)):
            check_int("PAN", name, v)
        check_choice("PAN", "readout", readout, ("flatten", "pool", "softmax"))
        sizes = []
        s = image_size
        for _ in range(num_stacks):
            s //= 2
            sizes.append(s)
        if s < 1:
            raise ValueError(f"PAN: image_size {image_size} is too small for {num_stacks} 2x2 pooling stacks")
        self.attention_kind = attention
        self.readout = readout
        self.head_query = bool(head_query)
        self.mask_bias = check_float("PAN", "mask_bias", mask_bias)
        check_bool("PAN", "query_film", query_film)
        self.num_classes, self.num_queries = num_classes, num_queries
        self.image_size, self.in_channels = image_size, in_channels
        self.map_sizes = tuple(sizes)

        stacks = []
        c_in = in_channels
        for _ in range(num_stacks):
            layers = [nn.Conv2d(c_in, channels, 3, padding=1)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            stacks.append(nn.Sequential(*layers))
            c_in = channels
        self.stacks = nn.ModuleList(stacks)

        kw = dict(arnn_kwargs or {})
        kw.setdefault("backend", backend)
        kw.setdefault("hidden_channels", hidden_channels)
        kw.setdefault("query_channels", num_queries)
        # Keyed by stack index: attention sits after that stack's pooling.
        self.attention = nn.ModuleDict()
        if attention == "san":
            self.attention[str(num_stacks - 1)] = SoftAttention(channels, num_queries, 2 * hidden_channels)
        elif attention in ("noctx", "ctx"):
            k = 1 if attention == "noctx" else 3
            for i in range(num_stacks):
                self.attention[str(i)] = LocalAttention(channels, num_queries, k, 2 * hidden_channels)
        elif attention != "none":
            if attention == "arnn_ind":
                kw.setdefault("combine", "independent")
            if attention == "arnn_sample":
                kw.setdefault("sample", True)
            for i, h in enumerate(sizes):
                if attention == "brnn" and h >= 4:
                    self.attention[str(i)] = BlockAttentionRNN(channels, block_size=block_size, **kw)
                else:
                    self.attention[str(i)] = AttentionRNN(channels, **kw)

        # Per attention layer; a ModuleDict keyed like self.attention.
        self.query_film = nn.ModuleDict()
        if query_film:
            for key in self.attention:
                film = nn.Linear(num_queries, channels, bias=False)
                nn.init.zeros_(film.weight)
                self.query_film[key] = film

        feat = channels if attention == "san" or readout != "flatten" else channels * s * s
        self.head = nn.Sequential(
            nn.Linear(feat + (num_queries if self.head_query else 0), head_hidden), nn.ReLU(inplace=True), nn.Linear(head_hidden, num_classes)
        )

    def extra_repr(self) -> str:
        return (f"attention={self.attention_kind!r}, image_size={self.image_size}, "
                f"num_queries={self.num_queries}, num_classes={self.num_classes}")

    def encode_query(self, query: torch.Tensor, device=None) -> torch.Tensor:
        """``(B,)`` class indices -> one-hot ``(B, Q)``; ``(B, Q)`` floats pass through."""
        if not isinstance(query, torch.Tensor):
            raise TypeError(f"PAN: expected query a tensor of shape (B,) int or (B, {self.num_queries}) float")
        if query.dim() == 1 and not query.is_floating_point():
            # A value check reads the data: eager only (a captured graph cannot branch on it).
            if not torch.compiler.is_compiling() and query.numel() and (
                    query.min() < 0 or query.max() >= self.num_queries):
                raise ValueError(f"PAN: query indices must lie in [0, {self.num_queries}), got "
                                 f"[{int(query.min())}, {int(query.max())}]")
            return F.one_hot(query.long(), self.num_queries).float().to(device)
        if query.dim() == 2 and query.is_floating_point() and query.shape[1] == self.num_queries:
            return query.to(device)
        raise ValueError(f"PAN: expected query of shape (B,) int or (B, {self.num_queries}) float, "
                         f"got {tuple(query.shape)} {query.dtype}")

    def forward(self, image: torch.Tensor, query: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``(B, C, H, W)``, query -> ``(logits (B, K), [mask (B, 1, h, w), ...])``."""
        size = self.image_size
        check_image("PAN", image, self.in_channels, "image", spatial=f"{size}, {size}")
        if image.shape[2:] != (size, size):
            raise ValueError(f"PAN: expected image of shape (B, {self.in_channels}, {size}, {size}), "
                             f"got shape {tuple(image.shape)}")
        q = self.encode_query(query, image.device).to(image.dtype)
        if q.shape[0] != image.shape[0]:
            raise ValueError(f"PAN: got {image.shape[0]} images but {q.shape[0]} queries")
        x = image
        masks: List[torch.Tensor] = []
        last = len(self.stacks) - 1
        for i, stack in enumerate(self.stacks):
            x = stack(x)
            attn = self.attention[str(i)] if str(i) in self.attention else None
            if attn is None:
                continue
            if str(i) in self.query_film:
                a = attn(x * (1 + self.query_film[str(i)](q))[:, :, None, None], q)
            else:
                a = attn(x, q)
            if self.attention_kind == "san" or (i == last and self.readout == "softmax"):
                b, _, h, w = a.shape
                p = torch.softmax(a.reshape(b, -1), dim=1).reshape(b, 1, h, w)
                masks.append(p)
                x = (x * p).sum(dim=(2, 3))  # attended feature vector (B, C)
            else:
                m = torch.sigmoid(a + self.mask_bias if self.mask_bias else a)
                masks.append(m)
                if i == last and self.readout == "pool":
                    # Mask-weighted average: the features where the last mask points.
                    x = (x * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1e-6)
                else:
                    x = x * m
        if x.dim() == 4:
            x = x.flatten(1) if self.readout == "flatten" else x.mean(dim=(2, 3))
        return self.head(torch.cat([x, q], dim=1) if self.head_query else x), masks


def mask_correctness(masks: Sequence[torch.Tensor], target_mask: torch.Tensor) -> torch.Tensor:
    """Share of attention mass inside the target region, per item.

    Masks of all layers are upsampled (bilinear) to the target's size and
    multiplied pixel-wise; the product is normalised to sum to one and its
    mass inside ``target_mask`` returned. With no masks, attention is
    uniform and the value is the target's area fraction.

    Args:
        masks: ``(B, 1, h_l, w_l)`` non-negative maps, one per layer.
        target_mask: ``(B, H, W)`` (or ``(B, 1, H, W)``) bool / 0-1 region.

    Returns:
        ``(B,)`` values in [0, 1] (0 where the product is zero everywhere).
    """
    if not isinstance(target_mask, torch.Tensor):
        raise TypeError("mask_correctness: expected target_mask a tensor of shape (B, H, W)")
    if target_mask.dim() == 4 and target_mask.shape[1] == 1:
        target_mask = target_mask[:, 0]
    if target_mask.dim() != 3:
        raise ValueError(f"mask_correctness: expected target_mask of shape (B, H, W), got {tuple(target_mask.shape)}")
    b, h, w = target_mask.shape
    target = target_mask.float()
    prod = torch.ones(b, 1, h, w, device=target.device)
    for k, m in enumerate(masks):
        if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[0] != b or m.shape[1] != 1:
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"mask_correctness: expected mask {k} of shape ({b}, 1, h, w), got {got}")
        m = m.detach().float().to(target.device)
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        prod = prod * m
    prod = prod[:, 0]
    total = prod.sum(dim=(1, 2))
    inside = (prod * target).sum(dim=(1, 2))
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))


@torch.no_grad()
def evaluate_pan(model: PAN, loader, device=None, scale_bins: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)):
    """Accuracy, mean mask correctness and per-scale accuracy over ``loader``.

    ``loader`` yields dicts as :class:`~arnn_plugins.data.MultiDigitDataset`
    gives them (``image``, ``query``, ``answer``, ``mask``, optional
    ``scale``). Returns ``{"accuracy", "correctness", "layer_correctness",
    "per_scale": {bin: accuracy}, "count"}``: ``correctness`` is that of the
    mask product (the paper's metric), ``layer_correctness`` a list with
    each layer's mask alone; the model is put in eval mode.
    """
    model.eval()
    device = device or next(model.parameters()).device
    correct = total = 0
    corr_sum = 0.0
    layer_sums: List[float] = []
    edges = torch.tensor(list(scale_bins), dtype=torch.float64)
    bin_hit = torch.zeros(len(scale_bins) - 1, dtype=torch.float64)
    bin_n = torch.zeros_like(bin_hit)
    for batch in loader:
        logits, masks = model(batch["image"].to(device), batch["query"].to(device))
        hit = (logits.argmax(1).cpu() == batch["answer"]).double()
        correct += hit.sum().item()
        total += hit.numel()
        target = batch["mask"].to(device)
        corr_sum += mask_correctness(masks, target).sum().item()
        layer_sums = layer_sums or [0.0] * len(masks)
        for k, m in enumerate(masks):
            layer_sums[k] += mask_correctness([m], target).sum().item()
        if "scale" in batch:
            idx = torch.bucketize(batch["scale"].double(), edges[1:-1], right=True)
            bin_hit.index_add_(0, idx, hit)
            bin_n.index_add_(0, idx, torch.ones_like(hit))
    per_scale = {
        f"{scale_bins[i]:g}-{scale_bins[i + 1]:g}": (bin_hit[i] / bin_n[i]).item() if bin_n[i] else float("nan")
        for i in range(len(scale_bins) - 1)
    }
    n = max(total, 1)
    return {"accuracy": correct / n, "correctness": corr_sum / n, "layer_correctness": [v / n for v in layer_sums],
            "per_scale": per_scale, "count": total}


def train_pan(model: PAN, loader, epochs: int = 1, lr: float = 1e-3, device=None,
              progress: bool = False) -> List[float]:
    """Train ``model`` with Adam on cross-entropy; returns the mean loss per epoch.

    ``loader`` yields dicts as :class:`~arnn_plugins.data.MultiDigitDataset`
    gives them (``image`` ``(B, 3, H, W)``, ``query`` ``(B,)``, ``answer``
    ``(B,)``). ``progress`` shows a tqdm bar per epoch.
    """
    check_int("train_pan", "epochs", epochs)
    device = device or next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        batches = loader
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for batch in batches:
            logits, _ = model(batch["image"].to(device), batch["query"].to(device))
            loss = F.cross_entropy(logits, batch["answer"].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * logits.shape[0]
            count += logits.shape[0]
        history.append(total / max(count, 1))
    return history
