"""The main job (``arnn-plugins demo``) and a small structured-mask task.

:func:`run_pan_demo` trains the PAN attribute network with local 3x3
attention (``ctx``) and with AttentionRNN (``arnn``) on a small MBG set
(generated from the MNIST digits and photographs that installed packages
ship; nothing is downloaded), prints accuracy, mask correctness and time
per step, and writes a PNG of the masks (:func:`mask_panel_png`).

The outline task: images hold the outlines of a few rectangles in noise; the target mask is
their filled interiors. A pixel's label cannot be read off its neighbourhood
(inside and outside look the same away from the edges), but it follows from
the raster-scan past: a scan-line fill along the row. AttentionRNN sees that
past; a local 3x3 attention does not.
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .arnn import AttentionRNN

__all__ = [
    "outline_task",
    "MaskNet",
    "train_mask_model",
    "run_outline_demo",
    "mask_grid_png",
    "mask_panel_png",
    "pan_masks",
    "run_pan_demo",
    "DEMO_SETTINGS",
]


def outline_task(n: int, size: int = 24, seed: int = 0, noise: float = 0.3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rectangle outlines in noise and their filled interiors.

    Returns:
        images ``(n, 1, size, size)`` float, targets ``(n, 1, size, size)`` in {0, 1}.
    """
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, noise, (n, size, size)).astype(np.float32)
    tgt = np.zeros((n, size, size), np.float32)
    for k in range(n):
        taken = np.zeros((size, size), bool)
        for _ in range(rng.integers(1, 3)):
            h, w = rng.integers(5, size // 2 + 2, 2)
            i, j = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            if taken[max(i - 1, 0) : i + h + 1, max(j - 1, 0) : j + w + 1].any():
                continue
            taken[i : i + h, j : j + w] = True
            img[k, i : i + h, [j, j + w - 1]] += 1.0
            img[k, [i, i + h - 1], j : j + w] += 1.0
            tgt[k, i + 1 : i + h - 1, j + 1 : j + w - 1] = 1.0
    return torch.from_numpy(img)[:, None], torch.from_numpy(tgt)[:, None]


class MaskNet(nn.Module):
    """Two 3x3 convs then an attention layer giving mask logits.

    Args:
        kind: ``"local"`` (3x3 conv, the usual local attention) or ``"arnn"``.

    Shape: ``(B, 1, H, W)`` -> logits ``(B, 1, H, W)``.
    """

    def __init__(self, kind: str = "arnn", width: int = 16, backend: str = "auto") -> None:
        super().__init__()
        if kind not in ("local", "arnn"):
            raise ValueError(f"MaskNet: kind must be 'local' or 'arnn', got {kind!r}")
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()
        )
        if kind == "local":
            self.attn = nn.Conv2d(width, 1, 3, padding=1)
        else:
            self.attn = AttentionRNN(width, hidden_channels=16, context_kernel=3, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.features(x))


def _iou(logits: torch.Tensor, target: torch.Tensor) -> float:
    pred = logits > 0
    tgt = target > 0.5
    return ((pred & tgt).sum() / (pred | tgt).sum().clamp(min=1)).item()


def train_mask_model(
    kind: str, data, seconds: float = 30.0, max_steps: int = 2000, batch: int = 16, seed: int = 0, progress=None
) -> Tuple[MaskNet, Dict[str, float]]:
    """Train a :class:`MaskNet` on ``data = (x_train, y_train, x_test, y_test)`` for a time budget."""
    torch.manual_seed(seed)
    model = MaskNet(kind)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xtr, ytr, xte, yte = data
    g = torch.Generator().manual_seed(seed)
    t0, steps = time.perf_counter(), 0
    while steps < max_steps and time.perf_counter() - t0 < seconds:
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        loss = F.binary_cross_entropy_with_logits(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if progress is not None:
            progress(kind, steps, loss.item(), time.perf_counter() - t0)
    elapsed = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        logits = model(xte)
    return model, {
        "iou": _iou(logits, yte),
        "pixel_acc": ((logits > 0) == (yte > 0.5)).float().mean().item(),
        "bce": F.binary_cross_entropy_with_logits(logits, yte).item(),
        "steps": steps,
        "ms_per_step": 1e3 * elapsed / max(steps, 1),
    }


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


def run_outline_demo(out: str = "arnn_demo.png", seconds: float = 30.0, size: int = 24, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Train local attention and ARNN on the outline task; print a table, write the PNG."""
    from tqdm import tqdm

    xtr, ytr = outline_task(512, size, seed)
    xte, yte = outline_task(64, size, seed + 1)
    results, probs = {}, {}
    for kind in ("local", "arnn"):
        with tqdm(total=int(seconds), desc=f"train {kind}", unit="s") as bar:
            def progress(_k, step, loss, el):
                bar.n = min(int(el), bar.total)
                bar.set_postfix(step=step, loss=f"{loss:.3f}")
                bar.refresh()

            model, res = train_mask_model(kind, (xtr, ytr, xte, yte), seconds=seconds, seed=seed, progress=progress)
        results[kind] = res
        with torch.no_grad():
            probs[kind] = torch.sigmoid(model(xte[:6]))
    print(f"{'attention':<10} {'IoU':>6} {'pixel acc':>10} {'steps':>6} {'ms/step':>8}")
    for kind, r in results.items():
        print(f"{kind:<10} {r['iou']:>6.3f} {r['pixel_acc']:>10.3f} {r['steps']:>6d} {r['ms_per_step']:>8.1f}")
    mask_grid_png(out, xte[:6], {"target": yte[:6], "local 3x3": probs["local"], "ARNN": probs["arnn"]})
    print(f"masks written to {out}")
    return results


# --------------------------------------------------------------------------
# The main job: PAN with CTX and with ARNN on MBG


_LAYOUT = dict(num_digits=(2, 3), scale_range=(1.5, 3.0), readout="pool")  # as the small reproduction
DEMO_SETTINGS = {
    # 8-12 minutes on two CPU cores (ARNN's steps take most of it):
    # fewer steps leave both models at the query-blind level.
    "default": dict(size=48, n_train=20000, n_test=500, iters=2000, batch=32, **_LAYOUT),
    # About a minute.
    "quick": dict(size=48, n_train=2000, n_test=300, iters=150, batch=32, **_LAYOUT),
}


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
    from .data import COLOURS

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


def run_pan_demo(quick: bool = False, out: str = "arnn_demo.png", work_dir: str = "work_dirs/demo",
                 device: Optional[str] = None, progress: bool = True, show_items: int = 6,
                 settings: Optional[Dict] = None) -> Dict[str, Dict[str, float]]:
    """Train PAN with ``ctx`` and with ``arnn`` on small MBG; print the table, write the mask PNG.

    ``settings`` overrides :data:`DEMO_SETTINGS` entries (``size``,
    ``n_train``, ``n_test``, ``iters``, ``batch``, ``num_digits``,
    ``scale_range``, ``readout``). Returns per kind the test
    metrics (``accuracy``, ``correctness``, ``sec_per_step``, ...).
    """
    import os

    from .experiments import pan_config, run_pan

    st = dict(DEMO_SETTINGS["quick" if quick else "default"])
    st.update(settings or {})
    t0 = time.perf_counter()
    results, runners = {}, {}
    for kind in ("ctx", "arnn"):
        cfg = pan_config(kind, variant="mbg", size=st["size"], n_train=st["n_train"], n_test=st["n_test"],
                         iters=st["iters"], batch=st["batch"], seed=0, data_seed=0,
                         num_digits=st.get("num_digits"), scale_range=st.get("scale_range"),
                         readout=st.get("readout", "flatten"),
                         work_dir=os.path.join(work_dir, kind), progress=progress, desc=f"train PAN+{kind}")
        results[kind], runners[kind] = run_pan(cfg, device=device)
    wall = time.perf_counter() - t0
    print()
    layout = ""
    if st.get("num_digits"):
        layout = f" with {st['num_digits'][0]}-{st['num_digits'][1]} digits"
    print(f"PAN on MBG ({st['size']} px{layout}, {st['n_train']} training / {st['n_test']} test items, "
          f"{st['iters']} steps of {st['batch']})")
    print(f"{'attention':<10} {'accuracy':>9} {'mask corr.':>11} {'s/step':>8}   per-layer corr., first to last")
    for kind, r in results.items():
        n_layers = sum(k.startswith("correctness_l") for k in r)
        layers = " / ".join(f"{r[f'correctness_l{k}']:.2f}" for k in range(1, n_layers + 1))
        print(f"{kind:<10} {100 * r['accuracy']:>8.1f}% {r['correctness']:>11.3f} {r['sec_per_step']:>8.3f}   "
              f"{layers}")
    from .data import MultiDigitDataset
    from .experiments import query_blind_accuracy, uniform_mask_correctness

    test_set = MultiDigitDataset("mbg", "test", st["n_test"], size=st["size"], seed=0,
                                 **{k: tuple(st[k]) for k in ("num_digits", "scale_range") if st.get(k)})
    blind, uniform = query_blind_accuracy(test_set), uniform_mask_correctness(test_set)
    print(f"{'blind':<10} {100 * blind:>8.1f}% {uniform:>11.3f}            "
          "(without the query: the colour most digits share; a uniform mask)")
    print("(chance: 20% accuracy; correctness = share of the layers' mask product on the queried digit;\n"
          " per layer: each layer's mask alone)")
    test = runners["arnn"].test_dataloader.dataset
    sel = list(range(min(show_items, len(test))))
    batch = [test[i] for i in sel]
    images = torch.stack([b["image"] for b in batch])
    queries = torch.stack([b["query"] for b in batch])
    answers = torch.stack([b["answer"] for b in batch])
    masks = torch.stack([b["mask"] for b in batch])
    panels = {kind.upper(): pan_masks(runners[kind].model, images, queries) for kind in ("ctx", "arnn")}
    mask_panel_png(out, images, queries, answers, panels, target_masks=masks)
    print(f"masks written to {out}  (wall time {wall / 60:.1f} min)")
    for kind in results:
        results[kind]["wall_s"] = wall
    return results
