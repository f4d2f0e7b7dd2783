"""Every backend agrees with the reference scan, and the fused Function is exact.

Also the boundary itself: what :mod:`arnn_plugins.ops` registers, callable
backends, and the C source the CPU kernel is built from.
"""

import ctypes
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from arnn_plugins import AttentionRNN, BlockAttentionRNN, available_backends, diagonal_lstm
from arnn_plugins import ops
from arnn_plugins.experiments.bench import naive_scan
from arnn_plugins.ops import cpu_kernel, fused_scan, resolve_backend
from arnn_plugins.ops.fused import fused_scan_torch
from arnn_plugins.ops.reference import reference_scan

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


def test_fused_backward_twice_with_retain_graph():
    # The C backward reuses its saved buffers for the gradient only when the
    # graph is freed afterwards; with retain_graph a second backward must see
    # them intact.
    torch.manual_seed(2)
    gx = torch.randn(2, 2, 12, 4, 5, dtype=torch.float64, requires_grad=True)
    wh = torch.randn(2, 12, 3, 2, dtype=torch.float64, requires_grad=True)
    go = torch.randn(2, 2, 3, 4, 5, dtype=torch.float64)
    ref = torch.autograd.grad(reference_scan(gx, wh), (gx, wh), go)
    out = fused_scan(gx, wh)
    first = torch.autograd.grad(out, (gx, wh), go, retain_graph=True)
    second = torch.autograd.grad(out, (gx, wh), go)
    for r, a, b_ in zip(ref, first, second):
        assert torch.allclose(a, r, atol=1e-12) and torch.allclose(b_, r, atol=1e-12)


def test_memory_mb_measures_a_known_pattern():
    from arnn_plugins.experiments.memory import memory_mb

    x = torch.randn(512, 1024, requires_grad=True)  # 2 MB
    held, peak = memory_mb(lambda: torch.exp(x), torch.device("cpu"))
    # exp keeps its 2 MB output for backward; the backward adds its 2 MB
    # product, which becomes x.grad.
    assert held == pytest.approx(2.0, abs=0.05) and peak == pytest.approx(4.0, abs=0.1)


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler")
def test_fused_backward_needs_little_beyond_saved_activations():
    from arnn_plugins.experiments.memory import memory_mb

    torch.manual_seed(0)
    # In the layout the layer's input projection writes, (D, B, H, W, 4t),
    # so the gradient lands in gx.grad without a copy.
    gx = torch.randn(2, 8, 16, 16, 64).permute(1, 0, 4, 2, 3).requires_grad_(True)
    wh = torch.randn(2, 64, 16, 2, requires_grad=True)
    cpu = torch.device("cpu")
    held, peak = memory_mb(lambda: fused_scan(gx, wh), cpu)
    # Saved: gate activations (4t), cells (t) and states (t) per cell, the
    # output being the states: 6 * 16 * 4 bytes * 8 * 2 * 256 cells = 1.5 MB.
    assert held == pytest.approx(1.5, abs=0.05)
    # The input gradient (1 MB) is written over the saved activations.
    assert peak < 1.1 * held
    ref_held, ref_peak = memory_mb(lambda: reference_scan(gx, wh), cpu)
    assert ref_held > 2 * held and ref_peak > 2 * peak


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_cpu_kernel_builds_and_is_used(monkeypatch):
    assert cpu_kernel.available()
    calls = []
    monkeypatch.setattr(cpu_kernel._CScan, "apply", lambda *a: calls.append(1) or reference_scan(*a))
    fused_scan(torch.randn(1, 2, 8, 3, 3), torch.randn(2, 8, 2, 2))
    assert calls == [1]


def test_cpu_kernel_can_be_switched_off():
    code = "from arnn_plugins.ops import cpu_kernel; print(cpu_kernel.available())"
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
        # Bit for bit: each block of sequences does the same arithmetic on
        # whichever thread takes it, so results never depend on the thread count.
        assert torch.equal(a, b)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not cpu_kernel.uses_openmp(),
                    reason="kernel built without OpenMP")
def test_cpu_kernel_threads_are_torchs_own_openmp_pool():
    # A second OpenMP runtime would bring its own threads to compete with
    # torch's for the cores: the kernel must run on the one torch loaded.
    fused_scan(torch.randn(8, 2, 16, 4, 4), torch.randn(2, 16, 4, 2))
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if re.search(r"lib(g|i)?omp[^/]*\.so", line)}
    assert len(runtimes) == 1, runtimes
    assert Path(next(iter(runtimes))).resolve().parent == (Path(torch.__file__).parent / "lib").resolve()


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler")
def test_cpu_kernel_without_openmp_splits_over_python_threads(monkeypatch, tmp_path):
    # Where the compiler has no OpenMP the library is built plain and Python
    # threads share the blocks: same results, to the bit.
    text = cpu_kernel.source()
    monkeypatch.setenv("ARNN_PLUGINS_CACHE", str(tmp_path))
    path = cpu_kernel.library_path(text, openmp=False)
    cpu_kernel._compile(text, path, openmp=False)
    plain = ctypes.CDLL(path)
    assert plain.arnn_openmp() == 0
    torch.manual_seed(0)
    gx = torch.randn(6, 2, 32, 5, 4, dtype=torch.float64, requires_grad=True)
    wh = torch.randn(2, 32, 8, 2, dtype=torch.float64, requires_grad=True)
    threads = torch.get_num_threads()
    outs = []
    try:
        torch.set_num_threads(3)
        for lib in (cpu_kernel.load(), plain):
            monkeypatch.setattr(cpu_kernel, "_lib", lib)
            h = cpu_kernel.c_scan(gx, wh)
            outs.append((h, *torch.autograd.grad(h.square().sum(), (gx, wh))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


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


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler")
@pytest.mark.parametrize("t", [16, 11])
@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_c_kernel_float32_activations_match_float64(t, scale):
    # float32 gates go through the kernel's own vector exp (8 lanes, scalar
    # tail): compare with the float64 reference, also deep in saturation.
    torch.manual_seed(3)
    gx = torch.randn(2, 2, 4 * t, 5, 6, dtype=torch.float64) * scale
    wh = torch.randn(2, 4 * t, t, 2, dtype=torch.float64) * 0.3
    go = torch.randn(2, 2, t, 5, 6, dtype=torch.float64)
    gx32, wh32 = gx.float().requires_grad_(True), wh.float().requires_grad_(True)
    gx64, wh64 = gx.requires_grad_(True), wh.requires_grad_(True)
    out32, out64 = fused_scan(gx32, wh32), reference_scan(gx64, wh64)
    assert torch.isfinite(out32).all()
    assert torch.allclose(out32.double(), out64, atol=2e-6)
    g32 = torch.autograd.grad(out32, (gx32, wh32), go.float())
    g64 = torch.autograd.grad(out64, (gx64, wh64), go)
    for a, b_ in zip(g32, g64):
        assert torch.isfinite(a).all()
        assert torch.allclose(a.double(), b_, atol=2e-5 * max(1.0, b_.abs().max().item()))


def test_auto_backend_resolution():
    assert "fused" in available_backends() and "reference" in available_backends()
    assert resolve_backend("auto", torch.device("cpu")) == "fused"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend 'nope' is not available"):
        diagonal_lstm(torch.zeros(1, 2, 8, 2, 2), torch.zeros(2, 8, 2, 2), backend="nope")


# --------------------------------------------------------------------------- the registry

REPO = Path(__file__).resolve().parents[1]
HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


def _run_child(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return its ``REPORT`` JSON."""
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    full_env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT "):])


def test_ops_registers_exactly_its_backends_and_the_benchmark_adds_none():
    report = _run_child(
        """
        import json
        from arnn_plugins import ops
        from arnn_plugins.ops import triton_scan
        before = ops.available_backends()
        from arnn_plugins.experiments import bench
        after_import = ops.available_backends()
        rows = bench.bench_layer(batch=1, channels=2, size=4, hidden=2,
                                 backends=["naive", "reference", "fused"], repeats=1)
        print("REPORT " + json.dumps(dict(
            has_triton=triton_scan.HAS_TRITON, before=before, after_import=after_import,
            after_run=ops.available_backends(), names=[r.name for r in rows],
            err={r.name: r.max_err for r in rows})))
        """
    )
    expected = sorted(["reference", "fused"] + (["triton"] if report["has_triton"] else []))
    assert report["before"] == expected
    assert report["after_import"] == expected and report["after_run"] == expected
    assert report["names"] == ["naive", "reference", "fused"]
    # The naive row is measured with the naive peer and computes the same mask.
    assert report["err"]["reference"] == 0.0
    assert report["err"]["naive"] < 1e-5 and report["err"]["fused"] < 1e-5


def test_naive_peer_agrees_with_reference_everywhere():
    # It does not mask the skew's padding, but padding cells see a zero input
    # and zero neighbours, so their state stays zero: every cell agrees.
    torch.manual_seed(0)
    gx, wh = torch.randn(2, 2, 12, 4, 5, dtype=torch.float64), torch.randn(2, 12, 3, 2, dtype=torch.float64)
    assert torch.allclose(naive_scan(gx, wh), reference_scan(gx, wh), atol=1e-12)


def test_bench_scan_rows_time_each_backend_against_reference():
    from arnn_plugins.experiments.bench import bench_scan

    before = available_backends()
    rows = bench_scan(batch=1, size=3, hidden=2, backends=["naive", "reference", "fused"], repeats=1)
    assert [r.name for r in rows] == ["naive", "reference", "fused"]
    assert available_backends() == before
    ref = rows[1]
    assert ref.ratio == pytest.approx(1.0) and ref.max_err == 0.0
    assert all(r.max_err < 1e-5 and r.fwd_ms > 0 and r.fwdbwd_ms > 0 and r.held_mb > 0 for r in rows)
    assert rows[0].vs_naive == pytest.approx(1.0)


def test_callable_backend_matches_named_backend():
    calls = []

    def my_scan(gx, weight_hh):
        calls.append((gx.dtype, weight_hh.dtype, torch.is_autocast_enabled("cpu")))
        return reference_scan(gx, weight_hh)

    torch.manual_seed(0)
    named = AttentionRNN(3, hidden_channels=4, backend="reference").double()
    given = AttentionRNN(3, hidden_channels=4, backend=my_scan).double()
    given.load_state_dict(named.state_dict())
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    a, b = named(x), given(x)
    assert calls == [(torch.float64, torch.float64, False)]
    assert torch.equal(a, b)
    go = torch.randn_like(a)
    for g_named, g_given in zip(torch.autograd.grad(a, [x, *named.parameters()], go),
                                torch.autograd.grad(b, [x, *given.parameters()], go)):
        assert torch.equal(g_named, g_given)
    assert "backend=my_scan" in repr(given)
    # Same dtype handling as a registered backend: float32, autocast off.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        given.float()(x.float())
    assert calls[-1] == (torch.float32, torch.float32, False)
    # BlockAttentionRNN hands it on to its AttentionRNN.
    block = BlockAttentionRNN(3, block_size=2, hidden_channels=4, backend=reference_scan)
    assert block.arnn.backend is reference_scan and block(torch.randn(1, 3, 4, 4)).shape == (1, 1, 4, 4)


@pytest.mark.parametrize("backend", ["nope", "naive", 3, None])
def test_unknown_backend_names_the_layer_and_the_choices(backend):
    with pytest.raises(ValueError, match=r"AttentionRNN: backend must be one of \['auto', 'fused', 'reference'"
                                         r".* or a callable \(gx, weight_hh\) -> h, got"):
        AttentionRNN(3, backend=backend)
    with pytest.raises(ValueError, match="AttentionRNN: backend"):
        BlockAttentionRNN(3, backend=backend)


def test_register_backend_makes_a_name_valid(monkeypatch):
    monkeypatch.setattr(ops, "_REGISTRY", dict(ops._REGISTRY))  # restored after the test
    ops.register_backend("mine", reference_scan)
    assert "mine" in available_backends() and "mine" in ops.backend_names()
    torch.manual_seed(0)
    ref = AttentionRNN(3, hidden_channels=2, backend="reference")
    mine = AttentionRNN(3, hidden_channels=2, backend="mine")
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(ref(x), mine(x))
    with pytest.raises(ValueError, match="auto"):
        ops.register_backend("auto", reference_scan)
    with pytest.raises(TypeError, match="callable"):
        ops.register_backend("broken", "reference")


# --------------------------------------------------------------------------- the C source


def test_c_source_is_shipped_and_is_what_the_kernel_reads():
    shipped = importlib.resources.files("arnn_plugins.ops").joinpath("csrc/arnn_scan.c")
    assert shipped.is_file()
    text = shipped.read_text(encoding="utf-8")
    for symbol in ("int arnn_fwd_##SUF", "int arnn_bwd_##SUF", "DEFINE(float, f32)", "DEFINE(double, f64)"):
        assert symbol in text
    assert cpu_kernel.source() == text
    # No second copy of the kernel inside the Python module.
    assert "#include" not in Path(cpu_kernel.__file__).read_text()
    # The cached library is named by a hash of exactly this text: an edited
    # source is built anew instead of loading a stale library.
    assert cpu_kernel.library_path() == cpu_kernel.library_path(text)
    assert cpu_kernel.library_path(text + "\n") != cpu_kernel.library_path(text)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
def test_cpu_kernel_builds_from_the_shipped_source_into_an_empty_cache(tmp_path):
    report = _run_child(
        """
        import json, os
        from arnn_plugins.ops import cpu_kernel
        ok = cpu_kernel.available()
        print("REPORT " + json.dumps(dict(ok=ok, path=cpu_kernel.library_path(),
                                          files=sorted(os.listdir(os.path.dirname(cpu_kernel.library_path()))))))
        """,
        ARNN_PLUGINS_CACHE=str(tmp_path),
    )
    assert report["ok"]
    path = Path(report["path"])
    assert path.parent == tmp_path / "kernels" and report["files"] == [path.name]
    lib = ctypes.CDLL(str(path))
    for name in ("arnn_fwd_f32", "arnn_fwd_f64", "arnn_bwd_f32", "arnn_bwd_f64"):
        assert hasattr(lib, name)


def _grad_layouts(b, d, t, h, w, dtype):
    """``grad_h`` as the layer's heads hand it back (features last) and as a dense (B, D, t, H, W) tensor."""
    torch.manual_seed(7)
    dense = torch.randn(b, d, t, h, w, dtype=dtype)
    return {"features_last": dense.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2), "dense": dense}


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 16, 3, 5), (5, 16, 4, 3), (9, 4, 2, 6), (6, 8, 5, 1), (7, 5, 1, 4), (4, 3, 3, 3)])
def test_c_kernel_sequence_blocks_match_reference(dtype, shape):
    # The kernel advances batch items in blocks of four, on vector tiles:
    # batches of one, of a block and a bit, H != W, gate counts that fill
    # whole tiles (t = 16, 8, 4) or not (t = 5, 3), grad_h features-last or
    # dense, gx in the projection's layout or dense, one thread or three
    # (chunks that cross the direction boundary), graph kept or freed.
    b, t, h, w = shape
    d = 2
    torch.manual_seed(0)
    dense = torch.randn(b, d, 4 * t, h, w, dtype=torch.float64)
    wh64 = (torch.randn(d, 4 * t, t, 2, dtype=torch.float64) * t ** -0.5).requires_grad_(True)
    gx64 = dense.clone().requires_grad_(True)
    ref = reference_scan(gx64, wh64)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    threads = torch.get_num_threads()
    try:
        for n, gx_layout, retain in ((1, "dense", False), (3, "projection", False), (3, "dense", True)):
            torch.set_num_threads(n)
            src = dense if gx_layout == "dense" else dense.permute(1, 0, 3, 4, 2).contiguous().permute(1, 0, 4, 2, 3)
            gx = src.to(dtype).requires_grad_(True)
            wh = wh64.detach().to(dtype).requires_grad_(True)
            out = cpu_kernel.c_scan(gx, wh)
            assert (out.double() - ref).abs().max().item() < tol
            for name, go in _grad_layouts(b, d, t, h, w, dtype).items():
                want = torch.autograd.grad(ref, (gx64, wh64), go.double(), retain_graph=True)
                got = torch.autograd.grad(out, (gx, wh), go, retain_graph=True if retain else name == "features_last")
                for a, r in zip(got, want):
                    assert (a.double() - r).abs().max().item() < tol * max(1.0, r.abs().max().item()), (n, name)
    finally:
        torch.set_num_threads(threads)


def _graph_nodes(out: torch.Tensor) -> set:
    """Names of the autograd nodes behind ``out``."""
    seen, todo = {}, [out.grad_fn]
    while todo:
        fn = todo.pop()
        # Keep each node referenced: ids of freed wrappers are reused.
        if fn is not None and id(fn) not in seen:
            seen[id(fn)] = fn
            todo.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen.values()}


def _projection_inputs(b, h, w, cin, t, dtype, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(b, cin, h, w, dtype=torch.float64).permute(0, 2, 3, 1)  # features-last view, as the layer's
    weight = torch.randn(2, 4 * t, cin, dtype=torch.float64) * cin ** -0.5
    bias = torch.randn(2, 4 * t, dtype=torch.float64) * 0.5
    wh = torch.randn(2, 4 * t, t, 2, dtype=torch.float64) * t ** -0.5
    return [v.to(dtype).requires_grad_(True) for v in (x, weight, bias, wh)]


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(5, 4, 3, 16, 16), (1, 3, 5, 5, 16), (6, 5, 1, 20, 5), (4, 1, 4, 3, 3)])
def test_c_kernel_projection_matches_unfused_reference(dtype, shape):
    # The C kernel's own input projection (its backward is the batched
    # matmul's) against the batched matmul + reference scan: batches off the block of four,
    # H != W, W = 1 and H = 1, Cin that fills whole vector tiles or not,
    # one thread or three, graph kept or freed.
    b, h, w, cin, t = shape
    ref_in = _projection_inputs(b, h, w, cin, t, torch.float64)
    ref = ops.projected_lstm(*ref_in, backend="reference")
    go = torch.randn(ref.shape, dtype=torch.float64)
    want = torch.autograd.grad(ref, ref_in, go)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    threads = torch.get_num_threads()
    try:
        for n, retain in ((1, False), (3, False), (3, True)):
            torch.set_num_threads(n)
            got_in = _projection_inputs(b, h, w, cin, t, dtype)
            out = ops.projected_lstm(*got_in, backend="fused")
            assert "_GateInputsBackward" in _graph_nodes(out)
            assert (out.double() - ref).abs().max().item() < tol
            got = torch.autograd.grad(out, got_in, go.to(dtype), retain_graph=retain)
            for name, a, r in zip(("x", "weight", "bias", "weight_hh"), got, want):
                assert a.shape == r.shape
                assert (a.double() - r).abs().max().item() < tol * max(1.0, r.abs().max().item()), (n, name)
    finally:
        torch.set_num_threads(threads)


def test_projection_falls_back_where_the_kernel_does_not_run():
    # Under autocast, for another backend, and for a callable backend the
    # projection is the batched matmul and the scan runs on its result.
    x, weight, bias, wh = _projection_inputs(2, 3, 4, 5, 2, torch.float32)
    for kwargs in ({"backend": "reference"}, {"backend": reference_scan}):
        out = ops.projected_lstm(x, weight, bias, wh, **kwargs)
        assert "_GateInputsBackward" not in _graph_nodes(out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.projected_lstm(x, weight, bias, wh, backend="fused")
    assert "_GateInputsBackward" not in _graph_nodes(out)
    ref = ops.projected_lstm(x, weight, bias, wh, backend="reference")
    assert torch.allclose(out.float(), ref, atol=3e-2)


@pytest.mark.parametrize("bad, match", [
    ({"x": torch.zeros(2, 3, 4)}, r"x of shape \(B, H, W, Cin\)"),
    ({"weight": torch.zeros(2, 8, 4)}, r"weight of shape \(2, 4t, 5\)"),
    ({"weight": torch.zeros(1, 8, 5)}, r"weight of shape \(2, 4t, 5\)"),
    ({"bias": torch.zeros(2, 9)}, r"bias of shape \(2, 8\)"),
    ({"weight_hh": torch.zeros(2, 8, 2, 1)}, r"weight_hh of shape \(2, 8, 2, 2\)"),
    ({"x": torch.zeros(2, 3, 4, 5, dtype=torch.long)}, "floating point x"),
])
def test_projection_rejects_shapes_that_do_not_fit(bad, match):
    args = {"x": torch.zeros(2, 3, 4, 5), "weight": torch.zeros(2, 8, 5), "bias": torch.zeros(2, 8),
            "weight_hh": torch.zeros(2, 8, 2, 2)}
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.projected_lstm(**args, backend="fused")


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler")
@pytest.mark.parametrize("t", [16, 64])
def test_layer_projection_in_the_kernel_needs_no_more_memory(t):
    # The projection in the kernel keeps the unfused autograd graph, so its
    # backward frees the scan's incoming gradient before the matmul's run:
    # held and peak are the unfused path's (the scan handed to the layer as
    # a callable), and at the default t within 1.2x.
    from arnn_plugins.experiments.memory import memory_mb

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    x = torch.randn(4, 32, 16, 16, requires_grad=True)
    fused = AttentionRNN(32, hidden_channels=t)
    unfused = AttentionRNN(32, hidden_channels=t, backend=fused_scan)
    unfused.load_state_dict(fused.state_dict())
    assert "_GateInputsBackward" in _graph_nodes(fused(x))
    assert "_GateInputsBackward" not in _graph_nodes(unfused(x))
    held, peak = memory_mb(lambda: fused(x), cpu)
    assert (held, peak) == pytest.approx(memory_mb(lambda: unfused(x), cpu), abs=0.01)
    if t == 16:
        assert peak <= 1.2 * held
