"""``recipe_model.load_model``: one call for our checkpoints and the authors', ready for inference.

Issue 10, item 6: a checkpoint of ours loaded into ``DAN`` only after stripping
``model.`` from every key by hand. ``load_model`` returns the model in eval mode
and what its preprocessing needs; ``transforms.eval_transform`` is that preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import train_dan
from dan_recipe import data, synthetic, transforms, utils
from dan_recipe import model as recipe_model
from tiny_runs import TINY

SYNTH = ["--data", "synthetic", "--synthetic-train", "28", "--synthetic-test", "14", "--val-fraction", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    return out, train_dan.main([*TINY, *SYNTH, "--num-heads", "2", "--out", str(out)])


def test_our_checkpoint_loads_with_its_preprocessing(trained):
    out, metrics = trained
    net, info = recipe_model.load_model(out / "best.pt")
    assert isinstance(net, recipe_model.DAN) and not net.training
    assert (net.num_classes, net.num_heads, info.num_heads) == (7, 2, 2)
    assert info.class_names == tuple(metrics["class_names"]) == synthetic.CLASS_NAMES
    assert (info.image_size, info.mean, info.std) == (32, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
    assert info.source == "dan-layers" and info.epoch == 1 and info.path == str(out / "best.pt")
    # the run's own test predictions, recomputed from raw test faces with eval_transform
    faces = synthetic.SyntheticFaces(14, 32, seed=0, split="test")
    preprocess = transforms.eval_transform(info.image_size, info.mean, info.std)
    images = torch.stack([preprocess(faces.render(i)) for i in range(len(faces))])
    with torch.no_grad():
        pred = net(images)[0].argmax(1)
    assert utils.confusion_matrix(pred, faces.targets, 7).tolist() == metrics["final"]["confusion_matrix"]


def test_our_checkpoint_without_the_preprocessing_record_still_loads(trained):
    out, _ = trained
    raw = torch.load(out / "last.pt", weights_only=True)
    del raw["preprocessing"]  # checkpoints written before load_model existed
    _, info = recipe_model.load_model(raw, labels=["a", "b", "c", "d", "e", "f", "g"])
    assert info.image_size == 32 and info.mean == transforms.IMAGENET_MEAN
    assert info.class_names == ("a", "b", "c", "d", "e", "f", "g") and info.path == ""


def test_authors_checkpoint_loads_with_their_preprocessing(tmp_path):
    torch.manual_seed(0)
    ref = recipe_model.DAN(num_classes=7, num_heads=2).eval()
    path = tmp_path / "rafdb_epoch21_acc0.897.pth"
    torch.save({"iter": 21, "model_state_dict": recipe_model.to_official_state_dict(ref)}, path)
    net, info = recipe_model.load_model(path, labels="rafdb", num_classes=7)
    assert info.class_names == utils.RAFDB_CLASSES and info.source == "authors" and info.epoch == 21
    assert (info.image_size, info.num_heads) == (224, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(
        recipe_model.LabelsNeededError, match=r"labels: expected labels .*RAF-DB and AffectNet-7 order"
    ):
        recipe_model.load_model(path)
    with pytest.raises(ValueError, match="expected a checkpoint with 8 classes, got 7"):
        recipe_model.load_model(path, labels="rafdb", num_classes=8)
    with pytest.raises(ValueError, match="expected 7 names"):
        recipe_model.load_model(path, labels=["a", "b"])


def test_authors_eight_class_checkpoint_defaults_to_affectnet_names(tmp_path):
    state = recipe_model.to_official_state_dict(recipe_model.DAN(num_classes=8, num_heads=1))
    net, info = recipe_model.load_model({"model_state_dict": state}, device="cpu")
    assert info.class_names == utils.AFFECTNET_CLASSES and net.num_classes == 8


def test_unreadable_files_say_why_without_unsafe_advice(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02garbage" * 20)
    with pytest.raises(utils.CheckpointError) as err:
        recipe_model.load_model(bad)
    assert "weights_only=False" not in str(err.value) and "bad.pt" in str(err.value)
    with pytest.raises(
        utils.InputError, match="missing.pt: expected a checkpoint, got a path that does not exist"
    ):
        recipe_model.load_model(tmp_path / "missing.pt")


def test_eval_transform_takes_any_image():
    tf = transforms.eval_transform(40)
    arr = (np.arange(60 * 50 * 3) % 256).astype(np.uint8).reshape(60, 50, 3)
    x = tf(arr)
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32
    torch.testing.assert_close(x, data.build_transforms("rafdb", 40, train=False)(arr))
    with pytest.raises(ValueError, match="image_size"):
        transforms.eval_transform(4)
