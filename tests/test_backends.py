"""Every backend agrees with the reference scan, and the fused Function is exact."""

import pytest
import torch

from arnn_plugins import AttentionRNN, BlockAttentionRNN, available_backends, diagonal_lstm
import os
import shutil
import subprocess
import sys

from arnn_plugins import cpu_kernel
from arnn_plugins.fused_scan import fused_scan, fused_scan_torch
from arnn_plugins.scan import reference_scan, resolve_backend

CPU_BACKENDS = ["fused"]
# The fused backend runs the C kernel on CPU when it builds; the PyTorch
# anti-diagonal path is its fallback and its GPU path: test both.
SCANS = {"fused": fused_scan, "fused_torch": fused_scan_torch}


@pytest.mark.parametrize("scan", list(SCANS))
@pytest.mark.parametrize("shape", [(2, 2, 3, 4, 5), (1, 2, 4, 1, 6), (2, 2, 3, 6, 1), (3, 1, 2, 5, 5), (1, 2, 2, 1, 1)])
def test_fused_scan_matches_reference_float64(scan, shape):
    b, d, t, h, w = shape
    torch.manual_seed(0)
    gx = torch.randn(b, d, 4 * t, h, w, dtype=torch.float64, requires_grad=True)
    wh = torch.randn(d, 4 * t, t, 2, dtype=torch.float64, requires_grad=True)
    ref, out = reference_scan(gx, wh), SCANS[scan](gx, wh)
    assert torch.allclose(out, ref, atol=1e-12)
    go = torch.randn_like(ref)
    for a, b_ in zip(torch.autograd.grad(ref, (gx, wh), go), torch.autograd.grad(out, (gx, wh), go)):
        assert torch.allclose(a, b_, atol=1e-12)


@pytest.mark.parametrize("scan", list(SCANS))
@pytest.mark.parametrize("shape", [(2, 2, 2, 3, 4), (1, 2, 3, 1, 4), (1, 1, 2, 4, 1)])
def test_gradcheck_fused_function(scan, shape):
    b, d, t, h, w = shape
    torch.manual_seed(1)
    gx = torch.randn(b, d, 4 * t, h, w, dtype=torch.float64, requires_grad=True)
    wh = torch.randn(d, 4 * t, t, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SCANS[scan], (gx, wh))


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_cpu_kernel_builds_and_is_used(monkeypatch):
    assert cpu_kernel.available()
    calls = []
    monkeypatch.setattr(cpu_kernel._CScan, "apply", lambda *a: calls.append(1) or reference_scan(*a))
    fused_scan(torch.randn(1, 2, 8, 3, 3), torch.randn(2, 8, 2, 2))
    assert calls == [1]


def test_cpu_kernel_can_be_switched_off():
    code = "from arnn_plugins import cpu_kernel; print(cpu_kernel.available())"
    env = dict(os.environ, ARNN_PLUGINS_NO_CC="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "False"


def test_cpu_kernel_threads_agree_with_one_thread():
    torch.manual_seed(0)
    gx = torch.randn(5, 2, 16, 6, 7, requires_grad=True)
    wh = torch.randn(2, 16, 4, 2, requires_grad=True)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            h = fused_scan(gx, wh)
            outs.append((h, *torch.autograd.grad(h.square().sum(), (gx, wh))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-6)


def _layer_variants():
    return {
        "learned": (AttentionRNN, dict()),
        "independent": (AttentionRNN, dict(combine="independent")),
        "query": (AttentionRNN, dict(query_channels=3)),
        "noshift": (AttentionRNN, dict(shift=False, context_kernel=1)),
        "sample": (AttentionRNN, dict(sample=True)),
        "brnn": (BlockAttentionRNN, dict(block_size=2)),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", list(_layer_variants()))
@pytest.mark.parametrize("size", [(1, 5, 7), (2, 1, 4), (2, 4, 1), (1, 3, 3)])
def test_layer_backends_agree_float64(backend, variant, size):
    cls, kw = _layer_variants()[variant]
    b, h, w = size
    torch.manual_seed(0)
    ref = cls(3, hidden_channels=4, backend="reference", **kw).double().train()
    fast = cls(3, hidden_channels=4, backend=backend, **kw).double().train()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(b, 3, h, w, dtype=torch.float64, requires_grad=True)
    q = torch.randn(b, 3, dtype=torch.float64, requires_grad=True) if kw.get("query_channels") else None
    outs, grads = [], []
    for m in (ref, fast):
        torch.manual_seed(5)  # same noise for the sampled variant
        s = m(x, q, return_stats=True)
        loss = sum((f * torch.randn_like(f)).sum() for f in s)
        inputs = [x] + ([q] if q is not None else []) + list(m.parameters())
        outs.append(s)
        grads.append(torch.autograd.grad(loss, inputs, allow_unused=True))
    for f_ref, f_fast in zip(*outs):
        assert torch.allclose(f_ref, f_fast, atol=1e-10)
    for g_ref, g_fast in zip(*grads):
        if g_ref is None:
            assert g_fast is None
        else:
            assert torch.allclose(g_ref, g_fast, atol=1e-10)


def test_fused_float32_and_autocast_agree_with_reference():
    torch.manual_seed(0)
    ref = AttentionRNN(8, hidden_channels=6, backend="reference")
    fast = AttentionRNN(8, hidden_channels=6, backend="fused")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 9, 11)
    assert torch.allclose(ref(x), fast(x), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x), fast(x)
    assert torch.allclose(a.float(), b.float(), atol=2e-2)


def test_auto_backend_resolution():
    assert "fused" in available_backends() and "reference" in available_backends()
    assert resolve_backend("auto", torch.device("cpu")) == "fused"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend 'nope' is not available"):
        diagonal_lstm(torch.zeros(1, 2, 8, 2, 2), torch.zeros(2, 8, 2, 2), backend="nope")
