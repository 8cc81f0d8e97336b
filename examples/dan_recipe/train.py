"""Training and evaluating DAN: the run, one epoch, evaluation, resume, ``--eval-only``, DDP.

``train_dan.py`` resolves the configuration (:mod:`dan_recipe.config`) and calls
:func:`run`. A training run (:func:`train`):

1. :func:`read_resume_point`: continue from ``--resume`` (the checkpoint's recipe
   wins over flags, except the options in
   :data:`~dan_recipe.config.RUNTIME_OPTIONS`) or start afresh, in an ``--out``
   that holds no other run unless ``--overwrite``;
2. :func:`start_process`: threads, device, process group, determinism, seeds, autocast;
3. :func:`~dan_recipe.data.build_run_data` and :func:`build_training`: data, model
   and criterion, loaders, optimizer, schedule (restored when resuming);
4. :func:`run_epoch` for every epoch: :func:`train_one_epoch`, :func:`evaluate` on
   the validation split, the best model so far, ``last.pt`` (and, on improvement,
   ``best.pt`` and ``model.safetensors`` + ``config.json``);
5. :func:`finish`: test the reported (best) and the last model, write ``metrics.json``
   and the figures.

Under ``torchrun`` the process group uses NCCL on CUDA and Gloo on the CPU, and
what DistributedDataParallel wraps is :class:`DANTraining`: the model *and* the
criterion, whose affinity centres are parameters that every rank must keep equal.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

import dan_layers
import dan_layers.functional as DF

from .config import (
    DATA_KEYS,
    DEFAULTS,
    MODEL_KEYS,
    RESUME_KEEPS_UNLESS_FLAGGED,
    RUNTIME_OPTIONS,
    as_plain_values,
)
from .data import Loaders, RunData, build_loaders, build_run_data, dataset_labels
from .figures import write_run_figures
from .model import (
    CHECKPOINT_FORMAT,
    DAN,
    ModelInfo,
    ResNet18Features,
    infer_official_config,
    is_our_checkpoint,
    load_backbone_weights,
    load_model_state,
    load_official_checkpoint,
    read_checkpoint,
    save_pretrained,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD
from .utils import (
    AutoThreads,
    CheckpointError,
    InputError,
    Logger,
    UsageError,
    pick_device,
    rng_state,
    save_torch,
    set_rng_state,
    set_threads,
    stderr_is_terminal,
    summarise_split,
    write_json,
)

__all__ = [
    "AMP_WITHOUT_BF16_WARNING",
    "RUN_FILES",
    "DANTraining",
    "Dist",
    "Run",
    "RunningMetrics",
    "TrainStep",
    "Training",
    "WarmupCosine",
    "build_model_with_losses",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "evaluate_checkpoint",
    "run",
    "run_epoch",
    "train",
    "train_one_epoch",
]

#: Files a run writes into ``--out`` (an ``--out`` holding any of them holds a run).
RUN_FILES = (
    "last.pt",
    "best.pt",
    "model.safetensors",
    "config.json",
    "metrics.json",
    "confusion_matrix.png",
    "attention_maps.png",
)
#: What ``--eval-only`` writes (it never touches the checkpoints).
EVAL_FILES = ("metrics.json", "confusion_matrix.png", "attention_maps.png")


def run(cfg: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """Train (or, with ``--eval-only``, evaluate) as ``cfg`` says; return the metrics dict.

    Process-wide torch settings the run changes are put back afterwards.

    Raises:
        RecipeError: A mistake in the flags, files or folders (one line each).
    """
    ranks = Dist()
    current = Run(cfg, sources, ranks, Logger(ranks.main))
    with _ProcessSettings():
        try:
            return evaluate_checkpoint(current) if cfg["eval_only"] else train(current)
        except KeyboardInterrupt:
            if not cfg["eval_only"]:
                current.log(
                    f"interrupted: {cfg['out']}/last.pt holds the last completed epoch; "
                    f"continue with --resume --out {cfg['out']}"
                )
            raise
        finally:
            ranks.close()


# --------------------------------------------------------------------------------------
# A training run
# --------------------------------------------------------------------------------------


def train(current: Run) -> dict[str, Any]:
    """A training run (see the module docstring); returns the metrics dict."""
    cfg = current.cfg
    resume = read_resume_point(current)
    if resume is not None and resume[0]["epoch"] >= cfg["epochs"]:
        done = _completed_run(current, resume[1])
        if done is not None:
            return done
    prepare_out_dir(current, resuming=resume is not None)
    start_process(current)
    data = build_run_data(cfg, flagged={k for k, v in current.sources.items() if v == "flag"})
    training = build_training(current, data, resume)
    env = environment(cfg, current.device, current.ranks, current.per_rank)
    log_header(current, training, env)
    if resume is not None:  # restore RNG last, after everything that draws random numbers was built
        states = resume[0]["rng"]
        if len(states) == current.ranks.world:
            set_rng_state(states[current.ranks.rank])
        else:
            current.log("warning: RNG states saved for another world size; reseeding")
    if current.ranks.main:
        current.out_dir.mkdir(parents=True, exist_ok=True)
    progress = bool(cfg["progress"]) and current.ranks.main and stderr_is_terminal()
    for epoch in range(training.start_epoch + 1, cfg["epochs"] + 1):
        if current.auto_threads is not None:
            current.auto_threads.update()
        run_epoch(current, training, epoch, progress=progress)
        stop = cfg["stop_after_epoch"]
        if stop is not None and stop <= epoch < cfg["epochs"]:
            current.log(f"stopping after epoch {epoch} (--stop-after-epoch); continue with --resume")
            return _partial_metrics(current, training, env)
    if training.skipped_batches:
        current.log(f"skipped {training.skipped_batches} batches with fewer than 2 readable images")
    return finish(current, training, env)


def run_epoch(current: Run, training: Training, epoch: int, *, progress: bool) -> None:
    """Train one epoch, evaluate the validation split, keep the best model, checkpoint."""
    cfg, ranks, step = current.cfg, current.ranks, training.step
    t_epoch = time.perf_counter()
    if hasattr(training.loaders.train_sampler, "set_epoch"):
        training.loaders.train_sampler.set_epoch(epoch)
    training.net.train()
    lr = step.optimizer.param_groups[0]["lr"]  # at the start of the epoch
    metrics = RunningMetrics(len(training.data.class_names), current.device)
    steps, skipped = train_one_epoch(
        step, training.loaders.train, metrics, ranks, desc=f"epoch {epoch}/{cfg['epochs']}", progress=progress
    )
    training.global_step += steps
    training.skipped_batches += skipped
    # DDP syncs gradients, not BatchNorm statistics: give every rank rank 0's, so that
    # all ranks evaluate (and rank 0 saves) one and the same model.
    ranks.broadcast_buffers_(training.net)
    if training.sched_interval == "epoch":
        step.scheduler.step()
    train_m = metrics.summary(ranks)
    seconds = time.perf_counter() - t_epoch
    training.train_seconds += seconds
    val_m = _evaluate(current, training, training.loaders.val) if training.loaders.val is not None else None
    if val_m is not None and val_m["samples"] == 0:
        current.log.once(
            f"warning: none of the {len(training.data.val)} validation images could be read; "
            "the last epoch's model is reported"
        )
    usable = val_m is not None and val_m["samples"] > 0
    score = val_m[cfg["select_metric"]] if usable else float(epoch)  # no validation: the latest wins
    improved = score > training.best_metric
    if improved:
        training.best_metric, training.best_epoch = score, epoch
        training.best_state = {k: v.detach().cpu().clone() for k, v in training.net.state_dict().items()}
    training.history.append(
        {
            "epoch": epoch,
            "global_step": training.global_step,
            "lr": lr,
            "seconds": seconds,
            "threads": torch.get_num_threads(),
            "train": _without_cm(train_m),
            "val": _without_cm(val_m) if val_m is not None else None,
            "best": improved,
        }
    )
    current.log(epoch_line(epoch, cfg["epochs"], train_m, val_m, lr, seconds, improved))
    save_epoch(current, training, epoch, improved)


# --------------------------------------------------------------------------------------
# One epoch, and one pass of evaluation
# --------------------------------------------------------------------------------------


@dataclass
class TrainStep:
    """What a training step needs besides the batch.

    Attributes:
        module: The model with its criterion (:class:`DANTraining`), in DDP under torchrun.
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


def train_one_epoch(
    step: TrainStep, loader: DataLoader, metrics: RunningMetrics, ranks: Dist, *, desc: str, progress: bool
) -> tuple[int, int]:
    """Train over ``loader`` once; return ``(steps taken, batches skipped)``.

    A batch with fewer than 2 readable images (BatchNorm needs 2) is skipped on
    every rank alike. The progress bar shows detached numbers only.

    Raises:
        UsageError: On a non-finite loss (names ``--lr`` and the parts of the loss).
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
            lr = step.optimizer.param_groups[0]["lr"]
            raise UsageError(f"non-finite loss ({parts}); try a lower --lr", subject=f"--lr {lr:.3g}")
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
    net: DANTraining,
    loader: DataLoader,
    ranks: Dist,
    *,
    device: torch.device,
    autocast: Callable[[], Any],
    channels_last: bool = False,
) -> dict[str, Any]:
    """Metrics of ``net`` in eval mode over every sample of ``loader`` (all ranks together).

    Returns:
        :func:`~dan_recipe.utils.summarise_split`'s dict, plus ``head_overlap``
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


def _to_device(batch: Any, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    x, y = batch
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


class RunningMetrics:
    """Confusion matrix and summed losses over the batches of one pass of a split, on the device.

    Summed over the ranks once, at the end (:meth:`summary`), so the metrics of a
    split are computed over all of its samples.

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
        """Add a batch: the output of :class:`DANTraining` and its labels.

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


# --------------------------------------------------------------------------------------
# The model with its criterion (what DDP wraps), optimizer and schedule
# --------------------------------------------------------------------------------------


class DANTraining(nn.Module):
    """The model and its criterion in one module: what training steps and DDP wraps.

    The affinity centres are parameters of the criterion; holding both in one module
    lets DistributedDataParallel keep them equal on every rank.
    ``forward(images, labels)`` returns a dict: ``loss`` (the total, to
    backpropagate), ``ce``, ``affinity``, ``partition`` (detached parts) and ``logits``
    (detached); with ``details=True`` also the heads' ``maps`` and ``raw_heads``
    (detached). The losses are computed in float32 even under autocast.

    State-dict keys: ``model.*`` and ``criterion.affinity.centers``. Checkpoints
    written before 0.2 named the centres ``affinity.centers``; they are moved on load.

    Args:
        model: The network.
        criterion: Its losses.
    """

    def __init__(self, model: DAN, criterion: dan_layers.DANLoss) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.register_load_state_dict_pre_hook(_move_old_centre_keys)

    def forward(self, images: Tensor, labels: Tensor, *, details: bool = False) -> dict[str, Tensor]:
        if not details:
            logits, feature_map, heads = self.model(images)
            out = self.criterion(logits, feature_map, heads, labels)
            return {**out._asdict(), "logits": logits.detach()}
        d = self.model.forward_details(images)
        out = self.criterion(d["logits"], d["feature_map"], d["heads"], labels)
        return {**out._asdict(), **{k: d[k].detach() for k in ("logits", "maps", "raw_heads")}}


def _move_old_centre_keys(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load pre-hook: ``affinity.*`` (checkpoints before 0.2) -> ``criterion.affinity.*``."""
    for key in [k for k in state if k.startswith(prefix + "affinity.")]:
        state[prefix + "criterion." + key[len(prefix) :]] = state.pop(key)


def _with_current_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A :class:`DANTraining` state dict with the keys of today (see :func:`_move_old_centre_keys`)."""
    moved = dict(state)
    _move_old_centre_keys(nn.Module(), moved, "")
    return moved


def build_model_with_losses(cfg: Mapping[str, Any], num_classes: int) -> DANTraining:
    """A fresh :class:`~dan_recipe.model.DAN` and its criterion, as the run configuration says.

    The settings are checked here, at the edge, so that each mistake names its flag.

    Raises:
        UsageError: Settings that do not fit together.
    """
    if cfg.get("partition_normalize") and cfg["partition"] == "none":
        raise UsageError(
            "expected a partition loss to normalise, got --partition none", subject="--partition-normalize"
        )
    centres = cfg["num_centers"]
    if centres is not None:
        if cfg["affinity"] == "none":
            raise UsageError(
                "expected no centres without a feature loss (--affinity none)",
                subject=f"--num-centers {centres}",
            )
        if cfg["affinity"] == "center" and centres != num_classes:
            raise UsageError(
                f"the center loss has one centre per class: expected {num_classes}",
                subject=f"--num-centers {centres}",
            )
        if centres < num_classes:
            raise UsageError(
                f"expected at least one centre per class ({num_classes})", subject=f"--num-centers {centres}"
            )
    if not 0.0 <= cfg["label_smoothing"] < 1.0:
        raise UsageError("expected a value in [0, 1)", subject=f"--label-smoothing {cfg['label_smoothing']}")
    model = DAN(num_classes=num_classes, num_heads=cfg["num_heads"])
    criterion = dan_layers.DANLoss(
        num_classes,
        ResNet18Features.out_channels,
        lambda_af=cfg["lambda_af"],
        lambda_pt=cfg["lambda_pt"],
        affinity=cfg["affinity"],
        partition=cfg["partition"],
        normalize=bool(cfg.get("partition_normalize")),
        num_centers=centres,
        label_smoothing=cfg["label_smoothing"],
    )
    return DANTraining(model, criterion)


_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def build_optimizer(cfg: Mapping[str, Any], net: DANTraining) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over the model and, in a group of their own, the loss centres.

    The centres' weight decay is ``--center-weight-decay`` (0 by default: decaying
    them shrinks the variance that the affinity loss divides by). The fused
    implementation (one kernel for all parameters) is used where this torch has it:
    on the CPU it takes the optimizer step of the reference DAN from ~120 ms to
    ~30 ms (one thread), a sixth of a demo step.
    """
    groups = [{"params": list(net.model.parameters()), "weight_decay": cfg["weight_decay"]}]
    centres = list(net.criterion.parameters())
    if centres:
        groups.append({"params": centres, "weight_decay": cfg["center_weight_decay"]})
    kwargs: dict[str, Any] = {"lr": cfg["lr"]}
    if cfg["optimizer"] == "sgd":
        kwargs["momentum"] = cfg["momentum"]
    try:
        return _OPTIMIZERS[cfg["optimizer"]](groups, **kwargs, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / torch
        return _OPTIMIZERS[cfg["optimizer"]](groups, **kwargs)


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
    """The schedule of ``--scheduler``, and when to call its ``step()``: ``"epoch"`` or ``"step"``.

    The per-epoch schedules (``step``, ``exponential``, ``none``) are functions of the
    epoch alone, so ``--resume`` with more ``--epochs`` extends a run exactly as if it
    had asked for them from the start. ``cosine`` reaches its floor at the last step
    of the planned length, so it cannot be extended (:func:`check_epochs_on_resume`).
    """
    name = cfg["scheduler"]
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, cfg["step_size"], cfg["gamma"]), "epoch"
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, cfg["gamma"]), "epoch"
    if name == "cosine":
        total = cfg["epochs"] * steps_per_epoch
        warm = round(cfg["warmup_epochs"] * steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warm, total, cfg["min_lr_ratio"])), "step"
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0), "epoch"  # "none"


def check_epochs_on_resume(cfg: Mapping[str, Any], saved_epochs: int, done: int, path: str) -> None:
    """Refuse an ``--epochs`` that resuming the checkpoint at ``path`` cannot honour.

    Raises:
        UsageError: Fewer epochs than already done; or another length for a cosine run.
    """
    epochs = cfg["epochs"]
    if epochs < done:
        raise UsageError(
            f"expected at least the {done} epochs that {path} has already trained", subject=f"--epochs {epochs}"
        )
    if cfg["scheduler"] == "cosine" and epochs != saved_epochs:
        raise UsageError(
            f"expected {saved_epochs}, the length of the cosine schedule that {path} was trained with; a "
            f"cosine schedule cannot be lengthened or shortened on resume (its learning rate reaches its "
            f"floor at epoch {saved_epochs}). Train anew with --epochs {epochs} (--overwrite or another "
            "--out), or use a per-epoch --scheduler (step, exponential, none), which --resume can extend",
            subject=f"--epochs {epochs}",
        )


# --------------------------------------------------------------------------------------
# Setting up: the run, its process, its model, data and optimizer
# --------------------------------------------------------------------------------------


@dataclass
class Run:
    """The configuration of a run and the process it runs in (filled in by :func:`start_process`)."""

    cfg: dict[str, Any]
    sources: dict[str, str]
    ranks: Dist
    log: Logger
    t_start: float = field(default_factory=time.perf_counter)
    device: torch.device = torch.device("cpu")
    autocast: Callable[[], Any] = contextlib.nullcontext
    amp_dtype: torch.dtype | None = None
    use_scaler: bool = False
    per_rank: int = 1
    auto_threads: AutoThreads | None = None
    #: Wall time of the earlier sessions of a resumed run.
    earlier_seconds: float = 0.0

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg["out"])

    def elapsed(self) -> float:
        """Wall time of the run so far, over all of its sessions."""
        return self.earlier_seconds + time.perf_counter() - self.t_start


@dataclass
class Training:
    """Everything a training run carries from epoch to epoch (most of it checkpointed)."""

    net: DANTraining
    step: TrainStep
    loaders: Loaders
    data: RunData
    sched_interval: str
    start_epoch: int = 0
    global_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    skipped_batches: int = 0
    backbone_report: dict[str, list[str]] | None = None


def prepare_out_dir(current: Run, *, resuming: bool) -> None:
    """Refuse an ``--out`` that holds another run, unless resuming it or ``--overwrite``.

    With ``--overwrite``, rank 0 removes that run's files first (for ``--eval-only``
    only the metrics and figures are guarded and replaced, never checkpoints).

    Raises:
        UsageError: ``--out`` holds run files and neither flag was given.
    """
    eval_only = current.cfg["eval_only"]
    guarded = EVAL_FILES if eval_only else RUN_FILES
    present = [name for name in guarded if (current.out_dir / name).exists()]
    if not present or resuming:
        return
    if not current.cfg["overwrite"]:
        what = (
            "--overwrite to replace them" if eval_only else "--resume to continue it, --overwrite to replace it"
        )
        raise UsageError(
            f"expected an output directory without a run, got one holding {', '.join(present)}; "
            f"pass {what}, or another --out",
            subject=f"--out {current.out_dir}",
        )
    if current.ranks.main:
        for name in present:
            (current.out_dir / name).unlink(missing_ok=True)
        current.log(f"--overwrite: removed {', '.join(present)} from {current.out_dir}")


def start_process(current: Run) -> None:
    """Threads, device, process group, determinism, seeds and autocast of this process."""
    cfg, ranks = current.cfg, current.ranks
    if cfg["threads"] == "auto":
        current.auto_threads = AutoThreads(current.log, adapt=cfg["num_workers"] == 0)
    else:
        set_threads(cfg["threads"], current.log)
    current.device = pick_device(cfg["device"], ranks.local_rank if ranks.enabled else 0)
    ranks.init(current.device)
    if cfg["deterministic"]:  # deterministic algorithms (warn only where none exists), no cuDNN autotuning
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
    _seed_everything(cfg["seed"] + ranks.rank)
    current.autocast, current.amp_dtype, current.use_scaler = amp_setup(cfg, current.device, current.log)
    if ranks.world > 1 and cfg["batch_size"] % ranks.world:
        raise UsageError(
            f"expected a multiple of the world size {ranks.world}", subject=f"--batch-size {cfg['batch_size']}"
        )
    current.per_rank = max(1, cfg["batch_size"] // ranks.world)


def build_training(current: Run, data: RunData, resume: tuple[dict[str, Any], Path] | None) -> Training:
    """Model with criterion, loaders, optimizer, schedule and scaler; restored when resuming."""
    cfg = current.cfg
    net = build_model_with_losses(cfg, len(data.class_names))
    report = None
    if cfg["backbone_weights"] and resume is None:
        report = _load_backbone(current, net)
    net.to(current.device)
    if cfg["channels_last"]:
        net.to(memory_format=torch.channels_last)
    ranks = current.ranks
    loaders = build_loaders(data, cfg, current.device, current.per_rank, rank=ranks.rank, world=ranks.world)
    optimizer = build_optimizer(cfg, net)
    scheduler, interval = build_scheduler(cfg, optimizer, max(1, len(loaders.train or ())))
    scaler = torch.amp.GradScaler(current.device.type, enabled=current.use_scaler)
    step = TrainStep(
        net,
        optimizer,
        scaler,
        scheduler,
        interval == "step",
        current.autocast,
        current.device,
        bool(cfg["channels_last"]),
    )
    training = Training(net, step, loaders, data, interval, backbone_report=report)
    if resume is not None:
        restore(current, training, *resume)
    step.module = ranks.wrap(net, current.device)
    return training


def _load_backbone(current: Run, net: DANTraining) -> dict[str, list[str]]:
    path = current.cfg["backbone_weights"]
    flag = f"--backbone-weights {path}"
    try:
        report = load_backbone_weights(net.model, path, strict=current.cfg["backbone_strict"])
    except FileNotFoundError:
        raise InputError(
            "expected a ResNet-18 weights file, got a path that does not exist", subject=flag
        ) from None
    except CheckpointError as exc:
        raise CheckpointError(exc.reason, subject=flag) from None
    current.log(
        f"backbone weights {path}: dropped {report['dropped']}, missing {report['missing']}, "
        f"unexpected {report['unexpected']}"
    )
    return report


def log_header(current: Run, training: Training, env: dict[str, Any]) -> None:
    """The run's opening lines: data (and where each split came from), every config value with its source."""
    cfg, log, data = current.cfg, current.log, training.data
    log(
        f"DAN training: preset {cfg['preset']}, data {cfg['data']}, {len(data.class_names)} classes "
        f"{data.class_names}"
    )
    if cfg["preset_reason"]:
        log(f"  recipe: {cfg['preset_reason']}")
    n_val = len(data.val) if data.val is not None else 0
    log(f"  samples: train {len(data.train or ())}, val {n_val}, test {len(data.test)}")
    for split in ("train", "val", "test"):
        if split in data.origins:
            log(f"  {split}: {data.origins[split]}")
    if data.val is None:
        log(f"  validation: {data.no_validation}; the last epoch's model is reported")
    for split, names in data.classes_without_samples.items():
        if names:
            log(f"  {split} split: no images of {', '.join(names)} (their confusion-matrix rows stay empty)")
    log("  config (value [source]):")
    for k in sorted(cfg):
        log(f"    {k} = {cfg[k]!r} [{current.sources.get(k, 'derived')}]")
    log(
        f"  env: torch {env['torch']}, device {current.device}, world {current.ranks.world}, batch "
        f"{env['batch_size']} ({current.per_rank}/rank), threads {env['threads']}, amp {current.amp_dtype}, "
        f"scheduler per {training.sched_interval}"
    )


# --------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------


def read_resume_point(current: Run) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint to continue from, with the run's configuration merged from it.

    Returns:
        ``(checkpoint, path)``, or ``None`` to start afresh (``--resume`` without a
        ``last.pt`` yet, or no ``--resume``).

    Raises:
        InputError: A ``--resume PATH`` that does not exist.
        UsageError: A file that is not one of our training checkpoints, or an
            ``--epochs`` the checkpoint's schedule cannot follow.
    """
    cfg, sources = current.cfg, current.sources
    if not cfg["resume"]:
        return None
    path = current.out_dir / "last.pt" if cfg["resume"] == "auto" else Path(cfg["resume"])
    flag = f"--resume {path}"
    if not path.exists():
        if cfg["resume"] != "auto":
            raise InputError("expected a checkpoint file, got a path that does not exist", subject=flag)
        current.log(f"--resume: no {path} yet, starting a new run")
        return None
    ckpt = read_checkpoint(path, "--resume")
    if not is_our_checkpoint(ckpt):
        raise UsageError(
            "not a train_dan.py checkpoint (use --backbone-weights or --eval-only --checkpoint "
            "for other files)",
            subject=flag,
        )
    if "optimizer" not in ckpt:
        raise UsageError(
            f"it holds the model only; resume from {path.parent / 'last.pt'}, which holds the "
            "optimizer, schedule and RNG states too",
            subject=flag,
        )
    for k, v in dict(ckpt["args"]).items():
        if k not in cfg or (k in RUNTIME_OPTIONS and k not in RESUME_KEEPS_UNLESS_FLAGGED):
            continue
        if sources.get(k) == "flag":
            if k in RUNTIME_OPTIONS:
                continue
            if cfg[k] != v:
                current.log(f"warning: --{k.replace('_', '-')} {cfg[k]} ignored: resuming keeps {v}")
        cfg[k], sources[k] = v, "checkpoint"
    check_epochs_on_resume(cfg, int(ckpt["args"]["epochs"]), int(ckpt["epoch"]), str(path))
    current.earlier_seconds = float(ckpt.get("elapsed_seconds", 0.0))
    return ckpt, path


def _completed_run(current: Run, path: Path) -> dict[str, Any] | None:
    """``--resume`` of a run that has trained every epoch: its record, untouched; ``None`` if unfinished."""
    record = current.out_dir / "metrics.json"
    try:
        import json

        metrics = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # stopped between the last epoch and the test: finish it
    if not metrics.get("complete"):
        return None
    epochs = current.cfg["epochs"]
    current.log(
        f"--resume: the run in {current.out_dir} is complete ({epochs} of {epochs} epochs; "
        f"results in {record}); nothing changed. Pass a larger --epochs to train it further"
        + (" (a cosine schedule cannot be extended)" if current.cfg["scheduler"] == "cosine" else "")
    )
    return metrics


def restore(current: Run, training: Training, ckpt: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's model, optimizer, schedule, scaler and progress into ``training``."""
    step, log = training.step, current.log
    load_model_state(training.net, _with_current_keys(ckpt["model"]), f"checkpoint {path}")
    step.optimizer.load_state_dict(ckpt["optimizer"])
    step.scheduler.load_state_dict(ckpt["scheduler"])
    step.scaler.load_state_dict(ckpt["scaler"])
    training.start_epoch = int(ckpt["epoch"])
    training.global_step = int(ckpt["global_step"])
    training.best_metric = float(ckpt["best_metric"])
    training.best_epoch = int(ckpt["best_epoch"])
    training.history = list(ckpt["history"])
    training.train_seconds = sum(float(h.get("seconds", 0.0)) for h in training.history)
    if int(ckpt.get("world_size", 1)) != current.ranks.world:
        log(
            f"warning: checkpoint was written with world size {ckpt.get('world_size')}, now "
            f"{current.ranks.world}: the data order (and so the result) will differ"
        )
    best_path = path.parent / "best.pt"
    if training.best_epoch > 0 and best_path.exists():
        best = read_checkpoint(best_path, "--resume (its best.pt)")
        if int(best.get("epoch", -1)) == training.best_epoch:
            training.best_state = {k: v.clone() for k, v in _with_current_keys(best["model"]).items()}
    if training.best_epoch > 0 and training.best_state is None:
        log(f"warning: best.pt for epoch {training.best_epoch} not found next to {path}")
    log(f"resumed from {path} at epoch {training.start_epoch} (step {training.global_step})")


def _model_checkpoint(current: Run, training: Training, epoch: int) -> dict[str, Any]:
    """``best.pt``: the weights and what inference needs (classes, image size, normalisation, data)."""
    net, cfg = training.net, current.cfg
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "epoch": epoch,
        "args": as_plain_values(cfg),
        "class_names": list(training.data.class_names),
        "num_classes": len(training.data.class_names),
        "preprocessing": {
            "image_size": cfg["image_size"],
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
    }


def save_epoch(current: Run, training: Training, epoch: int, improved: bool) -> None:
    """``last.pt``, the history so far in ``metrics.json``; on improvement ``best.pt`` and the release files.

    ``last.pt`` holds everything ``--resume`` needs (optimizer, schedule, scaler,
    every rank's RNG state); ``best.pt`` only what inference and ``--eval-only``
    need, a third of the size; ``model.safetensors`` + ``config.json`` are the same
    model without pickle. ``best.pt`` is written before ``last.pt``: a crash in
    between leaves ``last.pt`` one epoch behind, and resuming redoes that epoch.
    """
    rng = current.ranks.gather(rng_state())  # collective: every rank takes part
    if not current.ranks.main:
        return
    step, out = training.step, current.out_dir
    model_ckpt = _model_checkpoint(current, training, epoch)
    if improved:
        save_torch(model_ckpt, out / "best.pt")
        info = ModelInfo(
            tuple(training.data.class_names),
            current.cfg["image_size"],
            tuple(model_ckpt["preprocessing"]["mean"]),
            tuple(model_ckpt["preprocessing"]["std"]),
            training.net.model.num_heads,
            "dan-layers",
            epoch,
            str(out),
            current.cfg["data"],
        )
        save_pretrained(training.net.model, info, out)
    save_torch(
        {
            **model_ckpt,
            "loss_centers": _centres(training.net),
            "optimizer": step.optimizer.state_dict(),
            "scheduler": step.scheduler.state_dict(),
            "scaler": step.scaler.state_dict(),
            "global_step": training.global_step,
            "best_metric": training.best_metric,
            "best_epoch": training.best_epoch,
            "select_metric": current.cfg["select_metric"],
            "history": training.history,
            "world_size": current.ranks.world,
            "rng": rng,
            "elapsed_seconds": current.elapsed(),
        },
        out / "last.pt",
    )
    write_json(
        {"config": as_plain_values(current.cfg), "epochs": training.history, "complete": False},
        out / "metrics.json",
    )


def _centres(net: DANTraining) -> Tensor | None:
    affinity = net.criterion.affinity
    return affinity.centers.detach().cpu() if affinity is not None else None


# --------------------------------------------------------------------------------------
# The end of a run
# --------------------------------------------------------------------------------------


def _partial_metrics(current: Run, training: Training, env: dict[str, Any]) -> dict[str, Any]:
    """The record of a run stopped by ``--stop-after-epoch`` (no test evaluation)."""
    partial = {
        "complete": False,
        "config": as_plain_values(current.cfg),
        "config_sources": current.sources,
        "class_names": list(training.data.class_names),
        "env": env,
        "epochs": training.history,
        "best_epoch": training.best_epoch,
        "train_seconds": training.train_seconds,
        "skipped_batches": training.skipped_batches,
    }
    if current.ranks.main:
        write_json(partial, current.out_dir / "metrics.json")
    current.ranks.barrier()
    return partial


def selected_by(current: Run, training: Training) -> str:
    """Which model the run reports, and why."""
    data = training.data
    if data.val is None:
        return f"last epoch ({data.no_validation})"
    if not any(e["val"] and e["val"]["samples"] > 0 for e in training.history):
        return f"last epoch (none of the {len(data.val)} validation images could be read)"
    return f"best validation {current.cfg['select_metric']}"


def _evaluate(current: Run, training: Training, loader: Any) -> dict[str, Any]:
    return evaluate(
        training.net,
        loader,
        current.ranks,
        device=current.device,
        autocast=current.autocast,
        channels_last=bool(current.cfg["channels_last"]),
    )


def evaluate_best_and_last(
    current: Run, training: Training
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor] | None]:
    """Test metrics of the reported model (best on validation) and of the last epoch.

    Returns:
        ``(final, last, last_state)``: when the reported model is not the last one,
        the network is left holding the reported weights and ``last_state`` holds
        the last epoch's, to be put back once the results are written.
    """
    net, test_loader = training.net, training.loaders.test
    last_epoch = training.history[-1]["epoch"] if training.history else 0
    last = _evaluate(current, training, test_loader)
    last["epoch"] = last_epoch
    last_state = None
    if training.best_state is not None and training.best_epoch != last_epoch:
        last_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict(training.best_state)
        final = _evaluate(current, training, test_loader)
        final["epoch"] = training.best_epoch
    else:
        final = dict(last)
        final["epoch"] = last_epoch if training.best_state is None else training.best_epoch
    final["selected_by"] = selected_by(current, training)
    return final, last, last_state


def finish(current: Run, training: Training, env: dict[str, Any]) -> dict[str, Any]:
    """Test, then ``metrics.json``, the figures (of the reported model) and the summary lines."""
    cfg, ranks, net = current.cfg, current.ranks, training.net
    t_eval = time.perf_counter()
    final, last, last_state = evaluate_best_and_last(current, training)
    eval_seconds = time.perf_counter() - t_eval
    centers = _centres(net)
    metrics: dict[str, Any] = {
        "complete": True,
        "config": as_plain_values(cfg),
        "config_sources": current.sources,
        "class_names": list(training.data.class_names),
        "num_classes": len(training.data.class_names),
        "classes_without_samples": training.data.classes_without_samples,
        "data_origins": training.data.origins,
        "env": env,
        "tricks": recipe_description(cfg, training.sched_interval, current.amp_dtype),
        "epochs": training.history,
        "best_epoch": training.best_epoch,
        "best_val": {
            "metric": cfg["select_metric"],
            "value": training.best_metric if training.best_epoch else None,
        },
        "final": final,
        "last": last,
        "train_seconds": training.train_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": current.elapsed(),
        "skipped_batches": training.skipped_batches,
        "backbone_weights_report": training.backbone_report,
        "ddp": {
            "world_size": ranks.world,
            "centers_sha256": ranks.gather(_sha256({"c": centers}) if centers is not None else None),
            "model_sha256": ranks.gather(_sha256(net.model.state_dict())),
        },
        "files": {},
    }
    if ranks.main:
        metrics["files"] = _write_results(current, net.model, training.data, metrics)
        metrics["total_seconds"] = current.elapsed()
        write_json(metrics, current.out_dir / "metrics.json")
    if last_state is not None:
        net.load_state_dict(last_state)
    _log_summary(current, metrics, env)
    ranks.barrier()
    return metrics


def _write_results(current: Run, model: DAN, data: RunData, metrics: dict[str, Any]) -> dict[str, str]:
    out = current.out_dir
    files = {"metrics": str(out / "metrics.json")}
    if current.cfg["plots"]:
        files.update(
            write_run_figures(
                metrics["final"],
                out,
                model,
                data.test,
                dataset_labels(data.test),
                data.class_names,
                current.device,
                rows=current.cfg["viz_faces"],
                log=current.log,
            )
        )
    for name in ("last.pt", "best.pt", "model.safetensors"):
        if (out / name).exists():
            files[name.split(".")[0]] = str(out / name)
    return files


def _log_summary(current: Run, metrics: dict[str, Any], env: dict[str, Any]) -> None:
    cfg, log, final, last = current.cfg, current.log, metrics["final"], metrics["last"]
    log("")
    log(f"==== DAN, preset {cfg['preset']}, data {cfg['data']}: summary ====")
    log(
        f"test accuracy {final['accuracy']:.4f}, balanced accuracy {final['balanced_accuracy']:.4f} "
        f"({final['samples']} test images; model of epoch {final['epoch']}/{last['epoch']}, "
        f"chosen by {final['selected_by']})"
    )
    log(f"last epoch: test accuracy {last['accuracy']:.4f}, balanced {last['balanced_accuracy']:.4f}")
    log(
        f"time: train {metrics['train_seconds']:.1f}s, final evaluation {metrics['eval_seconds']:.1f}s, "
        f"total {metrics['total_seconds']:.1f}s, all sessions of the run (device {current.device}, "
        f"{env['threads']} threads, world size {current.ranks.world})"
    )
    if metrics["files"]:
        log("wrote: " + ", ".join(metrics["files"].values()))


# --------------------------------------------------------------------------------------
# --eval-only
# --------------------------------------------------------------------------------------


def evaluate_checkpoint(current: Run) -> dict[str, Any]:
    """``--eval-only``: test metrics of ``--checkpoint`` (default ``<--out>/best.pt``), ours or the authors'.

    One of our checkpoints brings its model and loss settings and, unless flags say
    otherwise, which test set it was trained for (:data:`~dan_recipe.MODEL_KEYS`,
    :data:`~dan_recipe.DATA_KEYS`); its class names map the test split by name.
    An authors' checkpoint (yaoing/DAN key layout) brings its head and class counts;
    it holds no loss centres, so no affinity loss is reported for it. Writes
    ``metrics.json`` and the figures; never a checkpoint.

    Raises:
        RecipeError: A missing or unreadable checkpoint, an ``--out`` holding results,
            data mistakes, or a model whose classes do not fit the test set.
    """
    cfg, log, ranks = current.cfg, current.log, current.ranks
    path = Path(cfg["checkpoint"]) if cfg["checkpoint"] else current.out_dir / "best.pt"
    if not cfg["checkpoint"]:
        if not path.exists():
            raise UsageError(
                f"expected --checkpoint PATH, or --out holding a run's best.pt; there is no {path}",
                subject="--eval-only",
            )
        cfg["checkpoint"], current.sources["checkpoint"] = str(path), "--out's best.pt"
    prepare_out_dir(current, resuming=False)
    raw = read_checkpoint(path, "--checkpoint")
    ours = is_our_checkpoint(raw)
    if ours:
        saved = dict(raw["args"])
        for k in MODEL_KEYS:  # a key newer than the checkpoint keeps its default
            cfg[k], current.sources[k] = saved.get(k, DEFAULTS[k]), "checkpoint"
        for k in DATA_KEYS:
            if current.sources.get(k) != "flag" and k in saved:
                cfg[k], current.sources[k] = saved[k], "checkpoint"
    start_process(current)
    names = list(raw["class_names"]) if ours else None
    data = build_run_data(cfg, class_names=names, whose=f"the checkpoint {path}")
    net, kind = _checkpoint_net(current, raw, path, len(data.class_names))
    net.to(current.device)
    loader = build_loaders(data, cfg, current.device, current.per_rank, rank=ranks.rank, world=ranks.world).test
    log(
        f"evaluating {kind} checkpoint {path} ({cfg['num_heads']} heads, {len(data.class_names)} classes) "
        f"on {cfg['data']} test ({len(data.test)} images)"
    )
    for split, missing in data.classes_without_samples.items():
        if missing:
            log(f"  {split} split: no images of {', '.join(missing)} (their confusion-matrix rows stay empty)")
    t0 = time.perf_counter()
    m = evaluate(
        net,
        loader,
        ranks,
        device=current.device,
        autocast=current.autocast,
        channels_last=bool(cfg["channels_last"]),
    )
    m["checkpoint"], m["checkpoint_kind"] = str(path), kind
    epoch = raw.get("epoch", raw.get("iter")) if isinstance(raw, Mapping) else None
    m["epoch"] = int(epoch) if isinstance(epoch, (int, float)) else None
    metrics: dict[str, Any] = {
        "complete": True,
        "eval_only": True,
        "config": as_plain_values(cfg),
        "config_sources": current.sources,
        "class_names": list(data.class_names),
        "num_classes": len(data.class_names),
        "classes_without_samples": data.classes_without_samples,
        "env": environment(cfg, current.device, ranks, current.per_rank),
        "final": m,
        "eval_seconds": time.perf_counter() - t0,
        "total_seconds": time.perf_counter() - current.t_start,
        "files": {},
    }
    if ranks.main:
        metrics["files"] = {"metrics": str(current.out_dir / "metrics.json")}
        if cfg["plots"]:
            metrics["files"].update(
                write_run_figures(
                    m,
                    current.out_dir,
                    net.model,
                    data.test,
                    dataset_labels(data.test),
                    data.class_names,
                    current.device,
                    rows=cfg["viz_faces"],
                    log=log,
                )
            )
        write_json(metrics, current.out_dir / "metrics.json")
    log(
        f"test accuracy {m['accuracy']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}, "
        f"loss {m['loss']:.4f} ({m['samples']} images); written to {current.out_dir}/metrics.json"
    )
    log("confusion matrix (rows true, columns predicted):")
    for name, row in zip(data.class_names, m["confusion_matrix"], strict=False):
        log(f"  {name:>12s} " + " ".join(f"{v:5d}" for v in row))
    ranks.barrier()
    return metrics


def _checkpoint_net(current: Run, raw: Any, path: Path, num_classes: int) -> tuple[DANTraining, str]:
    """The model with criterion, loaded from an ``--eval-only`` checkpoint; and what kind it was."""
    cfg, flag = current.cfg, f"--checkpoint {path}"
    ours = is_our_checkpoint(raw)
    try:
        shape = {"num_heads": int(raw["args"]["num_heads"])} if ours else infer_official_config(raw)
    except CheckpointError as exc:
        raise CheckpointError(exc.reason, subject=flag) from None
    cfg["num_heads"] = shape["num_heads"]
    if not ours:
        if shape["num_classes"] != num_classes:
            hint = " (--num-classes 7 or 8 picks AffectNet's)" if cfg["data"] == "affectnet" else ""
            raise UsageError(
                f"expected a model of the {num_classes} classes of the {cfg['data']} test set{hint}, "
                f"got one of {shape['num_classes']} classes",
                subject=flag,
            )
        cfg["affinity"] = "none"  # their files hold no centres: no affinity loss to report
        current.sources["affinity"] = "authors' checkpoint has no centres"
    net = build_model_with_losses(cfg, num_classes)
    try:
        if ours:
            load_model_state(net, _with_current_keys(raw["model"]), f"checkpoint {path}")
        else:
            load_official_checkpoint(net.model, raw)
    except CheckpointError as exc:
        raise CheckpointError(exc.reason, subject=flag) from None
    return net, "train_dan.py" if ours else "authors' (yaoing/DAN layout)"


# --------------------------------------------------------------------------------------
# Log lines and the run record
# --------------------------------------------------------------------------------------


def _without_cm(metrics: Mapping[str, Any]) -> dict[str, Any]:
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
        f"[epoch {epoch}/{epochs}] train loss {train['loss']:.4f} (ce {train['ce']:.4f} af "
        f"{train['affinity']:.4f} pt {train['partition']:.4f}) acc {train['accuracy']:.4f} "
        f"bacc {train['balanced_accuracy']:.4f}"
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


def recipe_description(cfg: Mapping[str, Any], sched_interval: str, amp_dtype: torch.dtype | None) -> list[str]:
    """Every recipe choice that changes results, in words (logged and saved)."""
    sched = cfg["scheduler"]
    return [
        f"optimizer {cfg['optimizer']} lr {cfg['lr']} momentum {cfg['momentum']} "
        f"weight decay {cfg['weight_decay']} (centres: {cfg['center_weight_decay']})",
        f"scheduler {sched} stepped per {sched_interval}"
        + (f" (step {cfg['step_size']}, gamma {cfg['gamma']})" if sched == "step" else "")
        + (f" (gamma {cfg['gamma']})" if sched == "exponential" else "")
        + (
            f" (warmup {cfg['warmup_epochs']} epochs, floor {cfg['min_lr_ratio']})" if sched == "cosine" else ""
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


def environment(
    cfg: Mapping[str, Any], device: torch.device, ranks: Dist, per_rank_batch: int
) -> dict[str, Any]:
    """Versions, device, world size, batch sizes and threads: the run record's ``env``."""
    return {
        "torch": torch.__version__,
        "dan_layers": dan_layers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "world_size": ranks.world,
        "batch_size": per_rank_batch * ranks.world,
        "batch_size_per_rank": per_rank_batch,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "deterministic": bool(cfg["deterministic"]),
        "cuda": torch.version.cuda,
    }


# --------------------------------------------------------------------------------------
# The process: ranks, settings, seeds, autocast
# --------------------------------------------------------------------------------------


class Dist:
    """Rank and world of a ``torchrun`` process, and the few collectives the recipe uses.

    Every helper is a no-op in a single process, so the training code reads the same
    with one process or many.
    """

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.owns_group = False

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the process that logs and writes files)."""
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        """Start the process group (NCCL on CUDA, else Gloo) unless there is one."""
        if not self.enabled or dist.is_initialized():
            return
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.owns_group = True

    def wrap(self, net: nn.Module, device: torch.device) -> nn.Module:
        """``net`` in DistributedDataParallel when several processes run, else ``net`` itself."""
        if not self.enabled:
            return net
        return nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks, in place."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (collective)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers_(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        if self.enabled:
            for b in module.buffers():
                dist.broadcast(b, src=0)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this object started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _sha256(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict's keys and tensors, in key order (to check that ranks agree)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _ProcessSettings(contextlib.AbstractContextManager):
    """Saves torch's deterministic-algorithm flags and thread count; restores them on exit."""

    def __enter__(self) -> _ProcessSettings:
        self.saved = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.get_num_threads(),
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.use_deterministic_algorithms(self.saved[0], warn_only=self.saved[1])
        torch.set_num_threads(self.saved[2])


def _seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: Printed once by :func:`amp_setup` for ``--amp`` on a CPU without native bfloat16.
AMP_WITHOUT_BF16_WARNING = (
    "warning: --amp: this CPU has no native bfloat16 instructions (AVX512-BF16 or AMX on x86, "
    "BF16 on Arm), so autocast emulates bfloat16 and trains several times slower than float32 "
    "(measured ~6x on an AVX2-only CPU); run without --amp here"
)


def cpu_has_native_bf16(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16); ``None`` if unknown."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def amp_setup(
    cfg: Mapping[str, Any], device: torch.device, log: Callable[[str], None]
) -> tuple[Callable[[], Any], torch.dtype | None, bool]:
    """Autocast for ``--amp``: ``(context factory, dtype or None, whether a GradScaler is needed)``.

    On a CPU without native bfloat16 it warns once (:data:`AMP_WITHOUT_BF16_WARNING`).

    Raises:
        UsageError: ``--amp-dtype fp16`` on a CPU.
    """
    if not cfg["amp"]:
        return contextlib.nullcontext, None, False
    want = cfg["amp_dtype"]
    if device.type == "cuda":
        if want == "auto":
            want = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        if want == "fp16":
            raise UsageError(
                "expected bf16 or auto on the CPU (float16 autocast needs CUDA)", subject="--amp-dtype fp16"
            )
        want = "bf16"
        if cpu_has_native_bf16() is False:
            log(AMP_WITHOUT_BF16_WARNING)
    dtype = torch.bfloat16 if want == "bf16" else torch.float16

    def autocast() -> Any:
        return torch.autocast(device_type=device.type, dtype=dtype)

    return autocast, dtype, dtype == torch.float16
