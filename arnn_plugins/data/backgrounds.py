"""Background photographs for MBG: the ones scikit-image's wheel ships, or the user's own."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Tuple

import numpy as np
from PIL import Image

__all__ = ["load_backgrounds", "to_pil", "shrink_to"]

# Photographs (not textures of text, charts or microscopy) shipped in
# scikit-image's wheel; no download needed.
_SKIMAGE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "camera.png", "coins.png", "moon.png",
    "grass.png", "gravel.png", "brick.png",
)


@functools.lru_cache(maxsize=None)
def _skimage_photos() -> Tuple[Image.Image, ...]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "MultiDigitDataset: variant 'mbg' needs background photographs; install scikit-image "
            "(its wheel ships them) or pass backgrounds=[...]"
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    photos = []
    for name in _SKIMAGE_PHOTOS:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with Image.open(path) as im:
                photos.append(im.convert("RGB"))
    if not photos:
        raise ImportError(f"MultiDigitDataset: found none of the scikit-image photographs in {folder}")
    return tuple(photos)


def load_backgrounds() -> Tuple[Image.Image, ...]:
    """The default MBG background photographs (RGB PIL images, cached)."""
    return _skimage_photos()


def to_pil(bg) -> Image.Image:
    """A background as an RGB PIL image: PIL images, ``(H, W, 3)`` or ``(H, W)`` arrays (uint8, or floats in [0, 1])."""
    if isinstance(bg, Image.Image):
        return bg.convert("RGB")
    arr = np.asarray(bg)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"MultiDigitDataset: a background must be (H, W, 3) or (H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def shrink_to(im: Image.Image, side: int) -> Image.Image:
    """``im`` resized so that its shorter side is at most ``side`` (aspect kept)."""
    # Crops are at least 30% of the shorter side, so a photo whose shorter
    # side is 3 x the output loses no detail, and resizing crops is cheaper.
    w, h = im.size
    if min(w, h) <= side:
        return im
    f = side / min(w, h)
    return im.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR)
