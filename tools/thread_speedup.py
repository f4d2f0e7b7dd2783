"""Speed-up from a second torch thread: two ResNet18 train steps, a conv and the ARNN forward.

    python tools/thread_speedup.py [--repeats 7] [--parts]

Times each case at 1 and at 2 torch threads in one process, repeats
interleaved, and prints the medians and their ratio. The cases: the timm
ResNet18+CBAM and +CBAM+ARNN train steps of ``arnn-plugins bench`` (batch
16, 128x128), a 3x3 conv of 128 channels at 16x16 (batch 16, forward and
backward) and ``AttentionRNN(64)``'s forward on 16x64x32x32. With
``--parts``, then the spatial branches of ``arnn-plugins bench --profile``
(:func:`~arnn_plugins.experiments.profiling.attention_parts`, summed over
the eight modules) at 1 and at 2 threads.
"""

import argparse
import statistics
import time

import torch

from arnn_plugins import AttentionRNN
from arnn_plugins.experiments.bench import resnet18_models, train_step


def cases():
    """name -> a call that runs the case once."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 128, 128), torch.randint(0, 100, (16,))
    models = resnet18_models()
    out = {f"{name} train step": train_step(models[name].train(), x, y)
           for name in ("resnet18+cbam", "resnet18+cbam+arnn")}
    conv, xc = torch.nn.Conv2d(128, 128, 3, padding=1), torch.randn(16, 128, 16, 16, requires_grad=True)
    out["conv 128->128 3x3, 16x16 fwd+bwd"] = lambda: conv(xc).sum().backward()
    layer, xa = AttentionRNN(64), torch.randn(16, 64, 32, 32)

    def arnn_forward():
        with torch.no_grad():
            layer(xa)

    out["AttentionRNN(64) 32x32 fwd"] = arnn_forward
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--parts", action="store_true", help="also the spatial branches by part, at 1 and 2 threads")
    args = p.parse_args()
    runs = cases()
    times = {(k, t): [] for k in runs for t in (1, 2)}
    for t in (1, 2):  # warm-up at both thread counts
        torch.set_num_threads(t)
        for fn in runs.values():
            fn()
    for _ in range(args.repeats):
        for t in (1, 2):
            torch.set_num_threads(t)
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[(k, t)].append((time.perf_counter() - t0) * 1e3)
    print(f"{'case':<34} {'1 thread ms':>12} {'2 threads ms':>13} {'speed-up':>9}")
    for k in runs:
        one, two = statistics.median(times[(k, 1)]), statistics.median(times[(k, 2)])
        print(f"{k:<34} {one:12.1f} {two:13.1f} {one / two:8.2f}x")
    if args.parts:
        from arnn_plugins.experiments.profiling import attention_parts

        keys = ("cbam", "arnn", "context", "scan", "rest", "pooled")
        total = {t: {k: sum(r[k] for r in attention_parts(threads=t, repeats=args.repeats)) for k in keys}
                 for t in (1, 2)}
        print(f"\n{'spatial branches, fwd+bwd, summed':<34} {'1 thread ms':>12} {'2 threads ms':>13} {'speed-up':>9}")
        for k in keys:
            print(f"{k:<34} {total[1][k]:12.1f} {total[2][k]:13.1f} {total[1][k] / total[2][k]:8.2f}x")


if __name__ == "__main__":
    main()
