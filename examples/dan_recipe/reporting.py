"""Metrics, log lines and figures of a run.

* Metrics from one confusion matrix over a whole split: :func:`confusion_matrix`,
  :func:`accuracy_from_confusion`, :func:`balanced_accuracy_from_confusion` (mean
  per-class recall, as the authors' corrected figures are) and
  :func:`summarise_split` (those plus the mean losses).
* :class:`Logger` prints on rank 0 without breaking a live progress bar.
* :func:`plot_confusion` and :func:`plot_attention` draw ``confusion_matrix.png`` and
  ``attention_maps.png`` (matplotlib, imported only when drawing).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .data import dataset_labels

__all__ = [
    "Logger",
    "accuracy_from_confusion",
    "balanced_accuracy_from_confusion",
    "confusion_matrix",
    "epoch_line",
    "per_class_recall",
    "plot_attention",
    "plot_confusion",
    "recipe_description",
    "summarise_split",
    "without_confusion_matrix",
    "write_figures",
]


class Logger:
    """Prints on rank 0 only, through ``tqdm.write`` so that a live bar is not broken.

    Args:
        enabled: Whether this process prints (rank 0).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._said: set[str] = set()

    def __call__(self, msg: str = "") -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def once(self, msg: str) -> None:
        """Print ``msg`` unless this logger printed it before."""
        if msg not in self._said:
            self._said.add(msg)
            self(msg)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def confusion_matrix(
    preds: Tensor | Sequence[int], targets: Tensor | Sequence[int], num_classes: int
) -> Tensor:
    """Counts ``cm[true, predicted]``.

    Args:
        preds: Predicted labels ``(N,)`` (or logits ``(N, num_classes)``, arg-maxed).
        targets: True labels ``(N,)``.
        num_classes: Number of classes.

    Returns:
        ``LongTensor (num_classes, num_classes)``; rows are true classes.

    Raises:
        ValueError: On mismatched lengths or labels outside ``[0, num_classes)``.

    Example:
        >>> confusion_matrix([0, 1, 1], [0, 1, 0], 2).tolist()
        [[1, 1], [0, 1]]
    """
    p = torch.as_tensor(preds)
    t = torch.as_tensor(targets)
    if p.dim() == 2:
        p = p.argmax(1)
    p, t = p.long().flatten().cpu(), t.long().flatten().cpu()
    if p.shape != t.shape:
        raise ValueError(
            f"confusion_matrix: expected as many predictions as targets, got {p.numel()} and {t.numel()}"
        )
    for name, v in (("preds", p), ("targets", t)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            raise ValueError(
                f"confusion_matrix: expected {name} in [0, {num_classes}), got range "
                f"[{int(v.min())}, {int(v.max())}]"
            )
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(
        num_classes, num_classes
    )


def _check_cm(cm: Tensor) -> Tensor:
    cm = torch.as_tensor(cm)
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {tuple(cm.shape)}")
    return cm.double()


def accuracy_from_confusion(cm: Tensor) -> float:
    """Overall accuracy, ``trace / total``; ``nan`` for an empty matrix."""
    c = _check_cm(cm)
    total = float(c.sum())
    return float(c.diagonal().sum()) / total if total > 0 else float("nan")


def per_class_recall(cm: Tensor) -> Tensor:
    """Recall of every class (``diag / row sum``); ``nan`` for classes without samples."""
    c = _check_cm(cm)
    support = c.sum(1)
    return torch.where(support > 0, c.diagonal() / support.clamp_min(1), torch.full_like(support, float("nan")))


def balanced_accuracy_from_confusion(cm: Tensor) -> float:
    """Mean per-class recall over the classes that have samples.

    Classes with no true samples (an all-zero row) are excluded from the mean,
    because their recall is undefined; predictions *into* such a class still
    lower the recall of the true classes. ``nan`` if no class has samples.

    Example:
        >>> balanced_accuracy_from_confusion(torch.tensor([[8, 0], [1, 1]]))
        0.75
    """
    r = per_class_recall(cm)
    r = r[~torch.isnan(r)]
    return float(r.mean()) if r.numel() else float("nan")


def summarise_split(cm: Tensor, loss_sums: Tensor, count: int) -> dict[str, Any]:
    """Accuracy, balanced accuracy (from the confusion matrix) and mean losses of a split.

    Args:
        cm: Confusion matrix ``(N, N)``, rows true classes.
        loss_sums: Sums over the samples of ``(loss, ce, affinity, partition)``.
        count: Number of samples.

    Returns:
        ``accuracy``, ``balanced_accuracy``, ``loss``, ``ce``, ``affinity``,
        ``partition``, ``samples`` and ``confusion_matrix`` (nested lists).
        Accuracies are ``nan`` when ``count`` is 0.
    """
    cm_cpu = cm.detach().cpu().to(torch.int64)
    n = max(int(count), 1)
    return {
        "accuracy": accuracy_from_confusion(cm_cpu),
        "balanced_accuracy": balanced_accuracy_from_confusion(cm_cpu),
        "loss": float(loss_sums[0]) / n,
        "ce": float(loss_sums[1]) / n,
        "affinity": float(loss_sums[2]) / n,
        "partition": float(loss_sums[3]) / n,
        "samples": int(count),
        "confusion_matrix": cm_cpu.tolist(),
    }


def without_confusion_matrix(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` without its ``confusion_matrix`` entry (for the per-epoch history)."""
    return {k: v for k, v in metrics.items() if k != "confusion_matrix"}


def epoch_line(
    epoch: int,
    epochs: int,
    train: Mapping[str, Any],
    val: Mapping[str, Any] | None,
    lr: float,
    seconds: float,
    improved: bool,
) -> str:
    """The log line of one epoch: training losses and accuracies, validation, lr, time."""
    msg = (
        f"[epoch {epoch}/{epochs}] train loss {train['loss']:.4f} "
        f"(ce {train['ce']:.4f} af {train['affinity']:.4f} pt {train['partition']:.4f}) "
        f"acc {train['accuracy']:.4f} bacc {train['balanced_accuracy']:.4f}"
    )
    if val is not None and val["samples"] > 0:
        msg += f" | val loss {val['loss']:.4f} acc {val['accuracy']:.4f} bacc {val['balanced_accuracy']:.4f}"
        if val.get("head_overlap") is not None:
            msg += f" overlap {val['head_overlap']:.3f}"
        if val.get("head_norm") is not None:
            msg += f" head norm {val['head_norm']:.3g}"
    elif val is not None:
        msg += " | val: no readable image"
    return msg + f" | lr {lr:.2e} | {seconds:.1f}s" + (" *" if improved else "")


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


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
) -> None:
    """Grid: one test face per row (different classes first); columns: face, head maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        labels = dataset_labels(dataset)
    except TypeError:
        labels = None
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


# --------------------------------------------------------------------------------------
# The recipe in words
# --------------------------------------------------------------------------------------


def recipe_description(cfg: Mapping[str, Any], sched_interval: str, amp_dtype: torch.dtype | None) -> list[str]:
    """Every recipe choice that changes results, in words (logged and saved)."""
    t = [
        f"optimizer {cfg['optimizer']} lr {cfg['lr']} momentum {cfg['momentum']} "
        f"weight decay {cfg['weight_decay']} (centres: {cfg['center_weight_decay']})",
        f"scheduler {cfg['scheduler']} stepped per {sched_interval}"
        + (f" (step {cfg['step_size']}, gamma {cfg['gamma']})" if cfg["scheduler"] == "step" else "")
        + (f" (gamma {cfg['gamma']})" if cfg["scheduler"] == "exponential" else "")
        + (
            f" (warmup {cfg['warmup_epochs']} epochs, floor {cfg['min_lr_ratio']})"
            if cfg["scheduler"] == "cosine"
            else ""
        ),
        f"augmentation preset {cfg['augment']!r}, image size {cfg['image_size']}",
        f"class-balanced sampler {'on' if cfg['balanced_sampler'] else 'off'}",
        f"feature loss {cfg['affinity']} x {cfg['lambda_af']}"
        + (f", {cfg['num_centers']} centres" if cfg["num_centers"] else ""),
        f"partition loss {cfg['partition']}"
        + (" (normalized)" if cfg.get("partition_normalize") else "")
        + f" x {cfg['lambda_pt']}",
        f"{cfg['num_heads']} attention heads",
        f"label smoothing {cfg['label_smoothing']}",
        f"model selection on validation {cfg['select_metric']} (val fraction {cfg['val_fraction']})",
        f"backbone weights {cfg['backbone_weights'] or 'none (from scratch)'}",
        f"amp {amp_dtype if amp_dtype is not None else 'off'}, seed {cfg['seed']}, "
        f"deterministic {cfg['deterministic']}",
    ]
    return t


def write_figures(
    final: Mapping[str, Any],
    out_dir: Path,
    model: nn.Module,
    test_ds: Dataset,
    class_names: Sequence[str],
    device: torch.device,
    *,
    rows: int,
    log: Logger,
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
        plot_attention(model, test_ds, class_names, att_path, device, rows=rows)
        files["attention_maps"] = str(att_path)
    except Exception as exc:  # a figure must never cost the run's results
        log(f"warning: attention figure failed: {type(exc).__name__}: {exc}")
    return files
