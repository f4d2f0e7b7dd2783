"""ModularGAN with local or ARNN masks (paper 4.4): model, two optimisers, CelebA."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import DATASETS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS, OPTIMIZERS
from torch.utils.data import Dataset

from ..data.celeba import CelebA
from ..models.modular_gan import ModularGAN, gan_step, random_target
from ..registry import swap_attention

__all__ = ["MGANModel", "MGANOptimWrapperConstructor", "CelebADict"]


@MODELS.register_module()
class MGANModel(BaseModel):
    """mmengine model around :class:`~arnn_plugins.models.modular_gan.ModularGAN`.

    Args:
        mask: ``"local"`` (3x3 mask, the baseline) or ``"arnn"`` (masks
            swapped for AttentionRNN, ``mode='replace'``).
        lambda_cls, lambda_rec, lambda_cyc, lambda_gp: loss weights, as
            :func:`~arnn_plugins.models.modular_gan.gan_step`.
        arnn_kwargs: AttentionRNN options.
        **gan_kwargs: :class:`ModularGAN` arguments.

    ``train_step`` makes one discriminator and one generator update with the
    two optimisers of :class:`MGANOptimWrapperConstructor`. ``forward(images
    (B, 3, S, S), labels (B, n_attr))`` gives the edited images towards
    random targets.
    """

    def __init__(self, num_values: Sequence[int] = (3, 2, 2), mask: str = "arnn", lambda_cls: float = 1.0,
                 lambda_rec: float = 10.0, lambda_cyc: float = 10.0, lambda_gp: float = 10.0,
                 arnn_kwargs: Optional[dict] = None, data_preprocessor=None, init_cfg=None, **gan_kwargs) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if mask not in ("local", "arnn"):
            raise ValueError(f"MGANModel: mask must be 'local' or 'arnn', got {mask!r}")
        self.gan = ModularGAN(list(num_values), **gan_kwargs)
        if mask == "arnn":
            swap_attention(self.gan, mode="replace", **(arnn_kwargs or {}))
        self.lambdas = dict(cls=lambda_cls, rec=lambda_rec, cyc=lambda_cyc, gp=lambda_gp)

    def train_step(self, data, optim_wrapper: OptimWrapperDict) -> Dict[str, torch.Tensor]:
        """One D and one G update (WGAN-GP, attribute classification, reconstruction and cycle losses)."""
        data = self.data_preprocessor(data, True)
        lam = self.lambdas
        out = gan_step(self.gan, data["images"], data["labels"], optim_wrapper["discriminator"].update_params,
                       optim_wrapper["generator"].update_params, lambda_cls=lam["cls"], lambda_rec=lam["rec"],
                       lambda_cyc=lam["cyc"], lambda_gp=lam["gp"])
        return {k: out[k] for k in ("d_loss", "gp", "g_loss", "g_cls", "rec", "cyc")}

    def forward(self, images, labels=None, mode: str = "tensor"):
        if labels is None:
            raise ValueError("MGANModel: forward needs labels (B, n_attr) to draw edit targets of the same shape")
        target = random_target(self.gan, labels)
        fake = self.gan.generate(images, target)
        if mode == "predict":
            return [dict(l1=float((f - x).abs().mean())) for f, x in zip(fake, images)]
        return fake


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MGANOptimWrapperConstructor:
    """Two optimisers for :class:`MGANModel`: ``generator`` (E, T_i, R) and ``discriminator``.

    ``optim_wrapper=dict(constructor='MGANOptimWrapperConstructor',
    optimizer=dict(type='Adam', lr=1e-4, betas=(0.5, 0.999)))``; both use
    the same optimiser settings.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg=None) -> None:
        self.cfg = dict(optim_wrapper_cfg)

    def __call__(self, model: nn.Module) -> OptimWrapperDict:
        model = getattr(model, "module", model)
        gan = model.gan
        wrappers = {}
        for name, params in (("generator", list(gan.generator_parameters())),
                             ("discriminator", list(gan.discriminator.parameters()))):
            opt_cfg = dict(self.cfg["optimizer"], params=params)
            wrappers[name] = OptimWrapper(OPTIMIZERS.build(opt_cfg))
        return OptimWrapperDict(**wrappers)


@DATASETS.register_module()
class CelebADict(Dataset):
    """:class:`~arnn_plugins.data.celeba.CelebA` as dicts ``{'images', 'labels'}``."""

    def __init__(self, root: str, **kwargs) -> None:
        self.ds = CelebA(root, **kwargs)
        self.num_values = self.ds.num_values

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        img, lab = self.ds[i]
        return {"images": img, "labels": lab}
