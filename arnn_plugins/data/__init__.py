"""Data sets: MNIST digits and the MREF / MDIST / MBG multi-digit query data (paper 4.1).

The readers of published data sets are submodules: :mod:`arnn_plugins.data.vqa`
(VQA v2 questions, answers, features and the official accuracy) and
:mod:`arnn_plugins.data.celeba` (CelebA).
"""

from .digits import SPLITS, DigitSet, digits_source, load_digits
from .multidigit import (
    COLOUR_RGB,
    COLOURS,
    PAPER_LENGTHS,
    TASKS,
    VARIANTS,
    MultiDigitDataset,
    MultiDigitSample,
    load_backgrounds,
    make_multidigit,
    query_blind_accuracy,
    uniform_mask_correctness,
)

__all__ = [
    "COLOURS",
    "COLOUR_RGB",
    "PAPER_LENGTHS",
    "SPLITS",
    "TASKS",
    "VARIANTS",
    "DigitSet",
    "MultiDigitDataset",
    "MultiDigitSample",
    "digits_source",
    "load_backgrounds",
    "load_digits",
    "make_multidigit",
    "query_blind_accuracy",
    "uniform_mask_correctness",
]
