"""One epoch of training and one pass of evaluation.

Both accumulate a confusion matrix and the sums of the losses on the device
(:class:`RunningMetrics`) and sum them over the ranks at the end, so the metrics
of a split are computed once, over all of its samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import dan_layers.functional as DF

from .distributed import Dist
from .errors import UserError
from .model import DANWithLosses
from .reporting import summarise_split

__all__ = ["RunningMetrics", "TrainStep", "evaluate", "train_one_epoch"]


class RunningMetrics:
    """Confusion matrix and summed losses over the batches of one pass of a split.

    Args:
        num_classes: Rows and columns of the confusion matrix.
        device: Where to accumulate.
    """

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.loss_sums = torch.zeros(4, dtype=torch.float64, device=device)
        #: sums over the samples of (head overlap, heads' mean feature norm, samples with maps)
        self.head_sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.overlap_defined = True

    def update(self, out: Mapping[str, Tensor], labels: Tensor) -> None:
        """Add a batch: ``out`` of :class:`~dan_recipe.model.DANWithLosses` and its labels.

        With ``maps`` and ``raw_heads`` in ``out`` (``details=True``) it also sums each
        sample's :func:`dan_layers.functional.head_overlap` and its heads' mean L2 norm.
        """
        n = self.cm.shape[0]
        pred = out["logits"].argmax(1)
        self.cm += torch.bincount(labels * n + pred, minlength=n * n).view(n, n)
        parts = torch.stack([out["loss"].detach(), out["ce"], out["affinity"], out["partition"]])
        self.loss_sums += parts.double() * labels.shape[0]
        if "maps" in out:
            maps, raw = out["maps"], out["raw_heads"]
            self.overlap_defined = maps.shape[1] >= 2
            if self.overlap_defined:
                self.head_sums[0] += DF.head_overlap(maps, reduction="none", validate=False).double().sum()
            self.head_sums[1] += raw.double().norm(dim=-1).mean(dim=1).sum()
            self.head_sums[2] += labels.shape[0]

    def summary(self, ranks: Dist) -> dict[str, Any]:
        """Sum over the ranks, then accuracy, balanced accuracy, mean losses (and head measures)."""
        ranks.all_reduce_(self.cm)
        ranks.all_reduce_(self.loss_sums)
        ranks.all_reduce_(self.head_sums)
        out = summarise_split(self.cm, self.loss_sums, int(self.cm.sum()))
        if float(self.head_sums[2]) > 0:
            seen = float(self.head_sums[2])
            out["head_overlap"] = float(self.head_sums[0]) / seen if self.overlap_defined else None
            out["head_norm"] = float(self.head_sums[1]) / seen
        return out


@dataclass
class TrainStep:
    """What a training step needs besides the batch.

    Attributes:
        module: The model with its losses, wrapped in DDP under torchrun.
        optimizer: Steps every batch.
        scaler: ``torch.amp.GradScaler`` (disabled unless float16 autocast).
        scheduler: Stepped every batch when ``per_step_schedule``, else by the caller.
        per_step_schedule: Whether the schedule advances per step (cosine).
        autocast: Context factory (``contextlib.nullcontext`` without ``--amp``).
        device: Where batches go.
        channels_last: Whether images go channels-last.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler
    per_step_schedule: bool
    autocast: Callable[[], Any]
    device: torch.device
    channels_last: bool


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    x, y = batch
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def train_one_epoch(
    step: TrainStep, loader: DataLoader, metrics: RunningMetrics, ranks: Dist, *, desc: str, progress: bool
) -> tuple[int, int]:
    """Train over ``loader`` once.

    A batch with fewer than 2 readable images (BatchNorm needs 2) is skipped on
    every rank alike. The progress bar shows detached numbers only.

    Returns:
        ``(steps taken, batches skipped)``.

    Raises:
        UserError: On a non-finite loss (with the parts of the loss).
    """
    from tqdm import tqdm

    steps = skipped = 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for batch in bar:
        if not ranks.all_true(batch is not None and batch[1].shape[0] >= 2, step.device):
            skipped += 1
            continue
        x, y = _to_device(batch, step.device, step.channels_last)
        with step.autocast():
            out = step.module(x, y)
        loss = out["loss"]
        if not torch.isfinite(loss.detach()):
            parts = ", ".join(f"{k} {float(out[k]):.4g}" for k in ("ce", "affinity", "partition"))
            raise UserError(
                f"--lr {step.optimizer.param_groups[0]['lr']:.3g}: non-finite loss ({parts}); try a lower --lr"
            )
        step.optimizer.zero_grad(set_to_none=True)
        step.scaler.scale(loss).backward()
        step.scaler.step(step.optimizer)
        step.scaler.update()
        if step.per_step_schedule:
            step.scheduler.step()
        steps += 1
        metrics.update(out, y)
        if progress:
            bar.set_postfix(
                loss=f"{float(loss.detach()):.3f}", lr=f"{step.optimizer.param_groups[0]['lr']:.2e}"
            )
    bar.close()
    return steps, skipped


@torch.no_grad()
def evaluate(
    net: DANWithLosses,
    loader: DataLoader,
    ranks: Dist,
    *,
    device: torch.device,
    autocast: Callable[[], Any],
    channels_last: bool = False,
) -> dict[str, Any]:
    """Metrics of ``net`` in eval mode over every sample of ``loader`` (all ranks together).

    Returns:
        :func:`~dan_recipe.reporting.summarise_split`'s dict, plus ``head_overlap``
        (:func:`dan_layers.functional.head_overlap` of the spatial maps, mean over
        the samples; ``None`` with one head) and ``head_norm`` (the mean L2 norm of
        a head's feature vector before the log-softmax); ``samples`` is 0 (and the
        accuracies ``nan``) when no image of the split could be read.
    """
    was_training = net.training
    net.eval()
    metrics = RunningMetrics(net.model.num_classes, device)
    try:
        for batch in loader:
            if batch is None:
                continue
            x, y = _to_device(batch, device, channels_last)
            with autocast():
                out = net(x, y, details=True)
            metrics.update(out, y)
    finally:
        net.train(was_training)
    return metrics.summary(ranks)
