"""The torchvision ResNet insert adapter: identity at init, stages, checkpoints, errors."""

import pytest
import torch
import torch.nn as nn

torchvision = pytest.importorskip("torchvision")

import arnn_plugins as ap  # noqa: E402
from arnn_plugins.adapters import torchvision_resnet as tvr  # noqa: E402
from arnn_plugins.adapters._stages import block_out_channels  # noqa: E402
from arnn_plugins.gate import ARNNGate  # noqa: E402

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}


def make(arch="resnet18"):
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()


def gated_blocks(model):
    return sorted(n for n, m in model.named_modules() if isinstance(getattr(m, "arnn_gate", None), ARNNGate))


def expected_blocks(arch, stages):
    return sorted(f"layer{s}.{i}" for s in stages for i in range(BLOCKS[arch][s - 1]))


def snapshot(model):
    return (
        list(model.state_dict()),
        [len(m._forward_hooks) for m in model.modules()],
    )


def randomise_gates(model, scale=0.5):
    """Give every gate a non-zero attention map, so it visibly changes features."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "arnn_gate" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_identity_at_init_and_default_stages(arch):
    model = make(arch)
    with torch.no_grad():
        before = model(X)
    names = ap.insert_attention(model)
    assert names == [f"{b}.arnn_gate" for b in expected_blocks(arch, (2, 3, 4))]
    with torch.no_grad():
        after = model(X)
    assert (after - before).abs().max().item() <= 1e-6
    # Gate channels are the block's output channels (planes * expansion).
    expansion = 4 if arch == "resnet50" else 1
    for stage, planes in zip((2, 3, 4), (128, 256, 512)):
        gate = model.get_submodule(f"layer{stage}.0.arnn_gate")
        assert gate.in_channels == planes * expansion


def test_gradient_reaches_arnn_parameters():
    model = make("resnet18").train()
    ap.insert_attention(model, stages=(3, 4), hidden_channels=4)
    gates = [m.arnn_gate for m in model.modules() if hasattr(m, "arnn_gate")]
    opt = torch.optim.SGD([p for g in gates for p in g.parameters()], lr=1.0)
    target = torch.tensor([1, 7])
    nn.functional.cross_entropy(model(X), target).backward()
    for g in gates:
        # At init only the zeroed output layer can receive gradient...
        last = g.attn.combiner[-1]
        assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), target).backward()
    for g in gates:
        # ...and once it is non-zero, the recurrence's weights get gradient too.
        assert g.attn.weight_hh.grad is not None and g.attn.weight_hh.grad.abs().sum() > 0
        assert g.attn.context.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "stages, chosen",
    [
        ((1,), (1,)),
        (4, (4,)),
        ("all", (1, 2, 3, 4)),
        (None, (1, 2, 3, 4)),
        ((False, True, False, True), (2, 4)),
        ([3, 2], (2, 3)),
    ],
)
def test_stages_select_blocks(stages, chosen):
    model = make("resnet18")
    names = ap.insert_attention(model, stages=stages, hidden_channels=4)
    assert gated_blocks(model) == expected_blocks("resnet18", chosen)
    assert sorted(names) == [f"{b}.arnn_gate" for b in expected_blocks("resnet18", chosen)]


def test_nested_backbone_names_give_stages():
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = make("resnet18")

    model = Detector()
    names = ap.insert_attention(model, stages=(4,), hidden_channels=4)
    assert names == ["backbone.layer4.0.arnn_gate", "backbone.layer4.1.arnn_gate"]


def test_blocks_outside_a_stage_need_stages_all():
    from torchvision.models.resnet import BasicBlock

    model = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8)).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no insertion point"):
        ap.insert_attention(model)  # default stages: a block's stage is unknown here
    assert snapshot(model) == before
    assert ap.insert_attention(model, stages="all", hidden_channels=4) == ["0.arnn_gate", "1.arnn_gate"]
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        assert model(x).shape == (1, 8, 16, 16)


@pytest.mark.parametrize("stages", [(0,), (2, -1), "middle", (1.5,), object()])
def test_bad_stages_raise_and_leave_model_unchanged(stages):
    model = make("resnet18")
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match="torchvision_resnet: stages"):
        ap.insert_attention(model, stages=stages)
    assert snapshot(model) == before


def test_stages_that_select_nothing_raise():
    model = make("resnet18")
    before = snapshot(model)
    with pytest.raises(ValueError, match="no insertion point"):
        ap.insert_attention(model, stages=(5,))
    assert snapshot(model) == before


def test_bad_arnn_option_leaves_model_unchanged():
    model = make("resnet18")
    before = snapshot(model)
    with pytest.raises(ValueError, match="hidden_channels"):
        ap.insert_attention(model, hidden_channels=0)
    assert snapshot(model) == before


def test_insert_twice_raises_and_leaves_model_unchanged():
    model = make("resnet18")
    ap.insert_attention(model, hidden_channels=4)
    randomise_gates(model)
    before = snapshot(model)
    with torch.no_grad():
        out = model(X)
    with pytest.raises(ValueError, match="already has an ARNN gate"):
        ap.insert_attention(model, hidden_channels=4)
    assert snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(X), out)  # still exactly one gate per block


def test_gated_state_dict_round_trip():
    model = make("resnet18")
    ap.insert_attention(model, hidden_channels=4, block_size=2)
    randomise_gates(model)
    with torch.no_grad():
        out = model(X)
        plain = make("resnet18")(X)
    assert (out - plain).abs().max() > 1e-3  # the gates now act
    fresh = make("resnet18")
    with torch.no_grad():  # different weights everywhere, so the load has to restore them
        for p in fresh.parameters():
            p.normal_()
    ap.insert_attention(fresh, hidden_channels=4, block_size=2)
    fresh.load_state_dict(model.state_dict())  # strict
    with torch.no_grad():
        assert torch.allclose(fresh(X), out, atol=1e-6)


def test_original_checkpoint_loads_with_only_gate_keys_missing():
    plain = make("resnet50")
    with torch.no_grad():
        for p in plain.parameters():  # a "trained" checkpoint, unlike a fresh init
            p.add_(0.01 * torch.randn_like(p))
        ref = plain(X)
    model = make("resnet50")
    ap.insert_attention(model)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all("arnn_gate" in k for k in missing)
    assert len({k.split(".arnn_gate")[0] for k in missing}) == 13
    with torch.no_grad():
        assert (model(X) - ref).abs().max().item() <= 1e-5


def test_model_without_blocks_raises_and_is_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    before = snapshot(model)
    with pytest.raises(ValueError, match="no insertion point"):
        ap.insert_attention(model, adapters=[tvr.ADAPTER_NAME])
    assert snapshot(model) == before
    assert not any(hasattr(m, "arnn_gate") for m in model.modules())


def test_remove_attention_restores_the_plain_model():
    model = make("resnet18")
    with torch.no_grad():
        ref = model(X)
    ap.insert_attention(model, hidden_channels=4)
    randomise_gates(model)
    removed = ap.remove_attention(model)
    assert len(removed) == 6
    assert not any("arnn_gate" in k for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(X), ref)


def test_adapter_is_listed_and_matches_only_resnet_blocks():
    from torchvision.models.resnet import BasicBlock, Bottleneck

    assert tvr.ADAPTER_NAME in ap.list_adapters("insert")
    assert tvr.match(BasicBlock(8, 8)) and tvr.match(Bottleneck(16, 4))
    assert not tvr.match(nn.Conv2d(3, 3, 1)) and not tvr.match(make("resnet18"))
    assert block_out_channels("torchvision_resnet", Bottleneck(16, 4)) == 16
    assert block_out_channels("torchvision_resnet", BasicBlock(8, 12, downsample=nn.Conv2d(8, 12, 1))) == 12
