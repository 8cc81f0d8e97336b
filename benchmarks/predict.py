"""Q6: DAN on photos (examples/predict.py): faces/s end to end, split into decode, detect and classify.

The stages of ``predict.py``, each timed on its own in one process with the code the
command runs:

* decode: ``dan_recipe.sources.read_image`` of a JPEG (quality 90) of scikit-image's
  astronaut portrait, 512 x 512, one face;
* detect: ``dan_recipe.faces.FaceDetector`` (Haar cascade, the command's defaults:
  scale factor 1.1, 5 neighbours, faces from 32 px) and ``crop_face`` on the decoded
  picture; also timed at scale factor 1.3 (the authors' video demo), in the summary;
* classify: ``FaceClassifier.batch`` (the evaluation transform) and
  ``FaceClassifier.probabilities`` of the authors' DAN (7 classes, 4 heads, 224 px,
  random weights with non-trivial BatchNorm statistics) at batch 1, 8 and 32, the
  fast path (``reparameterize_model`` + channels-last, the default) against the plain
  eval-mode model (``--no-fast``), interleaved.

The command runs the stages one after the other in one thread of control, so faces/s
end to end = 1 / (decode + detect per face + classify per face). OpenCV gets as many
threads as torch (``cv2.setNumThreads``).

    python benchmarks/predict.py --threads 1
"""

from __future__ import annotations

import copy
import io
import statistics
import sys
import time

import _common as C
import torch

import dan_layers

NAME = "predict"
EXAMPLES = C.ROOT / "examples"


def _recipe():
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    from dan_recipe import checkpoints, faces, inference, model, sources, transforms  # noqa: PLC0415

    return checkpoints, faces, inference, model, sources, transforms


def _portrait_jpeg(size: int) -> bytes:
    from PIL import Image
    from skimage import data

    picture = Image.fromarray(data.astronaut())
    if size != picture.width:
        picture = picture.resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _stage_times(args, recipe, jpeg_path) -> tuple[float, dict[float, float], list]:
    """Decode ms, detect ms by scale factor (1.1: the default; 1.3: the authors' video demo), crops."""
    _, faces, _, _, sources, _ = recipe
    rgb = sources.read_image(jpeg_path)
    detect_ms = {}
    for scale_factor in (1.1, 1.3):
        detector = faces.FaceDetector(scale_factor=scale_factor)
        if not detector(rgb):
            raise SystemExit(f"predict benchmark: the cascade found no face at scale factor {scale_factor}")
        detect_ms[scale_factor] = _median_ms(lambda d=detector: [faces.crop_face(rgb, b) for b in d(rgb)],
                                             args.stage_repeats)  # fmt: skip
    decode_ms = _median_ms(lambda: sources.read_image(jpeg_path), args.stage_repeats)
    return decode_ms, detect_ms, [faces.crop_face(rgb, b) for b in faces.FaceDetector()(rgb)]


def _classifiers(args, recipe):
    checkpoints, _, inference, model, _, transforms = recipe
    torch.manual_seed(0)
    net = C.randomize_batchnorm(model.DAN(num_classes=7, num_heads=4).eval())
    info = checkpoints.ModelInfo(("a", "b", "c", "d", "e", "f", "g"), args.image_size, transforms.IMAGENET_MEAN,
                                 transforms.IMAGENET_STD, 4, "authors", None, "")  # fmt: skip
    fast = dan_layers.reparameterize_model(copy.deepcopy(net)).to(memory_format=torch.channels_last)
    return {"fast": inference.FaceClassifier(fast, info, channels_last=True),
            "plain": inference.FaceClassifier(net, info)}  # fmt: skip


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
        decode_ms, detect_by_scale, crops = _stage_times(args, recipe, jpeg_path)
    finally:
        jpeg_path.unlink()
    detect_ms = detect_by_scale[1.1]
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
            classify_ms = 1e3 * t[name]["median_s"] / batch
            per_face = (decode_ms + detect_ms) / len(crops) + classify_ms
            rows.append({
                "batch": batch, "variant": name, "decode_ms_per_face": decode_ms / len(crops),
                "detect_ms_per_face": detect_ms / len(crops), "classify_ms_per_face": classify_ms,
                "faces_per_s": 1e3 / per_face, "classify_faces_per_s": 1e3 / classify_ms,
                "classify_share": classify_ms / per_face, "rounds": t[name]["n"],
                "fast_speedup": t["plain"]["median_s"] / t["fast"]["median_s"] if name == "fast" else None,
            })  # fmt: skip
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
            "timing": "decode and detect: median of repeated calls; classify: fast and plain interleaved, "
            "median per batch; end to end = sum of the stages per face",
        },  # fmt: skip
        "summary": {
            "logits_rel_err_fast_vs_plain": parity,
            "detect_ms_per_picture_scale_factor_1_3": detect_by_scale[1.3],
        },
        "rows": rows,
    }
    C.write_json(C.result_name(NAME, args), payload, args.out)
    return payload


if __name__ == "__main__":
    main()
