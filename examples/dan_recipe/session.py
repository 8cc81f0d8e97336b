"""A run's configuration and process: the :class:`Run` record, the ``--out`` guard, process setup.

Shared by training (:mod:`dan_recipe.training`) and ``--eval-only``
(:mod:`dan_recipe.evaluation`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import reporting, runtime
from .distributed import Dist
from .errors import UserError

__all__ = ["RUN_FILES", "Run", "prepare_out_dir", "start_process"]

#: Files a run writes into ``--out`` (an ``--out`` holding any of them holds a run).
RUN_FILES = ("last.pt", "best.pt", "metrics.json", "confusion_matrix.png", "attention_maps.png")


@dataclass
class Run:
    """The configuration of a run and the process it runs in (filled in by :func:`start_process`)."""

    cfg: dict[str, Any]
    sources: dict[str, str]
    ranks: Dist
    log: reporting.Logger
    t_start: float = field(default_factory=time.perf_counter)
    device: torch.device = torch.device("cpu")
    autocast: Callable[[], Any] = contextlib.nullcontext
    amp_dtype: torch.dtype | None = None
    use_scaler: bool = False
    per_rank: int = 1

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg["out"])


def prepare_out_dir(current: Run, *, resuming: bool) -> None:
    """Refuse an ``--out`` that holds another run, unless resuming it or ``--overwrite``.

    With ``--overwrite``, rank 0 removes that run's files first (for ``--eval-only``
    only the metrics and figures are guarded and replaced, never checkpoints).

    Raises:
        UserError: ``--out`` holds run files and neither flag was given.
    """
    eval_only = current.cfg["eval_only"]
    guarded = RUN_FILES[2:] if eval_only else RUN_FILES
    present = [name for name in guarded if (current.out_dir / name).exists()]
    if not present or resuming:
        return
    if not current.cfg["overwrite"]:
        what = (
            "--overwrite to replace them" if eval_only else "--resume to continue it, --overwrite to replace it"
        )
        raise UserError(
            f"--out {current.out_dir}: expected an output directory without a run, got one holding "
            f"{', '.join(present)}; pass {what}, or another --out"
        )
    if current.ranks.main:
        for name in present:
            (current.out_dir / name).unlink(missing_ok=True)
        current.log(f"--overwrite: removed {', '.join(present)} from {current.out_dir}")


def start_process(current: Run) -> None:
    """Threads, device, process group, determinism, seeds and autocast of this process."""
    cfg, ranks = current.cfg, current.ranks
    runtime.apply_threads(cfg["threads"], current.log)
    current.device = runtime.pick_device(cfg["device"], ranks)
    ranks.init(current.device)
    runtime.apply_determinism(cfg["deterministic"])
    runtime.seed_everything(cfg["seed"] + ranks.rank)
    current.autocast, current.amp_dtype, current.use_scaler = runtime.amp_setup(
        cfg, current.device, current.log
    )
    if ranks.world > 1 and cfg["batch_size"] % ranks.world:
        raise UserError(
            f"--batch-size {cfg['batch_size']}: expected a multiple of the world size {ranks.world}"
        )
    current.per_rank = max(1, cfg["batch_size"] // ranks.world)
