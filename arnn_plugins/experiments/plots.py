"""Plots: training curves of the attention kinds, and what ``a[i, j]`` depends on.

``arnn-plugins plot curves RUN_DIR ...`` and ``arnn-plugins plot dependency``
write them (matplotlib, no display needed).
"""

from __future__ import annotations

import glob
import json
import os
import textwrap
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["read_curves", "read_levels", "curves_png", "curves_figure", "reproduce_curves_pngs", "dependency_maps", "dependency_png"]

Point = Dict[str, float]
# kind -> points, or kind -> seed -> points; a point has "step" and metrics.
Curves = Mapping[str, Union[Sequence[Point], Mapping[str, Sequence[Point]]]]


def read_curves(run_dir: str) -> Curves:
    """The evaluation points a run folder holds.

    ``run_dir`` is either a folder with a ``curves.json`` (what the demo
    writes: ``{"runs": [{"kind", "seed", "points": [{"step", "accuracy",
    "correctness", ...}]}]}``, returned as ``{kind: {seed: points}}``),
    or an mmengine work dir: its ``*/vis_data/scalars.json`` lines that carry
    an accuracy (``pan/accuracy``: the prefix is dropped) become one curve
    named after the folder.

    Raises:
        FileNotFoundError: neither is there.
    """
    path = os.path.join(run_dir, "curves.json")
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        curves: Dict[str, Dict[str, list]] = {}
        for run in data["runs"]:
            curves.setdefault(run["kind"], {})[str(run["seed"])] = run["points"]
        return curves
    points: List[Point] = []
    for scalars in sorted(glob.glob(os.path.join(run_dir, "*", "vis_data", "scalars.json"))):
        with open(scalars) as f:
            for line in f:
                # Metric names carry their metric's prefix ("pan/accuracy").
                rec = {k.rpartition("/")[2]: v for k, v in json.loads(line).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
                if "accuracy" in rec and "step" in rec:
                    points.append({k: float(v) for k, v in rec.items()})
    if not points:
        raise FileNotFoundError(f"{run_dir}: no curves.json and no mmengine scalars with an accuracy")
    return {os.path.basename(os.path.normpath(run_dir)): sorted(points, key=lambda p: p["step"])}


def read_levels(run_dir: str) -> Dict[str, float]:
    """Reference levels a run folder records: ``{"correctness": u}`` from a demo's ``results.json``.

    ``u`` is the uniform mask's correctness on the folder's test set; a
    folder without one (an mmengine work dir, a reproduction) gives ``{}``.
    """
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        uniform = json.load(f).get("uniform_correctness")
    # A reproduction keeps one level per table part (a dict): no single line to draw.
    return {"correctness": float(uniform)} if isinstance(uniform, (int, float)) else {}


def _runs(series) -> List[Sequence[Point]]:
    return list(series.values()) if isinstance(series, Mapping) else [series]


def curves_png(curves: Curves, path: str, metrics: Sequence[str] = ("accuracy", "correctness"),
               levels: Optional[Mapping[str, float]] = None, title: str = "") -> None:
    """Write :func:`curves_figure` to the PNG ``path``."""
    curves_figure(curves, metrics, levels, title).savefig(path)


def curves_figure(curves: Curves, metrics: Sequence[str] = ("accuracy", "correctness"),
                  levels: Optional[Mapping[str, float]] = None, title: str = ""):
    """Each metric against training steps, one line per kind (mean over seeds, band = min to max).

    Args:
        curves: kind -> points, or kind -> seed -> points (:func:`read_curves`).
        levels: optional metric -> a reference level drawn dashed (e.g. the
            uniform mask's correctness).

    Returns:
        a matplotlib ``Figure``, one panel per metric.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(metrics), 3.4), dpi=110)
    FigureCanvasAgg(fig)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        for kind, series in curves.items():
            runs = [r for r in _runs(series) if r and metric in r[0]]
            if not runs:
                continue
            steps = sorted({p["step"] for r in runs for p in r})
            table = np.full((len(runs), len(steps)), np.nan)
            for i, r in enumerate(runs):
                for p in r:
                    table[i, steps.index(p["step"])] = p[metric]
            mean = np.nanmean(table, axis=0)
            (line,) = ax.plot(steps, mean, marker="o", ms=3, label=f"{kind} ({len(runs)} seed{'s' * (len(runs) > 1)})")
            if len(runs) > 1:
                ax.fill_between(steps, np.nanmin(table, axis=0), np.nanmax(table, axis=0), color=line.get_color(),
                                alpha=0.2)
        if levels and metric in levels:
            ax.axhline(levels[metric], ls="--", color="gray", lw=1)
            ax.text(ax.get_xlim()[0], levels[metric], " uniform" if metric == "correctness" else " reference",
                    fontsize=7, color="gray", va="bottom")
        ax.set_xlabel("training step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        # About 13 characters of 9 pt text per inch: a long title wraps instead of running off the figure.
        fig.suptitle(textwrap.fill(title, width=int(13 * fig.get_figwidth())), fontsize=9)
    fig.tight_layout()
    return fig


def reproduce_curves_pngs(results: Mapping, out_dir: str) -> List[str]:
    """One :func:`curves_png` per table part of a ``reproduce`` results dict; returns the paths written.

    ``results["runs"]`` entries carry ``group``, ``variant``, ``kind``,
    ``seed`` and their ``curve``; each (group, variant) becomes
    ``curves_<group>_<variant>.png`` in ``out_dir``, the uniform mask's
    correctness (``results["uniform_correctness"]``, mean over seeds) drawn
    as the reference level.
    """
    parts: Dict[tuple, Dict[str, Dict[str, list]]] = {}
    for run in results.get("runs", []):
        if run.get("curve"):
            parts.setdefault((run["group"], run["variant"]), {}).setdefault(run["kind"], {})[str(run["seed"])] = \
                run["curve"]
    uniform = results.get("uniform_correctness") or {}  # "group/variant/seed" -> level
    paths = []
    for (group, variant), curves in sorted(parts.items()):
        path = os.path.join(out_dir, f"curves_{group}_{variant}.png")
        levels = [v for k, v in uniform.items() if k.startswith(f"{group}/{variant}/")]
        curves_png(curves, path, levels={"correctness": float(np.mean(levels))} if levels else None,
                   title=f"reproduce: {group}, {variant}")
        paths.append(path)
    return paths


def dependency_maps(size: int = 9, cell=(4, 4)) -> Dict[str, np.ndarray]:
    """Which inputs each output of a real ``AttentionRNN`` (``context_kernel=1``) depends on.

    Returns name -> boolean ``(size, size)``: ``"left pass"`` (``mu_l`` at
    ``cell``), ``"right pass"`` (``mu_r``) and ``"a"`` (the combined value),
    found from the gradient of that one output with respect to every input
    pixel (non-zero where it depends). The design's claim (DESIGN 3): ``a[i, j]``
    depends on the raster-scan past, rows above and row ``i`` up to ``j``.
    """
    from ..arnn import AttentionRNN

    torch.manual_seed(0)
    layer = AttentionRNN(2, hidden_channels=4, context_kernel=1).double()
    x = torch.randn(1, 2, size, size, dtype=torch.float64, requires_grad=True)
    stats = layer(x, return_stats=True)
    i, j = cell
    out = {}
    for name, field in (("left pass", "mu_l"), ("right pass", "mu_r"), ("a", "a")):
        (g,) = torch.autograd.grad(getattr(stats, field)[0, 0, i, j], x, retain_graph=True)
        out[name] = (g[0].abs().sum(0) > 0).numpy()
    return out


def dependency_png(path: str, size: int = 9, cell=(4, 4)) -> None:
    """Draw :func:`dependency_maps`: the inputs each pass and the output see, the cell marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    maps = dependency_maps(size, cell)
    fig = Figure(figsize=(3.0 * len(maps), 3.3), dpi=110)
    FigureCanvasAgg(fig)
    cmap = ListedColormap(["#f4f4f4", "#3b75af"])
    titles = {"left pass": "left-to-right LSTM\n(top-left quadrant)",
              "right pass": "right-to-left LSTM, shifted\n(rows above, right side)",
              "a": f"a[{cell[0]}, {cell[1]}]: both combined\n(the raster-scan past)"}
    for k, (name, dep) in enumerate(maps.items()):
        ax = fig.add_subplot(1, len(maps), k + 1)
        ax.imshow(dep, cmap=cmap, vmin=0, vmax=1)
        ax.add_patch(_cell_patch(cell))
        ax.set_xticks(np.arange(-0.5, size, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, size, 1), minor=True)
        ax.grid(which="minor", color="white", lw=1)
        ax.tick_params(which="both", length=0, labelsize=7)
        ax.set_title(titles[name], fontsize=8)
    fig.suptitle("inputs X[i', j'] that an output at the red cell depends on (blue)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def _cell_patch(cell):
    from matplotlib.patches import Rectangle

    i, j = cell
    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2)
