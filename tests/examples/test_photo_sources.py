"""Inputs of predict.py / explain.py: expanding files, folders and globs; reading images and video frames.

Issue 11: images, folders (recursive), globs and videos mixed in one call, every N-th
frame, unreadable files reported and skipped, a missing input a one-line error.
"""

from __future__ import annotations

import numpy as np
import pytest
from dan_recipe import photos, utils
from photo_helpers import astronaut, save_image, write_video


def _tree(tmp_path):
    small = astronaut()[::8, ::8]
    save_image(tmp_path / "a" / "one.jpg", small)
    save_image(tmp_path / "a" / "deep" / "two.png", small)
    save_image(tmp_path / "a" / ".hidden" / "three.png", small)
    (tmp_path / "a" / "notes.txt").write_text("not a picture")
    write_video(tmp_path / "b" / "clip.avi", [small] * 3)
    return tmp_path


def test_files_folders_and_globs_expand_in_order_each_once(tmp_path):
    root = _tree(tmp_path)
    found = photos.expand_inputs(
        [str(root / "b" / "clip.avi"), str(root / "a"), str(root / "a" / "**" / "*.png")]
    )
    names = [(s.path.name, s.kind) for s in found]
    # the folder is searched recursively (hidden folders and other files left out); the
    # glob's match two.png was already found, so it is not repeated
    assert names == [("clip.avi", "video"), ("two.png", "image"), ("one.jpg", "image")]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: str(p / "missing.jpg"), "does not exist"),
        (lambda p: str(p / "*.nothing"), "matches none"),
        (lambda p: str(p / "a" / "deep" / ".." / "empty"), "found none"),
    ],
)
def test_inputs_that_name_nothing_are_user_errors(tmp_path, make, expected):
    (tmp_path / "a" / "empty").mkdir(parents=True)
    (tmp_path / "a" / "deep").mkdir()
    with pytest.raises(utils.InputError, match=expected) as err:
        photos.expand_inputs([make(tmp_path)])
    assert str(tmp_path) in str(err.value)


def test_read_image_applies_exif_orientation(tmp_path):
    from PIL import Image

    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(rgb).save(tmp_path / "phone.jpg", exif=exif)
    shown = photos.read_image(tmp_path / "phone.jpg")
    assert shown.shape == (40, 20, 3) and shown.dtype == np.uint8
    assert shown[:15].mean() > 200 and shown[-15:].mean() < 50  # the white half is now on top


def test_unreadable_files_are_reported_and_skipped(tmp_path):
    save_image(tmp_path / "good.png", astronaut()[::16, ::16])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    found = photos.expand_inputs([str(tmp_path)])
    skipped = []
    pictures = list(
        photos.iter_pictures(found, on_unreadable=lambda s, why: skipped.append((s.path.name, why)))
    )
    assert [p.source for p in pictures] == [str(tmp_path / "good.png")]
    # FFmpeg's own complaint is quoted in the reason (and kept off the terminal)
    assert dict(skipped) == {
        "broken.jpg": "not an image file that PIL can decode",
        "broken.mp4": "OpenCV cannot open it as a video (FFmpeg/OpenCV: moov atom not found)",
    }


def test_video_frames_every_n_with_their_times(tmp_path):
    frames = [np.full((32, 48, 3), 10 * i, np.uint8) for i in range(7)]
    path = write_video(tmp_path / "clip.avi", frames, fps=5.0)
    assert photos.video_frame_count(path) == 7
    got = list(photos.iter_video_frames(path, every=3))
    assert [(p.frame, p.time_s) for p in got] == [(0, 0.0), (3, 0.6), (6, 1.2)]
    for p in got:
        assert p.rgb.shape == (32, 48, 3) and abs(float(p.rgb.mean()) - 10 * p.frame) < 3  # MJPG is lossy
    with pytest.raises(ValueError, match="every"):
        next(photos.iter_video_frames(path, every=0))
