"""``predict.py``: every face of images and videos, classified, one record per face.

The flags (:func:`build_parser`) and the run (:func:`run_predict`); the record
format is :mod:`dan_recipe.predict_output`'s, the shared flags and bookkeeping
:mod:`dan_recipe.photo_cli`'s.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from .annotate import ANNOTATION_SUFFIX, draw_faces, write_annotated
from .face_pipeline import FacesInPicture
from .output_folder import OutputNames, prepare_output_folder
from .photo_cli import PhotoRun, check_shared_flags, make_detector, open_model, photo_parser
from .predict_output import FaceRecord, RecordWriter, check_output_file, open_records
from .sources import expand_inputs

__all__ = ["build_parser", "face_records", "run_predict"]

_EXAMPLES = """examples:
  python examples/predict.py photo.jpg --checkpoint runs/demo/best.pt
  python examples/predict.py photos/ clip.mp4 --every 10 --checkpoint rafdb_epoch21_acc0.897_bacc0.8532.pth \\
      --labels rafdb --out faces.csv --annotate annotated/
  python examples/predict.py 'crops/**/*.jpg' --no-detect --checkpoint best.pt --out crops.jsonl

Output: one record per face (JSON Lines on stdout by default, or --out FILE.jsonl / FILE.csv):
source, frame (video frame index; null for images), time_s, face (index in the picture),
box [x, y, w, h] in picture pixels (CSV: x, y, w, h), label, probabilities {class: p}.
A picture without a face gets one record with face, box, label and probabilities null.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``predict.py``."""
    p = photo_parser(
        "predict.py",
        "Find every face in images and videos (OpenCV Haar cascade) and classify its expression with a "
        "DAN checkpoint.",
        _EXAMPLES,
        batch_size=16,
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="FILE", help="FILE.jsonl or FILE.csv (default: JSON Lines on stdout)")
    g.add_argument("--annotate", metavar="DIR", help="also write each picture with its boxes and labels drawn")
    return p


def face_records(item: FacesInPicture, probabilities: Tensor, class_names: Sequence[str]) -> list[FaceRecord]:
    """The records of one picture: one per face, or one empty record if it has none.

    Args:
        item: The picture and its faces.
        probabilities: ``(faces, N)`` of its faces, in order.
        class_names: The model's classes.
    """
    pic = item.picture
    if not item.boxes:
        return [FaceRecord(pic.source, pic.frame, pic.time_s, None, None, None, None)]
    records = []
    for face, (box, probs) in enumerate(zip(item.boxes, probabilities.tolist(), strict=True)):
        best = max(range(len(probs)), key=probs.__getitem__)
        records.append(FaceRecord(pic.source, pic.frame, pic.time_s, face, box, class_names[best],
                                  dict(zip(class_names, probs, strict=True))))  # fmt: skip
    return records


def _write_group(
    group: list[FacesInPicture], probabilities: Tensor, class_names: Sequence[str], writer: RecordWriter,
    annotate: tuple[Path, OutputNames] | None,
) -> None:  # fmt: skip
    start = 0
    for item in group:
        stop = start + len(item.crops)
        records = face_records(item, probabilities[start:stop], class_names)
        start = stop
        for record in records:
            writer.write(record)
        if annotate is not None:
            folder, names = annotate
            faces = [
                (r.box, r.label, r.probabilities[r.label])
                for r in records
                if r.box and r.label and r.probabilities
            ]
            name = names.name(item.picture.source, item.picture.frame, None, ANNOTATION_SUFFIX)
            write_annotated(folder / name, draw_faces(item.picture.rgb, faces))


def run_predict(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``predict.py`` with ``argv`` (without the program name); errors and counts as ``run_explain``."""
    args = build_parser().parse_args(argv)
    check_shared_flags(args)
    check_output_file(args.out, args.overwrite)
    sources = expand_inputs(args.inputs)
    annotate = None
    if args.annotate:
        annotate = (prepare_output_folder(args.annotate, "--annotate", overwrite=args.overwrite), OutputNames())
    run = PhotoRun("predict", sources, args.every, args.progress)
    _, info, classifier = open_model(args, run.log)
    detector = make_detector(args)
    with open_records(args.out, info.class_names, overwrite=args.overwrite) as writer:
        with run.interruptible(f"{args.out or 'stdout'} holds the records of the pictures done so far"):
            for group in run.face_groups(detector, args.margin, args.batch_size):
                crops = [crop for item in group for crop in item.crops]
                probabilities = classifier.classify(crops, args.batch_size)
                _write_group(group, probabilities, info.class_names, writer, annotate)
        wrote = (args.out or "stdout") + (f" and {args.annotate}" if args.annotate else "")
        return run.finish(wrote)  # inside the block: a run that read nothing leaves no --out file
