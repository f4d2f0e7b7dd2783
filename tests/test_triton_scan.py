"""The triton scan backend against the reference scan.

Without a GPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``). The variable is read when the kernels are
decorated, so those checks run in one child process that imports the
package with it set and reports every case at once; the tests here only read
its report. On a CUDA machine the same comparisons also run on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

SCAN_CASES = [
    (b, t, h, w)
    for b in (1, 2)
    for t in (4, 5)
    for (h, w) in ((1, 1), (1, 5), (5, 1), (3, 4), (6, 3))
]

# Runs in the child: compares the triton scan (and the layer) with the
# reference and prints one JSON object {case: {"ok": bool, "detail": str}}.
_CHILD = textwrap.dedent(
    r"""
    import json, sys
    import torch
    import arnn_plugins as ap
    from arnn_plugins.ops import triton_scan as ts
    from arnn_plugins.ops.reference import reference_scan

    assert ts._interpreting(), "TRITON_INTERPRET=1 did not reach the kernels"
    torch.manual_seed(0)
    report = {}

    def compare(name, got, want, rtol, atol):
        bad = []
        for label, g, r in zip(("out", "grad_gx", "grad_w"), got, want):
            err = (g - r).abs()
            excess = (err - (atol + rtol * r.abs())).max().item() if err.numel() else -1.0
            if g.shape != r.shape or excess > 0:
                bad.append(f"{label}: max abs err {err.max().item():.3g}")
        report[name] = {"ok": not bad, "detail": "; ".join(bad)}

    def scan_case(name, b, t, h, w, dtype, rtol, atol, strided=False):
        if strided:
            # gx with the gate channels innermost, read through its strides.
            base = torch.randn(b, 2, h, w, 4 * t, dtype=dtype, requires_grad=True)
            gx = base.permute(0, 1, 4, 2, 3)
        else:
            base = gx = torch.randn(b, 2, 4 * t, h, w, dtype=dtype, requires_grad=True)
        weight = (torch.randn(2, 4 * t, t, 2, dtype=dtype) * 0.5).requires_grad_()
        grad_h = torch.randn(b, 2, t, h, w, dtype=dtype)
        want = reference_scan(gx, weight)
        want = (want,) + torch.autograd.grad(want, (base, weight), grad_h)
        got = ts.triton_scan(gx, weight)
        got = (got,) + torch.autograd.grad(got, (base, weight), grad_h)
        compare(name, got, want, rtol, atol)
        return gx, weight, got[0]

    for b, t, h, w in CASES:
        scan_case(f"scan-B{b}-t{t}-{h}x{w}", b, t, h, w, torch.float32, 1e-5, 1e-6)

    scan_case("scan-float64", 2, 5, 4, 3, torch.float64, 1e-12, 1e-13)
    gx, weight, out = scan_case("scan-strided", 1, 4, 3, 5, torch.float32, 1e-5, 1e-6, strided=True)
    with torch.no_grad():
        inference = ts.triton_scan(gx, weight)
    report["scan-no-grad"] = {
        "ok": bool(torch.equal(inference, out.detach())), "detail": "no-grad path differs from autograd path"
    }

    # The whole layer, through diagonal_lstm, against the reference backend.
    x = torch.randn(2, 3, 4, 5)
    ref = ap.AttentionRNN(3, hidden_channels=4, backend="reference")
    tri = ap.AttentionRNN(3, hidden_channels=4, backend="triton")
    tri.load_state_dict(ref.state_dict())
    outs, grads = [], []
    for layer in (ref, tri):
        a = layer(x)
        (a * torch.linspace(-1, 1, a.numel()).view_as(a)).sum().backward()
        outs.append(a.detach())
        grads.append({n: p.grad for n, p in layer.named_parameters()})
    bad = []
    if not torch.allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6):
        bad.append(f"output: max abs err {(outs[1] - outs[0]).abs().max().item():.3g}")
    for n, g in grads[0].items():
        if not torch.allclose(grads[1][n], g, rtol=1e-5, atol=1e-6):
            bad.append(f"grad {n}: max abs err {(grads[1][n] - g).abs().max().item():.3g}")
    report["layer"] = {"ok": not bad, "detail": "; ".join(bad)}

    print("REPORT " + json.dumps(report))
    """
)


def _child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    pytest.importorskip("triton")
    code = f"CASES = {SCAN_CASES!r}\n" + _CHILD
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_child_env(TRITON_INTERPRET="1"),
        capture_output=True, text=True, timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter run failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("REPORT "):])


def _expect_ok(report: dict, name: str) -> None:
    assert name in report, f"case {name} missing from the interpreter report"
    assert report[name]["ok"], f"{name}: {report[name]['detail']}"


@pytest.mark.parametrize("b,t,h,w", SCAN_CASES)
def test_scan_matches_reference_interpreted(interpreter_report, b, t, h, w):
    _expect_ok(interpreter_report, f"scan-B{b}-t{t}-{h}x{w}")


@pytest.mark.parametrize("name", ["scan-float64", "scan-strided", "scan-no-grad"])
def test_scan_variants_interpreted(interpreter_report, name):
    _expect_ok(interpreter_report, name)


def test_layer_matches_reference_interpreted(interpreter_report):
    _expect_ok(interpreter_report, "layer")


def test_clear_error_without_gpu_or_interpreter():
    pytest.importorskip("triton")
    from arnn_plugins.ops import triton_scan as ts
    from arnn_plugins.ops import diagonal_lstm

    if ts._interpreting():
        pytest.skip("this process runs Triton's interpreter")
    gx = torch.randn(1, 2, 16, 3, 3)
    weight = torch.randn(2, 16, 4, 2)
    with pytest.raises(RuntimeError, match="triton backend"):
        ts.triton_scan(gx, weight)
    with pytest.raises(RuntimeError, match="triton backend"):
        diagonal_lstm(gx, weight, backend="triton")


def test_bad_shapes_rejected():
    pytest.importorskip("triton")
    from arnn_plugins.ops import triton_scan as ts

    with pytest.raises(ValueError, match="weight_hh"):
        ts.triton_scan(torch.randn(1, 2, 16, 3, 3), torch.randn(2, 16, 5, 2))
    with pytest.raises(ValueError, match="gx"):
        ts.triton_scan(torch.randn(2, 16, 3, 3), torch.randn(2, 16, 4, 2))


def test_imports_cleanly_without_triton():
    # A None entry in sys.modules makes `import triton` raise ImportError.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None
        import torch
        from arnn_plugins.ops import triton_scan as ts
        from arnn_plugins.ops import available_backends
        assert not ts.HAS_TRITON and "triton" not in available_backends()
        assert not ts.triton_scan_supported("cpu")
        try:
            ts.triton_scan(torch.zeros(1, 2, 16, 2, 2), torch.zeros(2, 16, 4, 2))
        except RuntimeError as e:
            assert "triton" in str(e)
        else:
            raise AssertionError("no error without triton")
        print("OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_kernels_compile_for_sm90(kernel):
    # The GPU path cannot run here, but Triton compiles to PTX and cubin (with
    # its bundled ptxas) without a device: this catches lowering errors.
    pytest.importorskip("triton")
    from arnn_plugins.ops import triton_scan as ts

    if ts._interpreting():
        pytest.skip("this process runs Triton's interpreter")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile as triton_compile
    except ImportError:
        pytest.skip("this Triton release has no ahead-of-time compile API")
    if kernel == "fwd":
        fn, ptrs, extra = ts._diag_lstm_fwd_kernel, ("gx_ptr", "w_ptr", "h_ptr", "c_ptr", "act_ptr"), {"SAVE": True}
    else:
        fn, ptrs, extra = ts._diag_lstm_bwd_kernel, ("dh_ptr", "w_ptr", "c_ptr", "act_ptr", "dgx_ptr"), {}
    bh, bt, num_warps = ts._launch_config(56, 16)
    consts = dict(BH=bh, BT=bt, LIBDEVICE=True, PREC=ts._PRECISION, **extra)
    signature = {
        n: "constexpr" if n in consts else ("*fp32" if n in ptrs else "i32") for n in fn.arg_names
    }
    compiled = triton_compile(
        ASTSource(fn=fn, signature=signature, constexprs=consts),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=1),
    )
    assert "bar.sync" in compiled.asm["ptx"] or "barrier.sync" in compiled.asm["ptx"]
