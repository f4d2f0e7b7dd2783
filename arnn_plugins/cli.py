"""The ``arnn-plugins`` command line.

Commands: ``demo`` (the main job: local attention against ARNN on the outline task and PAN on MBG^inv),
``train`` / ``eval`` / ``show`` (mmengine configs, see ``configs/``),
``reproduce`` (the paper's attribute tables), ``bench`` and ``list``.
Usage errors (a bad config path, key, value or option, device or work dir,
a damaged checkpoint or one that does not fit the model) exit with code 2
and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .checks import check_device

__all__ = ["main"]


def _cmd_list(args) -> int:
    from . import arnn, ops
    from .registry import get_adapter, list_adapters

    print("layers:   AttentionRNN, BlockAttentionRNN, ARNNGate")
    print(f"combine:  {', '.join(arnn.COMBINE_MODES)}  (sample=True for ARNN~)")
    import torch

    from .ops.triton_scan import triton_scan_supported

    here = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [n if n != "triton" or triton_scan_supported(here) else "triton (needs CUDA)"
             for n in ops.available_backends()]
    print(f"backends: {', '.join(names)}  (auto here: {ops.resolve_backend('auto', here)})")
    print("adapters:")
    for name in list_adapters():
        a = get_adapter(name)
        print(f"  {name:<22} {a.kind:<7} {a.host:<32} {a.description}")
    try:
        from .engine.config import list_configs
    except ImportError as e:  # the engine needs mmengine; the layers do not
        print(f"configs:  (train / eval / show need mmengine: {e})")
    else:
        print(f"configs:  {', '.join(list_configs())}  (by name from any folder: arnn-plugins train pan_tiny)")
    return 0


def _set_threads(n) -> None:
    if n is not None:
        import torch

        if n < 1:
            raise ValueError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def _cmd_demo(args) -> int:
    check_device(args.device)
    _set_threads(args.threads)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.outline:
        from .experiments.outline import run_outline_demo

        run_outline_demo(out=args.out, seconds=float("inf") if args.seconds is None else args.seconds,
                         steps=args.steps, seeds=args.seeds)
        return 0
    from .experiments.demo import run_pan_demo

    run_pan_demo(quick=args.quick, out=args.out, work_dir=args.work_dir, device=args.device,
                 progress=not args.no_progress, seeds=args.seeds, jobs=args.jobs, threads=args.threads,
                 task=args.task)
    return 0


def _runner(args, **kw):
    from .engine.runner import prepare_runner

    check_device(args.device)
    _set_threads(getattr(args, "threads", None))
    return prepare_runner(args.config, args.cfg_options, work_dir=args.work_dir, device=args.device,
                          verbose=args.verbose, **kw)


def _cmd_train(args) -> int:
    from .engine.runner import checkpoint_loading, last_checkpoint

    # The thread count too: in a distributed run build_runner divides the
    # machine's cores among its processes unless --threads says otherwise.
    runner = _runner(args, amp=args.amp, resume=args.resume, launcher=args.launcher, threads=args.threads,
                     loops=("train",))
    with checkpoint_loading():
        runner.train()
    # Rank 0 alone writes checkpoints and last_checkpoint; other ranks may
    # finish before it has, and would print a stale or empty path.
    if runner.rank == 0:
        print(f"trained to iteration {runner.iter} (epoch {runner.epoch}); "
              f"checkpoint: {last_checkpoint(runner.work_dir)}")
    return 0


def _output_file(path: str, option: str = "--out") -> str:
    """Create ``path``'s folder and check that it can be written.

    Failing here costs nothing; failing after the work would cost the work.
    """
    import os

    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot create the folder {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{option} {path}: the folder {folder} cannot be written")
    return path


def _cmd_eval(args) -> int:

    from mmengine.model import is_model_wrapper

    from .engine.checkpoints import fit_error, state_dict_of, state_dict_problems
    from .engine.runner import build_loop, checkpoint_loading
    from .serialization import read_checkpoint

    # Everything that can go wrong is found before the evaluation runs: a
    # damaged file, a checkpoint of another model, an output path.
    weights = state_dict_of(read_checkpoint(args.checkpoint), args.checkpoint)
    if args.out:
        _output_file(args.out)
    runner = _runner(args, load_from=args.checkpoint)
    loop = "test" if args.test or not runner.cfg.get("val_dataloader") else "val"
    build_loop(runner, loop, args.config)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    # mmengine's loader copies what fits and only logs the rest, which would
    # print metrics of a half-initialised model.
    problems = state_dict_problems(model, weights)
    if problems and not args.no_strict:
        raise fit_error(args.checkpoint, model, problems, "pass --no-strict to evaluate the tensors that fit")
    for problem in problems:
        print(f"warning: {args.checkpoint}: {problem}; --no-strict: evaluating with the tensors that fit",
              file=sys.stderr)
    with checkpoint_loading():
        metrics = runner.test() if loop == "test" else runner.val()
    metrics = {k: float(v) for k, v in metrics.items()}
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}")
    if args.out:
        write_metrics_json(args.out, metrics)
    return 0


def write_metrics_json(path: str, metrics) -> None:
    """Write ``{name: float}`` as strict JSON: a metric that is NaN or infinite is ``null``, not a bare ``NaN``."""
    import json
    import math

    strict = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
    with open(path, "w") as f:
        json.dump(strict, f, indent=1, allow_nan=False)


def _cmd_show(args) -> int:
    import torch
    from mmengine.registry import DATASETS

    from .engine.runner import build_model, load_config
    from .experiments.pictures import mask_panel_png, pan_masks

    if len(args.pairs) % 2:
        raise ValueError("show: give CONFIG CHECKPOINT pairs (one pair per model)")
    check_device(args.device)
    _output_file(args.out)
    pairs = list(zip(args.pairs[::2], args.pairs[1::2]))
    panels, data, task = {}, None, "color"
    for config, ckpt in pairs:
        cfg = load_config(config, args.cfg_options)
        if cfg.model.get("type") != "PANModel":
            raise ValueError(f"show: {config} is not a PAN config (model type {cfg.model.get('type')!r})")
        model = build_model(cfg, ckpt, device=args.device)
        if data is None:
            loader = cfg.get(f"{args.split}_dataloader")
            if not loader:
                raise ValueError(f"show: {config} has no {args.split}_dataloader")
            ds = DATASETS.build(loader["dataset"])
            items = [ds[i] for i in range(min(args.num, len(ds)))]
            data = {k: torch.stack([torch.as_tensor(it[k]) for it in items])
                    for k in ("image", "query", "answer", "mask")}
            task = loader["dataset"].get("task", "color")
        name = model.pan.attention_kind.upper()
        while name in panels:
            name += "'"
        panels[name] = pan_masks(model, data["image"], data["query"])
    size = mask_panel_png(args.out, data["image"], data["query"], data["answer"], panels, task=task,
                          target_masks=data["mask"], scale=args.scale)
    print(f"masks of {', '.join(panels)} written to {args.out} ({size[0]}x{size[1]})")
    return 0


def _cmd_reproduce(args) -> int:
    import os

    from .experiments.reproduce import reproduce

    check_device(args.device)
    _set_threads(args.threads)
    res = reproduce(args.scale, out=args.out, device=args.device, progress=not args.no_progress, jobs=args.jobs)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    print(f"written {os.path.join(args.out, 'results.md')} and results.json ({len(res['runs'])} runs)")
    return 0


def _cmd_export(args) -> int:
    from .engine.runner import load_config
    from .experiments.export import export_model

    _set_threads(args.threads)
    cfg = load_config(args.config, args.cfg_options)
    res = export_model(cfg, args.checkpoint, args.format, args.out)
    check = "onnxruntime" if args.format == "onnx" else "torch.export.load"
    verdict = "matches" if res["ok"] else "DOES NOT match"
    print(f"exported {args.config} ({', '.join(res['inputs'])} -> outputs, dynamic batch) to {res['path']}; "
          f"run by {check} on another batch it {verdict} PyTorch (max abs diff {res['max_abs_diff']:.2e})")
    return 0 if res["ok"] else 1


def _cmd_bench(args) -> int:
    from .experiments.bench import run

    if args.profile and args.device != "cpu":
        print("arnn-plugins bench: --profile measures the CPU train step; drop --device", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("arnn-plugins bench: --device cuda asked for, but no CUDA device is available", file=sys.stderr)
            return 2
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.repeats is not None and args.repeats < 3 and not args.scaling:
        print(f"arnn-plugins bench: --repeats {args.repeats}: medians of fewer than 3 interleaved repeats are "
              "noise on a shared machine; the tables will say so", file=sys.stderr)
    _set_threads(args.threads)
    if args.profile or args.scaling:
        parts = []
        if args.profile:
            from .experiments.profiling import run_profile

            parts.append(run_profile(batch=args.batch or 16, threads=args.threads or 2))
        if args.scaling:
            from .experiments.scaling import run_scaling

            parts.append(run_scaling(device=args.device, repeats=args.repeats or 2, plot=args.plot))
        table = "\n\n".join(parts)
    else:
        table = run(device=args.device, repeats=args.repeats or 3, layer=not args.no_layer, resnet=not args.no_resnet,
                    batch=args.batch, amp=args.amp, size=args.size, compile=args.compile)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


def _cmd_plot(args) -> int:
    from .experiments import plots

    _output_file(args.out)
    if args.what == "dependency":
        if args.runs:
            raise ValueError("plot dependency takes no run folders")
        plots.dependency_png(args.out)
    else:
        if not args.runs:
            raise ValueError("plot curves: give one or more run folders (a demo's --work-dir, an mmengine work dir)")
        curves, levels = {}, {}
        for run in args.runs:
            for kind, series in plots.read_curves(run).items():
                curves[kind if kind not in curves else f"{kind} ({run})"] = series
            # The first folder's level: folders of one task share the test set.
            levels = levels or plots.read_levels(run)
        plots.curves_png(curves, args.out, levels=levels)
    print(f"written {args.out}")
    return 0


class DictAction(argparse.Action):
    """``KEY=VALUE`` pairs into a dict; values as mmengine reads them (numbers, lists, tuples, bools)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from mmengine.config import DictAction as _MM

        out = dict(getattr(namespace, self.dest, None) or {})
        for kv in values:
            if "=" not in kv or not kv.split("=", 1)[0]:
                parser.error(f"{option_string}: expected KEY=VALUE, got {kv!r}")
            key, val = kv.split("=", 1)
            out[key] = _MM._parse_iterable(val)
        setattr(namespace, self.dest, out)


THREADS_HELP = ("CPU threads for torch (default 1: ARNN's scan is many small ops, and on a busy 2-core machine "
                "two threads made a PAN+ARNN step 3x slower than one)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``arnn-plugins``."""
    from .experiments.recipes import SCALES

    from . import __version__

    p = argparse.ArgumentParser(prog="arnn-plugins", description="AttentionRNN plugins for model zoos")
    p.add_argument("--version", action="version", version=f"arnn-plugins {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="layers, variants, backends and adapters")
    s.set_defaults(fn=_cmd_list)

    s = sub.add_parser("demo", help="main job: the outline-fill task and PAN on MBG^inv, local attention against "
                                    "ARNN over three seeds; prints tables with spreads, writes mask PNGs and curves")
    s.add_argument("--quick", action="store_true",
                   help="the short version (a few minutes; too short for PAN to separate the kinds)")
    s.add_argument("--out", default="arnn_demo.png", help="PNG of the masks")
    s.add_argument("--work-dir", default="work_dirs/demo", help="checkpoints and logs")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1, the setting the docs' figures are for: each run's "
                        "figures depend on its seed and on this, not on --jobs or the machine's load)")
    s.add_argument("--jobs", type=int, default=2, help="runs trained at once, one process each (default 2)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model seeds (default 0 1 2)")
    s.add_argument("--task", default="digit", choices=["digit", "color"],
                   help="digit (default): MBG^inv, query a colour, answer the digit; color: query a digit, "
                        "answer its colour (needs far longer training than the demo's)")
    s.add_argument("--outline", action="store_true", help="the outline-fill mask task instead")
    s.add_argument("--steps", type=int, default=600, help="(--outline) training steps per model")
    s.add_argument("--seconds", type=float, default=None,
                   help="(--outline) also stop after this many seconds per model (figures then depend on speed)")
    s.set_defaults(fn=_cmd_demo)

    def runner_args(s, work_dir=True):
        s.add_argument("config", help="a shipped config's name (pan_tiny, pan_mbg_arnn: `arnn-plugins list`) or a "
                                      "config file")
        s.add_argument("--cfg-options", nargs="+", action=DictAction, default=None, metavar="KEY=VALUE",
                       help="override config entries, e.g. train_cfg.max_iters=100 model.attention=ctx")
        if work_dir:
            s.add_argument("--work-dir", default=None, help="checkpoints and logs (default work_dirs/<config>)")
        s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        s.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
        s.add_argument("--verbose", action="store_true",
                       help="mmengine's start-up tables and log lines on the console too (always in the work dir's log)")

    s = sub.add_parser("train", help="train a config with mmengine's Runner")
    runner_args(s)
    s.add_argument("--launcher", default=None, choices=["none", "pytorch", "slurm", "mpi"],
                   help="distributed launcher: pytorch under torchrun, slurm under srun, mpi under mpirun "
                        "(default: the config's launcher, else none); in a distributed run --threads defaults "
                        "to the machine's cores divided by its processes")
    s.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    s.add_argument("--resume", action="store_true",
                   help="continue from the work dir's last checkpoint (if that is damaged, the newest one that reads)")
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("eval", help="evaluate a checkpoint (validation set; --test for the test set)")
    runner_args(s)
    s.add_argument("checkpoint")
    s.add_argument("--test", action="store_true", help="use the config's test set")
    s.add_argument("--out", default=None, help="also write the metrics as JSON (its folder is created)")
    s.add_argument("--no-strict", action="store_true",
                   help="evaluate even if the checkpoint does not fit the model (default: refuse, listing the keys)")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("show", help="masks of one or more PAN checkpoints to a PNG")
    s.add_argument("pairs", nargs="+", metavar="CONFIG CHECKPOINT",
                   help="config and checkpoint; repeat the pair for several models side by side")
    s.add_argument("--out", default="masks.png")
    s.add_argument("--num", type=int, default=6, help="items (rows)")
    s.add_argument("--split", default="test", choices=["train", "val", "test"])
    s.add_argument("--scale", type=int, default=2, help="pixels per image pixel")
    s.add_argument("--cfg-options", nargs="+", action=DictAction, default=None, metavar="KEY=VALUE")
    s.add_argument("--device", default=None, help="cpu or cuda: where the models run (default cpu)")
    s.set_defaults(fn=_cmd_show)

    s = sub.add_parser("reproduce", help="the paper's Table 1, Table 2 and inverse experiment (markdown + JSON)")
    s.add_argument("--scale", default="small", choices=list(SCALES),
                   help="tiny: seconds (plumbing); small: about an hour on 2 CPU cores; long: MBG only, "
                        "2500 iterations, three seeds, about 90 minutes; full: paper sizes, GPU")
    s.add_argument("--tiny", dest="scale", action="store_const", const="tiny", help="same as --scale tiny")
    s.add_argument("--out", default="arnn_reproduce", help="folder for results.md, results.json and runs/")
    s.add_argument("--device", default=None)
    s.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    s.add_argument("--jobs", type=int, default=1, help="models trained at once in worker processes (2 on 2 cores)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=_cmd_reproduce)

    s = sub.add_parser("export", help="a config's model to ONNX or torch.export (.pt2), checked against PyTorch")
    s.add_argument("config", help="mmengine Python config, e.g. configs/pan_mbg_arnn.py")
    s.add_argument("checkpoint", nargs="?", default=None, help="weights (default: the model's initialisation)")
    s.add_argument("--format", choices=["onnx", "pt2"], default="onnx")
    s.add_argument("--out", required=True, help="file to write (.onnx or .pt2)")
    s.add_argument("--cfg-options", nargs="+", action=DictAction, default=None, metavar="KEY=VALUE")
    s.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser("plot", help="training curves of runs, or the figure of what a[i, j] depends on (PNG)")
    s.add_argument("what", choices=["curves", "dependency"])
    s.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help="(curves) folders with a curves.json (the demo's work dir) or mmengine work dirs")
    s.add_argument("--out", required=True, help="PNG to write")
    s.set_defaults(fn=_cmd_plot)

    s = sub.add_parser("bench", help="speed and memory tables")
    s.add_argument("--device", default="cpu")
    s.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 3; --scaling: 2)")
    s.add_argument("--batch", type=int, default=None)
    s.add_argument("--size", type=int, default=None, help="layer benchmark map size")
    s.add_argument("--amp", action="store_true", help="autocast in the train-step benchmark")
    s.add_argument("--compile", action="store_true",
                   help="also the train-step table for torch.compile'd models (compile time apart)")
    s.add_argument("--no-layer", action="store_true")
    s.add_argument("--no-resnet", action="store_true")
    s.add_argument("--profile", action="store_true",
                   help="instead: torch.profiler table of one ResNet18+CBAM and +ARNN train step (self CPU per op)")
    s.add_argument("--scaling", action="store_true",
                   help="instead: layer fwd+bwd time and memory against map size, batch and t, with exponents")
    s.add_argument("--plot", default="scaling.png", help="with --scaling: the log-log chart to write (PNG)")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; --profile: 2)")
    s.add_argument("--out", default=None, help="also write the markdown tables here")
    s.set_defaults(fn=_cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit code (2 for usage errors)."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"arnn-plugins {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
