"""Fingerprint of the demo's PAN training: the sum of every weight after a few steps.

    python tools/train_fingerprint.py --steps 1
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 python tools/train_fingerprint.py

trains CTX and ARNN as the demo's seed 0 does (1 torch thread, the same data,
the same initialisation) for ``--steps`` steps and prints, per kind, the sum
of the trained weights in float64 to 13 digits and the test accuracy. Two
environments, machines or settings train along the same trajectory only if
they print the same sums; the demo's figures after 1000 steps can agree
only then.
"""

from __future__ import annotations

import argparse
import warnings


def fingerprint(steps: int, kinds=("ctx", "arnn")) -> str:
    """One line: torch version, the CPU capability ATen uses, and per kind the weight sum after ``steps`` steps."""
    import torch
    from mmengine.config import Config

    from arnn_plugins.experiments.recipes import DEMO_SCALES, pan_config, run_pan

    torch.set_num_threads(1)
    parts = []
    for kind in kinds:
        cfg = pan_config(kind, DEMO_SCALES["default"], task="digit", seed=0, data_seed=0,
                         work_dir=f"work_dirs/fingerprint/{kind}", progress=False, checkpoint=False, iters=steps)
        metrics, runner = run_pan(Config(cfg.to_dict()), device="cpu")
        total = sum(p.detach().double().sum() for p in runner.model.parameters())
        parts.append(f"{kind} {float(total):.12e} (accuracy {100 * metrics['accuracy']:.1f}%)")
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}: " + "; ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="training steps per kind")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    print(fingerprint(a.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
