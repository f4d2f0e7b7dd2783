"""CelebA (Liu et al., ICCV 2015) in its published layout, for ModularGAN (paper 4.4)."""

from __future__ import annotations

import os
import random
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["CelebA", "MGAN_ATTRIBUTES", "read_celeba_attributes"]

# The paper's three attributes: hair colour (3 values), gender, smile.
MGAN_ATTRIBUTES = (("Black_Hair", "Blond_Hair", "Brown_Hair"), "Male", "Smiling")

def _find(root: str, *candidates: str) -> Optional[str]:
    for c in candidates:
        p = os.path.join(root, c)
        if os.path.exists(p):
            return p
    return None


def read_celeba_attributes(path: str) -> Tuple[List[str], List[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt``: ``(attribute names, file names, values (N, 40) in {-1, 1})``."""
    with open(path, "r") as f:
        lines = [ln.split() for ln in f.read().splitlines()]
    if len(lines) < 2:
        raise ValueError(f"CelebA: {path} must start with a count line and an attribute-name line")
    names = lines[1]
    files, rows = [], []
    for parts in lines[2:]:
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise ValueError(f"CelebA: {path}: expected a file name and {len(names)} values, got {' '.join(parts)!r}")
        files.append(parts[0])
        rows.append([int(v) for v in parts[1:]])
    values = np.asarray(rows, dtype=np.int64).reshape(len(rows), len(names))
    return names, files, values


class CelebA(Dataset):
    """CelebA in its published layout, with chosen attributes.

    ``root`` holds ``img_align_celeba/*.jpg`` and ``list_attr_celeba.txt``
    (also found under ``Img/`` and ``Anno/``), and for ``split`` also
    ``list_eval_partition.txt`` (``Eval/``; 0 train, 1 valid, 2 test).

    Args:
        root: data set folder.
        attributes: each entry a binary attribute name (values 0 = -1 in the
            file, 1 = 1), or a tuple of names forming one categorical
            attribute (value = index of the one that is 1; images where not
            exactly one is 1 are left out). Default: hair colour
            (black/blond/brown), ``Male``, ``Smiling``.
        image_size: output side ``S``.
        crop_size: centre crop before resizing (178 for the aligned faces).
        split: ``None`` (all), ``"train"``, ``"valid"`` or ``"test"``.
        flip: random horizontal flips.

    Items:
        ``(image (3, S, S) float in [-1, 1], labels (n_attr,) long)``.
    """

    SPLITS = {"train": 0, "valid": 1, "test": 2}

    def __init__(
        self,
        root: str,
        attributes: Sequence[Union[str, Sequence[str]]] = MGAN_ATTRIBUTES,
        image_size: int = 128,
        crop_size: int = 178,
        split: Optional[str] = None,
        flip: bool = False,
    ) -> None:
        root = os.fspath(root)
        attr_file = _find(root, "list_attr_celeba.txt", os.path.join("Anno", "list_attr_celeba.txt"))
        img_dir = _find(root, "img_align_celeba", os.path.join("Img", "img_align_celeba"))
        if attr_file is None or img_dir is None:
            raise ValueError(f"CelebA: expected img_align_celeba/ and list_attr_celeba.txt in {root}")
        names, files, values = read_celeba_attributes(attr_file)
        col = {n: i for i, n in enumerate(names)}
        specs = [(a,) if isinstance(a, str) else tuple(a) for a in attributes]
        if not specs:
            raise ValueError("CelebA: attributes must not be empty")
        for spec in specs:
            for n in spec:
                if n not in col:
                    raise ValueError(f"CelebA: unknown attribute {n!r}; the file has {names}")
        keep = np.ones(len(files), dtype=bool)
        labels = np.zeros((len(files), len(specs)), dtype=np.int64)
        for j, spec in enumerate(specs):
            pos = values[:, [col[n] for n in spec]] == 1
            if len(spec) == 1:
                labels[:, j] = pos[:, 0]
            else:
                keep &= pos.sum(1) == 1
                labels[:, j] = pos.argmax(1)
        if split is not None:
            if split not in self.SPLITS:
                raise ValueError(f"CelebA: split must be one of {list(self.SPLITS)} or None, got {split!r}")
            part_file = _find(root, "list_eval_partition.txt", os.path.join("Eval", "list_eval_partition.txt"))
            if part_file is None:
                raise ValueError(f"CelebA: split={split!r} needs list_eval_partition.txt in {root}")
            with open(part_file) as fh:
                part = dict(ln.split() for ln in fh.read().splitlines() if ln.strip())
            keep &= np.array([int(part.get(f, -1)) == self.SPLITS[split] for f in files], dtype=bool)
        self.root = root
        self.img_dir = img_dir
        self.files = [f for f, k in zip(files, keep) if k]
        self.labels = torch.from_numpy(labels[keep])
        self.attribute_names = ["|".join(s) for s in specs]
        self.num_values = [2 if len(s) == 1 else len(s) for s in specs]
        self.image_size = image_size
        self.crop_size = crop_size
        self.flip = flip

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, idx: int) -> torch.Tensor:
        """Image ``idx`` centre-cropped, resized (and maybe flipped): ``(3, S, S)`` in ``[-1, 1]``."""
        from PIL import Image

        with Image.open(os.path.join(self.img_dir, self.files[idx])) as im:
            im = im.convert("RGB")
            w, h = im.size
            c = min(self.crop_size, w, h)
            left, top = (w - c) // 2, (h - c) // 2
            im = im.crop((left, top, left + c, top + c)).resize((self.image_size,) * 2, Image.BILINEAR)
            if self.flip and random.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            arr = np.asarray(im, dtype=np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0

    def __getitem__(self, idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.load_image(idx), self.labels[idx]
