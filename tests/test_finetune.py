"""Fine-tuning helpers: ARNN-aware checkpoint loading, parameter groups, freezing."""

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

import arnn_plugins as ap  # noqa: E402
from arnn_plugins.finetune import (  # noqa: E402
    arnn_modules,
    arnn_parameter_names,
    classifier_head_names,
    freeze_backbone,
    is_arnn_key,
    load_pretrained,
    param_groups,
    read_state_dict,
    unfreeze,
)

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def make(attn="cbam", seed=0, num_classes=10, swap=False):
    torch.manual_seed(seed)
    block_args = dict(attn_layer=attn) if attn else None
    model = timm.create_model(
        "resnet18", block_args=block_args, num_classes=num_classes, zero_init_last=False
    ).eval()
    if swap:
        ap.swap_attention(model, hidden_channels=8)
    return model


def tensors(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_arnn_parameters_are_those_inside_arnn_modules():
    model = make(swap=True)
    names = arnn_parameter_names(model)
    assert names and all(".spatial.arnn." in n for n in names)
    assert len(arnn_modules(model)) == 8
    # The CBAM prior conv of a residual swap is a backbone parameter.
    assert not is_arnn_key(model, "layer1.0.se.spatial.conv.conv.weight")
    assert is_arnn_key(model, "layer1.0.se.spatial.arnn.weight_hh")
    assert not is_arnn_key(model, "layer1.0.se.spatial.arnn_other")


def test_param_groups_partition_parameters_with_their_learning_rates():
    model = make(swap=True)
    groups = param_groups(model, lr=0.01, arnn_lr=0.1, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["backbone", "backbone_no_decay", "arnn", "arnn_no_decay"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_id = {id(p): n for n, p in model.named_parameters()}
    arnn = set(arnn_parameter_names(model))
    for g in groups:
        names = {by_id[id(p)] for p in g["params"]}
        if g["name"].startswith("arnn"):
            assert names <= arnn and g["lr"] == 0.1
        else:
            assert not names & arnn and g["lr"] == 0.01
        no_decay = g["name"].endswith("no_decay")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05)
        assert all((p.ndim <= 1) == no_decay for p in g["params"])
    assert {by_id[id(p)] for g in groups if g["name"].startswith("arnn") for p in g["params"]} == arnn
    opt = torch.optim.AdamW(groups)
    assert sorted(g["lr"] for g in opt.param_groups) == [0.01, 0.01, 0.1, 0.1]

    # Frozen parameters are left out; arnn_lr defaults to lr.
    freeze_backbone(model, train_head=False)
    groups = param_groups(model, lr=0.01)
    assert [g["name"] for g in groups] == ["arnn", "arnn_no_decay"]
    assert all(g["lr"] == 0.01 for g in groups)
    with pytest.raises(ValueError, match="param_groups: arnn_lr"):
        param_groups(model, lr=0.01, arnn_lr=-1.0)


@pytest.mark.parametrize("train_head", [True, False])
def test_freeze_backbone_trains_arnn_and_the_head_and_unfreeze_undoes_it(train_head):
    model = make(swap=True)
    head = classifier_head_names(model)
    assert head == ["fc.weight", "fc.bias"]
    names = freeze_backbone(model, train_head=train_head)
    assert names == sorted(arnn_parameter_names(model) + (head if train_head else []))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    nn.functional.cross_entropy(model(X), torch.tensor([3, 4])).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(names)
    assert ("fc.weight" in changed) == train_head

    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_classifier_head_of_torchvision_and_transformers_models():
    tv = pytest.importorskip("torchvision")
    assert classifier_head_names(tv.models.resnet18(num_classes=3)) == ["fc.weight", "fc.bias"]
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=3)
    hf = transformers.ResNetForImageClassification(cfg)
    assert classifier_head_names(hf) == ["classifier.1.weight", "classifier.1.bias"]
    assert classifier_head_names(nn.Sequential(nn.Conv2d(1, 1, 1))) == []


def test_freeze_backbone_without_arnn_raises():
    model = make()
    with pytest.raises(ValueError, match="freeze_backbone: .* no ARNN parameters"):
        freeze_backbone(model)
    assert all(p.requires_grad for p in model.parameters())


def test_load_pretrained_rejects_a_wrong_checkpoint_and_changes_nothing():
    model = make(swap=True, seed=1)
    snap = tensors(model)
    # A ResNet18 without CBAM: the channel branches' weights are missing.
    with pytest.raises(ValueError, match="missing keys that are not ARNN's: .*channel.fc1.weight"):
        load_pretrained(model, make(attn=None).state_dict())
    # A deeper model's extra block.
    deeper = dict(make().state_dict(), **{"layer1.2.conv1.weight": torch.zeros(64, 64, 3, 3)})
    with pytest.raises(ValueError, match=r"unexpected keys: layer1\.2\.conv1\.weight"):
        load_pretrained(model, deeper)
    # Another head size: shapes differ.
    with pytest.raises(ValueError, match=r"shape mismatches: fc.bias: checkpoint \(100,\) vs model \(10,\)"):
        load_pretrained(model, make(num_classes=100).state_dict())
    with pytest.raises(ValueError, match="no such file"):
        load_pretrained(model, "/nonexistent/weights.pth")
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snap.items())


def test_load_pretrained_with_a_new_head():
    original = make(num_classes=100)
    model = make(swap=True, seed=1)
    head = model.fc.weight.detach().clone()
    report = load_pretrained(model, original.state_dict(), exclude=("fc.",))
    assert report.excluded == ["fc.bias", "fc.weight"]
    assert torch.equal(model.fc.weight, head)
    assert torch.equal(model.conv1.weight, original.conv1.weight)
    assert "ARNN keys" in str(report)


@pytest.fixture(scope="module")
def cbam_weights():
    """A CBAM ResNet18's state_dict and its logits on ``X``."""
    original = make()
    with torch.no_grad():
        return original.state_dict(), original(X)


@pytest.mark.parametrize("fmt", ["pth", "nested", "dataparallel", "safetensors"])
def test_load_pretrained_from_files_and_checkpoint_dicts(fmt, tmp_path, cbam_weights):
    sd, expected = cbam_weights
    if fmt == "pth":
        source = tmp_path / "w.pth"
        torch.save(sd, source)
    elif fmt == "nested":
        source = tmp_path / "ckpt.pth"
        torch.save({"state_dict": sd, "epoch": 3}, source)
    elif fmt == "dataparallel":
        source = {"module." + k: v for k, v in sd.items()}
    else:
        from safetensors.torch import save_file

        source = str(tmp_path / "w.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, source)
    model = make(swap=True, seed=1)
    report = load_pretrained(model, source)
    assert set(report.loaded) == set(sd)
    assert set(report.missing_arnn) == set(model.state_dict()) - set(sd)
    with torch.no_grad():
        assert (model(X) - expected).abs().max().item() <= 1e-5


def test_transformers_local_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    if "hf_resnet" not in ap.list_adapters("insert"):
        pytest.skip("transformers ResNet adapter not available")
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic", num_labels=10
    )
    torch.manual_seed(0)
    original = transformers.ResNetForImageClassification(config).eval()
    with torch.no_grad():
        expected = original(pixel_values=X).logits
    original.save_pretrained(tmp_path)

    # The usual order: from_pretrained, then gates (identity at init).
    loaded = transformers.ResNetForImageClassification.from_pretrained(tmp_path).eval()
    ap.insert_attention(loaded, adapters=["hf_resnet"], hidden_channels=4)
    with torch.no_grad():
        assert (loaded(pixel_values=X).logits - expected).abs().max().item() <= 1e-5

    # Or gates first, then the weights from the directory.
    torch.manual_seed(1)
    model = transformers.ResNetForImageClassification(config).eval()
    gates = ap.insert_attention(model, adapters=["hf_resnet"], hidden_channels=4)
    report = load_pretrained(model, tmp_path)
    assert report.missing_arnn and all(any(k.startswith(g + ".") for g in gates) for k in report.missing_arnn)
    with torch.no_grad():
        assert (model(pixel_values=X).logits - expected).abs().max().item() <= 1e-5


def test_read_state_dict_rejects_what_is_not_a_state_dict(tmp_path):
    with pytest.raises(ValueError, match="has none of"):
        read_state_dict(tmp_path)
    with pytest.raises(ValueError, match="not a state_dict of tensors"):
        read_state_dict({"weight": torch.zeros(1), "epoch": 3})
    with pytest.raises(TypeError, match="read_state_dict: expected a state_dict mapping or a path"):
        read_state_dict(3)
