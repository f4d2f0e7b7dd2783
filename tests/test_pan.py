"""PAN attribute network: attention kinds, masks, mask correctness, ARNN swap, training."""

import pytest
import torch
import torch.nn.functional as F

import arnn_plugins as ap
from arnn_plugins.adapters.pan_local import LocalARNNAttention
from arnn_plugins.models.pan import (
    ATTENTION_KINDS,
    PAN,
    LocalAttention,
    evaluate_pan,
    mask_correctness,
    train_pan,
)

SIZE = 32  # maps of 16, 8, 4, 2 after the four pooling stacks


def _batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (b,), generator=g)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_forward_backward_and_masks(kind):
    torch.manual_seed(0)
    model = PAN(kind, image_size=SIZE)
    x, q = _batch()
    logits, masks = model(x, q)
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    expected = {"none": [], "san": [(3, 1, 2, 2)]}.get(kind, [(3, 1, s, s) for s in (16, 8, 4, 2)])
    assert [tuple(m.shape) for m in masks] == expected
    for m in masks:
        assert m.min() >= 0 and m.max() <= 1
    if kind == "san":
        torch.testing.assert_close(masks[0].sum(dim=(1, 2, 3)), torch.ones(3))
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    # Every parameter, attention included, receives a gradient.
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if kind != "none":
        att_grad = sum(p.grad.abs().sum() for p in model.attention.parameters())
        assert att_grad > 0
        # The masks depend on the query.
        _, masks2 = model(x, (q + 1) % 10)
        assert any(not torch.allclose(a, b) for a, b in zip(masks, masks2))


@pytest.mark.parametrize("kind", ["ctx", "arnn", "none"])
def test_pool_readout_is_the_mask_weighted_average(kind):
    torch.manual_seed(0)
    model = PAN(kind, image_size=SIZE, readout="pool").eval()
    x, q = _batch()
    seen = {}
    model.head.register_forward_hook(lambda mod, args, out: seen.update(inp=args[0]))
    logits, masks = model(x, q)
    # The same network by hand: masks on every stack, then the last map
    # averaged with the last mask's weights (plain average with no mask).
    feat, qq = x, F.one_hot(q, 10).float()
    for i, stack in enumerate(model.stacks):
        feat = stack(feat)
        if kind != "none":
            m = torch.sigmoid(model.attention[str(i)](feat, qq))
            feat = feat * m if i < len(model.stacks) - 1 else (feat * m).sum((2, 3)) / m.sum((2, 3))
    if kind == "none":
        feat = feat.mean((2, 3))
    torch.testing.assert_close(seen["inp"], torch.cat([feat, qq], 1))
    assert seen["inp"].shape == (3, 32 + 10)
    with pytest.raises(ValueError, match="readout"):
        PAN(kind, image_size=SIZE, readout="sum")


def test_attention_modules_per_kind():
    types = lambda m: [type(a).__name__ for a in m.attention.values()]
    assert types(PAN("none", image_size=SIZE)) == []
    assert list(PAN("san", image_size=SIZE).attention) == ["3"]
    assert types(PAN("brnn", image_size=SIZE)) == ["BlockAttentionRNN"] * 3 + ["AttentionRNN"]
    m = PAN("noctx", image_size=SIZE)
    assert [a.context_kernel for a in m.attention.values()] == [1] * 4
    assert [a.context_kernel for a in PAN("ctx", image_size=SIZE).attention.values()] == [3] * 4
    arnn = PAN("arnn", image_size=SIZE).attention["0"]
    assert arnn.combine == "learned" and not arnn.sample and arnn.query_channels == 10
    assert PAN("arnn_ind", image_size=SIZE).attention["0"].combine == "independent"
    assert PAN("arnn_sample", image_size=SIZE).attention["0"].sample


def test_sampled_attention_is_stochastic_in_training_only():
    torch.manual_seed(0)
    model = PAN("arnn_sample", image_size=SIZE)
    x, q = _batch()
    a, b = model(x, q)[1][0], model(x, q)[1][0]
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(x, q)[1][0], model(x, q)[1][0])


def test_inverse_task_sizes_and_bad_input():
    model = PAN("ctx", num_classes=10, num_queries=5, image_size=SIZE)
    x, _ = _batch()
    logits, _ = model(x, torch.tensor([0, 4, 2]))
    assert logits.shape == (3, 10)
    onehot = F.one_hot(torch.tensor([0, 4, 2]), 5).float()
    torch.testing.assert_close(model(x, onehot)[0], logits)
    with pytest.raises(ValueError, match=r"PAN: expected image of shape \(B, 3, 32, 32\)"):
        model(torch.rand(3, 3, 48, 48), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"PAN: query indices must lie in \[0, 5\)"):
        model(x, torch.tensor([0, 1, 7]))
    with pytest.raises(ValueError, match="queries"):
        model(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="PAN: attention must be one of"):
        PAN("cbam")
    with pytest.raises(ValueError, match=r"LocalAttention: expected input of shape \(B, 32, h, w\)"):
        model.attention["0"](torch.rand(2, 16, 8, 8), torch.zeros(2, 5))


def test_mask_correctness_hand_made_cases():
    target = torch.zeros(2, 8, 8, dtype=torch.bool)
    target[0, 2:4, 2:6] = True  # 8 of 64 pixels
    target[1, :, :4] = True  # half the image
    inside = target[:, None].float() * 0.7  # attention only inside the target
    torch.testing.assert_close(mask_correctness([inside], target), torch.ones(2))
    uniform = torch.full((2, 1, 4, 4), 0.3)  # lower resolution, upsampled
    torch.testing.assert_close(mask_correctness([uniform], target), torch.tensor([8 / 64, 0.5]))
    torch.testing.assert_close(mask_correctness([], target), torch.tensor([8 / 64, 0.5]))
    # Layers multiply: the product with a uniform layer is still all inside.
    torch.testing.assert_close(mask_correctness([inside, uniform], target), torch.ones(2))
    # 0.75 inside, 0.25 outside, half the area inside: 0.75 / (0.75 + 0.25).
    graded = torch.where(target[1:2, None], 0.75, 0.25)
    torch.testing.assert_close(mask_correctness([graded], target[1:2]), torch.tensor([0.75]))
    # A layer that is zero on the target leaves no mass there.
    torch.testing.assert_close(mask_correctness([1.0 - target[:, None].float()], target), torch.zeros(2))
    with pytest.raises(ValueError, match=r"mask_correctness: expected mask 0 of shape \(2, 1, h, w\)"):
        mask_correctness([torch.rand(2, 8, 8)], target)


@pytest.mark.parametrize("kind", ["ctx", "noctx"])
def test_swap_residual_keeps_outputs(kind):
    torch.manual_seed(0)
    model = PAN(kind, image_size=SIZE).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, q = _batch()
    ref_logits, ref_masks = model(x, q)
    names = ap.swap_attention(model)
    assert names == [f"attention.{i}" for i in range(4)]
    assert all(type(a) is LocalARNNAttention for a in model.attention.values())
    logits, masks = model(x, q)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    for a, b in zip(masks, ref_masks):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The original checkpoint still loads; only ARNN keys are new.
    missing, unexpected = model.load_state_dict(before, strict=False)
    assert not unexpected and missing and all(".arnn." in k for k in missing)
    # The correction learns: its zero-initialised output layer gets a gradient.
    model.train()
    F.cross_entropy(model(x, q)[0], torch.tensor([0, 1, 2])).backward()
    assert model.attention["0"].arnn.combiner[-1].weight.grad.abs().sum() > 0
    # Nothing left to swap.
    with pytest.raises(ValueError, match="found no attention module"):
        ap.swap_attention(model)


def test_swap_replace_gives_plain_arnn():
    torch.manual_seed(0)
    model = PAN("ctx", image_size=SIZE)
    names = ap.swap_attention(model, mode="replace", hidden_channels=8)
    assert len(names) == 4
    layers = list(model.attention.values())
    assert all(type(a) is ap.AttentionRNN for a in layers)
    assert layers[0].hidden_channels == 8 and layers[0].query_channels == 10
    x, q = _batch()
    logits, masks = model(x, q)
    assert logits.shape == (3, 5) and all(0 <= m.min() and m.max() <= 1 for m in masks)
    with pytest.raises(ValueError, match="found no attention module"):
        ap.swap_attention(PAN("arnn", image_size=SIZE))


@pytest.mark.parametrize("kind", ["ctx", "arnn"])
def test_training_lowers_the_loss(kind):
    from arnn_plugins.data import MultiDigitDataset

    torch.manual_seed(0)
    ds = MultiDigitDataset("mref", "train", 16, size=SIZE, seed=0)
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it["image"] for it in items])
    q = torch.tensor([it["query"] for it in items])
    y = torch.tensor([it["answer"] for it in items])
    model = PAN(kind, image_size=SIZE)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(model(x, q)[0], y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Chance level is ln 5 = 1.61; across init seeds the final loss is 0.4-0.6 of the first.
    assert losses[-1] < 0.75 * losses[0], losses


def test_evaluate_pan_matches_a_manual_count():
    from arnn_plugins.data import MultiDigitDataset
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    ds = MultiDigitDataset("mref", "test", 6, size=SIZE, seed=0)
    model = PAN("ctx", image_size=SIZE).eval()
    res = evaluate_pan(model, DataLoader(ds, batch_size=4))
    batch = next(iter(DataLoader(ds, batch_size=6)))
    logits, masks = model(batch["image"], batch["query"])
    assert res["count"] == 6
    assert res["accuracy"] == pytest.approx((logits.argmax(1) == batch["answer"]).float().mean().item())
    assert res["correctness"] == pytest.approx(mask_correctness(masks, batch["mask"]).mean().item(), abs=1e-6)
    want = [mask_correctness([m], batch["mask"]).mean().item() for m in masks]
    assert len(want) == 4 and res["layer_correctness"] == pytest.approx(want, abs=1e-6)
    assert sum(v == v for v in res["per_scale"].values()) >= 1  # some scale bins are filled


def test_train_pan_fits_a_small_set():
    from arnn_plugins.data import MultiDigitDataset
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    ds = MultiDigitDataset("mref", "train", 16, size=SIZE, seed=0)
    model = PAN("ctx", image_size=SIZE)
    history = train_pan(model, DataLoader(ds, batch_size=16), epochs=20, lr=3e-3)
    assert len(history) == 20 and history[-1] < 0.75 * history[0]
    with pytest.raises(ValueError, match="train_pan: epochs"):
        train_pan(model, [], epochs=0)


@pytest.mark.parametrize("kind", ["ctx", "arnn"])
def test_softmax_readout_attends_with_the_last_layer_and_can_hide_the_query(kind):
    torch.manual_seed(0)
    model = PAN(kind, image_size=SIZE, readout="softmax", head_query=False).eval()
    x, q = _batch()
    seen = {}
    model.head.register_forward_hook(lambda mod, args, out: seen.update(inp=args[0]))
    logits, masks = model(x, q)
    # The last mask is a distribution over its map; the earlier ones are sigmoid gates.
    torch.testing.assert_close(masks[-1].sum(dim=(1, 2, 3)), torch.ones(3))
    assert model.head[0].in_features == 32  # the attended vector alone, no query
    h = x
    for i, stack in enumerate(model.stacks):
        h = stack(h)
        if i < len(model.stacks) - 1:
            h = h * masks[i]
    torch.testing.assert_close(seen["inp"], (h * masks[-1]).sum(dim=(2, 3)))
    # Without the query in the head, the answer changes with the query only through the masks.
    from arnn_plugins.engine.pan import _UniformMasks

    with _UniformMasks(model):
        a, _ = model(x, q)
        b, _ = model(x, (q + 1) % 10)
    torch.testing.assert_close(a, b)


def test_curve_point_measures_masks_answers_and_gradients():
    from arnn_plugins.engine.pan import curve_point, mask_entropy

    torch.testing.assert_close(mask_entropy(torch.full((2, 1, 4, 4), 0.3)), torch.ones(2))
    peaked = torch.zeros(1, 1, 4, 4)
    peaked[0, 0, 1, 2] = 1.0
    assert mask_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    model = PAN("ctx", image_size=SIZE).train()
    x, q = _batch(4)
    target = torch.zeros(4, SIZE, SIZE, dtype=torch.bool)
    target[:, :8, :8] = True
    batch = {"image": x, "query": q, "answer": torch.tensor([0, 1, 2, 3]), "mask": target}
    p = curve_point(model, [batch], batch)
    assert model.training and all(w.grad is None for w in model.parameters())
    assert len(p["layer_correctness"]) == len(p["layer_entropy"]) == len(p["layer_mean"]) == 4
    assert all(0 < e <= 1 for e in p["layer_entropy"])
    assert all(v > 0 for v in p["grad_norm"].values())
    logits, masks = model.eval()(x, q)
    assert p["accuracy"] == (logits.argmax(1) == batch["answer"]).float().mean().item()
    assert p["correctness"] == pytest.approx(mask_correctness(masks, target).mean().item(), rel=1e-5)
    # The constant masks of the uniform-mask accuracy are gone afterwards.
    assert all(len(m._forward_hooks) == 0 for m in model.attention.values())


@pytest.mark.parametrize("kind", ["ctx", "arnn"])
def test_mask_bias_shifts_the_gate_logits(kind):
    x, q = _batch()
    torch.manual_seed(0)
    plain = PAN(kind, image_size=SIZE).eval()
    torch.manual_seed(0)
    shifted = PAN(kind, image_size=SIZE, mask_bias=2.0).eval()
    _, m0 = plain(x, q)
    _, m2 = shifted(x, q)
    # Same weights: the first mask's logits move by exactly the bias (later
    # layers see features gated by the shifted masks, so only the first is exact).
    torch.testing.assert_close(torch.logit(m2[0].double()) - torch.logit(m0[0].double()),
                               torch.full_like(m0[0], 2.0, dtype=torch.float64), atol=1e-4, rtol=0)
    assert m2[0].mean() > 0.8 > 0.6 > m0[0].mean()
    with pytest.raises(ValueError, match="PAN: mask_bias"):
        PAN(kind, image_size=SIZE, mask_bias=float("nan"))


@pytest.mark.parametrize("kind", ["ctx", "arnn", "san"])
def test_query_film_scales_what_attention_reads(kind):
    x, q = _batch()
    torch.manual_seed(0)
    plain = PAN(kind, image_size=SIZE).eval()
    film = PAN(kind, image_size=SIZE, query_film=True).eval()
    missing, unexpected = film.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("query_film.") for k in missing)
    assert sorted(film.query_film) == sorted(plain.attention)
    # Zero at init: the same function as without it.
    (l0, m0), (l1, m1) = plain(x, q), film(x, q)
    torch.testing.assert_close(l1, l0)
    # W q = -1 for one query zeroes the first attention layer's input for
    # that item only: its mask is the layer's output on zero features.
    first = min(film.query_film, key=int)
    with torch.no_grad():
        film.query_film[first].weight[:, int(q[0])] = -1.0
    _, m = film(x, q)
    feats = x
    for stack in film.stacks[:int(first) + 1]:  # no attention before the first
        feats = stack(feats)
    onehot = F.one_hot(q, 10).float()
    a = film.attention[first](torch.zeros_like(feats[:1]), onehot[:1])
    expected = torch.softmax(a.flatten(1), 1).view_as(a) if kind == "san" else torch.sigmoid(a)
    torch.testing.assert_close(m[0][:1], expected)
    others = q != q[0]
    assert others.any()
    torch.testing.assert_close(m[0][others], m0[0][others])
    # It trains: its weights get a gradient.
    film.train()
    logits, _ = film(x, q)
    logits.sum().backward()
    assert film.query_film[first].weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="PAN: query_film"):
        PAN(kind, image_size=SIZE, query_film=1)
