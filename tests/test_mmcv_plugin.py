"""MMCV plugin layers AttentionRNN / BlockAttentionRNN, in mmdet and mmseg ResNets and the shipped configs."""

import os

import pytest
import torch
import torch.nn as nn

pytest.importorskip("mmengine")
mmcv_cnn = pytest.importorskip("mmcv.cnn")

from mmengine.config import Config  # noqa: E402
from mmengine.model.weight_init import initialize  # noqa: E402
from mmengine.registry import MODELS, DefaultScope, Registry  # noqa: E402

from arnn_plugins.adapters import mmcv_plugin  # noqa: E402
from arnn_plugins.adapters.mmcv_plugin import AttentionRNNPlugin, BlockAttentionRNNPlugin  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
PLUGIN_TYPES = (AttentionRNNPlugin, BlockAttentionRNNPlugin)


def arnn_plugins_cfg(type_="AttentionRNN", stages=(False, True, True, True), **options):
    return [dict(cfg=dict(type=type_, **options), stages=stages, position="after_conv2")]


def plugin_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, PLUGIN_TYPES)]


def max_diff(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        return max(max_diff(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def copy_plain_weights(plain, model):
    """Load an un-plugged model's weights; only the plugins' own keys may be missing."""
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(".arnn." in k or ".brnn." in k for k in missing)
    return missing


def zeroed_head(plugin):
    """The layer that zero_init_attention zeroed (the only one with gradient at init)."""
    arnn = plugin.attn.arnn if isinstance(plugin, BlockAttentionRNNPlugin) else plugin.attn
    return arnn.combiner[-1]


def randomise(module, scale=0.5):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- plugin layers


def test_registered_in_root_registry_without_clash():
    assert MODELS.get("AttentionRNN") is AttentionRNNPlugin
    assert MODELS.get("BlockAttentionRNN") is BlockAttentionRNNPlugin
    # Importing again (or a reload) keeps the registration and does not raise.
    mmcv_plugin.register_plugins()
    assert MODELS.get("AttentionRNN") is AttentionRNNPlugin


def test_refuses_to_replace_another_class_of_the_same_name():
    reg = Registry("scratch")

    @reg.register_module(name="AttentionRNN")
    class Other(nn.Module):
        pass

    with pytest.raises(KeyError, match="refusing to replace"):
        mmcv_plugin.register_plugins(reg)
    assert reg.get("AttentionRNN") is Other


@pytest.mark.parametrize(
    "cfg, postfix, abbr, cls",
    [
        (dict(type="AttentionRNN"), "", "arnn", AttentionRNNPlugin),
        (dict(type="AttentionRNN", hidden_channels=4), 2, "arnn2", AttentionRNNPlugin),
        (dict(type="BlockAttentionRNN", block_size=3), "", "brnn", BlockAttentionRNNPlugin),
    ],
)
def test_build_plugin_layer_name_and_identity_at_init(cfg, postfix, abbr, cls):
    name, layer = mmcv_cnn.build_plugin_layer(cfg, postfix=postfix, in_channels=16)
    assert name == abbr and type(layer) is cls
    x = torch.randn(2, 16, 11, 7)  # odd sizes: the block variant pads and crops
    y = layer(x)
    assert y.shape == x.shape
    assert (y - x).abs().max().item() <= 1e-6
    # The gate really acts once its attention is trained away from zero.
    randomise(layer)
    assert (layer(x) - x).abs().max().item() > 1e-3


def test_plugin_options_reach_the_attention_layer():
    _, layer = mmcv_cnn.build_plugin_layer(
        dict(type="AttentionRNN", hidden_channels=4, context_kernel=1, combine="independent"), in_channels=8
    )
    assert layer.attn.hidden_channels == 4 and layer.attn.context_kernel == 1 and layer.attn.combiner is None
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(layer(x), x)
    _, brnn = mmcv_cnn.build_plugin_layer(dict(type="BlockAttentionRNN", block_size=4, hidden_channels=4), in_channels=8)
    assert brnn.attn.block_size == 4 and brnn.attn.arnn.hidden_channels == 4


def test_context_net_from_a_config_dict():
    _, layer = mmcv_cnn.build_plugin_layer(
        dict(
            type="AttentionRNN",
            context_net=dict(type="Conv2d", in_channels=8, out_channels=6, kernel_size=3, padding=1),
            context_channels=6,
        ),
        in_channels=8,
    )
    assert isinstance(layer.attn.context, nn.Conv2d) and layer.attn.context.out_channels == 6
    x = torch.randn(1, 8, 5, 5)
    assert torch.equal(layer(x), x)


def test_gradient_reaches_plugin_parameters():
    _, layer = mmcv_cnn.build_plugin_layer(dict(type="AttentionRNN", hidden_channels=4), in_channels=8)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    (layer(x) * torch.randn(2, 8, 6, 6)).sum().backward()
    assert zeroed_head(layer).weight.grad.abs().sum() > 0
    assert x.grad is not None


def test_init_weights_restores_identity_after_host_init():
    _, layer = mmcv_cnn.build_plugin_layer(dict(type="BlockAttentionRNN", block_size=2), in_channels=8)
    x = torch.randn(1, 8, 8, 8)
    # What a ResNet's init_cfg does to every Conv2d below it, plugins included.
    initialize(layer, [dict(type="Kaiming", layer="Conv2d"), dict(type="Normal", layer="ConvTranspose2d", bias=1.0)])
    assert (layer(x) - x).abs().max().item() > 1e-3
    layer.init_weights()
    assert torch.equal(layer(x), x)
    t = layer.attn.arnn.hidden_channels
    forget_bias = layer.attn.arnn.input_proj.bias.view(2, 4, t)[:, 1]
    assert torch.all(forget_bias == 1.0)  # the LSTM init came back too, not just the zeroed head


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(type="AttentionRNN", in_channels=0), ValueError, "AttentionRNN plugin: in_channels"),
        (dict(type="AttentionRNN", in_channels=8, query_channels=4), ValueError, "query_channels must be 0"),
        (dict(type="AttentionRNN", in_channels=8, block_size=2), TypeError, "BlockAttentionRNN"),
        (dict(type="BlockAttentionRNN", in_channels=8, block_size=0), ValueError, "block_size"),
        (dict(type="AttentionRNN", in_channels=8, hidden_channels=0), ValueError, "hidden_channels"),
    ],
)
def test_bad_config_raises(kwargs, exc, msg):
    in_channels = kwargs.pop("in_channels")
    with pytest.raises(exc, match=msg):
        mmcv_cnn.build_plugin_layer(kwargs, in_channels=in_channels)


def test_wrong_input_names_layer_and_expected_shape():
    _, layer = mmcv_cnn.build_plugin_layer(dict(type="AttentionRNN"), in_channels=8)
    with pytest.raises(ValueError, match=r"AttentionRNN.*\(B, 8, H, W\)"):
        layer(torch.randn(1, 4, 6, 6))
    with pytest.raises(ValueError, match=r"AttentionRNN.*\(B, 8, H, W\)"):
        layer(torch.randn(8, 6, 6))


# --------------------------------------------------------------------------- mmdet / mmseg ResNets


@pytest.fixture(scope="module")
def mmdet_models():
    pytest.importorskip("mmdet")
    from mmdet.registry import MODELS as DET_MODELS

    return DET_MODELS


@pytest.fixture(scope="module")
def mmseg_models():
    pytest.importorskip("mmseg")
    from mmseg.registry import MODELS as SEG_MODELS

    return SEG_MODELS


def det_resnet(registry, plugins=None):
    torch.manual_seed(0)
    cfg = dict(type="ResNet", depth=50, out_indices=(0, 1, 2, 3), norm_eval=False, plugins=plugins)
    # A Runner earlier in the process leaves its own default scope behind;
    # build in mmdet's scope as an mmdet Runner would.
    with DefaultScope.overwrite_default_scope("mmdet"):
        return registry.build(cfg)


def seg_resnet(registry, plugins=None):
    torch.manual_seed(0)
    cfg = dict(
        type="ResNetV1c", depth=50, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
        contract_dilation=True, plugins=plugins,
    )
    with DefaultScope.overwrite_default_scope("mmseg"):
        return registry.build(cfg)


def check_backbone(plain, model, blocks=(4, 6, 3), first_stage=2, abbr="arnn", widths=(128, 256, 512)):
    names = plugin_names(model)
    expected = [
        f"layer{first_stage + s}.{i}.{abbr}" for s, n in enumerate(blocks) for i in range(n)
    ]
    assert names == expected
    for name in names:
        stage = int(name[len("layer")])
        assert model.get_submodule(name).in_channels == widths[stage - 2]
    copy_plain_weights(plain, model)
    plain.eval(), model.eval()
    with torch.no_grad():
        assert max_diff(model(X), plain(X)) <= 1e-5
    # Forward and backward in training mode: gradient reaches every plugin.
    model.train()
    sum(o.mean() for o in model(X)).backward()
    for name in names:
        assert zeroed_head(model.get_submodule(name)).weight.grad.abs().sum() > 0


def test_child_registries_find_the_plugins(mmdet_models, mmseg_models):
    assert mmdet_models.get("AttentionRNN") is AttentionRNNPlugin
    assert mmseg_models.get("BlockAttentionRNN") is BlockAttentionRNNPlugin


def test_mmdet_resnet50_with_arnn_plugins(mmdet_models):
    model = det_resnet(mmdet_models, arnn_plugins_cfg(hidden_channels=8))
    assert len(plugin_names(model)) == 13
    assert not any(hasattr(b, "arnn") for b in model.layer1)
    check_backbone(det_resnet(mmdet_models), model)


def test_mmdet_resnet50_with_block_arnn_plugins(mmdet_models):
    model = det_resnet(
        mmdet_models, arnn_plugins_cfg("BlockAttentionRNN", (False, False, True, True), block_size=2, hidden_channels=4)
    )
    check_backbone(det_resnet(mmdet_models), model, blocks=(6, 3), first_stage=3, abbr="brnn", widths=(128, 256, 512))


def test_mmdet_init_weights_keeps_plugins_identity(mmdet_models):
    model = det_resnet(mmdet_models, arnn_plugins_cfg(hidden_channels=4))
    model.init_weights()  # Kaiming over every Conv2d, then each plugin's own init_weights
    plain = det_resnet(mmdet_models)
    copy_plain_weights(plain, model)
    plain.eval(), model.eval()
    with torch.no_grad():
        assert max_diff(model(X), plain(X)) <= 1e-5


def test_mmseg_resnetv1c_with_arnn_plugins(mmseg_models):
    model = seg_resnet(mmseg_models, arnn_plugins_cfg(hidden_channels=8))
    assert len(plugin_names(model)) == 13
    check_backbone(seg_resnet(mmseg_models), model)


# --------------------------------------------------------------------------- shipped configs


def load_config(name):
    cfg = Config.fromfile(os.path.join(CONFIGS, name))  # runs custom_imports
    assert cfg.custom_imports == dict(imports=["arnn_plugins.adapters.mmcv_plugin"], allow_failed_imports=False)
    assert "_base_" not in cfg
    return cfg


def build_like_runner(cfg, model_cfg=None):
    """Build ``cfg.model`` the way mmengine's Runner does: root MODELS under the config's default scope."""
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MODELS.build(model_cfg if model_cfg is not None else cfg.model).eval()


def test_retinanet_config_builds_and_runs(mmdet_models):
    cfg = load_config("mmdet_retinanet_r50_arnn.py")
    assert cfg.model.backbone.plugins[0]["stages"] == (False, True, True, True)
    detector = build_like_runner(cfg)
    assert len(plugin_names(detector)) == 13
    with torch.no_grad():
        feats = detector.extract_feat(X)  # backbone + FPN
        assert [f.shape[-1] for f in feats] == [8, 4, 2, 1, 1] and all(f.shape[1] == 256 for f in feats)
        cls_scores, bbox_preds = detector(X, mode="tensor")
    assert len(cls_scores) == 5 and cls_scores[0].shape == (1, 9 * 80, 8, 8)
    assert bbox_preds[0].shape == (1, 9 * 4, 8, 8)

    # Identity at init against the same detector without plugins.
    plain_cfg = cfg.model.copy()
    plain_cfg.backbone = dict(cfg.model.backbone, plugins=None)
    plain = build_like_runner(cfg, plain_cfg)
    copy_plain_weights(plain, detector)
    with torch.no_grad():
        assert max_diff(detector(X, mode="tensor"), plain(X, mode="tensor")) <= 1e-5


def test_segmentation_config_builds_and_runs(mmseg_models):
    cfg = load_config("mmseg_r50v1c_arnn.py")
    assert cfg.model.backbone.type == "ResNetV1c"
    assert cfg.model.backbone.plugins[0]["stages"] == (False, True, True, True)
    segmentor = build_like_runner(cfg)
    assert len(plugin_names(segmentor)) == 13
    with torch.no_grad():
        feats = segmentor.extract_feat(X)
        assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048]
        logits = segmentor(X, mode="tensor")
    assert logits.shape == (1, 19, 8, 8)  # output stride 8

    plain_cfg = cfg.model.copy()
    plain_cfg.backbone = dict(cfg.model.backbone, plugins=None)
    plain = build_like_runner(cfg, plain_cfg)
    copy_plain_weights(plain, segmentor)
    with torch.no_grad():
        assert max_diff(segmentor(X, mode="tensor"), plain(X, mode="tensor")) <= 1e-5
