"""The recipe's figures: a run's confusion matrix and attention maps, and ``explain.py``'s picture of a face.

Drawn with matplotlib (imported only when drawing, on the Agg backend).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

__all__ = [
    "COARSE_CELLS",
    "head_figure",
    "plot_attention",
    "plot_confusion",
    "write_head_figure",
    "write_run_figures",
]


def plot_confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm_t = torch.tensor(cm, dtype=torch.float64)
    rows = cm_t.sum(1, keepdim=True).clamp_min(1)
    frac = (cm_t / rows).numpy()
    n = len(cm)
    names = list(class_names) if len(class_names) == n else [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.7 * n), dpi=110)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{int(cm_t[i, j])}\n{frac[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if frac[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def plot_attention(
    model: nn.Module,
    dataset: Dataset,
    class_names: Sequence[str],
    path: Path,
    device: torch.device,
    rows: int = 6,
    labels: Sequence[int] | None = None,
) -> None:
    """Grid: one test face per row (different classes first, by ``labels``); columns: face, head maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen: list[int] = []
    seen: set[int] = set()
    order = range(len(dataset))
    if labels is not None:
        for i in order:  # first one face of every class, then fill up
            if labels[i] not in seen:
                seen.add(labels[i])
                chosen.append(i)
            if len(chosen) >= rows:
                break
    for i in order:
        if len(chosen) >= rows:
            break
        if i not in chosen:
            chosen.append(i)
    items = [(i, dataset[i]) for i in chosen]
    items = [(i, s) for i, s in items if s is not None]
    if not items:
        return
    x = torch.stack([s[0] for _, s in items]).to(device)
    y = [int(s[1]) for _, s in items]
    was_training = model.training
    model.eval()
    try:
        logits, _, _ = model(x)
        maps = model.attention_maps(x)  # (B, K, h, w)
    finally:
        model.train(was_training)
    pred = logits.argmax(1).tolist()
    map_hw = tuple(maps.shape[-2:])
    maps = F.interpolate(maps.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    k = maps.shape[1]
    fig, axes = plt.subplots(
        len(items), k + 1, figsize=(1.6 * (k + 1), 1.6 * len(items)), dpi=100, squeeze=False
    )

    def name(c: int) -> str:
        return class_names[c] if c < len(class_names) else str(c)

    for r in range(len(items)):
        img = x[r].float().cpu()
        img = (img - img.amin()) / (img.amax() - img.amin()).clamp_min(1e-8)
        img = img.permute(1, 2, 0).numpy()
        if img.shape[2] == 1:
            img = img[..., 0]
        axes[r][0].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r][0].set_title(f"{name(y[r])} -> {name(pred[r])}", fontsize=7)
        for h in range(k):
            m = maps[r, h].cpu()
            m = (m - m.amin()) / (m.amax() - m.amin()).clamp_min(1e-8)
            axes[r][h + 1].imshow(img, cmap="gray" if img.ndim == 2 else None)
            axes[r][h + 1].imshow(m.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if r == 0:
                axes[r][h + 1].set_title(f"head {h}", fontsize=8)
        for a in axes[r]:
            a.axis("off")
    fig.suptitle(
        f"spatial attention per head ({map_hw[0]}x{map_hw[1]} maps upsampled, each min-max scaled); "
        "title: true -> predicted",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_run_figures(
    final: Mapping[str, Any],
    out_dir: Path,
    model: nn.Module,
    test_ds: Dataset,
    labels: Sequence[int] | None,
    class_names: Sequence[str],
    device: torch.device,
    *,
    rows: int,
    log: Callable[[str], None],
) -> dict[str, str]:
    """``confusion_matrix.png`` of the reported test metrics ``final`` and ``attention_maps.png``.

    Returns:
        ``{"confusion_matrix": path, "attention_maps": path}`` for the files written;
        a failing attention figure is logged, never fatal.
    """
    files = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    cm_path = out_dir / "confusion_matrix.png"
    epoch = "" if final.get("epoch") is None else f", epoch {final['epoch']}"
    title = f"test{epoch}: acc {final['accuracy']:.3f}, balanced {final['balanced_accuracy']:.3f}"
    plot_confusion(final["confusion_matrix"], class_names, cm_path, title)
    files["confusion_matrix"] = str(cm_path)
    att_path = out_dir / "attention_maps.png"
    try:
        plot_attention(model, test_ds, class_names, att_path, device, rows=rows, labels=labels)
        files["attention_maps"] = str(att_path)
    except Exception as exc:  # a figure must never cost the run's results
        log(f"warning: attention figure failed: {type(exc).__name__}: {exc}")
    return files


# --------------------------------------------------------------------------------------
# explain.py's figure
# --------------------------------------------------------------------------------------

_PANEL_INCHES = 1.7
#: Maps with at most this many cells a side cannot show facial regions (a 48 px face: 2 x 2).
COARSE_CELLS = 2
#: One colour map per row, so that the two kinds of map never look alike.
_ROW_STYLES = (("attention", "inferno"), ("Grad-CAM++", "viridis"))


def write_head_figure(
    path: Path,
    crop: np.ndarray,
    attention: np.ndarray,
    gradcam: np.ndarray,
    *,
    predicted: str,
    target_name: str,
) -> None:
    """Write :func:`head_figure` as a PNG (arguments as there, ``path`` first)."""
    import matplotlib.pyplot as plt

    fig = head_figure(crop, attention, gradcam, predicted=predicted, target_name=target_name)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def head_figure(
    crop: np.ndarray,
    attention: np.ndarray,
    gradcam: np.ndarray,
    *,
    predicted: str,
    target_name: str,
) -> Any:
    """``explain.py``'s picture of one face: the crop once, then each head's two maps, each row on one scale.

    Left: the crop as the model saw it (its input size, drawn pixel for pixel). Then
    one column per head, numbered from 0 as in ``train_dan.py``'s
    ``attention_maps.png``. Top row: the head's spatial attention map; bottom row:
    Grad-CAM++ of the head's attended features for ``target_name``. Every map is
    drawn at its own resolution (one square per feature-map cell, with the cell
    grid) over the face, and each row shares one colour scale, with its bar, so
    heads can be compared. A map of :data:`COARSE_CELLS` cells a side or fewer is
    labelled as too coarse to show regions. A caption says what each row shows.

    Args:
        crop: ``(S, S, 3)`` ``uint8`` face, as the model saw it.
        attention: ``(K, h, w)`` attention maps (the feature map's cells).
        gradcam: ``(K, h, w)`` Grad-CAM++ maps.
        predicted: What the model said, e.g. ``"predicted: Happy 0.91"``.
        target_name: The class the Grad-CAM++ maps explain.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, cells_h, cells_w = attention.shape
    size = crop.shape[0]
    coarse = max(cells_h, cells_w) <= COARSE_CELLS
    fig = plt.figure(figsize=(_PANEL_INCHES * (heads + 2.3), _PANEL_INCHES * 2 + 1.2))
    grid = fig.add_gridspec(2, heads + 2, width_ratios=[1.6] + [1] * heads + [0.08], left=0.02, right=0.94,
                            top=0.86, bottom=0.2, wspace=0.12, hspace=0.35)  # fmt: skip
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(crop, interpolation="nearest")
    ax.set_title(f"model input, {size} x {size} px\n{predicted}", fontsize=9)
    ax.set_axis_off()
    gray = crop.astype(np.float32).mean(axis=2)
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)
    for row, (maps, (kind, cmap)) in enumerate(zip((attention, gradcam), _ROW_STYLES, strict=True)):
        top = float(maps.max()) if maps.size and float(maps.max()) > 0 else 1.0
        image = None
        for k in range(heads):
            ax = fig.add_subplot(grid[row, k + 1])
            ax.imshow(gray, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            image = ax.imshow(maps[k], cmap=cmap, vmin=0.0, vmax=top, alpha=0.6, extent=extent,
                              interpolation="nearest")  # fmt: skip
            for i in range(1, cells_h):
                ax.axhline(i * size / cells_h - 0.5, color="white", lw=0.5, alpha=0.6)
            for j in range(1, cells_w):
                ax.axvline(j * size / cells_w - 0.5, color="white", lw=0.5, alpha=0.6)
            what = kind if row == 0 else f"{kind}\nfor {target_name}"  # a line of its own: names run long
            title = f"head {k}: {what}\n{cells_h}x{cells_w} cells" + (
                ", too coarse for regions" if coarse else ""
            )
            ax.set_title(title, fontsize=7.5)
            ax.set_axis_off()
        bar = fig.colorbar(image, cax=fig.add_subplot(grid[row, heads + 1]))
        bar.ax.tick_params(labelsize=7)
        bar.set_label("attention weight" if row == 0 else "Grad-CAM++", fontsize=8)
    fig.suptitle(f"Where each of the {heads} heads looks", fontsize=11)
    fig.text(
        0.02, 0.03,
        "Top: each head's spatial attention map, the weight the head gives each cell of the feature map before "
        "it pools the channels.\nBottom: Grad-CAM++ of each head's attended features for "
        f"{target_name}: the cells whose features raise that class's score. One colour scale per row; "
        "heads numbered as in train_dan.py's attention_maps.png.",
        fontsize=8, va="bottom", wrap=True,
    )  # fmt: skip
    return fig
