"""The entry point of a run: :func:`run` trains, or with ``--eval-only`` evaluates a checkpoint.

``train_dan.py`` parses the flags (:func:`dan_recipe.config.resolve_config`) and
calls :func:`run`; :func:`dan_recipe.errors.run_command` turns its user errors into
one line each.
"""

from __future__ import annotations

from typing import Any

from . import reporting, runtime
from .distributed import Dist
from .evaluation import evaluate_checkpoint
from .session import Run
from .training import train

__all__ = ["run"]


def run(cfg: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """Train (or, with ``--eval-only``, evaluate) as ``cfg`` says; return the metrics dict.

    Process-wide torch settings the run changes are put back afterwards.

    Raises:
        UserError: For mistakes in the flags, files and folders (one line each).
        CheckpointError: For a checkpoint that cannot be read or does not fit.
    """
    ranks = Dist()
    current = Run(cfg, sources, ranks, reporting.Logger(ranks.main))
    with runtime.ProcessSettings():
        try:
            if cfg["eval_only"]:
                return evaluate_checkpoint(current)
            return train(current)
        except KeyboardInterrupt:
            if not cfg["eval_only"]:
                current.log(
                    f"interrupted: {cfg['out']}/last.pt holds the last completed epoch; "
                    f"continue with --resume --out {cfg['out']}"
                )
            raise
        finally:
            ranks.close()
