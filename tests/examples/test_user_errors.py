"""A user's mistake ends train_dan.py with status 1 and one line ``error: ...``, never a traceback.

Each case is a mistake a new user made (issue 10): a data root that does not exist
or is a file, ``--num-classes`` that does not fit the folders, a bad label line, a
listed image that is missing, a checkpoint that does not exist or is not one. The
command runs in-process through ``utils.run_command`` (what ``train_dan.py`` runs
under ``__main__``); one test starts the real script to check that wiring.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_dan
from dan_recipe import utils
from tiny_runs import EXAMPLES, ROOT, TINY


class _Evil:  # a class that a weights_only load refuses to unpickle
    pass


def _rafdb_with_line(base: Path, make_rafdb_tree, line: str) -> Path:
    root = make_rafdb_tree(base, 3, n_test=1)
    labels = root / "EmoLabel" / "list_patition_label.txt"
    rows = labels.read_text().splitlines()
    rows[0] = line
    labels.write_text("\n".join(rows) + "\n")
    return root


def _case(name: str, tmp: Path, trees: dict) -> tuple[list[str], list[str]]:
    """(argv, strings the error line must hold) of one mistake."""
    if name == "data root missing":
        return ["--data", "rafdb", "--data-root", str(tmp / "nowhere")], [
            "--data-root",
            "nowhere",
            "does not exist",
        ]
    if name == "data root is a file":
        (tmp / "raf.zip").write_bytes(b"PK")
        return ["--data", "rafdb", "--data-root", str(tmp / "raf.zip")], [
            "--data-root",
            "raf.zip",
            "got a file",
        ]
    if name == "num classes do not fit":
        root = trees["imagefolder"](tmp, 1)
        return ["--data", "imagefolder", "--data-root", str(root), "--num-classes", "4"], [
            "--num-classes 4",
            "3",
        ]
    if name == "label out of range":
        root = _rafdb_with_line(tmp, trees["rafdb"], "train_00001.jpg 9")
        return ["--data", "rafdb", "--data-root", str(root)], [
            "--data-root",
            "list_patition_label.txt:1",
            "1..7",
        ]
    if name == "listed image missing":
        root = trees["rafdb"](tmp, 3, n_test=1)
        (root / "Image" / "aligned" / "train_00002_aligned.jpg").unlink()
        return ["--data", "rafdb", "--data-root", str(root)], [
            "--data-root",
            "train_00002_aligned.jpg",
            "missing",
        ]
    if name == "checkpoint missing":
        path = str(tmp / "best.pt")
        return ["--eval-only", "--checkpoint", path], ["--checkpoint", path, "does not exist"]
    if name == "checkpoint is garbage":
        (tmp / "garbage.pt").write_bytes(os.urandom(256))
        return ["--eval-only", "--checkpoint", str(tmp / "garbage.pt")], [
            "--checkpoint",
            "garbage.pt",
            "cannot read",
        ]
    if name == "checkpoint holds an object":
        torch.save({"model": {}, "x": _Evil()}, tmp / "object.pt")
        return ["--eval-only", "--checkpoint", str(tmp / "object.pt")], ["--checkpoint", "_Evil", "not loaded"]
    if name == "normalize without a partition loss":
        return ["--data", "synthetic", "--partition", "none", "--partition-normalize"], [
            "--partition-normalize", "--partition none",
        ]  # fmt: skip
    if name == "centres the center loss cannot have":
        return ["--data", "synthetic", "--affinity", "center", "--num-centers", "8"], [
            "--num-centers 8", "one centre per class", "expected 7",
        ]  # fmt: skip
    if name == "resume from nowhere":
        path = str(tmp / "old" / "last.pt")
        return ["--resume", path], ["--resume", path, "does not exist"]
    raise AssertionError(name)


CASES = [
    "data root missing",
    "data root is a file",
    "num classes do not fit",
    "label out of range",
    "listed image missing",
    "checkpoint missing",
    "checkpoint is garbage",
    "checkpoint holds an object",
    "resume from nowhere",
    "normalize without a partition loss",
    "centres the center loss cannot have",
]


@pytest.mark.parametrize("name", CASES)
def test_mistake_gives_one_line_and_status_1(name, tmp_path, capsys, make_rafdb_tree, make_imagefolder_tree):
    trees = {"rafdb": make_rafdb_tree, "imagefolder": make_imagefolder_tree}
    argv, expected = _case(name, tmp_path, trees)
    capsys.readouterr()
    status = utils.run_command(train_dan.main, [*TINY, "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert status == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in err and "weights_only=False" not in err and "safe_globals" not in err


def test_the_script_itself_exits_with_one_line(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all\n" * 10)
    for argv in (
        ["--eval-only", "--checkpoint", str(tmp_path / "garbage.pt")],
        ["--data", "rafdb", "--data-root", str(tmp_path / "nowhere")],
    ):
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / "train_dan.py"), *TINY, "--out", str(tmp_path / "out"), *argv],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=ROOT,
        )
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert "weights_only=False" not in proc.stderr


def test_flag_errors_are_one_line_too(capsys):
    assert utils.run_command(train_dan.main, ["--val-fraction", "1.5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --val-fraction: expected in [0, 1), got 1.5"
