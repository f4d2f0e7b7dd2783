"""The timm CBAM swap adapter: every CBAM found, function kept, training, checkpoints, features, errors."""

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

import arnn_plugins as ap  # noqa: E402
from arnn_plugins.adapters.timm_cbam import ARNNSpatialAttn, CbamARNN  # noqa: E402
from arnn_plugins.finetune import load_pretrained  # noqa: E402
from timm.layers.cbam import CbamModule, LightCbamModule  # noqa: E402

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
N_CBAM = {"resnet18": 8, "resnet50": 16}


def make(arch="resnet18", attn="cbam", seed=0, **kwargs):
    """A timm ResNet whose attention matters: with timm's default zero-init of
    each block's last norm the residual branch, CBAM included, outputs zeros."""
    torch.manual_seed(seed)
    block_args = dict(attn_layer=attn) if attn else None
    kwargs.setdefault("zero_init_last", False)
    return timm.create_model(arch, block_args=block_args, num_classes=10, **kwargs).eval()


def cbam_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (CbamModule, LightCbamModule))]


def snapshot(model):
    """Everything a failed swap must leave as it was: module types and every tensor."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_same(model, snap):
    types, sd = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    now = model.state_dict()
    assert list(now) == list(sd)
    assert all(torch.equal(now[k], v) for k, v in sd.items())


def perturb_arnn(model, scale=0.5):
    """Give every ARNN a non-zero output, so a swapped model visibly differs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".arnn." in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_residual_swap_finds_every_cbam_and_keeps_logits(arch):
    model = make(arch)
    expected = cbam_names(model)
    assert len(expected) == N_CBAM[arch]
    channel_branches = {n: model.get_submodule(n).channel for n in expected}
    old_keys = set(model.state_dict())
    with torch.no_grad():
        before = model(X)

    names = ap.swap_attention(model)

    assert names == expected
    assert cbam_names(model) == []
    for n in names:
        new = model.get_submodule(n)
        assert isinstance(new, CbamARNN) and new.mode == "residual"
        assert new.channel is channel_branches[n]  # the same branch, not a copy
        assert not new.training and not new.spatial.arnn.training
    new_keys = set(model.state_dict())
    assert old_keys <= new_keys
    assert new_keys - old_keys and all(".spatial.arnn." in k for k in new_keys - old_keys)
    with torch.no_grad():
        after = model(X)
    assert (after - before).abs().max().item() <= 1e-5


def test_light_cbam_swap_keeps_logits():
    model = make("resnet18", attn="lcbam")
    with torch.no_grad():
        before = model(X)
    names = ap.swap_attention(model, adapters=["timm_cbam"])
    assert len(names) == 8
    assert all(model.get_submodule(n).spatial.light for n in names)
    with torch.no_grad():
        assert (model(X) - before).abs().max().item() <= 1e-5


def test_residual_swap_is_not_a_no_op_once_arnn_learns():
    model = make()
    with torch.no_grad():
        before = model(X)
    ap.swap_attention(model)
    perturb_arnn(model)
    with torch.no_grad():
        assert (model(X) - before).abs().max().item() > 1e-3


def test_replace_mode_changes_function_and_drops_the_spatial_conv(tmp_path):
    original = make(seed=0)
    with torch.no_grad():
        before = original(X)
    path = tmp_path / "cbam.pth"
    torch.save(original.state_dict(), path)

    model = make(seed=1)
    names = ap.swap_attention(model, mode="replace")
    assert len(names) == 8
    spatial = model.get_submodule(names[0]).spatial
    assert spatial.mode == "replace" and spatial.conv is None
    assert not any(".spatial.conv." in k for k in model.state_dict())

    report = load_pretrained(model, path)
    # The CBAM spatial conv (conv weight + 5 BN tensors per module) is knowingly dropped.
    assert len(report.ignored) == 8 * 6 and all(".spatial.conv." in k for k in report.ignored)
    assert report.missing_arnn and all(".spatial.arnn." in k for k in report.missing_arnn)
    with torch.no_grad():
        after = model(X)
    assert after.shape == before.shape
    assert (after - before).abs().max().item() > 1e-3
    # A plain load_state_dict also accepts the original checkpoint with only ARNN keys missing.
    result = model.load_state_dict(torch.load(path), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".spatial.arnn." in k for k in result.missing_keys)


def test_training_step_moves_the_zero_initialised_correction():
    model = make()
    names = ap.swap_attention(model, hidden_channels=8)
    lasts = [model.get_submodule(n).spatial.arnn.combiner[-1] for n in names]
    assert all(torch.count_nonzero(last.weight[0]) == 0 for last in lasts)
    arnn_params = [p for n, p in model.named_parameters() if ".arnn." in n]
    start = [p.detach().clone() for p in arnn_params]

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.tensor([1, 7])
    nn.functional.cross_entropy(model(X), y).backward()
    assert all(last.weight.grad[0].abs().sum() > 0 for last in lasts)
    opt.step()

    assert all(torch.count_nonzero(last.weight[0]) > 0 for last in lasts)
    assert any(not torch.equal(p, s) for p, s in zip(arnn_params, start))


def test_original_checkpoint_loads_with_only_arnn_keys_missing(tmp_path):
    original = make(seed=0)
    with torch.no_grad():
        before = original(X)
    path = tmp_path / "cbam.pth"
    torch.save(original.state_dict(), path)

    model = make(seed=1)
    ap.swap_attention(model)
    report = load_pretrained(model, path)
    arnn_keys = set(model.state_dict()) - set(original.state_dict())
    assert set(report.missing_arnn) == arnn_keys
    assert set(report.loaded) == set(original.state_dict())
    with torch.no_grad():
        assert (model(X) - before).abs().max().item() <= 1e-5


def test_timm_pretrained_file_then_swap(tmp_path):
    original = make(seed=0)
    with torch.no_grad():
        before = original(X)
    path = tmp_path / "cbam.pth"
    torch.save(original.state_dict(), path)

    model = make(seed=1, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    ap.swap_attention(model)
    with torch.no_grad():
        assert (model(X) - before).abs().max().item() <= 1e-5


def test_features_only_model_can_be_swapped():
    model = make(features_only=True, out_indices=(1, 2, 3, 4))
    with torch.no_grad():
        before = model(X)
    names = ap.swap_attention(model)
    assert len(names) == 8
    with torch.no_grad():
        after = model(X)
    assert [f.shape for f in after] == [f.shape for f in before]
    assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(after, before))


def test_swapped_model_fx_features_and_forward_intermediates():
    from timm.models import FeatureGraphNet

    model = make()
    with torch.no_grad():
        before = model.forward_intermediates(X, indices=4, intermediates_only=True)
    ap.swap_attention(model)
    perturb_arnn(model)  # so the comparison below sees ARNN's contribution
    fx = FeatureGraphNet(model, out_indices=(1, 2, 3, 4))
    # The ARNN modules stay whole in the traced graph (leaf modules).
    assert any(isinstance(m, ARNNSpatialAttn) for m in fx.modules())
    with torch.no_grad():
        hooks = model.forward_intermediates(X, indices=4, intermediates_only=True)
        traced = fx(X)
    assert len(hooks) == len(traced) == 4
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(hooks, traced))
    assert any((a - b).abs().max().item() > 1e-4 for a, b in zip(hooks, before))


def test_model_without_cbam_raises_and_is_unchanged():
    model = make(attn=None)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="found no attention module"):
        ap.swap_attention(model, adapters=["timm_cbam"])
    assert_same(model, snap)


def test_second_swap_finds_nothing():
    model = make()
    ap.swap_attention(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="found no attention module"):
        ap.swap_attention(model, adapters=["timm_cbam"])
    assert_same(model, snap)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(hidden_channels=0), ValueError),
        (dict(context_kernel=2), ValueError),
        (dict(block_size=0), ValueError),
        (dict(reads="mean"), ValueError),
        (dict(no_such_option=1), TypeError),
    ],
)
def test_failed_swap_leaves_model_unchanged(kwargs, error):
    model = make()
    with torch.no_grad():
        before = model(X)
    snap = snapshot(model)
    with pytest.raises(error):
        ap.swap_attention(model, **kwargs)
    assert_same(model, snap)
    with torch.no_grad():
        assert torch.equal(model(X), before)


def test_arnn_options_pass_through_block_variant():
    model = make()
    with torch.no_grad():
        before = model(X)
    names = ap.swap_attention(model, hidden_channels=4, block_size=2, combine="independent")
    arnn = model.get_submodule(names[0]).spatial.arnn
    assert isinstance(arnn, ap.BlockAttentionRNN)
    assert arnn.arnn.hidden_channels == 4 and arnn.arnn.combine == "independent"
    with torch.no_grad():
        assert (model(X) - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attn", ["cbam", "lcbam"])
def test_pooled_reads_cbams_pooled_map_and_keeps_logits(attn):
    model = make(attn=attn)
    with torch.no_grad():
        before = model(X)
    names = ap.swap_attention(model, reads="pooled", hidden_channels=4)
    light = attn == "lcbam"
    for n in names:
        spatial = model.get_submodule(n).spatial
        # The context conv reads CBAM's pooled map, not the C channels.
        assert spatial.reads == "pooled" and spatial.arnn.in_channels == (1 if light else 2)
        assert spatial.arnn.context.weight.shape[1] == (1 if light else 2)
    with torch.no_grad():
        assert (model(X) - before).abs().max().item() <= 1e-5
    # Residual mode: the prior conv and the ARNN see the same pooled map.
    spatial = model.get_submodule(names[0]).spatial
    perturb_arnn(model)
    x = torch.randn(2, spatial.channels, 8, 8)
    pooled = spatial.pool(x)
    want = spatial.conv(pooled) + spatial.arnn(pooled)
    assert torch.equal(spatial.attn_logits(x), want)
    # Replace mode: the logits are the ARNN's on the pooled map, and depend on
    # the features only through the channel mean and max.
    replaced = make(attn=attn)
    names = ap.swap_attention(replaced, mode="replace", reads="pooled", hidden_channels=4)
    spatial = replaced.get_submodule(names[0]).spatial
    assert spatial.conv is None
    assert torch.equal(spatial.attn_logits(x), spatial.arnn(spatial.pool(x)))
    shuffled = x[:, torch.randperm(x.shape[1])]
    assert torch.allclose(spatial.attn_logits(shuffled), spatial.attn_logits(x), atol=1e-6)
    assert "reads='pooled'" in repr(spatial)
    with pytest.raises(ValueError, match=r"ARNNSpatialAttn: reads must be one of \('features', 'pooled'\)"):
        ARNNSpatialAttn(32, reads="mean")


def test_attention_map_and_input_checks():
    cbam = CbamModule(32).eval()
    new = CbamARNN.from_cbam(cbam)
    x = torch.randn(2, 32, 8, 6)
    mask = new.attention(x)
    assert mask.shape == (2, 1, 8, 6)
    assert ((mask >= 0) & (mask <= 1)).all()
    with torch.no_grad():
        assert torch.equal(new(x), cbam(x))
    assert "mode='residual'" in repr(new) and "32, mode='residual', light=False" in repr(new)
    with pytest.raises(ValueError, match=r"ARNNSpatialAttn.*\(B, 32, H, W\)"):
        new.spatial(torch.randn(2, 16, 8, 6))
    with pytest.raises(ValueError, match=r"ARNNSpatialAttn.*4-D"):
        new.spatial(torch.randn(32, 8, 6))
    with pytest.raises(TypeError, match="CbamARNN.from_cbam"):
        CbamARNN.from_cbam(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="ARNNSpatialAttn: mode"):
        ARNNSpatialAttn(32, mode="prior")


def test_insert_gates_into_plain_timm_resnets_keeps_their_function():
    from arnn_plugins.adapters import timm_resnet
    from arnn_plugins.finetune import load_pretrained

    assert "timm_resnet" in ap.list_adapters("insert")
    torch.manual_seed(0)
    original = timm.create_model("resnet18", num_classes=5).eval()
    model = timm.create_model("resnet18", num_classes=5).eval()
    model.load_state_dict(original.state_dict())
    x = torch.randn(2, 3, 64, 64)
    want = original(x)
    names = ap.insert_attention(model, hidden_channels=4)
    assert names == [f"layer{s}.{b}.arnn_gate" for s in (2, 3, 4) for b in (0, 1)]
    assert all(timm_resnet.match(model.get_submodule(n.rpartition(".")[0])) for n in names)
    torch.testing.assert_close(model(x), want)
    # The original checkpoint loads with only the gates' keys new; a train step moves the gates.
    report = load_pretrained(model, original.state_dict())
    assert report.missing_arnn and all(".arnn_gate." in k for k in report.missing_arnn)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".arnn_gate." in k}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    opt.step()
    after = model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    assert ap.remove_attention(model) == names
    assert set(model.state_dict()) == set(original.state_dict())


def test_insert_into_timm_resnet50_stages_option():
    model = timm.create_model("resnet50", num_classes=3)
    names = ap.insert_attention(model, stages="all", hidden_channels=4)
    assert len(names) == 3 + 4 + 6 + 3
    gate = model.layer1[0].arnn_gate
    assert gate.in_channels == 256
