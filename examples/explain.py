#!/usr/bin/env python
r"""Show where each DAN head looks on every face: spatial attention maps and per-head Grad-CAM++.

Usage (see ``--help`` for every flag)::

    python examples/explain.py photo.jpg --checkpoint runs/demo/best.pt --out explained/
    python examples/explain.py faces/ --no-detect --checkpoint rafdb_epoch21_acc0.897_bacc0.8532.pth \\
        --labels rafdb --target Happiness --save-maps --out explained/

Same inputs, face detection, checkpoints and labels as ``predict.py``. For every face
it writes ``<name>.png`` into ``--out``: the crop as the model saw it, then one panel
per head with the head's spatial attention map over the face (top row) and
Grad-CAM++ of the head's spatially attended features for the predicted class, or
``--target`` (bottom row), the authors' ``run_grad_cam.py`` target
(``cat_head{i}.sa``). ``--save-maps`` adds ``<name>.npz`` (``attention`` (K, h, w)
at the feature-map resolution, ``gradcam`` (K, S, S) at the crop's). ``faces.jsonl``
lists every face written. ``--out`` must be empty or new, unless ``--overwrite``.

This file is the command only; the machinery is in ``examples/dan_recipe/``
(``head_maps`` the maps, ``gradcam`` Grad-CAM++, ``head_figure`` the PNG,
``explain_run`` the run).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # so that `import dan_recipe` works however this is started
    sys.path.insert(0, str(_HERE))

from dan_recipe import errors, explain_run  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the command with ``argv`` (without the program name); return the run's counts.

    Raises:
        UserError: A mistake in the flags, inputs or output folder (``SystemExit``, status 1).
        CheckpointError: A checkpoint that cannot be read or does not fit.
    """
    return explain_run.run_explain(argv)


if __name__ == "__main__":
    sys.exit(errors.run_command(main))
