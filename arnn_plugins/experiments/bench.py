"""Speed and memory benchmarks (``arnn-plugins bench``).

Two tables, each measured within one run so that ratios are comparable on a
noisy machine:

1. the AttentionRNN layer, forward and forward+backward, for each backend,
   including a "naive" peer written the way public Diagonal BiLSTM code
   usually is (per-row skew loops, ``nn.Conv1d`` for the 2x1 kernel,
   autograd through every step);
2. a timm ResNet18+CBAM train step with CBAM's spatial branch replaced by
   ARNN (reading the features, and reading CBAM's channel-pooled map),
   against the same model with CBAM and without attention.

:func:`bench_scan` times the bare scan (:func:`arnn_plugins.ops.diagonal_lstm`)
the same way, without the layer's convolutions around it.

The naive peer is handed to the layer as a callable ``backend``, never
registered: running a benchmark leaves :func:`arnn_plugins.ops.available_backends`
as it was. Each row also records how far the backend's forward output is
from the reference backend's on the same input and weights.

Times are medians over repeats. Memory, measured once per case: what the
forward leaves allocated for the backward ("held") and the peak during the
backward, both from the level before the forward (CUDA allocator counters;
on CPU the profiler's allocation events).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..arnn import AttentionRNN
from ..ops import available_backends, diagonal_lstm
from .memory import memory_mb

__all__ = ["naive_scan", "memory_mb", "bench_layer", "bench_scan", "bench_resnet", "format_table", "run"]


def naive_scan(gx: torch.Tensor, weight_hh: torch.Tensor) -> torch.Tensor:
    """The diagonal LSTM as commonly written in public code (a slow peer).

    Per-row Python loops to skew and unskew, ``F.conv1d`` with a 2x1 kernel
    over the previous column, autograd through every step, no masking of
    padding cells (they stay zero anyway: a zero gate input with zero
    neighbours gives a zero state). Same signature as the registered
    backends, ``(B, D, 4t, H, W), (D, 4t, t, 2) -> (B, D, t, H, W)``; the
    benchmark passes it as a callable ``backend``.
    """
    b, d, g4, h, w = gx.shape
    t = g4 // 4
    outs_dir = []
    for di in range(d):
        x = gx[:, di]
        skewed = x.new_zeros(b, g4, h, w + h - 1)
        for i in range(h):
            skewed[:, :, i, i : i + w] = x[:, :, i]
        kernel = weight_hh[di]  # conv1d taps over [row i - 1, row i]
        hid = x.new_zeros(b, t, h)
        cell = x.new_zeros(b, t, h)
        cols = []
        for k in range(w + h - 1):
            rec = F.conv1d(F.pad(hid, (1, 0)), kernel)
            gates = skewed[:, :, :, k] + rec
            o, f, i_, g = gates.chunk(4, dim=1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i_) * torch.tanh(g)
            hid = torch.sigmoid(o) * torch.tanh(cell)
            cols.append(hid)
        hs = torch.stack(cols, dim=-1)
        out = x.new_zeros(b, t, h, w)
        for i in range(h):
            out[:, :, i] = hs[:, :, i, i : i + w]
        outs_dir.append(out)
    return torch.stack(outs_dir, dim=1)


@dataclass
class Row:
    """One benchmark line."""

    name: str
    fwd_ms: float
    fwdbwd_ms: float
    held_mb: float  # allocated when the forward returns (kept for backward + output)
    peak_mb: float  # peak during the backward, from the same level
    ratio: Optional[float] = None
    vs_naive: Optional[float] = None
    max_err: Optional[float] = None  # max |forward output - reference backend's|, same input and weights
    compile_s: Optional[float] = None  # first train step and forward of a compiled model, compilation included


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _interleaved_medians(cases: Dict[str, Callable[[], object]], device: torch.device, repeats: int,
                         progress: Optional[Callable[[str], None]] = None,
                         stat: Callable[[List[float]], float] = statistics.median) -> Dict[str, float]:
    """Median ms per case (or ``stat`` of the repeats), the repeats taken round-robin over the cases.

    On a shared machine the load drifts; interleaving makes every case see
    the same drift, so ratios between cases stay meaningful.
    """
    for name, fn in cases.items():  # warm-up (allocations, kernel compilation)
        if progress:
            progress(f"warm-up {name}")
        fn()
    times: Dict[str, List[float]] = {name: [] for name in cases}
    for r in range(repeats):
        for name, fn in cases.items():
            if progress:
                progress(f"{name} ({r + 1}/{repeats})")
            times[name].append(_time_ms(fn, device))
    return {name: stat(ts) for name, ts in times.items()}


# Peers that are not backends: passed to the layer or the scan as callables,
# so a benchmark never changes the global registry.
_PEERS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"naive": naive_scan}


def _default_backends(dev: torch.device) -> List[str]:
    """The naive peer, reference and fused, plus triton on CUDA when it is registered."""
    triton = ["triton"] if dev.type == "cuda" and "triton" in available_backends() else []
    return ["naive", "reference", "fused"] + triton


def _with_ratios(rows: List[Row]) -> List[Row]:
    """Fill each row's ratio ``reference / row`` and ``naive / row`` (forward+backward), when measured."""
    ref = next((r for r in rows if r.name == "reference"), None)
    naive = next((r for r in rows if r.name == "naive"), None)
    for r in rows:
        r.ratio = ref.fwdbwd_ms / r.fwdbwd_ms if ref else None
        r.vs_naive = naive.fwdbwd_ms / r.fwdbwd_ms if naive else None
    return rows


def bench_layer(
    batch: int = 32,
    channels: int = 64,
    size: int = 32,
    hidden: int = 16,
    device: str = "cpu",
    backends: Optional[List[str]] = None,
    repeats: int = 3,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Row]:
    """Time AttentionRNN forward and forward+backward per backend.

    Input ``(batch, channels, size, size)``. ``backends`` are registered
    names or ``"naive"`` (:func:`naive_scan`); by default the naive peer, the
    reference, fused and, on CUDA, triton. Returns rows named by backend
    with the ratio ``reference / backend`` of the forward+backward time (how
    many times faster than the reference) and ``max_err`` against the
    reference backend's output.
    """
    dev = torch.device(device)
    if backends is None:
        backends = _default_backends(dev)
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, device=dev)
    xg = x.clone().requires_grad_(True)
    base = AttentionRNN(channels, hidden_channels=hidden, backend="reference").to(dev)
    with torch.no_grad():
        want = base(x)
    fwd, fwdbwd, mem, err = {}, {}, {}, {}
    for name in backends:
        m = AttentionRNN(channels, hidden_channels=hidden, backend=_PEERS.get(name, name)).to(dev)
        m.load_state_dict(base.state_dict())

        def f(m=m):
            with torch.no_grad():
                return m(x)

        def fb(m=m):
            m.zero_grad(set_to_none=True)
            m(xg).sum().backward()

        fwd[f"{name} fwd"], fwdbwd[f"{name} fwd+bwd"] = f, fb
        err[name] = (f().float() - want.float()).abs().max().item()
        mem[name] = memory_mb(lambda m=m: m(xg), dev)
        m.zero_grad(set_to_none=True)
        xg.grad = None
    ms = _interleaved_medians({**fwd, **fwdbwd}, dev, repeats, progress)
    return _with_ratios([Row(n, ms[f"{n} fwd"], ms[f"{n} fwd+bwd"], *mem[n], max_err=err[n]) for n in backends])


def bench_scan(
    batch: Optional[int] = None,
    size: Optional[int] = None,
    hidden: int = 16,
    device: str = "cpu",
    backends: Optional[List[str]] = None,
    repeats: int = 3,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Row]:
    """Time the bare scan, :func:`~arnn_plugins.ops.diagonal_lstm`, per backend.

    ``gx`` is ``(batch, 2, 4 * hidden, size, size)`` in the layout the
    layer's input projection writes (gates innermost), ``weight_hh``
    ``(2, 4 * hidden, hidden, 2)``; defaults: batch 64 at 56x56 on CUDA, 8 at
    32x32 on CPU. ``backends`` as in :func:`bench_layer`. Rows as there:
    forward (no grad) and forward+backward milliseconds, memory, the ratio
    ``reference / backend`` and ``max_err`` against the reference scan.
    """
    dev = torch.device(device)
    batch = batch or (64 if dev.type == "cuda" else 8)
    size = size or (56 if dev.type == "cuda" else 32)
    if backends is None:
        backends = _default_backends(dev)
    torch.manual_seed(0)
    t = hidden
    leaf = torch.randn(2, batch, size, size, 4 * t, device=dev).requires_grad_(True)
    gx = leaf.permute(1, 0, 4, 2, 3)  # (B, 2, 4t, H, W), gates innermost
    weight = (torch.randn(2, 4 * t, t, 2, device=dev) * t ** -0.5).requires_grad_(True)
    with torch.no_grad():
        want = diagonal_lstm(gx, weight, "reference")
    fwd, fwdbwd, mem, err = {}, {}, {}, {}
    for name in backends:
        backend = _PEERS.get(name, name)

        def f(backend=backend):
            with torch.no_grad():
                return diagonal_lstm(gx, weight, backend)

        def fb(backend=backend):
            leaf.grad = weight.grad = None
            diagonal_lstm(gx, weight, backend).sum().backward()

        fwd[f"{name} fwd"], fwdbwd[f"{name} fwd+bwd"] = f, fb
        err[name] = (f() - want).abs().max().item()
        mem[name] = memory_mb(lambda backend=backend: diagonal_lstm(gx, weight, backend), dev)
        leaf.grad = weight.grad = None
    ms = _interleaved_medians({**fwd, **fwdbwd}, dev, repeats, progress)
    return _with_ratios([Row(n, ms[f"{n} fwd"], ms[f"{n} fwd+bwd"], *mem[n], max_err=err[n]) for n in backends])



def resnet18_models(backend: str = "auto") -> Dict[str, torch.nn.Module]:
    """The benchmarked timm ResNet18s (100 classes): plain, +CBAM, and +CBAM with an ARNN spatial branch.

    The ARNN models are the CBAM one with ``swap_attention(mode="replace")``:
    ``resnet18+cbam+arnn`` with ARNN reading the features (the default),
    ``resnet18+cbam+arnn pooled`` with ARNN reading CBAM's channel-pooled map
    (``reads="pooled"``). ``backend`` goes to their ARNN layers. Built from
    ``torch.manual_seed(0)``.
    """
    import timm

    from ..registry import swap_attention

    torch.manual_seed(0)
    models = {
        "resnet18": timm.create_model("resnet18", num_classes=100),
        "resnet18+cbam": timm.create_model("resnet18", num_classes=100, block_args=dict(attn_layer="cbam")),
    }
    arnn = timm.create_model("resnet18", num_classes=100, block_args=dict(attn_layer="cbam"))
    swap_attention(arnn, mode="replace", backend=backend)
    models["resnet18+cbam+arnn"] = arnn
    pooled = timm.create_model("resnet18", num_classes=100, block_args=dict(attn_layer="cbam"))
    swap_attention(pooled, mode="replace", reads="pooled", backend=backend)
    models["resnet18+cbam+arnn pooled"] = pooled
    return models


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = False,
               compile: bool = False) -> Callable[[], None]:
    """A call that runs one train step of ``model`` on images ``x`` ``(B, 3, H, W)`` and labels ``y`` ``(B,)``.

    Cross-entropy, SGD (lr 0.01, momentum 0.9); ``amp``: autocast (bfloat16
    on CPU); ``compile``: the model through ``torch.compile``, which the
    returned call keeps as ``.model``.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run = torch.compile(model) if compile else model
    dev = x.device

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, enabled=amp, dtype=torch.bfloat16 if dev.type == "cpu" else torch.float16):
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        opt.step()

    step.model = run
    return step


def bench_resnet(
    batch: int = 16,
    size: int = 128,
    device: str = "cpu",
    amp: bool = False,
    repeats: int = 3,
    backend: str = "auto",
    progress: Optional[Callable[[str], None]] = None,
    compile: bool = False,
) -> List[Row]:
    """Train-step time of timm ResNet18, +CBAM, and +CBAM with ARNN spatial branch.

    The ratio column is each model's step time over the CBAM model's. With
    ``compile`` every model runs through ``torch.compile`` (inductor); the
    time of its first training step and forward, compilation included, is
    reported apart (``compile_s``) and left out of the medians.
    """
    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 100, (batch,), device=dev)
    models = resnet18_models(backend)
    fwd, steps, mem, compile_s = {}, {}, {}, {}
    for name, model in models.items():
        model.to(dev).train()
        step = train_step(model, x, y, amp=amp, compile=compile)
        model = step.model

        def f(model=model):
            with torch.no_grad(), torch.autocast(dev.type, enabled=amp):
                model(x)

        fwd[f"{name} fwd"], steps[f"{name} step"] = f, step
        if compile:
            if progress:
                progress(f"compile {name}")
            compile_s[name] = (_time_ms(step, dev) + _time_ms(f, dev)) / 1e3
        mem[name] = memory_mb(lambda model=model: F.cross_entropy(model(x), y), dev)
        model.zero_grad(set_to_none=True)
    ms = _interleaved_medians({**fwd, **steps}, dev, repeats, progress)
    rows = [Row(n, ms[f"{n} fwd"], ms[f"{n} step"], *mem[n], compile_s=compile_s.get(n)) for n in models]
    cbam = rows[1].fwdbwd_ms
    for r in rows:
        r.ratio = r.fwdbwd_ms / cbam
    return rows


def format_table(title: str, rows: List[Row], ratio_label: str, step_label: str = "fwd+bwd ms") -> str:
    """Markdown table of benchmark rows (a speed-up vs naive column when measured)."""
    naive = any(r.vs_naive is not None for r in rows)
    compiled = any(r.compile_s is not None for r in rows)
    head = (f"| case | fwd ms | {step_label} | {ratio_label} |" + (" speed-up vs naive |" if naive else "")
            + " held MB | backward peak MB | peak / held |" + (" compile s |" if compiled else ""))
    lines = [f"**{title}**", "", head, "|---|---:|---:|---:|" + ("---:|" if naive else "") + "---:|---:|---:|"
             + ("---:|" if compiled else "")]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        line = f"| {r.name} | {r.fwd_ms:.1f} | {r.fwdbwd_ms:.1f} | {ratio} |"
        if naive:
            line += f" {r.vs_naive:.2f}x |"
        rel = f"{r.peak_mb / r.held_mb:.2f}x" if r.held_mb > 0 else ""
        line += f" {r.held_mb:.1f} | {r.peak_mb:.1f} | {rel} |"
        if compiled:
            line += f" {r.compile_s:.1f} |"
        lines.append(line)
    return "\n".join(lines)


MIN_TRUSTED_REPEATS = 3


def timing_warning(rows: List[Row], repeats: int) -> str:
    """A warning to print under a table whose figures cannot be trusted, else ``""``.

    Untrusted: a forward timed slower than its own forward+backward (the
    load changed during the run), or medians of fewer than
    :data:`MIN_TRUSTED_REPEATS` repeats.
    """
    notes = []
    odd = [r.name for r in rows if r.fwd_ms > r.fwdbwd_ms]
    if odd:
        notes.append(f"{', '.join(odd)}: the forward timed slower than forward+backward, so the machine's load "
                     "changed during the run")
    if repeats < MIN_TRUSTED_REPEATS:
        notes.append(f"medians of {repeats} repeat(s)")
    if not notes:
        return ""
    return f"\n\nwarning: not to be trusted ({'; '.join(notes)}): rerun with --repeats {max(5, MIN_TRUSTED_REPEATS)}"


def run(device: str = "cpu", repeats: int = 3, layer: bool = True, resnet: bool = True,
        batch: Optional[int] = None, amp: bool = False, size: Optional[int] = None, scan: bool = False,
        compile: bool = False) -> str:
    """Run the benchmarks with a progress bar; returns the markdown tables.

    ``scan=True`` adds a table of the bare scan (:func:`bench_scan`) first;
    ``compile=True`` adds the ResNet18 table for ``torch.compile`` d models.
    """
    from tqdm import tqdm

    dev = torch.device(device)
    parts = []
    # Every case is timed once to warm up, then `repeats` times; a table has a
    # forward and a step case per row (4 ResNets; compiling adds one call each).
    per_table = lambda rows: 2 * rows * (1 + repeats)  # noqa: E731
    n_layer = len(_default_backends(dev))
    total = (per_table(n_layer) * (int(scan) + int(layer))
             + (per_table(4) * (1 + int(compile)) + 4 * int(compile)) * int(resnet))
    with tqdm(total=total, desc="bench", unit="run") as bar:
        def progress(msg):
            bar.update(1)
            bar.set_postfix_str(msg)

        if scan:
            s = size or (56 if dev.type == "cuda" else 32)
            b = batch or (64 if dev.type == "cuda" else 8)
            rows = bench_scan(batch=b, size=s, device=device, repeats=repeats, progress=progress)
            parts.append(format_table(f"diagonal LSTM scan, B={b}, D=2, {s}x{s}, t=16, {device}",
                                      rows, "speed-up vs reference") + timing_warning(rows, repeats))
        if layer:
            s = size or (56 if dev.type == "cuda" else 32)
            b = batch or (64 if dev.type == "cuda" else 32)
            rows = bench_layer(batch=b, size=s, device=device, repeats=repeats, progress=progress)
            parts.append(format_table(
                f"AttentionRNN layer, B={b}, C=64, {s}x{s}, t=16, {device}",
                rows, "speed-up vs reference") + timing_warning(rows, repeats))
        if resnet:
            b = batch or (128 if dev.type == "cuda" else 16)
            rows = bench_resnet(batch=b, device=device, amp=amp, repeats=repeats, progress=progress)
            parts.append(format_table(
                f"timm ResNet18 train step, batch {b}, 128x128, {device}{' AMP' if amp else ''}",
                rows, "time vs +CBAM", step_label="train step ms") + timing_warning(rows, repeats))
            if compile:
                rows = bench_resnet(batch=b, device=device, amp=amp, repeats=repeats, progress=progress, compile=True)
                parts.append(format_table(
                    f"timm ResNet18 train step, torch.compile, batch {b}, 128x128, {device}{' AMP' if amp else ''}",
                    rows, "time vs +CBAM", step_label="train step ms") + timing_warning(rows, repeats))
    return "\n\n".join(parts)
