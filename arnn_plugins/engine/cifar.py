"""CIFAR-100 classification with timm ResNet18 (+CBAM, +CBAM+ARNN; paper 4.2)."""

from __future__ import annotations

import os.path as osp
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS
from torch.utils.data import Dataset

from ..registry import swap_attention
from .metric import CollectMetric

__all__ = ["CifarResNet", "CIFAR100Dict", "AccuracyMetric"]


@MODELS.register_module()
class CifarResNet(BaseModel):
    """timm ResNet with a CIFAR stem (3x3 stride-1 conv, no max-pool), optionally CBAM / CBAM+ARNN.

    Args:
        arch: timm model name (``resnet18``).
        num_classes: classes (100).
        attention: ``None``, ``"cbam"`` or ``"cbam_arnn"`` (CBAM with its
            spatial branch swapped for AttentionRNN, paper 4.2).
        swap_mode: ``"replace"`` (paper) or ``"residual"`` for the ARNN swap.
        arnn_kwargs: AttentionRNN options.

    ``forward(inputs (B, 3, 32, 32), labels (B,), mode)``: ``'loss'`` ->
    ``{'loss'}``; ``'predict'`` -> list of ``{'pred', 'label'}``; ``'tensor'``
    -> logits ``(B, num_classes)``.
    """

    def __init__(self, arch: str = "resnet18", num_classes: int = 100, attention: Optional[str] = "cbam",
                 swap_mode: str = "replace", arnn_kwargs: Optional[dict] = None, data_preprocessor=None,
                 init_cfg=None) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        import timm

        if attention not in (None, "cbam", "cbam_arnn"):
            raise ValueError(f"CifarResNet: attention must be None, 'cbam' or 'cbam_arnn', got {attention!r}")
        kw = {} if attention is None else {"block_args": dict(attn_layer="cbam")}
        net = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kw)
        # CIFAR images are 32 px: a 7x7/2 stem and a max-pool would leave 1x1 maps.
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        if attention == "cbam_arnn":
            swap_attention(net, mode=swap_mode, adapters=["timm_cbam"], **(arnn_kwargs or {}))
        self.net = net

    def forward(self, inputs, labels=None, mode: str = "tensor"):
        logits = self.net(inputs)
        if mode == "tensor":
            return logits
        if mode == "loss":
            return {"loss": F.cross_entropy(logits.float(), labels)}
        if mode == "predict":
            pred = logits.argmax(1)
            return [dict(pred=int(p), label=int(t)) for p, t in zip(pred, labels)]
        raise ValueError(f"CifarResNet: mode must be 'loss', 'predict' or 'tensor', got {mode!r}")


_CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
_CIFAR_STD = (0.2673, 0.2564, 0.2762)


@DATASETS.register_module()
class CIFAR100Dict(Dataset):
    """torchvision CIFAR-100 from a local folder (never downloaded), as dicts.

    Args:
        root: folder holding ``cifar-100-python/`` (torchvision layout).
        train: training or test split.
        augment: random crop (pad 4) and horizontal flip (default: ``train``).
        verify: read through ``torchvision.datasets.CIFAR100``, which checks
            the published checksums; ``False`` reads the same files without
            them (re-packed or test copies).

    Items: ``{'inputs': (3, 32, 32) normalised float, 'labels': int64}``.
    """

    def __init__(self, root: str, train: bool = True, augment: Optional[bool] = None, verify: bool = True) -> None:
        from torchvision import transforms

        if verify:
            from torchvision.datasets import CIFAR100

            try:
                self.ds = CIFAR100(root, train=train, download=False)
            except RuntimeError as e:
                raise FileNotFoundError(
                    f"CIFAR100Dict: no CIFAR-100 under {root!r} (expected {root}/cifar-100-python with the "
                    "published checksums); nothing is downloaded"
                ) from e
        else:
            self.ds = _CifarFiles(root, train)
        augment = train if augment is None else augment
        tf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
        self.transform = transforms.Compose(tf + [transforms.ToTensor(), transforms.Normalize(_CIFAR_MEAN, _CIFAR_STD)])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        img, label = self.ds[i]
        return {"inputs": self.transform(img), "labels": torch.tensor(label, dtype=torch.long)}


class _CifarFiles:
    """The pickled batches of a torchvision CIFAR-100 folder, without checksums: items ``(PIL image, label)``."""

    def __init__(self, root: str, train: bool) -> None:
        import pickle

        import numpy as np

        path = osp.join(root, "cifar-100-python", "train" if train else "test")
        if not osp.isfile(path):
            raise FileNotFoundError(f"CIFAR100Dict: no {path}; nothing is downloaded")
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        self.data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = [int(t) for t in entry["fine_labels"]]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        return Image.fromarray(self.data[i]), self.targets[i]


@METRICS.register_module()
class AccuracyMetric(CollectMetric):
    """Top-1 accuracy of ``{'pred', 'label'}`` predictions (key ``accuracy``)."""

    default_prefix = "cls"

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        return {"accuracy": sum(r["pred"] == r["label"] for r in results) / max(len(results), 1)}
