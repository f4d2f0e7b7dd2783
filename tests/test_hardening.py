"""Faults a careful user can cause, and what each must give: read the tables as the contract.

1. ``LIBRARY_FAULTS``: bad layer arguments and inputs (wrong device, dtype,
   NaN), bad adapter names, damaged or hostile checkpoint files -> the
   error class and the words of its message.
2. ``CLI_FAULTS``: bad config keys (nested too), values, paths, options and
   checkpoints given to ``arnn-plugins`` -> exit code 2 and one line that
   says what is wrong (never a traceback).
3. What the fixes make work: gates placed like their host, the package's own
   checkpoints read safely, ``--resume`` past a damaged checkpoint, a
   training killed mid-checkpoint that resumes.
4. A seeded, bounded fuzz test of AttentionRNN, BlockAttentionRNN, ARNNGate
   and ``diagonal_lstm`` on every CPU backend: a clear TypeError/ValueError
   naming the layer, or a result equal to the reference backend's.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import arnn_plugins as ap
from arnn_plugins.arnn import AttentionRNN, BlockAttentionRNN
from arnn_plugins.checks import check_bool, check_float, check_like
from arnn_plugins.cli import main
from arnn_plugins.finetune import CheckpointError, load_pretrained, read_checkpoint, read_state_dict
from arnn_plugins.gate import ARNNGate
from arnn_plugins.ops import available_backends, diagonal_lstm
from arnn_plugins.ops.fused import fused_scan_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "pan_tiny.py")
# pan_tiny cut to 4 iterations with checkpoints at 2 and 4.
SHORT = ["train_cfg.max_iters=4", "train_cfg.val_interval=4", "default_hooks.checkpoint.interval=2"]
SENTINEL = "arnn_hardening_pickle_ran"


class _RunsCode:
    """Unpickling this runs ``open(path, 'w')``: what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _ReachesPastTheBuffer:
    """Unpickling this calls ``getattr(HistoryBuffer, '__init__')``, a step towards code."""

    def __reduce__(self):
        from mmengine.logging.history_buffer import HistoryBuffer

        return (getattr, (HistoryBuffer, "__init__"))


def _bad_files(d):
    """``{kind: path}`` of checkpoint files a reader must refuse, made in folder ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    good = d / "good.pth"
    torch.save({"state_dict": {"w": torch.ones(3)}}, good)
    data = good.read_bytes()
    files = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": bytes(range(256)) * 8,
             "text": b"not a checkpoint\n"}
    out = {}
    for kind, payload in files.items():
        out[kind] = d / f"{kind}.pth"
        out[kind].write_bytes(payload)
    out["runs_code"] = d / "runs_code.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _RunsCode(str(d / SENTINEL))}, out["runs_code"])
    out["getattr"] = d / "getattr.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _ReachesPastTheBuffer()}, out["getattr"])
    return out


# --------------------------------------------------------------------------- 1. library faults


class _NoChannels(nn.Module):
    out_channels = 0

    def forward(self, x):
        return x


x4 = torch.randn(2, 4, 5, 6)

LIBRARY_FAULTS = [
    # Device and dtype of the input against the layer's parameters.
    ("meta input, CPU layer", lambda d: AttentionRNN(4)(x4.to("meta")),
     ValueError, r"^AttentionRNN: input is on meta but the layer's parameters are on cpu"),
    ("meta query, CPU layer", lambda d: AttentionRNN(4, query_channels=3)(x4, torch.zeros(2, 3, device="meta")),
     ValueError, r"^AttentionRNN: query is on meta but the layer's parameters are on cpu"),
    ("float64 input, float32 layer", lambda d: AttentionRNN(4)(x4.double()),
     TypeError, r"^AttentionRNN: input has dtype torch.float64 but the layer's parameters are torch.float32"),
    ("float16 input, float32 block layer", lambda d: BlockAttentionRNN(4)(x4.half()),
     TypeError, r"^BlockAttentionRNN: input has dtype torch.float16 but .* torch.float32"),
    ("bfloat16 input, float32 gate", lambda d: ARNNGate(4)(x4.bfloat16()),
     TypeError, r"^ARNNGate: input has dtype torch.bfloat16 but .* torch.float32"),
    ("float32 input, float64 layer", lambda d: AttentionRNN(4).double()(x4),
     TypeError, r"^AttentionRNN: input has dtype torch.float32 but .* torch.float64"),
    ("gate given 3 channels for 4", lambda d: ARNNGate(4)(torch.randn(1, 3, 4, 4)),
     ValueError, r"^ARNNGate: expected input of shape \(B, 4, H, W\)"),
    # Constructor arguments.
    ("ARNNGate block_size=0", lambda d: ARNNGate(4, block_size=0),
     ValueError, r"^ARNNGate: block_size must be an int >= 1, got 0"),
    ("ARNNGate block_size=-2", lambda d: ARNNGate(4, block_size=-2),
     ValueError, r"^ARNNGate: block_size must be an int >= 1, got -2"),
    ("ARNNGate block_size='2'", lambda d: ARNNGate(4, block_size="2"),
     TypeError, r"^ARNNGate: block_size must be an int >= 1, got str '2'"),
    ("ARNNGate in_channels=0", lambda d: ARNNGate(0), ValueError, r"^ARNNGate: in_channels must be an int >= 1"),
    ("BlockAttentionRNN in_channels=0", lambda d: BlockAttentionRNN(0),
     ValueError, r"^BlockAttentionRNN: in_channels must be an int >= 1"),
    ("min_sigma=nan", lambda d: AttentionRNN(4, min_sigma=float("nan")),
     ValueError, r"^AttentionRNN: min_sigma must be a finite number > 0.0, got nan"),
    ("min_sigma=inf", lambda d: AttentionRNN(4, min_sigma=float("inf")),
     ValueError, r"^AttentionRNN: min_sigma must be a finite number > 0.0, got inf"),
    ("min_sigma='0.1'", lambda d: AttentionRNN(4, min_sigma="0.1"),
     TypeError, r"^AttentionRNN: min_sigma must be a finite number > 0.0, got str"),
    ("ARNNGate min_sigma=nan", lambda d: ARNNGate(4, min_sigma=float("nan")),
     ValueError, r"^AttentionRNN: min_sigma must be a finite number"),
    ("combine_hidden=0", lambda d: AttentionRNN(4, combine_hidden=0),
     ValueError, r"^AttentionRNN: combine_hidden must be an int >= 1, got 0"),
    ("context_channels=0", lambda d: AttentionRNN(4, context_channels=0),
     ValueError, r"^AttentionRNN: context_channels must be an int >= 1, got 0"),
    ("context_net with out_channels=0", lambda d: AttentionRNN(4, context_net=_NoChannels()),
     ValueError, r"^AttentionRNN: context_channels \(context_net.out_channels\) must be an int >= 1"),
    ("context_kernel=True", lambda d: AttentionRNN(4, context_kernel=True),
     TypeError, r"^AttentionRNN: context_kernel must be an odd int >= 1, got bool True"),
    ("sample='yes'", lambda d: AttentionRNN(4, sample="yes"),
     TypeError, r"^AttentionRNN: sample must be True or False, got str 'yes'"),
    ("shift=1", lambda d: AttentionRNN(4, shift=1), TypeError, r"^AttentionRNN: shift must be True or False"),
    # Adapter names.
    ("swap_attention(adapters=[3])", lambda d: ap.swap_attention(nn.Conv2d(1, 1, 1), adapters=[3]),
     TypeError, r"^swap_attention: adapters must be adapter names \(str\), got int 3"),
    ("insert_attention(adapters=[None])", lambda d: ap.insert_attention(nn.Conv2d(1, 1, 1), adapters=[None]),
     TypeError, r"^insert_attention: adapters must be adapter names"),
    # Checkpoint files: each message names the file and what is wrong with it.
    ("read_state_dict: truncated file", lambda d: read_state_dict(_bad_files(d)["truncated"]),
     CheckpointError, r"truncated\.pth is truncated or damaged \(\d+ bytes; the zip archive"),
    ("read_state_dict: empty file", lambda d: read_state_dict(_bad_files(d)["empty"]),
     CheckpointError, r"empty\.pth is empty \(0 bytes\)"),
    ("read_state_dict: random bytes", lambda d: read_state_dict(_bad_files(d)["garbage"]),
     CheckpointError, r"garbage\.pth is not a PyTorch checkpoint"),
    ("read_state_dict: a text file", lambda d: read_state_dict(_bad_files(d)["text"]),
     CheckpointError, r"text\.pth is not a PyTorch checkpoint"),
    ("read_state_dict: pickle that runs code", lambda d: read_state_dict(_bad_files(d)["runs_code"]),
     CheckpointError, r"runs_code\.pth: refusing to unpickle .*open.*can run code from the file"),
    ("read_state_dict: getattr past the log buffers", lambda d: read_state_dict(_bad_files(d)["getattr"]),
     CheckpointError, r"getattr\.pth: refusing to unpickle getattr\(HistoryBuffer, '__init__'\)"),
    ("load_pretrained: truncated file", lambda d: load_pretrained(nn.Linear(1, 1), _bad_files(d)["truncated"]),
     CheckpointError, r"truncated\.pth is truncated or damaged"),
    ("read_checkpoint: no such file", lambda d: read_checkpoint(d / "nothing.pth"),
     FileNotFoundError, r"checkpoint not found: .*nothing\.pth"),
    # The shared checks themselves.
    ("check_float(True)", lambda d: check_float("L", "x", True), TypeError, r"^L: x must be a finite number"),
    ("check_float(-1, minimum=0)", lambda d: check_float("L", "x", -1, minimum=0.0),
     ValueError, r"^L: x must be a finite number > 0.0, got -1.0"),
    ("check_bool(0)", lambda d: check_bool("L", "flag", 0), TypeError, r"^L: flag must be True or False, got int 0"),
    ("check_like: device", lambda d: check_like("L", torch.zeros(1, device="meta"), torch.zeros(1)),
     ValueError, r"^L: input is on meta but the layer's parameters are on cpu"),
]


@pytest.mark.parametrize("make, exc, words", [c[1:] for c in LIBRARY_FAULTS], ids=[c[0] for c in LIBRARY_FAULTS])
def test_library_fault_gives_a_clear_error(make, exc, words, tmp_path):
    with pytest.raises(exc, match=words) as e:
        make(tmp_path)
    # A refused file is never unpickled, so its code never runs.
    assert not (tmp_path / SENTINEL).exists()
    # torch's advice for a refused file (load with weights_only=False) runs the file's code.
    assert "weights_only" not in str(e.value)


def test_checks_accept_good_values():
    assert check_float("L", "x", 3) == 3.0 and isinstance(check_float("L", "x", 3), float)
    assert check_float("L", "x", 0.0, minimum=0.0, inclusive=True) == 0.0
    assert check_bool("L", "flag", False) is False
    check_like("L", torch.zeros(2), torch.zeros(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are what autocast is for
        check_like("L", torch.zeros(2, dtype=torch.bfloat16), torch.zeros(1))
        out = AttentionRNN(4, hidden_channels=2)(x4.bfloat16())
    assert out.shape == (2, 1, 5, 6)


def test_a_query_of_another_float_dtype_is_cast_as_documented():
    m = AttentionRNN(4, hidden_channels=2, query_channels=3)
    q = torch.randn(2, 3)
    assert torch.equal(m(x4, q.double()), m(x4, q))


# --------------------------------------------------------------------------- placement of what adapters add


def _tv_resnet():
    tv = pytest.importorskip("torchvision")
    return tv.models.resnet18(num_classes=4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_insert_attention_puts_gates_in_the_hosts_dtype(dtype):
    model = _tv_resnet().to(dtype).eval()
    names = ap.insert_attention(model, hidden_channels=2)
    for name in names:
        assert {p.dtype for p in model.get_submodule(name).parameters()} == {dtype}
    out = model(torch.randn(1, 3, 32, 32, dtype=dtype))  # was: "Input type (c10::Half) and bias type (float)"
    assert out.dtype == dtype and out.shape == (1, 4)


def test_insert_attention_puts_gates_on_the_hosts_device():
    model = _tv_resnet().to("meta")
    for name in ap.insert_attention(model, hidden_channels=2):
        assert {p.device.type for p in model.get_submodule(name).parameters()} == {"meta"}


def test_insert_attention_into_an_eval_model_gives_eval_gates():
    model = _tv_resnet().eval()
    names = ap.insert_attention(model, sample=True, hidden_channels=2)
    assert not any(model.get_submodule(n).training for n in names)
    for n in names:  # a trained (non-zero) correction, so that sampling would show
        nn.init.normal_(model.get_submodule(n).attn.combiner[-1].weight)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x), model(x))  # eval: the mean, not a sample


def test_swap_and_insert_place_through_one_step(monkeypatch):
    import arnn_plugins.registry as registry

    seen = []
    real = registry.place_like
    monkeypatch.setattr(registry, "place_like", lambda new, site, model=None: seen.append(site) or real(new, site, model))
    model = _tv_resnet().double().eval()
    ap.insert_attention(model, hidden_channels=2)
    assert seen and all(isinstance(s, nn.Module) for s in seen)


def test_swap_attention_takes_one_adapter_name_as_a_string():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), num_classes=4).half().eval()
    names = ap.swap_attention(model, adapters="timm_cbam", hidden_channels=2)  # was: "no adapter named 't'"
    assert names and all(n.endswith(".se") for n in names)
    assert {p.dtype for p in model.get_submodule(names[0]).parameters()} == {torch.float16}


# --------------------------------------------------------------------------- 2. CLI faults


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """pan_tiny trained for 4 iterations: checkpoints iter_2.pth and iter_4.pth."""
    wd = tmp_path_factory.mktemp("hardening_train")
    assert main(["train", TINY, "--work-dir", str(wd), "--device", "cpu", "--cfg-options", *SHORT]) == 0
    assert (wd / "iter_2.pth").is_file() and (wd / "iter_4.pth").is_file()
    return wd


def _copy_work_dir(src, dst):
    """A copy of a work dir whose ``last_checkpoint`` names the copy's own file (as a real work dir's does)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("2*"))  # not the timestamped log folders
    named = os.path.basename((src / "last_checkpoint").read_text().strip())
    (dst / "last_checkpoint").write_text(str(dst / named))
    return dst


def _json_config(d):
    """A JSON config of the model alone (no data, loops or optimiser)."""
    path = d / "model_only.json"
    path.write_text(json.dumps({"model": {"type": "PANModel", "attention": "arnn", "image_size": 32,
                                          "hidden_channels": 4, "channels": 8, "num_stacks": 3}}))
    return str(path)


def _damaged_work_dir(d, trained):
    wd = _copy_work_dir(trained, d / "wd")
    for f in ("iter_2.pth", "iter_4.pth"):
        (wd / f).write_bytes((wd / f).read_bytes()[:1000])
    return str(wd)


CLI_FAULTS = [
    # Checkpoints given to eval / show.
    ("eval: truncated checkpoint", lambda d, t: ["eval", TINY, str(_bad_files(d)["truncated"])],
     r"truncated\.pth is truncated or damaged"),
    ("eval: empty checkpoint", lambda d, t: ["eval", TINY, str(_bad_files(d)["empty"])], r"empty\.pth is empty"),
    ("eval: random bytes", lambda d, t: ["eval", TINY, str(_bad_files(d)["garbage"])],
     r"garbage\.pth is not a PyTorch checkpoint"),
    ("eval: pickle that runs code", lambda d, t: ["eval", TINY, str(_bad_files(d)["runs_code"])],
     r"runs_code\.pth: refusing to unpickle"),
    ("eval: ARNN checkpoint, ctx model", lambda d, t: ["eval", TINY, str(t / "iter_4.pth"), "--cfg-options",
                                                       "model.attention=ctx"],
     r"iter_4\.pth does not fit the model \(PANModel\): .*unexpected key\(s\): .*pan\.attention\.0\.weight_hh"
     r".*shape mismatch.*--no-strict"),
    ("show: ARNN checkpoint, ctx model", lambda d, t: ["show", TINY, str(t / "iter_4.pth"), "--out", str(d / "m.png"),
                                                       "--cfg-options", "model.attention=ctx"],
     r"iter_4\.pth does not fit the model \(PANModel\)"),
    ("eval: --out is a folder", lambda d, t: ["eval", TINY, str(t / "iter_4.pth"), "--out", str(d)],
     r"--out .* is a folder"),
    ("eval: --out under a file", lambda d, t: ["eval", TINY, str(t / "iter_4.pth"), "--out",
                                               str(t / "last_checkpoint" / "m.json")],
     r"--out .*: cannot create the folder"),
    # Config keys, nested ones too, with a "did you mean".
    ("model.hiden_channels", lambda d, t: ["train", TINY, "--cfg-options", "model.hiden_channels=3"],
     r"option 'model.hiden_channels': the config has no key 'hiden_channels' in model; "
     r"did you mean 'hidden_channels'\?"),
    ("train_cfg.max_iter", lambda d, t: ["train", TINY, "--cfg-options", "train_cfg.max_iter=3"],
     r"option 'train_cfg.max_iter': train_cfg \(IterBasedTrainLoop\) takes no argument 'max_iter'; "
     r"did you mean 'max_iters'\?"),
    ("max_iter (top level)", lambda d, t: ["train", TINY, "--cfg-options", "max_iter=3"],
     r"no top-level key 'max_iter'; did you mean 'max_iters'\?"),
    ("train_dataloader.dataset.lenght", lambda d, t: ["train", TINY, "--cfg-options",
                                                      "train_dataloader.dataset.lenght=4"],
     r"no key 'lenght' in train_dataloader.dataset; did you mean 'length'\?"),
    ("train_dataloader.batch_sise", lambda d, t: ["train", TINY, "--cfg-options", "train_dataloader.batch_sise=4"],
     r"did you mean 'batch_size'\?"),
    ("default_hooks.chekpoint.interval", lambda d, t: ["train", TINY, "--cfg-options",
                                                       "default_hooks.chekpoint.interval=1"],
     r"no key 'chekpoint' in default_hooks; did you mean 'checkpoint'\?"),
    # Config values.
    ("train_cfg.max_iters=-1", lambda d, t: ["train", TINY, "--cfg-options", "train_cfg.max_iters=-1"],
     r"train_cfg.max_iters must be an int >= 1, got -1"),
    ("train_cfg.val_interval=0", lambda d, t: ["train", TINY, "--cfg-options", "train_cfg.val_interval=0"],
     r"train_cfg.val_interval must be an int >= 1, got 0"),
    ("train_dataloader.batch_size=0", lambda d, t: ["train", TINY, "--cfg-options", "train_dataloader.batch_size=0"],
     r"train_dataloader.batch_size must be an int >= 1, got 0"),
    ("default_hooks.checkpoint.interval=0", lambda d, t: ["train", TINY, "--cfg-options",
                                                          "default_hooks.checkpoint.interval=0"],
     r"default_hooks.checkpoint.interval must be an int >= 1"),
    ("model.hidden_channels='abc'", lambda d, t: ["train", TINY, "--cfg-options", "model.hidden_channels=abc"],
     r"bad config .*pan_tiny\.py: AttentionRNN: hidden_channels must be an int >= 1, got str 'abc'"),
    ("train_dataloader.dataset.length=-4", lambda d, t: ["train", TINY, "--cfg-options",
                                                         "train_dataloader.dataset.length=-4"],
     r"bad config .*pan_tiny\.py: .*length must be an int >= 0, got -4"),
    # Config files and work dirs.
    ("train a JSON config of a model alone", lambda d, t: ["train", _json_config(d)],
     r"model_only\.json has no train_dataloader, train_cfg, optim_wrapper: it cannot train"),
    ("eval a JSON config of a model alone", lambda d, t: ["eval", _json_config(d), str(t / "iter_4.pth")],
     r"model_only\.json has no test_dataloader, test_cfg, test_evaluator: it cannot test"),
    ("--work-dir is a file", lambda d, t: ["train", TINY, "--work-dir", str(t / "last_checkpoint")],
     r"work dir .*last_checkpoint is a file, not a folder"),
    ("--work-dir under a file", lambda d, t: ["train", TINY, "--work-dir", str(t / "last_checkpoint" / "wd")],
     r"work dir .* cannot be written: Not a directory"),
    ("--resume, every checkpoint damaged", lambda d, t: ["train", TINY, "--resume", "--work-dir",
                                                         _damaged_work_dir(d, t)],
     r"--resume: no checkpoint in .* can be read"),
]


@pytest.mark.parametrize("make_argv, words", [c[1:] for c in CLI_FAULTS], ids=[c[0] for c in CLI_FAULTS])
def test_cli_fault_exits_2_with_one_line(make_argv, words, trained, tmp_path, capsys):
    argv = make_argv(tmp_path, trained)
    if argv[0] in ("train", "eval") and "--work-dir" not in argv:
        argv += ["--work-dir", str(tmp_path / "wd")]
    assert main(argv) == 2
    # mmengine reuses a logger made in the same second by an earlier test,
    # whose captured stream is closed by now: logging reports that on
    # stderr. It is the test's doing, not the command's.
    err = re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n?", "", capsys.readouterr().err, flags=re.S)
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"arnn-plugins {argv[0]}: ")
    assert re.search(words, line), line
    assert "Traceback" not in err and "weights_only" not in err
    assert not (tmp_path / "wd" / "iter_1.pth").exists()  # refused before any work


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_work_dir_exits_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["train", TINY, "--work-dir", str(ro / "wd")]) == 2
    finally:
        ro.chmod(0o700)
    assert "cannot be written" in capsys.readouterr().err


def test_eval_out_into_a_missing_folder_creates_it(trained, tmp_path):
    out = tmp_path / "new" / "sub" / "metrics.json"
    assert main(["eval", TINY, str(trained / "iter_4.pth"), "--work-dir", str(tmp_path / "e"), "--out", str(out)]) == 0
    assert "pan/accuracy" in json.loads(out.read_text())


def test_eval_no_strict_evaluates_what_fits_and_says_what_did_not(trained, tmp_path, capsys):
    argv = ["eval", TINY, str(trained / "iter_4.pth"), "--work-dir", str(tmp_path / "e"), "--no-strict",
            "--cfg-options", "model.attention=ctx"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "unexpected key(s): pan.attention.0.weight_hh" in cap.err and "--no-strict" in cap.err
    assert "pan/accuracy" in cap.out


# --------------------------------------------------------------------------- 3. checkpoints


def test_finetune_reads_the_packages_own_training_checkpoints(trained, tmp_path):
    from arnn_plugins.engine.runner import build_model, load_config

    ck = trained / "iter_4.pth"
    whole = read_checkpoint(ck)  # weights_only=True, mmengine's message hub included; no code runs
    assert set(whole) >= {"meta", "state_dict", "message_hub", "optimizer"}
    buffers = whole["message_hub"]["log_scalars"]
    assert buffers["train/loss"].data[0].size >= 1  # mmengine HistoryBuffers, rebuilt
    sd = read_state_dict(ck)  # was: UnpicklingError
    assert set(sd) == set(whole["state_dict"])
    from arnn_plugins.engine.runner import checkpoint_loading

    with checkpoint_loading():  # the block mmengine loads in: the same safe reading
        assert set(read_state_dict(ck)) == set(sd)
        with pytest.raises(CheckpointError, match="refusing to unpickle"):
            read_state_dict(_bad_files(tmp_path)["runs_code"])
    model = build_model(load_config(TINY))
    report = load_pretrained(model, ck)
    assert len(report.loaded) == len(sd) and not report.missing_arnn


def test_checkpoints_are_written_under_a_temporary_name_then_renamed(trained, tmp_path, monkeypatch):
    """The file under a checkpoint's name only ever holds a complete checkpoint."""
    from mmengine.fileio.backends import local_backend

    written = []
    real = local_backend.LocalBackend.put
    monkeypatch.setattr(local_backend.LocalBackend, "put",
                        lambda self, obj, path: written.append(os.path.basename(str(path))) or real(self, obj, path))
    wd = tmp_path / "wd"
    assert main(["train", TINY, "--work-dir", str(wd), "--cfg-options", "train_cfg.max_iters=1",
                 "train_cfg.val_interval=1", "default_hooks.checkpoint.interval=1"]) == 0
    assert written and all(w.startswith(".iter_1.pth.tmp-") for w in written)
    assert sorted(f for f in os.listdir(wd) if f.endswith(".pth") or ".tmp" in f) == ["iter_1.pth"]
    assert read_checkpoint(wd / "iter_1.pth")["meta"]["iter"] == 1


@pytest.mark.parametrize("fault", ["truncated", "missing", "empty last_checkpoint"])
def test_resume_passes_over_a_damaged_last_checkpoint(fault, trained, tmp_path, capsys):
    wd = _copy_work_dir(trained, tmp_path / "wd")
    last = wd / "iter_4.pth"
    if fault == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif fault == "missing":
        last.unlink()
    else:
        (wd / "last_checkpoint").write_text("")
        last.unlink()
    assert main(["train", TINY, "--work-dir", str(wd), "--resume", "--cfg-options", *SHORT]) == 0
    err = capsys.readouterr().err
    if fault != "empty last_checkpoint":
        assert f"passing over {last}" in err or f"passing over checkpoint not found: {last}" in err
    else:
        assert "last_checkpoint is empty" in err
    assert f"resuming from {wd / 'iter_2.pth'}" in err
    ck = read_checkpoint(last)  # written again, whole
    assert ck["meta"]["iter"] == 4
    assert int(next(iter(ck["optimizer"]["state"].values()))["step"]) == 4


_KILL_SCRIPT = r"""
import os, signal, sys
from mmengine.fileio.backends import local_backend

real = local_backend.LocalBackend.put

def put(self, obj, filepath):
    # The process dies half-way through writing the second checkpoint.
    if "iter_4" in os.path.basename(str(filepath)):
        with open(filepath, "wb") as f:
            f.write(obj[: len(obj) // 2])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, obj, filepath)

local_backend.LocalBackend.put = put
from arnn_plugins.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_training_killed_while_writing_a_checkpoint_resumes(tmp_path, capsys):
    wd = tmp_path / "wd"
    argv = ["train", TINY, "--work-dir", str(wd), "--device", "cpu", "--cfg-options", *SHORT]
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # No checkpoint under its name is damaged, and last_checkpoint names a complete one.
    numbered = sorted(f for f in os.listdir(wd) if f.startswith("iter_"))
    assert numbered == ["iter_2.pth"]
    assert read_checkpoint(wd / "iter_2.pth")["meta"]["iter"] == 2
    assert (wd / "last_checkpoint").read_text().strip() == str(wd / "iter_2.pth")
    # Resuming loses nothing beyond the interval being written, and tidies up.
    assert main(["train", TINY, "--work-dir", str(wd), "--resume", "--cfg-options", *SHORT]) == 0
    ck = read_checkpoint(wd / "iter_4.pth")
    assert ck["meta"]["iter"] == 4
    assert int(next(iter(ck["optimizer"]["state"].values()))["step"]) == 4
    assert not [f for f in os.listdir(wd) if ".tmp-" in f]


# --------------------------------------------------------------------------- 4. fuzz

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _cpu_backends():
    """Every CPU path behind the scan boundary: the registered CPU backends and the PyTorch fused scan."""
    return [b for b in available_backends() if b != "triton"] + [fused_scan_torch]


def _set_backend(module, backend):
    for m in module.modules():
        if isinstance(m, AttentionRNN):
            m.backend = backend


def _layer_case(rng: random.Random, device: str):
    """A random layer and input: ``(layer, x, query, expect_ok)``."""
    kind = rng.choice(["arnn", "brnn", "gate"])
    c = rng.randint(1, 4)
    kw = dict(hidden_channels=rng.randint(1, 4), context_kernel=rng.choice([1, 3]),
              query_channels=rng.choice([0, 0, 2]), combine=rng.choice(["learned", "independent"]))
    if kind == "arnn":
        layer = AttentionRNN(c, **kw)
    elif kind == "brnn":
        layer = BlockAttentionRNN(c, block_size=rng.randint(1, 3), **kw)
    else:
        layer = ARNNGate(c, block_size=rng.choice([1, 2]), **kw)
    if kind == "gate":  # a non-zero correction, so that the gate is not the identity
        nn.init.normal_(next(m for m in layer.modules() if isinstance(m, AttentionRNN)).weight_hh)
    ldtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16])
    layer = layer.to(device=device, dtype=ldtype).eval()
    ok = True
    # The input: usually right, sometimes wrong in one respect.
    b, h, w = rng.randint(1, 2), rng.randint(1, 6), rng.randint(1, 6)
    shape = [b, c, h, w]
    fault = rng.choice([None] * 6 + ["channels", "ndim3", "ndim5", "empty", "int", "dtype", "device"])
    if fault == "channels":
        shape[1] = c + 1
    elif fault == "ndim3":
        shape = shape[1:]
    elif fault == "ndim5":
        shape = [1] + shape
    elif fault == "empty":
        shape[rng.choice([0, 2, 3])] = 0
    xdtype = ldtype
    if fault == "int":
        xdtype = torch.int64
    elif fault == "dtype":
        xdtype = rng.choice([d for d in FLOATS if d != ldtype])
    xdevice = device
    if fault == "device":
        xdevice = "meta" if device == "cpu" else "cpu"
    ok = fault is None
    layout = rng.choice(["contiguous", "channels_last", "transposed", "sliced"]) if len(shape) == 4 else "contiguous"
    if layout == "transposed":
        x = torch.randn(shape[0], shape[1], shape[3], shape[2]).transpose(2, 3)
    elif layout == "sliced":
        x = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3])[..., ::2]
    else:
        x = torch.randn(shape)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    x = (x * 3).to(xdtype).to(xdevice) if xdtype == torch.int64 else x.to(device=xdevice, dtype=xdtype)
    query = None
    if kw["query_channels"]:
        qfault = rng.choice([None] * 4 + ["missing", "shape", "device"])
        query = torch.randn(b, 2, dtype=rng.choice([torch.float32, torch.float64]), device=device)
        if qfault == "missing":
            query = None
        elif qfault == "shape":
            query = torch.randn(b + 1, 2, device=device)
        elif qfault == "device":
            query = query.to("meta" if device == "cpu" else "cpu")
        ok = ok and qfault is None
    elif rng.random() < 0.1:
        query, ok = torch.randn(b, 2), False
    return layer, x, query, ok


def _run_layer_cases(device, n, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    ran = refused = 0
    for i in range(n):
        layer, x, query, ok = _layer_case(rng, device)
        name = type(layer).__name__
        _set_backend(layer, "reference")
        try:
            ref = layer(x, query)
        except (TypeError, ValueError) as e:
            assert not ok, f"case {i}: {name} refused a good input {tuple(x.shape)} {x.dtype}: {e}"
            assert str(e).startswith(f"{name}: "), f"case {i}: the error does not name {name}: {e}"
            for backend in _cpu_backends():  # the checks come before any backend
                _set_backend(layer, backend)
                with pytest.raises(type(e)):
                    layer(x, query)
            refused += 1
            continue
        assert ok, f"case {i}: {name} accepted a bad input {tuple(x.shape)} {x.dtype} {x.device}"
        assert ref.device == x.device and ref.dtype == x.dtype
        assert ref.shape == ((x.shape[0], 1) if name != "ARNNGate" else tuple(x.shape[:2])) + tuple(x.shape[2:])
        if device == "meta":
            continue
        for backend in _cpu_backends():
            _set_backend(layer, backend)
            out = layer(x, query)
            tol = TOL[x.dtype]
            assert torch.allclose(out.double(), ref.double(), atol=tol, rtol=tol), (i, backend)
        ran += 1
    return ran, refused


def test_fuzz_layers_refuse_clearly_or_agree_with_the_reference():
    ran, refused = _run_layer_cases("cpu", n=120, seed=1234)
    assert ran >= 30 and refused >= 30  # the generator covers both sides


def test_fuzz_layers_on_meta_give_shapes():
    _run_layer_cases("meta", n=30, seed=99)


def _scan_inputs(rng: random.Random):
    """A valid ``(gx (B, D, 4t, H, W), weight (D, 4t, t, 2))`` in a random layout and dtype."""
    b, d, t, h, w = rng.randint(1, 2), rng.randint(1, 2), rng.choice([1, 2, 3, 5]), rng.randint(1, 6), rng.randint(1, 6)
    dtype = rng.choice([torch.float32, torch.float64])
    layout = rng.choice(["contiguous", "permuted", "sliced", "expanded"])
    if layout == "permuted":
        gx = torch.randn(b, d, h, w, 4 * t, dtype=dtype).permute(0, 1, 4, 2, 3)
    elif layout == "sliced":
        gx = torch.randn(b, d, 4 * t, h, 2 * w, dtype=dtype)[..., 1::2]
    elif layout == "expanded":
        gx = torch.randn(1, d, 4 * t, h, w, dtype=dtype).expand(b, -1, -1, -1, -1)
    else:
        gx = torch.randn(b, d, 4 * t, h, w, dtype=dtype)
    weight = torch.randn(d, 4 * t, 2, t, dtype=dtype).transpose(2, 3) * 0.5  # non-contiguous too
    return gx, weight


def test_fuzz_diagonal_lstm_agrees_across_cpu_backends():
    rng = random.Random(2024)
    for i in range(40):
        gx, weight = _scan_inputs(rng)
        gx, weight = gx.requires_grad_(), weight.requires_grad_()
        ref = diagonal_lstm(gx, weight, "reference")
        g_ref = torch.autograd.grad(ref.square().sum(), (gx, weight))
        tol = TOL[gx.dtype] * 10
        for backend in _cpu_backends():
            out = diagonal_lstm(gx, weight, backend)
            assert out.shape == ref.shape and out.dtype == ref.dtype
            assert torch.allclose(out, ref, atol=tol, rtol=tol), (i, backend)
            grads = torch.autograd.grad(out.square().sum(), (gx, weight))
            for g, gr in zip(grads, g_ref):
                assert torch.allclose(g, gr, atol=tol * 10, rtol=tol * 10), (i, backend)


def _bad_scan_inputs():
    """Inputs the scan boundary must refuse before any kernel reads them (a kernel trusts its shapes)."""
    g = torch.randn(1, 2, 8, 4, 4)
    w = torch.randn(2, 8, 2, 2)
    return [
        ("weight for D=1, input for D=2", g, torch.randn(1, 8, 2, 2)),
        ("gate count not divisible by 4", torch.randn(1, 2, 6, 4, 4), torch.randn(2, 6, 1, 2)),
        ("t of the weight != gates / 4", g, torch.randn(2, 8, 3, 2)),
        ("3-D input", torch.randn(8, 4, 4), w),
        ("6-D input", g[None], w),
        ("kernel of 3 taps", g, torch.randn(2, 8, 2, 3)),
        ("integer input", g.long(), w),
        ("input on meta, weight on cpu", g.to("meta"), w),
    ]


_BAD_SCANS = _bad_scan_inputs()


@pytest.mark.parametrize("what, gx, weight", _BAD_SCANS, ids=[c[0] for c in _BAD_SCANS])
def test_diagonal_lstm_refuses_bad_shapes_on_every_cpu_backend(what, gx, weight):
    for backend in _cpu_backends():
        with pytest.raises((TypeError, ValueError), match=r"^diagonal_lstm: "):
            diagonal_lstm(gx, weight, backend)


def test_gate_input_check_steps_aside_for_fx_tracing():
    gate = ARNNGate(4, hidden_channels=2)
    nn.init.normal_(gate.attn.weight_hh)
    traced = torch.fx.symbolic_trace(gate)  # a Proxy is no tensor to check
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(traced(x), gate(x))
