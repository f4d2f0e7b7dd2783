#!/usr/bin/env bash
# The GPU check: on a CUDA machine with no network, install this checkout,
# run every CUDA test, then the speed tables (fp32, AMP, compiled), and write
# the tables, nvidia-smi's output, the versions and the logs under $OUT.
#
#   OUT=gpu_out bash tools/gpu_check.sh            # on the GPU machine
#   bash tools/gpu_check.sh --dry-run              # anywhere: print the steps
#
# Python packages the machine lacks (mmengine, ...) travel as wheels in .whl/
# beside this checkout; they are installed with --no-index. Exit status: the
# CUDA tests' (non-zero if any fails), 3 when there is no CUDA device.
# At most 8 files come back from a device run: seven are written.
# Budget: about 8 minutes on an H200 (the compiled table is the longest part).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
py=${PYTHON:-python3}
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1

steps=(
  "install: a venv over the system's packages, .whl/*.whl (no index), this checkout editable"
  "versions: python, torch, CUDA, triton, timm, the GPU (versions.txt, nvidia-smi.txt)"
  "tests: pytest -m cuda tests/test_cuda.py (every backend vs the reference, AMP, compile, a timm step) -> tests.log"
  "bench: arnn-plugins bench --device cuda (layer + ResNet18, fp32) -> bench_fp32.md"
  "bench: arnn-plugins bench --device cuda --amp --no-layer -> bench_amp.md"
  "bench: arnn-plugins bench --device cuda --amp --compile --no-layer --repeats 3 -> bench_compile.md"
)

if [ $dry = 1 ] || ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if [ $dry = 0 ]; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False, or torch is missing): nothing was checked."
  fi
  echo "gpu_check: the steps it runs on a CUDA machine, writing to \$OUT (now: $out):"
  printf '  %s\n' "${steps[@]}"
  [ $dry = 1 ] && exit 0 || exit 3
fi

mkdir -p "$out"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$out/gpu_check.log"; }

log "${steps[0]}"
venv=${GPU_CHECK_VENV:-/tmp/arnn-gpu-venv}
"$py" -m venv --system-site-packages "$venv"
vpy="$venv/bin/python"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$vpy" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl 2>&1 | tee -a "$out/gpu_check.log"
fi
"$vpy" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tee -a "$out/gpu_check.log"

log "${steps[1]}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$vpy" - > "$out/versions.txt" 2>&1 <<'PY'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("triton", "timm", "transformers", "onnxruntime", "mmengine", "arnn_plugins"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as e:  # noqa: BLE001 -- a version list, not a check
        print(name, "not importable:", type(e).__name__, e)
PY
cat "$out/versions.txt"

log "${steps[2]}"
"$vpy" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 \
  | tee "$out/tests.log"
status=${PIPESTATUS[0]}
log "CUDA tests exit status: $status"

bench() {  # name, then the bench arguments
  local name=$1; shift
  log "bench $*"
  timeout 240 "$venv/bin/arnn-plugins" bench --device cuda --out "$out/$name.md" "$@" 2>&1 | tee -a "$out/gpu_check.log" \
    || log "bench $name failed (status ${PIPESTATUS[0]})"
}
bench bench_fp32
bench bench_amp --amp --no-layer
bench bench_compile --amp --compile --no-layer --repeats 3
log "done; CUDA tests exit status $status"
exit "$status"
