"""tools/gpu_check.sh on a machine without a GPU: it says so and checks nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run for real")
def test_gpu_check_without_gpu_says_so(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no CUDA GPU here" in proc.stdout and "nothing was checked" in proc.stdout
    assert "pytest -m cuda" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_gpu_check_dry_run_lists_the_steps(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for step in ("install", "versions", "pytest -m cuda", "--amp", "--compile"):
        assert step in proc.stdout
    assert not (tmp_path / "out").exists()


def test_every_cuda_test_is_marked():
    # gpu_check selects CUDA tests with -m cuda: a test that needs CUDA but lacks the mark would never run there.
    for path in (REPO / "tests").glob("test_*.py"):
        text = path.read_text()
        n_skips = text.count('skipif(not torch.cuda.is_available()')
        if n_skips:
            assert "pytest.mark.cuda" in text, path.name
