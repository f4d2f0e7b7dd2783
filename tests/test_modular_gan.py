"""ModularGAN: modules, masks (local and ARNN), the swap, training steps, CelebA loader."""

import numpy as np
import pytest
import torch

import arnn_plugins as ap
from arnn_plugins.data.celeba import CelebA, read_celeba_attributes
from arnn_plugins.models.modular_gan import (
    LocalMask,
    MGANDiscriminator,
    ModularGAN,
    TransformerModule,
    gan_step,
    gradient_penalty,
    optimizer_update,
)


def adam_updates(model, lr=1e-4):
    """Plain Adam updates for D and for the generator, as ``gan_step`` takes them."""
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(list(model.generator_parameters()), lr=lr, betas=(0.5, 0.999))
    return optimizer_update(opt_d), optimizer_update(opt_g)

S = 32


def small_gan(seed=0):
    torch.manual_seed(seed)
    return ModularGAN([3, 2], image_size=S, base=8, n_res_encoder=1, n_res_transformer=1, d_base=8)


def data(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, S, S, generator=g) * 2 - 1
    labels = torch.stack([torch.arange(b) % 3, torch.arange(b) % 2], dim=1)
    return x, labels


def masks_of(model, x, target):
    _, masks = model.generate(x, target, return_masks=True)
    return masks


@pytest.mark.parametrize("kind", ["local", "arnn"])
def test_generate_forward_backward_and_masks(kind):
    model = small_gan()
    if kind == "arnn":
        ap.swap_attention(model, mode="replace", hidden_channels=4)
    x, labels = data()
    target = labels.flip(0)
    y, masks = model.generate(x, target, return_masks=True)
    assert y.shape == x.shape and y.abs().max() <= 1.0
    assert len(masks) == 2
    for g in masks:
        assert g.shape == (4, 1, S // 4, S // 4)
        assert (g >= 0).all() and (g <= 1).all()
    # A single module can be applied on its own.
    assert len(model.generate(x, target, attributes=[1], return_masks=True)[1]) == 1
    (y.square().mean() + sum(g.mean() for g in masks)).backward()
    for i in range(2):
        mask = model.transformers[i].mask
        params = dict(mask.named_parameters())
        key = "conv.weight" if kind == "local" else "arnn.input_proj.weight"
        assert params[key].grad is not None and params[key].grad.abs().sum() > 0
    assert model.encoder.net[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.discriminator.parameters())


def test_mask_gates_the_edit():
    # f' = g t + (1 - g) f: a mask of zeros leaves the features alone, a mask
    # of ones replaces them by the module's output.
    torch.manual_seed(0)
    mod = TransformerModule(16, 3, n_res=1)
    f = torch.randn(2, 16, 5, 5)
    v = torch.tensor([0, 2])
    with torch.no_grad():
        mod.mask.conv.weight.zero_()
        mod.mask.conv.bias.fill_(-100.0)
        out, g = mod(f, v)
        torch.testing.assert_close(out, f)
        assert g.max() < 1e-6
        mod.mask.conv.bias.fill_(100.0)
        out1, _ = mod(f, v)
        out2, _ = mod(f, torch.tensor([1, 2]))
    assert not torch.allclose(out1, f, atol=1e-3)
    # The target value changes the edit of sample 0 only.
    assert not torch.allclose(out1[0], out2[0], atol=1e-5)
    torch.testing.assert_close(out1[1], out2[1])


def test_arnn_mask_sees_the_raster_past_local_mask_does_not():
    # Changing the features in the top-left corner reaches the bottom-right
    # mask value through ARNN's recurrence but not through a 3x3 conv.
    torch.manual_seed(0)
    local = LocalMask(6)
    wrapper = torch.nn.Sequential(LocalMask(6))
    ap.swap_attention(wrapper, mode="replace", hidden_channels=4, context_kernel=1)
    arnn_mask = wrapper[0]
    t = torch.randn(1, 6, 7, 7)
    t2 = t.clone()
    t2[:, :, 0, 0] += 3.0
    with torch.no_grad():
        assert torch.equal(local(t)[..., -1, -1], local(t2)[..., -1, -1])
        assert (arnn_mask(t)[..., -1, -1] - arnn_mask(t2)[..., -1, -1]).abs().max() > 1e-6
        # ...and never reaches a location that precedes it in raster order.
        t3 = t.clone()
        t3[:, :, -1, -1] += 3.0
        torch.testing.assert_close(arnn_mask(t)[..., :-1, :], arnn_mask(t3)[..., :-1, :])


def test_swap_residual_keeps_the_generator_and_checkpoints():
    model = small_gan().eval()
    x, labels = data()
    target = labels.flip(0)
    before, m_before = model.generate(x, target, return_masks=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = ap.swap_attention(model)
    assert names == ["transformers.0.mask", "transformers.1.mask"]
    mask = model.transformers[0].mask
    assert type(mask).__name__ == "ARNNMask" and mask.residual
    assert mask.arnn.context_kernel == 3  # the original mask's local context
    after, m_after = model.generate(x, target, return_masks=True)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    for a, b in zip(m_after, m_before):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".mask.arnn." in k for k in result.missing_keys)
    with pytest.raises(ValueError, match="found no attention module"):
        ap.swap_attention(model)


def test_swap_replace_changes_the_masks():
    model = small_gan().eval()
    x, labels = data()
    before = masks_of(model, x, labels)
    names = ap.swap_attention(model, mode="replace", hidden_channels=4, context_kernel=1)
    assert len(names) == 2
    mask = model.transformers[1].mask
    assert not mask.residual and not hasattr(mask, "conv")
    assert mask.arnn.hidden_channels == 4 and mask.arnn.context_kernel == 1
    after = masks_of(model, x, labels)
    assert not torch.allclose(after[0], before[0], atol=1e-4)


def test_discriminator_heads_and_gradient_penalty():
    torch.manual_seed(0)
    d = MGANDiscriminator(S, [3, 2], base=8)
    x = torch.randn(5, 3, S, S)
    src, cls = d(x)
    assert src.shape == (5, 1, 2, 2)
    assert [c.shape for c in cls] == [(5, 3), (5, 2)]
    gp = gradient_penalty(d, x, torch.randn(5, 3, S, S))
    assert gp.ndim == 0 and gp >= 0
    gp.backward()  # second-order gradients reach D's weights
    assert d.net[0].weight.grad.abs().sum() > 0
    # A critic whose gradient norm is exactly 1 everywhere has zero penalty:
    # each of the 4 x 4 patch outputs reads one pixel with weight 1/4, so
    # the summed output has gradient 1/4 at 16 pixels, norm 1.
    lin = MGANDiscriminator(8, [2], base=1, n_layers=1, in_channels=1)
    with torch.no_grad():
        lin.net[0].weight.zero_()
        lin.net[0].weight[0, 0, 1, 1] = 0.25
        lin.net[0].bias.fill_(1.0)  # stay on the identity part of the leaky ReLU
        lin.src.weight.zero_()
        lin.src.weight[0, 0, 1, 1] = 1.0
    xs = torch.rand(3, 1, 8, 8)
    assert gradient_penalty(lin, xs, torch.rand(3, 1, 8, 8)).item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match=r"MGANDiscriminator.*\(B, 3, 32, 32\)"):
        d(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("kind", ["local", "arnn"])
def test_trainer_steps_update_both_players_and_lower_losses(kind):
    model = small_gan(seed=1)
    if kind == "arnn":
        ap.swap_attention(model, mode="replace", hidden_channels=4)
    update_d, update_g = adam_updates(model, lr=2e-3)
    x, labels = data(b=4, seed=2)
    d_w = model.discriminator.net[0].weight.detach().clone()
    key = "conv.weight" if kind == "local" else "arnn.input_proj.weight"
    m_w = dict(model.transformers[0].mask.named_parameters())[key].detach().clone()
    hist = []
    for i in range(10):
        torch.manual_seed(100 + i)
        hist.append({k: float(v) for k, v in gan_step(model, x, labels, update_d, update_g).items()})
    assert all(np.isfinite(list(h.values())).all() for h in hist)
    assert not torch.equal(model.discriminator.net[0].weight, d_w)
    assert not torch.equal(dict(model.transformers[0].mask.named_parameters())[key], m_w)
    # Supervised parts fall steadily on a fixed batch: the autoencoder's
    # reconstruction and the feature cycle loss of the generator, and the
    # discriminator's attribute classification of real images.
    first, last = hist[0], hist[-1]
    assert last["rec"] < 0.97 * first["rec"], [h["rec"] for h in hist]
    assert last["cyc"] < 0.8 * first["cyc"], [h["cyc"] for h in hist]
    assert last["d_cls"] < first["d_cls"], [h["d_cls"] for h in hist]


def test_generator_parameters_include_the_swapped_masks():
    model = small_gan()
    n_before = len(list(model.generator_parameters()))
    ap.swap_attention(model, hidden_channels=4)
    names = {id(p) for p in model.generator_parameters()}
    arnn = [p for t in model.transformers for p in t.mask.arnn.parameters()]
    assert len(names) > n_before and all(id(p) in names for p in arnn)


def test_gan_step_rejects_other_models():
    with pytest.raises(TypeError, match="gan_step: expected a ModularGAN"):
        gan_step(torch.nn.Linear(2, 2), torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, dtype=torch.long),
                 lambda loss: None, lambda loss: None)


def test_bad_inputs_name_the_module():
    model = small_gan()
    x, labels = data()
    with pytest.raises(ValueError, match=r"ModularGAN.*\(4, 2\)"):
        model(x, labels[:, :1])
    with pytest.raises(ValueError, match=r"ModularGAN.*\(4, 2\)"):
        model(x, labels.float())
    with pytest.raises(ValueError, match=r"TransformerModule.*\[0, 2\)"):
        model(x, torch.stack([labels[:, 0], labels[:, 1] + 5], dim=1))
    with pytest.raises(ValueError, match=r"MGANEncoder.*\(B, 3, H, W\)"):
        model(x[:, :2], labels)
    with pytest.raises(ValueError, match=r"LocalMask.*\(B, 32, H, W\)"):
        model.transformers[0].mask(torch.randn(2, 5, 4, 4))


# --------------------------------------------------------------------------
# CelebA loader


NAMES = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Eyeglasses", "Male", "Smiling"]
ROWS = [  # hair (black, blond, brown), glasses, male, smiling
    ("000001.jpg", [1, -1, -1, -1, 1, 1]),
    ("000002.jpg", [-1, 1, -1, 1, -1, -1]),
    ("000003.jpg", [-1, -1, 1, -1, -1, 1]),
    ("000004.jpg", [-1, -1, -1, -1, 1, -1]),  # no hair colour: left out
    ("000005.jpg", [1, 1, -1, -1, 1, 1]),  # two hair colours: left out
    ("000006.jpg", [1, -1, -1, 1, -1, -1]),
]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (128, 128, 128)]


@pytest.fixture()
def celeba_root(tmp_path):
    from PIL import Image

    img_dir = tmp_path / "img_align_celeba"
    img_dir.mkdir()
    for (name, _), colour in zip(ROWS, COLOURS):
        # 44 x 54 (W x H) like the aligned faces' aspect; a dark border the
        # centre crop must remove.
        arr = np.zeros((54, 44, 3), dtype=np.uint8)
        arr[5:-5, 5:-5] = colour
        Image.fromarray(arr).save(img_dir / name, quality=95)
    lines = [str(len(ROWS)), " ".join(NAMES)]
    # The published file pads values with two spaces where they are positive.
    lines += [name + "".join(f"{v:>3d}" for v in vals) for name, vals in ROWS]
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "list_eval_partition.txt").write_text(
        "\n".join(f"{name} {p}" for (name, _), p in zip(ROWS, [0, 0, 1, 0, 0, 2])) + "\n"
    )
    return tmp_path


def test_celeba_loader_published_layout(celeba_root):
    names, files, values = read_celeba_attributes(str(celeba_root / "list_attr_celeba.txt"))
    assert names == NAMES and files[0] == "000001.jpg" and values.shape == (6, 6)
    ds = CelebA(str(celeba_root), image_size=S, crop_size=34)
    assert ds.num_values == [3, 2, 2]
    assert ds.attribute_names == ["Black_Hair|Blond_Hair|Brown_Hair", "Male", "Smiling"]
    assert ds.files == ["000001.jpg", "000002.jpg", "000003.jpg", "000006.jpg"]
    torch.testing.assert_close(ds.labels, torch.tensor([[0, 1, 1], [1, 0, 0], [2, 0, 1], [0, 0, 0]]))
    img, lab = ds[0]
    assert img.shape == (3, S, S) and img.dtype == torch.float32 and lab.dtype == torch.long
    # Red image, border cropped away: (1, -1, -1) up to JPEG error.
    torch.testing.assert_close(img.mean((1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=0.06, rtol=0)
    assert img.min() >= -1 and img.max() <= 1
    # Binary attributes only, and the published splits.
    ds2 = CelebA(str(celeba_root), attributes=["Eyeglasses"], image_size=16, split="train")
    assert ds2.files == ["000001.jpg", "000002.jpg", "000004.jpg", "000005.jpg"]
    assert ds2.labels[:, 0].tolist() == [0, 1, 0, 0] and ds2.num_values == [2]
    assert len(CelebA(str(celeba_root), attributes=["Male"], split="test")) == 1
    # A batch trains the GAN.
    model = ModularGAN(ds.num_values, image_size=S, base=8, n_res_encoder=1, n_res_transformer=1, d_base=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    images, labels = next(iter(loader))
    losses = gan_step(model, images, labels, *adam_updates(model))
    assert torch.isfinite(losses["g_loss"]) and torch.isfinite(losses["d_loss"])


def test_celeba_loader_errors(celeba_root, tmp_path_factory):
    with pytest.raises(ValueError, match="unknown attribute 'Bald'"):
        CelebA(str(celeba_root), attributes=["Bald"])
    with pytest.raises(ValueError, match="split"):
        CelebA(str(celeba_root), split="val")
    with pytest.raises(ValueError, match="img_align_celeba"):
        CelebA(str(tmp_path_factory.mktemp("empty")))
