"""examples/predict.py end to end, in-process: real photographs, a video, both checkpoint formats.

What issue 11 asks of it: every face of an image, JSON Lines and CSV that parse,
probabilities that sum to 1, a record for a picture without a face, video frames
with their index and time, ``--no-detect``, ``--annotate``, the authors' checkpoint
(class order from ``--labels`` or stated) and ours (class names inside), and a
one-line error with status 1 for every mistake.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import predict
import pytest
import torch
from dan_recipe import photos as recipe_photos
from dan_recipe import records, transforms, utils
from photo_helpers import (
    ASTRONAUT_FACE,
    CLASS_NAMES,
    EXAMPLES,
    QUIET_CPU,
    astronaut,
    coffee,
    run_cli,
    save_authors_checkpoint,
    save_image,
    save_our_checkpoint,
    two_faces,
    write_video,
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    save_image(root / "astronaut.jpg", astronaut())
    save_image(root / "two.png", two_faces())
    save_image(root / "coffee.jpg", coffee()[::2, ::2])
    frames = [np.ascontiguousarray(astronaut()[::2, ::2])] * 4 + [
        np.ascontiguousarray(coffee()[:256, :256])
    ] * 2
    write_video(root / "clip.avi", frames, fps=4.0)
    return root


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return save_our_checkpoint(tmp_path_factory.mktemp("ours") / "best.pt")


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_every_face_gets_a_record_and_a_faceless_photo_gets_an_empty_one(photos, ours, capsys):
    argv = [str(photos / n) for n in ("astronaut.jpg", "two.png", "coffee.jpg")]
    status, out, err = run_cli(predict.main, [*argv, "--checkpoint", str(ours), *QUIET_CPU], capsys)
    assert status == 0, err
    records = _jsonl(out)
    assert [(r["source"].rsplit("/", 1)[-1], r["face"]) for r in records] == [
        ("astronaut.jpg", 0), ("two.png", 0), ("two.png", 1), ("coffee.jpg", None)]  # fmt: skip
    for r in records[:3]:
        assert list(r["probabilities"]) == list(CLASS_NAMES)  # the names saved in our checkpoint
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["frame"] is None and r["time_s"] is None
    assert all(abs(a - b) <= 6 for a, b in zip(records[0]["box"], ASTRONAUT_FACE, strict=True))
    assert records[3] == {"source": str(photos / "coffee.jpg"), "frame": None, "time_s": None, "face": None,
                          "box": None, "label": None, "probabilities": None}  # fmt: skip
    assert "3 images" in err and "3 faces" in err and "1 picture without a face" in err


def test_probabilities_are_the_models_on_the_crop(photos, ours, capsys):
    argv = [str(photos / "astronaut.jpg"), "--checkpoint", str(ours), *QUIET_CPU]
    status, out, _ = run_cli(predict.main, argv, capsys)
    (record,) = _jsonl(out)
    net, info = recipe_photos.load_checkpoint_for_inference(str(ours), fast=False)
    crop = recipe_photos.crop_face(
        recipe_photos.read_image(photos / "astronaut.jpg"), records.Box(*record["box"])
    )
    x = transforms.eval_transform(info.image_size, info.mean, info.std)(crop)[None]
    with torch.no_grad():
        expected = torch.softmax(net(x)[0], 1)[0].tolist()
    assert status == 0
    np.testing.assert_allclose(list(record["probabilities"].values()), expected, atol=2e-6)


def test_video_frames_every_n_with_index_and_time_as_csv(photos, ours, tmp_path, capsys):
    out_csv = tmp_path / "faces.csv"
    argv = [
        str(photos / "clip.avi"),
        "--every",
        "2",
        "--checkpoint",
        str(ours),
        "--out",
        str(out_csv),
        *QUIET_CPU,
    ]
    status, out, err = run_cli(predict.main, argv, capsys)
    assert status == 0 and out == "", err
    with out_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["source", "frame", "time_s", "face", "x", "y", "w", "h", "label", *CLASS_NAMES]
    assert [(r["frame"], r["time_s"], r["face"]) for r in rows] == [("0", "0.0", "0"), ("2", "0.5", "0"),
                                                                   ("4", "1.0", "")]  # fmt: skip
    for r in rows[:2]:
        assert abs(sum(float(r[c]) for c in CLASS_NAMES) - 1) < 1e-5 and int(r["w"]) > 32
    assert rows[2]["x"] == rows[2]["label"] == rows[2][CLASS_NAMES[0]] == ""
    assert "1 video (3 frames)" in err


def test_authors_checkpoint_no_detect_and_a_stated_class_order(tmp_path, capsys):
    path = save_authors_checkpoint(tmp_path / "epoch21.pth", num_classes=7)
    crop = save_image(tmp_path / "test_0001_aligned.jpg", astronaut()[40:190, 150:300])
    argv = [str(crop), "--no-detect", "--checkpoint", str(path), *QUIET_CPU]
    status, out, err = run_cli(predict.main, argv, capsys)
    assert status == 0, err
    (record,) = _jsonl(out)
    assert record["box"] == [0, 0, 150, 150] and tuple(record["probabilities"]) == utils.RAFDB_CLASSES
    assert "using the rafdb order" in err and "--labels" in err  # the default is said, not silent
    status, out, err = run_cli(predict.main, [*argv, "--labels", "affectnet7"], capsys)
    assert status == 0 and tuple(_jsonl(out)[0]["probabilities"]) == utils.AFFECTNET_CLASSES[:7]
    assert "note:" not in err


def test_authors_eight_classes_are_affectnet_and_file_names_pick_the_order(tmp_path, capsys):
    eight = save_authors_checkpoint(tmp_path / "affecnet8_epoch5_acc0.6209.pth", num_classes=8, num_heads=1)
    crop = save_image(tmp_path / "face.png", astronaut()[40:190, 150:300])
    status, out, err = run_cli(
        predict.main, [str(crop), "--no-detect", "--checkpoint", str(eight), *QUIET_CPU], capsys
    )
    assert status == 0 and tuple(_jsonl(out)[0]["probabilities"]) == utils.AFFECTNET_CLASSES, err
    assert recipe_photos.authors_seven_class_default("affecnet7_epoch6_acc0.6569.pth")[0] == "affectnet7"
    assert recipe_photos.authors_seven_class_default("rafdb_epoch21_acc0.897_bacc0.8532.pth")[0] == "rafdb"


def test_annotate_draws_every_picture_and_out_file_is_not_overwritten(photos, ours, tmp_path, capsys):
    from PIL import Image

    out_file, folder = tmp_path / "faces.jsonl", tmp_path / "annotated"
    argv = [str(photos / "two.png"), str(photos / "coffee.jpg"), "--checkpoint", str(ours), "--out",
            str(out_file), "--annotate", str(folder), *QUIET_CPU]  # fmt: skip
    assert run_cli(predict.main, argv, capsys)[0] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["coffee.jpg", "two.jpg"]
    drawn = np.asarray(Image.open(folder / "two.jpg"))
    assert drawn.shape == two_faces().shape and np.abs(drawn.astype(int) - two_faces()).max() > 100
    first = out_file.read_text()
    status, _, err = run_cli(predict.main, argv, capsys)
    assert status == 1 and "--out" in err and "exists" in err and "--overwrite" in err
    assert out_file.read_text() == first
    assert run_cli(predict.main, [*argv, "--overwrite"], capsys)[0] == 0
    assert len(_jsonl(out_file.read_text())) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def _mistake(name: str, tmp, photos, ours) -> tuple[list[str], list[str]]:
    image = str(photos / "astronaut.jpg")
    if name == "missing input":
        return [str(tmp / "nope.jpg"), "--checkpoint", str(ours)], ["nope.jpg", "does not exist"]
    if name == "glob matches nothing":
        return [str(tmp / "*.heic"), "--checkpoint", str(ours)], ["*.heic", "matches none"]
    if name == "missing checkpoint":
        return [image, "--checkpoint", str(tmp / "best.pt")], ["--checkpoint", "best.pt", "does not exist"]
    if name == "garbage checkpoint":
        (tmp / "garbage.pt").write_bytes(b"\x80\x02garbage" * 20)
        return [image, "--checkpoint", str(tmp / "garbage.pt")], ["--checkpoint", "garbage.pt", "cannot read"]
    if name == "not a DAN checkpoint":
        torch.save({"model_state_dict": {"w": torch.zeros(2)}}, tmp / "other.pt")
        return [image, "--checkpoint", str(tmp / "other.pt")], ["--checkpoint", "other.pt", "cat_head"]
    if name == "labels that do not fit":
        return [image, "--checkpoint", str(ours), "--labels", "a,b"], ["--labels a,b", "expected 3 names"]
    if name == "unknown output format":
        return [image, "--checkpoint", str(ours), "--out", str(tmp / "out.txt")], ["--out", ".jsonl", ".csv"]
    if name == "bad flag value":
        return [image, "--checkpoint", str(ours), "--every", "0"], ["--every", ">= 1", "got 0"]
    if name == "no checkpoint flag":
        return [image], ["--checkpoint", "required"]
    if name == "annotate is a file":
        (tmp / "file.txt").write_text("x")
        return [image, "--checkpoint", str(ours), "--annotate", str(tmp / "file.txt")], [
            "--annotate",
            "got a file",
        ]
    if name == "nothing readable":
        (tmp / "broken.jpg").write_bytes(b"nope")
        return [str(tmp / "broken.jpg"), "--checkpoint", str(ours)], ["nothing could be read", "broken.jpg"]
    raise AssertionError(name)


MISTAKES = ["missing input", "glob matches nothing", "missing checkpoint", "garbage checkpoint",
            "not a DAN checkpoint", "labels that do not fit", "unknown output format", "bad flag value",
            "no checkpoint flag", "annotate is a file", "nothing readable"]  # fmt: skip


@pytest.mark.parametrize("name", MISTAKES)
def test_a_mistake_is_one_line_and_status_1(name, tmp_path, photos, ours, capsys):
    argv, expected = _mistake(name, tmp_path, photos, ours)
    status, out, err = run_cli(predict.main, [*argv, *QUIET_CPU], capsys)
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: skipped")]
    assert status == 1 and out == "", err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in err and "weights_only=False" not in err


def test_an_unreadable_file_among_good_ones_is_reported_and_counted(photos, ours, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    argv = [str(tmp_path / "broken.png"), str(photos / "astronaut.jpg"), "--checkpoint", str(ours), *QUIET_CPU]
    status, out, err = run_cli(predict.main, argv, capsys)
    assert status == 0 and len(_jsonl(out)) == 1
    assert f"warning: skipped {tmp_path / 'broken.png'}: not an image file" in err
    assert "1 unreadable file skipped" in err


def test_the_script_itself(photos, ours, tmp_path):
    """The real command: JSON on stdout, and a one-line error with status 1."""
    script = str(EXAMPLES / "predict.py")
    argv = [sys.executable, script, str(photos / "astronaut.jpg"), "--checkpoint", str(ours), *QUIET_CPU]
    ok = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stderr
    assert _jsonl(ok.stdout)[0]["face"] == 0
    bad = subprocess.run([sys.executable, script, str(tmp_path / "nope"), "--checkpoint", str(ours)],
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")


def test_threads_auto_is_decided_once_and_said(photos, ours, capsys):
    before = torch.get_num_threads()
    argv = [str(photos / "astronaut.jpg"), "--checkpoint", str(ours), "--threads", "auto", "--no-progress"]
    try:
        status, out, err = run_cli(predict.main, argv, capsys)
    finally:
        torch.set_num_threads(before)
    assert status == 0, err
    assert "threads: " in err and "(auto: " in err
    assert len(_jsonl(out)) == 1
