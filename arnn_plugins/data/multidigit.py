"""MREF / MDIST / MBG: the multi-digit attribute query data sets (paper 4.1).

Each image (``size x size`` RGB, 100 by default, 224 for the MBG^hr variant)
holds five to nine real MNIST digits of *distinct* classes, each in one of
five colours (red, green, blue, yellow, white) and at a scale in 0.5-3.0
(relative to the 28-pixel MNIST frame), placed so that their ink bounding
boxes do not overlap. One present digit is the target.

Tasks:

- ``task="color"`` (the paper's main task): the query is the target's digit
  class (0-9), the answer its colour index into :data:`COLOURS` (chance 20%).
  Colours are drawn independently per digit, so several digits may share one.
- ``task="digit"`` (the inverse task, MBG^inv): the query is a colour
  (0-4), the answer the digit class (0-9) of the one digit in that colour.
  To make the answer unique, the target's colour is given to no other digit
  in the image; the others draw from the remaining four colours.

Backgrounds:

- ``"mref"``: black.
- ``"mdist"``: black plus per-pixel, per-channel Gaussian noise
  (``noise_std``, clipped to [0, 1]); each image takes a random window (and
  flip / rotation) of one ``4 size x 4 size`` noise field drawn per data set
  from the seed.
- ``"mbg"``: a random square crop (30-100% of the shorter side, random
  horizontal flip) of a real photograph, resized to the image size. By
  default the photographs that ship inside scikit-image's wheel
  (``skimage.data``: astronaut, chelsea, coffee, rocket, motorcycles, camera,
  coins, moon, grass, gravel, brick); pass ``backgrounds=`` your own
  (e.g. SUN images) instead. The same photographs serve every split.

Digits are alpha-composited: ``pixel = (1 - d) * background + d * colour``
with ``d`` the resized digit intensity in [0, 1]. The target's pixel mask is
``d >= 0.5 * max(d)`` over the target digit.

Placement: scales are drawn uniformly in ``scale_range`` and digits placed
largest first at a uniformly random free position (all free positions are
found at once with a summed-area table). A digit that finds no room is
shrunk by 15% and tried again; one that would go below the smallest scale
restarts the image. Crowded images therefore hold fewer very large digits
than a uniform draw would; the realised scales are recorded. With
``scale_with_size=True`` the pixel size of a digit is ``28 * scale *
size / 100``, so the 224 variant is the same layout at a higher resolution
(larger feature maps, the point of MBG^hr).

Determinism: item ``i`` is a pure function of ``(seed, split, i)`` (plus
the options), generated on access, so the same seed gives identical data in
any order and in any DataLoader worker, and nothing is held in memory. The
layout (digits, colours, places) does not depend on the variant: MREF, MDIST
and MBG with one seed differ only in their backgrounds. Splits draw their
digits from disjoint MNIST images (see :mod:`arnn_plugins.data.digits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..checks import check_choice, check_int
from .backgrounds import load_backgrounds, shrink_to, to_pil
from .digits import SPLITS, DigitSet, load_digits
from .placement import free_positions, ink_boxes, resize_matrix

__all__ = [
    "COLOURS",
    "COLOUR_RGB",
    "VARIANTS",
    "TASKS",
    "PAPER_LENGTHS",
    "MultiDigitSample",
    "MultiDigitDataset",
    "load_backgrounds",
    "make_multidigit",
    "query_blind_accuracy",
    "uniform_mask_correctness",
]

COLOURS = ("red", "green", "blue", "yellow", "white")
COLOUR_RGB = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=np.float32
)
VARIANTS = ("mref", "mdist", "mbg")
TASKS = ("color", "digit")
PAPER_LENGTHS = {"train": 30_000, "val": 10_000, "test": 10_000}
_SPLIT_CODE = {s: k for k, s in enumerate(SPLITS)}
_SHRINK = 0.85
_MAX_RESTARTS = 200

@dataclass
class MultiDigitSample:
    """One generated image with everything that went into it.

    Attributes:
        image: ``(3, H, W)`` float32 in [0, 1].
        mask: ``(H, W)`` bool, the target digit's pixels.
        query: digit class (task ``"color"``) or colour index (task ``"digit"``).
        answer: colour index (task ``"color"``) or digit class (task ``"digit"``).
        target: position of the target in the per-digit arrays below.
        classes: ``(n,)`` digit classes, distinct, ``5 <= n <= 9`` by default.
        colours: ``(n,)`` colour indices into :data:`COLOURS`.
        scales: ``(n,)`` realised scales (digit size / 28 px at 100 px images).
        boxes: ``(n, 4)`` ink boxes ``(y0, x0, y1, x1)``, end-exclusive.
        digit_ids: ``(n,)`` MNIST image ids of the digits used.
    """

    image: np.ndarray
    mask: np.ndarray
    query: int
    answer: int
    target: int
    classes: np.ndarray
    colours: np.ndarray
    scales: np.ndarray
    boxes: np.ndarray
    digit_ids: np.ndarray


class MultiDigitDataset(Dataset):
    """MREF / MDIST / MBG multi-digit attribute queries (see module doc).

    Args:
        variant: ``"mref"``, ``"mdist"`` or ``"mbg"``.
        split: ``"train"``, ``"val"`` or ``"test"``; selects disjoint MNIST
            digit images and an independent random stream.
        length: number of items; defaults to the paper's 30k / 10k / 10k.
        task: ``"color"`` (query digit -> colour) or ``"digit"`` (inverse).
        size: image side in pixels (100; 224 for the high-resolution variant).
        seed: base seed; item ``i`` depends only on ``(seed, split, i)``.
        num_digits: inclusive range of digits per image (at most 10).
        scale_range: inclusive range of digit scales.
        scale_with_size: scale digit pixel sizes by ``size / 100``.
        noise_std: standard deviation of the MDIST background noise.
        digits: a :class:`~arnn_plugins.data.DigitSet` to draw from instead
            of MNIST's ``split``.
        mnist_root: local torchvision MNIST folder (see :func:`load_digits`).
        backgrounds: images (PIL, or arrays ``(H, W[, 3])``) for MBG.
        return_tuple: ``__getitem__`` gives ``(image, query, answer, mask)``
            instead of a dict.

    Items (``__getitem__``): a dict with ``image`` float32 ``(3, H, W)`` in
    [0, 1], ``query`` int, ``answer`` int, ``mask`` bool ``(H, W)`` (the
    target's pixels, for mask correctness), ``scale`` float (the target's
    scale, for per-scale accuracy) and ``index``.
    """

    def __init__(
        self,
        variant: str = "mref",
        split: str = "train",
        length: Optional[int] = None,
        *,
        task: str = "color",
        size: int = 100,
        seed: int = 0,
        num_digits: Tuple[int, int] = (5, 9),
        scale_range: Tuple[float, float] = (0.5, 3.0),
        scale_with_size: bool = True,
        noise_std: float = 0.3,
        digits: Optional[DigitSet] = None,
        mnist_root: Optional[str] = None,
        backgrounds: Optional[Sequence] = None,
        return_tuple: bool = False,
    ) -> None:
        check_choice("MultiDigitDataset", "variant", variant, VARIANTS)
        check_choice("MultiDigitDataset", "split", split, SPLITS)
        check_choice("MultiDigitDataset", "task", task, TASKS)
        check_int("MultiDigitDataset", "size", size, minimum=16)
        lo, hi = num_digits
        if not (1 <= lo <= hi <= 10):
            raise ValueError(f"MultiDigitDataset: num_digits must satisfy 1 <= lo <= hi <= 10, got {num_digits!r}")
        if task == "digit" and hi > 1 and len(COLOURS) < 2:  # pragma: no cover - fixed palette
            raise ValueError("MultiDigitDataset: the inverse task needs at least two colours")
        smin, smax = float(scale_range[0]), float(scale_range[1])
        if not (0 < smin <= smax):
            raise ValueError(f"MultiDigitDataset: scale_range must satisfy 0 < lo <= hi, got {scale_range!r}")
        px = 28 * smax * (size / 100 if scale_with_size else 1)
        if px > size:
            raise ValueError(
                f"MultiDigitDataset: digits of scale {smax} ({px:.0f} px) do not fit a {size} px image"
            )
        if length is None:
            length = PAPER_LENGTHS[split]
        check_int("MultiDigitDataset", "length", length, minimum=0)
        if noise_std < 0:
            raise ValueError(f"MultiDigitDataset: noise_std must be >= 0, got {noise_std!r}")

        self.variant, self.split, self.task = variant, split, task
        self.length, self.size, self.seed = length, size, int(seed)
        self.num_digits = (int(lo), int(hi))
        self.scale_range = (smin, smax)
        self.scale_with_size = scale_with_size
        self.noise_std = float(noise_std)
        self.return_tuple = return_tuple
        self.digits = digits if digits is not None else load_digits(split, mnist_root)
        if not isinstance(self.digits, DigitSet):
            raise TypeError(f"MultiDigitDataset: digits must be a DigitSet, got {type(self.digits).__name__}")
        missing = [c for c in range(10) if len(self.digits.by_class[c]) == 0]
        if missing:
            raise ValueError(f"MultiDigitDataset: the digit set has no images of classes {missing}")
        self._ink = ink_boxes(self.digits.images)
        self._backgrounds = None
        self._noise = None
        if variant == "mbg":
            bgs = backgrounds if backgrounds is not None else load_backgrounds()
            self._backgrounds = tuple(shrink_to(to_pil(b), 3 * size) for b in bgs)
            if not self._backgrounds:
                raise ValueError("MultiDigitDataset: backgrounds is empty")

    @property
    def num_queries(self) -> int:
        """Size of the query vocabulary (10 digits, or 5 colours)."""
        return 10 if self.task == "color" else len(COLOURS)

    @property
    def num_answers(self) -> int:
        """Number of answer classes (5 colours, or 10 digits)."""
        return len(COLOURS) if self.task == "color" else 10

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (
            f"MultiDigitDataset(variant={self.variant!r}, split={self.split!r}, length={self.length}, "
            f"task={self.task!r}, size={self.size}, seed={self.seed})"
        )

    def _check_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"MultiDigitDataset: index must be an int, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"MultiDigitDataset: index {index} out of range for length {self.length}")
        return index

    def sample(self, index: int) -> MultiDigitSample:
        """Generate item ``index`` with its full description (numpy arrays)."""
        index = self._check_index(index)
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index, 0])
        layout = self._layout(rng)
        bg_rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index, 1])
        background = self._background(bg_rng)
        return self._compose(background, *layout)

    def __getitem__(self, index: int):
        s = self.sample(index)
        image = torch.from_numpy(s.image)
        mask = torch.from_numpy(s.mask)
        if self.return_tuple:
            return image, s.query, s.answer, mask
        return {
            "image": image,
            "query": s.query,
            "answer": s.answer,
            "mask": mask,
            "scale": float(s.scales[s.target]),
            "index": self._check_index(index),
        }

    # -- generation -----------------------------------------------------------------

    def _px_scale(self) -> float:
        return self.size / 100.0 if self.scale_with_size else 1.0

    def _layout(self, rng: np.random.Generator):
        size, lo, hi = self.size, *self.num_digits
        smin, smax = self.scale_range
        for _ in range(_MAX_RESTARTS):
            n = int(rng.integers(lo, hi + 1))
            classes = rng.permutation(10)[:n]
            pos = np.array([self.digits.by_class[c][rng.integers(len(self.digits.by_class[c]))] for c in classes])
            scales = rng.uniform(smin, smax, size=n)
            target = int(rng.integers(n))
            if self.task == "color":
                colours = rng.integers(len(COLOURS), size=n)
            else:
                colours = rng.integers(len(COLOURS) - 1, size=n)
                tc = int(rng.integers(len(COLOURS)))
                colours = colours + (colours >= tc)  # skip the target's colour
                colours[target] = tc
            boxes = np.zeros((n, 4), dtype=np.int64)
            placed_boxes = []
            patches = [None] * n
            ok = True
            for k in np.argsort(-scales, kind="stable"):
                placed = self._place(rng, placed_boxes, pos[k], scales[k], smin)
                if placed is None:
                    ok = False
                    break
                scales[k], boxes[k], patches[k] = placed
                placed_boxes.append(tuple(int(v) for v in boxes[k]))
            if ok:
                return classes, colours, scales, boxes, patches, pos, target
        raise RuntimeError(
            f"MultiDigitDataset: could not place {self.num_digits} digits without overlap in a "
            f"{size} px image after {_MAX_RESTARTS} tries; lower num_digits or scale_range"
        )

    def _place(self, rng, placed, pos, scale, smin):
        y0, y1, x0, x1 = self._ink[pos]
        ink = self.digits.images[pos, y0:y1, x0:x1]
        size = self.size
        while True:
            f = scale * self._px_scale()
            bh = max(1, min(size, int(round((y1 - y0) * f))))
            bw = max(1, min(size, int(round((x1 - x0) * f))))
            free = free_positions(size, placed, bh, bw)
            if free.size:
                flat = free[rng.integers(free.size)]
                fy, fx = divmod(int(flat), size - bw + 1)
                patch = resize_matrix(ink.shape[0], bh) @ ink.astype(np.float32) @ resize_matrix(ink.shape[1], bw).T
                patch *= 1.0 / 255.0
                # Rows of the weights are convex, so only rounding can pass 1.
                return scale, (fy, fx, fy + bh, fx + bw), np.minimum(patch, 1.0, out=patch)
            if scale * _SHRINK < smin:
                return None
            scale *= _SHRINK

    def _noise_field(self) -> np.ndarray:
        # One large noise field per data set, cut into per-item windows:
        # drawing fresh Gaussian noise per item would dominate generation time.
        if self._noise is None:
            rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], 2**31])
            side = 4 * self.size
            noise = rng.standard_normal((3, side, side), dtype=np.float32) * self.noise_std
            self._noise = np.clip(noise, 0.0, 1.0)
        return self._noise

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        size = self.size
        if self.variant == "mref":
            return np.zeros((3, size, size), dtype=np.float32)
        if self.variant == "mdist":
            field = self._noise_field()
            y0, x0 = rng.integers(field.shape[1] - size + 1, size=2)
            window = field[:, y0:y0 + size, x0:x0 + size]
            k = int(rng.integers(8))  # one of the 8 flips / rotations
            window = np.rot90(window, k % 4, axes=(1, 2))
            # A copy, never a view: the image is drawn on in place.
            return np.array(window[:, :, ::-1] if k >= 4 else window, dtype=np.float32, order="C")
        photo = self._backgrounds[int(rng.integers(len(self._backgrounds)))]
        w, h = photo.size
        side = max(1, int(round(min(w, h) * rng.uniform(0.3, 1.0))))
        x0, y0 = int(rng.integers(w - side + 1)), int(rng.integers(h - side + 1))
        crop = photo.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side), reducing_gap=2.0)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out = np.ascontiguousarray(np.asarray(crop).transpose(2, 0, 1), dtype=np.float32)
        out *= 1.0 / 255.0
        return out

    def _compose(self, background, classes, colours, scales, boxes, patches, pos, target) -> MultiDigitSample:
        size = self.size
        image = background if background.flags.writeable else background.copy()
        for k, (y0, x0, y1, x1) in enumerate(boxes):
            # Channel-first keeps numpy's inner loops long and contiguous.
            d = patches[k]
            region = image[:, y0:y1, x0:x1]
            region *= 1.0 - d
            region += COLOUR_RGB[colours[k]][:, None, None] * d
        mask = np.zeros((size, size), dtype=bool)
        y0, x0, y1, x1 = boxes[target]
        p = patches[target]
        mask[y0:y1, x0:x1] = p >= 0.5 * p.max()
        if self.task == "color":
            query, answer = int(classes[target]), int(colours[target])
        else:
            query, answer = int(colours[target]), int(classes[target])
        return MultiDigitSample(
            image=image, mask=mask, query=query, answer=answer, target=target,
            classes=classes.astype(np.int64), colours=colours.astype(np.int64),
            scales=scales.astype(np.float64), boxes=boxes, digit_ids=self.digits.ids[pos],
        )


def query_blind_accuracy(dataset) -> float:
    """Expected accuracy of the best answer that looks at the image but not the query.

    The target is one of the image's digits at random, so without the query
    the best colour answer is the colour most digits share (ties split), and
    the best digit answer (inverse task, digits of distinct classes) is any
    of the ``n`` digits, right ``1 / n`` of the time. This is the level a
    model reaches before its attention follows the query.

    Args:
        dataset: a :class:`MultiDigitDataset`.
    """
    total = 0.0
    for i in range(len(dataset)):
        s = dataset.sample(i)
        if dataset.task == "color":
            counts = np.bincount(s.colours, minlength=int(s.colours.max()) + 1)
            best = np.flatnonzero(counts == counts.max())
            total += float(s.colours[s.target] in best) / len(best)
        else:
            total += 1.0 / len(s.classes)
    return total / max(len(dataset), 1)


def uniform_mask_correctness(dataset) -> float:
    """Mask correctness of a uniform mask: the target digit's mean share of the image.

    The level attention starts from; a mask scores above it only where it
    weights the queried digit more than the rest of the image.

    Args:
        dataset: a :class:`MultiDigitDataset`.
    """
    total = 0.0
    for i in range(len(dataset)):
        total += float(dataset.sample(i).mask.mean())
    return total / max(len(dataset), 1)


def make_multidigit(
    variant: str = "mref", n: int = 1000, *, split: str = "train", **kwargs
) -> Dict[str, Union[torch.Tensor, MultiDigitDataset]]:
    """Generate ``n`` items at once into stacked tensors.

    Returns a dict with ``image`` ``(n, 3, H, W)`` float32, ``query`` and
    ``answer`` ``(n,)`` int64, ``mask`` ``(n, H, W)`` bool, ``scale`` ``(n,)``
    float32 and ``dataset`` (the :class:`MultiDigitDataset` that made them).
    ``kwargs`` go to :class:`MultiDigitDataset`.
    """
    ds = MultiDigitDataset(variant, split, n, **kwargs)
    size = ds.size
    out = {
        "image": torch.empty(n, 3, size, size),
        "query": torch.empty(n, dtype=torch.long),
        "answer": torch.empty(n, dtype=torch.long),
        "mask": torch.empty(n, size, size, dtype=torch.bool),
        "scale": torch.empty(n),
    }
    for i in range(n):
        s = ds.sample(i)
        out["image"][i] = torch.from_numpy(s.image)
        out["query"][i] = s.query
        out["answer"][i] = s.answer
        out["mask"][i] = torch.from_numpy(s.mask)
        out["scale"][i] = float(s.scales[s.target])
    out["dataset"] = ds
    return out
