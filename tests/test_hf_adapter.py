"""The transformers ResNet / ConvNeXt insert adapters, on tiny models built from configs."""

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import arnn_plugins as ap  # noqa: E402
from arnn_plugins.adapters import hf_vision  # noqa: E402
from arnn_plugins.gate import ARNNGate  # noqa: E402

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
HF_ADAPTERS = [hf_vision.RESNET_ADAPTER, hf_vision.CONVNEXT_ADAPTER]
RESNET_DEPTHS = [1, 2, 1, 1]
CONVNEXT_DEPTHS = [1, 1, 2, 1]


def resnet_config(layer_type="basic"):
    sizes = [8, 16, 24, 32] if layer_type == "basic" else [16, 32, 48, 64]
    return transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=sizes, depths=RESNET_DEPTHS,
        layer_type=layer_type, num_labels=3,
    )


def convnext_config(v2=False):
    cls = transformers.ConvNextV2Config if v2 else transformers.ConvNextConfig
    return cls(num_channels=3, patch_size=2, hidden_sizes=[8, 16, 24, 32], depths=CONVNEXT_DEPTHS, num_labels=3)


def make(kind):
    torch.manual_seed(0)
    if kind.startswith("resnet"):
        return transformers.ResNetForImageClassification(resnet_config(kind.split("-")[1])).eval()
    if kind == "convnext":
        return transformers.ConvNextForImageClassification(convnext_config()).eval()
    if kind == "convnextv2":
        return transformers.ConvNextV2ForImageClassification(convnext_config(v2=True)).eval()
    raise AssertionError(kind)


def logits(model, x=X):
    with torch.no_grad():
        return model(pixel_values=x).logits


def resnet_blocks(stages, prefix="resnet."):
    return [f"{prefix}encoder.stages.{s - 1}.layers.{i}" for s in stages for i in range(RESNET_DEPTHS[s - 1])]


def convnext_blocks(kind, stages):
    return [f"{kind}.encoder.stages.{s - 1}.layers.{i}" for s in stages for i in range(CONVNEXT_DEPTHS[s - 1])]


def expected(kind, stages):
    return resnet_blocks(stages) if kind.startswith("resnet") else convnext_blocks(kind, stages)


def gated(model):
    return [n for n, m in model.named_modules() if isinstance(getattr(m, "arnn_gate", None), ARNNGate)]


def snapshot(model):
    return list(model.state_dict()), [len(m._forward_hooks) for m in model.modules()]


def randomise_gates(model, scale=0.5):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "arnn_gate" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


KINDS = ["resnet-basic", "resnet-bottleneck", "convnext", "convnextv2"]


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_default_stages_and_channels(kind):
    model = make(kind)
    before = logits(model)
    names = ap.insert_attention(model, hidden_channels=4)
    assert names == [f"{b}.arnn_gate" for b in expected(kind, (2, 3, 4))]
    assert (logits(model) - before).abs().max().item() <= 1e-6
    sizes = model.config.hidden_sizes
    assert len(names) == len(expected(kind, (2, 3, 4)))
    for name in names:
        stage = int(name.split("stages.")[1].split(".")[0])
        assert model.get_submodule(name).in_channels == sizes[stage]


def test_base_model_without_head_gets_gates():
    torch.manual_seed(0)
    model = transformers.ResNetModel(resnet_config("bottleneck")).eval()
    with torch.no_grad():
        ref = model(pixel_values=X).last_hidden_state
    names = ap.insert_attention(model, stages=(3, 4), hidden_channels=4)
    assert names == [f"{b}.arnn_gate" for b in resnet_blocks((3, 4), prefix="")]
    with torch.no_grad():
        assert torch.equal(model(pixel_values=X).last_hidden_state, ref)


@pytest.mark.parametrize("kind", ["resnet-basic", "convnext"])
def test_gradient_reaches_arnn_parameters(kind):
    model = make(kind).train()
    ap.insert_attention(model, hidden_channels=4)
    gates = [m.arnn_gate for m in model.modules() if hasattr(m, "arnn_gate")]
    opt = torch.optim.SGD([p for g in gates for p in g.parameters()], lr=1.0)
    labels = torch.tensor([0, 2])
    model(pixel_values=X, labels=labels).loss.backward()
    for g in gates:
        assert g.attn.combiner[-1].weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    model(pixel_values=X, labels=labels).loss.backward()
    for g in gates:
        assert g.attn.weight_hh.grad.abs().sum() > 0
        assert g.attn.context.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["resnet-basic", "convnext"])
@pytest.mark.parametrize(
    "stages, chosen",
    [((1,), (1,)), ("all", (1, 2, 3, 4)), ((False, True, False, True), (2, 4)), (3, (3,))],
)
def test_stages_select_blocks(kind, stages, chosen):
    model = make(kind)
    ap.insert_attention(model, stages=stages, hidden_channels=4)
    assert gated(model) == expected(kind, chosen)


@pytest.mark.parametrize("stages", [(0,), "first"])
def test_bad_stages_raise_and_leave_model_unchanged(stages):
    model = make("convnext")
    before = snapshot(model)
    with pytest.raises(ValueError, match="hf_convnext: stages"):
        ap.insert_attention(model, stages=stages)
    assert snapshot(model) == before


@pytest.mark.parametrize("kind", ["resnet-bottleneck", "convnext"])
def test_insert_twice_raises_and_leaves_model_unchanged(kind):
    model = make(kind)
    ap.insert_attention(model, hidden_channels=4)
    randomise_gates(model)
    before, out = snapshot(model), logits(model)
    with pytest.raises(ValueError, match="already has an ARNN gate"):
        ap.insert_attention(model, hidden_channels=4)
    assert snapshot(model) == before
    assert torch.equal(logits(model), out)


@pytest.mark.parametrize("kind", ["resnet-bottleneck", "convnext"])
def test_gated_state_dict_round_trip(kind):
    model = make(kind)
    ap.insert_attention(model, hidden_channels=4)
    randomise_gates(model)
    out = logits(model)
    assert (out - logits(make(kind))).abs().max() > 1e-4  # the gates now act
    fresh = make(kind)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    ap.insert_attention(fresh, hidden_channels=4)
    fresh.load_state_dict(model.state_dict())
    assert torch.allclose(logits(fresh), out, atol=1e-6)


@pytest.mark.parametrize("kind", ["resnet-basic", "convnext"])
def test_pretrained_checkpoint_loads_then_gets_gates(kind, tmp_path):
    original = make(kind)
    with torch.no_grad():
        for p in original.parameters():  # stands for trained weights
            p.add_(0.05 * torch.randn_like(p))
    ref = logits(original)
    original.save_pretrained(tmp_path)

    cls = type(original)
    model = cls.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(model), ref)  # the checkpoint really loaded
    names = ap.insert_attention(model, hidden_channels=4)
    assert names and torch.equal(logits(model), ref)

    # The same checkpoint into a model that already has gates: only gate keys are missing.
    gated_model = make(kind)
    ap.insert_attention(gated_model, hidden_channels=4)
    missing, unexpected = gated_model.load_state_dict(original.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all("arnn_gate" in k for k in missing)
    assert (logits(gated_model) - ref).abs().max().item() <= 1e-6


def test_fine_tuned_gated_checkpoint_reloads(tmp_path):
    from safetensors.torch import load_file

    model = make("resnet-bottleneck")
    ap.insert_attention(model, hidden_channels=4)
    randomise_gates(model)  # stands for fine-tuned gates
    out = logits(model)
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert any("arnn_gate" in k for k in state)  # the gates are saved with the model

    # from_pretrained builds the plain model (gate keys are ignored), then the
    # same insert_attention call and the saved state bring the gates back.
    reloaded = transformers.ResNetForImageClassification.from_pretrained(tmp_path).eval()
    assert not gated(reloaded)
    ap.insert_attention(reloaded, hidden_channels=4)
    reloaded.load_state_dict(state)
    assert torch.equal(logits(reloaded), out)


def test_resnet_backbone_feature_maps_include_gates():
    config = resnet_config("basic")
    config.out_features = ["stage2", "stage4"]
    torch.manual_seed(0)
    backbone = transformers.ResNetBackbone(config).eval()
    with torch.no_grad():
        plain = backbone(pixel_values=X).feature_maps
    names = ap.insert_attention(backbone, hidden_channels=4)
    assert names == [f"{b}.arnn_gate" for b in resnet_blocks((2, 3, 4), prefix="")]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(backbone(pixel_values=X).feature_maps, plain))
    randomise_gates(backbone)
    with torch.no_grad():
        gated_maps = backbone(pixel_values=X).feature_maps
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(gated_maps, plain))


def test_convnext_records_of_stage_outputs_include_gates():
    # transformers records ConvNeXt stage outputs with forward hooks that it
    # installs at the first forward asking for them; gates sit inside the
    # stages, so the records include them whatever the order.
    model = make("convnext")
    with torch.no_grad():
        model.convnext(pixel_values=X, output_hidden_states=True)
    ap.insert_attention(model, hidden_channels=4)
    randomise_gates(model)
    with torch.no_grad():
        out = model.convnext(pixel_values=X, output_hidden_states=True)
    assert len(out.hidden_states) == 5
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)

    config = convnext_config()
    config.out_features = ["stage3", "stage4"]
    config.layer_scale_init_value = 1.0  # as after training; 1e-6 makes every residual branch vanish
    torch.manual_seed(0)
    backbone = transformers.ConvNextBackbone(config).eval()
    with torch.no_grad():
        plain = backbone(pixel_values=X).feature_maps
    ap.insert_attention(backbone, stages=(3,), hidden_channels=4)
    with torch.no_grad():
        assert torch.equal(backbone(pixel_values=X).feature_maps[0], plain[0])  # identity at init
    randomise_gates(backbone)
    with torch.no_grad():
        gated = backbone(pixel_values=X).feature_maps
    # Stage 3 has two layers: the first one's gate reaches its feature map.
    assert (gated[0] - plain[0]).abs().max() > 1e-3


def test_model_without_insertion_point_raises_and_is_unchanged():
    cfg = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=32, patch_size=8
    )
    model = transformers.ViTModel(cfg).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no insertion point"):
        ap.insert_attention(model, adapters=HF_ADAPTERS)
    assert snapshot(model) == before


def test_adapters_are_listed_and_match_only_their_blocks():
    assert set(HF_ADAPTERS) <= set(ap.list_adapters("insert"))
    resnet, convnext = make("resnet-basic"), make("convnext")
    assert hf_vision.match_resnet(resnet.resnet.encoder.stages[0].layers[0])
    assert not hf_vision.match_resnet(resnet.resnet.encoder.stages[0])
    assert hf_vision.match_convnext(convnext.convnext.encoder.stages[0].layers[0])
    assert not hf_vision.match_convnext(convnext.convnext.encoder.stages[0])
    assert not hf_vision.match_resnet(nn.Conv2d(3, 3, 1)) and not hf_vision.match_convnext(nn.Conv2d(3, 3, 1))
