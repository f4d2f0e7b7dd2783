"""CUDA paths: every GPU backend against the reference, the layer under AMP and torch.compile.

All of these skip without a CUDA device (``pytest -m cuda`` selects them;
``tools/gpu_check.sh`` runs them on a GPU machine).
"""

import pytest
import torch

import arnn_plugins as ap
from arnn_plugins.ops import diagonal_lstm, resolve_backend
from arnn_plugins.ops.reference import reference_scan

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# float32 tolerances on the GPU: TF32 is off for these tests (see the fixture), so
# the differences are summation order over W + H - 1 steps.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _backends():
    names = ["fused"]
    try:
        import triton  # noqa: F401

        names.append("triton")
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,t,h,w", [(2, 16, 20, 17), (1, 8, 1, 5), (3, 32, 64, 9), (2, 16, 56, 56)])
def test_backend_matches_reference_on_cuda(backend, dtype, b, t, h, w):
    torch.manual_seed(0)
    gx = torch.randn(b, 2, 4 * t, h, w, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(2, 4 * t, t, 2, device="cuda", dtype=dtype) * t ** -0.5).requires_grad_()
    grad_h = torch.randn(b, 2, t, h, w, device="cuda", dtype=dtype)
    want = reference_scan(gx, weight)
    want_g = torch.autograd.grad(want, (gx, weight), grad_h)
    got = diagonal_lstm(gx, weight, backend=backend)
    got_g = torch.autograd.grad(got, (gx, weight), grad_h)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got_g[0], want_g[0], **TOL[dtype])
    torch.testing.assert_close(got_g[1], want_g[1], **TOL[dtype])


def test_auto_picks_a_gpu_backend():
    name = resolve_backend("auto", torch.device("cuda"), hidden=16, height=56)
    assert name in ("triton", "fused")


@pytest.mark.parametrize("variant", [dict(), dict(combine="independent"), dict(query_channels=5)])
def test_layer_on_cuda_equals_cpu(variant):
    torch.manual_seed(0)
    m = ap.AttentionRNN(8, hidden_channels=16, **variant).double()
    x = torch.randn(2, 8, 13, 11, dtype=torch.float64)
    q = torch.randn(2, 5, dtype=torch.float64) if variant.get("query_channels") else None
    want = m(x, query=q) if q is not None else m(x)
    mc = m.cuda()
    xc = x.cuda()
    got = mc(xc, query=q.cuda()) if q is not None else mc(xc)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_under_autocast(dtype):
    torch.manual_seed(0)
    m = ap.AttentionRNN(16, hidden_channels=16).cuda()
    x = torch.randn(4, 16, 24, 24, device="cuda", requires_grad=True)
    want = m(x)
    (gx_want,) = torch.autograd.grad(want.sum(), x)
    with torch.autocast("cuda", dtype=dtype):
        got = m(x)
    # The scan itself runs in float32; only the convolutions around it are in half precision.
    assert got.dtype in (dtype, torch.float32)
    (gx_got,) = torch.autograd.grad(got.float().sum(), x)
    assert torch.isfinite(gx_got).all()
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(gx_got, gx_want, rtol=tol, atol=tol * gx_want.abs().max().item())


def test_compiled_layer_equals_eager_on_cuda():
    torch.manual_seed(0)
    m = ap.AttentionRNN(8, hidden_channels=16).cuda()
    x = torch.randn(2, 8, 20, 20, device="cuda", requires_grad=True)
    want = m(x)
    (g_want,) = torch.autograd.grad(want.square().sum(), x)
    cm = torch.compile(m, fullgraph=True)
    got = cm(x)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)


def test_swapped_timm_resnet_train_step_on_cuda():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), num_classes=10)
    ap.swap_attention(model)
    x = torch.randn(4, 3, 64, 64)
    y = torch.randint(0, 10, (4,))
    want = model.eval()(x)
    model.cuda()
    torch.testing.assert_close(model(x.cuda()).cpu(), want, rtol=1e-3, atol=1e-4)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x.cuda()), y.cuda())
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "arnn" in n.lower() or "attn" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    model.eval()
    assert not torch.allclose(model(x.cuda()).cpu(), want, atol=1e-4)
