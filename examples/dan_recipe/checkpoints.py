"""Our training checkpoints: the format, atomic writes, RNG state; and :func:`load_model`.

A checkpoint of ``train_dan.py`` (``last.pt`` every epoch, ``best.pt`` on
improvement) is a dict that ``torch.load(weights_only=True)`` reads, with
``format`` = :data:`CHECKPOINT_FORMAT` and everything needed to continue a run
bit-exactly (see :func:`training_checkpoint`). Files are replaced atomically
(:func:`atomic_write`): a crash or Ctrl-C leaves the old file or the new one.

:func:`load_model` is the one call that turns a checkpoint, ours or the
authors' (yaoing/DAN), into an evaluation-mode :class:`~dan_recipe.model.DAN` and
the preprocessing it expects::

    model, info = load_model("runs/demo/best.pt")
    preprocess = transforms.eval_transform(info.image_size, info.mean, info.std)
    logits, _, _ = model(preprocess(image).unsqueeze(0))
    print(info.class_names[int(logits.argmax())])
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import AFFECTNET_CLASSES, RAFDB_CLASSES
from .errors import CheckpointError, UserError
from .model import DAN
from .transforms import IMAGENET_MEAN, IMAGENET_STD
from .weights import check_state_dict_keys, infer_official_config, load_official_checkpoint, load_weights_only

__all__ = [
    "CHECKPOINT_FORMAT",
    "ModelInfo",
    "atomic_write",
    "is_our_checkpoint",
    "load_model",
    "load_model_state",
    "read_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "training_checkpoint",
    "write_json",
]

#: ``format`` of the checkpoints that train_dan.py writes.
CHECKPOINT_FORMAT = "dan-layers/train_dan/1"
_FORMAT_PREFIX = "dan-layers/train_dan/"
#: Authors' class orders by number of classes, for ``load_model(labels=...)``.
_LABEL_SETS: dict[str, tuple[str, ...]] = {
    "rafdb": RAFDB_CLASSES,
    "affectnet": AFFECTNET_CLASSES,
    "affectnet7": AFFECTNET_CLASSES[:7],
}


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def is_our_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a loaded file) is a checkpoint written by train_dan.py."""
    return isinstance(obj, Mapping) and str(obj.get("format", "")).startswith(_FORMAT_PREFIX)


def read_checkpoint(path: str | os.PathLike[str], flag: str) -> Any:
    """Load a checkpoint file for the command-line option ``flag`` (``"--resume"``).

    Args:
        path: The file.
        flag: The option that named it, for the messages.

    Returns:
        The loaded object: one of our checkpoints (``format`` checked) or anything
        else ``torch.load(weights_only=True)`` reads (an authors' checkpoint).

    Raises:
        UserError: No such file.
        CheckpointError: Unreadable, or written by a newer version of the recipe.
    """
    try:
        obj = load_weights_only(path, "checkpoint", flag=flag)
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: expected a checkpoint file, got a path that does not exist") from None
    if is_our_checkpoint(obj) and obj["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{flag} {path}: expected checkpoint format {CHECKPOINT_FORMAT!r}, got {obj['format']!r} "
            "(written by a newer train_dan.py)"
        )
    return obj


def load_model_state(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """``module.load_state_dict(state)`` after a check that names every key that does not fit.

    Raises:
        CheckpointError: Missing, unexpected or misshapen keys (all named).
    """
    check_state_dict_keys(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------
# load_model: ours and the authors', for inference
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model expects and where it came from.

    Attributes:
        class_names: Name of every output, in logit order.
        image_size: Square input size the model was trained at.
        mean: Normalisation means (RGB) of its inputs.
        std: Normalisation standard deviations (RGB).
        num_heads: Attention heads.
        source: ``"dan-layers"`` (a train_dan.py checkpoint) or ``"authors"``.
        epoch: Training epoch of the checkpoint, if recorded.
        path: The file (``""`` when a loaded dict was passed).
    """

    class_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_heads: int
    source: str
    epoch: int | None
    path: str


def load_model(
    path: str | os.PathLike[str] | Mapping[str, Any],
    *,
    num_classes: int | None = None,
    labels: Sequence[str] | str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[DAN, ModelInfo]:
    """Load a DAN checkpoint, ours or the authors', ready for inference.

    Ours (``best.pt`` / ``last.pt`` of train_dan.py) carry their class names, image
    size and normalisation. The authors' published files (``model_state_dict`` in
    their key layout, see :func:`dan_recipe.weights.load_official_checkpoint`) carry
    neither: they were trained at 224 px with ImageNet normalisation, and their class
    names come from ``labels``. With 8 classes the default is AffectNet-8's order;
    a 7-class file may be RAF-DB or AffectNet-7, whose orders differ, so it needs
    ``labels``.

    Args:
        path: The checkpoint file (or its already loaded dict).
        num_classes: Expected number of classes; another count is an error.
        labels: Class names in logit order, or ``"rafdb"``, ``"affectnet"`` (8)
            or ``"affectnet7"``. Overrides the names saved in one of ours.
        device: Where to put the model.

    Returns:
        ``(model, info)``: the :class:`~dan_recipe.model.DAN` in eval mode on
        ``device``, and a :class:`ModelInfo`.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: Unreadable, not a DAN checkpoint, or keys that do not fit.
        ValueError: ``num_classes`` or ``labels`` that do not fit the checkpoint, or
            a 7-class authors' checkpoint without ``labels``.
    """
    where = "" if isinstance(path, Mapping) else os.fspath(path)
    raw = path if isinstance(path, Mapping) else load_weights_only(path, "checkpoint")
    if is_our_checkpoint(raw):
        model, info = _load_ours(raw, where)
    else:
        model, info = _load_authors(raw, where)
    n = model.num_classes
    if num_classes is not None and num_classes != n:
        raise ValueError(f"load_model: expected a checkpoint with {num_classes} classes, got {n} in {where!r}")
    if labels is not None or not info.class_names:
        info = replace(info, class_names=_class_names(labels, n, where))
    return model.to(device).eval(), info


def _load_ours(raw: Mapping[str, Any], where: str) -> tuple[DAN, ModelInfo]:
    if raw["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where}: expected format {CHECKPOINT_FORMAT!r}, got {raw['format']!r}")
    args = raw["args"]
    model = DAN(num_classes=int(raw["num_classes"]), num_heads=int(args["num_heads"]))
    state = {k[len("model.") :]: v for k, v in raw["model"].items() if k.startswith("model.")}
    load_model_state(model, state, f"checkpoint {where}")
    prep = raw.get("preprocessing") or {}
    info = ModelInfo(
        class_names=tuple(raw.get("class_names") or ()),
        image_size=int(prep.get("image_size", args["image_size"])),
        mean=tuple(prep.get("mean", IMAGENET_MEAN)),
        std=tuple(prep.get("std", IMAGENET_STD)),
        num_heads=model.num_heads,
        source="dan-layers",
        epoch=int(raw["epoch"]),
        path=where,
    )
    return model, info


def _load_authors(raw: Any, where: str) -> tuple[DAN, ModelInfo]:
    shape = infer_official_config(raw)
    model = DAN(num_classes=shape["num_classes"], num_heads=shape["num_heads"])
    load_official_checkpoint(model, raw)
    epoch = raw.get("iter") if isinstance(raw, Mapping) else None
    info = ModelInfo((), 224, IMAGENET_MEAN, IMAGENET_STD, model.num_heads, "authors",
                     int(epoch) if isinstance(epoch, (int, float)) else None, where)  # fmt: skip
    return model, info


def _class_names(labels: Sequence[str] | str | None, n: int, where: str) -> tuple[str, ...]:
    if labels is None:
        if n == len(AFFECTNET_CLASSES):
            return AFFECTNET_CLASSES
        raise ValueError(
            f"load_model: expected labels= ('rafdb', 'affectnet7' or {n} names) for the authors' "
            f"{n}-class checkpoint {where!r}: its file holds no class names"
            + (" and RAF-DB and AffectNet-7 order their 7 classes differently" if n == 7 else "")
        )
    if isinstance(labels, str):
        if labels not in _LABEL_SETS:
            raise ValueError(
                f"load_model labels: expected one of {sorted(_LABEL_SETS)} or a list, got {labels!r}"
            )
        labels = _LABEL_SETS[labels]
    if len(labels) != n:
        raise ValueError(f"load_model labels: expected {n} names (the checkpoint's classes), got {len(labels)}")
    return tuple(str(v) for v in labels)


# --------------------------------------------------------------------------------------
# Writing: the format, atomically
# --------------------------------------------------------------------------------------


def training_checkpoint(
    *,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    epoch: int,
    global_step: int,
    best_metric: float,
    best_epoch: int,
    history: list[dict[str, Any]],
    args: Mapping[str, Any],
    class_names: Sequence[str],
    world_size: int,
    rng: list[dict[str, Any]],
) -> dict[str, Any]:
    """The checkpoint of a run after ``epoch`` (format :data:`CHECKPOINT_FORMAT`).

    ``net`` is the :class:`~dan_recipe.model.DANWithLosses` (keys ``model.*`` and the
    loss centres), unwrapped from DDP. ``rng`` holds every rank's
    :func:`rng_state`. ``preprocessing`` records the evaluation input (image size,
    ImageNet mean and std) for :func:`load_model`.
    """
    centers = getattr(getattr(net, "affinity", None), "centers", None)
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "loss_centers": centers.detach().cpu() if centers is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "global_step": global_step,
        "best_metric": best_metric,
        "best_epoch": best_epoch,
        "select_metric": args["select_metric"],
        "history": history,
        "args": dict(args),
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "world_size": world_size,
        "rng": rng,
        "preprocessing": {
            "image_size": args["image_size"],
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
    }


class _DeferInterrupt:
    """Hold Ctrl-C (SIGINT) while a file is being replaced; re-raise it afterwards."""

    def __enter__(self) -> _DeferInterrupt:
        self.received = False
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.getsignal(signal.SIGINT)

            def handler(signum: int, frame: Any) -> None:
                self.received = True

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.received:
            raise KeyboardInterrupt


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Any, *, binary: bool = True, also: Sequence[str | Path] = ()) -> None:
    """Write ``path`` via a temp file in the same directory, fsync, then ``os.replace``.

    A crash or Ctrl-C at any point leaves either the old file or the new one, never
    a partial file. ``also``: further paths (same directory) that receive the same
    content, by a hard link to the temp file (a copy where links are not supported),
    each replaced atomically BEFORE ``path`` itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _DeferInterrupt():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        extra: list[str] = []
        try:
            with os.fdopen(fd, "wb" if binary else "w") as f:
                with contextlib.suppress(OSError, AttributeError):  # mkstemp makes 0600
                    os.fchmod(f.fileno(), 0o666 & ~_umask())
                write(f)
                f.flush()
                os.fsync(f.fileno())
            for other in also:
                other = Path(other)
                fd2, tmp2 = tempfile.mkstemp(prefix=f".{other.name}.", suffix=".tmp", dir=other.parent)
                os.close(fd2)
                extra.append(tmp2)
                os.unlink(tmp2)
                try:
                    os.link(tmp, tmp2)
                except OSError:
                    shutil.copyfile(tmp, tmp2)
                os.replace(tmp2, other)
                extra.pop()
            os.replace(tmp, path)
        except BaseException:
            for t in [tmp, *extra]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(t)
            raise
        _fsync_dir(path.parent)


def save_checkpoint(obj: Mapping[str, Any], path: str | Path, *, also: Sequence[str | Path] = ()) -> None:
    """``torch.save`` atomically to ``path`` (and, hard-linked, to every path in ``also``)."""
    atomic_write(path, lambda f: torch.save(dict(obj), f), also=also)


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically (values JSON lacks become strings)."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str), binary=False)


# --------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors / lists / numbers (weights_only-loadable)."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(name),
            "keys": torch.as_tensor(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss": gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
