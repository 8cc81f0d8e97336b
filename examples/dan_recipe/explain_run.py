"""``explain.py``: for every face, where each head looks, as one PNG (and optionally an ``.npz``) per face.

The flags (:func:`build_parser`) and the run (:func:`run_explain`). The maps are
:mod:`dan_recipe.head_maps`'s, the picture :mod:`dan_recipe.head_figure`'s.

What ``--out DIR`` receives, per face: ``<name>.png`` (see
:func:`dan_recipe.head_figure.write_head_figure`), with ``--save-maps``
``<name>.npz``, and one line in ``faces.jsonl`` (the record of ``predict.py`` plus
``target``, ``png`` and ``npz``). ``<name>`` is ``<source stem>[_f<frame>]_face<i>``,
with ``-2``, ``-3`` ... where two sources share a stem. ``--out`` must be empty or
new unless ``--overwrite`` is given (then files of the same names are replaced,
others kept).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .checkpoints import ModelInfo
from .errors import UserError
from .face_pipeline import FacesInPicture
from .faces import Box
from .head_figure import write_head_figure
from .head_maps import HeadMaps, explain_heads, upsample_maps
from .inference import FaceClassifier
from .output_folder import OutputNames, prepare_output_folder
from .photo_cli import PhotoRun, check_shared_flags, make_detector, open_model, photo_parser
from .predict_output import FaceRecord
from .sources import Picture, expand_inputs

__all__ = ["INDEX_NAME", "build_parser", "parse_target", "run_explain"]

#: The file of ``--out`` that lists every face written.
INDEX_NAME = "faces.jsonl"

_EXAMPLES = """examples:
  python examples/explain.py photo.jpg --checkpoint runs/demo/best.pt --out explained/
  python examples/explain.py test_0001_aligned.jpg --no-detect --labels rafdb \\
      --checkpoint rafdb_epoch21_acc0.897_bacc0.8532.pth --target Happiness --save-maps --out explained/

Per face: <name>.png (the crop; per head its spatial attention map and its Grad-CAM++ map),
with --save-maps <name>.npz (attention (K, h, w) at the feature-map resolution, gradcam
(K, S, S) at the crop's, crop, probabilities, class_names, target, box), and a line in
faces.jsonl.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``explain.py``."""
    p = photo_parser(
        "explain.py",
        "Show where each DAN head looks on every face: its spatial attention map and Grad-CAM++ of its "
        "spatially attended features.",
        _EXAMPLES,
        batch_size=8,
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs (empty or new)")
    g.add_argument(
        "--target",
        metavar="CLASS",
        help="class to explain, by name or index (default: each face's predicted class)",
    )
    g.add_argument("--save-maps", action="store_true", help="also write <name>.npz with the raw maps")
    return p


def parse_target(text: str | None, class_names: Sequence[str]) -> int | None:
    """``--target``: a class name (any case) or index.

    Raises:
        UserError: A name or index the model does not have.
    """
    if text is None:
        return None
    lowered = [name.lower() for name in class_names]
    if text.strip().lower() in lowered:
        return lowered.index(text.strip().lower())
    if text.strip().isdigit() and int(text) < len(class_names):
        return int(text)
    raise UserError(
        f"--target {text}: expected a class of the model ({', '.join(class_names)}) or an index "
        f"0..{len(class_names) - 1}"
    )


@dataclass
class _Face:
    picture: Picture
    index: int
    box: Box
    crop: np.ndarray


@dataclass
class _Writer:
    folder: Path
    names: OutputNames
    index: IO[str]
    info: ModelInfo
    save_maps: bool

    def write(self, face: _Face, maps: HeadMaps, row: int, pixels: np.ndarray) -> None:
        size = pixels.shape[0]
        probs = maps.probabilities[row].tolist()
        classes = self.info.class_names
        best, target = max(range(len(probs)), key=probs.__getitem__), int(maps.target[row])
        attention, gradcam = maps.attention[row], upsample_maps(maps.gradcam[row], size)
        base = self.names.name(face.picture.source, face.picture.frame, face.index, "")
        write_head_figure(self.folder / f"{base}.png", pixels, upsample_maps(attention, size).numpy(),
                          gradcam.numpy(), predicted=f"predicted: {classes[best]} {probs[best]:.2f}",
                          target_name=classes[target])  # fmt: skip
        if self.save_maps:
            np.savez_compressed(
                self.folder / f"{base}.npz", attention=attention.numpy(), gradcam=gradcam.numpy(), crop=pixels,
                probabilities=np.asarray(probs, np.float32), class_names=np.asarray(classes), target=target,
                box=np.asarray(face.box),
            )  # fmt: skip
        pic = face.picture
        record = FaceRecord(pic.source, pic.frame, pic.time_s, face.index, face.box, classes[best],
                            dict(zip(classes, probs, strict=True))).as_json()  # fmt: skip
        record.update(target=classes[target], png=f"{base}.png", npz=f"{base}.npz" if self.save_maps else None)
        self.index.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.index.flush()


def _explain_group(
    group: list[FacesInPicture], classifier: FaceClassifier, target: int | None, batch_size: int, out: _Writer
) -> None:
    faces = [_Face(item.picture, i, box, crop) for item in group
             for i, (box, crop) in enumerate(zip(item.boxes, item.crops, strict=True))]  # fmt: skip
    for start in range(0, len(faces), batch_size):
        chunk = faces[start : start + batch_size]
        batch = classifier.batch([face.crop for face in chunk])
        maps = explain_heads(classifier.model, batch, target)
        pixels = classifier.to_pixels(batch)
        for row, face in enumerate(chunk):
            out.write(face, maps, row, pixels[row])


def run_explain(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``explain.py`` with ``argv`` (without the program name).

    Returns:
        The run's counts (images, videos, frames, faces, faceless, unreadable, seconds).

    Raises:
        UserError: A mistake in the flags or inputs (status 1, one line).
        CheckpointError: A checkpoint that cannot be read or is not a DAN's.
    """
    args = build_parser().parse_args(argv)
    check_shared_flags(args)
    sources = expand_inputs(args.inputs)
    folder = prepare_output_folder(args.out, "--out", overwrite=args.overwrite)
    run = PhotoRun("explain", sources, args.every, args.progress)
    _, info, classifier = open_model(args, run.log)
    target = parse_target(args.target, info.class_names)
    detector = make_detector(args)
    with open(folder / INDEX_NAME, "w", encoding="utf-8") as index:
        out = _Writer(folder, OutputNames(), index, info, args.save_maps)
        with run.interruptible(f"{folder} holds the faces done so far (listed in {INDEX_NAME})"):
            for group in run.face_groups(detector, args.margin, args.batch_size):
                _explain_group(group, classifier, target, args.batch_size, out)
    return run.finish(str(folder))
