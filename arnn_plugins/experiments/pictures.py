"""Pictures of masks: PAN's layer masks and their product per item, and plain mask grids."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..data import COLOURS

__all__ = ["pan_masks", "mask_panel_png", "mask_grid_png"]


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


def mask_panel_png(path: str, images: torch.Tensor, queries: torch.Tensor, answers: torch.Tensor,
                   models: Dict[str, Tuple[torch.Tensor, list]], task: str = "color", scale: int = 2,
                   target_masks: Optional[torch.Tensor] = None) -> Tuple[int, int]:
    """Write the mask picture: per item, the input, then per model its layer masks and their product.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1]; queries, answers ``(N,)``.
        models: name -> ``(pred (N,), [mask (N, 1, H, W) per layer])`` as
            :func:`pan_masks` gives them (several attention kinds side by side).
        target_masks: optional ``(N, H, W)``; outlined on the input.

    The product of the layers' masks (what mask correctness scores),
    normalised to its maximum, is overlaid in red on the dimmed input.
    Returns the picture's ``(width, height)``.
    """
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    qname, aname = _colour_names(task)
    cw, ch, top, label = w * scale + 4, h * scale + 4, 28, 12
    columns = 1 + sum(len(m) + 1 for _, m in models.values())
    canvas = Image.new("RGB", (cw * columns, top + (ch + label) * n), "white")
    draw = ImageDraw.Draw(canvas)

    def tile(arr: np.ndarray) -> Image.Image:
        img = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8))
        return img.resize((w * scale, h * scale), Image.NEAREST)

    col = 0
    draw.text((3, 2), "input", fill="black")
    draw.text((3, 14), "query -> answer", fill="black")
    col += 1
    for name, (_, masks) in models.items():
        for k in range(len(masks)):
            draw.text((col * cw + 3, 2), name if k == 0 else "", fill="black")
            draw.text((col * cw + 3, 14), f"layer {k + 1}", fill="black")
            col += 1
        draw.text((col * cw + 3, 14), "product", fill="black")
        col += 1
    for r in range(n):
        y = top + r * (ch + label)
        rgb = images[r].permute(1, 2, 0).float().numpy()
        shown = rgb.copy()
        if target_masks is not None:
            t = target_masks[r].numpy().astype(bool)
            edge = t & ~(np.roll(t, 1, 0) & np.roll(t, -1, 0) & np.roll(t, 1, 1) & np.roll(t, -1, 1))
            shown[edge] = (0.0, 1.0, 1.0)
        canvas.paste(tile(shown), (2, y + 2))
        draw.text((2, y + ch), f"{qname(queries[r])} -> {aname(answers[r])}", fill="black")
        col = 1
        for name, (pred, masks) in models.items():
            for m in masks:
                g = m[r, 0].numpy()
                canvas.paste(tile(np.repeat(g[..., None], 3, axis=2)), (col * cw + 2, y + 2))
                col += 1
            prod = torch.ones(h, w)
            for m in masks:
                prod = prod * m[r, 0]
            prod = (prod / prod.max().clamp_min(1e-12)).numpy()
            over = 0.35 * rgb.mean(axis=2, keepdims=True).repeat(3, axis=2)
            over[..., 0] = np.maximum(over[..., 0], prod)
            canvas.paste(tile(over), (col * cw + 2, y + 2))
            ok = int(pred[r]) == int(answers[r])
            draw.text((col * cw + 2, y + ch), f"{aname(pred[r])} {'ok' if ok else 'x'}",
                      fill="darkgreen" if ok else "red")
            col += 1
    canvas.save(path)
    return canvas.size


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
