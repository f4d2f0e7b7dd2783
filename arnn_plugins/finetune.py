"""Fine-tuning pretrained models that received ARNN layers.

After :func:`~arnn_plugins.swap_attention` or
:func:`~arnn_plugins.insert_attention`, a checkpoint of the original model
matches the new one except for ARNN's own parameters. The helpers here load
such checkpoints strictly in every other respect, give ARNN its own learning
rate, and freeze everything else.

ARNN parameters are those inside an :class:`~arnn_plugins.AttentionRNN`,
:class:`~arnn_plugins.BlockAttentionRNN` or :class:`~arnn_plugins.ARNNGate`
module (whatever wraps them; e.g. in a residual CBAM swap the original CBAM
conv stays a backbone parameter).

A replacement module that knowingly drops part of the original (e.g. the CBAM
spatial conv after a ``mode="replace"`` swap) lists the dropped checkpoint
key prefixes, relative to itself, in ``ignored_checkpoint_prefixes``;
:func:`load_pretrained` accepts and reports those keys.

Example::

    model = timm.create_model("resnet50", block_args=dict(attn_layer="cbam"), num_classes=100)
    arnn_plugins.swap_attention(model)
    load_pretrained(model, "resnet50_cbam.pth", exclude=("fc.",))
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-4, arnn_lr=1e-3, weight_decay=0.05))
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from .arnn import AttentionRNN, BlockAttentionRNN
from .gate import ARNNGate
from .serialization import (CheckpointError, checkpoint_safe_globals, key_differences, read_checkpoint,
                            safe_checkpoint_globals, summarise_keys)

__all__ = [
    "ARNN_MODULE_TYPES",
    "CheckpointError",
    "PretrainedLoad",
    "arnn_modules",
    "arnn_parameter_names",
    "classifier_head_names",
    "is_arnn_key",
    "checkpoint_safe_globals",
    "read_checkpoint",
    "read_state_dict",
    "safe_checkpoint_globals",
    "load_pretrained",
    "param_groups",
    "freeze_backbone",
    "unfreeze",
]

_logger = logging.getLogger(__name__)

#: Module types whose parameters and buffers count as ARNN's own.
ARNN_MODULE_TYPES: Tuple[type, ...] = (AttentionRNN, BlockAttentionRNN, ARNNGate)

# File names transformers' save_pretrained writes, in order of preference.
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Keys under which training scripts (timm, mmengine, plain loops) nest the weights.
_NESTED_KEYS = ("state_dict", "model", "module")


def arnn_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Outermost ARNN modules of ``model`` as ``(qualified name, module)``."""
    out: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, ARNN_MODULE_TYPES) and not any(_under(name, n) for n, _ in out):
            out.append((name, module))
    return out


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _arnn_prefixes(model: nn.Module) -> List[str]:
    return [name for name, _ in arnn_modules(model)]


def is_arnn_key(model: nn.Module, key: str) -> bool:
    """Whether state_dict/parameter name ``key`` of ``model`` belongs to an ARNN module."""
    return any(_under(key, p) for p in _arnn_prefixes(model))


def arnn_parameter_names(model: nn.Module) -> List[str]:
    """Names of ``model``'s ARNN parameters (see module docstring)."""
    prefixes = _arnn_prefixes(model)
    return [n for n, _ in model.named_parameters() if any(_under(n, p) for p in prefixes)]


def read_state_dict(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a state_dict, a checkpoint dict, a file or a directory.

    Files: ``.safetensors`` or anything :func:`read_checkpoint` reads (plain
    state_dicts, timm and mmengine training checkpoints; never code).
    Directories: what transformers' ``save_pretrained`` writes
    (``model.safetensors`` or ``pytorch_model.bin``). Checkpoint dicts that nest
    the weights under ``state_dict`` / ``model`` / ``module`` are unwrapped, and a
    ``module.`` prefix (DataParallel) on every key is dropped.
    """
    if isinstance(source, Mapping):
        sd = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            found = [os.path.join(path, f) for f in _HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
            if not found:
                raise ValueError(
                    f"read_state_dict: directory {path!r} has none of {_HF_WEIGHT_FILES} "
                    "(sharded checkpoints: load them with the host library)"
                )
            path = found[0]
        if not os.path.isfile(path):
            raise ValueError(f"read_state_dict: no such file {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = read_checkpoint(path)
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state_dict or checkpoint dict")
    else:
        raise TypeError(
            f"read_state_dict: expected a state_dict mapping or a path, got {type(source).__name__}"
        )
    for key in _NESTED_KEYS:
        if key in sd and isinstance(sd[key], Mapping):
            sd = dict(sd[key])
            break
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)][:5]
        raise ValueError(f"read_state_dict: not a state_dict of tensors (non-tensor entries: {bad})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


@dataclass
class PretrainedLoad:
    """What :func:`load_pretrained` did.

    Attributes:
        loaded: checkpoint keys copied into the model.
        missing_arnn: model keys (all ARNN's own) the checkpoint did not have;
            they keep their initialisation.
        excluded: checkpoint keys dropped on request (``exclude``) and the
            model keys left at their initialisation because of it.
        ignored: checkpoint keys a replacement module knowingly drops (e.g.
            the CBAM spatial conv after a ``mode="replace"`` swap).
    """

    loaded: List[str] = field(default_factory=list)
    missing_arnn: List[str] = field(default_factory=list)
    excluded: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"loaded {len(self.loaded)} tensors; {len(self.missing_arnn)} ARNN keys left at their initialisation"
        if self.excluded:
            s += f"; excluded {len(self.excluded)}"
        if self.ignored:
            s += f"; ignored {len(self.ignored)} keys of replaced layers"
        return s


def _ignored_prefixes(model: nn.Module) -> List[str]:
    """Checkpoint key prefixes that modules drop on load (``ignored_checkpoint_prefixes``)."""
    out = []
    for name, module in model.named_modules():
        for p in getattr(module, "ignored_checkpoint_prefixes", ()) or ():
            out.append(f"{name}.{p}" if name else p)
    return out


def load_pretrained(
    model: nn.Module,
    state_dict_or_path: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    exclude: Sequence[str] = (),
) -> PretrainedLoad:
    """Load a checkpoint of the original model into its ARNN version.

    Strict except for ARNN's own keys, which may be missing (they keep their
    initialisation: a residual swap or an inserted gate then computes exactly
    the original model's function). Everything is checked before anything is
    copied, so on error the model is unchanged.

    Args:
        model: the model after :func:`~arnn_plugins.swap_attention` /
            :func:`~arnn_plugins.insert_attention` (or built with the ARNN
            layers, e.g. ``attn_layer='cbam_arnn'``).
        state_dict_or_path: a state_dict or checkpoint dict, a weights file, or
            a transformers ``save_pretrained`` directory (see
            :func:`read_state_dict`).
        exclude: key prefixes to drop from the checkpoint and to allow missing
            in the model (e.g. ``("fc.",)`` for a new classifier head).

    Returns:
        A :class:`PretrainedLoad` report (also logged at INFO level).

    Raises:
        ValueError: a non-ARNN key is missing, the checkpoint has keys the
        model does not, or a tensor's shape differs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_pretrained: expected an nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    sd = read_state_dict(state_dict_or_path)
    own = model.state_dict()
    arnn_prefixes = _arnn_prefixes(model)
    ignore_prefixes = _ignored_prefixes(model)

    def excluded(k: str) -> bool:
        return any(k.startswith(p) for p in exclude)

    report = PretrainedLoad()
    report.excluded = sorted({k for k in sd if excluded(k)} | {k for k in own if excluded(k)})
    report.ignored = sorted(
        k for k in sd if not excluded(k) and k not in own and any(k.startswith(p) for p in ignore_prefixes)
    )
    dropped = set(report.ignored)
    ckpt = {k: v for k, v in sd.items() if not excluded(k) and k not in dropped}

    missing, unexpected, mismatched = key_differences(own, ckpt)
    missing = [k for k in missing if not excluded(k)]
    report.missing_arnn = [k for k in missing if any(_under(k, p) for p in arnn_prefixes)]
    other_missing = [k for k in missing if k not in report.missing_arnn]
    problems = []
    if other_missing:
        problems.append(f"missing keys that are not ARNN's: {summarise_keys(sorted(other_missing))}")
    if unexpected:
        problems.append(f"unexpected keys: {summarise_keys(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches: {summarise_keys(sorted(mismatched), 4)}")
    if problems:
        raise ValueError(
            f"load_pretrained: checkpoint does not fit {type(model).__name__} "
            f"(only ARNN keys may be missing; pass exclude=(...) for layers you re-initialise): "
            + "; ".join(problems)
        )

    result = model.load_state_dict(ckpt, strict=False)
    # The pre-check above mirrors load_state_dict; if they disagree, say so loudly.
    leftover = [k for k in result.missing_keys if k not in report.missing_arnn and not excluded(k)]
    if leftover or result.unexpected_keys:
        raise RuntimeError(
            f"load_pretrained: load_state_dict reported missing {leftover} / unexpected "
            f"{result.unexpected_keys} that the key check did not predict"
        )
    report.loaded = sorted(ckpt)
    _logger.info("load_pretrained(%s): %s", type(model).__name__, report)
    return report


def _is_no_decay(name: str, param: torch.Tensor) -> bool:
    # As timm's param_groups_weight_decay: biases and norm scales (1-D) get no decay.
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(
    model: nn.Module,
    lr: float,
    arnn_lr: Optional[float] = None,
    weight_decay: float = 0.0,
    no_decay_1d: bool = True,
) -> List[dict]:
    """Optimizer parameter groups giving ARNN parameters their own learning rate.

    Only trainable parameters (``requires_grad``) are included; each appears
    in exactly one group. Groups carry a ``name``
    (``"backbone"``, ``"backbone_no_decay"``, ``"arnn"``, ``"arnn_no_decay"``);
    empty groups are left out.

    Args:
        model: any model with ARNN layers.
        lr: learning rate of every non-ARNN parameter.
        arnn_lr: learning rate of ARNN parameters (default: ``lr``).
        weight_decay: decay of weight matrices / conv kernels.
        no_decay_1d: give 1-D parameters (biases, norm scales) no decay.

    Returns:
        A list of dicts to pass to any ``torch.optim`` optimizer.
    """
    if arnn_lr is None:
        arnn_lr = lr
    for name, v in (("lr", lr), ("arnn_lr", arnn_lr), ("weight_decay", weight_decay)):
        if not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"param_groups: {name} must be a number >= 0, got {v!r}")
    arnn_names: Set[str] = set(arnn_parameter_names(model))
    groups: Dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        base = "arnn" if name in arnn_names else "backbone"
        no_decay = no_decay_1d and _is_no_decay(name, p)
        key = base + ("_no_decay" if no_decay else "")
        if key not in groups:
            groups[key] = dict(
                name=key, params=[], lr=arnn_lr if base == "arnn" else lr,
                weight_decay=0.0 if no_decay else weight_decay,
            )
        groups[key]["params"].append(p)
    order = ("backbone", "backbone_no_decay", "arnn", "arnn_no_decay")
    return [groups[k] for k in order if k in groups]


def classifier_head_names(model: nn.Module) -> List[str]:
    """Names of the parameters of ``model``'s classifier head; ``[]`` if it has none that is known.

    The head is what timm's ``get_classifier()`` returns, else an attribute
    ``fc`` / ``classifier`` / ``head`` (torchvision, transformers).
    """
    head = None
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 -- a model whose get_classifier does not apply here
            head = None
    if not isinstance(head, nn.Module):
        for attr in ("fc", "classifier", "head"):
            if isinstance(getattr(model, attr, None), nn.Module):
                head = getattr(model, attr)
                break
    if not isinstance(head, nn.Module):
        return []
    ids = {id(p) for p in head.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def freeze_backbone(model: nn.Module, train_head: bool = True) -> List[str]:
    """Make only the ARNN parameters (and, by default, the classifier head) trainable; returns their names.

    Args:
        model: a model with ARNN layers in it (after ``swap_attention`` /
            ``insert_attention``).
        train_head: keep the classifier head trainable too
            (:func:`classifier_head_names`): a new head for a new task must
            learn. ``False`` trains ARNN alone.

    Norm layers' running statistics still update in ``train()`` mode; put
    them in eval mode too if they should stay fixed.

    Raises:
        ValueError: ``model`` has no ARNN parameters (nothing would train).
    """
    arnn_names = set(arnn_parameter_names(model))
    if not arnn_names:
        raise ValueError(
            f"freeze_backbone: {type(model).__name__} has no ARNN parameters "
            "(run arnn_plugins.swap_attention or insert_attention first)"
        )
    trainable = arnn_names | (set(classifier_head_names(model)) if train_head else set())
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return sorted(trainable)


def unfreeze(model: nn.Module) -> None:
    """Make every parameter of ``model`` trainable again."""
    for p in model.parameters():
        p.requires_grad_(True)
