"""ModularGAN (Zhao et al., ECCV 2018) for multi-attribute face editing.

The generator is split into modules that can be composed:

- encoder ``E``: image -> features ``f`` (conv, two stride-2 downsamplings);
- one transformer module ``T_i`` per attribute: the target value, one-hot and
  tiled over space, is concatenated to ``f``; a conv and residual blocks give
  ``t``; a spatial mask ``g = mask(t)`` in ``[0, 1]`` decides where the edit
  applies: ``f' = g * t + (1 - g) * f``. The baseline mask is
  :class:`LocalMask` (3x3 conv + sigmoid); ``arnn_plugins.swap_attention``
  swaps it for ARNN (``arnn_plugins.adapters.modular_gan``), the paper's
  MGAN+ARNN (section 4.4);
- reconstructor ``R``: features -> image (two stride-2 upsamplings, tanh);
- discriminator ``D``: a patch real/fake head and an attribute classifier head.

:func:`gan_step` makes one discriminator and one generator update with
WGAN-GP, attribute classification, reconstruction ``|R(E(x)) - x|`` and the
feature cycle loss ``|E(R(f')) - f'|`` of ModularGAN, through any optimiser
(plain torch, or mmengine's wrappers in :mod:`arnn_plugins.engine.mgan`).
CelebA is read by :class:`arnn_plugins.data.celeba.CelebA`.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check_image, check_int, check_odd_kernel

__all__ = [
    "LocalMask",
    "ResidualBlock",
    "MGANEncoder",
    "TransformerModule",
    "MGANReconstructor",
    "MGANDiscriminator",
    "ModularGAN",
    "gan_step",
    "gradient_penalty",
    "optimizer_update",
    "random_target",
]


def _norm(c: int) -> nn.Module:
    return nn.InstanceNorm2d(c, affine=True, track_running_stats=False)


class ResidualBlock(nn.Module):
    """``x + IN(conv(ReLU(IN(conv(x)))))``; ``(B, C, H, W)`` -> ``(B, C, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), _norm(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        return x + self.body(x)


class LocalMask(nn.Module):
    """ModularGAN's spatial mask: ``g = sigmoid(conv_{k x k}(t))`` (k = 3).

    Args:
        in_channels: channels ``C`` of the transformed features.
        kernel_size: odd local context size.

    Shape:
        ``(B, C, H, W)`` -> mask ``(B, 1, H, W)`` in ``[0, 1]``; :meth:`logits`
        gives the values before the sigmoid.
    """

    def __init__(self, in_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        check_odd_kernel("LocalMask", "kernel_size", kernel_size)
        self.in_channels = in_channels
        self.conv = nn.Conv2d(in_channels, 1, kernel_size, padding=kernel_size // 2)

    def logits(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, 1, H, W)`` mask logits."""
        check_image("LocalMask", t, self.in_channels, "features")
        return self.conv(t)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> mask ``(B, 1, H, W)`` in ``[0, 1]``."""
        return torch.sigmoid(self.logits(t))


class MGANEncoder(nn.Module):
    """``E``: 7x7 conv, ``n_down`` stride-2 4x4 convs (channels doubling), residual blocks.

    Shape:
        ``(B, 3, H, W)`` -> ``(B, base * 2**n_down, H / 2**n_down, W / 2**n_down)``.
    """

    def __init__(self, in_channels: int = 3, base: int = 64, n_down: int = 2, n_res: int = 3) -> None:
        super().__init__()
        self.in_channels = in_channels
        layers: List[nn.Module] = [nn.Conv2d(in_channels, base, 7, padding=3, bias=False), _norm(base), nn.ReLU(True)]
        c = base
        for _ in range(n_down):
            layers += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1, bias=False), _norm(2 * c), nn.ReLU(True)]
            c *= 2
        layers += [ResidualBlock(c) for _ in range(n_res)]
        self.net = nn.Sequential(*layers)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> features ``(B, C_f, h, w)``."""
        check_image("MGANEncoder", x, self.in_channels)
        return self.net(x)


class TransformerModule(nn.Module):
    """``T_i``: edit features towards one value of one attribute, where its mask says.

    Args:
        channels: feature channels ``C_f``.
        num_values: values of the attribute (2 for a binary one).
        n_res: residual blocks.
        mask: the mask module (default :class:`LocalMask`).

    Shape:
        ``f`` ``(B, C_f, h, w)``, ``value`` ``(B,)`` long in ``[0, num_values)``
        -> ``(f', g)``: ``f' = g * t + (1 - g) * f`` ``(B, C_f, h, w)`` and the
        mask ``g`` ``(B, 1, h, w)``.
    """

    def __init__(self, channels: int, num_values: int, n_res: int = 3, mask: Optional[nn.Module] = None) -> None:
        super().__init__()
        check_int("TransformerModule", "num_values", num_values, minimum=2)
        self.channels = channels
        self.num_values = num_values
        self.inp = nn.Sequential(
            nn.Conv2d(channels + num_values, channels, 3, padding=1, bias=False), _norm(channels), nn.ReLU(True)
        )
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(n_res)])
        self.mask = mask if mask is not None else LocalMask(channels)

    def forward(self, f: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, C_f, h, w)``, ``(B,)`` -> ``(f', g)``."""
        check_image("TransformerModule", f, self.channels, "features")
        if not isinstance(value, torch.Tensor) or value.shape != (f.shape[0],) or value.is_floating_point():
            raise ValueError(
                f"TransformerModule: expected integer target values of shape ({f.shape[0]},), "
                f"got {getattr(value, 'shape', type(value).__name__)}"
            )
        if value.numel() and (int(value.min()) < 0 or int(value.max()) >= self.num_values):
            raise ValueError(f"TransformerModule: target values must lie in [0, {self.num_values})")
        c = F.one_hot(value.long(), self.num_values).to(f.dtype)[:, :, None, None].expand(-1, -1, *f.shape[2:])
        t = self.blocks(self.inp(torch.cat([f, c], dim=1)))
        g = self.mask(t)
        return g * t + (1 - g) * f, g


class MGANReconstructor(nn.Module):
    """``R``: ``n_up`` stride-2 transposed convs (channels halving), 7x7 conv, tanh.

    Shape:
        ``(B, C_f, h, w)`` -> ``(B, 3, h * 2**n_up, w * 2**n_up)`` in ``[-1, 1]``.
    """

    def __init__(self, in_channels: int, out_channels: int = 3, n_up: int = 2) -> None:
        super().__init__()
        self.in_channels = in_channels
        layers: List[nn.Module] = []
        c = in_channels
        for _ in range(n_up):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1, bias=False), _norm(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.Conv2d(c, out_channels, 7, padding=3), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """``(B, C_f, h, w)`` -> images ``(B, 3, H, W)``."""
        check_image("MGANReconstructor", f, self.in_channels, "features")
        return self.net(f)


class MGANDiscriminator(nn.Module):
    """``D``: stride-2 4x4 convs with leaky ReLU, a patch real/fake head and an attribute classifier.

    Args:
        image_size: input side ``S`` (a power of two >= 8).
        num_values: values per attribute; the classifier outputs their sum.
        base: channels of the first conv (doubling per layer).
        n_layers: stride-2 convs; default ``min(6, log2(S) - 1)``.

    Shape:
        ``(B, 3, S, S)`` -> ``(src (B, 1, s, s), [logits (B, n_i) per attribute])``.
    """

    def __init__(
        self, image_size: int, num_values: Sequence[int], base: int = 64, n_layers: Optional[int] = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"MGANDiscriminator: image_size must be a power of two >= 8, got {image_size!r}")
        if n_layers is None:
            n_layers = min(6, int(math.log2(image_size)) - 1)
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_values = list(num_values)
        layers: List[nn.Module] = []
        c_in, c = in_channels, base
        for _ in range(n_layers):
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.LeakyReLU(0.01)]
            c_in, c = c, c * 2
        self.net = nn.Sequential(*layers)
        final = image_size // 2 ** n_layers
        self.src = nn.Conv2d(c_in, 1, 3, padding=1, bias=False)
        self.cls = nn.Conv2d(c_in, sum(self.num_values), final, bias=False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``(B, 3, S, S)`` -> ``(src, [class logits per attribute])``."""
        check_image("MGANDiscriminator", x, self.in_channels)
        if x.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"MGANDiscriminator: expected images of shape (B, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}), got {tuple(x.shape)}"
            )
        h = self.net(x)
        cls = self.cls(h).flatten(1)
        return self.src(h), list(cls.split(self.num_values, dim=1))


class ModularGAN(nn.Module):
    """ModularGAN: encoder, one transformer module per attribute, reconstructor, discriminator.

    Args:
        num_values: values per attribute, e.g. ``[3, 2, 2]`` for hair colour,
            gender, smile (:attr:`CelebA.num_values` gives it).
        image_size: image side ``S`` (power of two).
        base: channels of the first encoder conv (64 in the paper; features
            have ``4 * base`` channels).
        n_res_encoder, n_res_transformer: residual blocks in ``E`` and each ``T_i``.
        d_base: channels of the first discriminator conv.
        attribute_names: optional names, for display.

    Shape:
        ``forward(x (B, 3, S, S), target (B, n_attr) long)`` -> edited images
        ``(B, 3, S, S)``; see :meth:`generate` for masks and module subsets.
    """

    def __init__(
        self,
        num_values: Sequence[int],
        image_size: int = 128,
        base: int = 64,
        n_res_encoder: int = 3,
        n_res_transformer: int = 3,
        d_base: int = 64,
        attribute_names: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        num_values = [int(n) for n in num_values]
        if not num_values:
            raise ValueError("ModularGAN: num_values must list at least one attribute")
        if image_size % 4:
            raise ValueError(f"ModularGAN: image_size must be a multiple of 4, got {image_size}")
        self.num_values = num_values
        self.image_size = image_size
        self.attribute_names = list(attribute_names) if attribute_names else [f"attr{i}" for i in range(len(num_values))]
        self.encoder = MGANEncoder(3, base, 2, n_res_encoder)
        c = self.encoder.out_channels
        self.transformers = nn.ModuleList(TransformerModule(c, n, n_res_transformer) for n in num_values)
        self.reconstructor = MGANReconstructor(c, 3, 2)
        self.discriminator = MGANDiscriminator(image_size, num_values, d_base)

    def generator_parameters(self):
        """Parameters of ``E``, every ``T_i`` and ``R`` (what the generator optimiser updates)."""
        for m in (self.encoder, self.transformers, self.reconstructor):
            yield from m.parameters()

    def _check_target(self, x: torch.Tensor, target: torch.Tensor) -> None:
        n = len(self.num_values)
        if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.shape != (x.shape[0], n):
            raise ValueError(
                f"ModularGAN: expected integer targets of shape ({x.shape[0]}, {n}), "
                f"got {getattr(target, 'shape', type(target).__name__)}"
            )

    def transform(
        self, f: torch.Tensor, target: torch.Tensor, attributes: Optional[Sequence[int]] = None
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Apply the chosen modules in order: ``(B, C_f, h, w)``, ``(B, n_attr)`` -> ``(f', [g (B, 1, h, w)])``."""
        attributes = range(len(self.num_values)) if attributes is None else attributes
        masks = []
        for i in attributes:
            f, g = self.transformers[i](f, target[:, i])
            masks.append(g)
        return f, masks

    def generate(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        attributes: Optional[Sequence[int]] = None,
        return_masks: bool = False,
    ):
        """Edit ``x`` towards ``target`` with the modules of ``attributes`` (default all).

        ``(B, 3, S, S)``, ``(B, n_attr)`` -> ``(B, 3, S, S)``, plus the masks
        ``[(B, 1, S/4, S/4)]`` of the applied modules with ``return_masks``.
        """
        self._check_target(x, target)
        f, masks = self.transform(self.encoder(x), target, attributes)
        y = self.reconstructor(f)
        return (y, masks) if return_masks else y

    def forward(self, x: torch.Tensor, target: torch.Tensor, attributes: Optional[Sequence[int]] = None):
        """``(B, 3, S, S)``, ``(B, n_attr)`` -> edited images ``(B, 3, S, S)``."""
        return self.generate(x, target, attributes)


def gradient_penalty(discriminator: MGANDiscriminator, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: ``E[(||grad D_src(x_hat)||_2 - 1)^2]`` on random interpolates of ``real`` and ``fake`` ``(B, 3, S, S)``."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    src, _ = discriminator(x_hat)
    (grad,) = torch.autograd.grad(src.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def attribute_loss(logits: List[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over attributes: ``logits[i]`` ``(B, n_i)``, ``labels`` ``(B, n_attr)``."""
    return sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits)) / len(logits)


def random_target(model: "ModularGAN", labels: torch.Tensor) -> torch.Tensor:
    """A random value per attribute and sample: ``(B, n_attr)`` long."""
    cols = [torch.randint(n, (labels.shape[0],), device=labels.device) for n in model.num_values]
    return torch.stack(cols, dim=1)


def discriminator_losses(model: "ModularGAN", images, labels, target, lambda_cls: float, lambda_gp: float):
    """WGAN-GP critic loss plus real-image attribute classification.

    Returns ``(d_loss, parts)`` with ``parts`` = ``d_adv``, ``d_cls``, ``gp``.
    """
    with torch.no_grad():
        fake = model.generate(images, target)
    src_r, cls_r = model.discriminator(images)
    src_f, _ = model.discriminator(fake)
    d_adv = src_f.mean() - src_r.mean()
    d_cls = attribute_loss(cls_r, labels)
    gp = gradient_penalty(model.discriminator, images, fake)
    return d_adv + lambda_cls * d_cls + lambda_gp * gp, dict(d_adv=d_adv, d_cls=d_cls, gp=gp)


def generator_losses(model: "ModularGAN", images, target, lambda_cls: float, lambda_rec: float, lambda_cyc: float):
    """Adversarial, target-attribute, reconstruction and feature-cycle losses of the generator.

    Returns ``(g_loss, parts)`` with ``parts`` = ``g_adv``, ``g_cls``, ``rec``,
    ``cyc``. Also fills the discriminator's gradients, which the caller must
    discard.
    """
    f = model.encoder(images)
    rec = (model.reconstructor(f) - images).abs().mean()
    f_t, _ = model.transform(f, target)
    fake = model.reconstructor(f_t)
    src_f, cls_f = model.discriminator(fake)
    g_adv = -src_f.mean()
    g_cls = attribute_loss(cls_f, target)
    cyc = (model.encoder(fake) - f_t).abs().mean()
    g_loss = g_adv + lambda_cls * g_cls + lambda_rec * rec + lambda_cyc * cyc
    return g_loss, dict(g_adv=g_adv, g_cls=g_cls, rec=rec, cyc=cyc)


def optimizer_update(optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
    """``update(loss)``: zero the gradients, back-propagate ``loss``, step ``optimizer``."""

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return update


def gan_step(
    model: "ModularGAN",
    images: torch.Tensor,
    labels: torch.Tensor,
    update_d: Callable[[torch.Tensor], None],
    update_g: Callable[[torch.Tensor], None],
    target: Optional[torch.Tensor] = None,
    lambda_cls: float = 1.0,
    lambda_rec: float = 10.0,
    lambda_cyc: float = 10.0,
    lambda_gp: float = 10.0,
) -> Dict[str, torch.Tensor]:
    """One discriminator and one generator update (WGAN-GP, ModularGAN's losses).

    Discriminator: ``-D(x) + D(G(x, c)) + l_gp GP + l_cls CE(D_cls(x), labels)``.
    Generator: ``-D(G(x, c)) + l_cls CE(D_cls(G(x, c)), c) + l_rec |R(E(x)) - x|
    + l_cyc |E(R(f')) - f'|`` with ``f'`` the transformed features.

    Args:
        model: a :class:`ModularGAN` (put in training mode).
        images: ``(B, 3, S, S)`` in ``[-1, 1]``; labels: ``(B, n_attr)`` long.
        update_d, update_g: apply a loss to the discriminator's and to the
            generator's (``model.generator_parameters()``) optimiser, e.g.
            :func:`optimizer_update` or mmengine's ``OptimWrapper.update_params``.
        target: ``(B, n_attr)`` edit targets; random values when ``None``.

    Returns:
        detached losses: ``d_loss``, ``d_adv``, ``d_cls``, ``gp``, ``g_loss``,
        ``g_adv``, ``g_cls``, ``rec``, ``cyc``.
    """
    if not isinstance(model, ModularGAN):
        raise TypeError(f"gan_step: expected a ModularGAN, got {type(model).__name__}")
    model._check_target(images, labels)
    target = random_target(model, labels) if target is None else target
    model._check_target(images, target)
    model.train()
    d_loss, d_parts = discriminator_losses(model, images, labels, target, lambda_cls, lambda_gp)
    update_d(d_loss)
    g_loss, g_parts = generator_losses(model, images, target, lambda_cls, lambda_rec, lambda_cyc)
    update_g(g_loss)
    # The generator loss also filled D's gradients; D must not see them.
    model.discriminator.zero_grad(set_to_none=True)
    out = dict(d_loss=d_loss, g_loss=g_loss, **d_parts, **g_parts)
    return {k: v.detach() for k, v in out.items()}
