"""Why PAN's masks do (not) localise: attention measured over training, per setting.

``python -m arnn_plugins.experiments.pan_study --kinds ctx arnn --iters 600
--set lr=1e-3 --set readout=softmax --out work_dirs/study/softmax`` trains
each kind (and seed) at the demo's layout with the changes given, one torch
thread per run (``--threads``), ``--jobs`` runs at once, and every ``--every`` steps records
:func:`~arnn_plugins.engine.pan.curve_point`: accuracy, mask correctness
of the product and of each layer, each layer's mask entropy (1 = uniform)
and mean, the accuracy with every mask replaced by a constant (how much
the answers depend on the masks) and the gradient norm reaching the
attention layers, the base CNN and the head. It prints one table per run
and writes ``study.json`` (``{"settings", "runs": [{"kind", "seed",
"metrics", "curve"}]}``).

``--set`` takes :class:`~arnn_plugins.experiments.recipes.Scale` fields
(``lr``, ``readout``, ``head_query``, ``iters``, ``num_digits``, ...);
``--model`` takes extra :class:`~arnn_plugins.models.PAN` arguments.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import os.path as osp
import time
from typing import Dict, List, Optional, Sequence

from .recipes import DEMO_SCALES, curve_points, pan_config, run_pan

__all__ = ["run_study", "format_curve", "main"]


def _job(cfg_dict: dict, threads: int) -> dict:
    import warnings

    import torch
    from mmengine.config import Config

    warnings.filterwarnings("ignore", message="Multi-processing start method")
    torch.set_num_threads(threads)
    metrics, runner = run_pan(Config(cfg_dict), device="cpu")
    return {"metrics": metrics, "curve": curve_points(runner)}


def format_curve(curve: Sequence[dict]) -> str:
    """A text table of :class:`~arnn_plugins.engine.pan.PANCurveHook` points."""
    lines = [f"{'step':>5} {'loss':>6} {'acc':>6} {'acc|u':>6} {'corr':>6}  {'layer corr.':<24} "
             f"{'layer entropy':<24} {'layer mean':<24} grad attn/cnn/head"]
    for p in curve:
        def fmt(v):
            return "/".join(f"{x:.2f}" for x in v)

        g = p["grad_norm"]
        loss = float("nan") if p["loss"] is None else p["loss"]
        lines.append(f"{p['step']:>5} {loss:>6.3f} {100 * p['accuracy']:>5.1f}% "
                     f"{100 * p['accuracy_uniform_masks']:>5.1f}% {p['correctness']:>6.3f}  "
                     f"{fmt(p['layer_correctness']):<24} {fmt(p['layer_entropy']):<24} {fmt(p['layer_mean']):<24} "
                     f"{g['attention']:.1e}/{g['backbone']:.1e}/{g['head']:.1e}")
    return "\n".join(lines)


def run_study(kinds: Sequence[str] = ("ctx", "arnn"), seeds: Sequence[int] = (0,), every: int = 100,
              jobs: int = 2, out: Optional[str] = None, scale: str = "default", model: Optional[dict] = None,
              task: str = "color", log=print, threads: int = 1, cache_dir: Optional[str] = "default",
              **changes) -> Dict[str, object]:
    """Train ``kinds`` x ``seeds`` at :data:`DEMO_SCALES` ``[scale]`` with ``changes``; curves and final metrics.

    ``model`` updates each run's PAN arguments, ``threads`` is torch's thread
    count in each run, ``cache_dir`` where the data's tensors are cached
    (``None``: not at all). Returns what ``study.json`` holds.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    from ..data.cached import MultiDigitTensors

    sc = dataclasses.replace(DEMO_SCALES[scale], **changes)
    out = out or osp.join("work_dirs", "study")
    os.makedirs(out, exist_ok=True)
    configs = []
    for seed in seeds:
        for kind in kinds:
            cfg = pan_config(kind, sc, task=task, seed=seed, data_seed=0, work_dir=osp.join(out, f"{kind}_s{seed}"),
                             progress=False, checkpoint=False, curve_interval=every, cache_dir=cache_dir)
            if model:
                cfg.model.update(model)
            configs.append(((kind, seed), cfg))
    for key in ("train_dataloader", "test_dataloader"):  # the data once, here; workers read the cache
        d = dict(configs[0][1][key]["dataset"])
        d.pop("type")
        MultiDigitTensors(**d)
    t0 = time.perf_counter()
    runs: List[dict] = []
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_job, cfg.to_dict(), threads): key for key, cfg in configs}
        for fut in cf.as_completed(futures):
            kind, seed = futures[fut]
            res = fut.result()
            runs.append(dict(kind=kind, seed=seed, **res))
            m = res["metrics"]
            log(f"\n{kind} seed {seed}: accuracy {100 * m['accuracy']:.1f}%  correctness {m['correctness']:.3f}  "
                f"{m['sec_per_step']:.3f} s/step")
            log(format_curve(res["curve"]))
    settings = dict(dataclasses.asdict(sc), model=model or {}, every=every, threads=threads, wall_s=time.perf_counter() - t0)
    result = {"settings": settings, "runs": sorted(runs, key=lambda r: (r["kind"], r["seed"]))}
    with open(osp.join(out, "study.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return result


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m arnn_plugins.experiments.pan_study", description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="+", default=["ctx", "arnn"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--every", type=int, default=100, help="steps between measurements")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--task", default="color", choices=["color", "digit"], help="digit: the inverse task")
    p.add_argument("--scale", default="default", choices=list(DEMO_SCALES))
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="Scale fields, e.g. lr=1e-3")
    p.add_argument("--model", nargs="*", default=[], metavar="ARG=VALUE", help="more PAN arguments")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    changes = {k: _value(v) for k, v in (s.split("=", 1) for s in a.set)}
    model = {k: _value(v) for k, v in (s.split("=", 1) for s in a.model)}
    run_study(a.kinds, a.seeds, a.every, a.jobs, a.out, a.scale, model, a.task, threads=a.threads, iters=a.iters, **changes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
