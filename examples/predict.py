#!/usr/bin/env python
r"""Classify the expression of every face in images and videos with a DAN checkpoint.

Usage (see ``--help`` for every flag)::

    python examples/predict.py photo.jpg --checkpoint runs/demo/best.pt
    python examples/predict.py photos/ clip.mp4 --every 10 --out faces.csv --annotate annotated/ \\
        --checkpoint rafdb_epoch21_acc0.897_bacc0.8532.pth --labels rafdb
    python examples/predict.py 'crops/**/*.jpg' --no-detect --checkpoint best.pt --out crops.jsonl

Faces are found with OpenCV's Haar frontal-face cascade (as the authors' demo), every
face of a picture, each cropped square with a margin and classified in batches by the
re-parameterized, channels-last model (``--no-fast`` for the plain eval model).
Output: one JSON Lines record per face on stdout, or ``--out FILE.jsonl`` /
``FILE.csv`` (an existing file is replaced only with ``--overwrite``); see
``dan_recipe/predict_output.py`` for the fields. Unreadable files are reported,
skipped and counted in the closing line on stderr. A mistake in a flag or input
ends the command with status 1 and one line ``error: ...``.

This file is the command only; the machinery is in ``examples/dan_recipe/``
(``sources`` inputs, ``faces`` detection and crops, ``inference`` the model,
``predict_output`` the records, ``predict_run`` the run).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # so that `import dan_recipe` works however this is started
    sys.path.insert(0, str(_HERE))

from dan_recipe import errors, predict_run  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the command with ``argv`` (without the program name); return the run's counts.

    Raises:
        UserError: A mistake in the flags, inputs or output paths (``SystemExit``, status 1).
        CheckpointError: A checkpoint that cannot be read or does not fit.
    """
    return predict_run.run_predict(argv)


if __name__ == "__main__":
    sys.exit(errors.run_command(main))
