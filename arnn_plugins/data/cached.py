"""Multi-digit splits generated once into tensors, and kept on disk for the next run."""

from __future__ import annotations

import hashlib
import json
import os
import os.path as osp
from typing import Optional

import torch
from torch.utils.data import Dataset

from .multidigit import COLOURS, make_multidigit

__all__ = ["MultiDigitTensors"]


def _default_cache_dir() -> str:
    return os.environ.get("ARNN_CACHE", osp.join(osp.expanduser("~"), ".cache", "arnn-plugins", "multidigit"))


class MultiDigitTensors(Dataset):
    """A :class:`~arnn_plugins.data.MultiDigitDataset` generated once into tensors.

    Training re-reads every item each epoch; generating an MBG item costs
    milliseconds, so the whole split is made up front (and, with
    ``cache_dir``, kept on disk keyed by its options, so other runs with the
    same data, e.g. other attention kinds or seeds, load it instead).

    Args:
        variant, split, length: as :class:`MultiDigitDataset`.
        cache_dir: folder for the cached tensors; ``None`` keeps them in
            memory only; ``"default"`` is ``$ARNN_CACHE`` or
            ``~/.cache/arnn-plugins/multidigit``.
        **kwargs: more :class:`MultiDigitDataset` options (``task``, ``size``,
            ``seed``, ...).

    Items: dicts with ``image`` ``(3, H, W)`` float32 in [0, 1] (kept as
    bytes, so values are the generator's rounded to 1/255), ``query``,
    ``answer`` (int64 scalars), ``mask`` ``(H, W)`` bool and ``scale``
    (float32).
    """

    def __init__(self, variant: str = "mbg", split: str = "train", length: int = 1000,
                 cache_dir: Optional[str] = None, progress: bool = False, **kwargs) -> None:
        self.options = dict(variant=variant, split=split, length=length, **kwargs)
        data = None
        path = None
        if cache_dir is not None:
            cache_dir = _default_cache_dir() if cache_dir == "default" else cache_dir
            key = hashlib.sha1(json.dumps(self.options, sort_keys=True, default=str).encode()).hexdigest()[:16]
            path = osp.join(cache_dir, f"{variant}_{split}_{length}_{key}_u8.pt")
            if osp.isfile(path):
                data = torch.load(path, weights_only=True)
        if data is None:
            made = make_multidigit(variant, length, split=split, **kwargs)
            made.pop("dataset")
            # Bytes, not floats: a 30k-item 100 px split is 0.9 GB instead of 3.6.
            made["image"] = made["image"].mul(255).round_().to(torch.uint8)
            data = made
            if path is not None:
                os.makedirs(cache_dir, exist_ok=True)
                tmp = path + f".{os.getpid()}.tmp"
                torch.save(data, tmp)
                os.replace(tmp, path)  # atomic: parallel runs never read half a file
        self.data = data
        color = kwargs.get("task", "color") == "color"
        self.num_queries = 10 if color else 5
        self.num_answers = 5 if color else 10
        # mmengine hands this to metrics and visualisers.
        self.metainfo = dict(task=kwargs.get("task", "color"),
                             classes=tuple(COLOURS) if color else tuple(str(d) for d in range(10)))

    def __len__(self) -> int:
        return self.data["query"].shape[0]

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.data.items()}
        item["image"] = item["image"].float().div_(255)
        return item
