"""PAN on the multi-digit data (paper 4.1): model and metric; the data sets in mmengine's registry."""

from __future__ import annotations

import json
import math
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS

from ..data import MultiDigitDataset
from ..data.cached import MultiDigitTensors
from ..models.pan import PAN, mask_correctness
from .metric import CollectMetric

__all__ = ["PANModel", "PANMetric", "PANCurveHook", "MultiDigitTensors", "SCALE_BINS", "curve_point", "mask_entropy"]

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


def _groups(pan: PAN) -> Dict[str, List[torch.nn.Parameter]]:
    # Parameters by role: the attention layers, the base CNN, the classifier head.
    return {"attention": list(pan.attention.parameters()), "backbone": list(pan.stacks.parameters()),
            "head": list(pan.head.parameters())}


class _UniformMasks:
    """Within the block, every attention layer of ``pan`` outputs zeros: sigmoid masks 0.5, softmax uniform."""

    def __init__(self, pan: PAN) -> None:
        self.pan, self.handles = pan, []

    def __enter__(self):
        self.handles = [m.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
                        for m in self.pan.attention.values()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def mask_entropy(mask: torch.Tensor) -> torch.Tensor:
    """Entropy of a ``(B, 1, h, w)`` mask taken as a distribution over space, over ``log(h w)``: 1 is uniform."""
    p = mask.detach().float().flatten(1)
    p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
    n = p.shape[1]
    ent = -(p * p.clamp_min(1e-12).log()).sum(1)
    return ent / max(math.log(n), 1e-12)


def curve_point(pan: PAN, batches: Sequence[dict], probe: dict) -> Dict[str, object]:
    """What a PAN's attention does now, on held-out ``batches`` (dicts of stacked tensors).

    Returns ``accuracy``, ``correctness`` (the mask product), per layer
    ``layer_correctness``, ``layer_entropy`` (:func:`mask_entropy`, 1 =
    uniform) and ``layer_mean`` (mean mask value), ``accuracy_uniform_masks``
    (the same model with every mask replaced by a constant: how much the
    answers depend on the masks) and ``grad_norm`` per parameter group
    (``attention``, ``backbone``, ``head``) of the cross-entropy on the
    ``probe`` batch. The model is left in the mode it was in and with no
    gradients.
    """
    was = pan.training
    pan.eval()
    device = next(pan.parameters()).device
    n = hit = hit_u = 0
    corr = 0.0
    layers: List[List[float]] = []
    with torch.no_grad():
        for b in batches:
            image, query, answer = b["image"].to(device), b["query"].to(device), b["answer"].to(device)
            logits, masks = pan(image, query)
            target = b["mask"].to(device)
            hit += (logits.argmax(1) == answer).sum().item()
            corr += mask_correctness(masks, target).sum().item()
            if not layers:
                layers = [[0.0, 0.0, 0.0] for _ in masks]
            for k, m in enumerate(masks):
                layers[k][0] += mask_correctness([m], target).sum().item()
                layers[k][1] += mask_entropy(m).sum().item()
                layers[k][2] += m.float().mean(dim=(1, 2, 3)).sum().item()
            with _UniformMasks(pan):
                hit_u += (pan(image, query)[0].argmax(1) == answer).sum().item()
            n += answer.numel()
    logits, _ = pan(probe["image"].to(device), probe["query"].to(device))
    pan.zero_grad(set_to_none=True)
    F.cross_entropy(logits.float(), probe["answer"].to(device)).backward()
    grads = {}
    for name, params in _groups(pan).items():
        sq = sum(float(p.grad.detach().float().pow(2).sum()) for p in params if p.grad is not None)
        grads[name] = math.sqrt(sq)
    pan.zero_grad(set_to_none=True)
    pan.train(was)
    n = max(n, 1)
    return {"accuracy": hit / n, "correctness": corr / n, "accuracy_uniform_masks": hit_u / n,
            "layer_correctness": [v[0] / n for v in layers], "layer_entropy": [v[1] / n for v in layers],
            "layer_mean": [v[2] / n for v in layers], "grad_norm": grads}


@HOOKS.register_module()
class PANCurveHook(Hook):
    """Measures a PAN's attention every ``interval`` training steps (and before the first).

    Each point is :func:`curve_point` on the first ``num_items`` items of
    the run's test set (the probe batch for the gradients is its first 64),
    with ``step`` (iterations done) and ``loss`` (mean training loss since
    the previous point; ``None`` at step 0). Points are kept in :attr:`points` and, with
    ``out_file`` (relative to the work dir), written there as JSON after
    every point.
    """

    priority = "LOW"

    def __init__(self, interval: int = 100, num_items: int = 256, out_file: Optional[str] = "curve.json") -> None:
        self.interval, self.num_items, self.out_file = int(interval), int(num_items), out_file
        self.points: List[dict] = []
        self._batches: List[dict] = []
        self._losses: List[float] = []

    def before_train(self, runner) -> None:
        ds = runner.test_dataloader.dataset
        items = [ds[i] for i in range(min(self.num_items, len(ds)))]
        keys = ("image", "query", "answer", "mask")
        self._batches = [{k: torch.stack([torch.as_tensor(it[k]) for it in items[s:s + 64]]) for k in keys}
                         for s in range(0, len(items), 64)]
        if runner.iter == 0:
            self._record(runner, 0)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if outputs and "loss" in outputs:
            self._losses.append(float(outputs["loss"].detach() if isinstance(outputs["loss"], torch.Tensor)
                                      else outputs["loss"]))
        step = runner.iter + 1  # mmengine counts the iteration just done after this hook
        if step % self.interval == 0 or step == runner.max_iters:
            self._record(runner, step)

    def _record(self, runner, step: int) -> None:
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        point = {"step": int(step),
                 "loss": sum(self._losses) / len(self._losses) if self._losses else None}
        point.update(curve_point(model.pan, self._batches, self._batches[0]))
        self._losses = []
        self.points.append(point)
        if self.out_file and runner.rank == 0:
            path = osp.join(runner.work_dir, self.out_file)
            with open(path + ".tmp", "w") as f:
                json.dump(self.points, f, indent=1)
            os.replace(path + ".tmp", path)
