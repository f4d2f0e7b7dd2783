"""How the layer's cost grows (``arnn-plugins bench --scaling``).

The AttentionRNN layer's forward+backward time and memory (what the forward
holds for the backward, and the backward's peak) are measured per backend
along three axes, one at a time around a base point: the map size
(``H = W``), the batch and the hidden features ``t``. On each axis the cost
should grow as a power of the size, and the fitted exponent says which:
time against ``H * W`` (not ``H``) and against ``B`` should have exponent 1,
time against ``t`` between 1 (pointwise work) and 2 (the recurrent
mat-vecs). An exponent below the expected one means fixed costs (per-step
dispatch, thread start) still dominate there; above it, caches overflowing
or work that is not linear. The exponent is fitted over all points and over
the three largest ones, which is where the asymptote shows.

Within one point the backends' repeats are interleaved, so their ratios are
comparable on a noisy machine, and the fastest repeat is kept. Memory is
fitted the same way (it does not depend on the machine's load). A backend whose forward+backward took longer
than ``budget_s`` at one point of an axis is not run at the larger points
of that axis (shown as skipped), which keeps the default sweep to a few
minutes on two cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..arnn import AttentionRNN
from .bench import _PEERS, _default_backends, _interleaved_medians
from .memory import memory_mb

__all__ = ["AXES", "BASE", "Point", "exponents", "fit_exponent", "format_scaling", "plot_scaling", "run_scaling",
           "scaling_sweep"]

# axis -> (values, what the exponent is fitted against, its name)
AXES: Dict[str, tuple] = {
    "size": ((8, 16, 32, 64, 128), lambda v: v * v, "H*W"),
    "batch": ((1, 4, 16, 64), lambda v: v, "B"),
    "hidden": ((8, 16, 32, 64), lambda v: v, "t"),
}
BASE = dict(batch=8, size=32, hidden=16, channels=64)


@dataclass
class Point:
    """One measured point: an axis, its value and per-backend results (``None``: skipped)."""

    axis: str
    value: int
    batch: int
    size: int
    hidden: int
    ms: Dict[str, Optional[float]] = field(default_factory=dict)
    held_mb: Dict[str, Optional[float]] = field(default_factory=dict)
    peak_mb: Dict[str, Optional[float]] = field(default_factory=dict)


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of ``log y`` against ``log x``; ``None`` for fewer than two points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y is not None and y > 0 and x > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


def _measure(point: Point, backends: List[str], channels: int, device: torch.device, repeats: int,
             skip: set, progress: Callable[[str], None]) -> None:
    torch.manual_seed(0)
    x = torch.randn(point.batch, channels, point.size, point.size, device=device, requires_grad=True)
    base = AttentionRNN(channels, hidden_channels=point.hidden, backend="reference").to(device)
    cases = {}
    for name in backends:
        if name in skip:
            point.ms[name] = point.held_mb[name] = point.peak_mb[name] = None
            for _ in range(repeats + 2):
                progress(f"{point.axis}={point.value} {name} skipped")
            continue
        m = AttentionRNN(channels, hidden_channels=point.hidden, backend=_PEERS.get(name, name)).to(device)
        m.load_state_dict(base.state_dict())

        def fb(m=m):
            m.zero_grad(set_to_none=True)
            x.grad = None
            m(x).sum().backward()

        cases[name] = fb
        progress(f"{point.axis}={point.value} {name} memory")
        point.held_mb[name], point.peak_mb[name] = memory_mb(lambda m=m: m(x), device)
    label = f"{point.axis}={point.value}"
    # The fastest repeat: a fit over sizes is thrown off by one repeat that
    # another process on the machine slowed down, more than a table is.
    ms = _interleaved_medians(cases, device, repeats, lambda msg: progress(f"{label} {msg}"), stat=min)
    point.ms.update(ms)


def scaling_sweep(axes: Sequence[str] = tuple(AXES), backends: Optional[List[str]] = None, device: str = "cpu",
                  repeats: int = 2, budget_s: float = 2.0, values: Optional[Dict[str, Sequence[int]]] = None,
                  base: Optional[Dict[str, int]] = None,
                  progress: Optional[Callable[[str], None]] = None) -> List[Point]:
    """Measure the layer along ``axes`` (keys of :data:`AXES`) around a base point.

    Input ``(B, C, H, W)``; the base point is :data:`BASE` updated by
    ``base`` (keys ``batch``, ``size``, ``hidden``, ``channels``), the
    values of an axis those of :data:`AXES` unless ``values`` gives them.
    ``backends`` as in :func:`arnn_plugins.experiments.bench.bench_layer`
    (default: the naive peer, reference, fused, and triton on CUDA).
    ``progress(msg)`` is called ``repeats + 2`` times per point and backend,
    skipped ones included. Returns the points in sweep order, times as
    forward+backward median ms.
    """
    dev = torch.device(device)
    backends = backends or _default_backends(dev)
    unknown = [a for a in axes if a not in AXES]
    if unknown:
        raise ValueError(f"scaling_sweep: unknown axes {unknown}; choose from {list(AXES)}")
    progress = progress or (lambda msg: None)
    at = {**BASE, **(base or {})}
    points = []
    for axis in axes:
        skip: set = set()
        for v in (values or {}).get(axis, AXES[axis][0]):
            cfg = dict(batch=at["batch"], size=at["size"], hidden=at["hidden"])
            cfg[axis] = v
            p = Point(axis, v, **cfg)
            _measure(p, backends, at["channels"], dev, repeats, skip, progress)
            skip |= {n for n, ms in p.ms.items() if ms is not None and ms > budget_s * 1e3}
            points.append(p)
    return points


def exponents(points: List[Point], of: str = "ms") -> Dict[str, Dict[str, tuple]]:
    """``{axis: {backend: (exponent over all points, over the three largest)}}`` of ``of``.

    ``of`` is a :class:`Point` field: ``"ms"`` (time) or ``"peak_mb"`` (memory).
    """
    out: Dict[str, Dict[str, tuple]] = {}
    for axis, (_, measure, _) in AXES.items():
        pts = [p for p in points if p.axis == axis]
        if not pts:
            continue
        out[axis] = {}
        for name in pts[0].ms:
            xs = [measure(p.value) for p in pts]
            ys = [getattr(p, of).get(name) for p in pts]
            done = [(x, y) for x, y in zip(xs, ys) if y is not None]
            last = done[-3:]
            out[axis][name] = (fit_exponent(xs, ys), fit_exponent([x for x, _ in last], [y for _, y in last]))
    return out


def _fmt(v: Optional[float], spec: str) -> str:
    return "skipped" if v is None else format(v, spec)


def format_scaling(points: List[Point], title: str = "") -> str:
    """Markdown: one table per axis (time, held and peak memory per backend), then the exponents."""
    lines = [f"**{title}**", ""] if title else []
    exps, mems = exponents(points), exponents(points, "peak_mb")
    for axis, (_, _, against) in AXES.items():
        pts = [p for p in points if p.axis == axis]
        if not pts:
            continue
        names = list(pts[0].ms)
        lines += [f"*{axis}* (B={pts[0].batch if axis != 'batch' else 'varies'}, "
                  f"{'HxW varies' if axis == 'size' else f'{pts[0].size}x{pts[0].size}'}, "
                  f"t={pts[0].hidden if axis != 'hidden' else 'varies'})", "",
                  f"| {axis} | " + " | ".join(f"{n} ms | {n} held / peak MB" for n in names) + " |",
                  "|---:|" + "---:|---:|" * len(names)]
        for p in pts:
            cells = []
            for n in names:
                mem = ("skipped" if p.held_mb.get(n) is None
                       else f"{p.held_mb[n]:.1f} / {p.peak_mb[n]:.1f}")
                cells += [_fmt(p.ms.get(n), ".1f"), mem]
            lines.append(f"| {p.value} | " + " | ".join(cells) + " |")
        for what, ex in (("time", exps), ("backward peak memory", mems)):
            lines += ["", f"{what} exponent against {against}: " + "; ".join(
                f"{n} {_fmt(e_all, '.2f')} (three largest {_fmt(e_top, '.2f')})"
                for n, (e_all, e_top) in ex[axis].items())]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot_scaling(points: List[Point], path: str, title: str = "") -> str:
    """Log-log plot of time (top row) and backward peak memory (bottom row) per axis; writes ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [a for a in AXES if any(p.axis == a for p in points)]
    fig, grid = plt.subplots(2, len(axes), figsize=(4.2 * len(axes), 7), squeeze=False)
    exps = exponents(points)
    for col, axis in enumerate(axes):
        _, measure, against = AXES[axis]
        pts = [p for p in points if p.axis == axis]
        for name in pts[0].ms:
            done = [(measure(p.value), p.ms[name], p.peak_mb[name]) for p in pts if p.ms.get(name) is not None]
            if not done:
                continue
            e = exps[axis][name][0]
            label = f"{name} (exp {e:.2f})" if e is not None else name
            grid[0][col].loglog([d[0] for d in done], [d[1] for d in done], "o-", label=label)
            grid[1][col].loglog([d[0] for d in done], [max(d[2], 1e-3) for d in done], "o-", label=name)
        grid[0][col].set_title(f"fwd+bwd time vs {against}")
        grid[0][col].set_ylabel("ms")
        grid[1][col].set_title(f"backward peak memory vs {against}")
        grid[1][col].set_ylabel("MB")
        for r in range(2):
            grid[r][col].set_xlabel(against)
            grid[r][col].grid(True, which="both", alpha=0.3)
            grid[r][col].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_scaling(device: str = "cpu", repeats: int = 2, axes: Sequence[str] = tuple(AXES),
                backends: Optional[List[str]] = None, plot: Optional[str] = None,
                budget_s: float = 2.0) -> str:
    """The sweep with a progress bar (total known up front); returns the markdown, writes ``plot`` if given."""
    from tqdm import tqdm

    dev = torch.device(device)
    names = backends or _default_backends(dev)
    total = sum(len(AXES[a][0]) for a in axes) * len(names) * (repeats + 2)
    with tqdm(total=total, desc="scaling", unit="run") as bar:
        def progress(msg):
            bar.update(1)
            bar.set_postfix_str(msg)

        points = scaling_sweep(axes, names, device, repeats, budget_s, progress=progress)
    title = (f"AttentionRNN layer fwd+bwd scaling, C={BASE['channels']}, base B={BASE['batch']}, "
             f"{BASE['size']}x{BASE['size']}, t={BASE['hidden']}, {device}, {torch.get_num_threads()} threads")
    if plot:
        plot_scaling(points, plot, title)
    return format_scaling(points, title)
