"""Q6: DAN on photos (examples/predict.py): faces/s end to end, split into decode, detect and classify.

The stages of ``predict.py``, each timed on its own in one process with the code the
command runs:

* decode: ``dan_recipe.photos.read_image`` of a JPEG (quality 90) of scikit-image's
  astronaut portrait, 512 x 512, one face;
* detect: ``dan_recipe.photos.FaceDetector`` (Haar cascade, the command's defaults:
  scale factor 1.1, 5 neighbours, faces from 32 px) and ``crop_face`` on the decoded
  picture; also timed at scale factor 1.3 (the authors' video demo), in the summary;
* classify: ``FaceClassifier.batch`` (the evaluation transform) and
  ``FaceClassifier.probabilities`` of the authors' DAN (7 classes, 4 heads, 224 px,
  random weights with non-trivial BatchNorm statistics) at batch 1, 8 and 32, the
  fast path (``reparameterize_model`` + channels-last, the default) against the plain
  eval-mode model (``--no-fast``), interleaved.

The command runs the stages one after the other in one thread of control, so faces/s
end to end = 1 / (decode + detect per face + classify per face). OpenCV gets as many
threads as torch (``cv2.setNumThreads``). Times are medians of this process's CPU
time (with one thread, robust to other processes taking the CPU away); the wall-clock
medians are in the JSON (``*_wall``).

    python benchmarks/predict.py --threads 1
"""

from __future__ import annotations

import copy
import io
import sys

import _common as C
import torch

import dan_layers

NAME = "predict"
EXAMPLES = C.ROOT / "examples"


def _recipe():
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    from dan_recipe import model, photos, transforms  # noqa: PLC0415

    return model, photos, transforms


def _portrait_jpeg(size: int) -> bytes:
    from PIL import Image
    from skimage import data

    picture = Image.fromarray(data.astronaut())
    if size != picture.width:
        picture = picture.resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _stage_times(args, recipe, jpeg_path) -> tuple[dict[str, dict[str, float]], list]:
    """Decode and detect timings (detect at scale factor 1.1, the default, and 1.3, the authors' video
    demo), interleaved; and the face crops."""
    _, photos, _ = recipe
    rgb = photos.read_image(jpeg_path)
    fns = {"decode": lambda: photos.read_image(jpeg_path)}
    for scale_factor in (1.1, 1.3):
        detector = photos.FaceDetector(scale_factor=scale_factor)
        if not detector(rgb):
            raise SystemExit(f"predict benchmark: the cascade found no face at scale factor {scale_factor}")
        fns[f"detect_{scale_factor}"] = lambda d=detector: [photos.crop_face(rgb, b) for b in d(rgb)]
    timings = C.time_interleaved(fns, repeats=args.stage_repeats, warmup=1)
    return timings, [photos.crop_face(rgb, b) for b in photos.FaceDetector()(rgb)]


def _classifiers(args, recipe):
    model, photos, transforms = recipe
    torch.manual_seed(0)
    net = C.randomize_batchnorm(model.DAN(num_classes=7, num_heads=4).eval())
    info = model.ModelInfo(("a", "b", "c", "d", "e", "f", "g"), args.image_size, transforms.IMAGENET_MEAN,
                                 transforms.IMAGENET_STD, 4, "authors", None, "")  # fmt: skip
    fast = dan_layers.reparameterize_model(copy.deepcopy(net)).to(memory_format=torch.channels_last)
    return {"fast": photos.FaceClassifier(fast, info, channels_last=True),
            "plain": photos.FaceClassifier(net, info)}  # fmt: skip


def _row(batch: int, name: str, stages: dict, classify: dict, faces: int) -> dict:
    """One table row: per-face milliseconds of each stage (CPU time, and wall time), faces/s."""
    row = {"batch": batch, "variant": name, "rounds": classify[name]["n"]}
    for clock, key in (("", "cpu_median_s"), ("_wall", "median_s")):
        decode = 1e3 * stages["decode"][key] / faces
        detect = 1e3 * stages["detect_1.1"][key] / faces
        classify_ms = 1e3 * classify[name][key] / batch
        total = decode + detect + classify_ms
        speedup = classify["plain"][key] / classify["fast"][key] if name == "fast" else None
        row.update({
            f"decode_ms_per_face{clock}": decode, f"detect_ms_per_face{clock}": detect,
            f"classify_ms_per_face{clock}": classify_ms, f"faces_per_s{clock}": 1e3 / total,
            f"classify_faces_per_s{clock}": 1e3 / classify_ms, f"classify_share{clock}": classify_ms / total,
            f"fast_speedup{clock}": speedup,
        })  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> dict:
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--image-size", type=int, default=224, help="model input (the authors': 224)")
    p.add_argument("--picture-size", type=int, default=512, help="side of the portrait, px")
    p.add_argument("--stage-repeats", type=int, default=30, help="calls timed for decode and detect")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds per batch size")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.image_size, args.picture_size, args.stage_repeats = [1, 2], 64, 256, 3
    C.setup(args)
    import cv2

    cv2.setNumThreads(torch.get_num_threads())
    recipe = _recipe()
    jpeg_path = args.out / f".{NAME}-portrait.jpg"
    args.out.mkdir(parents=True, exist_ok=True)
    jpeg_path.write_bytes(_portrait_jpeg(args.picture_size))
    try:
        stages, crops = _stage_times(args, recipe, jpeg_path)
    finally:
        jpeg_path.unlink()
    classifiers = _classifiers(args, recipe)
    repeats = args.repeats or (2 if args.quick else 10)
    rows, parity = [], 0.0
    for batch in args.batches:
        faces = [crops[i % len(crops)] for i in range(batch)]
        fns = {name: (lambda c=c, f=faces: c.probabilities(c.batch(f))) for name, c in classifiers.items()}
        with torch.inference_mode():
            logits = {name: c.model(c.batch(faces))[0] for name, c in classifiers.items()}
        parity = max(parity, C.rel_err(logits["fast"], logits["plain"]))
        t = C.time_interleaved(fns, repeats=repeats, warmup=1, budget_s=None if args.quick else args.budget,
                               min_repeats=2 if args.quick else 3)  # fmt: skip
        for name in classifiers:
            rows.append(_row(batch, name, stages, t, len(crops)))
        C.print_table([r for r in rows if r["batch"] == batch],
                      ["batch", "variant", "decode_ms_per_face", "detect_ms_per_face", "classify_ms_per_face",
                       "faces_per_s", "classify_share", "fast_speedup"],
                      title=f"{NAME}: batch {batch}")  # fmt: skip
    payload = {
        "name": NAME,
        "question": "DAN on photos: faces/s end to end, split into decode, detect and classify; "
        "fast path vs plain",
        "command": C.command_line(),
        "env": {**C.env_info("cpu"), "opencv": cv2.__version__, "opencv_threads": cv2.getNumThreads()},
        "config": {
            "batches": args.batches,
            "image_size": args.image_size,
            "picture_size": args.picture_size,
            "faces_per_picture": len(crops),
            "quick": args.quick,
            "stage_repeats": args.stage_repeats,
            "repeats_max": repeats,
            "timing": "decode and detect interleaved, classify fast and plain interleaved per batch; medians "
            "of this process's CPU time (one thread: robust to other processes; *_wall: wall clock); "
            "end to end = sum of the stages per face",
        },  # fmt: skip
        "summary": {
            "logits_rel_err_fast_vs_plain": parity,
            "detect_ms_per_picture_scale_factor_1_3": 1e3 * stages["detect_1.3"]["cpu_median_s"],
            "stages": stages,
        },
        "rows": rows,
    }
    C.write_json(C.result_name(NAME, args), payload, args.out)
    return payload


if __name__ == "__main__":
    main()
