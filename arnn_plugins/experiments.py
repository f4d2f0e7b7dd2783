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

import json
import math
import os
import os.path as osp
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "Scale",
    "SCALES",
    "TABLE1_KINDS",
    "INVERSE_KINDS",
    "KIND_NAMES",
    "pan_config",
    "run_pan",
    "query_blind_accuracy",
    "uniform_mask_correctness",
    "reproduce",
    "format_tables",
]

TABLE1_KINDS = ("san", "noctx", "ctx", "arnn", "arnn_ind", "arnn_sample")
INVERSE_KINDS = ("noctx", "ctx", "arnn")
KIND_NAMES = {"san": "SAN", "noctx": "-CTX", "ctx": "CTX", "arnn": "ARNN", "arnn_ind": "ARNN_ind",
              "arnn_sample": "ARNN~", "none": "NONE", "brnn": "BRNN"}
# The paper's numbers (Tables 1-2 and the inverse experiment), for the report.
PAPER = {
    "table1": {"san": (83.42, 80.06, 58.07), "noctx": (95.69, 89.92, 69.33), "ctx": (98.00, 95.37, 80.32),
               "arnn_sample": (98.65, 96.20, 85.18), "arnn_ind": (98.39, 95.32, 80.00),
               "arnn": (98.72, 96.70, 87.38)},
    "correctness": {"san": 0.15, "noctx": 0.28, "ctx": 0.31, "arnn_sample": 0.36, "arnn_ind": 0.34, "arnn": 0.42},
    "inverse": {"noctx": (40.15, 0.20), "ctx": (66.37, 0.24), "arnn": (72.77, 0.39)},
}


@dataclass(frozen=True)
class Scale:
    """Sizes of one reproduction setting."""

    size: int  # image side in pixels
    n_train: int
    n_test: int
    iters: int  # training iterations per run
    batch: int
    seeds: Tuple[int, ...]
    lr: float = 2e-3
    hidden: int = 16  # ARNN LSTM width (local attention uses twice this)
    channels: int = 32
    num_stacks: int = 4
    batch_norm: bool = True  # BatchNorm after each conv: much faster start on short CPU budgets
    num_digits: Tuple[int, int] = (5, 9)  # digits per image (the paper: 5-9)
    scale_range: Tuple[float, float] = (0.5, 3.0)  # digit scales (the paper: 0.5-3.0)
    readout: str = "flatten"  # PAN head: "flatten" or "pool" (mask-weighted average)
    variants: Tuple[str, ...] = ("mref", "mdist", "mbg")
    kinds: Tuple[str, ...] = TABLE1_KINDS
    inverse_kinds: Tuple[str, ...] = INVERSE_KINDS
    note: str = ""


SCALES: Dict[str, Scale] = {
    "tiny": Scale(size=32, n_train=32, n_test=16, iters=2, batch=8, seeds=(0, 1), hidden=4, channels=8,
                  num_stacks=3, variants=("mref", "mbg"), kinds=("san", "ctx", "arnn"), inverse_kinds=("ctx", "arnn"),
                  note="plumbing check only (a few runs of 2 steps); numbers mean nothing"),
    "small": Scale(size=48, n_train=20000, n_test=1000, iters=1000, batch=32, seeds=(0, 1), num_digits=(2, 3),
                   scale_range=(1.5, 3.0), readout="pool",
                   note="48 px images with 2-3 large digits (scales 1.5-3.0; 5-9 digits at 0.5-3.0 do not "
                        "learn in a CPU budget), 20k training items, 1000 iterations of 32, mask-weighted "
                        "pooled readout: about an hour on 2 CPU cores with --jobs 2"),
    "long": Scale(size=48, n_train=20000, n_test=1000, iters=2500, batch=32, seeds=(0, 1, 2), num_digits=(2, 3),
                  scale_range=(1.5, 3.0), readout="pool", variants=("mbg",),
                  note="the small layout on MBG only (Table 1's MBG column, Table 2, the inverse task), trained "
                       "2500 iterations: long enough for models to leave the query-blind level; about 90 minutes "
                       "on 2 CPU cores with --jobs 2"),
    "full": Scale(size=100, n_train=30000, n_test=10000, iters=14000, batch=32, seeds=(0, 1, 2), lr=1e-3,
                  note="the paper's image and data set sizes (30k / 10k), 15 epochs; for a GPU"),
}


def pan_config(attention: str, *, variant: str = "mbg", task: str = "color", size: int = 64, n_train: int = 3000,
               n_val: int = 0, n_test: int = 500, iters: int = 240, batch: int = 32, lr: float = 2e-3,
               seed: int = 0, data_seed: int = 0, hidden: int = 16, channels: int = 32, num_stacks: int = 4,
               batch_norm: bool = True, num_digits: Optional[Tuple[int, int]] = None,
               scale_range: Optional[Tuple[float, float]] = None, readout: str = "flatten",
               work_dir: str = "work_dirs/pan", cache_dir: Optional[str] = "default",
               progress: bool = True,
               desc: Optional[str] = None, log_level: str = "ERROR", checkpoint: bool = True):
    """An mmengine config (as in ``configs/pan_mbg_arnn.py``) for one PAN run.

    ``num_digits`` / ``scale_range`` (``None``: the data set's defaults,
    5-9 digits at scales 0.5-3.0) shape the images; ``readout`` is PAN's head
    (``"flatten"`` or ``"pool"``). ``n_val = 0`` trains without validation; the test split (``n_test``
    items) is what :func:`run_pan` reports. ``progress`` adds a
    :class:`~arnn_plugins.engine.ProgressBarHook` (tqdm, with ETA).
    """
    from mmengine.config import Config

    data = dict(type="MultiDigitTensors", variant=variant, task=task, size=size, seed=data_seed, cache_dir=cache_dir)
    if num_digits is not None:
        data["num_digits"] = tuple(num_digits)
    if scale_range is not None:
        data["scale_range"] = tuple(scale_range)
    loader = dict(num_workers=0, collate_fn=dict(type="default_collate"))
    nq, nc = (10, 5) if task == "color" else (5, 10)
    warm = max(1, min(20, iters // 10))
    cfg = dict(
        custom_imports=dict(imports=["arnn_plugins.engine"], allow_failed_imports=False),
        work_dir=work_dir,
        model=dict(type="PANModel", attention=attention, image_size=size, num_classes=nc, num_queries=nq,
                   hidden_channels=hidden, channels=channels, num_stacks=num_stacks, batch_norm=batch_norm,
                   readout=readout),
        train_dataloader=dict(loader, batch_size=batch, sampler=dict(type="InfiniteSampler", shuffle=True),
                              dataset=dict(data, split="train", length=n_train)),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters),
        test_dataloader=dict(loader, batch_size=64, sampler=dict(type="DefaultSampler", shuffle=False),
                             dataset=dict(data, split="test", length=n_test)),
        test_cfg=dict(type="TestLoop"),
        test_evaluator=dict(type="PANMetric"),
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="Adam", lr=lr), clip_grad=dict(max_norm=5.0)),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=warm),
            dict(type="CosineAnnealingLR", by_epoch=False, begin=warm, end=max(iters, warm + 1), eta_min=lr / 20),
        ],
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=max(1, iters // 10)),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", interval=iters if checkpoint else -1, by_epoch=False,
                            max_keep_ckpts=1),
            sampler_seed=dict(type="DistSamplerSeedHook"),
        ),
        custom_hooks=[dict(type="ProgressBarHook", desc=desc or f"{variant} {attention}", enabled=progress)],
        log_processor=dict(by_epoch=False, window_size=max(1, min(20, iters // 10))),
        log_level=log_level,
        randomness=dict(seed=seed),
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo")),
        default_scope=None,
    )
    if n_val:
        cfg.update(
            val_dataloader=dict(loader, batch_size=64, sampler=dict(type="DefaultSampler", shuffle=False),
                                dataset=dict(data, split="val", length=n_val)),
            val_cfg=dict(type="ValLoop"),
            val_evaluator=dict(type="PANMetric"),
        )
    return Config(cfg)


def run_pan(cfg, device: Optional[str] = None, amp: bool = False):
    """Train then test one config; returns ``(metrics, runner)``.

    ``metrics`` has the test metrics without the ``pan/`` prefix
    (``accuracy``, ``correctness``, ``acc_scale_*``) plus ``sec_per_step``
    (median training step), ``train_s`` and ``iters``.
    """
    from .engine import ProgressBarHook, build_runner, checkpoint_loading

    runner = build_runner(cfg, device=device, amp=amp)
    t0 = time.perf_counter()
    with checkpoint_loading():
        runner.train()
    train_s = time.perf_counter() - t0
    with checkpoint_loading():
        test = runner.test()
    metrics = {k.split("/", 1)[-1]: float(v) for k, v in test.items()}
    hook = next((h for h in runner.hooks if isinstance(h, ProgressBarHook)), None)
    metrics["sec_per_step"] = hook.seconds_per_step() if hook else float("nan")
    metrics["train_s"] = train_s
    metrics["iters"] = runner.iter
    return metrics, runner


def query_blind_accuracy(dataset) -> float:
    """Expected accuracy of the best answer that looks at the image but not the query.

    The target is one of the image's digits at random, so without the query
    the best colour answer is the colour most digits share (ties split), and
    the best digit answer (inverse task, digits of distinct classes) is any
    of the ``n`` digits, right ``1 / n`` of the time. This is the level a
    model reaches before its attention follows the query.

    Args:
        dataset: a :class:`~arnn_plugins.data.MultiDigitDataset`.
    """
    import numpy as np

    total = 0.0
    for i in range(len(dataset)):
        s = dataset.sample(i)
        if dataset.task == "color":
            counts = np.bincount(s.colours, minlength=int(s.colours.max()) + 1)
            best = np.flatnonzero(counts == counts.max())
            total += float(s.colours[s.target] in best) / len(best)
        else:
            total += 1.0 / len(s.classes)
    return total / max(len(dataset), 1)


def uniform_mask_correctness(dataset) -> float:
    """Mask correctness of a uniform mask: the target digit's mean share of the image.

    The level attention starts from; a mask scores above it only where it
    weights the queried digit more than the rest of the image.

    Args:
        dataset: a :class:`~arnn_plugins.data.MultiDigitDataset`.
    """
    total = 0.0
    for i in range(len(dataset)):
        total += float(dataset.sample(i).mask.mean())
    return total / max(len(dataset), 1)


def _baselines(sc: "Scale", plan) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Query-blind accuracy and uniform-mask correctness per ``group/variant/seed`` test set of the plan."""
    from .data import MultiDigitDataset

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
             f"of batch {sc['batch']}, PAN readout `{sc.get('readout', 'flatten')}`, seeds {list(sc['seeds'])}; "
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
    return run_pan(Config(cfg_dict), device=device)[0]


# Fields that do not change what a run is: the free-text note, and those that choose which runs make up the tables.
_PLAN_FIELDS = ("note", "seeds", "variants", "kinds", "inverse_kinds")


def _settings(scale: dict) -> dict:
    # Compared as JSON gives them back (tuples as lists).
    return {k: v for k, v in json.loads(json.dumps(scale)).items() if k not in _PLAN_FIELDS}


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
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"reproduce: jobs must be an int >= 1, got {jobs!r}")
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
            kind, variant=variant, task=task, size=sc.size, n_train=sc.n_train, n_test=sc.n_test, iters=sc.iters,
            batch=sc.batch, lr=sc.lr, seed=1000 + seed, data_seed=seed, hidden=sc.hidden, channels=sc.channels,
            num_stacks=sc.num_stacks, batch_norm=sc.batch_norm, num_digits=sc.num_digits,
            scale_range=sc.scale_range, readout=sc.readout,
            work_dir=osp.join(out, "runs", f"{group}_{variant}_{kind}_s{seed}"),
            cache_dir=cache_dir, progress=progress and jobs == 1, desc=tag, checkpoint=False,
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
            record(tag, key, run_pan(cfg, device=device)[0])
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        import torch

        # Data first, in this process: workers then only read the cache.
        if cache_dir is not None:
            from .engine import MultiDigitTensors

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
    return results
