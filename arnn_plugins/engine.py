"""mmengine glue: the package's models, data sets and metrics in mmengine's registries.

Importing this module registers (in mmengine's root registries, so configs
need no ``default_scope``):

=========================  =====================================================
``MODELS``                 :class:`PANModel`, :class:`CifarResNet`,
                           :class:`MCBModel`, :class:`MGANModel`
``DATASETS``               :class:`MultiDigitTensors` (cached multi-digit data),
                           ``MultiDigitDataset``, :class:`CIFAR100Dict`,
                           :class:`VQADict`, :class:`CelebADict`
``METRICS``                :class:`PANMetric`, :class:`AccuracyMetric`,
                           :class:`VQAMetric`
``OPTIM_WRAPPER_CONSTRUCTORS``  :class:`MGANOptimWrapperConstructor`
``HOOKS``                  :class:`ProgressBarHook`
=========================  =====================================================

Configs load it with ``custom_imports = dict(imports=['arnn_plugins.engine'])``
(the CLI imports it anyway). :func:`build_runner` turns a config file plus
overrides into a Runner; :func:`checkpoint_loading` lets torch >= 2.6 read
the checkpoints mmengine writes (they hold its logging objects).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapperDict
from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS
from torch.utils.data import Dataset

from .models.pan import PAN, mask_correctness

__all__ = [
    "PANModel",
    "PANMetric",
    "MultiDigitTensors",
    "CifarResNet",
    "CIFAR100Dict",
    "AccuracyMetric",
    "MCBModel",
    "VQADict",
    "VQAMetric",
    "MGANModel",
    "CelebADict",
    "MGANOptimWrapperConstructor",
    "ProgressBarHook",
    "SCALE_BINS",
    "load_config",
    "build_runner",
    "checkpoint_loading",
]

SCALE_BINS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


# --------------------------------------------------------------------------
# PAN on the multi-digit data


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
class PANMetric(BaseMetric):
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

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        self.results.extend(data_samples)

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
        from .data import make_multidigit

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
        from .data import COLOURS

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
    from .data import MultiDigitDataset

    if DATASETS.get("MultiDigitDataset") is None:
        DATASETS.register_module(module=MultiDigitDataset)


_register_multidigit()


# --------------------------------------------------------------------------
# CIFAR-100 ResNet18 (+CBAM, +CBAM+ARNN)


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
            import arnn_plugins as ap

            ap.swap_attention(net, mode=swap_mode, adapters=["timm_cbam"], **(arnn_kwargs or {}))
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
class AccuracyMetric(BaseMetric):
    """Top-1 accuracy of ``{'pred', 'label'}`` predictions (key ``accuracy``)."""

    default_prefix = "cls"

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        self.results.extend(data_samples)

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        return {"accuracy": sum(r["pred"] == r["label"] for r in results) / max(len(results), 1)}


# --------------------------------------------------------------------------
# MCB VQA (+ATT, +ARNN)


@MODELS.register_module()
class MCBModel(BaseModel):
    """mmengine model around :func:`~arnn_plugins.models.mcb.build_mcb_vqa`.

    Args:
        kind: ``"mcb"``, ``"mcb_att"`` or ``"mcb_arnn"``.
        **kwargs: :class:`~arnn_plugins.models.mcb.MCBVQA` arguments
            (``num_answers``, ``img_channels``, ``vocab_size``, ...).

    Loss: binary cross-entropy against the soft VQA scores of every answer.
    ``'predict'`` gives one ``{'pred', 'score'}`` per question, ``score``
    the official VQA accuracy of the predicted answer.
    """

    def __init__(self, kind: str = "mcb_arnn", data_preprocessor=None, init_cfg=None, **kwargs) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        from .models.mcb import build_mcb_vqa

        self.vqa = build_mcb_vqa(kind, **kwargs)

    def forward(self, image, question, question_id=None, answer=None, answer_scores=None, mode: str = "tensor"):
        logits = self.vqa(image, question)
        if mode == "tensor":
            return logits
        if answer_scores is None:
            raise ValueError(f"MCBModel: mode={mode!r} needs answer_scores (a split with annotations)")
        k = self.vqa.num_answers
        scores = answer_scores.to(logits.dtype)
        if scores.shape[1] < k:  # a data set with fewer answers than classifier outputs
            scores = F.pad(scores, (0, k - scores.shape[1]))
        if mode == "loss":
            return {"loss": F.binary_cross_entropy_with_logits(logits.float(), scores.float()) * k}
        if mode == "predict":
            pred = logits.argmax(1)
            return [dict(pred=int(p), score=float(s[p])) for p, s in zip(pred, scores)]
        raise ValueError(f"MCBModel: mode must be 'loss', 'predict' or 'tensor', got {mode!r}")


@DATASETS.register_module()
class VQADict(Dataset):
    """:class:`~arnn_plugins.models.vqa_data.VQADataset` with fixed vocabularies for training and evaluation.

    The answer vocabulary (``num_answers`` most frequent answers) and the
    word vocabulary come from ``vocab_questions`` / ``vocab_annotations``
    (the training files), so every split agrees with the model's sizes;
    words beyond ``vocab_size`` ids map to the unknown token.
    """

    def __init__(self, questions: str, features: str, annotations: Optional[str] = None,
                 vocab_questions: Optional[str] = None, vocab_annotations: Optional[str] = None,
                 num_answers: int = 3000, vocab_size: int = 15000, max_question_len: int = 14) -> None:
        from .models.vqa_data import QuestionTokenizer, VQADataset, _load_json, build_answer_vocab

        vq = _load_json(vocab_questions or questions, "questions")
        va = _load_json(vocab_annotations or annotations, "annotations")
        tok = QuestionTokenizer.build([q["question"] for q in vq], max_len=max_question_len)
        tok = QuestionTokenizer({w: i for w, i in tok.vocab.items() if i < vocab_size}, max_question_len)
        self.ds = VQADataset(questions, features, annotations, answer_vocab=build_answer_vocab(va, num_answers),
                             tokenizer=tok, max_question_len=max_question_len)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds[i]


@METRICS.register_module()
class VQAMetric(BaseMetric):
    """Mean official VQA accuracy of the predicted answers (key ``accuracy``)."""

    default_prefix = "vqa"

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        self.results.extend(data_samples)

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        return {"accuracy": sum(r["score"] for r in results) / max(len(results), 1)}


# --------------------------------------------------------------------------
# ModularGAN (+ARNN masks)


@MODELS.register_module()
class MGANModel(BaseModel):
    """mmengine model around :class:`~arnn_plugins.models.modular_gan.ModularGAN`.

    Args:
        mask: ``"local"`` (3x3 mask, the baseline) or ``"arnn"`` (masks
            swapped for AttentionRNN, ``mode='replace'``).
        lambda_cls, lambda_rec, lambda_cyc, lambda_gp: loss weights, as
            :class:`~arnn_plugins.models.modular_gan.ModularGANTrainer`.
        arnn_kwargs: AttentionRNN options.
        **gan_kwargs: :class:`ModularGAN` arguments.

    ``train_step`` makes one discriminator and one generator update with the
    two optimisers of :class:`MGANOptimWrapperConstructor`. ``forward(images
    (B, 3, S, S), labels (B, n_attr))`` gives the edited images towards
    random targets.
    """

    def __init__(self, num_values: Sequence[int] = (3, 2, 2), mask: str = "arnn", lambda_cls: float = 1.0,
                 lambda_rec: float = 10.0, lambda_cyc: float = 10.0, lambda_gp: float = 10.0,
                 arnn_kwargs: Optional[dict] = None, data_preprocessor=None, init_cfg=None, **gan_kwargs) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        from .models.modular_gan import ModularGAN

        if mask not in ("local", "arnn"):
            raise ValueError(f"MGANModel: mask must be 'local' or 'arnn', got {mask!r}")
        self.gan = ModularGAN(list(num_values), **gan_kwargs)
        if mask == "arnn":
            import arnn_plugins as ap

            ap.swap_attention(self.gan, mode="replace", **(arnn_kwargs or {}))
        self.lambdas = dict(cls=lambda_cls, rec=lambda_rec, cyc=lambda_cyc, gp=lambda_gp)

    def train_step(self, data, optim_wrapper: OptimWrapperDict) -> Dict[str, torch.Tensor]:
        """One D and one G update (WGAN-GP, attribute classification, reconstruction and cycle losses)."""
        from .models.modular_gan import discriminator_losses, generator_losses, random_target

        data = self.data_preprocessor(data, True)
        images, labels = data["images"], data["labels"]
        m, lam = self.gan, self.lambdas
        target = random_target(m, labels)
        d_loss, d_parts = discriminator_losses(m, images, labels, target, lam["cls"], lam["gp"])
        optim_wrapper["discriminator"].update_params(d_loss)
        g_loss, g_parts = generator_losses(m, images, target, lam["cls"], lam["rec"], lam["cyc"])
        optim_wrapper["generator"].update_params(g_loss)
        # The generator loss also filled D's gradients; D must not see them.
        m.discriminator.zero_grad(set_to_none=True)
        out = dict(d_loss=d_loss, gp=d_parts["gp"], g_loss=g_loss, g_cls=g_parts["g_cls"], rec=g_parts["rec"], cyc=g_parts["cyc"])
        return {k: v.detach() for k, v in out.items()}

    def forward(self, images, labels=None, mode: str = "tensor"):
        if labels is None:
            raise ValueError("MGANModel: forward needs labels (B, n_attr) to draw edit targets of the same shape")
        from .models.modular_gan import random_target

        target = random_target(self.gan, labels)
        fake = self.gan.generate(images, target)
        if mode == "predict":
            return [dict(l1=float((f - x).abs().mean())) for f, x in zip(fake, images)]
        return fake


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MGANOptimWrapperConstructor:
    """Two optimisers for :class:`MGANModel`: ``generator`` (E, T_i, R) and ``discriminator``.

    ``optim_wrapper=dict(constructor='MGANOptimWrapperConstructor',
    optimizer=dict(type='Adam', lr=1e-4, betas=(0.5, 0.999)))``; both use
    the same optimiser settings.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg=None) -> None:
        self.cfg = dict(optim_wrapper_cfg)

    def __call__(self, model: nn.Module) -> OptimWrapperDict:
        from mmengine.optim import OptimWrapper
        from mmengine.registry import OPTIMIZERS

        model = getattr(model, "module", model)
        gan = model.gan
        wrappers = {}
        for name, params in (("generator", list(gan.generator_parameters())),
                             ("discriminator", list(gan.discriminator.parameters()))):
            opt_cfg = dict(self.cfg["optimizer"], params=params)
            wrappers[name] = OptimWrapper(OPTIMIZERS.build(opt_cfg))
        return OptimWrapperDict(**wrappers)


@DATASETS.register_module()
class CelebADict(Dataset):
    """:class:`~arnn_plugins.models.modular_gan.CelebA` as dicts ``{'images', 'labels'}``."""

    def __init__(self, root: str, **kwargs) -> None:
        from .models.modular_gan import CelebA

        self.ds = CelebA(root, **kwargs)
        self.num_values = self.ds.num_values

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        img, lab = self.ds[i]
        return {"images": img, "labels": lab}


# --------------------------------------------------------------------------
# Progress and timing


@HOOKS.register_module()
class ProgressBarHook(Hook):
    """A tqdm bar over the training iterations (with ETA), and the time per step.

    Args:
        desc: the bar's label.
        enabled: draw the bar; step times are recorded either way.

    After training, :attr:`step_times` holds the seconds of every iteration
    (data loading included) and :meth:`seconds_per_step` their median,
    leaving out the first (warm-up) step.
    """

    priority = "BELOW_NORMAL"

    def __init__(self, desc: str = "train", enabled: bool = True) -> None:
        self.desc, self.enabled = desc, enabled
        self.step_times: List[float] = []
        self._bar = None
        self._t = None

    def before_train(self, runner) -> None:
        import time

        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=runner.max_iters, initial=runner.iter, desc=self.desc, unit="it",
                             dynamic_ncols=True, leave=True)
        self._t = time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        import time

        now = time.perf_counter()
        self.step_times.append(now - self._t)
        self._t = now
        if self._bar is not None:
            self._bar.update(1)
            if outputs and "loss" in outputs:
                loss = outputs["loss"]
                loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
                self._bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)

    def after_train(self, runner) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def seconds_per_step(self) -> float:
        """Median seconds per training iteration (first one left out when there are more)."""
        import statistics

        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        return statistics.median(times) if times else float("nan")


# --------------------------------------------------------------------------
# Config and runner helpers


def load_config(path: str, options: Optional[Dict] = None):
    """Read an mmengine config file and merge ``options`` (``{'a.b': value}``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file does not parse, or an option names no key of the
            config (a typo would otherwise be silently added).
    """
    from mmengine.config import Config

    if not osp.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        cfg = Config.fromfile(path)
    except Exception as e:  # mmengine raises SyntaxError, ImportError, ... for broken files
        raise ValueError(f"could not read config {path}: {type(e).__name__}: {e}") from e
    if options:
        top = {k: cfg[k] for k in cfg.keys()}
        for key in options:
            parent = top
            parts = key.split(".")
            for p in parts[:-1]:
                if isinstance(parent, (list, tuple)) and p.isdigit() and int(p) < len(parent):
                    parent = parent[int(p)]
                elif isinstance(parent, dict) and p in parent:
                    parent = parent[p]
                else:
                    raise ValueError(f"option {key!r}: the config has no key {p!r} there")
            if not isinstance(parent, dict):
                raise ValueError(f"option {key!r}: {'.'.join(parts[:-1])} is not a dict")
            # New keys are allowed inside model / dataset dicts (extra
            # keyword arguments) but not at the top level, where a typo
            # would silently do nothing.
            if len(parts) == 1 and parts[0] not in top:
                raise ValueError(f"option {key!r}: the config has no top-level key {key!r}")
        cfg.merge_from_dict(options)
    return cfg


def build_runner(cfg, work_dir: Optional[str] = None, device: Optional[str] = None, amp: bool = False,
                 resume: bool = False, load_from: Optional[str] = None):
    """An mmengine :class:`~mmengine.runner.Runner` from a loaded config.

    ``device`` ``"cpu"`` hides CUDA from the Runner (it picks CUDA whenever
    it sees one); ``amp`` switches the optimiser wrapper to mmengine's
    ``AmpOptimWrapper`` (float16 autocast; CUDA only).
    """
    from mmengine.runner import Runner

    cfg = cfg.copy()
    if work_dir is not None:
        cfg.work_dir = work_dir
    if not cfg.get("work_dir"):
        cfg.work_dir = osp.join("work_dirs", osp.splitext(osp.basename(cfg.filename or "config"))[0])
    if device is not None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but no CUDA device is available")
        if device == "cpu":
            # mmengine's get_device() looks at torch.cuda.is_available() only.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if amp:
        if device == "cpu" or not torch.cuda.is_available():
            raise ValueError("--amp needs a CUDA device (mmengine's AmpOptimWrapper runs on accelerators only)")
        ow = cfg.get("optim_wrapper")
        if ow is None or ow.get("constructor") is not None:
            raise ValueError("--amp: this config builds its own optimiser wrappers; set their type in the config")
        ow.type = "AmpOptimWrapper"
    if resume:
        cfg.resume = True
    if load_from is not None:
        cfg.load_from = load_from
    cfg.setdefault("custom_imports", dict(imports=["arnn_plugins.engine"], allow_failed_imports=False))
    return Runner.from_cfg(cfg)


@contextlib.contextmanager
def checkpoint_loading():
    """Let ``torch.load`` read mmengine checkpoints in this block.

    torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine
    0.10 checkpoints hold its message hub (logging buffers, numpy values),
    which that refuses; mmengine does not pass ``weights_only``. Only load
    checkpoints you trust (as with any pickle).
    """
    import warnings

    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
            yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
