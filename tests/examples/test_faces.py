"""Face detection (OpenCV's Haar cascade) on real photographs, and the crops given to the model.

Photographs from scikit-image's sample data: the astronaut portrait (one frontal
face), a composite holding her face twice, and a coffee cup (no face).
"""

from __future__ import annotations

import numpy as np
import pytest
from dan_recipe import photos, records
from photo_helpers import ASTRONAUT_FACE, astronaut, coffee, two_faces


@pytest.fixture(scope="module")
def detector():
    return photos.FaceDetector()


def _near(box, expected, tol=6):
    return all(abs(a - b) <= tol for a, b in zip(box, expected, strict=True))


def test_the_portrait_has_one_face_where_it_is(detector):
    (box,) = detector(astronaut())
    assert _near(box, ASTRONAUT_FACE), box


def test_every_face_of_a_picture_is_found_left_to_right(detector):
    boxes = detector(two_faces())
    assert len(boxes) == 2, boxes
    left, right = boxes
    assert left.x < right.x and right.x > 300  # one per half, sorted by x
    assert abs(left.w - right.w) <= 4  # a mirror image has the same size


def test_a_photo_without_a_face_has_none(detector):
    assert detector(coffee()) == []


def test_min_face_drops_faces_smaller_than_it():
    small = np.ascontiguousarray(astronaut()[::2, ::2])  # the face is now about 48 px
    assert len(photos.FaceDetector(min_face=32)(small)) == 1
    assert photos.FaceDetector(min_face=64)(small) == []


def test_detector_rejects_bad_settings_and_pictures(detector):
    for kwargs in ({"min_face": 0}, {"scale_factor": 1.0}, {"min_neighbors": -1}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            photos.FaceDetector(**kwargs)
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector(np.zeros((10, 10), np.uint8))


def test_crop_is_a_square_with_the_margin_and_repeats_the_edge():
    rgb = np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3)
    box = records.Box(10, 20, 20, 20)
    crop = photos.crop_face(rgb, box, margin=0.25)  # 20 * 1.5 = 30 px, from (5, 15)
    np.testing.assert_array_equal(crop, rgb[15:45, 5:35])
    corner = photos.crop_face(rgb, records.Box(0, 0, 20, 20), margin=0.5)  # 40 px from (-10, -10)
    assert corner.shape == (40, 40, 3)
    np.testing.assert_array_equal(corner[:10, :10], np.broadcast_to(rgb[0, 0], (10, 10, 3)))
    np.testing.assert_array_equal(corner[10:, 10:], rgb[:30, :30])
    with pytest.raises(ValueError, match="margin"):
        photos.crop_face(rgb, box, margin=-0.1)
