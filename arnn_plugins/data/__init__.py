"""Data sets: MNIST digits and the MREF / MDIST / MBG multi-digit query data (paper 4.1)."""

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
]
