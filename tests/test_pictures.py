"""Mask pictures and plots: one colour scale across models, curves from run folders, the dependency figure."""

import json

import numpy as np
import pytest
import torch

from arnn_plugins.experiments import plots
from arnn_plugins.experiments.pictures import mask_panel_figure, mask_panel_png, mask_products


def _panels(n=3, h=12, w=10, layers=3):
    g = torch.Generator().manual_seed(0)
    sharp = [torch.rand(n, 1, h, w, generator=g) ** 4 for _ in range(layers)]  # a peaked model
    flat = [torch.full((n, 1, h, w), 0.5) + 0.01 * torch.rand(n, 1, h, w, generator=g) for _ in range(layers)]
    pred = torch.zeros(n, dtype=torch.long)
    return {"CTX": (pred, flat), "ARNN": (pred, sharp)}


def _inputs(n=3, h=12, w=10):
    images = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(1))
    target = torch.zeros(n, h, w, dtype=torch.bool)
    target[:, 3:8, 2:6] = True
    return images, torch.arange(n), torch.zeros(n, dtype=torch.long), target


def test_products_are_shares_of_mass():
    prods = mask_products(_panels())
    for p in prods.values():
        torch.testing.assert_close(p.sum(dim=(1, 2)), torch.ones(p.shape[0]))
    # A flat mask's product is near the uniform level everywhere.
    assert torch.allclose(prods["CTX"], torch.full_like(prods["CTX"], 1 / 120), rtol=0.1)


def test_every_model_shares_one_scale_per_kind_of_tile():
    images, queries, answers, target = _inputs()
    panels = _panels()
    fig = mask_panel_figure(images, queries, answers, panels, target_masks=target)
    layer_clims, prod_clims = set(), set()
    for ax in fig.axes:
        for im in ax.get_images():
            if im.get_cmap().name == "gray":
                layer_clims.add(im.get_clim())
            elif im.get_cmap().name == "magma":
                prod_clims.add(im.get_clim())
    n_items, n_models, layers = 3, 2, 3
    layer_tiles = sum(1 for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "gray")
    assert layer_tiles == n_items * n_models * layers
    # Layer masks: gate values on one fixed 0-1 scale; products: one log scale from a tenth of
    # the uniform level to the largest share anywhere.
    assert layer_clims == {(0.0, 1.0)}
    top = max(float(p.max()) for p in mask_products(panels).values())
    assert len(prod_clims) == 1
    assert np.allclose(prod_clims.pop(), (1 / 120 / 10, top))
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "layer mask (gate value)" in labels and "product: share of mass per pixel (log)" in labels


def test_mask_panel_png_writes_a_picture(tmp_path):
    from PIL import Image

    images, queries, answers, target = _inputs()
    size = mask_panel_png(str(tmp_path / "m.png"), images, queries, answers, _panels(), target_masks=target)
    img = Image.open(tmp_path / "m.png")
    assert img.size == size and size[0] > size[1] > 100
    assert len(set(np.asarray(img.convert("L")).ravel().tolist())) > 20  # not a blank page


def test_dependency_maps_are_the_raster_scan_past():
    size, (i, j) = 7, (3, 4)
    maps = plots.dependency_maps(size, (i, j))
    rows, cols = np.mgrid[:size, :size]
    past = (rows < i) | ((rows == i) & (cols <= j))
    np.testing.assert_array_equal(maps["a"], past)
    np.testing.assert_array_equal(maps["left pass"], (rows <= i) & (cols <= j))
    np.testing.assert_array_equal(maps["right pass"], (rows < i) & (cols >= j))


def test_curves_from_a_demo_folder_and_an_mmengine_work_dir(tmp_path, monkeypatch):
    demo = tmp_path / "demo"
    demo.mkdir()
    curves = {"ctx": {"0": [{"step": 10, "accuracy": 0.5, "correctness": 0.06},
                            {"step": 20, "accuracy": 0.6, "correctness": 0.07}],
                      "1": [{"step": 10, "accuracy": 0.4, "correctness": 0.05},
                            {"step": 20, "accuracy": 0.7, "correctness": 0.08}]},
              "arnn": {"0": [{"step": 10, "accuracy": 0.6, "correctness": 0.1}]}}
    runs = [{"kind": k, "seed": int(seed), "points": pts} for k, by_seed in curves.items() for seed, pts in by_seed.items()]
    (demo / "curves.json").write_text(json.dumps({"interval": 10, "runs": runs}))
    assert plots.read_curves(str(demo)) == curves

    work = tmp_path / "arnn"
    (work / "20260101_000000" / "vis_data").mkdir(parents=True)
    lines = [{"loss": 1.0, "step": 5}, {"pan/accuracy": 0.3, "pan/correctness": 0.05, "step": 8},
             {"pan/accuracy": 0.5, "pan/correctness": 0.07, "step": 4}]
    (work / "20260101_000000" / "vis_data" / "scalars.json").write_text("\n".join(map(json.dumps, lines)))
    got = plots.read_curves(str(work))
    assert list(got) == ["arnn"] and [p["step"] for p in got["arnn"]] == [4, 8]
    assert [p["correctness"] for p in got["arnn"]] == [0.07, 0.05]

    out = tmp_path / "curves.png"
    plots.curves_png({**curves, **{"arnn (work dir)": got["arnn"]}}, str(out), levels={"correctness": 0.053})
    assert out.stat().st_size > 0
    # A title longer than the figure is wide wraps and stays inside it.
    title = "PAN on MBG^inv: query a colour, answer the digit, test accuracy and mask correctness along training " * 2
    fig = plots.curves_figure(curves, title=title)
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert "\n" in fig._suptitle.get_text() and 0 <= box.x0 and box.x1 <= fig.bbox.width
    # The demo's folder records the uniform level; `plot curves` draws it (dashed) from there.
    assert plots.read_levels(str(demo)) == {} and plots.read_levels(str(work)) == {}
    (demo / "results.json").write_text(json.dumps({"uniform_correctness": 0.053}))
    assert plots.read_levels(str(demo)) == {"correctness": 0.053}
    fig = plots.curves_figure(curves, levels=plots.read_levels(str(demo)))
    dashed = [ln for ln in fig.axes[1].get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [0.053, 0.053]
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    from arnn_plugins.cli import main

    drawn = []
    monkeypatch.setattr(plots, "curves_png", lambda curves, path, **kw: drawn.append((sorted(curves), path, kw)))
    png = tmp_path / "cli_curves.png"
    assert main(["plot", "curves", str(demo), str(work), "--out", str(png)]) == 0
    assert drawn == [(["arnn", "arnn (" + str(work) + ")", "ctx"], str(png), {"levels": {"correctness": 0.053}})]
    with pytest.raises(FileNotFoundError, match="no curves.json"):
        plots.read_curves(str(tmp_path))
