"""What a new user of train_dan.py hit (issue 16), each reproduced first: no flag ignored, nothing redone.

* ``--data-root`` without ``--data`` reads the kind of data from the folder's layout;
* a class-folder tree's own ``val/`` is the validation split, and the log says where
  every split came from;
* class folders without ``--preset`` get a recipe that learns from scratch, and the
  log says which recipe ran and why;
* ``--resume`` of a finished run changes nothing, and the times add up;
* ``--eval-only --out DIR`` evaluates ``DIR/best.pt``;
* argparse's mistakes are one line and status 1, like every other mistake;
* a Python caller catches the recipe's errors with ``except Exception``.
"""

from __future__ import annotations

import json
from pathlib import Path

import predict
import pytest
import train_dan
from dan_recipe import config, utils
from photo_helpers import QUIET_CPU, astronaut, save_image, save_our_checkpoint
from tiny_runs import EXAMPLES, SYNTH, TINY, run


def _one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    status = utils.run_command(train_dan.main, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --------------------------------------------------------------------------------------
# --data-root without --data
# --------------------------------------------------------------------------------------


def test_the_kind_of_data_is_read_from_the_folder(tmp_path, make_rafdb_tree, make_affectnet_tree,
                                                  make_imagefolder_tree):  # fmt: skip
    for build, kind in ((make_rafdb_tree, "rafdb"), (make_affectnet_tree, "affectnet"),
                        (make_imagefolder_tree, "imagefolder")):  # fmt: skip
        root = build(tmp_path / kind)
        cfg, sources = config.resolve_config(["--data-root", str(root)])
        assert cfg["data"] == kind and sources["data"] == "read from --data-root's layout", kind
        assert cfg["preset"] == config.PRESET_FOR_DATA[kind]


def test_a_class_folder_run_without_data_trains_on_the_folder_not_on_synthetic_faces(
    tmp_path, make_imagefolder_tree
):
    root = make_imagefolder_tree(tmp_path, 3)
    m = run(tmp_path / "out", "--data-root", str(root))  # was: synthetic faces, data_root ignored, exit 0
    assert m["config"]["data"] == "imagefolder" and m["class_names"] == ["Angry", "Happy", "Neutral"]
    assert m["config_sources"]["data"] == "read from --data-root's layout"
    assert m["final"]["samples"] == 9  # the folder's 3 x 3 test images


def test_a_folder_of_unknown_layout_says_what_to_add(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    line = _one_line_error([*TINY, "--data-root", str(tmp_path / "photos")], capsys)
    assert "cannot tell the kind of data" in line and "train/<class>/" in line and "--data" in line
    line = _one_line_error([*TINY, "--data-root", str(tmp_path / "nowhere")], capsys)
    assert "--data-root" in line and "does not exist" in line
    line = _one_line_error([*TINY, "--data", "synthetic", "--data-root", str(tmp_path)], capsys)
    assert "expected no --data-root with synthetic faces" in line


# --------------------------------------------------------------------------------------
# val/ and where every split came from
# --------------------------------------------------------------------------------------


def test_a_val_folder_is_the_validation_split_and_the_log_says_where_splits_came_from(
    tmp_path, make_imagefolder_tree, capsys
):
    root = make_imagefolder_tree(tmp_path, 2, splits=("train", "val", "test"))
    capsys.readouterr()
    m = run(tmp_path / "out", "--data-root", str(root))
    log = capsys.readouterr().out
    assert m["epochs"][0]["val"]["samples"] == 6  # val/ holds 3 classes x 2 (was: 10% of train held out)
    assert f"val: {root / 'val'} (6 images; --val-fraction is not used)" in log
    assert f"train: {root / 'train'} (6 images)" in log and f"test: {root / 'test'} (6 images)" in log
    assert m["data_origins"]["val"].startswith(str(root / "val"))
    # without val/, part of train/ is held out, and the log says so
    plain = make_imagefolder_tree(tmp_path / "plain", 4)
    capsys.readouterr()
    run(tmp_path / "out2", "--data-root", str(plain))
    assert "images held out from the training split (--val-fraction 0.1, stratified)" in capsys.readouterr().out


def test_val_fraction_beside_a_val_folder_is_refused_not_ignored(tmp_path, make_imagefolder_tree, capsys):
    root = make_imagefolder_tree(tmp_path, 2, splits=("train", "val", "test"))
    line = _one_line_error([*TINY, "--data-root", str(root), "--val-fraction", "0.2", "--out",
                            str(tmp_path / "o")], capsys)  # fmt: skip
    assert line.startswith("error: --val-fraction 0.2:") and "own validation split" in line


# --------------------------------------------------------------------------------------
# The recipe of class folders
# --------------------------------------------------------------------------------------


def test_class_folders_get_a_recipe_that_learns_from_scratch_and_flags_win(tmp_path, make_imagefolder_tree):
    root = make_imagefolder_tree(tmp_path, 1)
    cfg, sources = config.resolve_config(["--data-root", str(root)])
    assert cfg["preset"] == "folder" and cfg["optimizer"] == "adamw" and cfg["scheduler"] == "cosine"
    assert cfg["lr"] == 3e-3 and cfg["batch_size"] == 32 and "from scratch" in cfg["preset_reason"]
    assert sources["lr"] == "preset:folder"
    cfg, sources = config.resolve_config(["--data-root", str(root), "--lr", "1e-3", "--epochs", "3"])
    assert cfg["lr"] == 1e-3 and sources["lr"] == "flag" and cfg["epochs"] == 3
    # with a pretrained backbone, the authors' RAF-DB recipe (SGD, lr 0.1) fine-tunes it
    cfg, _ = config.resolve_config(["--data-root", str(root), "--backbone-weights", "resnet18_msceleb.pth"])
    assert (
        cfg["preset"] == "rafdb" and cfg["optimizer"] == "sgd" and "--backbone-weights" in cfg["preset_reason"]
    )
    # and a --preset is never second-guessed
    cfg, _ = config.resolve_config(["--data", "imagefolder", "--data-root", str(root), "--preset", "demo"])
    assert cfg["preset"] == "demo" and cfg["preset_reason"] is None


def test_the_log_says_which_recipe_ran_and_why(tmp_path, make_imagefolder_tree, capsys):
    root = make_imagefolder_tree(tmp_path, 2)
    capsys.readouterr()
    run(tmp_path / "out", "--data-root", str(root))
    out = capsys.readouterr().out
    assert "recipe: folder (AdamW with a cosine schedule, from scratch: no --backbone-weights)" in out


# --------------------------------------------------------------------------------------
# Resume, eval-only
# --------------------------------------------------------------------------------------


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    first = run(out, *SYNTH, "--plots")
    files = sorted(p.name for p in out.iterdir())
    before = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in files}
    capsys.readouterr()
    again = run(out, *SYNTH, "--resume")  # was: re-evaluated, rewrote metrics and figures
    said = capsys.readouterr().out
    assert "is complete (1 of 1 epochs" in said and "nothing changed" in said
    assert sorted(p.name for p in out.iterdir()) == files
    assert {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in files} == before
    assert again["final"] == first["final"]


def test_times_add_up_over_the_sessions_of_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, *SYNTH, "--epochs", "2", "--stop-after-epoch", "1")
    m = run(out, *SYNTH, "--epochs", "2", "--resume")
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert m["train_seconds"] == pytest.approx(sum(e["seconds"] for e in m["epochs"]))
    assert m["train_seconds"] + m["eval_seconds"] <= m["total_seconds"]  # was: train 6.6 s ... total 4.3 s
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("time: ")][-1]
    assert "all sessions of the run" in summary


def test_eval_only_with_out_evaluates_its_best_pt(tmp_path, capsys):
    out = tmp_path / "run"
    m = run(out, *SYNTH, "--val-fraction", "0")
    e = train_dan.main([*TINY, *SYNTH, "--eval-only", "--out", str(out), "--overwrite"])
    assert (
        e["final"]["checkpoint"] == str(out / "best.pt")
        and e["config_sources"]["checkpoint"] == "--out's best.pt"
    )
    assert e["final"]["confusion_matrix"] == m["final"]["confusion_matrix"]
    line = _one_line_error([*TINY, *SYNTH, "--eval-only", "--out", str(tmp_path / "empty")], capsys)
    assert "--eval-only" in line and "best.pt" in line


# --------------------------------------------------------------------------------------
# Errors: argparse's too, and from Python
# --------------------------------------------------------------------------------------


def test_argparse_mistakes_are_one_line_and_status_1(capsys):
    line = _one_line_error(["--preset", "fast"], capsys)  # was: 36 lines of usage, status 2
    assert "invalid choice: 'fast'" in line and "see train_dan.py --help" in line
    assert "unrecognized arguments: --bogus" in _one_line_error(["--bogus"], capsys)


def test_a_python_caller_catches_a_user_error_and_goes_on(tmp_path):
    picture = save_image(tmp_path / "astronaut.jpg", astronaut())
    ours = save_our_checkpoint(tmp_path / "best.pt")
    argv = [str(picture), "--checkpoint", str(ours), "--out", str(tmp_path / "faces.jsonl"), *QUIET_CPU]
    predict.main(argv)
    caught = None
    try:
        predict.main(argv)  # the file exists: was a SystemExit that ended the caller's script
    except Exception as exc:  # noqa: BLE001 - what a user's script writes
        caught = exc
    assert isinstance(caught, utils.UsageError) and isinstance(caught, ValueError)
    assert caught.subject == f"--out {tmp_path / 'faces.jsonl'}" and "the file exists" in str(caught)
    assert len(json.loads((tmp_path / "faces.jsonl").read_text().splitlines()[0])["probabilities"]) == 3


def test_no_control_flow_on_message_text_and_no_system_exit_in_the_recipe():
    for path in sorted((EXAMPLES / "dan_recipe").glob("*.py")):
        text = path.read_text()
        assert "SystemExit" not in text, path.name
        for pattern in ("in str(exc)", "str(exc).partition", "str(exc).split", "re.sub(", "in str(e)"):
            assert pattern not in text, (path.name, pattern)


def test_best_pt_and_the_release_files_are_what_the_photo_commands_load(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, *SYNTH)
    picture = save_image(tmp_path / "astronaut.jpg", astronaut())
    for checkpoint in (out / "best.pt", out, out / "model.safetensors"):
        argv = [str(picture), "--checkpoint", str(checkpoint), *QUIET_CPU]
        assert utils.run_command(predict.main, argv) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert (
        len(records) == 3
        and records[0]["probabilities"] == records[1]["probabilities"] == records[2]["probabilities"]
    )


def test_makefile_demo_installs_only_what_the_demo_needs():
    text = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    recipe = text.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    stamp = recipe.split()[0]  # the prerequisite the demo runs after
    install = text.split(f"\n{stamp}:", 1)[1].split("\n\n", 1)[0]
    assert '".[examples]"' in install and "test" not in install and "docs" not in install
