"""``arnn-plugins export``: a config's model to ONNX or a torch.export program, checked against PyTorch.

The model's ``mode='tensor'`` forward is exported with a dynamic batch
dimension, on a batch of the config's test (or validation) data, then the
written file is loaded back (onnxruntime for ONNX, ``torch.export.load``
for ``.pt2``) and run on a batch of another size, and its outputs are
compared with the PyTorch model's.

ONNX: the scan is lowered to the reference recurrence
(:func:`arnn_plugins.ops.onnx_decompositions`), unrolled over the
``W + H - 1`` anti-diagonals, so an ONNX file has fixed map sizes (the
image size of the config) and works in any ONNX runtime. A ``.pt2``
program keeps the ``arnn_plugins`` operators (the C kernel on CPU), so
``import arnn_plugins`` must precede ``torch.export.load``; its batch and
map sizes may vary.
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..ops import onnx_decompositions

__all__ = ["FORMATS", "TensorForward", "export_model"]

FORMATS = ("onnx", "pt2")


class TensorForward(nn.Module):
    """``model(**{name: tensor}, mode='tensor')`` with positional tensors and a flat tuple of outputs.

    Args:
        model: an mmengine model of the package (``PANModel``, ``CifarResNet``, ``MCBModel``).
        names: the forward's arguments, in the order the tensors come.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *tensors: torch.Tensor):
        """Tensors in the order of ``names`` -> the outputs, nested lists flattened into one tuple."""
        out = self.model(**dict(zip(self.names, tensors)), mode="tensor")
        return tuple(_flatten(out))


def _flatten(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flatten(o)]


def _inputs(model: nn.Module, cfg, n: int) -> Dict[str, torch.Tensor]:
    """The first ``n`` items of the config's test (else validation) data, as the forward's required arguments."""
    from mmengine.registry import DATASETS

    loader = cfg.get("test_dataloader") or cfg.get("val_dataloader")
    if not loader:
        raise ValueError("export: the config has no test_dataloader or val_dataloader to take an example batch from")
    ds = DATASETS.build(loader["dataset"])
    if len(ds) < n:
        raise ValueError(f"export: the config's data set has {len(ds)} items; {n} are needed")
    items = [ds[i] for i in range(n)]
    params = inspect.signature(model.forward).parameters.values()
    names = [p.name for p in params if p.default is inspect.Parameter.empty and p.kind == p.POSITIONAL_OR_KEYWORD]
    if not names or any(name not in items[0] for name in names):
        raise ValueError(f"export: {type(model).__name__}.forward needs {names}, which the data items "
                         f"({sorted(items[0])}) do not all give")
    return {name: torch.stack([torch.as_tensor(it[name]) for it in items]) for name in names}


def export_model(cfg, checkpoint: Optional[str], fmt: str, out: str, batch: int = 2, atol: float = 1e-4) -> dict:
    """Export ``cfg.model`` (with ``checkpoint``'s weights) to ``out`` and check it against PyTorch.

    Args:
        cfg: a loaded config (:func:`~arnn_plugins.engine.runner.load_config`).
        checkpoint: weights to load; ``None`` keeps the initialisation.
        fmt: ``"onnx"`` or ``"pt2"``.
        out: the file to write.
        batch: the example batch; the check runs on ``batch + 1`` other items.
        atol: the largest absolute difference the check accepts.

    Returns:
        ``{"path", "format", "inputs", "max_abs_diff", "ok"}``.
    """
    from ..checks import check_choice
    from ..engine.runner import build_model

    check_choice("export", "format", fmt, FORMATS)
    model = build_model(cfg, checkpoint)
    if type(model).__name__ == "MGANModel":
        raise ValueError("export: a ModularGAN's forward draws random edit targets; export its generator "
                         "(model.gan.generate) with torch.export directly")
    example = _inputs(model, cfg, batch)
    wrapper = TensorForward(model, list(example)).eval()
    args = tuple(example.values())
    dim = torch.export.Dim("batch", min=1, max=4096)
    shapes = (tuple({0: dim} for _ in args),)  # one entry: the forward's *tensors
    check = tuple(_inputs(model, cfg, batch + 1).values())
    with torch.no_grad():
        want = wrapper(*check)
        if fmt == "pt2":
            torch.export.save(torch.export.export(wrapper, args, dynamic_shapes=shapes), out)
            got = torch.export.load(out).module()(*check)
        else:
            with onnx_decompositions():
                program = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=shapes,
                                            input_names=list(example))
            program.save(out)
            got = _run_onnx(out, check)
    diff = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want))
    return {"path": out, "format": fmt, "inputs": list(example), "max_abs_diff": diff, "ok": diff <= atol}


def _run_onnx(path: str, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("export: checking an ONNX file needs onnxruntime (pip install onnxruntime)") from e
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]
