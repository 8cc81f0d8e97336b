"""The data of a run: its train / validation / test datasets, class list and loaders.

* The **class list** comes from the training split (or, for ``--eval-only`` with one
  of our checkpoints, from the checkpoint), and every other split is read with it,
  so label ``k`` names one class everywhere. A test class that the list lacks is an
  error; a listed class without test images is allowed and reported (its row of the
  confusion matrix stays empty).
* The **validation split** is a stratified ``--val-fraction`` of the training split,
  read without augmentation; the test split is never used to choose anything. When
  it is empty (``--val-fraction 0``, or too few images per class) the run reports
  its last epoch and says so.
* Mistakes in ``--data-root`` (no such directory, a file, a layout that does not
  match, a bad label line, a listed image missing) become one-line
  user errors that name the flag and the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from . import data as readers
from . import transforms as T
from .distributed import Dist
from .errors import UserError
from .samplers import ClassBalancedSampler, EpochShuffleSampler, ShardSampler

__all__ = ["Loaders", "RenderCache", "RunData", "build_loaders", "build_run_data", "stratified_split"]


@dataclass
class RunData:
    """The datasets of a run.

    Attributes:
        train: Training split (augmented), ``None`` for ``--eval-only``.
        val: Validation split, or ``None`` (then ``no_validation`` says why).
        test: Test split.
        class_names: Names in label order; every split uses them.
        no_validation: Why there is no validation split, or ``None``.
        classes_without_samples: For each split, the classes it has no sample of.
        collate: The loaders' collate function (drops unreadable images).
    """

    train: Dataset | None
    val: Dataset | None
    test: Dataset
    class_names: list[str]
    no_validation: str | None = None
    classes_without_samples: dict[str, list[str]] = field(default_factory=dict)
    collate: Callable[[Sequence[Any]], Any] = readers.collate_skip_none


class RenderCache(Dataset):
    """Synthetic faces rendered once and kept (uint8), the transform applied per access.

    A synthetic sample is a pure function of its index, so caching changes nothing
    but the time: rendering is then paid once instead of once per epoch.
    """

    def __init__(self, faces: Any) -> None:
        self.faces = faces
        self.targets = list(faces.targets)
        self.classes = list(faces.classes)
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = self._cache.get(index)
        if img is None:
            img = torch.from_numpy(self.faces.render(index)).permute(2, 0, 1).contiguous()
            self._cache[index] = img
        x = img.float().div_(255.0)
        if self.faces.transform is not None:
            x = self.faces.transform(x)
        return x, self.targets[index]


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)``: ``fraction`` of every class (at least 1 if it has 2+)."""
    g = torch.Generator().manual_seed(seed + 7919)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, val = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        k = round(len(idx) * fraction)
        if fraction > 0 and k == 0 and len(idx) >= 2:
            k = 1
        val.extend(perm[:k])
        train.extend(perm[k:])
    return sorted(train), sorted(val)


# --------------------------------------------------------------------------------------
# Reading the splits, with one-line errors
# --------------------------------------------------------------------------------------


def _check_data_root(cfg: Mapping[str, Any]) -> None:
    kind, n = cfg["data"], cfg["num_classes"]
    if kind == "affectnet" and n not in (None, 7, 8):
        raise UserError(f"--num-classes {n}: expected 7 or 8 for AffectNet, got {n}")
    if kind == "synthetic":
        return
    root = Path(cfg["data_root"])
    what = f"expected the {kind} dataset directory"
    if not root.exists():
        raise UserError(f"--data-root {root}: {what}, got a path that does not exist")
    if not root.is_dir():
        raise UserError(f"--data-root {root}: {what}, got a file")


def _read_split(
    cfg: Mapping[str, Any], split: str, *, train: bool, classes: Sequence[str] | None, whose: str
) -> Dataset:
    """One split through ``data.build_dataset``; a reader's error becomes a ``UserError``."""
    kind = cfg["data"]
    kw: dict[str, Any] = {}
    if kind == "synthetic":
        kw = {
            "num_samples": cfg["synthetic_train" if split == "train" else "synthetic_test"],
            "seed": cfg["seed"],
        }
    if cfg["augment"] == "none":
        kw["transform"] = T.build_transforms("demo", cfg["image_size"], False)
    num_classes = cfg["num_classes"] if kind == "affectnet" else None
    preset = None if cfg["augment"] == "none" else cfg["augment"]
    try:
        ds = readers.build_dataset(
            kind, cfg["data_root"], split, cfg["image_size"], num_classes, preset, train=train,
            classes=classes if kind == "imagefolder" else None, **kw,
        )  # fmt: skip
    except readers.UnknownClassesError as exc:
        names = ", ".join(repr(c) for c in exc.unknown)
        raise UserError(
            f"--data-root {cfg['data_root']}: the {split} split has class folders {names} that {whose} "
            f"lacks; expected only classes of {whose} ({', '.join(classes or ())})"
        ) from None
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        raise UserError(f"--data-root {cfg['data_root']}: {exc}") from None
    if kind == "synthetic" and cfg["num_workers"] == 0:
        ds = RenderCache(ds)
    return ds


def _check_classes(cfg: Mapping[str, Any], ds: Dataset, classes: Sequence[str] | None, whose: str) -> list[str]:
    """The class list of a run, checked against ``--num-classes`` and the reference list."""
    own = list(getattr(ds, "classes", []))
    if classes is not None and own != list(classes):
        raise UserError(
            f"--data {cfg['data']}: expected the classes of {whose} ({', '.join(classes)}), "
            f"got the dataset's ({', '.join(own)})"
        )
    n = cfg["num_classes"]
    if n is not None and n != len(own) and cfg["data"] != "affectnet":
        raise UserError(
            f"--num-classes {n}: expected {len(own)}, the number of classes of the {cfg['data']} "
            f"data at {cfg['data_root'] or 'synthetic'} ({', '.join(own)})"
        )
    return own


def _classes_without_samples(ds: Dataset, class_names: Sequence[str]) -> list[str]:
    counts = torch.bincount(
        torch.tensor(readers.dataset_labels(ds), dtype=torch.long), minlength=len(class_names)
    )
    return [name for name, c in zip(class_names, counts.tolist(), strict=True) if c == 0]


def build_run_data(
    cfg: Mapping[str, Any], *, class_names: Sequence[str] | None = None, whose: str = "the training split"
) -> RunData:
    """Read the splits of a run as ``cfg`` says.

    Args:
        cfg: The run's configuration.
        class_names: For ``--eval-only``: the checkpoint's class list (only the test
            split is read then); ``None`` to train (the list is the training split's).
        whose: Where ``class_names`` came from, for the messages.

    Returns:
        The datasets and class list.

    Raises:
        UserError: For every mistake in ``--data-root``, ``--num-classes`` and the
            class folders (see the module docstring).
    """
    _check_data_root(cfg)
    if class_names is not None or cfg["eval_only"]:
        test = _read_split(cfg, "test", train=False, classes=class_names, whose=whose)
        names = _check_classes(cfg, test, class_names if cfg["data"] != "imagefolder" else None, whose)
        return RunData(None, None, test, names, "--eval-only", {"test": _classes_without_samples(test, names)})
    train_aug = _read_split(cfg, "train", train=True, classes=None, whose=whose)
    names = _check_classes(cfg, train_aug, None, whose)
    test = _read_split(cfg, "test", train=False, classes=names, whose=whose)
    _check_classes(cfg, test, names if cfg["data"] != "imagefolder" else None, whose)
    train, val, no_validation = train_aug, None, None
    if cfg["val_fraction"] == 0:
        no_validation = "no validation split (--val-fraction 0)"
    else:
        tr_idx, va_idx = stratified_split(readers.dataset_labels(train_aug), cfg["val_fraction"], cfg["seed"])
        if va_idx:
            train_plain = _read_split(cfg, "train", train=False, classes=None, whose=whose)
            train, val = Subset(train_aug, tr_idx), Subset(train_plain, va_idx)
        else:
            no_validation = (
                f"the validation split is empty: --val-fraction {cfg['val_fraction']} of "
                f"{len(train_aug)} training images holds out none"
            )
    missing = {"test": _classes_without_samples(test, names)}
    if val is not None:
        missing["val"] = _classes_without_samples(val, names)
    return RunData(train, val, test, names, no_validation, missing)


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------


@dataclass
class Loaders:
    """The run's data loaders; ``train_sampler.set_epoch`` before every epoch."""

    train: DataLoader | None
    train_sampler: Sampler[int] | None
    val: DataLoader | None
    test: DataLoader


def _loader(ds: Dataset, batch: int, sampler: Sampler | None, cfg: Mapping[str, Any], collate: Any,
            device: torch.device, drop_last: bool = False) -> DataLoader:  # fmt: skip
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        num_workers=cfg["num_workers"],
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=False,
    )


def build_loaders(
    data: RunData, cfg: Mapping[str, Any], ranks: Dist, device: torch.device, per_rank: int
) -> Loaders:
    """Loaders of every split: training order by ``(seed, epoch)``, sharded over ranks.

    Training draws class-balanced samples with ``--balanced-sampler``, else a
    shuffle per epoch (DistributedSampler under torchrun). Evaluation visits every
    sample exactly once over all ranks.
    """

    def eval_loader(ds: Dataset) -> DataLoader:
        sampler = ShardSampler(len(ds), ranks.rank, ranks.world, pad=False) if ranks.enabled else None
        return _loader(ds, per_rank, sampler, cfg, data.collate, device)

    test = eval_loader(data.test)
    val = eval_loader(data.val) if data.val is not None else None
    if data.train is None:
        return Loaders(None, None, val, test)
    sampler: Sampler[int]
    if cfg["balanced_sampler"]:  # one global draw per (seed, epoch), sharded over ranks
        labels = readers.dataset_labels(data.train)
        sampler = ClassBalancedSampler(labels, seed=cfg["seed"], rank=ranks.rank, world_size=ranks.world)
    elif ranks.enabled:
        sampler = DistributedSampler(data.train, num_replicas=ranks.world, rank=ranks.rank, shuffle=True,
                                     seed=cfg["seed"])  # fmt: skip
    else:
        sampler = EpochShuffleSampler(len(data.train), cfg["seed"])
    n_rank = len(sampler)
    drop_last = n_rank > per_rank and n_rank % per_rank == 1  # no BatchNorm batch of one
    train = _loader(data.train, per_rank, sampler, cfg, data.collate, device, drop_last=drop_last)
    return Loaders(train, sampler, val, test)
