"""The README's usage example runs as written and shows what it says."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_usage_example_runs():
    scope: dict = {}
    exec(compile(_block("## Usage"), "README.md", "exec"), scope)
    assert scope["a"].shape == (8, 1, 32, 32)
    assert scope["gated"].shape == scope["x"].shape
    assert set(scope["s"]._fields) == {"a", "mu", "sigma", "mu_l", "sigma_l", "mu_r", "sigma_r"}
    assert scope["brnn"](scope["x"]).shape == (8, 1, 32, 32)
    assert torch.isfinite(scope["a"]).all()
