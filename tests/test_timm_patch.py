"""The reversible timm patch: attn_layer names while on, rejected after, atomic enable."""

import importlib
import sys
import types
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

import arnn_plugins as ap  # noqa: E402
from arnn_plugins.adapters.timm_cbam import ARNNAttn, CbamARNN, LightCbamARNN, reset_arnn_layers  # noqa: E402
from arnn_plugins.finetune import load_pretrained  # noqa: E402
from arnn_plugins.patches import timm as arnn_timm  # noqa: E402

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
CREATE_ATTN = importlib.import_module("timm.layers.create_attn")
ORIGINAL = CREATE_ATTN.get_attn
# Modules that bind get_attn by import; all must follow the patch.
BINDERS = ("timm.layers", "timm.layers.create_attn", "timm.models.layers", "timm.models.resnet",
           "timm.models.cspnet", "timm.models._efficientnet_builder", "timm.models.byobnet")


@pytest.fixture(autouse=True)
def patch_off():
    arnn_timm.disable()
    yield
    arnn_timm.disable()


def bound():
    """get_attn as every binding module sees it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm.models.layers is a deprecated alias
        return {name: vars(importlib.import_module(name))["get_attn"] for name in BINDERS}


def rejection(name):
    with pytest.raises(AssertionError) as info:
        timm.layers.get_attn(name)
    return str(info.value)


def make(arch, attn, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(arch, block_args=dict(attn_layer=attn), num_classes=10, **kwargs).eval()


def test_names_unknown_without_patch():
    assert all(fn is ORIGINAL for fn in bound().values())
    for name in arnn_timm.ATTN_LAYERS:
        assert rejection(name) == f"Invalid attn module ({name})"
    with pytest.raises(AssertionError):
        make("resnet18", "cbam_arnn")


@pytest.mark.parametrize("arch, n", [("resnet18", 8), ("resnet50", 16)])
def test_cbam_arnn_resnet_is_a_cbam_resnet_at_init(arch, n, tmp_path):
    # The reference CBAM model: non-zero last norms, so CBAM shapes the logits.
    cbam = make(arch, "cbam", seed=0, zero_init_last=False)
    with torch.no_grad():
        expected = cbam(X)
    with arnn_timm.patched():
        model = make(arch, "cbam_arnn", seed=1)
    modules = [m for m in model.modules() if isinstance(m, CbamARNN)]
    assert len(modules) == n
    # timm's init re-draws every Conv2d; the init hook must bring the zero correction back.
    assert all(torch.count_nonzero(m.spatial.arnn.combiner[-1].weight[0]) == 0 for m in modules)
    report = load_pretrained(model, cbam.state_dict())
    assert report.missing_arnn and all(".spatial.arnn." in k for k in report.missing_arnn)
    with torch.no_grad():
        assert (model(X) - expected).abs().max().item() <= 1e-5


def test_reset_after_building_without_timm_init_hook():
    with arnn_timm.patched():
        model = make("resnet18", "cbam_arnn", zero_init_last=False)
    lasts = [m.spatial.arnn.combiner[-1] for m in model.modules() if isinstance(m, CbamARNN)]
    # timm's Kaiming init reached ARNN's convs and no hook undid it ...
    assert all(torch.count_nonzero(last.weight[0]) > 0 for last in lasts)
    assert reset_arnn_layers(model) == 8
    # ... until the reset: ARNN's own init, zero correction.
    assert all(torch.count_nonzero(last.weight[0]) == 0 for last in lasts)
    assert all(torch.count_nonzero(last.weight[1]) > 0 for last in lasts)


def test_pretrained_file_into_patched_model(tmp_path):
    cbam = make("resnet18", "cbam", seed=0, zero_init_last=False)
    with torch.no_grad():
        expected = cbam(X)
    path = tmp_path / "resnet18_cbam.pth"
    torch.save(cbam.state_dict(), path)
    with arnn_timm.patched():
        # timm's own loader is strict unless told otherwise: ARNN keys are new.
        model = make("resnet18", "cbam_arnn", seed=1, pretrained=True, pretrained_strict=False,
                     pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    with torch.no_grad():
        assert (model(X) - expected).abs().max().item() <= 1e-5


def test_arnn_gate_name_is_identity_at_init():
    plain = make("resnet18", None, seed=0, zero_init_last=False)
    with torch.no_grad():
        expected = plain(X)
    with arnn_timm.patched():
        model = make("resnet18", "arnn", seed=1)
        lone = timm.layers.create_attn("arnn", 32, rd_ratio=0.25)  # SE-style options are accepted
    gates = [m for m in model.modules() if isinstance(m, ARNNAttn)]
    assert len(gates) == 8 and all(isinstance(g, ap.ARNNGate) for g in gates)
    load_pretrained(model, plain.state_dict())
    with torch.no_grad():
        assert (model(X) - expected).abs().max().item() <= 1e-5
        x = torch.randn(2, 32, 5, 7)
        assert torch.equal(lone(x), x)


def test_names_resolve_to_classes_case_insensitively():
    with arnn_timm.patched():
        assert timm.layers.get_attn("cbam_arnn") is CbamARNN
        assert timm.layers.get_attn("LCBAM_ARNN") is LightCbamARNN
        assert timm.layers.get_attn("arnn") is ARNNAttn
        # timm's own names are untouched.
        assert timm.layers.get_attn("cbam") is timm.layers.cbam.CbamModule
        assert rejection("no_such_attn") == "Invalid attn module (no_such_attn)"
        light = timm.layers.create_attn("lcbam_arnn", 32)
    assert light.spatial.light


def test_enable_twice_then_disable_restores_every_binding():
    assert arnn_timm.enable() is True
    first = bound()
    assert arnn_timm.enable() is False  # harmless
    assert bound() == first
    assert all(fn is not ORIGINAL for fn in first.values())
    assert len(set(map(id, first.values()))) == 1
    assert arnn_timm.is_enabled()
    assert arnn_timm.disable() is True
    assert arnn_timm.disable() is False
    assert not arnn_timm.is_enabled()
    assert all(fn is ORIGINAL for fn in bound().values())
    for name in arnn_timm.ATTN_LAYERS:
        assert rejection(name) == f"Invalid attn module ({name})"


def test_disable_also_restores_modules_imported_while_on(monkeypatch):
    arnn_timm.enable()
    late = types.ModuleType("late_user_module")
    exec("from timm.layers import get_attn", late.__dict__)
    monkeypatch.setitem(sys.modules, late.__name__, late)
    assert late.get_attn("cbam_arnn") is CbamARNN
    arnn_timm.disable()
    assert late.get_attn is ORIGINAL


def test_context_manager_restores_even_on_error_and_nests():
    with pytest.raises(KeyError):
        with arnn_timm.patched():
            assert arnn_timm.is_enabled()
            raise KeyError("boom")
    assert not arnn_timm.is_enabled() and all(fn is ORIGINAL for fn in bound().values())

    with arnn_timm.patched():
        with arnn_timm.patched():
            pass
        assert arnn_timm.is_enabled()  # the inner block did not turn it on, so leaves it on
    assert not arnn_timm.is_enabled()

    arnn_timm.enable()
    with arnn_timm.patched():
        pass
    assert arnn_timm.is_enabled()  # on before the block: still on after it


def test_failure_inside_enable_leaves_timm_unchanged(monkeypatch):
    real_set = arnn_timm._set
    calls = []

    def failing_set(mod, value):
        calls.append(mod.__name__)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        real_set(mod, value)

    monkeypatch.setattr(arnn_timm, "_set", failing_set)
    with pytest.raises(RuntimeError, match="simulated failure"):
        arnn_timm.enable()
    assert len(calls) == 3  # two bindings were already replaced when it failed
    assert not arnn_timm.is_enabled()
    assert all(fn is ORIGINAL for fn in bound().values())
    assert rejection("cbam_arnn") == "Invalid attn module (cbam_arnn)"

    monkeypatch.setattr(arnn_timm, "_set", real_set)
    with arnn_timm.patched():
        assert timm.layers.get_attn("cbam_arnn") is CbamARNN


def test_fx_features_of_a_patched_model_match_its_intermediates():
    from timm.models import FeatureGraphNet

    with arnn_timm.patched():
        fx_model = make("resnet18", "cbam_arnn", features_only=True, feature_cls="fx", out_indices=(1, 2, 3, 4))
        model = make("resnet18", "cbam_arnn", seed=1)
    assert len([m for m in fx_model.modules() if isinstance(m, CbamARNN)]) == 0  # traced through
    assert len([m for m in fx_model.modules() if m.__class__.__name__ == "ARNNSpatialAttn"]) == 8  # leaves
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".arnn." in n:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        traced = FeatureGraphNet(model, out_indices=(1, 2, 3, 4))(X)
        hooks = model.forward_intermediates(X, indices=4, intermediates_only=True)
        assert [f.shape[1] for f in fx_model(X)] == [64, 128, 256, 512]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(traced, hooks))
