"""Host models that no model zoo provides (models only: data in :mod:`arnn_plugins.data`, glue in adapters)."""

from .mcb import CompactBilinearPooling, MCBGlimpseAttention, MCBVQA, build_mcb_vqa
from .modular_gan import LocalMask, ModularGAN, gan_step
from .pan import PAN, mask_correctness

__all__ = [
    "PAN",
    "CompactBilinearPooling",
    "LocalMask",
    "MCBGlimpseAttention",
    "MCBVQA",
    "ModularGAN",
    "build_mcb_vqa",
    "gan_step",
    "mask_correctness",
]
