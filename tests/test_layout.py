"""The package's import picture: six layers, every arrow pointing down, no cycles.

Run as a script (``python tests/test_layout.py``) it prints the layers, the
arrows between them and the longest chain of module imports.
"""

import ast
import fnmatch
import os
import sys
from functools import lru_cache

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Source folder -> the package it is installed as (setup.cfg package_dir).
FOLDERS = {"arnn_plugins": "arnn_plugins", "adapters": "arnn_plugins.adapters", "patches": "arnn_plugins.patches"}

# Lowest first. A module may import from its own layer or from a lower one.
LAYERS = [
    ("kernels", ["arnn_plugins.ops", "arnn_plugins.ops.*", "arnn_plugins.checks"]),
    ("library", ["arnn_plugins", "arnn_plugins.arnn", "arnn_plugins.gate", "arnn_plugins.registry",
                 "arnn_plugins.finetune", "arnn_plugins.serialization"]),
    ("models and data", ["arnn_plugins.models", "arnn_plugins.models.*", "arnn_plugins.data",
                         "arnn_plugins.data.*"]),
    ("adapters and patches", ["arnn_plugins.adapters", "arnn_plugins.adapters.*", "arnn_plugins.patches",
                              "arnn_plugins.patches.*"]),
    ("engine", ["arnn_plugins.engine", "arnn_plugins.engine.*"]),
    ("applications", ["arnn_plugins.experiments", "arnn_plugins.experiments.*", "arnn_plugins.cli"]),
]


def modules():
    """``{module name: path}`` for every source file of the package."""
    out = {}
    for folder, package in FOLDERS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, _, files in os.walk(base):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join([package, *rel])] = os.path.join(dirpath, f)
    return out


@lru_cache(maxsize=None)
def graph():
    """``{module: set of package modules it imports}``, function-level imports included."""
    mods = modules()
    edges = {}
    for name, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        here = name if is_pkg else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.add(sub if sub in mods else base)
        edges[name] = {t for t in targets if t in mods and t != name}
    return edges


def layer_of(module):
    for k, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return k
    raise KeyError(module)


def longest_chain():
    """The longest import chain (a list of modules, importer first)."""
    g = graph()

    @lru_cache(maxsize=None)
    def chain(m):
        best = max((chain(t) for t in g[m]), key=len, default=())
        return (m, *best)

    return list(max((chain(m) for m in g), key=len))


def test_every_module_has_a_layer():
    unplaced = []
    for m in graph():
        try:
            layer_of(m)
        except KeyError:
            unplaced.append(m)
    assert not unplaced


def test_no_import_points_up():
    up = [(a, b) for a, ts in graph().items() for b in ts if layer_of(b) > layer_of(a)]
    assert not up, "imports from a higher layer: " + ", ".join(f"{a} -> {b}" for a, b in up)


def test_no_cycles():
    g, state, cycles = graph(), {}, []

    def visit(m, path):
        state[m] = 1
        for t in g[m]:
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_kernels_import_nothing_above_them():
    """No kernel imports the layer that uses it (or anything else of the package but checks)."""
    for m, ts in graph().items():
        if m.startswith("arnn_plugins.ops"):
            assert all(t.startswith("arnn_plugins.ops") or t == "arnn_plugins.checks" for t in ts), (m, ts)


@pytest.mark.parametrize("layer", [name for name, _ in LAYERS])
def test_layers_are_not_empty(layer):
    # A renamed folder would otherwise leave its layer silently empty.
    k = [name for name, _ in LAYERS].index(layer)
    assert any(layer_of(m) == k for m in graph())


def main() -> None:
    g = graph()
    for k, (name, _) in reversed(list(enumerate(LAYERS))):
        members = sorted(m for m in g if layer_of(m) == k)
        below = sorted({LAYERS[layer_of(t)][0] for m in members for t in g[m] if layer_of(t) < k})
        print(f"{k + 1}. {name}: {', '.join(x.replace('arnn_plugins.', '') for x in members)}")
        print(f"   imports from: {', '.join(below) or '-'}")
    chain = longest_chain()
    print(f"longest import chain ({len(chain)} modules): {' -> '.join(chain)}")


if __name__ == "__main__":
    sys.exit(main())
