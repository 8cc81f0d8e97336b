"""Every split is read with one class list: the training split's, or an evaluated checkpoint's.

Issue 10, item 1: each image folder used to build its own class-to-index map, so
with ``test/b`` missing from a train {a, b, c} tree the test images of ``c`` were
scored as ``b``, and train {a, b} with test {a, c} ran silently.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import train_dan
from dan_recipe import config, data, utils
from tiny_runs import TINY

FOLDERS = ["--data", "imagefolder", "--no-balanced-sampler", "--augment", "none", "--val-fraction", "0"]


def _cfg(root: Path, *extra: str) -> dict:
    cfg, _ = config.resolve_config([*TINY, *FOLDERS, "--data-root", str(root), *extra])
    return cfg


def test_test_split_is_labelled_by_the_training_classes(tmp_path, make_imagefolder_tree):
    root = make_imagefolder_tree(tmp_path, 3, classes=("a", "b", "c"))
    shutil.rmtree(root / "test" / "b")
    run = data.build_run_data(_cfg(root))
    assert run.class_names == ["a", "b", "c"]
    assert data.dataset_labels(run.test) == [0, 0, 0, 2, 2, 2]  # c stays class 2
    assert run.classes_without_samples["test"] == ["b"]


def test_a_run_scores_the_missing_class_row_empty(tmp_path, make_imagefolder_tree, capsys):
    root = make_imagefolder_tree(tmp_path, 3, classes=("a", "b", "c"))
    shutil.rmtree(root / "test" / "b")
    m = train_dan.main([*TINY, *FOLDERS, "--data-root", str(root), "--out", str(tmp_path / "run")])
    cm = m["final"]["confusion_matrix"]
    assert len(cm) == 3 and sum(cm[1]) == 0  # no test image of b: its row stays empty
    assert [sum(row) for row in cm] == [3, 0, 3]
    assert m["classes_without_samples"]["test"] == ["b"]
    assert "test split: no images of b" in capsys.readouterr().out


def test_a_test_class_that_training_lacks_is_an_error(tmp_path, make_imagefolder_tree):
    root = make_imagefolder_tree(tmp_path, 2, classes=("a", "b"))
    (root / "test" / "b").rename(root / "test" / "c")
    with pytest.raises(
        utils.RecipeError, match=r"test split has class folders 'c' that the training split lacks"
    ):
        train_dan.main([*TINY, *FOLDERS, "--data-root", str(root), "--out", str(tmp_path / "run")])


def test_eval_only_maps_the_test_split_by_the_checkpoint_classes(tmp_path, make_imagefolder_tree):
    root = make_imagefolder_tree(tmp_path, 3, classes=("a", "b", "c"))
    train_dan.main([*TINY, *FOLDERS, "--data-root", str(root), "--out", str(tmp_path / "run")])
    shutil.rmtree(root / "test" / "a")  # the test folder now sorts as [b, c]
    ckpt = str(tmp_path / "run" / "last.pt")
    m = train_dan.main([*TINY, "--eval-only", "--checkpoint", ckpt, "--out", str(tmp_path / "eval")])
    assert m["class_names"] == ["a", "b", "c"]
    assert [sum(row) for row in m["final"]["confusion_matrix"]] == [0, 3, 3]
    (root / "test" / "b").rename(root / "test" / "d")
    with pytest.raises(utils.RecipeError, match=r"class folders 'd' that the checkpoint .*last\.pt lacks"):
        train_dan.main([*TINY, "--eval-only", "--checkpoint", ckpt, "--out", str(tmp_path / "eval2")])


def test_image_folder_reader_with_a_class_list(tmp_path, make_imagefolder_tree):
    root = make_imagefolder_tree(tmp_path, 1, classes=("a", "c"), splits=None)
    ds = data.ImageFolder(root, classes=["a", "b", "c"])
    assert ds.classes == ["a", "b", "c"] and ds.targets == [0, 2] and ds.missing_classes == ["b"]
    with pytest.raises(data.UnknownClassesError, match=r"\['c'\]") as err:
        data.ImageFolder(root, classes=["a", "b"])
    assert err.value.unknown == ["c"]
