"""Every code block of the README runs as written and shows what it says.

Python blocks are executed (a block that needs a download gets a local
file instead, the one substitution noted at that test); shell blocks'
``arnn-plugins`` lines are parsed by the real argument parser, their config
names resolved, and the cheap ones run.
"""

import os
import pathlib
import re
import shlex

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang):
    """``[(heading, code)]`` of the README's ``lang`` blocks, in order."""
    text = README.read_text()
    out, heading = [], ""
    for m in re.finditer(r"^(#+ [^\n]*)$|^```(\w+)\n(.*?)^```", text, re.S | re.M):
        if m.group(1):
            heading = m.group(1).lstrip("#").strip()
        elif m.group(2) == lang:
            out.append((heading, m.group(3)))
    return out


def _block(heading, k=0):
    found = [code for h, code in _blocks("python") if h == heading]
    assert len(found) > k, f"no python block {k} under {heading!r}"
    return found[k]


def _run(code, **scope):
    exec(compile(code, "README.md", "exec"), scope)
    return scope


# Which test runs which block: a new block without a test fails here.
PYTHON_BLOCKS = {
    ("Put it in your model", 0): "test_first_screen_example",
    ("Put it in your model", 1): "test_mmcv_config_lines_build_an_mmdet_resnet",
    ("The layer", 0): "test_layer_example",
    ("timm", 0): "test_timm_example",
    ("torchvision and transformers", 0): "test_torchvision_and_transformers_example",
    ("Fine-tune a pretrained ResNet50", 0): "test_finetune_timm_example",
    ("Fine-tune a pretrained ResNet50", 1): "test_finetune_torchvision_example",
    ("Host models", 0): "test_host_models_example",
    ("Compile and export", 0): "test_compile_and_export_example",
}


def test_every_python_block_has_a_test():
    seen, count = [], {}
    for heading, _ in _blocks("python"):
        k = count.get(heading, 0)
        count[heading] = k + 1
        seen.append((heading, k))
    assert seen == list(PYTHON_BLOCKS), "README python blocks and PYTHON_BLOCKS differ"
    names = {n for n in globals() if n.startswith("test_")}
    assert set(PYTHON_BLOCKS.values()) <= names


def test_first_screen_example():
    s = _run(_block("Put it in your model"))
    assert s["y"].shape == (2, 64, 28, 28)
    x = torch.randn(2, 64, 28, 28)
    torch.testing.assert_close(s["gate"](x), x)  # identity at initialisation
    assert type(s["model"].layer1[0].se).__name__ == "CbamARNN"


def test_mmcv_config_lines_build_an_mmdet_resnet():
    pytest.importorskip("mmdet")
    import mmdet.models  # noqa: F401  (registers mmdet's backbones)
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope
    from mmengine.utils import import_modules_from_strings

    s = _run(_block("Put it in your model", 1))
    import_modules_from_strings(**s["custom_imports"])
    with DefaultScope.overwrite_default_scope("mmdet"):  # what an mmdet config's default_scope does
        backbone = MODELS.build(dict(s["backbone"], num_stages=4, out_indices=(3,), norm_eval=False))
    gates = [n for n, m in backbone.named_modules() if type(m).__name__ == "AttentionRNN"]
    assert len(gates) == 4 + 6 + 3  # every Bottleneck of stages 2-4
    x = torch.randn(1, 3, 64, 64)
    assert backbone(x)[0].shape == (1, 2048, 2, 2)


def test_layer_example():
    s = _run(_block("The layer"))
    assert s["a"].shape == (8, 1, 32, 32)
    assert s["gated"].shape == s["x"].shape
    assert set(s["s"]._fields) == {"a", "mu", "sigma", "mu_l", "sigma_l", "mu_r", "sigma_r"}
    assert s["brnn"](s["x"]).shape == (8, 1, 32, 32)
    assert torch.isfinite(s["a"]).all()


def test_timm_example():
    pytest.importorskip("timm")
    from arnn_plugins.patches import timm as arnn_timm

    try:
        s = _run(_block("timm"))
    finally:
        arnn_timm.disable()
    assert type(s["model"].layer1[0].se).__name__ == "CbamARNN"
    gates = [n for n, _ in s["plain"].named_modules() if n.endswith("arnn_gate")]
    assert len(gates) == 13 and all(n.startswith(("layer2", "layer3", "layer4")) for n in gates)
    assert any("arnn" in type(m).__name__.lower() for m in s["built"].modules())
    assert not arnn_timm.is_enabled()


def test_torchvision_and_transformers_example():
    pytest.importorskip("torchvision")
    pytest.importorskip("transformers")
    s = _run(_block("torchvision and transformers"))
    names = [n for n, _ in s["model"].named_modules() if n.endswith("arnn_gate")]
    assert names and all(n.startswith(("layer2", "layer3", "layer4")) for n in names)
    hf = s["hf"]
    assert sum(n.endswith("arnn_gate") for n, _ in hf.named_modules()) == sum(hf.config.depths[1:])


def test_finetune_timm_example(tmp_path):
    timm = pytest.importorskip("timm")
    # The one substitution: the hub download becomes a local file of the same
    # model (timm's own pretrained_cfg_overlay route), built here at random.
    weights = tmp_path / "resnet50_a1_in1k.pth"
    torch.manual_seed(0)
    reference = timm.create_model("resnet50", num_classes=1000)
    torch.save(reference.state_dict(), weights)
    code = _block("Fine-tune a pretrained ResNet50")
    assert "pretrained=True" in code
    code = code.replace("pretrained=True", f"pretrained=True, pretrained_cfg_overlay=dict(file={str(weights)!r})")
    s = _run(code)
    model = s["model"]
    # The pretrained backbone arrived, the gates are the identity: features equal the original model's.
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    reference.eval()
    torch.testing.assert_close(model.forward_features(x), reference.forward_features(x))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"fc.weight", "fc.bias"} <= trainable
    assert all(("arnn_gate" in n) or n.startswith("fc.") for n in trainable)
    assert s["opt"].param_groups and all(p.requires_grad for g in s["opt"].param_groups for p in g["params"])


def test_finetune_torchvision_example(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None)
    torch.save(reference.state_dict(), "resnet50-11ad3fa6.pth")
    s = _run(_block("Fine-tune a pretrained ResNet50", 1))
    model = s["model"]
    report = s["report"]
    assert report.missing_arnn and all("arnn_gate" in k for k in report.missing_arnn)
    assert set(report.excluded) >= {"fc.weight", "fc.bias"}
    body = lambda m: torch.nn.Sequential(*list(m.children())[:-1])  # noqa: E731
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(body(model.eval())(x), body(reference.eval())(x))
    assert model.fc.out_features == 10


def test_host_models_example():
    s = _run(_block("Host models"))
    assert s["logits"].shape == (2, 3000)
    assert any(type(m).__name__ == "AttentionRNN" for m in s["pan"].modules())
    assert any(type(m).__name__ == "AttentionRNN" for m in s["vqa"].modules())
    assert all(torch.isfinite(v).all() for v in s["losses"].values())


def test_compile_and_export_example(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    monkeypatch.chdir(tmp_path)
    s = _run(_block("Compile and export"))
    x = torch.randn(3, 64, 32, 32)
    torch.testing.assert_close(s["ep"].module()(x), s["model"](x))
    assert (tmp_path / "arnn.onnx").stat().st_size > 0


# -- shell blocks ------------------------------------------------------------------------------

def _commands():
    """Every ``arnn-plugins ...`` command of the README's bash blocks, as argument lists."""
    out = []
    for _, code in _blocks("bash"):
        code = code.replace("\\\n", " ")
        for line in code.splitlines():
            line = line.split(" #")[0].strip()
            for part in re.split(r"&&|;", line):
                words = shlex.split(part)
                for k, w in enumerate(words):
                    if w.endswith("arnn-plugins") and not w.startswith("$"):
                        out.append(words[k + 1:])
                        break
    return out


def test_readme_commands_parse_and_name_real_configs():
    from arnn_plugins.cli import build_parser
    from arnn_plugins.engine.config import config_path

    commands = _commands()
    assert len(commands) >= 8
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        for name in [getattr(args, "config", None)] + list(getattr(args, "pairs", None) or [])[::2]:
            if name:
                assert os.path.isfile(config_path(name)), (argv, name)


def test_readme_cheap_commands_run(tmp_path, monkeypatch, capsys):
    from arnn_plugins.cli import main

    monkeypatch.chdir(tmp_path)  # the shipped configs are found from any folder
    assert main(["list"]) == 0
    assert "pan_tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "arnn-plugins" in capsys.readouterr().out
    assert main(["plot", "dependency", "--out", "dep.png"]) == 0
    assert (tmp_path / "dep.png").stat().st_size > 0


def test_readme_has_no_unfilled_figures():
    text = README.read_text()
    assert not re.search(r"\b[A-Z]+_(SECTION|TIME)\b", text)
