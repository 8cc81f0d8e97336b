"""dan_recipe's synthetic_faces, transforms, data (readers), samplers and reporting (metrics).

Everything is tiny (16..48 px images, a few dozen files); the whole file runs in
seconds on two cores.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from dan_recipe import data, synthetic, transforms, utils
from torch.utils.data import DataLoader

SEEDS = (0, 1, 2, 3, 11)

# --------------------------------------------------------------------------------------
# synthetic faces
# --------------------------------------------------------------------------------------


class TestSyntheticDesign:
    def test_table_is_complete_and_valid(self):
        assert list(synthetic.REGION_STATES) == list(synthetic.CLASS_NAMES)
        assert synthetic.CLASS_NAMES == (
            "Surprise",
            "Fear",
            "Disgust",
            "Happiness",
            "Sadness",
            "Anger",
            "Neutral",
        )
        for name, states in synthetic.REGION_STATES.items():
            assert set(states) == set(synthetic.REGIONS), name
            for r, s in states.items():
                assert s in synthetic.REGION_VALUES[r], (name, r, s)
        assert synthetic.region_states(3) == synthetic.REGION_STATES["Happiness"]

    def test_all_classes_distinct_by_table(self):
        rows = {tuple(synthetic.REGION_STATES[c][r] for r in synthetic.REGIONS) for c in synthetic.CLASS_NAMES}
        assert len(rows) == 7
        assert synthetic.confusable_pairs() == []

    @pytest.mark.parametrize("region", synthetic.REGIONS)
    def test_hiding_any_region_merges_two_classes_by_table(self, region):
        pairs = synthetic.confusable_pairs(region)
        assert pairs, f"hiding {region} leaves every class distinguishable"
        for i, j in pairs:
            si, sj = synthetic.region_states(i), synthetic.region_states(j)
            assert si[region] != sj[region]
            assert all(si[r] == sj[r] for r in synthetic.REGIONS if r != region)

    def test_no_region_alone_decides(self):
        # every region state that occurs is shared by at least two classes or, if unique,
        # the class is still told apart by another region
        for region in synthetic.REGIONS:
            used = [synthetic.REGION_STATES[c][region] for c in synthetic.CLASS_NAMES]
            assert len(set(used)) < 7, region

    @pytest.mark.parametrize("region", synthetic.REGIONS)
    def test_hidden_region_gives_identical_images(self, region):
        for i, j in synthetic.confusable_pairs(region):
            for seed in SEEDS:
                a = synthetic.render_face(i, np.random.default_rng(seed), 40, hidden_regions=(region,))
                b = synthetic.render_face(j, np.random.default_rng(seed), 40, hidden_regions=(region,))
                np.testing.assert_array_equal(a, b)
                # with the region visible the same pair differs (the region carries the cue)
                a = synthetic.render_face(i, np.random.default_rng(seed), 40)
                b = synthetic.render_face(j, np.random.default_rng(seed), 40)
                assert (a != b).any(axis=-1).sum() >= 4, (region, i, j, seed)

    @pytest.mark.parametrize("region", synthetic.REGIONS)
    def test_hidden_region_keeps_other_classes_apart(self, region):
        pairs = set(synthetic.confusable_pairs(region))
        imgs = [
            synthetic.render_face(k, np.random.default_rng(5), 40, hidden_regions=(region,)) for k in range(7)
        ]
        for i, j in itertools.combinations(range(7), 2):
            if (i, j) not in pairs:
                assert not np.array_equal(imgs[i], imgs[j]), (region, i, j)

    @pytest.mark.parametrize("seed", SEEDS)
    def test_all_classes_distinct_in_pixels(self, seed):
        imgs = [synthetic.render_face(k, np.random.default_rng(seed), 48).astype(np.int16) for k in range(7)]
        for i, j in itertools.combinations(range(7), 2):
            differing = (np.abs(imgs[i] - imgs[j]).max(axis=-1) > 30).sum()
            assert differing >= 6, (seed, i, j, differing)

    def test_render_output_and_determinism(self):
        a = synthetic.render_face(2, 7, 33)
        assert a.shape == (33, 33, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, synthetic.render_face(2, 7, 33))
        assert not np.array_equal(a, synthetic.render_face(2, 8, 33))
        assert a.std() > 10  # not a blank canvas

    def test_render_errors(self):
        with pytest.raises(ValueError, match="label"):
            synthetic.render_face(7, 0, 32)
        with pytest.raises(ValueError, match="size"):
            synthetic.render_face(0, 0, 8)
        with pytest.raises(ValueError, match="hidden_regions"):
            synthetic.render_face(0, 0, 32, hidden_regions=("ears",))
        with pytest.raises(ValueError, match="label"):
            synthetic.region_states(-1)


class TestSyntheticDataset:
    def test_balanced_labels_and_len(self):
        ds = synthetic.SyntheticFaces(52, 24, seed=3)
        assert len(ds) == 52 and ds.classes == list(synthetic.CLASS_NAMES)
        counts = np.bincount(ds.targets, minlength=7)
        assert counts.max() - counts.min() <= 1 and counts.sum() == 52
        assert ds.targets != sorted(ds.targets)  # shuffled

    def test_sample_is_pure_function_of_seed_split_index(self):
        a = synthetic.SyntheticFaces(21, 24, seed=1, split="train")
        b = synthetic.SyntheticFaces(21, 24, seed=1, split="train")
        xs = [a[i] for i in (5, 0, 20)]
        ys = [b[i] for i in (20, 5, 0)]
        torch.testing.assert_close(xs[0][0], ys[1][0], rtol=0, atol=0)
        torch.testing.assert_close(xs[2][0], ys[0][0], rtol=0, atol=0)
        assert xs[0][1] == ys[1][1]
        x, y = a[3]
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and isinstance(y, int)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0

    def test_splits_and_seeds_differ(self):
        tr = synthetic.SyntheticFaces(14, 24, seed=1, split="train")
        te = synthetic.SyntheticFaces(14, 24, seed=1, split="test")
        other = synthetic.SyntheticFaces(14, 24, seed=2, split="train")
        assert not torch.equal(tr[0][0], te[0][0])
        assert not torch.equal(tr[0][0], other[0][0])

    def test_transform_and_hidden_regions(self):
        tf = data.build_transforms("demo", 20, train=False)
        ds = synthetic.SyntheticFaces(7, 32, transform=tf, hidden_regions=("mouth",))
        x, _ = ds[0]
        assert x.shape == (3, 20, 20)
        assert x.min() < 0  # normalised
        ref = synthetic.render_face(ds.targets[0], np.random.default_rng([0, 0, 0]), 32, ("mouth",))
        np.testing.assert_array_equal(ds.render(0), ref)

    def test_errors(self):
        with pytest.raises(ValueError, match="split"):
            synthetic.SyntheticFaces(7, 32, split="validation")
        with pytest.raises(ValueError, match="num_samples"):
            synthetic.SyntheticFaces(0, 32)
        with pytest.raises(IndexError):
            synthetic.SyntheticFaces(7, 32)[7]


# --------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


RANDOM_TRANSFORMS = {
    "flip": lambda g: data.RandomHorizontalFlip(generator=g),
    "rotation": lambda g: data.RandomRotation(20, generator=g),
    "crop": lambda g: data.RandomCrop(24, padding=4, generator=g),
    "erasing": lambda g: data.RandomErasing(p=1.0, scale=(0.02, 0.25), generator=g),
    "affine": lambda g: data.RandomAffine(20, translate=(0.2, 0.2), scale=(0.8, 1.0), generator=g),
    "apply": lambda g: data.RandomApply([data.RandomRotation(20, generator=g)], p=0.5, generator=g),
}


class TestTransforms:
    @pytest.mark.parametrize("name", sorted(RANDOM_TRANSFORMS))
    def test_shape_and_determinism(self, name):
        x = torch.rand(3, 24, 24)
        xb = torch.rand(6, 3, 24, 24)
        make = RANDOM_TRANSFORMS[name]
        assert make(gen()).__call__(x).shape == x.shape
        assert make(gen())(xb).shape == xb.shape
        torch.testing.assert_close(make(gen(4))(xb), make(gen(4))(xb), rtol=0, atol=0)
        outs = [make(gen(s))(xb) for s in range(4)]
        assert any(not torch.equal(outs[0], o) for o in outs[1:])

    def test_batch_draws_per_image(self):
        xb = torch.rand(1, 3, 16, 16).expand(32, 3, 16, 16).contiguous()
        out = data.RandomHorizontalFlip(generator=gen())(xb)
        flipped = [torch.equal(o, xb[0].flip(-1)) for o in out]
        assert 0 < sum(flipped) < 32

    def test_to_tensor(self):
        from PIL import Image

        arr = (np.arange(4 * 5 * 3) % 256).astype(np.uint8).reshape(4, 5, 3)
        t = transforms.ToTensor()(arr)
        assert t.shape == (3, 4, 5) and t.dtype == torch.float32
        torch.testing.assert_close(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
        torch.testing.assert_close(transforms.ToTensor()(Image.fromarray(arr)), t)
        torch.testing.assert_close(transforms.ToTensor()(torch.from_numpy(arr).permute(2, 0, 1)), t)
        assert transforms.ToTensor()(t) is t
        assert transforms.ToTensor()(np.zeros((4, 5), np.uint8)).shape == (1, 4, 5)

    def test_resize_normalize(self):
        x = torch.rand(3, 40, 30)
        assert transforms.Resize(16)(x).shape == (3, 16, 16)
        assert transforms.Resize((10, 12))(x[None]).shape == (1, 3, 10, 12)
        const = torch.full((3, 40, 30), 0.3)
        torch.testing.assert_close(transforms.Resize(8)(const), torch.full((3, 8, 8), 0.3))
        n = transforms.Normalize()(torch.ones(3, 2, 2))
        expect = [(1 - m) / s for m, s in zip(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD, strict=True)]
        torch.testing.assert_close(n[:, 0, 0], torch.tensor(expect))
        with pytest.raises(ValueError, match="channels"):
            transforms.Normalize()(torch.ones(1, 2, 2))

    def test_rotation_geometry(self):
        x = torch.rand(2, 3, 9, 9)
        out = data.RandomRotation((90, 90))(x)
        torch.testing.assert_close(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(data.RandomRotation(0)(x), x, atol=1e-6, rtol=0)
        filled = data.RandomRotation((45, 45), fill=0.7)(torch.zeros(1, 1, 16, 16))
        assert abs(float(filled[0, 0, 0, 0]) - 0.7) < 1e-5  # a corner comes from outside

    def test_affine_identity_and_translation(self):
        x = torch.rand(1, 3, 12, 12)
        ident = data.RandomAffine(0, translate=(0.0, 0.0), scale=(1.0, 1.0))(x)
        torch.testing.assert_close(ident, x, atol=1e-6, rtol=0)

    def test_crop_and_erasing_details(self):
        x = torch.rand(3, 16, 16)
        torch.testing.assert_close(data.RandomCrop(16)(x), x)
        padded = data.RandomCrop(16, padding=8, generator=gen(1))(torch.ones(16, 3, 16, 16))
        assert (padded == 0).any()  # some crops show the padding
        er = data.RandomErasing(p=1.0, scale=(0.1, 0.2), value=-5.0, generator=gen(2))(
            torch.zeros(8, 3, 32, 32)
        )
        frac = (er == -5.0).float().mean(dim=(1, 2, 3))
        assert bool(((frac > 0.05) & (frac < 0.3)).all()), frac
        assert torch.equal(data.RandomErasing(p=0.0)(x), x)

    @pytest.mark.parametrize("preset", data.AUGMENT_PRESETS)
    def test_presets(self, preset):
        img = torch.rand(3, 50, 40)
        tr = data.build_transforms(preset, 32, train=True, generator=gen())
        ev = data.build_transforms(preset, 32, train=False)
        assert tr(img).shape == (3, 32, 32)
        assert ev(img).shape == (3, 32, 32)
        torch.testing.assert_close(ev(img), ev(img))
        a = data.build_transforms(preset, 32, train=True, generator=gen(9))
        b = data.build_transforms(preset, 32, train=True, generator=gen(9))
        for _ in range(3):
            torch.testing.assert_close(a(img), b(img), rtol=0, atol=0)
        r = repr(tr)
        assert "Normalize" in r and "RandomHorizontalFlip" in r

    def test_rafdb_preset_matches_recipe(self):
        tf = data.build_transforms("rafdb", 224, train=True)
        kinds = [type(t).__name__ for t in tf.transforms]
        assert kinds == [
            "ToTensor",
            "Resize",
            "RandomHorizontalFlip",
            "RandomApply",
            "Normalize",
            "RandomErasing",
        ]
        app = tf.transforms[3]
        assert app.p == 0.2 and [type(t).__name__ for t in app.transforms] == ["RandomRotation", "RandomCrop"]
        assert app.transforms[1].padding == 32 and tf.transforms[-1].scale == (0.02, 0.25)
        aff = data.build_transforms("affectnet", 224, train=True).transforms[3]
        assert aff.p == 0.7 and type(aff.transforms[0]).__name__ == "RandomAffine"

    def test_errors(self):
        with pytest.raises(ValueError, match="preset"):
            data.build_transforms("imagenet", 32, True)
        with pytest.raises(ValueError, match="probability"):
            data.RandomHorizontalFlip(p=1.5)
        with pytest.raises(ValueError, match="at least"):
            data.RandomCrop(40)(torch.rand(3, 16, 16))
        with pytest.raises(ValueError, match=r"\(C, H, W\)"):
            transforms.Resize(8)(torch.rand(16, 16))
        with pytest.raises(TypeError):
            transforms.Resize(8)(np.zeros((3, 8, 8), np.float32))


# --------------------------------------------------------------------------------------
# file datasets
# --------------------------------------------------------------------------------------


class TestRafDB:
    def test_reads_tree(self, tmp_path, make_rafdb_tree):
        root = make_rafdb_tree(tmp_path, 14, n_test=9)
        tr, te = data.RafDB(root, "train"), data.RafDB(root, "test")
        assert len(tr) == 14 and len(te) == 9
        assert tr.targets == [i % 7 for i in range(14)]
        assert tr.classes == list(utils.RAFDB_CLASSES) and tr.classes[0] == "Surprise"
        x, y = tr[3]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 3
        tf = data.build_transforms("rafdb", 24, train=True)
        x, _ = data.RafDB(root, "test", transform=tf)[0]
        assert x.shape == (3, 24, 24)

    def test_three_columns(self, tmp_path, make_rafdb_tree):
        root = make_rafdb_tree(tmp_path, 7, columns=3)
        assert data.RafDB(root, "train").targets == list(range(7))

    @pytest.mark.parametrize(
        ("line", "match"),
        [
            ("train_00001.jpg 8", "label in 1..7"),
            ("train_00001.jpg 0", "label in 1..7"),
            ("train_00001.jpg -1", "label in 1..7"),
            ("train_00001.jpg happy", "integer label"),
            ("train_00001.jpg", "2 or 3 columns"),
            ("train_00001.jpg 1 2 3", "2 or 3 columns"),
        ],
    )
    def test_bad_label_lines(self, tmp_path, make_rafdb_tree, line, match):
        root = make_rafdb_tree(tmp_path, 3, n_test=1)
        f = root / "EmoLabel" / "list_patition_label.txt"
        lines = f.read_text().splitlines()
        lines[1] = line
        f.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=match) as e:
            data.RafDB(root, "train")
        assert "list_patition_label.txt:2" in str(e.value)

    def test_parse_skips_blank_lines(self, tmp_path):
        f = tmp_path / "labels.txt"
        f.write_text("\ntrain_00001.jpg 1\n\n test_00002.jpg 7 x \n")
        assert data.parse_rafdb_labels(f) == [("train_00001.jpg", 0), ("test_00002.jpg", 6)]

    def test_layout_errors(self, tmp_path, make_rafdb_tree):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            data.RafDB(tmp_path / "nowhere")
        root = make_rafdb_tree(tmp_path, 3, n_test=1)
        with pytest.raises(ValueError, match="split"):
            data.RafDB(root, "val")
        (root / "Image" / "aligned" / "train_00002_aligned.jpg").unlink()
        with pytest.raises(FileNotFoundError, match=r"1 images .* missing.*train_00002_aligned.jpg"):
            data.RafDB(root, "train")
        data.RafDB(root, "test")  # the other split is complete
        (root / "Image" / "aligned").rename(root / "Image" / "original")
        with pytest.raises(FileNotFoundError, match=r"Image/aligned.*contains: original/"):
            data.RafDB(root, "train")
        (root / "EmoLabel" / "list_patition_label.txt").unlink()
        with pytest.raises(FileNotFoundError, match="list_patition_label.txt"):
            data.RafDB(root, "train")

    def test_corrupt_images_are_skipped(self, tmp_path, make_rafdb_tree):
        root = make_rafdb_tree(tmp_path, 10, n_test=1, corrupt=2)
        ds = data.RafDB(root, "train")
        with pytest.warns(RuntimeWarning, match="train_00001_aligned.jpg"):
            assert ds[0] is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ds[0] is None  # warned once per file
        with pytest.warns(RuntimeWarning):
            batches = list(DataLoader(ds, batch_size=4, collate_fn=data.collate_skip_none))
        assert sum(b[1].numel() for b in batches if b is not None) == 8
        assert data.collate_skip_none([None, None]) is None
        with pytest.raises(OSError, match="cannot read image"):
            data.RafDB(root, "train", on_error="raise")[1]


class TestAffectNet:
    def test_eight_and_seven_classes(self, tmp_path, make_affectnet_tree):
        root = make_affectnet_tree(tmp_path, 2)
        ds8 = data.AffectNet(root, "train")
        assert len(ds8) == 16 and ds8.classes == list(utils.AFFECTNET_CLASSES)
        assert sorted(set(ds8.targets)) == list(range(8))
        ds7 = data.AffectNet(root, "val", num_classes=7)
        assert len(ds7) == 14 and max(ds7.targets) == 6 and "Contempt" not in ds7.classes
        x, y = ds7[13]
        assert x.shape == (3, 32, 32) and y == 6

    def test_order_matches_design(self):
        assert utils.AFFECTNET_CLASSES == (
            "Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt",
        )  # fmt: skip

    def test_errors(self, tmp_path, make_affectnet_tree):
        root = make_affectnet_tree(tmp_path, 1, splits=("train",))
        with pytest.raises(FileNotFoundError, match=r"<0..7>.*contains: train/"):
            data.AffectNet(root, "val")
        with pytest.raises(ValueError, match="num_classes"):
            data.AffectNet(root, "train", num_classes=5)
        with pytest.raises(ValueError, match="split"):
            data.AffectNet(root, "dev")
        bad = tmp_path / "bad" / "train" / "happy"
        bad.mkdir(parents=True)
        with pytest.raises(ValueError, match=r"no class folder 0..7.*happy/"):
            data.AffectNet(tmp_path / "bad", "train")

    def test_missing_class_warns(self, tmp_path, make_affectnet_tree):
        root = make_affectnet_tree(tmp_path, 1, splits=("train",), num_folders=6)
        with pytest.warns(RuntimeWarning, match=r"\[6, 7\]"):
            ds = data.AffectNet(root, "train")
        assert len(ds) == 6


class TestImageFolder:
    def test_reads_sorted_classes(self, tmp_path, make_imagefolder_tree):
        root = make_imagefolder_tree(tmp_path, 2, classes=("b_sad", "a_happy", "c_neutral"), splits=None)
        (root / "a_happy" / "notes.txt").write_text("not an image")
        ds = data.ImageFolder(root)
        assert ds.classes == ["a_happy", "b_sad", "c_neutral"]
        assert ds.targets == [0, 0, 1, 1, 2, 2] and len(ds) == 6
        assert ds[0][0].shape == (3, 32, 32)

    def test_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            data.ImageFolder(tmp_path / "missing")
        (tmp_path / "empty").mkdir()
        with pytest.raises(ValueError, match="no class folder.*is empty"):
            data.ImageFolder(tmp_path / "empty")
        (tmp_path / "noimg" / "cls").mkdir(parents=True)
        with pytest.raises(ValueError, match="no images"):
            data.ImageFolder(tmp_path / "noimg")


# --------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------


class TestBuildDataset:
    def test_synthetic(self):
        ds = data.build_dataset("synthetic", None, "train", 24, num_samples=14, seed=1)
        assert len(ds) == 14 and ds.classes == list(synthetic.CLASS_NAMES)
        assert ds[0][0].shape == (3, 24, 24)
        te = data.build_dataset("synthetic", None, "test", 24, preset="demo")
        assert len(te) == 700
        with pytest.raises(ValueError, match="7 classes"):
            data.build_dataset("synthetic", None, "train", 24, num_classes=8)

    def test_file_kinds(self, tmp_path, make_rafdb_tree, make_affectnet_tree, make_imagefolder_tree):
        r = data.build_dataset("rafdb", make_rafdb_tree(tmp_path, 7, n_test=3), "test", 20)
        assert len(r) == 3 and r[0][0].shape == (3, 20, 20)
        a = data.build_dataset("affectnet", make_affectnet_tree(tmp_path, 1), "test", 20, num_classes=7)
        assert len(a) == 7 and a.split == "val"  # no test folder: val
        root = make_imagefolder_tree(tmp_path, 1, splits=("Train", "Val"))
        f = data.build_dataset("imagefolder", root, "test", 20, preset="affectnet")
        assert len(f) == 3 and f[0][0].shape == (3, 20, 20)
        assert len(data.build_dataset("imagefolder", root, "train", 20, num_classes=3)) == 3
        with pytest.raises(ValueError, match="num_classes=4"):
            data.build_dataset("imagefolder", root, "train", 20, num_classes=4)
        with pytest.raises(FileNotFoundError, match="imagefolder split 'extra'"):
            data.build_dataset("imagefolder", root, "extra", 20)

    def test_errors(self, tmp_path):
        with pytest.raises(ValueError, match="kind"):
            data.build_dataset("fer2013", tmp_path)
        with pytest.raises(ValueError, match="root"):
            data.build_dataset("rafdb", None)


# --------------------------------------------------------------------------------------
# sampler
# --------------------------------------------------------------------------------------


class TestClassBalancedSampler:
    LABELS = [0] * 900 + [1] * 90 + [2] * 9 + [5] * 1

    def test_balance(self):
        s = data.ClassBalancedSampler(self.LABELS, num_samples=40_000, seed=0)
        drawn = torch.tensor(self.LABELS)[torch.tensor(list(s))]
        counts = torch.bincount(drawn, minlength=6)[[0, 1, 2, 5]].double()
        # expected 10_000 each; binomial sd ~87, so 5 % is > 5 sd
        assert torch.all((counts - 10_000).abs() < 500), counts
        assert len(s) == 40_000

    def test_epochs_are_deterministic(self):
        s = data.ClassBalancedSampler(torch.tensor(self.LABELS), seed=3)
        e0 = list(s)
        assert list(s) == e0 and len(e0) == len(self.LABELS)
        s.set_epoch(1)
        e1 = list(s)
        assert e1 != e0
        t = data.ClassBalancedSampler(self.LABELS, seed=3)
        t.set_epoch(1)
        assert list(t) == e1
        assert list(data.ClassBalancedSampler(self.LABELS, seed=4)) != e0

    def test_shards_cover_the_global_draw(self):
        shards = [data.ClassBalancedSampler(self.LABELS, 1001, seed=1, rank=r, world_size=3) for r in range(3)]
        for s in shards:
            s.set_epoch(2)
        lists = [list(s) for s in shards]
        assert [len(x) for x in lists] == [334] * 3 == [len(s) for s in shards]
        glob = shards[0].global_indices()
        assert len(glob) == 1002
        merged = [lists[i % 3][i // 3] for i in range(1002)]
        assert merged == glob

    def test_errors(self):
        with pytest.raises(ValueError, match="non-empty"):
            data.ClassBalancedSampler([])
        with pytest.raises(ValueError, match="rank"):
            data.ClassBalancedSampler([0, 1], rank=2, world_size=2)
        with pytest.raises(ValueError, match="num_samples"):
            data.ClassBalancedSampler([0, 1], num_samples=0)


# --------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------


class TestMetrics:
    def test_confusion_matrix(self):
        cm = utils.confusion_matrix(torch.tensor([0, 1, 2, 2, 1]), torch.tensor([0, 1, 1, 2, 2]), 3)
        assert cm.dtype == torch.int64
        assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
        logits = torch.tensor([[2.0, 0.1], [0.0, 1.0]])
        assert utils.confusion_matrix(logits, [1, 1], 2).tolist() == [[0, 0], [1, 1]]
        assert utils.confusion_matrix([], [], 4).sum() == 0
        with pytest.raises(ValueError, match=r"targets in \[0, 3\)"):
            utils.confusion_matrix([0], [3], 3)
        with pytest.raises(ValueError, match="as many"):
            utils.confusion_matrix([0, 1], [0], 3)

    def test_imbalanced_accuracy_vs_balanced(self):
        # 90 of class 0 all right, 10 of class 1 all predicted as 0
        cm = torch.tensor([[90, 0], [10, 0]])
        assert utils.accuracy_from_confusion(cm) == pytest.approx(0.9)
        assert utils.balanced_accuracy_from_confusion(cm) == pytest.approx(0.5)

    def test_known_three_class(self):
        cm = torch.tensor([[8, 1, 1], [2, 6, 2], [0, 0, 5]])
        assert utils.accuracy_from_confusion(cm) == pytest.approx(19 / 25)
        assert utils.balanced_accuracy_from_confusion(cm) == pytest.approx((0.8 + 0.6 + 1.0) / 3)
        torch.testing.assert_close(
            utils.per_class_recall(cm), torch.tensor([0.8, 0.6, 1.0], dtype=torch.float64)
        )

    def test_classes_without_samples_are_excluded(self):
        cm = torch.tensor([[3, 1, 0], [0, 0, 0], [0, 2, 2]])  # class 1 has no samples but gets predictions
        assert utils.balanced_accuracy_from_confusion(cm) == pytest.approx((0.75 + 0.5) / 2)
        assert math.isnan(utils.per_class_recall(cm)[1])
        assert math.isnan(utils.balanced_accuracy_from_confusion(torch.zeros(3, 3, dtype=torch.long)))
        assert math.isnan(utils.accuracy_from_confusion(torch.zeros(3, 3, dtype=torch.long)))
        with pytest.raises(ValueError, match="square"):
            utils.accuracy_from_confusion(torch.zeros(2, 3))

    def test_matches_model_predictions_roundtrip(self):
        g = gen(0)
        t = torch.randint(0, 5, (200,), generator=g)
        p = torch.where(torch.rand(200, generator=g) < 0.7, t, torch.randint(0, 5, (200,), generator=g))
        cm = utils.confusion_matrix(p, t, 5)
        assert utils.accuracy_from_confusion(cm) == pytest.approx(float((p == t).double().mean()))
        recalls = [float((p[t == k] == k).double().mean()) for k in range(5)]
        assert utils.balanced_accuracy_from_confusion(cm) == pytest.approx(sum(recalls) / 5)


def test_modules_do_not_import_torchvision():
    import sys

    assert "torchvision" not in sys.modules or all(
        "torchvision" not in (getattr(m, "__file__", "") or "") for m in (data, transforms, synthetic)
    )
    for mod in (data, transforms, synthetic):
        src = Path(mod.__file__).read_text()
        assert "import torchvision" not in src and "from torchvision" not in src
    for path in sorted(Path(data.__file__).parent.glob("*.py")):  # every module of the recipe
        src = path.read_text()
        assert "import torchvision" not in src and "from torchvision" not in src, path.name


def test_face_tree_writes_class_folders_per_split_and_never_overwrites(tmp_path):
    from PIL import Image

    written = synthetic.write_face_tree(tmp_path, {"train": 2, "val": 1, "test": 1}, size=32)
    assert written == {"train": 14, "val": 7, "test": 7}
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == sorted(synthetic.CLASS_NAMES)
        for name in synthetic.CLASS_NAMES:
            files = sorted((tmp_path / split / name).iterdir())
            assert len(files) == n and all(Image.open(f).size == (32, 32) for f in files)
    # the tree reads back as the recipe's class folders, one class per folder
    ds = data.ImageFolder(tmp_path / "train")
    assert ds.classes == sorted(synthetic.CLASS_NAMES) and len(ds) == 14
    # splits draw from their own streams: no test face is a training face
    train_px = {Image.open(f).tobytes() for f in (tmp_path / "train").rglob("*.png")}
    assert not train_px & {Image.open(f).tobytes() for f in (tmp_path / "test").rglob("*.png")}
    with pytest.raises(FileExistsError, match="already there"):
        synthetic.write_face_tree(tmp_path, {"train": 2}, size=32)
    fresh = tmp_path / "fresh"
    first = synthetic.CLASS_NAMES[synthetic.SyntheticFaces(7, 32, split="test").targets[0]]
    taken = fresh / "test" / first / "test_00000.png"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"mine")  # one name taken: nothing is written, nothing replaced
    with pytest.raises(FileExistsError, match="already there"):
        synthetic.write_face_tree(fresh, {"train": 1, "test": 1}, size=32)
    assert [p for p in fresh.rglob("*") if p.is_file()] == [taken] and taken.read_bytes() == b"mine"


def _synthetic_command(args, cwd):
    import subprocess
    import sys

    command = [sys.executable, "-m", "dan_recipe.synthetic", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["{out}", "--size", "big"],
        ["{out}", "--size", "8"],
        ["{out}", "--train", "-1"],
        ["{out}", "--bogus"],
        ["{out}", "--train", "0", "--val", "0", "--test", "0"],
    ],
)
def test_synthetic_command_says_a_mistake_in_one_line(tmp_path, args):
    out = tmp_path / "faces"
    res = _synthetic_command([a.format(out=out) for a in args], Path(synthetic.__file__).parent.parent)
    assert res.returncode == 1 and res.stdout == "" and not out.exists()  # a refused command makes nothing
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr


def test_synthetic_command_help_and_tree(tmp_path):
    examples = Path(synthetic.__file__).parent.parent
    res = _synthetic_command(["--help"], examples)  # was: a folder named --help holding 7 PNGs
    assert res.returncode == 0 and "--train" in res.stdout and "--seed" in res.stdout
    assert not (examples / "--help").exists()
    out = tmp_path / "faces"
    res = _synthetic_command([str(out), "--train", "2", "--val", "0", "--test", "1", "--size", "24"], examples)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    assert len(list((out / "train").rglob("*.png"))) == 14 and len(list((out / "test").rglob("*.png"))) == 7
