"""The scan as PyTorch operators: opcheck, torch.compile(fullgraph), torch.export, ONNX, FX, jit.trace."""

import copy
import os

import pytest
import torch
from torch.library import opcheck

import arnn_plugins as ap
from arnn_plugins import ops
from arnn_plugins.ops import cpu_kernel, library, onnx_decompositions

HAS_CC = cpu_kernel.available()
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the C kernel's operator cannot run")


def _scan_inputs(dtype=torch.float64, b=2, t=4, h=5, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    gx = torch.randn(b, 2, 4 * t, h, w, dtype=dtype, generator=g, requires_grad=True)
    wh = (torch.randn(2, 4 * t, t, 2, dtype=dtype, generator=g) * t ** -0.5).requires_grad_()
    return gx, wh


# --------------------------------------------------------------------------- operators


@pytest.mark.parametrize("op", ["scan_cpu", "scan_torch"])
def test_opcheck_forward_operators(op):
    if op == "scan_cpu" and not HAS_CC:
        pytest.skip("no C compiler")
    gx, wh = _scan_inputs(b=1, t=2, h=3, w=2)
    # Non-contiguous, as the layer hands it over (a permuted view of its input projection).
    gx = gx.detach().permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3).requires_grad_()
    opcheck(getattr(library, op), (gx, wh))


@pytest.mark.parametrize("op", ["scan_cpu", "scan_torch"])
def test_opcheck_backward_operators(op):
    if op == "scan_cpu" and not HAS_CC:
        pytest.skip("no C compiler")
    gx, wh = _scan_inputs()
    saved = getattr(library, op)(gx.detach(), wh.detach())
    grad_h = torch.randn(2, 2, 4, 5, 4, dtype=torch.float64).transpose(3, 4).contiguous().transpose(3, 4)
    if op == "scan_cpu":
        opcheck(library.scan_cpu_backward, (grad_h, wh.detach(), *saved))
    else:
        opcheck(library.scan_torch_backward, (grad_h, wh.detach(), *saved[1:]))


@pytest.mark.parametrize("op", ["scan_cpu", "scan_torch"])
def test_operators_agree_with_the_reference_scan(op):
    if op == "scan_cpu" and not HAS_CC:
        pytest.skip("no C compiler")
    from arnn_plugins.ops import reference_scan

    gx, wh = _scan_inputs()
    h = getattr(library, op)(gx, wh)[0]
    ref = reference_scan(gx, wh)
    torch.testing.assert_close(h, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(h, (gx, wh), g)
    want = torch.autograd.grad(ref, (gx, wh), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    # gradcheck through the registered autograd formula.
    assert torch.autograd.gradcheck(lambda a, b: getattr(library, op)(a, b)[0], (gx, wh))


def test_onnx_decompositions_are_entered_only_inside_the_block():
    from torch._decomp import decomposition_table

    op = torch.ops.arnn_plugins.scan_cpu.default
    assert op not in decomposition_table
    with onnx_decompositions():
        assert decomposition_table[op] is ops.EXPORT_DECOMPOSITIONS[op]
    # Outside, fake tensors with symbolic shapes must not trace the unrolled reference.
    assert op not in decomposition_table


def test_export_decompositions_match_the_operators():
    gx, wh = _scan_inputs()
    with torch.no_grad():
        for op, decomp in ops.EXPORT_DECOMPOSITIONS.items():
            name = op.name().split("::")[1].split(".")[0]
            if name == "scan_triton":
                continue  # CUDA only; its decomposition is the same reference scan, permuted
            if name == "scan_cpu" and not HAS_CC:
                continue
            want = getattr(library, name)(gx, wh)
            got = decomp(gx, wh)
            assert [t.shape for t in got] == [t.shape for t in want]
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- torch.compile


def _layers():
    kw = dict(hidden_channels=4, backend="fused")
    return {
        "learned": ap.AttentionRNN(6, **kw),
        "independent": ap.AttentionRNN(6, combine="independent", **kw),
        "sample_eval": ap.AttentionRNN(6, sample=True, **kw).eval(),
        "no_shift_ctx1": ap.AttentionRNN(6, context_kernel=1, shift=False, **kw),
        "query": ap.AttentionRNN(6, query_channels=3, **kw),
        "block": ap.BlockAttentionRNN(6, block_size=2, **kw),
        "gate": ap.ARNNGate(6, **kw),
    }


def _compiled_matches_eager(model, inputs, backend="aot_eager", dynamic=None, atol=1e-5):
    """Fullgraph compile, then forward and gradients equal eager; returns the compiled module."""
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(*inputs)
    assert explain.graph_break_count == 0, explain.break_reasons
    eager_model, comp_model = model, copy.deepcopy(model)
    compiled = torch.compile(comp_model, fullgraph=True, backend=backend, dynamic=dynamic)
    xs_e = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    xs_c = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    torch.manual_seed(0)
    out_e = eager_model(*xs_e)
    torch.manual_seed(0)
    out_c = compiled(*xs_c)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=atol)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    torch.testing.assert_close(xs_c[0].grad, xs_e[0].grad, rtol=1e-4, atol=atol)
    for (name, pe), pc in zip(eager_model.named_parameters(), comp_model.parameters()):
        if pe.grad is not None:
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=atol, msg=name)
    return compiled


@needs_cc
@pytest.mark.parametrize("kind", list(_layers()))
def test_every_layer_variant_compiles_fullgraph(kind):
    torch.manual_seed(1)
    m = _layers()[kind]
    x = torch.randn(2, 6, 5, 7)
    inputs = (x, torch.randn(2, 3)) if kind == "query" else (x,)
    _compiled_matches_eager(m, inputs)


@needs_cc
@pytest.mark.slow
def test_layer_compiles_with_inductor():
    torch.manual_seed(2)
    _compiled_matches_eager(ap.AttentionRNN(6, hidden_channels=4), (torch.randn(2, 6, 5, 7),), backend="inductor")


def test_compiled_torch_fallback_matches_eager(monkeypatch):
    # Without the C kernel (no compiler) the operator is the PyTorch scan.
    monkeypatch.setattr(cpu_kernel, "_lib", False)
    torch.manual_seed(3)
    _compiled_matches_eager(ap.AttentionRNN(6, hidden_channels=4), (torch.randn(2, 6, 5, 7),))


@needs_cc
def test_dynamic_shapes_recompile_at_most_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    m = ap.AttentionRNN(6, hidden_channels=4)
    compiled = torch.compile(m, fullgraph=True, backend=counter, dynamic=True)
    for shape in ((2, 6, 5, 7), (3, 6, 5, 7), (3, 6, 8, 6), (4, 6, 9, 9)):
        x = torch.randn(*shape)
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count <= 2, counter.frame_count


# The second case: the ARNN reads CBAM's pooled map, which also feeds the prior conv.
SWAPS = [dict(mode="replace"), dict(mode="residual", reads="pooled")]


def _perturb_arnn(model):
    # A residual swap starts as a no-op; make its ARNN part of the output.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".arnn." in n:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


@needs_cc
@pytest.mark.parametrize("swap", SWAPS, ids=["replace", "residual-pooled"])
def test_swapped_timm_resnet_compiles_fullgraph(swap):
    timm = pytest.importorskip("timm")
    torch.manual_seed(4)
    model = timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), num_classes=10)
    ap.swap_attention(model, hidden_channels=4, **swap)
    _perturb_arnn(model)
    model.eval()  # BatchNorm statistics would otherwise differ between the two runs
    _compiled_matches_eager(model, (torch.randn(2, 3, 64, 64),), atol=1e-4)


@needs_cc
def test_torchvision_resnet_with_gates_compiles_fullgraph():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(5)
    model = tv.models.resnet18(weights=None, num_classes=10)
    ap.insert_attention(model, stages=(3, 4), hidden_channels=4)
    for name, g in model.named_modules():
        if name.endswith("arnn_gate"):  # off the identity, so the gates matter
            torch.nn.init.normal_(g.attn.combiner[-1].weight, std=0.5)
    model.eval()
    _compiled_matches_eager(model, (torch.randn(2, 3, 64, 64),), atol=1e-4)


@needs_cc
def test_mmdet_resnet_with_plugins_compiles_fullgraph():
    pytest.importorskip("mmdet")
    from mmdet.registry import MODELS

    import arnn_plugins.adapters.mmcv_plugin  # noqa: F401  (registers the plugins)

    torch.manual_seed(6)
    cfg = dict(type="ResNet", depth=50, num_stages=4, out_indices=(3,), frozen_stages=-1, norm_eval=False,
               plugins=[dict(cfg=dict(type="AttentionRNN", hidden_channels=4), stages=(False, False, False, True),
                             position="after_conv2")])
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope("mmdet"):
        backbone = MODELS.build(cfg)
    backbone.eval()  # mmdet's ResNet.train() returns None

    class Last(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[-1]

    _compiled_matches_eager(Last(backbone), (torch.randn(1, 3, 64, 64),), atol=1e-4)


# --------------------------------------------------------------------------- torch.export


@needs_cc
@pytest.mark.parametrize("kind", ["learned", "query", "block"])
def test_export_round_trip_with_dynamic_batch(kind):
    torch.manual_seed(7)
    m = _layers()[kind].eval()
    batch = torch.export.Dim("batch", min=1, max=64)

    def inputs(b):
        x = torch.randn(b, 6, 5, 7)
        return (x, torch.randn(b, 3)) if kind == "query" else (x,)

    shapes = tuple({0: batch} for _ in inputs(2))
    ep = torch.export.export(m, inputs(2), dynamic_shapes=shapes)
    assert any("arnn_plugins.scan_cpu" in str(n.target) for n in ep.graph.nodes)
    for b in (2, 5):
        args = inputs(b)
        torch.testing.assert_close(ep.module()(*args), m(*args), rtol=1e-5, atol=1e-6)


@needs_cc
def test_export_with_dynamic_map_size():
    torch.manual_seed(8)
    m = ap.AttentionRNN(6, hidden_channels=4).eval()
    dims = {0: torch.export.Dim("b", max=64), 2: torch.export.Dim("h", min=2, max=256),
            3: torch.export.Dim("w", min=2, max=256)}
    ep = torch.export.export(m, (torch.randn(2, 6, 5, 7),), dynamic_shapes=({**dims},))
    for shape in ((2, 6, 5, 7), (3, 6, 9, 4)):
        x = torch.randn(*shape)
        torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-5, atol=1e-6)


@needs_cc
def test_exported_program_saves_and_loads(tmp_path):
    m = ap.AttentionRNN(6, hidden_channels=4).eval()
    x = torch.randn(2, 6, 5, 7)
    ep = torch.export.export(m, (x,))
    torch.export.save(ep, tmp_path / "arnn.pt2")
    loaded = torch.export.load(tmp_path / "arnn.pt2")
    torch.testing.assert_close(loaded.module()(x), m(x))


# --------------------------------------------------------------------------- ONNX


def _onnx_run(path, inputs):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return torch.from_numpy(sess.run(None, feeds)[0])


def test_onnx_export_of_the_layer_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    torch.manual_seed(9)
    m = ap.AttentionRNN(6, hidden_channels=4, query_channels=3).eval()
    x, q = torch.randn(2, 6, 5, 7), torch.randn(2, 3)
    batch = torch.export.Dim("batch", max=64)
    with onnx_decompositions():
        onnx_program = torch.onnx.export(m, (x, q), dynamo=True, dynamic_shapes=({0: batch}, {0: batch}))
    onnx_program.save(str(tmp_path / "arnn.onnx"))
    for b in (2, 4):
        x, q = torch.randn(b, 6, 5, 7), torch.randn(b, 3)
        torch.testing.assert_close(_onnx_run(tmp_path / "arnn.onnx", (x, q)), m(x, q).detach(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("swap", SWAPS, ids=["replace", "residual-pooled"])
def test_onnx_export_of_a_swapped_resnet18_runs_in_onnxruntime(tmp_path, swap):
    pytest.importorskip("onnxscript")
    timm = pytest.importorskip("timm")
    torch.manual_seed(10)
    model = timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), num_classes=10)
    ap.swap_attention(model, hidden_channels=4, **swap)
    _perturb_arnn(model)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with onnx_decompositions():
        torch.onnx.export(model, (x,), dynamo=True).save(str(tmp_path / "r18.onnx"))
    torch.testing.assert_close(_onnx_run(tmp_path / "r18.onnx", (x,)), model(x).detach(), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- FX and jit.trace


def test_fx_traces_arnn_layers_as_leaves():
    tv = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(11)
    model = tv.models.resnet18(weights=None)
    names = ap.insert_attention(model, stages=(3, 4), hidden_channels=4)
    for name in names:
        torch.nn.init.normal_(model.get_submodule(name).attn.combiner[-1].weight, std=0.5)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    gm = torch.fx.symbolic_trace(model)
    leaves = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("arnn_gate.attn")]
    assert len(leaves) == len(names)
    torch.testing.assert_close(gm(x), model(x))
    feats = create_feature_extractor(model, {"layer3": "l3", "layer4": "l4"})(x)
    body = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2,
                               model.layer3)
    torch.testing.assert_close(feats["l3"], body(x))
    torch.testing.assert_close(feats["l4"], model.layer4(body(x)))


def test_fx_trace_of_stats_and_query():
    m = ap.AttentionRNN(6, hidden_channels=4, query_channels=3)

    class Host(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.arnn = m

        def forward(self, x, q):
            s = self.arnn(x, q, return_stats=True)
            return s.mu + s.sigma

    host = Host()
    gm = torch.fx.symbolic_trace(host)
    x, q = torch.randn(2, 6, 5, 5), torch.randn(2, 3)
    torch.testing.assert_close(gm(x, q), host(x, q))


@needs_cc
def test_jit_trace_records_the_operator():
    m = ap.AttentionRNN(6, hidden_channels=4).eval()
    traced = torch.jit.trace(m, torch.randn(2, 6, 5, 7))
    assert "arnn_plugins::scan_cpu" in str(traced.graph)
    x = torch.randn(3, 6, 5, 7)
    torch.testing.assert_close(traced(x), m(x))


# --------------------------------------------------------------------------- the C kernel's absence is said


def test_a_kernel_that_cannot_be_built_warns_once(tmp_path, monkeypatch):
    import subprocess
    import sys

    env = dict(os.environ, CC=str(tmp_path / "no-such-compiler"), ARNN_PLUGINS_CACHE=str(tmp_path / "cache"))
    env.pop("ARNN_PLUGINS_NO_CC", None)
    code = ("import warnings, torch, arnn_plugins as ap\n"
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    m = ap.AttentionRNN(4, hidden_channels=2)\n"
            "    m(torch.randn(1, 4, 3, 3)); m(torch.randn(1, 4, 3, 3))\n"
            "print(sum('CPU scan kernel' in str(x.message) for x in w))\n"
            "print([str(x.message) for x in w if 'CPU scan kernel' in str(x.message)])\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "1", out.stdout + out.stderr
    assert "no-such-compiler" in lines[1] or "compiler" in lines[1]
    # Asked for by the user: no warning.
    env["ARNN_PLUGINS_NO_CC"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[0] == "0", out.stdout + out.stderr


# --------------------------------------------------------------------------- arnn-plugins export

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "pan_tiny.py")


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_command_writes_a_checked_file(fmt, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    from arnn_plugins.cli import main

    out = tmp_path / f"pan.{fmt}"
    torch.manual_seed(0)  # the model's initialisation, built again below
    assert main(["export", TINY, "--format", fmt, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "matches PyTorch" in text and out.is_file()
    # The file stands on its own: loaded here, run on a batch size it was not exported with.
    from arnn_plugins.engine.runner import build_model, load_config
    from arnn_plugins.experiments.export import TensorForward, _inputs

    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    args = tuple(_inputs(model, cfg, 5).values())
    with torch.no_grad():
        want = TensorForward(model, ["image", "query"])(*args)[0]
    got = _onnx_run(out, args) if fmt == "onnx" else torch.export.load(str(out)).module()(*args)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_export_command_refuses_what_it_cannot_check(tmp_path, capsys):
    from arnn_plugins.cli import main

    mgan = os.path.join(os.path.dirname(__file__), "..", "configs", "mgan_arnn.py")
    assert main(["export", mgan, "--out", str(tmp_path / "g.onnx")]) == 2
    assert "random edit targets" in capsys.readouterr().err


@needs_cc
def test_operators_called_directly_refuse_what_their_kernels_cannot_read():
    gx, wh = _scan_inputs(torch.float32)
    gx, wh = gx.detach(), wh.detach()
    with pytest.raises(ValueError, match=r"^scan_cpu: expected weight_hh of shape \(2, 16, 4, 2\)"):
        library.scan_cpu(gx, wh[:1])
    with pytest.raises(TypeError, match=r"^scan_cpu: expected gx and weight_hh of one dtype"):
        library.scan_cpu(gx, wh.double())
    with pytest.raises(ValueError, match=r"^scan_torch: expected a non-empty gx"):
        library.scan_torch(gx[:, :, :6], wh)
    hid, cells, acts = library.scan_cpu(gx, wh)
    grad = torch.ones_like(hid)
    with pytest.raises(ValueError, match=r"^scan_cpu_backward: expected cells of shape"):
        library.scan_cpu_backward(grad, wh, hid, cells[:2], acts)
    with pytest.raises(ValueError, match=r"^scan_cpu_backward: expected"):
        library.scan_cpu_backward(grad, wh, hid, cells, acts[..., :1].expand_as(acts))


def test_meta_layers_give_shapes_through_the_operators():
    m = ap.AttentionRNN(4, hidden_channels=2, query_channels=3).to("meta")
    out = m(torch.empty(2, 4, 5, 6, device="meta"), torch.empty(2, 3, device="meta"))
    assert out.shape == (2, 1, 5, 6) and out.device.type == "meta"
