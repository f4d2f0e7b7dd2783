"""Multimodal Compact Bilinear pooling (MCB) for VQA (Fukui et al., EMNLP 2016).

The three VQA models of the paper's section 4.3:

- ``MCB``: question and mean-pooled image features fused by one MCB, then a
  classifier over answers (:class:`MCBVQA` with ``attention=False``);
- ``MCB+ATT``: a per-location MCB of the tiled question with the image
  features, two 1x1 convs giving ``G`` glimpse logits, a softmax over space
  per glimpse, the attended features of all glimpses concatenated and fused
  with the question by a second MCB (:class:`MCBVQA`, the default);
- ``MCB+ARNN``: ``MCB+ATT`` whose glimpse attention
  (:class:`MCBGlimpseAttention`) is swapped for query-conditioned ARNNs with
  ``arnn_plugins.swap_attention(model)`` (see
  ``arnn_plugins.adapters.vqa_mcb``), or :func:`build_mcb_vqa` with
  ``kind="mcb_arnn"``.

The official VQA accuracy and answer normalisation live with the VQA data
(:func:`arnn_plugins.data.vqa.vqa_accuracy`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check_choice, check_image, check_int, check_query

__all__ = [
    "CompactBilinearPooling",
    "count_sketch",
    "signed_sqrt_l2",
    "LSTMQuestionEncoder",
    "TransformersQuestionEncoder",
    "MCBGlimpseAttention",
    "MCBVQA",
    "build_mcb_vqa",
    "MCB_KINDS",
    "check_glimpse_input",
    "local_glimpse_logits",
    "spatial_softmax",
]

MCB_KINDS = ("mcb", "mcb_att", "mcb_arnn")


# --------------------------------------------------------------------------
# Compact bilinear pooling


def count_sketch(x: torch.Tensor, h: torch.Tensor, s: torch.Tensor, dim: int) -> torch.Tensor:
    """Count sketch ``Psi(x)[..., k] = sum_{i: h[i] = k} s[i] x[..., i]`` of the last axis.

    Args:
        x: ``(..., C)``.
        h: ``(C,)`` long hash indices in ``[0, dim)``.
        s: ``(C,)`` signs ``+-1``.
        dim: sketch size ``d``.

    Returns:
        ``(..., d)``.
    """
    out = x.new_zeros(*x.shape[:-1], dim)
    return out.index_add(-1, h, x * s.to(x.dtype))


def signed_sqrt_l2(y: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """``sign(y) sqrt(|y|)`` then L2 normalisation along ``dim`` (as after every MCB in Fukui et al.).

    The square root is shifted by a tiny ``eps`` so its gradient stays finite
    at 0, and shifted back so the map stays continuous there (empty sketch
    bins hold rounding noise of either sign).
    """
    y = torch.sign(y) * (torch.sqrt(y.abs() + eps) - eps ** 0.5)
    return F.normalize(y, dim=dim)


class CompactBilinearPooling(nn.Module):
    """Compact bilinear pooling: ``FFT^-1(FFT(Psi_1(x)) * FFT(Psi_2(q)))``.

    The result is the count sketch of the outer product ``x q^T`` with hash
    ``(h_1(i) + h_2(j)) mod d`` and sign ``s_1(i) s_2(j)``, so inner products
    of outputs estimate ``<x, x'> <q, q'>`` without building the outer
    product. Hashes and signs are drawn once from ``seed`` and stored as
    buffers (saved with the model, identical on every device).

    Args:
        in1: channels ``C1`` of the first input.
        in2: channels ``C2`` of the second input.
        out_dim: sketch size ``d`` (16000 in the MCB paper).
        seed: seed of the hash and sign draw.

    Shape:
        ``x`` ``(B, C1)`` and ``q`` ``(B, C2)`` -> ``(B, d)``; or per location
        ``x`` ``(B, C1, H, W)`` with ``q`` ``(B, C2, H, W)`` or ``(B, C2)``
        (broadcast over space) -> ``(B, d, H, W)``.
    """

    def __init__(self, in1: int, in2: int, out_dim: int, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("in1", in1), ("in2", in2), ("out_dim", out_dim)):
            check_int("CompactBilinearPooling", name, value)
        self.in1, self.in2, self.out_dim = in1, in2, out_dim
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("h1", torch.randint(out_dim, (in1,), generator=gen))
        self.register_buffer("h2", torch.randint(out_dim, (in2,), generator=gen))
        self.register_buffer("s1", torch.randint(2, (in1,), generator=gen).float() * 2 - 1)
        self.register_buffer("s2", torch.randint(2, (in2,), generator=gen).float() * 2 - 1)

    def extra_repr(self) -> str:
        return f"{self.in1}, {self.in2}, out_dim={self.out_dim}"

    def _check(self, x, q):
        name = "CompactBilinearPooling"
        for t, label in ((x, "first input"), (q, "second input")):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected the {label} to be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating point {label}, got dtype {t.dtype}")
        if x.dim() not in (2, 4) or x.shape[1] != self.in1:
            raise ValueError(
                f"{name}: expected the first input of shape (B, {self.in1}) or (B, {self.in1}, H, W), "
                f"got {tuple(x.shape)}"
            )
        ok = q.dim() in (2, x.dim()) and q.shape[0] == x.shape[0] and q.shape[1] == self.in2
        if ok and q.dim() == 4 and q.shape[2:] != x.shape[2:]:
            ok = False
        if not ok:
            want = f"({x.shape[0]}, {self.in2})" + (
                f" or ({x.shape[0]}, {self.in2}, {x.shape[2]}, {x.shape[3]})" if x.dim() == 4 else ""
            )
            raise ValueError(f"{name}: expected the second input of shape {want}, got {tuple(q.shape)}")

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``(B, C1[, H, W])``, ``(B, C2[, H, W])`` -> ``(B, d[, H, W])``."""
        self._check(x, q)
        spatial = x.dim() == 4
        # FFTs of arbitrary length need float32 at least.
        dtype = torch.promote_types(x.dtype, torch.float32)
        if spatial:
            x = x.permute(0, 2, 3, 1)
            q = q.permute(0, 2, 3, 1) if q.dim() == 4 else q[:, None, None, :]
        px = count_sketch(x.to(dtype), self.h1, self.s1, self.out_dim)
        pq = count_sketch(q.to(dtype), self.h2, self.s2, self.out_dim)
        d = self.out_dim
        with torch.autocast(device_type=px.device.type, enabled=False):
            y = torch.fft.irfft(torch.fft.rfft(px, n=d) * torch.fft.rfft(pq, n=d), n=d)
        if spatial:
            y = y.permute(0, 3, 1, 2)
        return y


# --------------------------------------------------------------------------
# Question encoders


class LSTMQuestionEncoder(nn.Module):
    """Token embedding + tanh, stacked LSTM; the last state of every layer, concatenated.

    As in Fukui et al. (300-d embedding, two 1024-d layers, 2048-d output).

    Args:
        vocab_size: number of tokens (index ``pad_id`` is padding).
        embed_dim: word embedding size.
        hidden_size: LSTM size per layer.
        num_layers: stacked layers.
        pad_id: padding token id.
        dropout: dropout between layers.

    Shape:
        tokens ``(B, L)`` long (+ optional mask ``(B, L)``) -> ``(B, num_layers * hidden_size)``.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 300,
        hidden_size: int = 1024,
        num_layers: int = 2,
        pad_id: int = 0,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        check_int("LSTMQuestionEncoder", "vocab_size", vocab_size, minimum=2)
        self.pad_id = pad_id
        self.out_dim = num_layers * hidden_size
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(
            embed_dim, hidden_size, num_layers=num_layers, batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, L)`` token ids -> ``(B, out_dim)``."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
            raise ValueError(
                f"LSTMQuestionEncoder: expected integer tokens of shape (B, L), got "
                f"{getattr(tokens, 'shape', type(tokens).__name__)}"
            )
        if mask is None:
            mask = tokens != self.pad_id
        lengths = mask.long().sum(1).clamp(min=1).cpu()
        emb = torch.tanh(self.embed(tokens))
        packed = nn.utils.rnn.pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: (layers, B, hidden)
        return h.transpose(0, 1).reshape(tokens.shape[0], -1)


class TransformersQuestionEncoder(nn.Module):
    """Wraps any ``transformers`` text model: its pooled output, or the first token's state.

    Args:
        model: a ``transformers`` ``PreTrainedModel`` (e.g. ``AutoModel.from_pretrained("bert-base-uncased")``).
        out_dim: output size; defaults to ``model.config.hidden_size``.

    Shape:
        tokens ``(B, L)`` (+ attention mask ``(B, L)``, 1 = real token) -> ``(B, out_dim)``.
    """

    def __init__(self, model: nn.Module, out_dim: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"TransformersQuestionEncoder: expected a transformers model, got {type(model).__name__}")
        cfg = getattr(model, "config", None)
        out_dim = out_dim or getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
        if out_dim is None:
            raise ValueError("TransformersQuestionEncoder: pass out_dim (the model's config has no hidden_size)")
        self.model = model
        self.out_dim = int(out_dim)

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, L)`` token ids -> ``(B, out_dim)``."""
        out = self.model(input_ids=tokens, attention_mask=None if mask is None else mask.long())
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        return pooled


# --------------------------------------------------------------------------
# Models


def local_glimpse_logits(mcb, conv1, conv2, dropout: float, training: bool, x, q):
    """The MCB+ATT attention logits ``(B, G, H, W)`` of image features ``x`` ``(B, C, H, W)`` and question ``q`` ``(B, Q)``.

    The glimpse attention's own computation, also used as the prior of the
    ARNN residual swap (:mod:`arnn_plugins.adapters.vqa_mcb`).
    """
    z = signed_sqrt_l2(mcb(x, q), dim=1)
    z = F.dropout(z, dropout, training)
    return conv2(F.relu(conv1(z)))


def spatial_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over ``H x W`` per map: ``(B, G, H, W)`` -> ``(B, G, H, W)`` summing to 1 per map."""
    b, g, h, w = logits.shape
    return torch.softmax(logits.reshape(b, g, h * w).float(), dim=-1).reshape(b, g, h, w).to(logits.dtype)


class MCBGlimpseAttention(nn.Module):
    """MCB+ATT's local attention (delta = 1): per-location MCB, 1x1 conv, ReLU, 1x1 conv to ``G`` glimpses.

    Args:
        img_channels: image feature channels ``C``.
        query_channels: question embedding size ``Q``.
        mcb_dim: sketch size of the per-location MCB.
        hidden: channels of the first 1x1 conv (512 in Fukui et al.).
        glimpses: number of attention maps ``G``.
        dropout: dropout on the normalised MCB output.
        seed: seed of the MCB hashes.

    Shape:
        ``x`` ``(B, C, H, W)``, ``q`` ``(B, Q)`` -> weights ``(B, G, H, W)``
        (softmax over space per glimpse); :meth:`logits` gives the values
        before the softmax.
    """

    def __init__(
        self,
        img_channels: int,
        query_channels: int,
        mcb_dim: int = 16000,
        hidden: int = 512,
        glimpses: int = 2,
        dropout: float = 0.1,
        seed: int = 1,
    ) -> None:
        super().__init__()
        check_int("MCBGlimpseAttention", "glimpses", glimpses)
        self.img_channels = img_channels
        self.query_channels = query_channels
        self.glimpses = glimpses
        self.dropout = dropout
        self.mcb = CompactBilinearPooling(img_channels, query_channels, mcb_dim, seed=seed)
        self.conv1 = nn.Conv2d(mcb_dim, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, glimpses, 1)

    def extra_repr(self) -> str:
        return f"img_channels={self.img_channels}, query_channels={self.query_channels}, glimpses={self.glimpses}"

    def logits(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)``, ``(B, Q)`` -> glimpse logits ``(B, G, H, W)``."""
        check_glimpse_input("MCBGlimpseAttention", x, q, self.img_channels, self.query_channels)
        return local_glimpse_logits(self.mcb, self.conv1, self.conv2, self.dropout, self.training, x, q)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)``, ``(B, Q)`` -> attention weights ``(B, G, H, W)``."""
        return spatial_softmax(self.logits(x, q))


def check_glimpse_input(name: str, x, q, img_channels: int, query_channels: int) -> None:
    """Image features ``(B, img_channels, H, W)`` and a question embedding ``(B, query_channels)``."""
    check_image(name, x, img_channels, "image features")
    check_query(name, q, x.shape[0], query_channels, "question embedding")


class MCBVQA(nn.Module):
    """MCB (``attention=False``) or MCB+ATT (``attention=True``) VQA model.

    Args:
        num_answers: size of the answer vocabulary (classifier outputs).
        img_channels: channels ``C`` of the precomputed image features
            (2048 for ResNet-152 ``res5c``, 14 x 14).
        vocab_size: question vocabulary size for the default LSTM encoder.
        question_encoder: replaces the LSTM encoder: a ``transformers`` text
            model (wrapped in :class:`TransformersQuestionEncoder`), or any
            module ``(tokens (B, L), mask (B, L)) -> (B, Q)`` with an
            ``out_dim`` attribute.
        attention: MCB+ATT when true, plain MCB (mean-pooled image) otherwise.
        mcb_dim: sketch size of both MCBs (16000 in Fukui et al.).
        att_hidden: channels of the attention's first 1x1 conv.
        glimpses: attention maps ``G``.
        dropout: dropout after each normalised MCB.
        normalize_image: L2-normalise the image features per location first.
        embed_dim, hidden_size, num_layers: LSTM encoder sizes.
        pad_id: padding token id (the default mask is ``tokens != pad_id``).

    Shape:
        ``image`` ``(B, C, H, W)``, ``tokens`` ``(B, L)`` long -> answer logits
        ``(B, num_answers)``; with ``return_attention=True`` also the weights
        ``(B, G, H, W)`` (``None`` without attention).
    """

    def __init__(
        self,
        num_answers: int,
        img_channels: int = 2048,
        vocab_size: Optional[int] = None,
        question_encoder: Optional[nn.Module] = None,
        attention: bool = True,
        mcb_dim: int = 16000,
        att_hidden: int = 512,
        glimpses: int = 2,
        dropout: float = 0.1,
        normalize_image: bool = True,
        embed_dim: int = 300,
        hidden_size: int = 1024,
        num_layers: int = 2,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        check_int("MCBVQA", "num_answers", num_answers)
        if question_encoder is None:
            if vocab_size is None:
                raise ValueError("MCBVQA: pass vocab_size (for the LSTM question encoder) or a question_encoder")
            question_encoder = LSTMQuestionEncoder(vocab_size, embed_dim, hidden_size, num_layers, pad_id)
        elif not hasattr(question_encoder, "out_dim") and hasattr(question_encoder, "config"):
            question_encoder = TransformersQuestionEncoder(question_encoder)
        q_dim = getattr(question_encoder, "out_dim", None)
        if not isinstance(q_dim, int):
            raise TypeError("MCBVQA: question_encoder must have an int out_dim (its output size)")
        self.num_answers = num_answers
        self.img_channels = img_channels
        self.query_channels = q_dim
        self.glimpses = glimpses if attention else 0
        self.dropout = dropout
        self.normalize_image = normalize_image
        self.pad_id = pad_id
        self.question_encoder = question_encoder
        if attention:
            self.attention = MCBGlimpseAttention(img_channels, q_dim, mcb_dim, att_hidden, glimpses, dropout)
            fused_in = glimpses * img_channels
        else:
            self.attention = None
            fused_in = img_channels
        self.mcb = CompactBilinearPooling(fused_in, q_dim, mcb_dim, seed=2)
        self.classifier = nn.Linear(mcb_dim, num_answers)

    def encode_question(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, L)`` -> question embedding ``(B, Q)``."""
        if mask is None and isinstance(tokens, torch.Tensor):
            mask = tokens != self.pad_id
        return self.question_encoder(tokens, mask)

    def forward(
        self,
        image: torch.Tensor,
        tokens: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        return_attention: bool = False,
    ):
        """``(B, C, H, W)``, ``(B, L)`` -> logits ``(B, num_answers)`` (+ attention ``(B, G, H, W)``)."""
        check_image("MCBVQA", image, self.img_channels, "image features")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != image.shape[0]:
            raise ValueError(
                f"MCBVQA: expected question tokens of shape ({image.shape[0]}, L), "
                f"got {getattr(tokens, 'shape', type(tokens).__name__)}"
            )
        q = self.encode_question(tokens, mask)
        if self.normalize_image:
            image = F.normalize(image, dim=1)
        att = None
        if self.attention is not None:
            att = self.attention(image, q)  # (B, G, H, W)
            # Attended feature per glimpse: sum over space of weight * feature.
            v = torch.einsum("bghw,bchw->bgc", att.to(image.dtype), image).reshape(image.shape[0], -1)
        else:
            v = image.mean(dim=(2, 3))
        z = signed_sqrt_l2(self.mcb(v, q), dim=1)
        z = F.dropout(z, self.dropout, self.training)
        logits = self.classifier(z)
        return (logits, att) if return_attention else logits


def build_mcb_vqa(kind: str = "mcb_att", **kwargs) -> MCBVQA:
    """One of the paper's VQA models: ``"mcb"``, ``"mcb_att"`` or ``"mcb_arnn"``.

    ``"mcb_arnn"`` is MCB+ATT with its glimpse attention replaced by
    query-conditioned ARNNs (``mode="replace"``, delta = 1 context as in the
    paper); ARNN options go in ``arnn_kwargs=dict(...)``. Other keyword
    arguments go to :class:`MCBVQA`.
    """
    check_choice("build_mcb_vqa", "kind", kind, MCB_KINDS)
    arnn_kwargs = dict(kwargs.pop("arnn_kwargs", None) or {})
    model = MCBVQA(attention=kind != "mcb", **kwargs)
    if kind == "mcb_arnn":
        from ..registry import swap_attention

        swap_attention(model, mode="replace", adapters=["vqa_mcb_glimpse"], **arnn_kwargs)
    return model
