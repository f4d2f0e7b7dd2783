"""The README's usage example runs as written and shows what it says."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_usage_example_runs():
    scope: dict = {}
    exec(compile(_block("## Usage"), "README.md", "exec"), scope)
    assert scope["a"].shape == (8, 1, 32, 32)
    assert scope["gated"].shape == scope["x"].shape
    assert set(scope["s"]._fields) == {"a", "mu", "sigma", "mu_l", "sigma_l", "mu_r", "sigma_r"}
    assert scope["brnn"](scope["x"]).shape == (8, 1, 32, 32)
    assert torch.isfinite(scope["a"]).all()


def test_timm_example_runs():
    from arnn_plugins.patches import timm as arnn_timm

    scope: dict = {}
    try:
        exec(compile(_block("### timm (ResNets with CBAM)"), "README.md", "exec"), scope)
        assert type(scope["model"].layer1[0].se).__name__ == "CbamARNN"
    finally:
        arnn_timm.disable()
    assert not arnn_timm.is_enabled()


def test_torchvision_and_transformers_example_runs():
    scope: dict = {}
    exec(compile(_block("### torchvision and transformers backbones"), "README.md", "exec"), scope)
    names = [n for n, _ in scope["model"].named_modules() if n.endswith("arnn_gate")]
    assert names and all(n.startswith(("layer2", "layer3", "layer4")) for n in names)
    hf = scope["hf"]
    assert sum(n.endswith("arnn_gate") for n, _ in hf.named_modules()) == sum(hf.config.depths[1:])


def test_compile_and_export_example_runs(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("onnxscript")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_block("## Compile and export"), "README.md", "exec"), scope)
    x = torch.randn(3, 64, 32, 32)
    torch.testing.assert_close(scope["ep"].module()(x), scope["model"](x))
    assert (tmp_path / "arnn.onnx").stat().st_size > 0
