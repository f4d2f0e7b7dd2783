"""The diagonal LSTM scan: the one function boundary behind which backends live.

Every backend computes the same thing (paper eq. 8), per direction, for each
image cell ``(i, j)`` with upper neighbour ``u = (i - 1, j)`` and left
neighbour ``l = (i, j - 1)``::

    [o, f, i, g] = gx(i, j) + K_h[..., 0] @ h(u) + K_h[..., 1] @ h(l)
    c(i, j)      = sigmoid(f) * c(l) + sigmoid(i) * tanh(g)
    h(i, j)      = sigmoid(o) * tanh(c(i, j))

In the skewed frame both neighbours sit in the previous column (rows
``i - 1`` and ``i``), which is what makes a column-by-column scan possible;
the memory cell is carried along the row, as in the Diagonal BiLSTM. States
outside the image (the skew's padding cells) are zero, so the scan is exactly
this recurrence over image cells with zero boundary states, and ``h(i, j)``
depends on the inputs of the quadrant ``i' <= i, j' <= j`` and nothing else.

The kernels live in their own modules and know nothing of each other or of
the layer: :mod:`.reference` (plain PyTorch), :mod:`.fused` (anti-diagonal
PyTorch scan with a hand-written backward), :mod:`.cpu_kernel` (a C kernel
built from ``csrc/arnn_scan.c``) and :mod:`.triton_scan` (GPU). This module
is the only place that registers them (at the bottom), so the set of
backends is what this file says, whatever else has been imported. Third
parties add theirs with :func:`register_backend`; a caller can also pass
a callable as ``backend`` without registering anything. The layer enters
through :func:`projected_lstm`, the input projection ``K_x`` of both
directions followed by the scan: for the C kernel in eager mode the
projection runs inside the kernel, for everything else it is one batched
matmul whose result any backend scans.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Union

import torch

# Modules, not their functions: binding the name ``triton_scan`` to the
# function here would hide the submodule ``arnn_plugins.ops.triton_scan``.
from . import cpu_kernel, library, triton_scan
from .fused import fused_scan_torch
from .reference import reference_scan
from .shapes import check_projection, check_scan

__all__ = [
    "EXPORT_DECOMPOSITIONS",
    "ScanFn",
    "available_backends",
    "backend_names",
    "check_backend",
    "check_scan",
    "diagonal_lstm",
    "fused_scan",
    "onnx_decompositions",
    "projected_lstm",
    "reference_scan",
    "register_backend",
    "resolve_backend",
]

ScanFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Backend = Union[str, ScanFn]

_REGISTRY: Dict[str, ScanFn] = {}


def register_backend(name: str, fn: ScanFn) -> None:
    """Make ``fn(gx, weight_hh) -> h`` available as ``backend=name``.

    ``fn`` takes ``gx`` ``(B, D, 4t, H, W)`` and ``weight_hh`` ``(D, 4t, t, 2)``
    in float32 or float64 (one dtype, autocast off) and returns ``h``
    ``(B, D, t, H, W)``, differentiable in both inputs. Registering an
    existing name replaces that backend.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"register_backend: name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(fn):
        raise TypeError(f"register_backend: fn must be callable (gx, weight_hh) -> h, got {type(fn).__name__}")
    _REGISTRY[name] = fn


def available_backends() -> List[str]:
    """Names of the registered backends, sorted (``"auto"`` not included)."""
    return sorted(_REGISTRY)


def backend_names() -> List[str]:
    """Every name ``backend`` accepts: ``"auto"`` then the registered backends."""
    return ["auto"] + available_backends()


def check_backend(layer: str, backend: Backend) -> Backend:
    """Return ``backend`` if it is a known name or a callable, else raise ``ValueError`` naming ``layer``."""
    if callable(backend) or (isinstance(backend, str) and backend in backend_names()):
        return backend
    raise ValueError(
        f"{layer}: backend must be one of {backend_names()} or a callable (gx, weight_hh) -> h, got {backend!r}"
    )


def resolve_backend(backend: Backend, device: torch.device, hidden: int = 16, height: int = 32) -> Backend:
    """Turn ``"auto"`` into a concrete backend name for ``device`` and the scan's size.

    ``hidden`` is ``t`` and ``height`` is ``H`` of the scan; any other name,
    and a callable, is returned unchanged.
    """
    if backend != "auto":
        return backend
    # The Triton kernel keeps a whole (H, t) state tile in registers; past
    # these sizes it spills and the fused path is the safer choice.
    if torch.device(device).type == "cuda" and "triton" in _REGISTRY and hidden <= 32 and height <= 64:
        return "triton"
    if "fused" in _REGISTRY:
        return "fused"
    return "reference"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The recurrence accumulates over W + H - 1 steps: never run it in half
    # precision, whatever the surrounding autocast region asks for.
    return torch.float64 if dtype == torch.float64 else torch.float32


def diagonal_lstm(gx: torch.Tensor, weight_hh: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """Run ``D`` independent diagonal LSTMs over image-shaped gate inputs.

    Args:
        gx: ``(B, D, 4t, H, W)`` input part of the gate pre-activations, gate
            order ``[o, f, i, g]``, each direction already in its own scan
            frame (top-left to bottom-right).
        weight_hh: ``(D, 4t, t, 2)`` the 2x1 recurrent kernel ``K_h``;
            ``[..., 0]`` acts on the upper neighbour, ``[..., 1]`` on the left.
        backend: one of :func:`backend_names`, or a callable
            ``fn(gx, weight_hh) -> h`` with a registered backend's signature.

    Returns:
        ``(B, D, t, H, W)`` hidden states, in ``gx``'s dtype. The backend
        itself always runs in float32 (float64 for float64 input) with
        autocast off.
    """
    check_scan(gx, weight_hh)
    name = resolve_backend(backend, gx.device, gx.shape[2] // 4, gx.shape[3])
    if callable(name):
        fn = name
    elif name in _REGISTRY:
        fn = _REGISTRY[name]
    else:
        raise ValueError(f"AttentionRNN: backend {backend!r} is not available here; available: {backend_names()}")
    out_dtype = gx.dtype
    cdtype = _compute_dtype(out_dtype)
    if gx.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(gx.device.type):
        with torch.autocast(device_type=gx.device.type, enabled=False):
            h = fn(gx.to(cdtype), weight_hh.to(cdtype))
    else:
        # No autocast region to leave: an exported graph then has no autocast wrapper around the scan.
        h = fn(gx.to(cdtype), weight_hh.to(cdtype))
    return h.to(out_dtype)


def projected_lstm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, weight_hh: torch.Tensor,
                   backend: Backend = "auto") -> torch.Tensor:
    """The input part of the gates, ``K_x``, for both directions, then :func:`diagonal_lstm`.

    Direction 0 scans ``x`` as it is, direction 1 scans it mirrored left to
    right (``j -> W - 1 - j``); per direction ``d`` and cell, the gate
    input is ``bias[d] + weight[d] @ x``.

    Args:
        x: ``(B, H, W, Cin)`` features (any strides).
        weight: ``(2, 4t, Cin)``; bias: ``(2, 4t)``; weight_hh: ``(2, 4t, t, 2)``.
        backend: as for :func:`diagonal_lstm`.

    Returns:
        ``(B, 2, t, H, W)`` hidden states, each direction in its own scan frame.

    With the ``"fused"`` backend on CPU in eager mode (float32/float64, no
    autocast) the C kernel computes the projection itself, cell by cell, so
    the ``(B, 2, 4t, H, W)`` gate inputs are never written to memory and read
    back; it sums in the order the unfused path's batched matmul does, and
    the backward is the unfused path's. Everywhere else (other backends,
    graph capture, autocast) the projection is one batched matmul over both
    directions and the scan runs on its result.
    """
    check_projection(x, weight, bias, weight_hh)
    b, h, w, cin = x.shape
    # One copy: the stack of the two features-last views is already
    # (2, B, H, W, Cin) in memory, each direction in its scan frame: the
    # layout the batched matmul and the kernel read.
    xin = torch.stack([x, x.flip(2)], dim=0)
    name = resolve_backend(backend, x.device, weight.shape[1] // 4, x.shape[1])
    if (name == "fused" and _REGISTRY.get("fused") is fused_scan and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and weight.dtype == bias.dtype == weight_hh.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu") and not _capturing(x) and _c_kernel_ready()):
        return cpu_kernel.c_scan_projected(xin, weight, bias, weight_hh)
    xin = xin.reshape(2, b * h * w, cin)
    gx = torch.baddbmm(bias.view(2, 1, -1).to(xin.dtype), xin, weight.transpose(1, 2).to(xin.dtype))
    gx = gx.view(2, b, h, w, weight.shape[1]).permute(1, 0, 4, 2, 3)
    return diagonal_lstm(gx, weight_hh, backend)


@torch._dynamo.assume_constant_result
def _c_kernel_ready() -> bool:
    # A constant to the tracer: building or loading the library (ctypes) is
    # not something a graph can contain.
    return cpu_kernel.available()


def _capturing(x: torch.Tensor) -> bool:
    """Whether ``x`` is being captured into a graph (compile, export, jit.trace, fake tensors).

    There the scan must be an operator (:mod:`.library`); in eager mode the
    ``autograd.Function`` s are used, whose backward may spend saved buffers.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    # Meta tensors too: an operator's fake implementation is its meta kernel.
    return x.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(x)


def fused_scan(gx: torch.Tensor, weight_hh: torch.Tensor) -> torch.Tensor:
    """``backend="fused"``; shapes as in :func:`diagonal_lstm`.

    On CPU it runs the compiled raster-order kernel of :mod:`.cpu_kernel`
    when that builds here (one sequence per thread, no per-step dispatch),
    else, and on other devices, :func:`.fused.fused_scan_torch`; under graph
    capture the same kernels as the operators ``arnn_plugins::scan_cpu`` /
    ``scan_torch``.
    """
    on_cpu = gx.device.type == "cpu"
    if on_cpu and _c_kernel_ready():
        if _capturing(gx):
            return library.scan_cpu(gx, weight_hh)[0]
        return cpu_kernel.c_scan(gx, weight_hh)
    if _capturing(gx):
        return library.scan_torch(gx, weight_hh)[0]
    return fused_scan_torch(gx, weight_hh)


def triton_backend(gx: torch.Tensor, weight_hh: torch.Tensor) -> torch.Tensor:
    """``backend="triton"``; the operator ``arnn_plugins::scan_triton`` under graph capture."""
    if _capturing(gx):
        triton_scan.check_inputs(gx, weight_hh)
        return library.scan_triton(gx, weight_hh)[0].permute(0, 1, 4, 2, 3)
    return triton_scan.triton_scan(gx, weight_hh)


# -- export to runtimes that do not know the operators (ONNX) ----------------------------------


_scan_sizes = library._sizes


def _decompose_cpu(gx, weight_hh):
    b, d, t, h, w = _scan_sizes(gx)
    return reference_scan(gx, weight_hh), gx.new_zeros(d * b, h, w, t), gx.new_zeros(d * b, h, w, 4 * t)


def _decompose_torch(gx, weight_hh):
    b, d, t, h, w = _scan_sizes(gx)
    buf = gx.new_zeros(w + h, d, h + 1, b, t)
    return reference_scan(gx, weight_hh), gx.new_zeros(d, h * w, b, 4 * t), buf, buf.clone()


def _decompose_triton(gx, weight_hh):
    b, d, t, h, w = _scan_sizes(gx)
    hid = reference_scan(gx, weight_hh).permute(0, 1, 3, 4, 2)
    return hid, gx.new_zeros(b, d, h, w, t), gx.new_zeros(b, d, h, w, 4 * t)


# For ``ExportedProgram.run_decompositions``: each forward operator as the
# reference scan (an unrolled loop over the W + H - 1 anti-diagonals, in core
# ATen operators). Only the hidden states are exact; the saved buffers are
# zeros, since an exported inference graph never reads them.
EXPORT_DECOMPOSITIONS = {
    torch.ops.arnn_plugins.scan_cpu.default: _decompose_cpu,
    torch.ops.arnn_plugins.scan_torch.default: _decompose_torch,
    torch.ops.arnn_plugins.scan_triton.default: _decompose_triton,
}


@contextlib.contextmanager
def onnx_decompositions():
    """Within this block ``torch.onnx.export(model, ..., dynamo=True)`` lowers the scan to the reference.

    ONNX runtimes do not know the ``arnn_plugins`` operators, so for the
    length of the block each forward operator is entered in torch's table
    of decompositions, which the exporter (through ``torch.export``) applies.
    Outside it the table is left as it was: fake tensors with symbolic
    shapes consult that table too, and ``torch.compile`` must keep the
    operators. The exported graph unrolls the ``W + H - 1`` anti-diagonal
    steps, so its map size is fixed; the batch may stay dynamic.
    """
    from torch._decomp import decomposition_table

    added = [op for op in EXPORT_DECOMPOSITIONS if op not in decomposition_table]
    for op in added:
        decomposition_table[op] = EXPORT_DECOMPOSITIONS[op]
    try:
        yield
    finally:
        for op in added:
            decomposition_table.pop(op, None)


# The registry, in one place.
register_backend("reference", reference_scan)
register_backend("fused", fused_scan)
if triton_scan.HAS_TRITON:
    register_backend("triton", triton_backend)
