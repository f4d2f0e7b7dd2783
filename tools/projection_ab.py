"""The input projection inside the C kernel against the batched matmul, in one process.

    python tools/projection_ab.py [--repeats 30] [--threads 2]

For each shape ``(B, C, H, W, t, Q)`` builds one ``AttentionRNN`` and a copy
that is handed the fused scan as a callable backend, which makes
:func:`arnn_plugins.ops.projected_lstm` take its unfused path (batched
matmul, then the scan). Prints, per shape, whether the output and every
gradient are the same to the bit, then the forward+backward medians of
``--repeats`` interleaved repeats and their ratio. Bit-for-bit agreement
holds where the kernel sums the projection in the order the BLAS batched
matmul does on this machine.
"""

import argparse
import statistics
import time

import torch

SHAPES = [(32, 64, 32, 32, 16, 0), (16, 64, 32, 32, 16, 0), (5, 24, 7, 9, 16, 16), (3, 8, 6, 5, 8, 0),
          (6, 12, 5, 8, 5, 4), (8, 64, 32, 32, 64, 0)]


def _pair(b, c, h, w, t, q):
    from arnn_plugins import AttentionRNN
    from arnn_plugins.ops import fused_scan

    torch.manual_seed(0)
    fused = AttentionRNN(c, t, query_channels=q)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    unfused = AttentionRNN(c, t, query_channels=q, backend=fused_scan)
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(b, c, h, w, requires_grad=True)
    query = torch.randn(b, q) if q else None
    grad = torch.randn(b, 1, h, w)

    def run(m):
        y = m(x, query) if q else m(x)
        return [y.detach(), *torch.autograd.grad(y, [x, *m.parameters()], grad)]

    return lambda: run(fused), lambda: run(unfused)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| B, C, H, W, t, Q | same bits | in the kernel ms | unfused ms | ratio |")
    print("|---|---|---:|---:|---:|")
    for shape in SHAPES:
        fused, unfused = _pair(*shape)
        same = all(torch.equal(a, b) for a, b in zip(fused(), unfused()))
        times = {fused: [], unfused: []}
        for _ in range(args.repeats):
            for fn in times:
                t0 = time.perf_counter()
                fn()
                times[fn].append((time.perf_counter() - t0) * 1e3)
        a, b = statistics.median(times[fused]), statistics.median(times[unfused])
        print(f"| {', '.join(map(str, shape))} | {'yes' if same else 'no'} | {a:.2f} | {b:.2f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()
