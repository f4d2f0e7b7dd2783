"""PAN on the multi-digit data (paper 4.1): model and metric; the data sets in mmengine's registry."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS

from ..data import MultiDigitDataset
from ..data.cached import MultiDigitTensors
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


def _register_data() -> None:
    # The package's data sets, in mmengine's registry for the configs.
    for cls in (MultiDigitDataset, MultiDigitTensors):
        if DATASETS.get(cls.__name__) is None:
            DATASETS.register_module(module=cls)


_register_data()
