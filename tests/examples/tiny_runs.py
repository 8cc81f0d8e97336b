"""Shared by the tests of ``examples/``: where things are, and the smallest run of train_dan.py.

A tiny run: 32 px images, batches of 8, one epoch, one thread, no bar, no figures;
``SYNTH`` adds 28 synthetic training faces and 14 test faces (3 steps).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import train_dan  # noqa: E402

TINY = [
    "--image-size", "32",
    "--batch-size", "8",
    "--epochs", "1",
    "--num-workers", "0",
    "--threads", "1",
    "--no-progress",
    "--no-plots",
]  # fmt: skip
SYNTH = ["--data", "synthetic", "--synthetic-train", "28", "--synthetic-test", "14"]


def run(out: Path, *args: str) -> dict[str, Any]:
    """``train_dan.main`` of a tiny run into ``out`` (add ``SYNTH`` or a data set to ``args``)."""
    return train_dan.main([*TINY, "--out", str(out), *args])
