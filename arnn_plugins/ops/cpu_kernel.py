"""A small C kernel for the diagonal LSTM scan on CPU.

On a CPU the scan is sequential within one image but independent across
(direction, batch) pairs, and a per-step PyTorch op costs more in dispatch
than the arithmetic it does. This module compiles (once, with the system C
compiler, into ``~/.cache/arnn-plugins``) a plain C function that walks the
sequences in raster order, which is a valid order for the recurrence: cell
``(i, j)`` needs only ``(i - 1, j)`` and ``(i, j - 1)``; a few batch items of
one direction advance together, their mat-vecs one small GEMM on the shared
weights. The blocks are split over threads by OpenMP in C, on the same
threads torch's ops use (a second pool of threads competes with torch's
for the cores); a compiler without OpenMP leaves the split to Python
threads (``ctypes`` releases the GIL). The forward saves
gate activations and cells, and the backward is the reverse raster walk
(writing the input gradient over the saved activations when the graph is
not retained, so it allocates next to nothing). :func:`c_scan_projected`
also moves the layer's input projection into the forward kernel: the gate
inputs are computed cell by cell where they are used instead of being
written to memory by a batched matmul and read back; its backward stays
the batched matmul's.

The C source, ``csrc/arnn_scan.c`` next to this module (shipped as package
data), has no Python or torch headers, so it builds in about a second and
needs nothing from the network. The built library is cached under a name
hashed from the source text, the compiler flags and the CPU's instruction
sets, so an edited source or another machine never loads a stale build. If
no compiler is found, or
``ARNN_PLUGINS_NO_CC=1`` is set, :func:`load` returns ``None`` and the fused
backend uses its pure-PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

__all__ = ["SOURCE_FILE", "available", "c_scan", "c_scan_projected", "library_path", "load", "scan_backward",
           "scan_forward", "source", "uses_openmp"]

# The C source ships as package data next to this module (setup.cfg
# [options.package_data]); read at build time, never copied into Python.
SOURCE_FILE = "csrc/arnn_scan.c"

# -ffp-contract=fast: ISO C modes otherwise forbid fusing a * b + c into
# one FMA instruction, which halves the recurrence's arithmetic (and rounds
# once instead of twice).
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c99"]
# With OpenMP the kernel's threads are the process's OpenMP pool, which is
# torch's own on Linux wheels (libgomp.so.1 is loaded once, by torch). A
# compiler without it (clang without libomp) builds the plain library, and
# Python threads split the work instead.
_OPENMP = ["-fopenmp"]
_lib = None
_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None


def _cache_dir() -> str:
    root = os.environ.get("ARNN_PLUGINS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "arnn-plugins")
    return os.path.join(root, "kernels")


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the machine and its instruction sets."""
    sig = sys.platform + os.uname().machine
    try:
        with open("/proc/cpuinfo") as f:
            sig += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return sig


def source() -> str:
    """The C source text the kernel is built from (``arnn_plugins/ops/csrc/arnn_scan.c``)."""
    return importlib.resources.files(__package__).joinpath(SOURCE_FILE).read_text(encoding="utf-8")


def library_path(text: Optional[str] = None, openmp: bool = True) -> str:
    """Where the library built from ``text`` (default: :func:`source`) is cached.

    The name hashes the source, the flags (``openmp``: with ``-fopenmp``) and
    the CPU signature: each of them changes the machine code.
    """
    text = source() if text is None else text
    flags = _FLAGS + (_OPENMP if openmp else [])
    key = hashlib.sha256((text + " ".join(flags) + _cpu_signature()).encode()).hexdigest()[:16]
    return os.path.join(_cache_dir(), f"arnn_scan_{key}.so")


def _compile(text: str, path: str, openmp: bool = True) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "arnn_scan.c")
        with open(src, "w") as f:
            f.write(text)
        out = os.path.join(tmp, "arnn_scan.so")
        flags = _FLAGS + (_OPENMP if openmp else [])
        subprocess.run([cc, *flags, src, "-o", out, "-lm"], check=True, capture_output=True, timeout=120)
        # Atomic, so concurrent first uses never load a half-written file.
        tmp_target = f"{path}.{os.getpid()}.tmp"
        shutil.copyfile(out, tmp_target)
        os.replace(tmp_target, path)


def _reason(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        err = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        return f"{e.cmd[0]} failed: {err[-1] if err else e}"
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"no such file: {e.filename}"
    return f"{type(e).__name__}: {e}"


def load():
    """The compiled kernel library, building it on first use; ``None`` if unavailable."""
    global _lib
    if _lib is not None:
        return _lib or None
    with _lock:
        if _lib is not None:
            return _lib or None
        if os.environ.get("ARNN_PLUGINS_NO_CC") == "1" or sys.platform == "win32":
            _lib = False
            return None
        try:
            # Read once: the library must be built from the text its name hashes.
            text = source()
            lib = _build_and_load(text)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _lib = False
            # Once per process: the scan still works, only slower, and the
            # user should know why (a missing compiler, an unwritable cache).
            warnings.warn(
                f"arnn_plugins: the CPU scan kernel could not be built or loaded ({_reason(e)}); AttentionRNN "
                "uses the slower PyTorch scan. Set CC to a C compiler, or ARNN_PLUGINS_CACHE to a writable "
                "folder; ARNN_PLUGINS_NO_CC=1 chooses the PyTorch scan without this warning.",
                RuntimeWarning, stacklevel=2)
            return None
        _lib = lib
        return lib


def _build_and_load(text: str):
    """The library with OpenMP if this compiler and loader manage it, else without."""
    path = library_path(text, openmp=True)
    try:
        if not os.path.exists(path):
            _compile(text, path, openmp=True)
        return ctypes.CDLL(path)
    except (OSError, subprocess.CalledProcessError):
        path = library_path(text, openmp=False)
        if not os.path.exists(path):
            _compile(text, path, openmp=False)
        return ctypes.CDLL(path)


def uses_openmp() -> bool:
    """True when the loaded kernel splits its work over the process's OpenMP threads."""
    lib = load()
    return lib is not None and bool(lib.arnn_openmp())


def available() -> bool:
    """True when the C kernel can be used here."""
    return load() is not None


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _ok(rc: int) -> None:
    # The kernels return -1 when their few kilobytes of scratch could not be allocated.
    if rc != 0:
        raise MemoryError("AttentionRNN: the CPU scan kernel could not allocate its scratch memory")


def _blocks(b: int, d: int, nb: int):
    """The kernel's units of work: ``(s0, s1)`` ranges of ``nb`` sequences ``s = d * B + b`` it advances together."""
    return [(k * b + b0, k * b + min(b0 + nb, b)) for k in range(d) for b0 in range(0, b, nb)]


def _run_blocks(lib, name: str, args: list, b: int, d: int) -> None:
    """Run kernel ``name`` over the ``d * b`` sequences, spread over torch's thread count.

    ``args`` are the kernel's arguments up to the sequence range. With
    OpenMP the C side splits the blocks (``name``'s ``_par`` form) on the
    threads torch's own ops use. Otherwise Python threads do: the calling
    thread works too, and each thread takes the next block of
    sequences when it is done with one. A fixed split into one share per
    thread made the step wait for the slowest share: on a machine whose
    other core is busy with another process, two threads then took as long
    as one. Taking blocks as they come, a busy core slows the scan only by
    the blocks it does not get to.
    """
    global _pool
    blocks = _blocks(b, d, int(lib.arnn_block()))
    workers = max(1, min(torch.get_num_threads(), len(blocks)))
    if workers == 1:
        _ok(getattr(lib, name)(*args, ctypes.c_int(0), ctypes.c_int(d * b)))
        return
    if lib.arnn_openmp():
        base, dtype = name.rsplit("_", 1)
        _ok(getattr(lib, f"{base}_par_{dtype}")(*args, ctypes.c_int(d), ctypes.c_int(workers)))
        return
    fn = getattr(lib, name)
    if _pool is None or _pool._max_workers < workers - 1:
        _pool = ThreadPoolExecutor(max_workers=workers - 1)
    todo = iter(blocks)
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                block = next(todo, None)
            if block is None:
                return
            _ok(fn(*args, ctypes.c_int(block[0]), ctypes.c_int(block[1])))

    futures = [_pool.submit(work) for _ in range(workers - 1)]
    try:
        work()
    finally:
        for fut in futures:
            fut.result()


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph`` / ``create_graph``).

    Unknown (an older torch without the query) counts as kept, the safe side.
    """
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _strides(x: torch.Tensor):
    """Element strides of a ``(B, D, F, H, W)`` tensor as ``b, d, i, j`` longs."""
    sb, sd, _, si, sj = x.stride()
    return [ctypes.c_long(v) for v in (sb, sd, si, sj)]


def _features_last(x: torch.Tensor) -> torch.Tensor:
    """Same values as ``x`` ``(B, D, F, H, W)`` with the feature dimension contiguous."""
    if x.stride(2) == 1:
        return x
    return x.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)


def scan_forward(gx: Optional[torch.Tensor], weight_hh: torch.Tensor, x: Optional[torch.Tensor] = None,
                 weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
    """Run the forward kernel; returns ``(h, cells, acts)``.

    Args:
        gx: ``(B, D, 4t, H, W)`` float32/float64 CPU gate inputs, any strides;
            or ``None`` with ``x``, ``weight``, ``bias`` given, and the kernel
            computes each cell's gate inputs ``bias[d] + weight[d] @ x[d]``
            where it needs them (summed from zero in ascending order, the
            bias last: the batched matmul's order), never storing them.
        weight_hh: ``(D, 4t, t, 2)``, same dtype.
        x: ``(D, B, H, W, Cin)`` contiguous, each direction's features in
            its own scan frame; weight: ``(D, 4t, Cin)``; bias: ``(D, 4t)``.

    Returns:
        ``h`` ``(B, D, t, H, W)`` (a features-last view), and what the
        backward needs: ``cells`` ``(D * B, H, W, t)`` and the gate
        activations ``acts`` ``(D * B, H, W, 4t)``.
    """
    lib = load()
    zero = ctypes.c_long(0)
    if gx is None:
        d, b, h, w, cin = x.shape
        g4 = weight.shape[1]
        # Bound to names: a contiguous copy must outlive the kernel call that reads it.
        x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
        src, proj = [None, zero, zero, zero, zero], [
            _ptr(x), *(ctypes.c_long(v) for v in (x.stride(1), x.stride(0), x.stride(2), x.stride(3))),
            _ptr(weight), _ptr(bias), ctypes.c_int(cin)]
        like = x
    else:
        b, d, g4, h, w = gx.shape
        gx = _features_last(gx)
        src, proj = [_ptr(gx), *_strides(gx)], [None, zero, zero, zero, zero, None, None, ctypes.c_int(0)]
        like = gx
    t = g4 // 4
    name = "arnn_fwd_f64" if like.dtype == torch.float64 else "arnn_fwd_f32"
    wt = weight_hh.permute(0, 3, 2, 1).contiguous()  # (D, 2, t, 4t)
    hid = like.new_empty(b, h, w, d, t).permute(0, 3, 4, 1, 2)  # (B, D, t, H, W), features last
    cbuf = like.new_empty(d * b, h, w, t)
    acts = like.new_empty(d * b, h, w, g4)

    args = [*src, *proj, _ptr(wt), _ptr(hid), *_strides(hid), _ptr(cbuf), _ptr(acts),
            ctypes.c_int(b), ctypes.c_int(h), ctypes.c_int(w), ctypes.c_int(t)]
    _run_blocks(lib, name, args, b, d)
    return hid, cbuf, acts


def scan_backward(grad_h: torch.Tensor, weight_hh: torch.Tensor, hid: torch.Tensor, cbuf: torch.Tensor,
                  acts: torch.Tensor, overwrite: bool = False):
    """Run the backward kernel on what :func:`scan_forward` returned; returns ``(grad_gx, grad_weight_hh)``.

    ``grad_h`` is ``(B, D, t, H, W)`` with any strides. With ``overwrite``
    the input gradient is written over ``acts`` (which is then spent), cell
    by cell as they are consumed, so the backward allocates next to nothing.
    Either way ``grad_gx`` has the ``(D, B, H, W, 4t)`` memory layout the
    layer's input projection writes, so it flows on without a layout copy.
    """
    return _backward(grad_h, weight_hh.permute(0, 3, 1, 2).contiguous(), hid, cbuf, acts, overwrite)


def _backward(grad_h, wg, hid, cbuf, acts, overwrite):
    # wg: K_h as the kernel reads it, (D, 2, 4t, t) contiguous.
    b, d, t, h, w = hid.shape
    lib = load()
    name = "arnn_bwd_f64" if hid.dtype == torch.float64 else "arnn_bwd_f32"
    dz = acts if overwrite else torch.empty_like(acts)
    dgx = dz.view(d, b, h, w, 4 * t).permute(1, 0, 4, 2, 3)
    dwt = hid.new_empty(d, b, 2, t, 4 * t)
    sb, sd, sf, si, sj = grad_h.stride()
    args_o = [ctypes.c_long(v) for v in (sb, sd, sf, si, sj)]
    args_h, args_d = _strides(hid), _strides(dgx)

    args = [_ptr(grad_h), *args_o, _ptr(wg), _ptr(hid), *args_h, _ptr(cbuf), _ptr(acts), _ptr(dgx), *args_d,
            _ptr(dwt), ctypes.c_int(b), ctypes.c_int(h), ctypes.c_int(w), ctypes.c_int(t)]
    _run_blocks(lib, name, args, b, d)
    return dgx, dwt.sum(1).permute(0, 3, 2, 1)  # (D, 4t, t, 2)


class _CScan(torch.autograd.Function):
    """The scan; with ``x``, ``weight``, ``bias`` its gate inputs are computed in the kernel.

    Then ``gx`` is :class:`_GateInputs`' stand-in, and the gradient returned
    for it reaches ``x`` and the projection through that node.
    """

    @staticmethod
    def forward(ctx, gx: torch.Tensor, weight_hh: torch.Tensor, *projection: torch.Tensor) -> torch.Tensor:
        hid, cbuf, acts = scan_forward(gx if not projection else None, weight_hh, *projection)
        ctx.save_for_backward(weight_hh.permute(0, 3, 1, 2).contiguous(), hid, cbuf, acts)
        ctx.n_projection = len(projection)
        return hid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: torch.Tensor):
        wg, hid, cbuf, acts = ctx.saved_tensors
        # When the graph is freed after this backward (no retain_graph, no
        # create_graph), the saved activations may be spent.
        grads = _backward(grad_h, wg, hid, cbuf, acts, overwrite=not _graph_kept())
        return (*grads, *(None,) * ctx.n_projection)


class _GateInputs(torch.autograd.Function):
    """The input projection as an autograd node whose output is never stored.

    Its output is a zero-stride stand-in for the gate inputs ``(B, D, 4t,
    H, W)``; :class:`_CScan` computes the real ones in the kernel. Its
    backward receives their gradient (the scan's) and returns what
    ``torch.baddbmm(bias, xin, weight_t)``'s backward returns, by the same
    operations on the same operand layouts, so the numbers are the same.
    """

    @staticmethod
    def forward(ctx, xin: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(xin, weight_t)
        d, b, h, w, _ = xin.shape
        return xin.new_zeros(()).expand(b, d, weight_t.shape[2], h, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        xin, weight_t = ctx.saved_tensors
        d, cin, g4 = weight_t.shape
        x = xin.view(d, -1, cin)
        g = grad.permute(1, 0, 3, 4, 2).reshape(d, -1, g4)  # (D, B, H, W, 4t) in memory, as the scan writes it
        return g.bmm(weight_t.transpose(1, 2)).view(xin.shape), x.transpose(1, 2).bmm(g), g.sum(1, keepdim=True)


def _check_cpu(x: torch.Tensor) -> None:
    if load() is None:
        raise RuntimeError("AttentionRNN: the CPU scan kernel is not available (no C compiler?)")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"AttentionRNN: the CPU scan kernel takes float32/float64 CPU tensors, got {x.dtype} on {x.device}")


def c_scan(gx: torch.Tensor, weight_hh: torch.Tensor) -> torch.Tensor:
    """Diagonal LSTM scan by the C kernel (CPU, float32/float64).

    Shapes as in :func:`arnn_plugins.ops.diagonal_lstm`; raises
    ``RuntimeError`` if the kernel is not available.
    """
    _check_cpu(gx)
    return _CScan.apply(gx, weight_hh.to(gx.dtype))


def c_scan_projected(xin: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     weight_hh: torch.Tensor) -> torch.Tensor:
    """Input projection and diagonal LSTM scan by the C kernel (CPU, float32/float64).

    ``xin`` ``(D, B, H, W, Cin)`` contiguous, each direction's features in
    its own scan frame; ``weight`` ``(D, 4t, Cin)``, ``bias`` ``(D, 4t)``,
    ``weight_hh`` ``(D, 4t, t, 2)``, all of ``xin``'s dtype. Returns ``h``
    ``(B, D, t, H, W)``, as :func:`c_scan` of ``bias + weight @ xin``
    laid out as gate inputs. The autograd graph is the unfused one's (a
    batched matmul's backward, then the scan's), so the backward needs no
    more memory than it; only the gate inputs are never stored.
    """
    _check_cpu(xin)
    gx = _GateInputs.apply(xin, weight.transpose(1, 2), bias.unsqueeze(1))
    return _CScan.apply(gx, weight_hh, xin, weight, bias)
