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

__all__ = ["plot_attention", "plot_confusion", "write_head_figure", "write_run_figures"]


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

_PANEL_INCHES = 1.9


def _scaled(heat: np.ndarray) -> np.ndarray:
    top = float(heat.max())
    return heat / top if top > 0 else np.zeros_like(heat)


def write_head_figure(
    path: Path,
    crop: np.ndarray,
    attention: np.ndarray,
    gradcam: np.ndarray,
    *,
    predicted: str,
    target_name: str,
) -> None:
    """Write the PNG of one face.

    Args:
        path: The ``.png`` to write.
        crop: ``(S, S, 3)`` ``uint8`` face, as the model saw it.
        attention: ``(K, S, S)`` attention maps at the crop's resolution.
        gradcam: ``(K, S, S)`` Grad-CAM++ maps at the crop's resolution.
        predicted: Title of the crop, e.g. ``"predicted: Happy 0.91"``.
        target_name: The class explained by the Grad-CAM++ maps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = attention.shape[0]
    fig, axes = plt.subplots(
        2, heads + 1, figsize=(_PANEL_INCHES * (heads + 1), _PANEL_INCHES * 2 + 0.7), squeeze=False
    )
    rows = (
        (attention, predicted, "attention"),
        (gradcam, f"explained: {target_name}", f"Grad-CAM++: {target_name}"),
    )
    for row, (maps, title, kind) in enumerate(rows):
        axes[row, 0].imshow(crop)
        axes[row, 0].set_title(title, fontsize=8)
        for k in range(heads):
            ax = axes[row, k + 1]
            ax.imshow(crop)
            ax.imshow(_scaled(maps[k]), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            ax.set_title(f"head {k + 1}\n{kind}", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout(pad=0.4)
    fig.savefig(path, dpi=100)
    plt.close(fig)
