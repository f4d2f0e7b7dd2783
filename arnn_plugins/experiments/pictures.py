"""Pictures of masks: PAN's layer masks and their product per item (matplotlib), and plain mask grids."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..data import COLOURS

__all__ = ["pan_masks", "mask_products", "mask_panel_figure", "mask_panel_png", "mask_grid_png"]


@torch.no_grad()
def pan_masks(model, images: torch.Tensor, queries: torch.Tensor):
    """Run a PAN (or a :class:`~arnn_plugins.engine.PANModel`) in eval mode.

    Returns ``(pred (B,), masks)`` with ``masks`` a list of per-layer maps
    ``(B, 1, H, W)`` upsampled (bilinear) to the image size.
    """
    pan = getattr(model, "pan", model)
    was = pan.training
    pan.eval()
    p = next(pan.parameters())
    logits, masks = pan(images.to(p.device, p.dtype), queries.to(p.device))
    pan.train(was)
    size = images.shape[-2:]
    up = [F.interpolate(m.float().cpu(), size=size, mode="bilinear", align_corners=False) for m in masks]
    return logits.argmax(1).cpu(), up


def _colour_names(task: str):
    return (lambda q: str(int(q)), lambda a: COLOURS[int(a)]) if task == "color" else (
        lambda q: COLOURS[int(q)], lambda a: str(int(a)))


def _outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean ``(H, W)`` mask."""
    inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    return mask & ~inner


def mask_products(models: Dict[str, Tuple[torch.Tensor, list]]) -> Dict[str, torch.Tensor]:
    """Per model, the product of its layer masks as a share of attention mass per pixel.

    ``models`` as :func:`mask_panel_png` takes it; returns name -> ``(N, H, W)``,
    each item's map summing to 1: the quantity mask correctness scores (the
    share of it inside the target). A uniform mask is ``1 / (H W)`` everywhere.
    """
    out = {}
    for name, (_, masks) in models.items():
        prod = torch.ones_like(masks[0][:, 0])
        for m in masks:
            prod = prod * m[:, 0].float()
        out[name] = prod / prod.sum(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    return out


def mask_panel_figure(images: torch.Tensor, queries: torch.Tensor, answers: torch.Tensor,
                      models: Dict[str, Tuple[torch.Tensor, list]], task: str = "color", scale: int = 2,
                      target_masks: Optional[torch.Tensor] = None):
    """The mask picture as a matplotlib ``Figure`` (see :func:`mask_panel_png`).

    Every layer mask of every model is drawn on one colour scale, 0 to 1 (a
    gate's value), and every product on another, shared by all models and
    items: logarithmic, from a tenth of the uniform level ``1 / (H W)`` to
    the largest share of mass any pixel gets (a linear scale would show a
    near-uniform product as black beside one sharp peak). Each scale has a
    labelled colour bar; the product's marks the uniform level.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    n, _, h, w = images.shape
    qname, aname = _colour_names(task)
    products = mask_products(models)
    uniform = 1.0 / (h * w)
    top = max([float(p.max()) for p in products.values()] + [10 * uniform])
    norm = LogNorm(vmin=uniform / 10, vmax=top)
    columns = 1 + sum(len(m) + 1 for _, m in models.values())
    side = max(1.0, w * scale / 60)
    fig = Figure(figsize=(side * columns + 1.6, side * n + 0.9), dpi=100)
    grid = fig.add_gridspec(n, columns + 1, width_ratios=[1] * columns + [0.12], wspace=0.08, hspace=0.35,
                            left=0.02, right=0.9, top=1 - 0.6 / (side * n + 0.9), bottom=0.03)
    layer_im = prod_im = None
    for r in range(n):
        rgb = images[r].permute(1, 2, 0).float().clamp(0, 1).numpy()
        edge = _outline(target_masks[r].numpy().astype(bool)) if target_masks is not None else None
        ax = fig.add_subplot(grid[r, 0])
        shown = rgb.copy()
        if edge is not None:
            shown[edge] = (0.0, 1.0, 1.0)
        ax.imshow(shown, interpolation="nearest")
        ax.set_title(f"query {qname(queries[r])} \u2192 {aname(answers[r])}", fontsize=8)
        if r == 0:
            ax.text(0.0, 1.32, "input (target outlined)", transform=ax.transAxes, fontsize=8, weight="bold")
        ax.set_axis_off()
        col = 1
        for name, (pred, masks) in models.items():
            for k, m in enumerate(masks):
                ax = fig.add_subplot(grid[r, col])
                layer_im = ax.imshow(m[r, 0].float().numpy(), cmap="gray", vmin=0.0, vmax=1.0,
                                     interpolation="nearest")
                if r == 0:
                    ax.text(0.0, 1.32, f"{name}" if k == 0 else "", transform=ax.transAxes, fontsize=9,
                            weight="bold")
                    ax.set_title(f"layer {k + 1}", fontsize=8)
                ax.set_axis_off()
                col += 1
            ax = fig.add_subplot(grid[r, col])
            prod_im = ax.imshow(products[name][r].numpy().clip(uniform / 10, None), cmap="magma", norm=norm,
                                interpolation="nearest")
            if edge is not None:
                ys, xs = np.nonzero(edge)
                ax.scatter(xs, ys, s=0.6, c="cyan", marker="s", linewidths=0)
            ok = int(pred[r]) == int(answers[r])
            ax.set_title(("product\n" if r == 0 else "") + f"says {aname(pred[r])} {'ok' if ok else 'wrong'}",
                         fontsize=8, color="darkgreen" if ok else "red")
            ax.set_axis_off()
            col += 1
    half = max(1, n // 2)
    if layer_im is not None:
        bar = fig.colorbar(layer_im, cax=fig.add_subplot(grid[:half, columns]))
        bar.set_label("layer mask (gate value)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if prod_im is not None:
        bar = fig.colorbar(prod_im, cax=fig.add_subplot(grid[half:, columns] if n > 1 else grid[:, columns]))
        bar.set_label("product: share of mass per pixel (log)", fontsize=8)
        bar.ax.axhline(uniform, color="cyan", lw=1.5)
        bar.ax.text(1.05, uniform, " uniform", transform=bar.ax.get_yaxis_transform(), fontsize=7,
                    color="teal", va="center")
        bar.ax.tick_params(labelsize=7)
    return fig


def mask_panel_png(path: str, images: torch.Tensor, queries: torch.Tensor, answers: torch.Tensor,
                   models: Dict[str, Tuple[torch.Tensor, list]], task: str = "color", scale: int = 2,
                   target_masks: Optional[torch.Tensor] = None) -> Tuple[int, int]:
    """Write the mask picture: per item, the input, then per model its layer masks and their product.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1]; queries, answers ``(N,)``.
        models: name -> ``(pred (N,), [mask (N, 1, H, W) per layer])`` as
            :func:`pan_masks` gives them (several attention kinds side by side).
        target_masks: optional ``(N, H, W)``; outlined on the input and on
            each product.
        scale: size of a tile (about ``scale`` screen pixels per image pixel).

    Layer masks share one colour scale (0 to 1) and products another (share
    of mass per pixel, :func:`mask_products`), the same for every model, with
    colour bars (:func:`mask_panel_figure`). Returns the PNG's ``(width, height)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = mask_panel_figure(images, queries, answers, models, task=task, scale=scale, target_masks=target_masks)
    canvas = FigureCanvasAgg(fig)
    fig.savefig(path, dpi=fig.dpi)
    return tuple(int(v) for v in canvas.get_width_height())


def mask_grid_png(path: str, images: torch.Tensor, columns: Dict[str, torch.Tensor], scale: int = 4) -> None:
    """Write a PNG: one row per example, columns = input then each named map in [0, 1]."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    names = ["input"] + list(columns)
    maps = [(images - images.amin()) / (images.amax() - images.amin() + 1e-8)] + list(columns.values())
    cell_w, cell_h, top = w * scale + 6, h * scale + 6, 16
    canvas = Image.new("RGB", (cell_w * len(maps), top + cell_h * n), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (name, m) in enumerate(zip(names, maps)):
        draw.text((c * cell_w + 3, 2), name, fill="black")
        for r in range(n):
            arr = (m[r, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)
            tile = Image.fromarray(arr, "L").resize((w * scale, h * scale), Image.NEAREST).convert("RGB")
            canvas.paste(tile, (c * cell_w + 3, top + r * cell_h + 3))
    canvas.save(path)
