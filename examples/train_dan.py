#!/usr/bin/env python
r"""Train and evaluate the reference DAN on synthetic faces, RAF-DB, AffectNet or an image folder.

Usage (see ``--help`` for every flag)::

    python examples/train_dan.py --preset demo --out runs/demo          # CPU demo, synthetic faces
    python examples/train_dan.py --preset rafdb --data-root data/raf-basic --out runs/raf
    python examples/train_dan.py --preset affectnet --data-root data/affectnet --num-classes 7
    python examples/train_dan.py --data imagefolder --data-root data/sfew --preset rafdb
    python examples/train_dan.py --resume --out runs/raf                # continue runs/raf/last.pt
    python examples/train_dan.py --eval-only --checkpoint rafdb_epoch21_acc0.897.pth \\
        --data rafdb --data-root data/raf-basic --out runs/raf-authors  # authors' checkpoint
    torchrun --nproc_per_node=4 examples/train_dan.py --preset rafdb ...  # DistributedDataParallel

This file is the command only: parse the flags, resolve the configuration, run.
Follow one epoch: :func:`dan_recipe.train.run` -> ``train`` -> ``run_epoch`` ->
``train_one_epoch`` (all in ``dan_recipe/train.py``), over the data of
``dan_recipe/data.py`` and the model of ``dan_recipe/model.py``; the flags and
presets are ``dan_recipe/config.py``'s.

What a run writes to ``--out`` (refused if ``--out`` already holds a run, unless
``--resume`` or ``--overwrite``):

* ``metrics.json``: per-epoch history, ``final`` (test metrics of the model chosen on
  the validation split held out from training, or of the last epoch when there is
  none, with the reason in ``final["selected_by"]``), ``last``, timings,
  configuration with the source of every value, class names, environment;
* ``last.pt`` (every epoch): everything ``--resume`` needs to continue bit-exactly;
* ``best.pt`` (on improvement): the model and what inference needs (classes, image
  size, normalisation, the data it learnt from), a third of ``last.pt``'s size; the
  same model as ``model.safetensors`` + ``config.json`` (no pickle). All are written
  atomically and read with ``torch.load(weights_only=True)`` / safetensors;
  ``dan_recipe.model.load_model`` loads any of them (and the authors' checkpoints);
* ``confusion_matrix.png`` and ``attention_maps.png`` (test confusion matrix; each
  head's spatial attention over a few test faces).

A mistake in a flag, file or folder ends the command with status 1 and one line
``error: ...``. Under ``torchrun`` the model *and* the affinity loss (whose centres
are learnable) are wrapped together in one DistributedDataParallel module.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # so that `import dan_recipe` works however this is started
    sys.path.insert(0, str(_HERE))

from dan_recipe.config import resolve_config  # noqa: E402
from dan_recipe.train import run  # noqa: E402
from dan_recipe.utils import run_command  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the command with ``argv`` (without the program name); return the metrics dict.

    Raises:
        RecipeError: A mistake in the flags, files, folders or checkpoints.
    """
    cfg, sources = resolve_config(argv)
    return run(cfg, sources)


if __name__ == "__main__":
    sys.exit(run_command(main))
