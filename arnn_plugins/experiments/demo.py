"""The main job (``arnn-plugins demo``): local attention against AttentionRNN on MBG.

:func:`run_pan_demo` trains the PAN attribute network with local 3x3
attention (``ctx``) and with AttentionRNN (``arnn``) on a small MBG set
(generated from the MNIST digits and photographs that installed packages
ship; nothing is downloaded), prints accuracy, mask correctness and time
per step, and writes a PNG of the masks
(:func:`~arnn_plugins.experiments.pictures.mask_panel_png`). Its sizes are
:data:`~arnn_plugins.experiments.recipes.DEMO_SCALES`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, Optional

import torch

from ..data import MultiDigitDataset, query_blind_accuracy, uniform_mask_correctness
from .pictures import mask_panel_png, pan_masks
from .recipes import DEMO_SCALES, pan_config, run_pan

__all__ = ["run_pan_demo"]


def run_pan_demo(quick: bool = False, out: str = "arnn_demo.png", work_dir: str = "work_dirs/demo",
                 device: Optional[str] = None, progress: bool = True, show_items: int = 6,
                 **changes) -> Dict[str, Dict[str, float]]:
    """Train PAN with ``ctx`` and with ``arnn`` on small MBG; print the table, write the mask PNG.

    ``**changes`` replace fields of the :data:`DEMO_SCALES` entry
    (``n_train=``, ``iters=``, ...). Returns per kind the test metrics
    (``accuracy``, ``correctness``, ``sec_per_step``, ...).
    """
    sc = DEMO_SCALES["quick" if quick else "default"]
    sc = dataclasses.replace(sc, **changes) if changes else sc
    t0 = time.perf_counter()
    results, runners = {}, {}
    for kind in sc.kinds:
        cfg = pan_config(kind, sc, variant="mbg", seed=0, data_seed=0, work_dir=os.path.join(work_dir, kind),
                         progress=progress, desc=f"train PAN+{kind}")
        results[kind], runners[kind] = run_pan(cfg, device=device)
    wall = time.perf_counter() - t0
    print()
    print(f"PAN on MBG ({sc.size} px with {sc.num_digits[0]}-{sc.num_digits[1]} digits, {sc.n_train} training / "
          f"{sc.n_test} test items, {sc.iters} steps of {sc.batch})")
    print(f"{'attention':<10} {'accuracy':>9} {'mask corr.':>11} {'s/step':>8}   per-layer corr., first to last")
    for kind, r in results.items():
        n_layers = sum(k.startswith("correctness_l") for k in r)
        layers = " / ".join(f"{r[f'correctness_l{k}']:.2f}" for k in range(1, n_layers + 1))
        print(f"{kind:<10} {100 * r['accuracy']:>8.1f}% {r['correctness']:>11.3f} {r['sec_per_step']:>8.3f}   "
              f"{layers}")
    test_set = MultiDigitDataset("mbg", "test", sc.n_test, size=sc.size, seed=0, num_digits=tuple(sc.num_digits),
                                 scale_range=tuple(sc.scale_range))
    blind, uniform = query_blind_accuracy(test_set), uniform_mask_correctness(test_set)
    print(f"{'blind':<10} {100 * blind:>8.1f}% {uniform:>11.3f}            "
          "(without the query: the colour most digits share; a uniform mask)")
    print("(chance: 20% accuracy; correctness = share of the layers' mask product on the queried digit;\n"
          " per layer: each layer's mask alone)")
    test = runners["arnn"].test_dataloader.dataset
    sel = list(range(min(show_items, len(test))))
    batch = [test[i] for i in sel]
    images = torch.stack([b["image"] for b in batch])
    queries = torch.stack([b["query"] for b in batch])
    answers = torch.stack([b["answer"] for b in batch])
    masks = torch.stack([b["mask"] for b in batch])
    panels = {kind.upper(): pan_masks(runners[kind].model, images, queries) for kind in sc.kinds}
    mask_panel_png(out, images, queries, answers, panels, target_masks=masks)
    print(f"masks written to {out}  (wall time {wall / 60:.1f} min)")
    for kind in results:
        results[kind]["wall_s"] = wall
    return results
