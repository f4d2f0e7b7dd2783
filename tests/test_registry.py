"""The adapter registry: third-party adapters, failure atomicity, device/dtype/mode of swaps."""

import pytest
import torch
import torch.nn as nn

import arnn_plugins as ap
from arnn_plugins.registry import _ADAPTERS


class ToyAttention(nn.Module):
    """A host's local spatial attention: ``x * sigmoid(conv(x))``."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


class ToyARNN(nn.Module):
    def __init__(self, old, **kw):
        super().__init__()
        self.prior = old
        self.arnn = ap.zero_init_attention(ap.AttentionRNN(old.conv.in_channels, **kw))

    def forward(self, x):
        return x * torch.sigmoid(self.prior.conv(x) + self.arnn(x))


@pytest.fixture
def toy_adapter():
    ap.register_adapter("toy", kind="swap", match=lambda m: type(m) is ToyAttention,
                        build=lambda m, mode="residual", **kw: ToyARNN(m, **kw), description="toy host")
    yield "toy"
    _ADAPTERS.pop("toy")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), ToyAttention(4), nn.Conv2d(4, 4, 1), ToyAttention(4))


def test_third_party_swap_keeps_function_dtype_and_mode(toy_adapter):
    model = _model().double().eval()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    before = model(x)
    names = ap.swap_attention(model, adapters=["toy"], hidden_channels=3)
    assert names == ["1", "3"] and "toy" in ap.list_adapters("swap")
    assert all(isinstance(model[i], ToyARNN) for i in (1, 3))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not model[1].training and not model[1].arnn.training
    assert torch.allclose(model(x), before, atol=1e-12)


def test_failed_swap_leaves_model_unchanged(toy_adapter):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="hidden_channels"):
        ap.swap_attention(model, adapters=["toy"], hidden_channels=0)
    assert all(type(model[i]) is ToyAttention for i in (1, 3))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_nothing_to_swap_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="swap_attention: found no attention module"):
        ap.swap_attention(model)
    with pytest.raises(ValueError, match="insert_attention: found no insertion point"):
        ap.insert_attention(model)
    assert list(model.state_dict()) == ["0.weight", "0.bias"]


def test_register_rejects_bad_and_duplicate_adapters(toy_adapter):
    with pytest.raises(ValueError, match="kind"):
        ap.register_adapter("x", kind="wrap", match=bool, build=bool)
    with pytest.raises(ValueError, match="exists"):
        ap.register_adapter("toy", kind="swap", match=bool, build=bool)
    with pytest.raises(ValueError, match="mode"):
        ap.swap_attention(_model(), mode="blend")


def test_insert_then_remove_restores_function():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    ref = model(x)
    names = ap.insert_attention(model, stages=(4,), hidden_channels=4)
    assert names == ["layer4.0.arnn_gate", "layer4.1.arnn_gate"]
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).attn.combiner[-1].bias.fill_(1.0)  # make the gates do something
    assert not torch.allclose(model(x), ref)
    assert ap.remove_attention(model) == names
    assert torch.allclose(model(x), ref) and not any("arnn" in k for k in model.state_dict())
