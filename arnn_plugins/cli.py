"""The ``arnn-plugins`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main"]


def _cmd_list(args) -> int:
    from . import arnn, scan
    from .registry import get_adapter, list_adapters

    print("layers:   AttentionRNN, BlockAttentionRNN, ARNNGate")
    print(f"combine:  {', '.join(arnn.COMBINE_MODES)}  (sample=True for ARNN~)")
    print(f"backends: {', '.join(scan.available_backends())}  (auto picks the fastest here)")
    print("adapters:")
    for name in list_adapters():
        a = get_adapter(name)
        print(f"  {name:<22} {a.kind:<7} {a.description}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_outline_demo

    run_outline_demo(out=args.out, seconds=args.seconds)
    return 0


def _cmd_bench(args) -> int:
    from .bench import run

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("arnn-plugins bench: --device cuda asked for, but no CUDA device is available", file=sys.stderr)
            return 2
    table = run(device=args.device, repeats=args.repeats, layer=not args.no_layer, resnet=not args.no_resnet,
                batch=args.batch, amp=args.amp, size=args.size)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``arnn-plugins``."""
    p = argparse.ArgumentParser(prog="arnn-plugins", description="AttentionRNN plugins for model zoos")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="layers, variants, backends and adapters")
    s.set_defaults(fn=_cmd_list)

    s = sub.add_parser("demo", help="train local attention and ARNN on a small mask task, write a PNG")
    s.add_argument("--out", default="arnn_demo.png", help="PNG of the masks")
    s.add_argument("--seconds", type=float, default=30.0, help="training time per model")
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("bench", help="speed and memory tables")
    s.add_argument("--device", default="cpu")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--batch", type=int, default=None)
    s.add_argument("--size", type=int, default=None, help="layer benchmark map size")
    s.add_argument("--amp", action="store_true", help="autocast in the train-step benchmark")
    s.add_argument("--no-layer", action="store_true")
    s.add_argument("--no-resnet", action="store_true")
    s.add_argument("--out", default=None, help="also write the markdown tables here")
    s.set_defaults(fn=_cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit code (2 for usage errors)."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"arnn-plugins {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
