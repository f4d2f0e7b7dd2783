"""Page faults and system time per train step of the ``arnn-plugins bench`` ResNet18 models.

    python tools/step_faults.py [--steps 5] [--threads 2]

``getrusage`` around ``--steps`` train steps of each model (after three
warm-up steps), per step: minor page faults, system and user CPU time,
wall time. Run it under ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...``
to see what glibc's allocator settings change.
"""

import argparse
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from arnn_plugins.experiments.bench import resnet18_models, train_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 128, 128), torch.randint(0, 10, (16,))
    print("| model | minor faults / step | system ms / step | user ms / step | wall ms / step |")
    print("|---|---:|---:|---:|---:|")
    for name, model in resnet18_models().items():
        step = train_step(model.train(), x, y)
        for _ in range(3):
            step()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(args.steps):
            step()
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        n = args.steps
        print(f"| {name} | {(r1.ru_minflt - r0.ru_minflt) / n:.0f} | {1e3 * (r1.ru_stime - r0.ru_stime) / n:.1f} "
              f"| {1e3 * (r1.ru_utime - r0.ru_utime) / n:.1f} | {1e3 * (t1 - t0) / n:.1f} |")


if __name__ == "__main__":
    main()
