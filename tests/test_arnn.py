"""AttentionRNN / BlockAttentionRNN: structure, gradients, variants, input checks."""

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn as nn

from arnn_plugins import ARNNStats, AttentionRNN, BlockAttentionRNN, product_of_gaussians
from arnn_plugins.ops.reference import skew, skew_mask, unskew


def _dependency(model, x, i, j, b=0):
    """Boolean (B, H, W): which input locations a[b, 0, i, j] depends on."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x)[b, 0, i, j], x)
    return g.abs().sum(1) > 0


def _raster_past(h, w, i, j):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[:i] = True
    m[i, : j + 1] = True
    return m


# --------------------------------------------------------------------------- skew


@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (4, 1), (3, 4), (5, 2), (6, 6)])
def test_skew_matches_loop_and_roundtrips(h, w):
    x = torch.randn(2, 3, h, w)
    s = skew(x)
    slow = torch.zeros(2, 3, h, w + h - 1)
    for i in range(h):
        slow[..., i, i : i + w] = x[..., i, :]
    assert torch.equal(s, slow)
    assert torch.equal(unskew(s, w), x)
    mask = skew_mask(h, w)
    assert mask.sum() == h * w
    assert torch.equal(mask.bool(), (skew(torch.ones(1, 1, h, w)) != 0)[0, 0])


def test_unskew_rejects_wrong_width():
    with pytest.raises(ValueError, match="unskew"):
        unskew(torch.zeros(1, 3, 7), 4)


# --------------------------------------------------------------------------- dependency structure


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5), (5, 3), (1, 6), (6, 1)])
def test_dependency_is_raster_scan_past(h, w):
    torch.manual_seed(0)
    m = AttentionRNN(3, hidden_channels=4, context_kernel=1, backend="reference").double()
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            dep = _dependency(m, x, i, j)
            assert torch.equal(dep[0], _raster_past(h, w, i, j)), (i, j)
            assert not dep[1].any(), "leak across the batch"


def test_dependency_without_shift_covers_the_whole_current_row():
    # Without the one-row shift the right-to-left LSTM sees row i at j' >= j,
    # so a[i, j] depends on every row above i and all of row i.
    torch.manual_seed(0)
    h, w = 4, 5
    m = AttentionRNN(3, hidden_channels=4, context_kernel=1, shift=False, backend="reference").double()
    x = torch.randn(1, 3, h, w, dtype=torch.float64)
    for i, j in [(0, 0), (1, 2), (3, 4), (2, 0)]:
        expect = torch.zeros(h, w, dtype=torch.bool)
        expect[: i + 1] = True
        assert torch.equal(_dependency(m, x, i, j)[0], expect), (i, j)


def test_context_kernel_widens_dependency_by_its_radius():
    torch.manual_seed(0)
    m = AttentionRNN(2, hidden_channels=3, context_kernel=3, backend="reference").double()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    dep = _dependency(m, x, 0, 0)[0]
    # a[0, 0] sees context cells (0, 0) only, whose 3x3 window is rows 0-1, cols 0-1.
    expect = torch.zeros(6, 6, dtype=torch.bool)
    expect[:2, :2] = True
    assert torch.equal(dep, expect)


# --------------------------------------------------------------------------- gradcheck


def _variants():
    return {
        "learned": dict(),
        "independent": dict(combine="independent"),
        "query": dict(query_channels=3),
        "noshift_ctx1": dict(shift=False, context_kernel=1),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_gradcheck_float64(name):
    torch.manual_seed(0)
    kw = _variants()[name]
    m = AttentionRNN(2, hidden_channels=2, backend="reference", **kw).double()
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    if m.query_channels:
        q = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, q: m(x, q), (x, q))
    else:
        assert torch.autograd.gradcheck(m, (x,))


def test_gradcheck_parameters_float64():
    torch.manual_seed(0)
    m = AttentionRNN(2, hidden_channels=2, backend="reference").double()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    names, params = zip(*m.named_parameters())

    def f(*ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, tuple(p.detach().requires_grad_(True) for p in params))


@pytest.mark.parametrize("block", [2, 3])
def test_gradcheck_block_arnn(block):
    torch.manual_seed(0)
    m = BlockAttentionRNN(2, block_size=block, hidden_channels=2, backend="reference").double()
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_gradcheck_sampled_with_fixed_noise():
    torch.manual_seed(0)
    m = AttentionRNN(2, hidden_channels=2, sample=True, backend="reference").double().train()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x):
        torch.manual_seed(123)
        return m(x)

    assert torch.autograd.gradcheck(f, (x,))


# --------------------------------------------------------------------------- combination and sampling


def test_independent_combination_is_product_of_gaussians():
    torch.manual_seed(0)
    m = AttentionRNN(3, hidden_channels=4, combine="independent", backend="reference").double()
    s = m(torch.randn(2, 3, 5, 4, dtype=torch.float64), return_stats=True)
    assert isinstance(s, ARNNStats)
    vl, vr = s.sigma_l**2, s.sigma_r**2
    assert torch.allclose(s.mu, (s.mu_l / vl + s.mu_r / vr) / (1 / vl + 1 / vr))
    assert torch.allclose(s.sigma, (1 / vl + 1 / vr).rsqrt())
    assert torch.equal(s.a, s.mu)


@pytest.mark.parametrize("combine", ["learned", "independent"])
@pytest.mark.parametrize("shift", [True, False])
def test_heads_and_combiner_are_the_per_location_convs_on_the_mirrored_maps(combine, shift):
    # The layer runs heads, mirror, shift and combiner on features-last rows;
    # written as the paper's maps: 1x1 convs on (B, 2t, H, W), the right
    # direction's hidden states mirrored back and shifted down one row.
    from arnn_plugins.ops import diagonal_lstm

    torch.manual_seed(0)
    m = AttentionRNN(3, hidden_channels=4, combine=combine, shift=shift, backend="fused").double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    s = m(x, return_stats=True)
    t = 4
    xc = m.context(x)
    gx = m.input_proj(torch.cat([xc, xc.flip(-1)], dim=1)).view(2, 2, 4 * t, 5, 4)
    hid = diagonal_lstm(gx, m.weight_hh, "reference")
    h_r = hid[:, 1].flip(-1)
    if shift:
        h_r = nn.functional.pad(h_r, (0, 0, 1, 0))[:, :, :5]
    heads = m.heads(torch.cat([hid[:, 0], h_r], dim=1))
    soft = lambda r: nn.functional.softplus(r) + m.min_sigma  # noqa: E731
    mu_l, sigma_l, mu_r, sigma_r = heads[:, 0:1], soft(heads[:, 1:2]), heads[:, 2:3], soft(heads[:, 3:4])
    if combine == "learned":
        out = m.combiner(torch.cat([mu_l, sigma_l, mu_r, sigma_r], dim=1))
        mu, sigma = out[:, 0:1], soft(out[:, 1:2])
    else:
        mu, sigma = product_of_gaussians(mu_l, sigma_l, mu_r, sigma_r)
    for got, want in zip(s, (mu, mu, sigma, mu_l, sigma_l, mu_r, sigma_r)):
        assert got.shape == (2, 1, 5, 4) and got.is_contiguous()
        assert torch.allclose(got, want, atol=1e-12)


def test_product_of_gaussians_matches_densities():
    # log N(z; mu_l, s_l) + log N(z; mu_r, s_r) - log N(z; mu, s) is constant in z.
    mu_l, s_l, mu_r, s_r = torch.tensor([0.3, 0.5, -1.2, 1.7], dtype=torch.float64)
    mu, s = product_of_gaussians(mu_l, s_l, mu_r, s_r)
    z = torch.linspace(-4, 4, 41, dtype=torch.float64)
    lp = lambda m, sd: torch.distributions.Normal(m, sd).log_prob(z)  # noqa: E731
    diff = lp(mu_l, s_l) + lp(mu_r, s_r) - lp(mu, s)
    assert diff.std() < 1e-10
    assert s < min(s_l, s_r)


@pytest.mark.parametrize("combine", ["learned", "independent"])
def test_sigmas_positive(combine):
    torch.manual_seed(0)
    m = AttentionRNN(4, hidden_channels=3, combine=combine, backend="reference")
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(20)  # push pre-activations far negative and positive
    s = m(torch.randn(2, 4, 6, 5) * 10, return_stats=True)
    for sig in (s.sigma, s.sigma_l, s.sigma_r):
        assert (sig > 0).all()


def test_sampling_is_reparameterised_and_seeded():
    torch.manual_seed(0)
    m = AttentionRNN(3, hidden_channels=4, sample=True, backend="reference").train()
    x = torch.randn(2, 3, 5, 5)
    s = m(x, return_stats=True)
    g_mu, g_sigma = torch.autograd.grad(s.a.sum(), [s.mu, s.sigma], retain_graph=True)
    assert torch.allclose(g_mu, torch.ones_like(g_mu))
    eps = (s.a - s.mu) / s.sigma
    assert torch.allclose(g_sigma, eps, atol=1e-5) and eps.abs().sum() > 0
    # The gradient reaches the parameters through sigma too.
    s.a.sum().backward()
    assert m.weight_hh.grad.abs().sum() > 0

    torch.manual_seed(7)
    a1 = m(x)
    torch.manual_seed(7)
    a2 = m(x)
    torch.manual_seed(8)
    a3 = m(x)
    assert torch.equal(a1, a2) and not torch.allclose(a1, a3)

    m.eval()  # inference returns the mean
    s = m(x, return_stats=True)
    assert torch.equal(s.a, s.mu) and torch.equal(m(x), m(x))


def test_forget_gate_bias_is_one():
    m = AttentionRNN(3, hidden_channels=5)
    b = m.input_proj.bias.view(2, 4, 5)
    assert torch.equal(b[:, 1], torch.ones(2, 5))
    assert torch.equal(b[:, [0, 2, 3]], torch.zeros(2, 3, 5))


# --------------------------------------------------------------------------- query and context


def test_query_changes_attention():
    torch.manual_seed(0)
    m = AttentionRNN(3, hidden_channels=4, query_channels=5, backend="reference")
    x = torch.randn(1, 3, 4, 4)
    q1, q2 = torch.randn(1, 5), torch.randn(1, 5)
    assert not torch.allclose(m(x, q1), m(x, q2))


def test_custom_context_net():
    class TinyUNet(nn.Module):
        out_channels = 6

        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(3, 6, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose2d(6, 6, 2, stride=2)
            self.skip = nn.Conv2d(3, 6, 1)

        def forward(self, x):
            return self.skip(x) + self.up(self.down(x))[..., : x.shape[-2], : x.shape[-1]]

    m = AttentionRNN(3, hidden_channels=4, context_net=TinyUNet(), backend="reference")
    assert m.context_channels == 6 and m.context_kernel is None
    assert m(torch.randn(2, 3, 6, 8)).shape == (2, 1, 6, 8)
    assert "context_channels=6" in repr(m)

    with pytest.raises(ValueError, match="context_channels"):
        AttentionRNN(3, context_net=nn.Identity())
    bad = AttentionRNN(3, context_net=nn.Conv2d(3, 5, 1), context_channels=4, backend="reference")
    with pytest.raises(ValueError, match=r"AttentionRNN: context_net must map .*\(B, 4, H, W\)"):
        bad(torch.randn(1, 3, 4, 4))


# --------------------------------------------------------------------------- shapes and layouts


@pytest.mark.parametrize("shape", [(1, 5, 1, 1), (1, 5, 7, 3), (3, 5, 2, 9), (2, 5, 5, 5)])
def test_output_shapes(shape):
    m = AttentionRNN(5, hidden_channels=3, backend="reference")
    s = m(torch.randn(shape), return_stats=True)
    for f in s:
        assert f.shape == (shape[0], 1, *shape[2:])


@pytest.mark.parametrize("block", [2, 3, 4])
@pytest.mark.parametrize("hw", [(7, 5), (9, 10), (1, 3)])
def test_block_arnn_shapes(block, hw):
    m = BlockAttentionRNN(4, block_size=block, hidden_channels=3, backend="reference")
    x = torch.randn(2, 4, *hw)
    assert m(x).shape == (2, 1, *hw)
    s = m(x, return_stats=True)
    assert all(f.shape == (2, 1, *hw) for f in s)
    assert (s.sigma > 0).all()


def test_block_arnn_is_blockwise():
    # With a block size of 3 the small map has one cell per 3x3 block, so
    # the mask is constant-free only through the transposed conv's kernel:
    # values at the same offset inside blocks of equal attention coincide.
    torch.manual_seed(0)
    m = BlockAttentionRNN(2, block_size=3, hidden_channels=3, backend="reference")
    x = torch.randn(1, 2, 6, 6)
    small = m.arnn(m.down(x))
    assert small.shape == (1, 1, 2, 2)
    up = m(x)
    k = m.up.weight[0, 0]
    for bi in range(2):
        for bj in range(2):
            block = up[0, 0, 3 * bi : 3 * bi + 3, 3 * bj : 3 * bj + 3]
            assert torch.allclose(block, small[0, 0, bi, bj] * k + m.up.bias)


def test_channels_last_and_non_contiguous_inputs_agree():
    torch.manual_seed(0)
    m = AttentionRNN(4, hidden_channels=3, backend="reference")
    x = torch.randn(2, 4, 5, 6)
    ref = m(x)
    assert torch.allclose(m(x.to(memory_format=torch.channels_last)), ref, atol=1e-6)
    xt = torch.randn(2, 4, 6, 5).transpose(-1, -2)  # non-contiguous view
    assert not xt.is_contiguous()
    assert torch.allclose(m(xt), m(xt.contiguous()), atol=1e-6)


# --------------------------------------------------------------------------- bad input


def _bad_input_cases():
    m = AttentionRNN(4, backend="reference")
    mq = AttentionRNN(4, query_channels=3, backend="reference")
    x = torch.randn(2, 4, 5, 5)
    return [
        (m, (torch.randn(2, 3, 5, 5),), ValueError, r"AttentionRNN.*\(B, 4, H, W\)"),
        (m, (torch.randn(4, 5, 5),), ValueError, r"AttentionRNN.*4-D.*\(B, 4, H, W\)"),
        (m, (torch.randn(2, 4, 0, 5),), ValueError, r"AttentionRNN.*non-empty.*\(B, 4, H, W\)"),
        (m, (torch.ones(2, 4, 5, 5, dtype=torch.long),), TypeError, r"AttentionRNN.*floating.*\(B, 4, H, W\)"),
        (m, ([[1.0]],), TypeError, r"AttentionRNN.*torch.Tensor"),
        (m, (x, torch.randn(2, 3)), ValueError, r"AttentionRNN.*query_channels=0"),
        (mq, (x,), ValueError, r"AttentionRNN.*query of shape \(2, 3\)"),
        (mq, (x, torch.randn(2, 4)), ValueError, r"AttentionRNN.*query of shape \(2, 3\)"),
        (mq, (x, torch.randn(3, 3)), ValueError, r"AttentionRNN.*query of shape \(2, 3\)"),
        (mq, (x, torch.ones(2, 3, dtype=torch.long)), TypeError, r"AttentionRNN.*query"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_bad_input_raises_clear_error(case):
    m, args, exc, pattern = _bad_input_cases()[case]
    with pytest.raises(exc, match=pattern):
        m(*args)


def test_block_arnn_bad_input_names_the_layer():
    with pytest.raises(ValueError, match=r"BlockAttentionRNN.*\(B, 4, H, W\)"):
        BlockAttentionRNN(4)(torch.randn(1, 2, 4, 4))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(in_channels=0), "in_channels"),
        (dict(in_channels=4, hidden_channels=0), "hidden_channels"),
        (dict(in_channels=4, context_kernel=2), "context_kernel"),
        (dict(in_channels=4, context_kernel=0), "context_kernel"),
        (dict(in_channels=4, combine="mean"), "combine"),
        (dict(in_channels=4, backend="cuda"), "backend"),
        (dict(in_channels=4, query_channels=-1), "query_channels"),
        (dict(in_channels=4, min_sigma=0.0), "min_sigma"),
    ],
)
def test_bad_constructor_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=f"AttentionRNN: {pattern}"):
        AttentionRNN(**kwargs)


def test_bad_block_size():
    with pytest.raises(ValueError, match="BlockAttentionRNN: block_size"):
        BlockAttentionRNN(4, block_size=0)


# --------------------------------------------------------------------------- serialisation and dtypes


def test_state_dict_deepcopy_pickle():
    torch.manual_seed(0)
    m = AttentionRNN(4, hidden_channels=3, query_channels=2, backend="reference")
    x, q = torch.randn(1, 4, 4, 5), torch.randn(1, 2)
    ref = m(x, q)
    m2 = AttentionRNN(4, hidden_channels=3, query_channels=2, backend="reference")
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x, q), ref)
    assert torch.equal(copy.deepcopy(m)(x, q), ref)
    assert torch.equal(pickle.loads(pickle.dumps(m))(x, q), ref)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2.load_state_dict(torch.load(buf))
    assert torch.equal(m2(x, q), ref)


def test_extra_repr_shows_options():
    r = repr(AttentionRNN(8, hidden_channels=4, query_channels=3, combine="independent", sample=True))
    for part in ["8", "hidden_channels=4", "context_kernel=3", "query_channels=3", "'independent'", "sample=True"]:
        assert part in r
    assert "block_size=3" in repr(BlockAttentionRNN(8, block_size=3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_finite(dtype):
    m = AttentionRNN(4, hidden_channels=3, backend="reference").to(dtype)
    x = torch.randn(2, 4, 6, 5, dtype=dtype, requires_grad=True)
    a = m(x)
    assert a.dtype == dtype and torch.isfinite(a).all()
    a.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bfloat16_autocast_finite_and_close():
    torch.manual_seed(0)
    m = AttentionRNN(4, hidden_channels=3, backend="reference")
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = m(x)
    assert torch.isfinite(a).all()
    assert torch.allclose(a.float(), ref, atol=0.1, rtol=0.1)
    a.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    # bfloat16 weights and inputs without autocast also run.
    assert torch.isfinite(m.bfloat16()(x.detach().bfloat16())).all()
