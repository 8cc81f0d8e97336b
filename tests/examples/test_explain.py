"""examples/explain.py end to end, in-process: one PNG per face with a panel per head, and the saved maps.

Issue 11: per face, each head's spatial attention map and Grad-CAM++ of its attended
features for the predicted class (``--target`` for another); ``--save-maps`` writes
``attention`` (K, h, w) at the feature-map resolution and ``gradcam`` (K, S, S) at
the crop's; an ``--out`` that already holds files is refused unless ``--overwrite``.
"""

from __future__ import annotations

import json

import explain
import numpy as np
import pytest
import torch
from dan_recipe import gradcam, records
from dan_recipe import photos as recipe_photos
from photo_helpers import (
    CLASS_NAMES,
    QUIET_CPU,
    astronaut,
    coffee,
    run_cli,
    save_authors_checkpoint,
    save_image,
    two_faces,
)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    from photo_helpers import save_our_checkpoint

    return save_our_checkpoint(tmp_path_factory.mktemp("ours") / "best.pt", num_heads=3, image_size=64)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    save_image(root / "a" / "face.png", two_faces())
    save_image(root / "b" / "face.png", astronaut())
    save_image(root / "coffee.jpg", coffee()[::2, ::2])
    return root


def test_one_png_and_npz_per_face_with_the_maps_of_every_head(photos, ours, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "explained"
    argv = [str(photos), "--checkpoint", str(ours), "--out", str(out), "--save-maps", *QUIET_CPU]
    status, _, err = run_cli(explain.main, argv, capsys)
    assert status == 0, err
    # two sources share the stem "face": the second gets -2; the faceless coffee writes nothing
    assert sorted(p.name for p in out.iterdir()) == [
        "face-2_face0.npz", "face-2_face0.png", "face_face0.npz", "face_face0.png", "face_face1.npz",
        "face_face1.png", explain.INDEX_NAME]  # fmt: skip
    index = [json.loads(line) for line in (out / explain.INDEX_NAME).read_text().splitlines()]
    assert [(r["source"].rsplit("/", 2)[-2], r["face"], r["png"]) for r in index] == [
        ("a", 0, "face_face0.png"), ("a", 1, "face_face1.png"), ("b", 0, "face-2_face0.png")]  # fmt: skip
    maps = np.load(out / "face-2_face0.npz")
    assert maps["attention"].shape == (3, 2, 2)  # K heads at the feature-map resolution (64 px / 32)
    assert maps["gradcam"].shape == (3, 64, 64) and maps["crop"].shape == (64, 64, 3)
    assert (maps["gradcam"] >= 0).all() and maps["gradcam"].max() > 0
    assert tuple(maps["class_names"]) == CLASS_NAMES and int(maps["target"]) == int(
        maps["probabilities"].argmax()
    )
    assert index[2]["target"] == index[2]["label"] == CLASS_NAMES[int(maps["target"])]
    png = np.asarray(Image.open(out / "face-2_face0.png"))
    assert png.shape[1] > 3 * png.shape[0] / 2  # 2 rows of K + 1 = 4 panels
    assert "3 faces" in err and "1 picture without a face" in err


def test_saved_maps_are_those_of_the_model_for_the_target(photos, ours, tmp_path, capsys):
    out = tmp_path / "explained"
    argv = [str(photos / "b" / "face.png"), "--checkpoint", str(ours), "--out", str(out), "--save-maps",
            "--target", CLASS_NAMES[2].upper(), *QUIET_CPU]  # fmt: skip
    assert run_cli(explain.main, argv, capsys)[0] == 0
    saved = np.load(out / "face_face0.npz")
    net, info = recipe_photos.load_checkpoint_for_inference(str(ours), fast=False)
    classifier = recipe_photos.FaceClassifier(net, info)
    (box,) = [json.loads(line)["box"] for line in (out / explain.INDEX_NAME).read_text().splitlines()]

    crop = recipe_photos.crop_face(recipe_photos.read_image(photos / "b" / "face.png"), records.Box(*box))
    expected = gradcam.explain_heads(net, classifier.batch([crop]), target=2)
    assert int(saved["target"]) == 2
    np.testing.assert_allclose(saved["attention"], expected.attention[0].numpy(), rtol=1e-4, atol=1e-5)
    cam = gradcam.upsample_maps(expected.gradcam[0], 64).numpy()
    np.testing.assert_allclose(saved["gradcam"], cam, rtol=1e-3, atol=1e-4 * cam.max())


def test_an_out_folder_with_files_is_refused_unless_overwrite(photos, ours, tmp_path, capsys):
    out = tmp_path / "explained"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    argv = [str(photos / "b" / "face.png"), "--checkpoint", str(ours), "--out", str(out), *QUIET_CPU]
    status, _, err = run_cli(explain.main, argv, capsys)
    assert status == 1 and err.startswith("error: --out") and "--overwrite" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert run_cli(explain.main, [*argv, "--overwrite"], capsys)[0] == 0
    assert (out / "mine.txt").read_text() == "keep me" and (out / "face_face0.png").is_file()


def test_authors_checkpoint_with_no_detect_and_a_bad_target(tmp_path, capsys):
    path = save_authors_checkpoint(tmp_path / "rafdb_epoch21.pth", num_classes=7, num_heads=2)
    crop = save_image(tmp_path / "crop.jpg", astronaut()[40:190, 150:300])
    argv = [str(crop), "--no-detect", "--checkpoint", str(path), "--out", str(tmp_path / "x"), *QUIET_CPU]
    status, _, err = run_cli(explain.main, [*argv, "--target", "Joy"], capsys)
    assert status == 1 and "--target Joy" in err and "Happiness" in err
    status, _, err = run_cli(explain.main, [*argv, "--target", "3", "--overwrite", "--save-maps"], capsys)
    assert status == 0, err
    saved = np.load(tmp_path / "x" / "crop_face0.npz")
    assert saved["attention"].shape == (2, 7, 7) and saved["gradcam"].shape == (2, 224, 224)
    assert str(saved["class_names"][int(saved["target"])]) == "Happiness"
    assert torch.equal(torch.as_tensor(saved["box"]), torch.tensor([0, 0, 150, 150]))
