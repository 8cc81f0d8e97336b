#!/usr/bin/env python
r"""Classify the expression of every face in images and videos with a DAN checkpoint.

Usage (see ``--help`` for every flag)::

    python examples/predict.py photo.jpg --checkpoint rafdb_epoch21_acc0.897_bacc0.8532.pth --labels rafdb
    python examples/predict.py photos/ clip.mp4 --every 10 --out faces.csv --annotate annotated/ \\
        --checkpoint runs/raf/best.pt
    python examples/predict.py 'crops/**/*.jpg' --no-detect --checkpoint best.pt --out crops.jsonl
    python examples/predict.py --camera 0 --checkpoint best.pt            # until Ctrl-C

Follow one picture: :mod:`dan_recipe.photos` reads it, finds its faces and
classifies their crops in batches (re-parameterized, channels-last; ``--no-fast``
for the plain eval model); :mod:`dan_recipe.records` writes one JSON Lines record
per face on stdout, or ``--out FILE.jsonl`` / ``FILE.csv`` (replaced only with
``--overwrite``). Unreadable files are reported, skipped and counted in the closing
line on stderr, with the time of each stage (decode, detect, classify, write). A
camera (``--camera N``) or a URL is read frame by frame, each frame's records written
at once, until it ends or Ctrl-C (status 0). A mistake in a flag or input ends the
command with status 1 and one line ``error: ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # so that `import dan_recipe` works however this is started
    sys.path.insert(0, str(_HERE))

from dan_recipe.photos import (  # noqa: E402
    SYNTHETIC_NOTE,
    FacesInPicture,
    PhotoRun,
    check_shared_flags,
    expand_inputs,
    make_detector,
    open_model,
    photo_parser,
)
from dan_recipe.records import (  # noqa: E402
    ANNOTATION_SUFFIX,
    FaceRecord,
    OutputNames,
    RecordWriter,
    check_output_file,
    draw_faces,
    open_records,
    prepare_output_folder,
    write_annotated,
)
from dan_recipe.utils import run_command  # noqa: E402

_EXAMPLES = """examples:
  python examples/predict.py photo.jpg --checkpoint runs/demo/best.pt
  python examples/predict.py photos/ clip.mp4 --every 10 --checkpoint rafdb_epoch21_acc0.897_bacc0.8532.pth \\
      --labels rafdb --out faces.csv --annotate annotated/
  python examples/predict.py 'crops/**/*.jpg' --no-detect --checkpoint best.pt --out crops.jsonl
  python examples/predict.py --camera 0 --checkpoint best.pt        # frame by frame until Ctrl-C
  python examples/predict.py rtsp://192.168.1.20:554/stream --every 5 --checkpoint best.pt

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
        camera=True,
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
        records.append(
            FaceRecord(
                pic.source,
                pic.frame,
                pic.time_s,
                face,
                box,
                class_names[best],
                dict(zip(class_names, probs, strict=True)),
            )
        )
    return records


def _write_group(
    group: list[FacesInPicture],
    probabilities: Tensor,
    class_names: Sequence[str],
    writer: RecordWriter,
    annotate: tuple[Path, OutputNames] | None,
    note: str | None = None,
) -> None:
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
            write_annotated(folder / name, draw_faces(item.picture.rgb, faces, note=note))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the command with ``argv`` (without the program name); return the run's counts.

    Raises:
        RecipeError: A mistake in the flags, inputs, checkpoint or output paths.
    """
    args = build_parser().parse_args(argv)
    check_shared_flags(args)
    check_output_file(args.out, args.overwrite)
    sources = expand_inputs(args.inputs, args.camera)
    annotate = None
    if args.annotate:
        annotate = (prepare_output_folder(args.annotate, "--annotate", overwrite=args.overwrite), OutputNames())
    run = PhotoRun("predict", sources, args.every, args.progress)
    _, info, classifier = open_model(args, run.log)
    note = SYNTHETIC_NOTE if info.synthetic else None
    detector = make_detector(args)
    with open_records(args.out, info.class_names, overwrite=args.overwrite, live=run.live) as writer:
        with run.interruptible(f"{args.out or 'stdout'} holds the records of the pictures done so far"):
            for group in run.face_groups(detector, args.margin, args.batch_size):
                crops = [crop for item in group for crop in item.crops]
                with run.stage("classify"):
                    probabilities = classifier.classify(crops, args.batch_size)
                with run.stage("write"):
                    _write_group(group, probabilities, info.class_names, writer, annotate, note)
        wrote = (args.out or "stdout") + (f" and {args.annotate}" if args.annotate else "")
        return run.finish(wrote)  # inside the block: a run that read nothing leaves no --out file


if __name__ == "__main__":
    sys.exit(run_command(main))
