"""PAN on the multi-digit data (paper 4.1): model, cached data set and metric."""

from __future__ import annotations

import hashlib
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS
from torch.utils.data import Dataset

from ..data import COLOURS, MultiDigitDataset, make_multidigit
from ..models.pan import PAN, mask_correctness
from .metric import CollectMetric

__all__ = ["PANModel", "PANMetric", "MultiDigitTensors", "SCALE_BINS"]

SCALE_BINS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


@MODELS.register_module()
class PANModel(BaseModel):
    """mmengine model around :class:`~arnn_plugins.models.pan.PAN`.

    Args:
        attention: PAN attention kind (``ctx``, ``arnn``, ...).
        **pan_kwargs: the rest of :class:`PAN`'s arguments.

    ``forward(image (B, 3, H, W), query (B,), answer (B,), mask (B, H, W),
    scale (B,), mode)``: ``mode='loss'`` gives ``{'loss': cross-entropy}``;
    ``'predict'`` a list with one dict per item (``pred``, ``answer``,
    ``correctness`` of the mask product, ``layer_correctness``: a list with
    the correctness of each layer's mask alone, ``scale``); ``'tensor'`` the
    PAN output ``(logits (B, K), masks)``.
    """

    def __init__(self, attention: str = "arnn", data_preprocessor=None, init_cfg=None, **pan_kwargs) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.pan = PAN(attention, **pan_kwargs)

    def forward(self, image, query, answer=None, mask=None, scale=None, index=None, mode: str = "tensor"):
        logits, masks = self.pan(image, query)
        if mode == "tensor":
            return logits, masks
        if mode == "loss":
            if answer is None:
                raise ValueError("PANModel: mode='loss' needs the answers")
            return {"loss": F.cross_entropy(logits.float(), answer)}
        if mode == "predict":
            pred = logits.argmax(1)
            if mask is not None:
                corr = mask_correctness(masks, mask)
                # Each layer alone: which layers localise the target, when the product does not.
                layers = [mask_correctness([m], mask).tolist() for m in masks]
            else:
                corr = torch.full(pred.shape, float("nan"))
                layers = [[float("nan")] * pred.shape[0] for _ in masks]
            out = []
            for k in range(pred.shape[0]):
                out.append(dict(
                    pred=int(pred[k]),
                    answer=int(answer[k]) if answer is not None else -1,
                    correctness=float(corr[k]),
                    layer_correctness=[layer[k] for layer in layers],
                    scale=float(scale[k]) if scale is not None else float("nan"),
                ))
            return out
        raise ValueError(f"PANModel: mode must be 'loss', 'predict' or 'tensor', got {mode!r}")


@METRICS.register_module()
class PANMetric(CollectMetric):
    """Accuracy, mask correctness and accuracy per target-scale bucket (paper Tables 1-2).

    Keys (with the ``pan`` prefix): ``accuracy``, ``correctness`` (of the
    product of all layers' masks, the paper's metric), ``correctness_l<k>``
    (layer ``k``'s mask alone, ``k = 1`` the first, finest layer) and
    ``acc_scale_<lo>-<hi>`` for each bucket of ``scale_bins``.
    """

    default_prefix = "pan"

    def __init__(self, scale_bins: Sequence[float] = SCALE_BINS, collect_device: str = "cpu", prefix=None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.scale_bins = tuple(float(s) for s in scale_bins)

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        n = max(len(results), 1)
        out = {
            "accuracy": sum(r["pred"] == r["answer"] for r in results) / n,
            "correctness": sum(r["correctness"] for r in results) / n,
        }
        n_layers = min((len(r.get("layer_correctness", ())) for r in results), default=0)
        for k in range(n_layers):
            out[f"correctness_l{k + 1}"] = sum(r["layer_correctness"][k] for r in results) / n
        for lo, hi in zip(self.scale_bins[:-1], self.scale_bins[1:]):
            last = hi == self.scale_bins[-1]
            sel = [r for r in results if lo <= r["scale"] < hi or (last and r["scale"] == hi)]
            out[f"acc_scale_{lo:g}-{hi:g}"] = (
                sum(r["pred"] == r["answer"] for r in sel) / len(sel) if sel else float("nan")
            )
        return out


def _default_cache_dir() -> str:
    return os.environ.get("ARNN_CACHE", osp.join(osp.expanduser("~"), ".cache", "arnn-plugins", "multidigit"))


@DATASETS.register_module()
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


def _register_multidigit() -> None:
    if DATASETS.get("MultiDigitDataset") is None:
        DATASETS.register_module(module=MultiDigitDataset)


_register_multidigit()
