"""``--eval-only``: the test metrics of a checkpoint, ours or the authors'.

One of our checkpoints brings its model and loss settings and, unless flags say
otherwise, which test set it was trained for (:data:`~dan_recipe.config.MODEL_KEYS`,
:data:`~dan_recipe.config.DATA_KEYS`); its class names map the test split by name.
An authors' checkpoint (yaoing/DAN key layout) brings its head and class counts; it
holds no loss centres, so no affinity loss is reported for it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import checkpoints, config, reporting, runtime
from .engine import evaluate
from .errors import CheckpointError, UserError
from .loaders import build_loaders, build_run_data
from .model import DANWithLosses, build_model_with_losses
from .session import Run, prepare_out_dir, start_process
from .weights import infer_official_config, load_official_checkpoint

__all__ = ["evaluate_checkpoint"]


def _take_settings(current: Run, raw: Mapping[str, Any]) -> None:
    """Copy the model settings (always) and data settings (unless flagged) of one of our checkpoints."""
    cfg, sources = current.cfg, current.sources
    saved = dict(raw["args"])
    for k in config.MODEL_KEYS:  # a key newer than the checkpoint keeps its default
        cfg[k], sources[k] = saved.get(k, config.DEFAULTS[k]), "checkpoint"
    for k in config.DATA_KEYS:
        if sources.get(k) != "flag" and k in saved:
            cfg[k], sources[k] = saved[k], "checkpoint"


def _build_net(current: Run, raw: Any, path: Path, num_classes: int) -> tuple[DANWithLosses, str]:
    """The model with losses, loaded from the checkpoint; and what kind of checkpoint it was."""
    cfg = current.cfg
    ours = checkpoints.is_our_checkpoint(raw)
    try:
        shape = {"num_heads": int(raw["args"]["num_heads"])} if ours else infer_official_config(raw)
    except CheckpointError as exc:
        raise CheckpointError(f"--checkpoint {path}: {exc}") from None
    cfg["num_heads"] = shape["num_heads"]
    if not ours:
        if shape["num_classes"] != num_classes:
            hint = " (--num-classes 7 or 8 picks AffectNet's)" if cfg["data"] == "affectnet" else ""
            raise UserError(
                f"--checkpoint {path}: expected a model of the {num_classes} classes of the {cfg['data']} "
                f"test set{hint}, got one of {shape['num_classes']} classes"
            )
        cfg["affinity"] = "none"  # their files hold no centres: no affinity loss to report
        current.sources["affinity"] = "authors' checkpoint has no centres"
    net = build_model_with_losses(cfg, num_classes)
    try:
        if ours:
            checkpoints.load_model_state(net, raw["model"], f"checkpoint {path}")
        else:
            load_official_checkpoint(net.model, raw)
    except CheckpointError as exc:
        raise CheckpointError(f"--checkpoint {path}: {exc}") from None
    return net, "train_dan.py" if ours else "authors' (yaoing/DAN layout)"


def evaluate_checkpoint(current: Run) -> dict[str, Any]:
    """Evaluate ``--checkpoint`` on the test split; write ``metrics.json`` and the figures.

    Returns:
        The metrics dict (``final`` holds the test metrics).

    Raises:
        UserError: A missing checkpoint, an ``--out`` holding results, data mistakes,
            or a model whose classes do not fit the test set.
        CheckpointError: An unreadable checkpoint, or keys that do not fit.
    """
    cfg, log, ranks = current.cfg, current.log, current.ranks
    path = Path(cfg["checkpoint"])
    prepare_out_dir(current, resuming=False)
    raw = checkpoints.read_checkpoint(path, "--checkpoint")
    ours = checkpoints.is_our_checkpoint(raw)
    if ours:
        _take_settings(current, raw)
    start_process(current)
    names = list(raw["class_names"]) if ours else None
    data = build_run_data(cfg, class_names=names, whose=f"the checkpoint {path}")
    net, kind = _build_net(current, raw, path, len(data.class_names))
    net.to(current.device)
    loader = build_loaders(data, cfg, ranks, current.device, current.per_rank).test
    log(
        f"evaluating {kind} checkpoint {path} ({cfg['num_heads']} heads, {len(data.class_names)} classes) "
        f"on {cfg['data']} test ({len(data.test)} images)"
    )
    for split, missing in data.classes_without_samples.items():
        if missing:
            log(f"  {split} split: no images of {', '.join(missing)} (their confusion-matrix rows stay empty)")
    t0 = time.perf_counter()
    m = evaluate(net, loader, ranks, device=current.device, autocast=current.autocast,
                 channels_last=bool(cfg["channels_last"]))  # fmt: skip
    m["checkpoint"], m["checkpoint_kind"] = str(path), kind
    epoch = raw.get("epoch", raw.get("iter")) if isinstance(raw, Mapping) else None
    m["epoch"] = int(epoch) if isinstance(epoch, (int, float)) else None
    metrics: dict[str, Any] = {
        "complete": True,
        "eval_only": True,
        "config": config.as_plain_values(cfg),
        "config_sources": current.sources,
        "class_names": list(data.class_names),
        "num_classes": len(data.class_names),
        "classes_without_samples": data.classes_without_samples,
        "env": runtime.environment(cfg, current.device, ranks, current.per_rank),
        "final": m,
        "eval_seconds": time.perf_counter() - t0,
        "total_seconds": time.perf_counter() - current.t_start,
        "files": {},
    }
    if ranks.main:
        _write_results(current, net, data.test, data.class_names, metrics)
    _log_results(current, m, data.class_names)
    ranks.barrier()
    return metrics


def _write_results(current: Run, net: DANWithLosses, test_ds: Any, class_names: list[str],
                   metrics: dict[str, Any]) -> None:  # fmt: skip
    out = current.out_dir
    metrics["files"] = {"metrics": str(out / "metrics.json")}
    if current.cfg["plots"]:
        metrics["files"].update(reporting.write_figures(
            metrics["final"], out, net.model, test_ds, class_names, current.device,
            rows=current.cfg["viz_faces"], log=current.log,
        ))  # fmt: skip
    checkpoints.write_json(metrics, out / "metrics.json")


def _log_results(current: Run, m: dict[str, Any], class_names: list[str]) -> None:
    log = current.log
    log(
        f"test accuracy {m['accuracy']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}, "
        f"loss {m['loss']:.4f} ({m['samples']} images); written to {current.out_dir}/metrics.json"
    )
    log("confusion matrix (rows true, columns predicted):")
    for name, row in zip(class_names, torch.tensor(m["confusion_matrix"]).tolist(), strict=False):
        log(f"  {name:>12s} " + " ".join(f"{v:5d}" for v in row))
