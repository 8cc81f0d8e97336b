#!/usr/bin/env python
r"""Show where each DAN head looks on every face: spatial attention maps and per-head Grad-CAM++.

Usage (see ``--help`` for every flag)::

    python examples/explain.py photo.jpg --checkpoint runs/raf/best.pt --out explained/
    python examples/explain.py faces/ --no-detect --checkpoint rafdb_epoch21_acc0.897_bacc0.8532.pth \\
        --labels rafdb --target Happiness --save-maps --out explained/

Same inputs, face detection, checkpoints and labels as ``predict.py``
(:mod:`dan_recipe.photos`). For every face :mod:`dan_recipe.gradcam` computes each
head's spatial attention map and Grad-CAM++ of the head's spatially attended
features for the predicted class, or ``--target`` (the authors' ``run_grad_cam.py``
target, ``cat_head{i}.sa``), and :mod:`dan_recipe.figures` draws them. ``--out``
receives, per face, ``<name>.png``, with ``--save-maps`` ``<name>.npz`` (``attention``
(K, h, w) at the feature-map resolution, ``gradcam`` (K, S, S) at the crop's), and
one line in ``faces.jsonl`` (the record of ``predict.py`` plus ``target``, ``png`` and
``npz``). ``<name>`` is ``<source stem>[_f<frame>]_face<i>``, with ``-2``, ``-3`` ...
where two sources share a stem. ``--out`` must be empty or new unless ``--overwrite``
(then files of the same names are replaced, others kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # so that `import dan_recipe` works however this is started
    sys.path.insert(0, str(_HERE))

from dan_recipe.figures import write_head_figure  # noqa: E402
from dan_recipe.gradcam import HeadMaps, explain_heads, upsample_maps  # noqa: E402
from dan_recipe.model import ModelInfo  # noqa: E402
from dan_recipe.photos import (  # noqa: E402
    SYNTHETIC_NOTE,
    FaceClassifier,
    FacesInPicture,
    PhotoRun,
    Picture,
    check_shared_flags,
    expand_inputs,
    make_detector,
    open_model,
    photo_parser,
)
from dan_recipe.records import Box, FaceRecord, OutputNames, prepare_output_folder  # noqa: E402
from dan_recipe.utils import UsageError, run_command  # noqa: E402

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
        UsageError: A name or index the model does not have.
    """
    if text is None:
        return None
    lowered = [name.lower() for name in class_names]
    if text.strip().lower() in lowered:
        return lowered.index(text.strip().lower())
    if text.strip().isdigit() and int(text) < len(class_names):
        return int(text)
    raise UsageError(
        f"expected a class of the model ({', '.join(class_names)}) or an index 0..{len(class_names) - 1}",
        subject=f"--target {text}",
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
        write_head_figure(
            self.folder / f"{base}.png",
            pixels,
            attention.numpy(),
            maps.gradcam[row].numpy(),
            predicted=f"predicted: {classes[best]} {probs[best]:.2f}"
            + ("\n" + SYNTHETIC_NOTE.replace(": ", ":\n") if self.info.synthetic else ""),
            target_name=classes[target],
        )
        if self.save_maps:
            np.savez_compressed(
                self.folder / f"{base}.npz",
                attention=attention.numpy(),
                gradcam=gradcam.numpy(),
                crop=pixels,
                probabilities=np.asarray(probs, np.float32),
                class_names=np.asarray(classes),
                target=target,
                box=np.asarray(face.box),
            )
        pic = face.picture
        record = FaceRecord(
            pic.source,
            pic.frame,
            pic.time_s,
            face.index,
            face.box,
            classes[best],
            dict(zip(classes, probs, strict=True)),
        ).as_json()
        record.update(target=classes[target], png=f"{base}.png", npz=f"{base}.npz" if self.save_maps else None)
        self.index.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.index.flush()


def _explain_group(
    group: list[FacesInPicture], classifier: FaceClassifier, target: int | None, batch_size: int, out: _Writer
) -> None:
    faces = [
        _Face(item.picture, i, box, crop)
        for item in group
        for i, (box, crop) in enumerate(zip(item.boxes, item.crops, strict=True))
    ]
    for start in range(0, len(faces), batch_size):
        chunk = faces[start : start + batch_size]
        batch = classifier.batch([face.crop for face in chunk])
        maps = explain_heads(classifier.model, batch, target)
        pixels = classifier.to_pixels(batch)
        for row, face in enumerate(chunk):
            out.write(face, maps, row, pixels[row])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the command with ``argv`` (without the program name).

    Returns:
        The run's counts (images, videos, frames, faces, faceless, unreadable, seconds).

    Raises:
        RecipeError: A mistake in the flags, inputs, checkpoint or output folder.
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


if __name__ == "__main__":
    sys.exit(run_command(main))
