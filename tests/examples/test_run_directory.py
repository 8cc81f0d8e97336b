"""What a run does with its ``--out``: no silent overwrite, honest extension, honest model choice.

Issue 10, items 3-5: a second run into the same ``--out`` overwrote ``best.pt``,
``last.pt`` and ``metrics.json``; resuming a finished cosine run with more
``--epochs`` trained at learning rate 0; an empty validation split logged
``acc nan`` and still claimed the model was chosen on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import train_dan
from dan_recipe import utils
from tiny_runs import SYNTH, TINY
from tiny_runs import run as tiny_run


def run(out: Path, *args: str) -> dict:
    return tiny_run(out, *SYNTH, *args)


# ----------------------------------------------------------------------------------------
# 3. an --out that holds a run
# ----------------------------------------------------------------------------------------


def test_a_second_run_into_the_same_out_is_refused(tmp_path):
    out = tmp_path / "run"
    run(out)
    files = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.json")}
    with pytest.raises(
        utils.RecipeError,
        match=r"--out .* holding last\.pt, best\.pt, model\.safetensors, config\.json, metrics\.json"
        r".*--resume.*--overwrite",
    ):
        run(out, "--seed", "1")
    assert {name: (out / name).read_bytes() for name in files} == files  # untouched
    run(out, "--seed", "1", "--overwrite")
    assert torch.load(out / "last.pt", weights_only=True)["args"]["seed"] == 1
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 1


def test_overwrite_removes_the_old_run_files(tmp_path):
    out = tmp_path / "run"
    run(out, "--plots", "--viz-faces", "2")
    assert (out / "attention_maps.png").exists()
    run(out, "--overwrite")  # --no-plots: the old figures must not pass for this run's
    assert not (out / "attention_maps.png").exists() and not (out / "confusion_matrix.png").exists()


def test_eval_only_does_not_overwrite_a_training_run(tmp_path):
    out = tmp_path / "run"
    run(out, "--val-fraction", "0")
    before = (out / "metrics.json").read_text()
    args = [*TINY, "--eval-only", "--checkpoint", str(out / "last.pt"), "--out", str(out)]
    with pytest.raises(utils.RecipeError, match=r"metrics\.json.*--overwrite"):
        train_dan.main(args)
    assert (out / "metrics.json").read_text() == before
    train_dan.main([*args, "--overwrite"])
    assert (out / "last.pt").exists()  # --overwrite on --eval-only replaces results, never checkpoints
    assert json.loads((out / "metrics.json").read_text())["eval_only"] is True


# ----------------------------------------------------------------------------------------
# 4. extending a run
# ----------------------------------------------------------------------------------------


def test_extending_a_finished_cosine_run_is_refused(tmp_path):
    out = tmp_path / "run"
    run(out, "--scheduler", "cosine")
    before = (out / "last.pt").read_bytes()
    with pytest.raises(utils.RecipeError, match=r"--epochs 2: expected 1, the length of the cosine schedule"):
        run(out, "--resume", "--epochs", "2")
    assert (out / "last.pt").read_bytes() == before


def test_extending_a_per_epoch_schedule_equals_the_longer_run(tmp_path):
    args = ["--scheduler", "step", "--step-size", "1", "--gamma", "0.5", "--optimizer", "sgd", "--lr", "0.01"]
    full = run(tmp_path / "full", *args, "--epochs", "2")
    run(tmp_path / "ext", *args, "--epochs", "1")
    extended = run(tmp_path / "ext", *args, "--epochs", "2", "--resume")
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ext" / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [e["lr"] for e in extended["epochs"]] == [e["lr"] for e in full["epochs"]] == [0.01, 0.005]
    assert extended["final"]["confusion_matrix"] == full["final"]["confusion_matrix"]


def test_resuming_with_fewer_epochs_than_done_is_refused(tmp_path):
    out = tmp_path / "run"
    run(out, "--scheduler", "step", "--epochs", "2")
    with pytest.raises(utils.RecipeError, match=r"--epochs 1: expected at least the 2 epochs"):
        run(out, "--resume", "--epochs", "1")


# ----------------------------------------------------------------------------------------
# 5. an empty validation split
# ----------------------------------------------------------------------------------------


def test_empty_validation_split_reports_the_last_epoch_and_says_why(tmp_path, capsys):
    out = tmp_path / "run"
    # one face per class: a 10 % validation share of each class rounds to none
    m = train_dan.main([*TINY, "--synthetic-train", "7", "--synthetic-test", "7", "--val-fraction", "0.1",
                        "--epochs", "2", "--out", str(out)])  # fmt: skip
    log = capsys.readouterr().out
    assert m["final"]["epoch"] == 2 == m["best_epoch"]
    assert m["final"]["selected_by"].startswith("last epoch (the validation split is empty")
    assert "chosen by best validation" not in log and "nan" not in log
    assert "validation: the validation split is empty" in log
    assert all(e["val"] is None for e in m["epochs"])
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 2


def test_a_checkpoint_from_before_the_package_still_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["--scheduler", "step", "--optimizer", "sgd", "--lr", "0.01"]
    run(out, *args)
    old = torch.load(out / "last.pt", weights_only=True)
    del old["preprocessing"]  # what train_dan.py wrote before: no preprocessing record,
    for group in old["optimizer"]["param_groups"]:
        group["fused"] = None  # and an optimizer without the fused kernel
    torch.save(old, out / "last.pt")
    resumed = run(out, *args, "--epochs", "2", "--resume")
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2] and resumed["complete"] is True


def test_resume_alone_continues_the_run_as_it_was_started(tmp_path):
    out = tmp_path / "run"
    at = TINY.index("--epochs")
    quick = TINY[:at] + TINY[at + 2 :]  # without --epochs, a resumed demo-preset run would say 4
    first = train_dan.main([*quick, *SYNTH, "--epochs", "2", "--stop-after-epoch", "1", "--out", str(out)])
    assert first["complete"] is False
    done = train_dan.main([*quick, "--resume", "--out", str(out)])  # no --epochs, no data flags
    assert done["complete"] is True and [e["epoch"] for e in done["epochs"]] == [1, 2]
    assert done["config"]["epochs"] == 2 and done["config_sources"]["epochs"] == "checkpoint"
    assert done["config"]["synthetic_train"] == 28
