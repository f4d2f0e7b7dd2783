"""The command line: list, demo and bench on tiny settings."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from arnn_plugins import AttentionRNN
from arnn_plugins.experiments.bench import bench_layer, format_table, naive_scan
from arnn_plugins.cli import main
from arnn_plugins.experiments.outline import outline_task, train_mask_model
from arnn_plugins.ops.reference import reference_scan


def test_list_shows_layers_backends_and_adapters(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ["AttentionRNN", "BlockAttentionRNN", "fused", "reference", "timm_cbam", "timm_resnet",
                 "torchvision_resnet", "configs:", "pan_tiny"]:
        assert word in out


def test_version(capsys):
    import arnn_plugins

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"arnn-plugins {arnn_plugins.__version__}"


def test_console_script_is_installed(tmp_path):
    # The script pip wrote next to this interpreter, run outside the checkout: the installed package answers,
    # subpackages mapped from adapters/ and patches/ included.
    exe = Path(sys.executable).with_name("arnn-plugins")
    assert exe.is_file(), f"{exe} missing: the package is not installed in this environment"
    r = subprocess.run([str(exe), "list"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "adapters:" in r.stdout and "timm_cbam" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import arnn_plugins.adapters.timm_cbam, arnn_plugins.patches.timm"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_outline_task_targets_are_rectangle_interiors():
    x, y = outline_task(8, size=20, seed=3, noise=0.0)
    assert x.shape == y.shape == (8, 1, 20, 20)
    # Interiors carry no signal and outlines are never part of the target.
    assert (x[y > 0] == 0).all()
    assert (y[x > 0] == 0).all()
    assert y.sum() > 0
    x2, y2 = outline_task(8, size=20, seed=3, noise=0.0)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_outline_demo_writes_png(tmp_path, capsys):
    out = tmp_path / "masks.png"
    assert main(["demo", "--outline", "--seconds", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "local" in text and "arnn" in text and "IoU" in text
    img = Image.open(out)
    assert img.size[0] > 4 * 24 and img.size[1] > 6 * 24


def test_training_lowers_the_loss_on_the_outline_task():
    torch.manual_seed(0)
    x, y = outline_task(32, size=12, seed=0)
    _, before = train_mask_model("arnn", (x, y, x, y), seconds=0, max_steps=0)
    _, after = train_mask_model("arnn", (x, y, x, y), seconds=float("inf"), max_steps=20, batch=8)
    assert after["steps"] == 20
    assert after["bce"] < 0.9 * before["bce"]


def test_outline_runs_are_a_function_of_their_seed():
    from arnn_plugins.experiments.outline import format_outline_table

    x, y = outline_task(16, size=12, seed=0)
    a = [train_mask_model(k, (x, y, x, y), max_steps=4, batch=4, seed=s)[1] for k in ("local", "arnn") for s in (0, 1)]
    b = [train_mask_model(k, (x, y, x, y), max_steps=4, batch=4, seed=s)[1] for k in ("local", "arnn") for s in (0, 1)]
    drop = lambda r: {k: v for k, v in r.items() if k != "ms_per_step"}  # noqa: E731
    assert [drop(r) for r in a] == [drop(r) for r in b]
    assert a[0]["bce"] != a[1]["bce"]  # another seed, another model
    assert all(r["steps"] == 4 and 0 <= r["correctness"] <= 1 for r in a)
    table = format_outline_table({"local": {"per_seed": {0: a[0], 1: a[1]}}, "arnn": {"per_seed": {0: a[2], 1: a[3]}}},
                                 (0, 1))
    assert table.count("±") == 2 * 4 and "uniform" in table


def test_naive_peer_uses_the_same_kernel_taps():
    # Row 0 has no padding cells to its left, so the naive peer (which does
    # not mask padding) must agree with the reference there exactly.
    torch.manual_seed(0)
    gx, wh = torch.randn(2, 2, 12, 4, 5), torch.randn(2, 12, 3, 2)
    assert torch.allclose(naive_scan(gx, wh)[..., 0, :], reference_scan(gx, wh)[..., 0, :], atol=1e-6)


def test_bench_layer_rows_and_table():
    rows = bench_layer(batch=2, channels=4, size=5, hidden=3, backends=["reference", "fused"], repeats=1)
    assert [r.name for r in rows] == ["reference", "fused"]
    assert rows[0].ratio == pytest.approx(1.0)
    assert all(r.fwd_ms > 0 and r.fwdbwd_ms > 0 and r.held_mb > 0 and r.peak_mb >= r.held_mb for r in rows)
    table = format_table("t", rows, "speed-up")
    assert "| fused |" in table and "| reference |" in table


def test_table_shows_compile_time_only_when_measured():
    from arnn_plugins.experiments.bench import Row

    plain = format_table("t", [Row("m", 1.0, 2.0, 1.0, 1.5, ratio=1.0)], "r", step_label="train step ms")
    assert "compile s" not in plain
    timed = format_table("t", [Row("m", 1.0, 2.0, 1.0, 1.5, ratio=1.0, compile_s=12.3)], "r",
                         step_label="train step ms")
    assert "compile s |" in timed.splitlines()[2] and timed.splitlines()[-1].endswith("| 12.3 |")


def test_scaling_sweep_table_exponents_and_plot(tmp_path):
    from arnn_plugins.experiments.scaling import exponents, fit_exponent, format_scaling, plot_scaling, scaling_sweep

    assert fit_exponent([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    assert fit_exponent([4], [1.0]) is None
    calls = []
    points = scaling_sweep(axes=["size", "batch"], backends=["reference", "fused"], repeats=1,
                           values={"size": [3, 6], "batch": [1, 2]}, base=dict(batch=1, size=3, hidden=2, channels=2),
                           progress=calls.append)
    # The progress bar's total is known up front: repeats + 2 calls per point and backend.
    assert len(calls) == 4 * 2 * (1 + 2)
    assert [(p.axis, p.value) for p in points] == [("size", 3), ("size", 6), ("batch", 1), ("batch", 2)]
    assert all(p.ms[n] > 0 and p.peak_mb[n] >= p.held_mb[n] > 0 for p in points for n in ("reference", "fused"))
    exps = exponents(points)
    assert set(exps) == {"size", "batch"} and set(exps["size"]) == {"reference", "fused"}
    table = format_scaling(points, "t")
    assert "time exponent against H*W" in table and "| 6 |" in table
    # A budget of 0 ms skips a backend beyond its first point on each axis.
    skipped = scaling_sweep(axes=["batch"], backends=["fused"], repeats=1, budget_s=0.0, values={"batch": [1, 2]},
                            base=dict(size=3, hidden=2, channels=2))
    assert skipped[1].ms["fused"] is None and "skipped" in format_scaling(skipped)
    pytest.importorskip("matplotlib")
    out = plot_scaling(points, str(tmp_path / "s.png"), "t")
    assert Image.open(out).size[0] > 100


def test_profile_table_lists_totals_and_the_scan():
    pytest.importorskip("timm")
    from arnn_plugins.experiments.profiling import format_profile, profile_models

    res = profile_models(batch=2, size=32, threads=1)
    assert list(res) == ["resnet18+cbam", "resnet18+cbam+arnn"]
    assert all(r["total"][1] > 0 for r in res.values())
    ops = res["resnet18+cbam+arnn"]
    # The layer's scan, its input projection inside the C kernel.
    assert {"_CScan", "_CScanBackward", "_GateInputsBackward"} <= set(ops)
    assert not any(k.startswith(("_CScan", "_GateInputs")) for k in res["resnet18+cbam"])
    table = format_profile(res, top=40, title="t")
    assert "| difference |" in table and "| _CScanBackward |" in table


def test_bench_rejects_profile_on_another_device(capsys):
    assert main(["bench", "--profile", "--device", "cuda"]) == 2
    assert "--profile" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_resnet_compiled_rows():
    pytest.importorskip("timm")
    from arnn_plugins.experiments.bench import bench_resnet

    rows = bench_resnet(batch=2, size=32, repeats=1, compile=True)
    assert [r.name for r in rows] == ["resnet18", "resnet18+cbam", "resnet18+cbam+arnn", "resnet18+cbam+arnn pooled"]
    # Compilation is paid once, in the first step, not in the medians.
    assert all(r.compile_s is not None and r.compile_s * 1e3 > r.fwdbwd_ms for r in rows)


def test_bench_tables_warn_when_their_figures_cannot_be_trusted(capsys):
    from arnn_plugins.experiments.bench import Row, timing_warning

    good = [Row("a", 1.0, 3.0, 0.0, 0.0), Row("b", 2.0, 5.0, 0.0, 0.0)]
    assert timing_warning(good, 3) == ""
    odd = [Row("a", 4.0, 3.0, 0.0, 0.0), Row("b", 2.0, 5.0, 0.0, 0.0)]
    assert "a: the forward timed slower than forward+backward" in timing_warning(odd, 5)
    assert "medians of 1 repeat(s)" in timing_warning(good, 1)
    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_profile_parts_time_each_attention_module_at_its_step_shape():
    pytest.importorskip("timm")
    from arnn_plugins.experiments.profiling import attention_parts, format_parts

    rows = attention_parts(batch=2, size=32, threads=1, repeats=1)
    # ResNet18's four stages, two blocks each, at maps of 8, 4, 2 and 1 for a 32 px input.
    assert [r["name"] for r in rows] == [f"layer{s}.{b}.se.spatial" for s in range(1, 5) for b in range(2)]
    assert [r["shape"] for r in rows[::2]] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2), (2, 512, 1, 1)]
    for r in rows:
        assert min(r["cbam"], r["arnn"], r["context"], r["scan"], r["pooled"]) > 0
        assert r["rest"] == pytest.approx(r["arnn"] - r["context"] - r["scan"])
    table = format_parts(rows, step_ms=100.0, title="t")
    total = sum(r["arnn"] - r["cbam"] for r in rows)
    assert "| total |" in table and f"take {total:.1f} ms more than CBAM's, {total:.1f}% of" in table
    pooled = sum(r["pooled"] - r["cbam"] for r in rows)
    assert "| ARNN on the pooled map ms |" in table
    assert f"ARNN reading the pooled map takes {pooled:.1f} ms more than CBAM's branches, {pooled:.1f}% of" in table
