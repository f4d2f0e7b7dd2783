"""Where a train step's CPU time goes (``arnn-plugins bench --profile``).

One ``torch.profiler`` pass over one train step (forward, backward,
optimiser step) of timm ResNet18+CBAM and of the same model with CBAM's
spatial branch replaced by AttentionRNN, after a warm-up step, with a fixed
thread count (of three profiled steps, the one with the least total time:
on a shared machine the others carry other processes' load). Printed: each model's self CPU total, and the operators by
self CPU time side by side, so that a change to the scan or to what surrounds
it is measured the same way each time. Self CPU is the time spent in an
operator minus its children: the totals add up to the step.

Then :func:`attention_parts`: each spatial-attention module of both models
timed alone (forward + backward at its input shape in the step), and the
ARNN module split into its context conv, its scan and the rest, so the
difference between the two models is laid out by part.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["profile_step", "profile_models", "format_profile", "attention_parts", "format_parts", "run_profile"]


@contextlib.contextmanager
def _threads(n: Optional[int]):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def profile_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, warmup: int = 1,
                 steps: int = 3) -> Dict[str, Tuple[int, float]]:
    """Self CPU ms and call count per operator over one SGD train step.

    Args:
        model: a classifier, ``(B, 3, H, W) -> (B, classes)``; put in train mode.
        x: ``(B, 3, H, W)`` input; y: ``(B,)`` class indices.
        warmup: train steps run before the profiled ones (first-use costs,
            kernel builds, allocator growth).
        steps: steps profiled one by one; the one with the smallest total
            is returned, the one other processes on the machine disturbed
            least.

    Returns:
        ``{name: (calls, self_cpu_ms)}`` for every operator and autograd
        node seen; ``"total"`` maps to ``(0, sum of self CPU ms)``.
    """
    from torch.profiler import ProfilerActivity, profile

    from .bench import train_step

    model.train()
    step = train_step(model, x, y)

    for _ in range(warmup):
        step()
    best = None
    for _ in range(max(1, steps)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        out = {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()}
        out["total"] = (0, sum(ms for _, ms in out.values()))
        if best is None or out["total"][1] < best["total"][1]:
            best = out
    return best


def _models(backend: str, pooled: bool = False) -> Dict[str, torch.nn.Module]:
    from .bench import resnet18_models

    models = resnet18_models(backend)
    names = ("resnet18+cbam", "resnet18+cbam+arnn") + (("resnet18+cbam+arnn pooled",) if pooled else ())
    return {name: models[name] for name in names}


def profile_models(batch: int = 16, size: int = 128, threads: Optional[int] = 2, backend: str = "auto",
                   progress: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, Tuple[int, float]]]:
    """:func:`profile_step` of timm ResNet18+CBAM and ResNet18+CBAM+ARNN on CPU.

    Input ``(batch, 3, size, size)``, 100 classes, ``threads`` torch threads
    (``None``: torch's setting). Returns ``{model name: profile_step result}``.
    """
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 100, (batch,))
    res = {}
    with _threads(threads):
        for name, model in _models(backend).items():
            if progress:
                progress(f"profile {name}")
            res[name] = profile_step(model, x, y)
    return res


def format_profile(res: Dict[str, Dict[str, Tuple[int, float]]], top: int = 25, title: str = "") -> str:
    """Markdown: self CPU totals per model, then the ``top`` operators by the last model's self CPU."""
    names = list(res)
    last = res[names[-1]]
    lines = [f"**{title}**" if title else "", "", "| model | self CPU total ms |", "|---|---:|"]
    lines += [f"| {n} | {res[n]['total'][1]:.1f} |" for n in names]
    if len(names) > 1:
        diff = res[names[-1]]["total"][1] - res[names[0]]["total"][1]
        lines.append(f"| difference | {diff:+.1f} |")
    lines += ["", "| operator | " + " | ".join(f"{n} calls | {n} self ms" for n in names) + " | difference ms |",
              "|---|" + "---:|---:|" * len(names) + "---:|"]
    ops = sorted((k for k in last if k != "total"), key=lambda k: -last[k][1])[:top]
    for op in ops:
        cells = []
        for n in names:
            calls, ms = res[n].get(op, (0, 0.0))
            cells += [str(calls), f"{ms:.1f}"]
        diff = last[op][1] - res[names[0]].get(op, (0, 0.0))[1]
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {diff:+.1f} |")
    return "\n".join(lines).lstrip("\n")


def _spatial_modules(model: torch.nn.Module, x: torch.Tensor) -> List[Tuple[str, torch.nn.Module, tuple]]:
    """``(name, module, input shape)`` of each CBAM spatial branch (``*.se.spatial``), in forward order."""
    found, hooks = [], []
    for name, mod in model.named_modules():
        if name.endswith("se.spatial"):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: found.append((name, m, tuple(args[0].shape)))))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
        model.train()
    return found


def _fwd_bwd(fn: Callable[[], torch.Tensor], inputs: List[torch.Tensor]) -> Callable[[], None]:
    # autograd.grad, not backward: nothing accumulates into .grad between repeats.
    def run():
        out = fn()
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    return run


def attention_parts(batch: int = 16, size: int = 128, threads: Optional[int] = 2, backend: str = "auto",
                    repeats: int = 20) -> List[Dict[str, object]]:
    """Forward + backward ms of each spatial-attention module of the two profiled models, by part.

    For each ``*.se.spatial`` module, at the input shape ``(B, C, h, w)`` it
    sees in the train step: CBAM's branch, ARNN's branch, and of the ARNN
    branch its context conv and its scan (:func:`~arnn_plugins.ops.diagonal_lstm`
    on gate inputs of the layer's layout); ``rest`` is the branch minus the
    two (input projection, heads, combiner, gate, layout work); ``pooled``
    is the branch of the model whose ARNN reads CBAM's channel-pooled map
    (``reads="pooled"``). Gradients are taken for the input and the
    parameters; medians of ``repeats`` repeats taken round-robin over all
    cases.

    Returns:
        one dict per module: ``name``, ``shape`` and ms for ``cbam``,
        ``arnn``, ``context``, ``scan``, ``rest``, ``pooled``.
    """
    from ..ops import diagonal_lstm

    torch.manual_seed(0)
    img = torch.randn(batch, 3, size, size)
    models = _models(backend, pooled=True)
    cbam = _spatial_modules(models["resnet18+cbam"], img)
    arnn = _spatial_modules(models["resnet18+cbam+arnn"], img)
    pooled = _spatial_modules(models["resnet18+cbam+arnn pooled"], img)
    cases: Dict[Tuple[int, str], Callable[[], None]] = {}
    rows = []
    with _threads(threads):
        for i, ((name, cmod, shape), (_, amod, _), (_, pmod, _)) in enumerate(zip(cbam, arnn, pooled)):
            x = torch.randn(shape, requires_grad=True)
            layer = amod.arnn
            t = layer.hidden_channels
            b, _, h, w = shape
            gx = torch.randn(2, b, h, w, 4 * t).permute(1, 0, 4, 2, 3).requires_grad_()
            cases[i, "cbam"] = _fwd_bwd(lambda m=cmod, x=x: m(x), [x, *cmod.parameters()])
            cases[i, "arnn"] = _fwd_bwd(lambda m=amod, x=x: m(x), [x, *amod.parameters()])
            cases[i, "pooled"] = _fwd_bwd(lambda m=pmod, x=x: m(x), [x, *pmod.parameters()])
            cases[i, "context"] = _fwd_bwd(lambda m=layer.context, x=x: m(x), [x, *layer.context.parameters()])
            cases[i, "scan"] = _fwd_bwd(lambda gx=gx, layer=layer: diagonal_lstm(gx, layer.weight_hh, layer.backend),
                                        [gx, layer.weight_hh])
            rows.append({"name": name, "shape": shape})
        for fn in cases.values():  # warm-up
            fn()
        times: Dict[Tuple[int, str], List[float]] = {k: [] for k in cases}
        for _ in range(max(1, repeats)):
            for k, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    for (i, part), ts in times.items():
        rows[i][part] = statistics.median(ts)
    for r in rows:
        r["rest"] = r["arnn"] - r["context"] - r["scan"]
    return rows


def format_parts(rows: List[Dict[str, object]], step_ms: Optional[float] = None, title: str = "") -> str:
    """Markdown table of :func:`attention_parts`, with a total row (and shares of ``step_ms``)."""
    parts = ("cbam", "arnn", "context", "scan", "rest", "pooled")
    lines = [f"**{title}**" if title else "", "",
             "| module | input | CBAM spatial ms | ARNN spatial ms | context conv ms | scan ms | rest ms "
             "| ARNN on the pooled map ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {'x'.join(map(str, r['shape']))} | "
                     + " | ".join(f"{r[p]:.2f}" for p in parts) + " |")
    total = {p: sum(r[p] for r in rows) for p in parts}
    lines.append("| total | | " + " | ".join(f"{total[p]:.1f}" for p in parts) + " |")
    if step_ms:
        extra = total["arnn"] - total["cbam"]
        lines += ["", f"ARNN's branches take {extra:.1f} ms more than CBAM's, {100 * extra / step_ms:.1f}% of the "
                      f"+CBAM step's self CPU ({step_ms:.1f} ms); of the ARNN branches, the context convs alone are "
                      f"{100 * total['context'] / step_ms:.1f}% of it, the scans {100 * total['scan'] / step_ms:.1f}% "
                      f"and the rest beyond what CBAM's whole branch costs {100 * (total['rest'] - total['cbam']) / step_ms:.1f}%. "
                      f"ARNN reading the pooled map takes {total['pooled'] - total['cbam']:.1f} ms more than CBAM's "
                      f"branches, {100 * (total['pooled'] - total['cbam']) / step_ms:.1f}% of that step."]
    return "\n".join(lines).lstrip("\n")


def run_profile(batch: int = 16, size: int = 128, threads: Optional[int] = 2, backend: str = "auto",
                top: int = 25, progress: Optional[Callable[[str], None]] = None) -> str:
    """:func:`profile_models` formatted by :func:`format_profile`."""
    res = profile_models(batch, size, threads, backend, progress)
    nthreads = threads or torch.get_num_threads()
    title = (f"torch.profiler, one timm ResNet18 train step, batch {batch}, {size}x{size}, cpu, "
             f"{nthreads} threads, backend {backend}")
    if progress:
        progress("attention modules by part")
    parts = attention_parts(batch, size, threads, backend)
    ptitle = (f"The spatial-attention modules alone, forward + backward, {nthreads} threads "
              f"(medians of 20 interleaved repeats)")
    return format_profile(res, top, title) + "\n\n" + format_parts(parts, res["resnet18+cbam"]["total"][1], ptitle)
