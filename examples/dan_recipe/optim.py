"""Optimizer and learning-rate schedule of a run, and what resuming may change about them.

The loss centres get their own parameter group (weight decay
``--center-weight-decay``, 0 by default: decaying them shrinks the variance that
the affinity loss divides by).

Extending a run (``--resume`` with more ``--epochs``): the per-epoch schedules
(``step``, ``exponential``, ``none``) are functions of the epoch alone, so an
extended run is exactly the run that had asked for more epochs from the start.
The ``cosine`` schedule is fixed by its length (it reaches its floor at the last
step), so it cannot be extended or shortened: :func:`check_epochs_on_resume`
refuses and says what to do instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .errors import UserError
from .model import DANWithLosses

__all__ = ["WarmupCosine", "build_optimizer", "build_scheduler", "check_epochs_on_resume"]


_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def build_optimizer(cfg: Mapping[str, Any], net: DANWithLosses) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over the network and (in a group of their own) the loss centres.

    The fused implementation (one kernel for all parameters) is used where this torch
    has it for the parameters' device: on the CPU it takes the optimizer step of the
    reference DAN from ~120 ms to ~30 ms (one thread), a sixth of a demo step.
    """
    groups = [{"params": list(net.model.parameters()), "weight_decay": cfg["weight_decay"]}]
    centres = net.loss_parameters()
    if centres:
        groups.append({"params": centres, "weight_decay": cfg["center_weight_decay"]})
    name = cfg["optimizer"]
    if name not in _OPTIMIZERS:
        raise UserError(f"--optimizer: expected sgd|adam|adamw, got {name!r}")
    kwargs: dict[str, Any] = {"lr": cfg["lr"]}
    if name == "sgd":
        kwargs["momentum"] = cfg["momentum"]
    try:
        return _OPTIMIZERS[name](groups, **kwargs, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / torch
        return _OPTIMIZERS[name](groups, **kwargs)


class WarmupCosine:
    """LR factor at step s: linear warmup, then cosine from 1 to ``floor`` at step ``total``.

    A callable object (not a closure), so that ``LambdaLR.state_dict`` saves its
    numbers with the checkpoint.
    """

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup = max(int(warmup), 0)
        self.total = max(int(total), 1)
        self.floor = float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(
    cfg: Mapping[str, Any], opt: torch.optim.Optimizer, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler, str]:
    """The schedule of ``--scheduler``, and when to call its ``step()``: ``"epoch"`` or ``"step"``."""
    name = cfg["scheduler"]
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, cfg["step_size"], cfg["gamma"]), "epoch"
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, cfg["gamma"]), "epoch"
    if name == "cosine":
        total = cfg["epochs"] * steps_per_epoch
        warm = round(cfg["warmup_epochs"] * steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warm, total, cfg["min_lr_ratio"])), "step"
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0), "epoch"
    raise UserError(f"--scheduler: expected step|exponential|cosine|none, got {name!r}")


def check_epochs_on_resume(cfg: Mapping[str, Any], saved_epochs: int, done: int, path: str) -> None:
    """Refuse an ``--epochs`` that resuming the checkpoint at ``path`` cannot honour.

    Args:
        cfg: The run's configuration (``scheduler`` from the checkpoint, ``epochs``
            possibly from the flag).
        saved_epochs: ``--epochs`` the checkpoint's run was started with.
        done: Epochs the checkpoint has completed.
        path: The checkpoint, for the message.

    Raises:
        UserError: Fewer epochs than already done; or another length for a cosine run.
    """
    epochs = cfg["epochs"]
    if epochs < done:
        raise UserError(
            f"--epochs {epochs}: expected at least the {done} epochs that {path} has already trained"
        )
    if cfg["scheduler"] == "cosine" and epochs != saved_epochs:
        raise UserError(
            f"--epochs {epochs}: expected {saved_epochs}, the length of the cosine schedule that {path} "
            f"was trained with; a cosine schedule cannot be lengthened or shortened on resume (its "
            f"learning rate reaches its floor at epoch {saved_epochs}). Train anew with --epochs {epochs} "
            "(--overwrite or another --out), or use a per-epoch --scheduler (step, exponential, none), "
            "which --resume can extend"
        )
