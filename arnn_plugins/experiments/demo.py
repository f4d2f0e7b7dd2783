"""The main job (``arnn-plugins demo``): local attention against AttentionRNN on MBG, over three seeds.

:func:`run_pan_demo` trains the PAN attribute network with local 3x3
attention (``ctx``) and with AttentionRNN (``arnn``) on a small MBG set
(generated from the MNIST digits and photographs that installed packages
ship; nothing is downloaded), once per seed, prints accuracy, mask
correctness and time per step as mean ± spread over the seeds, and writes
a PNG of the masks (:func:`~arnn_plugins.experiments.pictures.mask_panel_png`).
Its sizes are :data:`~arnn_plugins.experiments.recipes.DEMO_SCALES`.

Determinism: every run trains in its own process on ``threads`` torch
threads (1 by default) with its seed fixing the initialisation and the data
order; the data are the same for every run. A run's figures therefore do
not depend on how many runs go at once (``jobs``), on the machine's load
or on the thread setting of the calling process.

Files, under ``work_dir``: per run ``<kind>_s<seed>/`` with ``config.py``
and the last checkpoint; ``curves.json`` with the measurements along
training of every run (see :func:`run_pan_demo`); ``results.json`` with the
final figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import os.path as osp
import shlex
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..data import MultiDigitDataset, query_blind_accuracy, uniform_mask_correctness
from .outline import OUTLINE_KINDS, format_outline_table, outline_run
from .pictures import mask_grid_png, mask_panel_png, pan_masks
from .plots import curves_png, read_curves
from .recipes import DEMO_SCALES, DEMO_TASK, KIND_NAMES, curve_points, mask_start, pan_config, query_phrase, run_pan

__all__ = ["run_pan_demo", "plateau_line", "DEMO_SEEDS", "OUTLINE_STEPS"]

DEMO_SEEDS = (0, 1, 2)
# Training steps of the outline-fill task per model (default, --quick).
OUTLINE_STEPS = {"default": 600, "quick": 400}


def _train(cfg_dict: dict, threads: int, device: Optional[str]) -> dict:
    import warnings

    from mmengine.config import Config

    # mmengine switches a spawned worker's start method to fork and says so.
    warnings.filterwarnings("ignore", message="Multi-processing start method")
    torch.set_num_threads(threads)
    metrics, runner = run_pan(Config(cfg_dict), device=device)
    return {"metrics": metrics, "curve": curve_points(runner)}


def _mean_sd(values: Sequence[float]):
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _pm(values: Sequence[float], pct: bool = False, digits: int = 3) -> str:
    m, s = _mean_sd(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}%" if pct else f"{m:.{digits}f} ± {s:.{digits}f}"


def plateau_line(per_seed: Dict[str, Dict[int, dict]], seeds: Sequence[int], blind: float) -> str:
    """How many ``seeds`` of each kind ended above the query-blind accuracy ``blind``, as one line.

    ``per_seed``: kind name -> seed -> metrics with ``"accuracy"``. At the
    demo's budget this is the steadier difference between the kinds (which
    seeds' masks come out ahead can change with the machine's arithmetic).
    """
    counts = ", ".join(f"{kind} in {sum(r[s]['accuracy'] > blind for s in seeds)}/{len(seeds)}"
                       + (" seeds" if i == 0 else "") for i, (kind, r) in enumerate(per_seed.items()))
    return f"left the query-blind plateau (accuracy above the blind level): {counts}"


def run_pan_demo(quick: bool = False, out: str = "arnn_demo.png", work_dir: str = "work_dirs/demo",
                 device: Optional[str] = None, progress: bool = True, show_items: int = 6,
                 seeds: Sequence[int] = DEMO_SEEDS, jobs: int = 2, threads: int = 1, task: str = DEMO_TASK,
                 outline_steps: Optional[int] = None, **changes) -> Dict[str, Dict[str, float]]:
    """Train PAN with ``ctx`` and with ``arnn`` on small MBG for each seed; print the table, write the files.

    Args:
        quick: the short setting (:data:`DEMO_SCALES` ``["quick"]``).
        out: the mask PNG (seed ``seeds[0]``'s models on the first
            ``show_items`` test items).
        work_dir: runs, checkpoints, ``curves.json`` and ``results.json``.
        seeds: model seeds (initialisation and data order); the data set is
            the same for all.
        jobs: runs trained at once, each in its own process.
        threads: torch threads per run; the figures are those of this
            setting (1, the default, is what the docs report: another
            count sums in another order and the figures move).
        task: ``"digit"`` (MBG^inv: query a colour, answer the digit) or
            ``"color"`` (query a digit, answer its colour).
        outline_steps: steps of the outline-fill task per model and seed
            (:mod:`~arnn_plugins.experiments.outline`, trained first; its
            masks go to ``<out>_outline.png``); default
            :data:`OUTLINE_STEPS`, 0 leaves it out.
        **changes: replace fields of the :data:`DEMO_SCALES` entry
            (``n_train=``, ``iters=``, ...).

    ``curves.json`` is ``{"scale": {...}, "interval": steps, "runs": [{"kind",
    "seed", "points": [{"step", "loss", "accuracy", "correctness",
    "layer_correctness": [first .. last layer], "layer_entropy",
    "layer_mean", "accuracy_uniform_masks", "grad_norm": {"attention",
    "backbone", "head"}}, ...]}, ...]}``: measured every ``interval``
    steps (and at step 0) on the first 256 test items
    (:func:`~arnn_plugins.engine.pan.curve_point`).

    Returns:
        per kind the test metrics averaged over seeds (``accuracy``,
        ``correctness``, ``sec_per_step``, ...), with ``*_sd`` spreads,
        ``per_seed`` (the runs' own metrics) and ``wall_s``.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    from ..data.cached import MultiDigitTensors
    from ..engine.runner import build_model

    sc = DEMO_SCALES["quick" if quick else "default"]
    sc = dataclasses.replace(sc, **changes) if changes else sc
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("run_pan_demo: give at least one seed")
    interval = max(1, sc.iters // 10)
    t0 = time.perf_counter()
    os.makedirs(work_dir, exist_ok=True)
    plan = []
    for seed in seeds:
        for kind in sc.kinds:
            run_dir = osp.join(work_dir, f"{kind}_s{seed}")
            cfg = pan_config(kind, sc, variant="mbg", task=task, seed=seed, data_seed=0, work_dir=run_dir,
                             progress=False, curve_interval=interval)
            os.makedirs(run_dir, exist_ok=True)
            cfg.dump(osp.join(run_dir, "config.py"))
            plan.append(((kind, seed), cfg))
    # The data once, here (and cached on disk): the workers only read them.
    for key in ("train_dataloader", "test_dataloader"):
        d = dict(plan[0][1][key]["dataset"])
        d.pop("type")
        MultiDigitTensors(**d)
    if outline_steps is None:
        outline_steps = OUTLINE_STEPS["quick" if quick else "default"]
    # Every run is one call, in the order the pool takes them: the longest (PAN+ARNN) first.
    calls = [(("pan", kind, seed), _train, (cfg.to_dict(), threads, device))
             for (kind, seed), cfg in sorted(plan, key=lambda p: p[0][0] != "arnn")]
    if outline_steps:
        calls += [(("outline", kind, seed), outline_run, (kind, seed, outline_steps, 24, threads))
                  for seed in seeds for kind in OUTLINE_KINDS]
    done: Dict[tuple, dict] = {}
    from tqdm.auto import tqdm

    with tqdm(total=len(calls), desc=f"demo: {len(calls)} runs ({len(seeds)} seeds)", unit="run",
              disable=not progress) as bar:
        if jobs <= 1:
            before = torch.get_num_threads()
            try:
                for key, fn, args in calls:
                    done[key] = fn(*args)
                    bar.update()
            finally:
                torch.set_num_threads(before)
        else:
            with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(fn, *args): key for key, fn, args in calls}
                for fut in cf.as_completed(futures):
                    done[futures[fut]] = fut.result()
                    bar.update()
    wall = time.perf_counter() - t0
    outline_raw = {key[1:]: v for key, v in done.items() if key[0] == "outline"}
    outline = {kind: {"per_seed": {seed: outline_raw[(kind, seed)]["metrics"] for seed in seeds}}
               for kind in OUTLINE_KINDS} if outline_steps else {}
    done = {key[1:]: v for key, v in done.items() if key[0] == "pan"}
    stem, ext = osp.splitext(out)
    outline_png = f"{stem}_outline{ext or '.png'}"
    if outline:
        print()
        print(f"Outline fill (24 px rectangle outlines in noise; the target is their interiors, which only the "
              f"raster-scan past tells apart), {outline_steps} steps per model, seeds {list(seeds)}: "
              "mean ± sample std")
        print(format_outline_table(outline, seeds))
        a, c = outline["arnn"]["per_seed"], outline["local"]["per_seed"]
        print(f"per seed, ARNN against local 3x3 attention: IoU higher in "
              f"{sum(a[s]['iou'] > c[s]['iou'] for s in seeds)}/{len(seeds)} seeds, mask correctness higher in "
              f"{sum(a[s]['correctness'] > c[s]['correctness'] for s in seeds)}/{len(seeds)}")

    results: Dict[str, Dict[str, float]] = {}
    for kind in sc.kinds:
        per_seed = {seed: done[(kind, seed)]["metrics"] for seed in seeds}
        keys = [k for k in per_seed[seeds[0]] if isinstance(per_seed[seeds[0]][k], (int, float))]
        r: Dict[str, object] = {}
        for k in keys:
            r[k], r[f"{k}_sd"] = _mean_sd([per_seed[s][k] for s in seeds])
        r["per_seed"] = per_seed
        r["wall_s"] = wall
        results[kind] = r

    test_set = MultiDigitDataset("mbg", "test", sc.n_test, task=task, size=sc.size, seed=0,
                                 num_digits=tuple(sc.num_digits), scale_range=tuple(sc.scale_range))
    blind, uniform = query_blind_accuracy(test_set), uniform_mask_correctness(test_set)
    print()
    what = "MBG^inv: query a colour, answer the digit" if task == "digit" else "MBG: query a digit, answer its colour"
    print(f"PAN on {what} ({sc.size} px with {sc.num_digits[0]}-{sc.num_digits[1]} digits, {sc.n_train} training / "
          f"{sc.n_test} test items, {sc.iters} steps of {sc.batch}"
          + mask_start(sc.mask_bias) + query_phrase(sc.query_film) + f"), seeds {list(seeds)}: "
          f"mean ± sample std over seeds, {threads} torch thread(s) per run")
    print(f"{'attention':<10} {'accuracy':>14} {'mask corr.':>15} {'s/step':>15}   per-layer corr., first to last")
    for kind, r in results.items():
        per = r["per_seed"]
        n_layers = sum(k.startswith("correctness_l") for k in per[seeds[0]])
        layers = " / ".join(_pm([per[s][f"correctness_l{k}"] for s in seeds], digits=2)
                            for k in range(1, n_layers + 1))
        print(f"{kind:<10} {_pm([per[s]['accuracy'] for s in seeds], pct=True):>14} "
              f"{_pm([per[s]['correctness'] for s in seeds]):>15} "
              f"{_pm([per[s]['sec_per_step'] for s in seeds]):>15}   {layers}")
    blind_what = "any one digit of the image" if task == "digit" else "the colour most digits share"
    print(f"{'blind':<10} {100 * blind:>13.1f}% {uniform:>15.3f}                   "
          f"(without the query: {blind_what}; a uniform mask)")
    print(f"(chance: {10 if task == 'digit' else 20}% accuracy; correctness = share of the layers' mask product on the queried digit;\n"
          " per layer: each layer's mask alone)")
    if "ctx" in results and "arnn" in results and len(sc.kinds) == 2:
        a, c = results["arnn"]["per_seed"], results["ctx"]["per_seed"]
        wins_c = sum(a[s]["correctness"] > c[s]["correctness"] for s in seeds)
        wins_a = sum(a[s]["accuracy"] > c[s]["accuracy"] for s in seeds)
        above = sum(a[s]["correctness"] > 1.5 * uniform for s in seeds)
        print(f"per seed, ARNN against CTX: mask correctness higher in {wins_c}/{len(seeds)} seeds, accuracy higher "
              f"in {wins_a}/{len(seeds)}; ARNN's correctness above 1.5x the uniform mask's in {above}/{len(seeds)}")
        print(plateau_line({"ARNN": a, "CTX": c}, seeds, blind))
        seed_lines = "; ".join(f"seed {s}: {100 * a[s]['accuracy']:.1f}% / {a[s]['correctness']:.3f} vs "
                               f"{100 * c[s]['accuracy']:.1f}% / {c[s]['correctness']:.3f}" for s in seeds)
        print(f"  (ARNN vs CTX, accuracy / correctness) {seed_lines}")
    if quick:
        msg = (f"--quick trains PAN {sc.iters} steps: too few for either kind to leave the query-blind plateau "
               "(masks still near uniform), so its PAN rows do not compare the kinds; the demo without --quick "
               f"({DEMO_SCALES['default'].iters} steps) does, and curves.json shows when each run leaves the plateau.")
        if outline:
            a, c = outline["arnn"]["per_seed"], outline["local"]["per_seed"]
            if all(a[s]["iou"] > c[s]["iou"] for s in seeds):
                msg += (f" The outline-fill rows ({outline_steps} steps) already show ARNN's IoU above local "
                        "attention's in every seed.")
            else:
                msg += (f" The outline-fill rows ({outline_steps} steps) do not separate the kinds in every seed "
                        f"either: at {OUTLINE_STEPS['default']} steps (the demo without --quick) they do.")
        print(msg)
    # Files: the curves, the final figures, the picture.
    curves = {"scale": dataclasses.asdict(sc), "task": task, "interval": interval, "threads": threads,
              "runs": [{"kind": kind, "seed": seed, "points": done[(kind, seed)]["curve"]}
                       for seed in seeds for kind in sc.kinds]}
    curves_path = osp.join(work_dir, "curves.json")
    with open(curves_path, "w") as f:
        json.dump(curves, f, indent=1)
    with open(osp.join(work_dir, "results.json"), "w") as f:
        json.dump({"scale": dataclasses.asdict(sc), "task": task, "seeds": list(seeds), "threads": threads, "wall_s": wall,
                   "blind_accuracy": blind, "uniform_correctness": uniform,
                   "runs": [{"kind": k, "seed": s, **done[(k, s)]["metrics"]} for s in seeds for k in sc.kinds],
                   "outline": {"steps": outline_steps,
                               "runs": [{"kind": k, "seed": s, **outline[k]["per_seed"][s]}
                                        for s in seeds for k in outline]}},
                  f, indent=1)
    test = MultiDigitTensors(**{k: v for k, v in plan[0][1]["test_dataloader"]["dataset"].items() if k != "type"})
    sel = list(range(min(show_items, len(test))))
    batch = [test[i] for i in sel]
    images = torch.stack([b["image"] for b in batch])
    queries = torch.stack([b["query"] for b in batch])
    answers = torch.stack([b["answer"] for b in batch])
    masks = torch.stack([b["mask"] for b in batch])
    panels, show = {}, []
    for kind in sc.kinds:
        run_dir = osp.join(work_dir, f"{kind}_s{seeds[0]}")
        ckpt = osp.join(run_dir, f"iter_{sc.iters}.pth")
        cfg_path = osp.join(run_dir, "config.py")
        from mmengine.config import Config

        model = build_model(Config.fromfile(cfg_path), ckpt)
        panels[KIND_NAMES.get(kind, kind.upper())] = pan_masks(model, images, queries)
        show += [cfg_path, ckpt]
    mask_panel_png(out, images, queries, answers, panels, task=task, target_masks=masks)
    curves_png_path = osp.splitext(out)[0] + "_curves.png"
    curves_png(read_curves(work_dir), curves_png_path, levels={"correctness": uniform},
               title=f"PAN on {what}, test accuracy and mask correctness along training (band: min to max over seeds)")
    if outline:
        o = {kind: outline_raw[(kind, seeds[0])] for kind in OUTLINE_KINDS}
        mask_grid_png(outline_png, o["arnn"]["images"], {"target": o["arnn"]["targets"], "local 3x3": o["local"]["probs"],
                                                         "ARNN": o["arnn"]["probs"]})
    print(f"\nwall time {wall / 60:.1f} min ({jobs} run(s) at once)")
    print(f"runs (config.py and the last checkpoint each): {osp.join(work_dir, '<kind>_s<seed>')}")
    print(f"curves along training: {curves_path} (plotted: {curves_png_path}); "
          f"final figures: {osp.join(work_dir, 'results.json')}")
    print(f"masks of seed {seeds[0]}'s models: {out}" + (f" (PAN), {outline_png} (outline fill)" if outline else ""))
    print("redraw them (or more items, --num 12):\n  arnn-plugins show " + " ".join(shlex.quote(p) for p in show)
          + f" --out {shlex.quote(out)}")
    return results
