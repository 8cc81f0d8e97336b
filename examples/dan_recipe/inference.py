"""A checkpoint made ready for the commands that run DAN on photos, and face crops made into probabilities.

* :func:`load_checkpoint_for_inference` wraps :func:`dan_recipe.checkpoints.load_model`
  for a command line: every mistake is a one-line error naming ``--checkpoint`` or
  ``--labels``, an authors' 7-class checkpoint gets a stated default class order,
  and the fast path (:func:`dan_layers.reparameterize_model`, channels-last) is
  applied unless ``fast=False``.
* :func:`parse_labels` reads ``--labels``: ``rafdb``, ``affectnet7``, ``affectnet``
  (8 classes) or comma-separated names.
* :class:`FaceClassifier` turns face crops (any size, ``uint8`` RGB) into the
  model's input batch with the training's evaluation transform, and that batch
  into class probabilities.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

import dan_layers

from .checkpoints import ModelInfo, load_model, read_checkpoint
from .errors import CheckpointError, UserError
from .model import DAN
from .transforms import eval_transform

__all__ = [
    "LABEL_SETS",
    "FaceClassifier",
    "authors_seven_class_default",
    "load_checkpoint_for_inference",
    "parse_labels",
]

#: Names ``--labels`` accepts for the authors' class orders.
LABEL_SETS: tuple[str, ...] = ("rafdb", "affectnet7", "affectnet")
_LABEL_ALIASES = {"affectnet8": "affectnet", "raf-db": "rafdb", "raf": "rafdb"}


def parse_labels(text: str | None) -> str | tuple[str, ...] | None:
    """``--labels``: a known class order (see :data:`LABEL_SETS`) or comma-separated class names.

    Raises:
        UserError: An empty name, or the same name twice.
    """
    if text is None:
        return None
    key = text.strip().lower()
    key = _LABEL_ALIASES.get(key, key)
    if key in LABEL_SETS:
        return key
    names = tuple(name.strip() for name in text.split(","))
    if len(names) < 2 or not all(names):
        raise UserError(
            f"--labels {text}: expected one of {', '.join(LABEL_SETS)} or comma-separated class names "
            "in logit order (e.g. angry,happy,neutral)"
        )
    if len(set(names)) != len(names):
        raise UserError(f"--labels {text}: expected distinct class names, got a name twice")
    return names


def authors_seven_class_default(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Class order for an authors' 7-class checkpoint given without ``--labels``, and why.

    Their files are named after the data set (``rafdb_epoch21_acc0.897...pth``,
    ``affecnet7_epoch6_acc0.6569.pth``); a name that says neither gets RAF-DB's order,
    the data set of their best-known 7-class model.

    Returns:
        ``("rafdb" | "affectnet7", reason)``.
    """
    name = os.path.basename(os.fspath(path)).lower()
    if "affecnet7" in name or "affectnet7" in name or "affectnet-7" in name:
        return "affectnet7", "its file name says AffectNet-7"
    if "raf" in name:
        return "rafdb", "its file name says RAF-DB"
    return "rafdb", "the default for an authors' 7-class checkpoint"


def _load(raw: Mapping[str, object], path: str, labels: object, device: torch.device) -> tuple[DAN, ModelInfo]:
    try:
        return load_model(raw, labels=labels, device=device)  # type: ignore[arg-type]
    except CheckpointError as exc:
        raise CheckpointError(f"--checkpoint {path}: {exc}") from None


def load_checkpoint_for_inference(
    path: str,
    *,
    labels: str | None = None,
    device: torch.device | str = "cpu",
    fast: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[DAN, ModelInfo]:
    """Load a checkpoint (ours or the authors') for the photo commands.

    Args:
        path: ``--checkpoint``.
        labels: ``--labels`` text (see :func:`parse_labels`); for one of ours it
            overrides the saved names.
        device: Where the model runs.
        fast: Re-parameterize the attention (same outputs, fewer operations) and
            use channels-last memory; ``False`` keeps the plain eval-mode model.
        log: Receives a note when the class order of an authors' checkpoint is chosen
            without ``--labels``.

    Returns:
        ``(model, info)`` as :func:`dan_recipe.checkpoints.load_model`, with
        ``info.path`` = ``path``.

    Raises:
        UserError: No such file, or ``--labels`` that do not fit the checkpoint.
        CheckpointError: An unreadable file or one that is not a DAN checkpoint.
    """
    raw = read_checkpoint(path, "--checkpoint")
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"--checkpoint {path}: expected a DAN checkpoint (a dict of weights), got a {type(raw).__name__}"
        )
    parsed = parse_labels(labels)
    try:
        model, info = _load(raw, path, parsed, torch.device(device))
    except ValueError as exc:
        if parsed is not None or "RAF-DB and AffectNet-7" not in str(exc):
            reason = re.sub(r"^load_model( labels)?: ", "", str(exc))
            raise UserError(f"--labels {labels}: {reason}") from None
        parsed, why = authors_seven_class_default(path)
        model, info = _load(raw, path, parsed, torch.device(device))
        log(
            f"note: --checkpoint {path} holds no class names; using the {parsed} order ({why}): "
            f"{', '.join(info.class_names)}. Pass --labels to choose another"
        )
    if fast:
        dan_layers.reparameterize_model(model)
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model, replace(info, path=path)


class FaceClassifier:
    """Face crops to the model's input batch, and that batch to class probabilities.

    Args:
        model: A DAN in eval mode (from :func:`load_checkpoint_for_inference`).
        info: Its :class:`~dan_recipe.checkpoints.ModelInfo` (input size, normalisation).
        device: Where the model is.
        channels_last: Give the model channels-last input (the fast path).
    """

    def __init__(
        self, model: DAN, info: ModelInfo, device: torch.device | str = "cpu", *, channels_last: bool = False
    ) -> None:
        self.model = model
        self.info = info
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.preprocess = eval_transform(info.image_size, info.mean, info.std)

    def batch(self, crops: Sequence[np.ndarray]) -> Tensor:
        """``(B, 3, S, S)`` normalised input on the model's device for ``uint8`` RGB crops of any size."""
        if not crops:
            raise ValueError("crops: expected at least one face crop, got none")
        x = torch.stack([self.preprocess(crop) for crop in crops]).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def to_pixels(self, batch: Tensor) -> np.ndarray:
        """The inverse of the normalisation: ``(B, S, S, 3)`` ``uint8`` RGB, what the model saw."""
        mean = torch.tensor(self.info.mean, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std, device=batch.device).view(1, -1, 1, 1)
        pixels = (batch.detach() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

    @torch.inference_mode()
    def probabilities(self, batch: Tensor) -> Tensor:
        """Softmax of the logits, ``(B, num_classes)`` float32 on the CPU."""
        logits = self.model(batch)[0]
        return torch.softmax(logits.float(), dim=1).cpu()

    def classify(self, crops: Sequence[np.ndarray], batch_size: int) -> Tensor:
        """Probabilities of every crop, ``batch_size`` crops per forward pass."""
        parts = [
            self.probabilities(self.batch(crops[i : i + batch_size])) for i in range(0, len(crops), batch_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0, len(self.info.class_names))
