"""One source of truth for the PAN recipes: sizes (:class:`Scale`) and the config they make.

The demo (:data:`DEMO_SCALES`), the reproduction (:data:`SCALES`) and the
shipped configs ``configs/pan_mbg_arnn.py`` / ``pan_mbg_ctx.py``
(:data:`CONFIG_SCALE`; a test checks that the files and :func:`pan_config`
agree) all go through :func:`pan_config`, and :func:`run_pan` trains and
tests one of its configs with mmengine's Runner.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = [
    "Scale",
    "SCALES",
    "DEMO_SCALES",
    "DEMO_TASK",
    "CONFIG_SCALE",
    "TABLE1_KINDS",
    "INVERSE_KINDS",
    "KIND_NAMES",
    "PAPER",
    "pan_config",
    "run_pan",
    "curve_points",
    "mask_start",
    "query_phrase",
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
    """Sizes of one PAN setting: data, model, training, and which runs make up the tables."""

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
    head_query: bool = True  # the head sees the one-hot query too (PAN's classifier sees only the attended feature)
    mask_bias: float = 0.0  # added to the sigmoid masks' logits: masks start near sigmoid(mask_bias)
    query_film: bool = False  # the query also scales the features each attention layer reads (PAN query_film)
    variants: Tuple[str, ...] = ("mref", "mdist", "mbg")
    kinds: Tuple[str, ...] = TABLE1_KINDS
    inverse_kinds: Tuple[str, ...] = INVERSE_KINDS
    note: str = ""


# 2-3 large digits in 48 px images: the layout that learns within CPU budgets.
_SMALL_LAYOUT = dict(size=48, num_digits=(2, 3), scale_range=(1.5, 3.0), readout="pool")

# Masks that start open (sigmoid(2) = 0.88 instead of 0.5). BatchNorm undoes a
# mask's overall scale, not its variation over space: relative to its value a
# gate's slope is 0.12 at 0.88 against 0.5 at 0.5, so a random initial mask
# distorts the features about 4x less, and a gate has further to go before it
# closes (as CTX's did in the runs that stayed on the plateau). Chosen on the
# demo's seeds 0-2 and checked on others (docs/demo.md, "Sensitivity").
MASK_BIAS = 2.0


def mask_start(mask_bias: float) -> str:
    """``", masks starting at 0.88"`` for ``mask_bias=2`` (the sigmoid masks' value at init); ``""`` for 0."""
    return f", masks starting at {1 / (1 + math.exp(-mask_bias)):.2f}" if mask_bias else ""


# The query also scales, per channel, the features each attention layer reads
# (PAN query_film). Added to a bias before a ReLU / tanh (CTX) or concatenated
# with the context (ARNN, as the paper says), the query can only shift which
# features fire; finding the queried colour's digit wants a product of query
# and features. With it both kinds left the query-blind plateau in every seed
# measured (without it CTX stayed on it in 15 of 33 seed-runs), so the demo
# compares learnt masks with learnt masks (docs/demo.md, "Sensitivity").
QUERY_FILM = True


def query_phrase(query_film: bool) -> str:
    """``", the query also scaling the features attention reads"`` when ``query_film``; ``""`` otherwise."""
    return ", the query also scaling the features attention reads" if query_film else ""


SCALES: Dict[str, Scale] = {
    "tiny": Scale(size=32, n_train=32, n_test=16, iters=2, batch=8, seeds=(0, 1), hidden=4, channels=8,
                  num_stacks=3, variants=("mref", "mbg"), kinds=("san", "ctx", "arnn"), inverse_kinds=("ctx", "arnn"),
                  note="plumbing check only (a few runs of 2 steps); numbers mean nothing"),
    "small": Scale(n_train=20000, n_test=1000, iters=1000, batch=32, seeds=(0, 1), **_SMALL_LAYOUT,
                   note="48 px images with 2-3 large digits (scales 1.5-3.0; 5-9 digits at 0.5-3.0 do not "
                        "learn in a CPU budget), 20k training items, 1000 iterations of 32, mask-weighted "
                        "pooled readout: about an hour on 2 CPU cores with --jobs 2"),
    "long": Scale(n_train=20000, n_test=1000, iters=2500, batch=32, seeds=(0, 1, 2), variants=("mbg",),
                  mask_bias=MASK_BIAS, **_SMALL_LAYOUT,
                  note="the small layout on MBG only (Table 1's MBG column, Table 2, the inverse task), masks "
                       "starting open as the demo's, trained 2500 iterations: long enough for models to leave the "
                       "query-blind level; about 90 minutes on 2 CPU cores with --jobs 2"),
    "full": Scale(size=100, n_train=30000, n_test=10000, iters=14000, batch=32, seeds=(0, 1, 2), lr=1e-3,
                  note="the paper's image and data set sizes (30k / 10k), 15 epochs; for a GPU"),
}

# The demo's task: the inverse one (MBG^inv, paper 4.1), which leaves the query-blind level within its budget.
DEMO_TASK = "digit"
_DEMO = dict(seeds=(0,), variants=("mbg",), kinds=("ctx", "arnn"), inverse_kinds=(), **_SMALL_LAYOUT)
DEMO_SCALES: Dict[str, Scale] = {
    # Per run 1000 steps on one thread (CTX about 0.07 s a step, ARNN 0.10 on an idle core); the demo trains
    # both kinds for three seeds, two runs at once: 5.3 minutes measured on two idle cores. In MBG^inv both
    # kinds start on a plateau at the query-blind level; by 1000 steps both have left it in each demo seed.
    "default": Scale(n_train=20000, n_test=500, iters=1000, batch=32, mask_bias=MASK_BIAS, query_film=QUERY_FILM,
                     **_DEMO,
                     note="arnn-plugins demo"),
    # With the outline task at 400 steps, under two minutes on two idle cores: too short for either PAN kind
    # to leave the plateau.
    "quick": Scale(n_train=2000, n_test=300, iters=150, batch=32, mask_bias=MASK_BIAS, query_film=QUERY_FILM,
                   **_DEMO,
                   note="arnn-plugins demo --quick"),
}

# configs/pan_mbg_arnn.py and pan_mbg_ctx.py (with 500 validation items): about 4 minutes on 2 idle cores.
CONFIG_SCALE = Scale(n_train=10000, n_test=500, iters=800, batch=32, **_DEMO, note="configs/pan_mbg_*.py")
CONFIG_VAL = 500


def pan_config(attention: str, scale: Scale, *, variant: str = "mbg", task: str = "color", n_val: int = 0,
               seed: int = 0, data_seed: int = 0, work_dir: str = "work_dirs/pan",
               cache_dir: Optional[str] = "default", progress: bool = True, desc: Optional[str] = None,
               log_level: str = "ERROR", checkpoint: bool = True, curve_interval: int = 0,
               curve_items: int = 256, **changes):
    """The mmengine config of one PAN run at ``scale`` (as ``configs/pan_mbg_arnn.py``).

    Args:
        attention: PAN attention kind (``ctx``, ``arnn``, ...).
        scale: sizes; ``**changes`` replace fields of it (``iters=100``).
        variant, task: the multi-digit data set (``mbg``; ``color`` or the
            inverse ``digit`` task).
        n_val: validation items (0: no validation; the test split of
            ``scale.n_test`` items is what :func:`run_pan` reports).
        seed, data_seed: the run's and the data's seeds.
        progress: add a :class:`~arnn_plugins.engine.ProgressBarHook` bar.
        checkpoint: save one checkpoint at the end.
        curve_interval: with ``> 0``, a :class:`~arnn_plugins.engine.pan.PANCurveHook`
            measures the attention every that many steps on the first
            ``curve_items`` test items and writes ``curve.json`` to the work dir.

    Returns:
        an ``mmengine.config.Config``.
    """
    from mmengine.config import Config

    sc = dataclasses.replace(scale, **changes) if changes else scale
    data = dict(type="MultiDigitTensors", variant=variant, task=task, size=sc.size, seed=data_seed,
                num_digits=tuple(sc.num_digits), scale_range=tuple(sc.scale_range), cache_dir=cache_dir)
    loader = dict(num_workers=0, collate_fn=dict(type="default_collate"))
    nq, nc = (10, 5) if task == "color" else (5, 10)
    iters, lr = sc.iters, sc.lr
    warm = max(1, min(20, iters // 10))
    cfg = dict(
        custom_imports=dict(imports=["arnn_plugins.engine"], allow_failed_imports=False),
        work_dir=work_dir,
        model=dict(type="PANModel", attention=attention, image_size=sc.size, num_classes=nc, num_queries=nq,
                   hidden_channels=sc.hidden, channels=sc.channels, num_stacks=sc.num_stacks,
                   batch_norm=sc.batch_norm, readout=sc.readout,
                   **({} if sc.head_query else dict(head_query=False)),
                   **(dict(mask_bias=sc.mask_bias) if sc.mask_bias else {}),
                   **(dict(query_film=True) if sc.query_film else {})),
        train_dataloader=dict(loader, batch_size=sc.batch, sampler=dict(type="InfiniteSampler", shuffle=True),
                              dataset=dict(data, split="train", length=sc.n_train)),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters),
        test_dataloader=dict(loader, batch_size=64, sampler=dict(type="DefaultSampler", shuffle=False),
                             dataset=dict(data, split="test", length=sc.n_test)),
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
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="auto")),  # NCCL on CUDA, gloo on CPU
        default_scope=None,
    )
    if curve_interval:
        cfg["custom_hooks"].append(dict(type="PANCurveHook", interval=curve_interval, num_items=curve_items))
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
    (``accuracy``, ``correctness``, ``correctness_l<k>``, ``acc_scale_*``)
    plus ``sec_per_step`` (median training step), ``train_s`` and ``iters``.
    """
    from ..engine.hooks import ProgressBarHook
    from ..engine.runner import build_runner, checkpoint_loading

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


def curve_points(runner) -> list:
    """The points a run's :class:`~arnn_plugins.engine.pan.PANCurveHook` recorded (empty without one)."""
    from ..engine.pan import PANCurveHook

    hook = next((h for h in runner.hooks if isinstance(h, PANCurveHook)), None)
    return list(hook.points) if hook else []
