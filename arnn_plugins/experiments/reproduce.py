"""The paper's attribute experiments (section 4.1) with mmengine's Runner.

- Table 1: colour accuracy on MREF / MDIST / MBG for SAN, -CTX (``noctx``),
  CTX (``ctx``), ARNN, ARNN_ind and ARNN~ (``arnn_sample``).
- Table 2: on MBG, mask correctness and accuracy per target-scale bucket.
- Inverse attribute prediction (MBG^inv): query a colour, answer the digit,
  for -CTX, CTX and ARNN (accuracy and mask correctness).

Every cell is trained and tested once per seed (model seed = data seed
offset; data sets are shared across kinds), and the tables give mean and
spread (sample standard deviation) over seeds. :data:`SCALES` sets the sizes:
``tiny`` (seconds, for tests), ``small`` (about an hour on two CPU cores),
``long`` (the MBG parts only, 2.5x the iterations, three seeds, about 90 minutes) and
``full`` (the paper's data sizes; for a GPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import os.path as osp
import statistics
import time
from dataclasses import asdict, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..checks import check_int
from .recipes import KIND_NAMES, PAPER, SCALES, Scale, curve_points, mask_start, pan_config, query_phrase, run_pan

__all__ = ["reproduce", "format_tables"]


def _baselines(sc: "Scale", plan) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Query-blind accuracy and uniform-mask correctness per ``group/variant/seed`` test set of the plan."""
    from ..data import MultiDigitDataset, query_blind_accuracy, uniform_mask_correctness

    acc, corr = {}, {}
    for group, variant, _, seed, task in plan:
        key = f"{group}/{variant}/{seed}"
        if key not in acc:
            ds = MultiDigitDataset(variant, "test", sc.n_test, task=task, size=sc.size, seed=seed,
                                   num_digits=tuple(sc.num_digits), scale_range=tuple(sc.scale_range))
            acc[key] = query_blind_accuracy(ds)
            corr[key] = uniform_mask_correctness(ds)
    return acc, corr


def _mean_sd(values: Sequence[float]) -> Tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _cell(values: Sequence[float], pct: bool = True) -> str:
    m, s = _mean_sd(values)
    if math.isnan(m):
        return "-"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


def _runs(results: dict, group: str, variant: str, kind: str) -> List[dict]:
    return [r for r in results["runs"] if r["group"] == group and r["variant"] == variant and r["kind"] == kind]


def _layer_cell(runs: Sequence[dict]) -> str:
    """Mean correctness of each layer's mask alone, first to last layer, over runs."""
    n = min((sum(1 for k in r if k.startswith("correctness_l")) for r in runs), default=0)
    if not n:
        return "-"
    return " / ".join(f"{_mean_sd([r[f'correctness_l{k}'] for r in runs])[0]:.2f}" for k in range(1, n + 1))


def format_tables(results: dict) -> str:
    """Markdown for Table 1, Table 2 and the inverse experiment, from :func:`reproduce`'s results."""
    sc = results["scale"]
    nd, sr = sc.get("num_digits", (5, 9)), sc.get("scale_range", (0.5, 3.0))
    lines = [f"Scale `{results['scale_name']}`: {sc['size']} px images with {nd[0]}-{nd[1]} digits at scales "
             f"{sr[0]:g}-{sr[1]:g}, {sc['n_train']} training / {sc['n_test']} test items, {sc['iters']} iterations "
             f"of batch {sc['batch']}, PAN readout `{sc.get('readout', 'flatten')}`"
             + mask_start(sc.get("mask_bias", 0.0)) + query_phrase(sc.get("query_film", False))
             + f", seeds {list(sc['seeds'])}; "
             "mean ± sample std over seeds. Paper values in brackets.", ""]
    variants = list(sc["variants"])
    lines += ["**Table 1** colour accuracy (%)", "",
              "| attention | " + " | ".join(v.upper() for v in variants) + " | s/step (MBG) |",
              "|---|" + "---|" * len(variants) + "---|"]
    for kind in sc["kinds"]:
        cells = []
        for j, v in enumerate(variants):
            runs = _runs(results, "table1", v, kind)
            paper = PAPER["table1"].get(kind)
            p = f" [{paper[('mref', 'mdist', 'mbg').index(v)]:.1f}]" if paper and v in ("mref", "mdist", "mbg") else ""
            cells.append(_cell([r["accuracy"] for r in runs]) + p)
        mbg = _runs(results, "table1", "mbg", kind)
        step = _mean_sd([r["sec_per_step"] for r in mbg])[0]
        lines.append(f"| {KIND_NAMES[kind]} | " + " | ".join(cells) + f" | {step:.3f} |")
    base = results.get("baselines") or {}
    uniform = results.get("uniform_correctness") or {}
    if base:
        cells = [_cell([base[k] for k in base if k.startswith(f"table1/{v}/")]) for v in variants]
        lines.append("| query-blind | " + " | ".join(cells) + " | - |")
    if "mbg" in variants:
        bins = [k for k in (results["runs"][0] if results["runs"] else {}) if k.startswith("acc_scale_")]
        layered = any("correctness_l1" in r for r in results["runs"])
        lines += ["", "**Table 2** MBG: mask correctness and accuracy (%) by target scale", "",
                  "| attention | correctness | " + ("per layer, first to last | " if layered else "")
                  + " | ".join(b[len("acc_scale_"):] for b in bins) + " |",
                  "|---|---|" + ("---|" if layered else "") + "---|" * len(bins)]
        for kind in sc["kinds"]:
            runs = _runs(results, "table1", "mbg", kind)
            pc = PAPER["correctness"].get(kind)
            corr = _cell([r["correctness"] for r in runs], pct=False) + (f" [{pc:.2f}]" if pc is not None else "")
            per_layer = (f"{_layer_cell(runs)} | " if layered else "")
            lines.append(f"| {KIND_NAMES[kind]} | {corr} | {per_layer}"
                         + " | ".join(_cell([r[b] for r in runs]) for b in bins) + " |")
        if uniform:
            cell = _cell([uniform[k] for k in uniform if k.startswith("table1/mbg/")], pct=False)
            lines.append(f"| uniform mask | {cell} | " + ("- | " if layered else "") + " | ".join("-" for _ in bins)
                         + " |")
    if sc["inverse_kinds"]:
        layered = any("correctness_l1" in r for r in results["runs"] if r["group"] == "inverse")
        lines += ["", "**Inverse attribute prediction** (MBG, query a colour, answer the digit)", "",
                  "| attention | accuracy (%) | correctness |" + (" per layer, first to last |" if layered else ""),
                  "|---|---|---|" + ("---|" if layered else "")]
        for kind in sc["inverse_kinds"]:
            runs = _runs(results, "inverse", "mbg", kind)
            pa = PAPER["inverse"].get(kind)
            lines.append(f"| {KIND_NAMES[kind]} | {_cell([r['accuracy'] for r in runs])}"
                         + (f" [{pa[0]:.1f}]" if pa else "") + f" | {_cell([r['correctness'] for r in runs], False)}"
                         + (f" [{pa[1]:.2f}]" if pa else "") + " |" + (f" {_layer_cell(runs)} |" if layered else ""))
        if base:
            lines.append(f"| query-blind | {_cell([base[k] for k in base if k.startswith('inverse/')])} | - |"
                         + (" - |" if layered else ""))
        if uniform:
            lines.append(f"| uniform mask | - | {_cell([uniform[k] for k in uniform if k.startswith('inverse/')], False)}"
                         " |" + (" - |" if layered else ""))
    if base:
        lines += ["", "query-blind: the best expected accuracy without the query (the colour most digits "
                      "in the image share; for the inverse task any one of the digits), on the same test sets."]
    if uniform:
        lines += ["", "uniform mask: the correctness of a mask equal everywhere (the target digit's share of "
                      "the image), the level attention starts from."]
    if any("correctness_l1" in r for r in results["runs"]):
        lines += ["", "correctness: the paper's metric, the share of the product of all layers' masks (upsampled) "
                      "inside the target digit; per layer: each layer's mask alone (means over seeds)."]
    lines += ["", f"Wall time {results.get('wall_s', float('nan')) / 60:.1f} min on {results.get('machine', '?')}."]
    return "\n".join(lines) + "\n"


def _machine() -> str:
    import platform

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    threads = torch.get_num_threads()
    return f"{platform.machine()} {dev}, torch {torch.__version__}, {threads} torch thread(s) per run"


def _run_job(cfg_dict: dict, device: Optional[str], threads: int) -> dict:
    import warnings

    import torch
    from mmengine.config import Config

    # mmengine switches a spawned worker's start method to fork and says so.
    warnings.filterwarnings("ignore", message="Multi-processing start method")
    torch.set_num_threads(threads)
    return _with_curve(*run_pan(Config(cfg_dict), device=device))


def _with_curve(metrics: dict, runner) -> dict:
    # The run's attention measured along training (PANCurveHook) travels with its metrics.
    return dict(metrics, curve=curve_points(runner))


# Fields that do not change what a run is: the free-text note, and those that choose which runs make up the tables.
_PLAN_FIELDS = ("note", "seeds", "variants", "kinds", "inverse_kinds")


def _settings(scale: dict) -> dict:
    # Compared as JSON gives them back (tuples as lists); fields a results
    # file predates take their defaults.
    defaults = {f.name: f.default for f in fields(Scale) if f.default is not dataclasses.MISSING}
    return {k: v for k, v in json.loads(json.dumps({**defaults, **scale})).items() if k not in _PLAN_FIELDS}


def _run_key(run: dict) -> Tuple[str, str, str, int]:
    return run["group"], run["variant"], run["kind"], run["seed"]


def reproduce(scale: Union[str, Scale] = "small", out: str = "arnn_reproduce", device: Optional[str] = None,
              progress: bool = True, log: Callable[[str], None] = print, cache_dir: Optional[str] = "default",
              jobs: int = 1):
    """Run Table 1, Table 2 and the inverse experiment at ``scale``; write ``results.json`` and ``results.md``.

    ``scale`` is a name in :data:`SCALES` or a :class:`Scale` of one's own
    (e.g. ``dataclasses.replace(SCALES["small"], iters=4000)``). Runs
    already in ``out/results.json`` that were trained with the same sizes
    and belong to this plan are kept, so an interrupted reproduction
    continues where it stopped and more seeds or kinds train only the new
    runs; other sizes (iterations, data, model) start afresh. ``jobs > 1`` trains
    that many models at once in worker processes (each with this process's
    torch thread count); the data sets are generated first, here.

    Returns:
        the results dict (``runs``: one dict per trained model with its
        group, variant, kind, seed and test metrics).
    """
    if isinstance(scale, Scale):
        sc = scale
        scale = next((name for name, s in SCALES.items() if s == sc), "custom")
    elif scale in SCALES:
        sc = SCALES[scale]
    else:
        raise ValueError(f"reproduce: scale must be one of {list(SCALES)} or a Scale, got {scale!r}")
    check_int("reproduce", "jobs", jobs)
    os.makedirs(out, exist_ok=True)
    json_path, md_path = osp.join(out, "results.json"), osp.join(out, "results.md")
    results = {"scale_name": scale, "scale": asdict(sc), "runs": [], "machine": _machine(), "wall_s": 0.0}
    plan = [("table1", v, k, s, "color") for v in sc.variants for s in sc.seeds for k in sc.kinds]
    plan += [("inverse", "mbg", k, s, "digit") for s in sc.seeds for k in sc.inverse_kinds]
    if osp.isfile(json_path):
        with open(json_path) as f:
            old = json.load(f)
        if _settings(old.get("scale", {})) == _settings(asdict(sc)):
            wanted = {j[:4] for j in plan}
            results["runs"] = [r for r in old.get("runs", []) if _run_key(r) in wanted]
            results["wall_s"] = old.get("wall_s", 0.0)
    done = {_run_key(r) for r in results["runs"]}
    todo = [j for j in plan if j[:4] not in done]
    t_start = time.perf_counter()
    wall0 = results["wall_s"]
    configs = []
    for n, (group, variant, kind, seed, task) in enumerate(todo, 1):
        tag = f"[{n}/{len(todo)}] {group} {variant} {KIND_NAMES[kind]} seed {seed}"
        cfg = pan_config(
            kind, sc, variant=variant, task=task, seed=1000 + seed, data_seed=seed,
            work_dir=osp.join(out, "runs", f"{group}_{variant}_{kind}_s{seed}"),
            cache_dir=cache_dir, progress=progress and jobs == 1, desc=tag, checkpoint=False,
            curve_interval=max(1, sc.iters // 10),
        )
        configs.append((tag, (group, variant, kind, seed), cfg))

    def record(tag, key, metrics):
        group, variant, kind, seed = key
        results["runs"].append(dict(group=group, variant=variant, kind=kind, seed=seed, **metrics))
        results["wall_s"] = wall0 + time.perf_counter() - t_start
        log(f"{tag}: accuracy {100 * metrics['accuracy']:.1f}%  correctness {metrics['correctness']:.3f}  "
            f"{metrics['sec_per_step']:.3f} s/step")
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)

    if jobs == 1:
        for tag, key, cfg in configs:
            record(tag, key, _with_curve(*run_pan(cfg, device=device)))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        import torch

        # Data first, in this process: workers then only read the cache.
        if cache_dir is not None:
            from ..data.cached import MultiDigitTensors

            seen = set()
            for _, _, cfg in configs:
                for key in ("train_dataloader", "test_dataloader"):
                    d = dict(cfg[key]["dataset"])
                    d.pop("type")
                    sig = json.dumps(d, sort_keys=True, default=str)
                    if sig not in seen:
                        seen.add(sig)
                        MultiDigitTensors(**d)
        from tqdm.auto import tqdm

        threads = torch.get_num_threads()
        # Workers train without their own bars (they would overwrite each other): one bar over runs here.
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool, \
                tqdm(total=len(configs), desc=f"reproduce {scale}", unit="run", disable=not progress) as bar:
            futures = {pool.submit(_run_job, cfg.to_dict(), device, threads): (tag, key) for tag, key, cfg in configs}
            for fut in cf.as_completed(futures):
                tag, key = futures[fut]
                with bar.external_write_mode():  # the run's line goes above the bar, not through it
                    record(tag, key, fut.result())
                bar.update()
    results["wall_s"] = wall0 + time.perf_counter() - t_start
    # The level every model starts from, for reading the tables.
    results["baselines"], results["uniform_correctness"] = _baselines(sc, plan)
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    with open(md_path, "w") as f:
        f.write(format_tables(results))
    from .plots import reproduce_curves_pngs

    reproduce_curves_pngs(results, out)
    return results
