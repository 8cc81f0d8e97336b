"""Training: from a resolved configuration to a trained, tested model and its records.

:func:`train` runs these steps, one function each:

1. :func:`read_resume_point`: continue from ``--resume`` (the checkpoint's recipe wins
   over flags, except the options in :data:`~dan_recipe.config.RUNTIME_OPTIONS`) or
   start afresh, in an ``--out`` that holds no other run unless ``--overwrite``;
2. :func:`~dan_recipe.session.start_process`: threads, device, process group,
   determinism, seeds, autocast;
3. :func:`~dan_recipe.loaders.build_run_data` and :func:`build_training`: data, model
   with losses, loaders, optimizer, schedule (restored when resuming);
4. :func:`run_epoch` for every epoch: :func:`~dan_recipe.engine.train_one_epoch`,
   validation, the best model so far, ``last.pt`` (and ``best.pt``);
5. :func:`finish`: test the reported (best) and the last model, write ``metrics.json``
   and the figures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checkpoints, config, reporting, runtime
from .distributed import state_sha256, tensor_sha256, wrap_for_ddp
from .engine import RunningMetrics, TrainStep, evaluate, train_one_epoch
from .errors import CheckpointError, UserError
from .loaders import Loaders, RunData, build_loaders, build_run_data
from .model import DANWithLosses, build_model_with_losses
from .optim import build_optimizer, build_scheduler, check_epochs_on_resume
from .session import Run, prepare_out_dir, start_process
from .weights import load_backbone_weights

__all__ = ["Training", "build_training", "finish", "read_resume_point", "run_epoch", "train"]


@dataclass
class Training:
    """Everything a training run carries from epoch to epoch (most of it checkpointed)."""

    net: DANWithLosses
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


def read_resume_point(current: Run) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint to continue from, with the run's configuration merged from it.

    Returns:
        ``(checkpoint, path)``, or ``None`` to start afresh (``--resume`` without a
        ``last.pt`` yet, or no ``--resume``).

    Raises:
        UserError: A ``--resume PATH`` that does not exist or is not one of ours, or
            an ``--epochs`` the checkpoint's schedule cannot follow.
    """
    cfg, sources = current.cfg, current.sources
    if not cfg["resume"]:
        return None
    path = current.out_dir / "last.pt" if cfg["resume"] == "auto" else Path(cfg["resume"])
    if not path.exists():
        if cfg["resume"] != "auto":
            raise UserError(f"--resume {path}: expected a checkpoint file, got a path that does not exist")
        current.log(f"--resume: no {path} yet, starting a new run")
        return None
    ckpt = checkpoints.read_checkpoint(path, "--resume")
    if not checkpoints.is_our_checkpoint(ckpt):
        raise UserError(
            f"--resume {path}: not a train_dan.py checkpoint "
            "(use --backbone-weights or --eval-only --checkpoint for other files)"
        )
    for k, v in dict(ckpt["args"]).items():
        if k in config.RUNTIME_OPTIONS or k not in cfg:
            continue
        if sources.get(k) == "flag" and cfg[k] != v:
            current.log(f"warning: --{k.replace('_', '-')} {cfg[k]} ignored: resuming keeps {v}")
        cfg[k], sources[k] = v, "checkpoint"
    check_epochs_on_resume(cfg, int(ckpt["args"]["epochs"]), int(ckpt["epoch"]), str(path))
    return ckpt, path


def build_training(current: Run, data: RunData, resume: tuple[dict[str, Any], Path] | None) -> Training:
    """Model with losses, loaders, optimizer, schedule and scaler; restored when resuming."""
    cfg = current.cfg
    net = build_model_with_losses(cfg, len(data.class_names))
    report = None
    if cfg["backbone_weights"] and resume is None:
        report = _load_backbone(current, net)
    net.to(current.device)
    if cfg["channels_last"]:
        net.to(memory_format=torch.channels_last)
    loaders = build_loaders(data, cfg, current.ranks, current.device, current.per_rank)
    optimizer = build_optimizer(cfg, net)
    scheduler, interval = build_scheduler(cfg, optimizer, max(1, len(loaders.train or ())))
    scaler = torch.amp.GradScaler(current.device.type, enabled=current.use_scaler)
    step = TrainStep(net, optimizer, scaler, scheduler, interval == "step", current.autocast, current.device,
                     bool(cfg["channels_last"]))  # fmt: skip
    training = Training(net, step, loaders, data, interval, backbone_report=report)
    if resume is not None:
        restore(current, training, *resume)
    step.module = wrap_for_ddp(net, current.device, current.ranks)
    return training


def _load_backbone(current: Run, net: DANWithLosses) -> dict[str, list[str]]:
    path = current.cfg["backbone_weights"]
    try:
        report = load_backbone_weights(net.model, path, strict=current.cfg["backbone_strict"])
    except FileNotFoundError:
        raise UserError(
            f"--backbone-weights {path}: expected a ResNet-18 weights file, got a path that does not exist"
        ) from None
    except CheckpointError as exc:
        raise CheckpointError(f"--backbone-weights {path}: {exc}") from None
    current.log(
        f"backbone weights {path}: dropped {report['dropped']}, missing {report['missing']}, "
        f"unexpected {report['unexpected']}"
    )
    return report


def restore(current: Run, training: Training, ckpt: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's model, optimizer, schedule, scaler and progress into ``training``."""
    step, log = training.step, current.log
    checkpoints.load_model_state(training.net, ckpt["model"], f"checkpoint {path}")
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
            f"warning: checkpoint was written with world size {ckpt.get('world_size')}, "
            f"now {current.ranks.world}: the data order (and so the result) will differ"
        )
    best_path = path.parent / "best.pt"
    if training.best_epoch > 0 and best_path.exists():
        best = checkpoints.read_checkpoint(best_path, "--resume (its best.pt)")
        if int(best.get("epoch", -1)) == training.best_epoch:
            training.best_state = {k: v.clone() for k, v in best["model"].items()}
    if training.best_epoch > 0 and training.best_state is None:
        log(f"warning: best.pt for epoch {training.best_epoch} not found next to {path}")
    log(f"resumed from {path} at epoch {training.start_epoch} (step {training.global_step})")


def log_header(current: Run, training: Training, env: dict[str, Any]) -> None:
    """The run's opening lines: data, every config value with its source, environment."""
    cfg, log, data = current.cfg, current.log, training.data
    n_classes, n_val = len(data.class_names), len(data.val) if data.val is not None else 0
    log(f"DAN training: preset {cfg['preset']}, data {cfg['data']}, {n_classes} classes {data.class_names}")
    log(
        f"  samples: train {len(data.train)}, val {n_val} (held out from train, for model selection), "
        f"test {len(data.test)}"
    )
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
# Training
# --------------------------------------------------------------------------------------


def train(current: Run) -> dict[str, Any]:
    """A training run (see the module docstring); returns the metrics dict."""
    cfg = current.cfg
    resume = read_resume_point(current)
    prepare_out_dir(current, resuming=resume is not None)
    start_process(current)
    data = build_run_data(cfg)
    training = build_training(current, data, resume)
    env = runtime.environment(cfg, current.device, current.ranks, current.per_rank)
    log_header(current, training, env)
    if resume is not None:  # restore RNG last, after everything that draws random numbers was built
        states = resume[0]["rng"]
        if len(states) == current.ranks.world:
            checkpoints.set_rng_state(states[current.ranks.rank])
        else:
            current.log("warning: RNG states saved for another world size; reseeding")
    if current.ranks.main:
        current.out_dir.mkdir(parents=True, exist_ok=True)
    progress = bool(cfg["progress"]) and current.ranks.main and runtime.stderr_is_terminal()
    for epoch in range(training.start_epoch + 1, cfg["epochs"] + 1):
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
    steps, skipped = train_one_epoch(step, training.loaders.train, metrics, ranks,
                                     desc=f"epoch {epoch}/{cfg['epochs']}", progress=progress)  # fmt: skip
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
    strip = reporting.without_confusion_matrix
    training.history.append({"epoch": epoch, "global_step": training.global_step, "lr": lr, "seconds": seconds,
                             "train": strip(train_m), "val": strip(val_m) if val_m is not None else None,
                             "best": improved})  # fmt: skip
    current.log(reporting.epoch_line(epoch, cfg["epochs"], train_m, val_m, lr, seconds, improved))
    save_epoch(current, training, epoch, improved)


def _evaluate(current: Run, training: Training, loader: Any) -> dict[str, Any]:
    return evaluate(training.net, loader, current.ranks, device=current.device, autocast=current.autocast,
                    channels_last=bool(current.cfg["channels_last"]))  # fmt: skip


def save_epoch(current: Run, training: Training, epoch: int, improved: bool) -> None:
    """``last.pt`` (and ``best.pt`` on improvement) and the history so far in ``metrics.json``."""
    rng = current.ranks.gather(checkpoints.rng_state())  # collective: every rank takes part
    if not current.ranks.main:
        return
    step = training.step
    ckpt = checkpoints.training_checkpoint(
        net=training.net, optimizer=step.optimizer, scheduler=step.scheduler, scaler=step.scaler,
        epoch=epoch, global_step=training.global_step, best_metric=training.best_metric,
        best_epoch=training.best_epoch, history=training.history, args=config.as_plain_values(current.cfg),
        class_names=training.data.class_names, world_size=current.ranks.world, rng=rng,
    )  # fmt: skip
    out = current.out_dir
    # best.pt (on improvement) is the same file as last.pt, linked in first: a crash in
    # between leaves last.pt one epoch behind, and resuming redoes that epoch.
    checkpoints.save_checkpoint(ckpt, out / "last.pt", also=[out / "best.pt"] if improved else [])
    checkpoints.write_json(
        {"config": config.as_plain_values(current.cfg), "epochs": training.history, "complete": False},
        out / "metrics.json",
    )


# --------------------------------------------------------------------------------------
# The end of a run
# --------------------------------------------------------------------------------------


def _partial_metrics(current: Run, training: Training, env: dict[str, Any]) -> dict[str, Any]:
    """The record of a run stopped by ``--stop-after-epoch`` (no test evaluation)."""
    partial = {
        "complete": False,
        "config": config.as_plain_values(current.cfg),
        "config_sources": current.sources,
        "class_names": list(training.data.class_names),
        "env": env,
        "epochs": training.history,
        "best_epoch": training.best_epoch,
        "train_seconds": training.train_seconds,
        "skipped_batches": training.skipped_batches,
    }
    if current.ranks.main:
        checkpoints.write_json(partial, current.out_dir / "metrics.json")
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
    centers = net.affinity.centers if net.affinity is not None else None
    metrics: dict[str, Any] = {
        "complete": True,
        "config": config.as_plain_values(cfg),
        "config_sources": current.sources,
        "class_names": list(training.data.class_names),
        "num_classes": len(training.data.class_names),
        "classes_without_samples": training.data.classes_without_samples,
        "env": env,
        "tricks": reporting.recipe_description(cfg, training.sched_interval, current.amp_dtype),
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
        "total_seconds": time.perf_counter() - current.t_start,
        "skipped_batches": training.skipped_batches,
        "backbone_weights_report": training.backbone_report,
        "ddp": {
            "world_size": ranks.world,
            "centers_sha256": ranks.gather(tensor_sha256(centers) if centers is not None else None),
            "model_sha256": ranks.gather(state_sha256(net.model.state_dict())),
        },
        "files": {},
    }
    if ranks.main:
        metrics["files"] = _write_results(current, training, metrics)
        metrics["total_seconds"] = time.perf_counter() - current.t_start
        checkpoints.write_json(metrics, current.out_dir / "metrics.json")
    if last_state is not None:
        net.load_state_dict(last_state)
    _log_summary(current, metrics, env)
    ranks.barrier()
    return metrics


def _write_results(current: Run, training: Training, metrics: dict[str, Any]) -> dict[str, str]:
    out = current.out_dir
    files = {"metrics": str(out / "metrics.json")}
    if current.cfg["plots"]:
        files.update(reporting.write_figures(
            metrics["final"], out, training.net.model, training.data.test, training.data.class_names,
            current.device, rows=current.cfg["viz_faces"], log=current.log,
        ))  # fmt: skip
    for name in ("last.pt", "best.pt"):
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
        f"total {metrics['total_seconds']:.1f}s (device {current.device}, {env['threads']} threads, "
        f"world size {current.ranks.world})"
    )
    if metrics["files"]:
        log("wrote: " + ", ".join(metrics["files"].values()))
