"""What a person sees (issue 17): explain.py's figure, annotated pictures, and a word on synthetic models.

* The figure shows the crop once, at the model's input size; each row of maps has
  one colour scale with its bar; heads are numbered from 0 as in the training
  figure; each panel says what it is and how many cells it has, and a 2x2 map says
  it is too coarse; a caption says what each row shows.
* Annotations are sized with the picture, from 320 px to 4K, and a picture without
  a face carries a mark.
* A model that learnt from synthetic faces makes both commands say, once, that its
  labels say nothing about real faces.
"""

from __future__ import annotations

import itertools

import explain
import numpy as np
import pytest
import torch
from dan_recipe import figures, photos, records
from photo_helpers import QUIET_CPU, astronaut, coffee, run_cli, save_image, save_our_checkpoint


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


@pytest.mark.parametrize("cells", [4, 2])
def test_the_head_figure_says_what_every_panel_is(cells):
    import matplotlib.pyplot as plt

    k, size = 3, 16 * cells
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    attention, gradcam = rng.random((k, cells, cells)) * 50, rng.random((k, cells, cells)) * 3
    fig = figures.head_figure(crop, attention, gradcam, predicted="predicted: joy 0.91", target_name="joy")
    titles = _titles(fig)
    coarse = ", too coarse for regions" if cells <= figures.COARSE_CELLS else ""
    assert titles[0] == f"model input, {size} x {size} px\npredicted: joy 0.91"
    assert titles[1:] == [f"head {h}: attention\n{cells}x{cells} cells{coarse}" for h in range(k)] + [
        f"head {h}: Grad-CAM++\nfor joy\n{cells}x{cells} cells{coarse}" for h in range(k)
    ]
    # the crop once, in colour, pixel for pixel; every map at its own resolution, over a grey face
    colour = [im for ax in fig.axes for im in ax.get_images() if im.get_array().ndim == 3]
    assert len(colour) == 1 and colour[0].get_array().shape == (size, size, 3)
    maps = [ax.get_images()[1] for ax in fig.axes if len(ax.get_images()) == 2]
    assert len(maps) == 2 * k and all(m.get_array().shape == (cells, cells) for m in maps)
    # one colour scale per row (its maximum), two colour maps, two bars
    for row, values in enumerate((attention, gradcam)):
        assert {m.get_clim() for m in maps[row * k : (row + 1) * k]} == {(0.0, float(values.max()))}
    assert maps[0].get_cmap().name != maps[k].get_cmap().name
    bars = [ax for ax in fig.axes if ax.get_ylabel() in ("attention weight", "Grad-CAM++")]
    assert len(bars) == 2
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "Top: each head's spatial attention map" in caption and "Bottom: Grad-CAM++" in caption
    assert "numbered as in train_dan.py's attention_maps.png" in caption
    plt.close(fig)


@pytest.mark.parametrize("heads", [4, 8])
def test_the_head_figures_panel_titles_do_not_run_into_each_other(heads):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    crop = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    maps = rng.random((heads, 2, 2))
    fig = figures.head_figure(crop, maps, maps, predicted="predicted: Happiness 0.91", target_name="Happiness")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_title().startswith("head ")]
    for row in (panels[:heads], panels[heads:]):
        boxes = [ax.title.get_window_extent(renderer) for ax in row]
        for left, right in itertools.pairwise(boxes):
            assert left.x1 < right.x0, f"titles overlap: {left} and {right}"
    plt.close(fig)


def test_the_training_figure_numbers_heads_from_0_too(tmp_path):
    from dan_recipe import model as recipe_model
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    net = recipe_model.DAN(num_classes=3, num_heads=2).eval()
    ds = TensorDataset(torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 2]))
    import matplotlib.pyplot as plt

    seen = []
    original = plt.Figure.savefig

    def keep(fig, *a, **k):
        seen.extend(ax.get_title() for ax in fig.axes if ax.get_title().startswith("head"))
        return original(fig, *a, **k)

    plt.Figure.savefig = keep
    try:
        figures.plot_attention(net, ds, ["a", "b", "c"], tmp_path / "a.png", torch.device("cpu"), rows=3)
    finally:
        plt.Figure.savefig = original
    assert seen == ["head 0", "head 1"]


def test_explain_draws_the_maps_at_the_feature_map_resolution(tmp_path, capsys, monkeypatch):
    picture = save_image(tmp_path / "astronaut.png", astronaut())
    ours = save_our_checkpoint(tmp_path / "best.pt", num_heads=2, image_size=64)
    calls = []
    monkeypatch.setattr(explain, "write_head_figure", lambda path, crop, att, cam, **kw: calls.append(
        (crop.shape, att.shape, cam.shape)))  # fmt: skip
    argv = [str(picture), "--checkpoint", str(ours), "--out", str(tmp_path / "o"), *QUIET_CPU]
    status, _, err = run_cli(explain.main, argv, capsys)
    assert status == 0, err
    assert calls == [((64, 64, 3), (2, 2, 2), (2, 2, 2))]  # was: both upsampled to the crop, (2, 64, 64)


@pytest.mark.parametrize(("height", "width"), [(240, 320), (480, 640), (1080, 1920), (2160, 3840)])
def test_labels_follow_the_picture_and_keep_their_letters_open(height, width):
    import cv2

    scale, stroke, line = records.label_style(height, width)
    _, cap = cv2.getTextSize("H", cv2.FONT_HERSHEY_SIMPLEX, scale, stroke)[0]
    assert 11 <= cap <= max(11, 0.05 * min(height, width))  # readable at 320 px, not shouting at 4K
    assert cap >= 0.025 * min(height, width) or cap >= 11  # grows with the picture
    assert stroke <= cap / 8  # 640x480 was a 2 px stroke on 12 px letters: "Sadness" read "Sodness"
    assert line >= stroke


def test_a_picture_without_a_face_is_marked_and_faces_are_drawn(tmp_path):
    empty = coffee()
    marked = records.draw_faces(empty, [])
    changed = np.argwhere((marked != empty).any(axis=2))
    assert changed.size and changed[:, 0].max() < 0.15 * empty.shape[0]  # a label in the top-left corner
    assert changed[:, 1].max() < 0.6 * empty.shape[1]
    face = records.draw_faces(astronaut(), [(records.Box(176, 65, 96, 96), "Happiness", 0.9)])
    assert (face[65, 176:272] != astronaut()[65, 176:272]).any()  # the box's top edge


def test_a_note_goes_on_the_bottom_left_of_an_annotated_picture():
    picture = astronaut()
    face = [(records.Box(176, 65, 96, 96), "Happiness", 0.9)]
    plain, noted = records.draw_faces(picture, face), records.draw_faces(picture, face, note="a note")
    changed = np.argwhere((noted != plain).any(axis=2))
    assert changed.size and changed[:, 0].min() > 0.85 * picture.shape[0]  # a strip at the bottom
    assert changed[:, 1].max() < 0.6 * picture.shape[1]
    long = "model of synthetic faces: labels mean nothing here"  # wider than a 512 px picture's letters
    strip = records.draw_faces(picture, [], note=long)[-40:]
    orange = np.argwhere((strip == records._NO_FACE_RGB).all(axis=2))  # the strip ends inside the picture
    assert orange.size and orange[:, 1].max() < picture.shape[1] - 2  # (cut-off letters ran to the edge)


@pytest.mark.parametrize("data", ["synthetic", "imagefolder"])
def test_what_a_synthetic_model_draws_says_so_too(data, tmp_path, capsys, monkeypatch):
    import predict

    picture = save_image(tmp_path / "astronaut.png", astronaut())
    ours = save_our_checkpoint(tmp_path / "best.pt", data=data)
    notes, titles = [], []
    draw = records.draw_faces
    monkeypatch.setattr(
        predict, "draw_faces", lambda rgb, faces, note=None: notes.append(note) or draw(rgb, faces)
    )
    monkeypatch.setattr(explain, "write_head_figure", lambda *a, predicted, **kw: titles.append(predicted))
    argv = [str(picture), "--checkpoint", str(ours), *QUIET_CPU]
    assert run_cli(predict.main, [*argv, "--annotate", str(tmp_path / "a")], capsys)[0] == 0
    assert run_cli(explain.main, [*argv, "--out", str(tmp_path / "e")], capsys)[0] == 0
    assert notes and titles
    if data == "synthetic":
        assert set(notes) == {photos.SYNTHETIC_NOTE}
        assert all(t.endswith("model of synthetic faces:\nlabels mean nothing here") for t in titles)
    else:
        assert set(notes) == {None} and all(t.count("\n") == 0 for t in titles)


@pytest.mark.parametrize("data", ["synthetic", "imagefolder"])
def test_a_synthetic_model_says_once_that_its_labels_mean_nothing(data, tmp_path, capsys):
    import predict

    picture = save_image(tmp_path / "astronaut.png", astronaut())
    ours = save_our_checkpoint(tmp_path / "best.pt", data=data)
    for main, extra in ((predict.main, []), (explain.main, ["--out", str(tmp_path / "explained")])):
        status, _, err = run_cli(main, [str(picture), "--checkpoint", str(ours), *extra, *QUIET_CPU], capsys)
        assert status == 0, err
        warnings = [line for line in err.splitlines() if "learnt from synthetic" in line]
        if data == "synthetic":
            assert len(warnings) == 1 and warnings[0].startswith("warning: --checkpoint")
            assert "its labels say nothing about real faces" in warnings[0]
        else:
            assert warnings == []
