"""Q6: DAN on photos, videos and streams (examples/predict.py): today's detection path against the octave scan.

Three measurements, all in one process on one thread (torch and OpenCV):

* **scenes**: the command's pipeline end to end (decode, detect + crop, classify,
  write the records), run on four inputs with the path before issue 17
  (:class:`TodaysPath`, a faithful copy: OpenCV's full ``detectMultiScale`` at scale
  factor 1.1, 5 neighbours, faces from 32 px, frames read without decoder threads
  set) and with ``dan_recipe.photos`` as it is (octave scan from ``--min-face auto``,
  3 neighbours, boxes confirmed by the neighbouring video frames), interleaved
  round by round. Inputs (``tests/examples/photo_scenes.py``): scikit-image's
  astronaut (512 x 512), matplotlib's Grace Hopper (512 x 600), both enlarged on one
  1920 x 1080 picture (JPEG quality 90), and the 60-frame 640 x 480 test video
  (MJPG ``.avi``). The classifier is the authors' DAN (7 classes, 4 heads, 224 px,
  random weights with non-trivial BatchNorm statistics), fast path (the default),
  16 faces per batch. Every box is checked against where the face is: real faces
  found, false boxes, and how far the new boxes lie from today's.
* **quality**: faces found and false boxes at each ``--min-neighbors``, on the two
  portraits shrunk so that the face is 32 to 222 px, on the 1080p picture, on 18
  scikit-image photos without a face, and on the test video (with and without
  the neighbouring-frame rule).
* **rows**: classification alone, fast path (re-parameterized, channels-last)
  against the plain eval-mode model (``--no-fast``), per batch size, with the
  decode and detect times of the 512 px portrait (its scene row); and detection of
  that portrait at scale factor 1.3 (the authors' video demo) against 1.1.

Times are medians of this process's CPU time (with one thread, robust to other
processes taking the CPU away); wall-clock medians are in the JSON (``*_wall``).

    python benchmarks/predict.py --threads 1
"""

from __future__ import annotations

import copy
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import _common as C
import torch

import dan_layers

NAME = "predict"
EXAMPLES = C.ROOT / "examples"
SCENES = C.ROOT / "tests" / "examples"
BATCH = 16  # predict.py's default --batch-size
#: Published CPU figures of the toolkits users run, as quoted in issue 17 (not measured here).
TOOLKITS = {"LibreFace (CPU)": 2.7, "py-feat, RetinaFace (CPU)": 5.8,
            "a DAN successor, users on a live camera": 4.0}  # fmt: skip


def _recipe():
    for path in (EXAMPLES, SCENES):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import photo_scenes  # noqa: PLC0415
    import predict  # noqa: PLC0415
    from dan_recipe import model, photos, records, transforms  # noqa: PLC0415

    return model, photos, records, transforms, predict, photo_scenes


class TodaysPath:
    """The detection path of the photo commands before issue 17, copied faithfully.

    ``FaceDetector.__call__`` was: RGB to grey, ``detectMultiScale(scaleFactor=1.1,
    minNeighbors=5, minSize=(32, 32))`` on the whole picture, boxes sorted; videos
    were read with ``cv2.VideoCapture(path)`` and ``read`` + ``cvtColor`` per frame.
    """

    def __init__(self, photos, records) -> None:
        import cv2

        self.cv2, self.photos, self.records = cv2, photos, records
        self.cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / photos.HAAR_FRONTAL_FACE))

    def detect(self, rgb):
        gray = self.cv2.cvtColor(rgb, self.cv2.COLOR_RGB2GRAY)
        found = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(32, 32))
        return sorted(self.records.Box(*(int(v) for v in row)) for row in list(found))

    def pictures(self, path: Path) -> Iterator:
        if path.suffix != ".avi":
            yield self.photos.Picture(str(path), None, None, self.photos.read_image(path))
            return
        capture = self.cv2.VideoCapture(str(path))
        fps, index = float(capture.get(self.cv2.CAP_PROP_FPS)), 0
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            rgb = self.cv2.cvtColor(bgr, self.cv2.COLOR_BGR2RGB)
            yield self.photos.Picture(str(path), index, index / fps, rgb)
            index += 1
        capture.release()


class _Clock:
    """Wall and CPU seconds per stage; duck-types ``photos.StageTimes`` for ``find_faces``."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, stage: str):
        clock = self

        class _Block:
            def __enter__(self):
                self.t, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                clock.wall[stage] = clock.wall.get(stage, 0.0) + time.perf_counter() - self.t
                clock.cpu[stage] = clock.cpu.get(stage, 0.0) + time.process_time() - self.c

        return _Block()

    def timed(self, stage: str, items: Iterator) -> Iterator:
        while True:
            with self(stage):
                item = next(items, None)
            if item is None:
                return
            yield item


def _run(kind: str, path: Path, recipe, todays: TodaysPath, classifier, class_names) -> tuple[_Clock, list]:
    """One run of the command's pipeline over ``path``: stage times and every picture's boxes."""
    _, photos, _, _, predict, _ = recipe
    clock, found, sink = _Clock(), [], io.StringIO()
    if kind == "today":
        pictures = clock.timed("decode", todays.pictures(path))

        def faces() -> Iterator:
            for picture in pictures:
                with clock("detect"):
                    boxes = todays.detect(picture.rgb)
                    crops = [photos.crop_face(picture.rgb, box) for box in boxes]
                yield photos.FacesInPicture(picture, boxes, crops)

        items = faces()
    else:
        source = photos.Source(path, "video" if path.suffix == ".avi" else "image")
        pictures = clock.timed("decode", photos.iter_pictures([source], on_unreadable=_fail))
        items = photos.find_faces(pictures, photos.FaceDetector(), times=clock)
    for group in photos.group_for_batches(items, BATCH):
        crops = [crop for item in group for crop in item.crops]
        with clock("classify"):
            probabilities = classifier.classify(crops, BATCH)
        with clock("write"):
            start = 0
            for item in group:
                stop = start + len(item.crops)
                for record in predict.face_records(item, probabilities[start:stop], class_names):
                    sink.write(json.dumps(record.as_json()) + "\n")
                start = stop
        found += [(item.picture.frame, item.boxes) for item in group]
    return clock, found


def _fail(source, reason: str) -> None:
    raise RuntimeError(f"{source.path}: {reason}")


def _truth(scene: str, frame: int | None, scenes) -> list[tuple[float, float, float]]:
    if scene == "video":
        return [scenes.moving_portrait_face(frame)]
    faces = {"astronaut": [scenes.ASTRONAUT_FACE], "grace_hopper": [scenes.GRACE_HOPPER_FACE],
             "both_1080p": list(scenes.BOTH_1080P_FACES)}[scene]  # fmt: skip
    return [(x, y, w) for x, y, w, _ in faces]


def _on_face(box, face) -> bool:
    x, y, side = face
    return abs(box.x - x) <= 0.25 * side and abs(box.y - y) <= 0.25 * side and abs(box.w - side) <= 0.3 * side


def _score(scene: str, found: list, scenes) -> dict:
    """Real faces found, false boxes, frames with a false box, missed faces."""
    real = false = missed = false_frames = 0
    for frame, boxes in found:
        truth = _truth(scene, frame, scenes)
        hits = [any(_on_face(b, f) for b in boxes) for f in truth]
        on = sum(1 for b in boxes if any(_on_face(b, f) for f in truth))
        real, missed = real + sum(hits), missed + len(hits) - sum(hits)
        false += len(boxes) - on
        false_frames += len(boxes) > on
    return {"pictures": len(found), "real_faces": real, "false_boxes": false, "missed_faces": missed,
            "pictures_with_false_box": false_frames}  # fmt: skip


def _box_shift(scene: str, old: list, new: list, scenes) -> dict:
    """How far the new box of a face lies from today's: the largest difference of x, y, w or h (px, and as a
    share of the side), and its median over the faces."""
    shifts = []
    for (frame, old_boxes), (_, new_boxes) in zip(old, new, strict=True):
        for face in _truth(scene, frame, scenes):
            a = next((b for b in old_boxes if _on_face(b, face)), None)
            b = next((b for b in new_boxes if _on_face(b, face)), None)
            if a is not None and b is not None:
                shifts.append((max(abs(a.x - b.x), abs(a.y - b.y), abs(a.w - b.w), abs(a.h - b.h)), a.w))
    if not shifts:
        return {}
    worst = max(shifts, key=lambda s: s[0] / s[1])
    return {"box_shift_px": max(px for px, _ in shifts), "box_shift_share": worst[0] / worst[1],
            "box_shift_median_px": statistics.median(px for px, _ in shifts)}  # fmt: skip


def _write_scenes(folder: Path, scenes, quick: bool) -> dict[str, Path]:
    from PIL import Image

    paths = {}
    pictures = {"astronaut": scenes.astronaut(), "grace_hopper": scenes.grace_hopper()}
    if not quick:
        pictures["both_1080p"] = scenes.both_1080p()
    for name, rgb in pictures.items():
        paths[name] = folder / f"{name}.jpg"
        Image.fromarray(rgb).save(paths[name], quality=90)
    frames = scenes.moving_portrait()  # quick: its first 8 frames
    paths["video"] = scenes.write_video(folder / "video.avi", frames[:8] if quick else frames)
    return paths


def _scene_rows(args, recipe, classifier, class_names, folder: Path) -> list[dict]:
    _, photos, records, _, _, scenes = recipe
    todays = TodaysPath(photos, records)
    rows = []
    for scene, path in _write_scenes(folder, scenes, args.quick).items():
        samples: dict[str, list[_Clock]] = {"today": [], "new": []}
        found = {}
        rounds = 1 if args.quick else (args.video_rounds if scene == "video" else args.rounds)
        for r in range(rounds + 1):  # round 0 warms up
            for kind in ("today", "new") if r % 2 else ("new", "today"):
                clock, found[kind] = _run(kind, path, recipe, todays, classifier, class_names)
                if r:
                    samples[kind].append(clock)
        shift = _box_shift(scene, found["today"], found["new"], scenes)
        for kind in ("today", "new"):
            rows.append(_scene_row(scene, kind, samples[kind], _score(scene, found[kind], scenes), shift))
        old, new = rows[-2], rows[-1]
        for clock in ("", "_wall"):
            new[f"detect_speedup{clock}"] = old[f"detect_ms{clock}"] / new[f"detect_ms{clock}"]
            new[f"end_to_end_speedup{clock}"] = old[f"total_ms{clock}"] / new[f"total_ms{clock}"]
        C.print_table([old, new], ["scene", "path", "pictures", "real_faces", "false_boxes", "decode_ms",
                                   "detect_ms", "classify_ms", "total_ms", "faces_per_s", "detect_share"],
                      title=f"{NAME}: {scene} (ms per picture, CPU)")  # fmt: skip
    return rows


def _scene_row(scene: str, kind: str, clocks: list[_Clock], score: dict, shift: dict) -> dict:
    row = {"scene": scene, "path": kind, "rounds": len(clocks), **score}
    if kind == "new":
        row.update(shift)
    n = max(1, score["pictures"])
    for suffix, attr in (("", "cpu"), ("_wall", "wall")):
        per_stage = {s: statistics.median(getattr(c, attr).get(s, 0.0) for c in clocks) * 1e3 / n
                     for s in ("decode", "detect", "classify", "write")}  # fmt: skip
        total = statistics.median(sum(getattr(c, attr).values()) for c in clocks) * 1e3 / n
        for stage, value in per_stage.items():
            row[f"{stage}_ms{suffix}"] = value
        row[f"total_ms{suffix}"] = total
        row[f"pictures_per_s{suffix}"] = 1e3 / total
        row[f"faces_per_s{suffix}"] = score["real_faces"] / n * 1e3 / total
        row[f"detect_share{suffix}"] = per_stage["detect"] / total
    return row


def _quality(args, recipe, folder: Path) -> dict:
    """Faces found and false boxes for today's path and each --min-neighbors of the octave scan."""
    import numpy as np
    from skimage import data

    _, photos, records, _, _, scenes = recipe
    todays = TodaysPath(photos, records)
    detectors: dict[str, Callable] = {"today (full scan, 5 neighbours)": todays.detect}
    for n in (2, 3, 4, 5):
        detectors[f"octave scan, {n} neighbours"] = photos.FaceDetector(min_neighbors=n)
    cases = []
    sizes = (32, 48, 100) if args.quick else (32, 36, 40, 48, 56, 64, 80, 100, 150, 222)
    for rgb, (x, y, w, _) in ((scenes.astronaut(), scenes.ASTRONAUT_FACE),
                              (scenes.grace_hopper(), scenes.GRACE_HOPPER_FACE)):  # fmt: skip
        for px in sizes:
            k = px / w
            if k <= 1:
                small = rgb if k == 1 else scenes.resize(rgb, round(rgb.shape[1] * k), round(rgb.shape[0] * k))
                cases.append((small, [(x * k, y * k, px)]))
    if not args.quick:
        cases.append((scenes.both_1080p(), [(x, y, w) for x, y, w, _ in scenes.BOTH_1080P_FACES]))
    names = ["coffee", "chelsea", "rocket", "hubble_deep_field", "brick", "grass", "gravel", "coins", "page",
             "text", "clock", "immunohistochemistry", "retina", "moon", "logo", "colorwheel", "cell",
             "microaneurysms"]  # fmt: skip
    empty = []
    for name in names[:3] if args.quick else names:
        try:
            picture = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001  (a sample this scikit-image cannot load offline)
            continue
        if picture.ndim == 2:
            picture = np.stack([picture] * 3, axis=-1)
        if picture.dtype != np.uint8:
            picture = (255 * (picture - picture.min()) / max(1e-9, float(np.ptp(picture)))).astype(np.uint8)
        empty.append(np.ascontiguousarray(picture[..., :3]))
    video = [picture.rgb for picture in todays.pictures(folder / "video.avi")]
    out = []
    for label, detect in detectors.items():
        row = {"detector": label, "faces": 0, "found": 0, "false_on_faces": 0, "boxes_without_face": 0}
        for rgb, faces in cases:
            boxes = detect(rgb)
            hits = sum(any(_on_face(b, f) for b in boxes) for f in faces)
            row["faces"] += len(faces)
            row["found"] += hits
            row["false_on_faces"] += sum(1 for b in boxes if not any(_on_face(b, f) for f in faces))
        row["boxes_without_face"] = sum(len(detect(rgb)) for rgb in empty)
        per_frame = [(i, detect(rgb)) for i, rgb in enumerate(video)]
        for rule, frames in (("", per_frame), ("_confirmed", _confirmed(photos, per_frame))):
            if rule and label.startswith("today"):
                continue
            score = _score("video", frames, scenes)
            row[f"video_false_frames{rule}"] = score["pictures_with_false_box"]
            row[f"video_missed_frames{rule}"] = score["missed_faces"]
        out.append(row)
    C.print_table(out, list(out[0]), title=f"{NAME}: detection quality")
    return {"rows": out, "photos_without_face": len(empty), "video_frames": len(video)}


def _confirmed(photos, per_frame: list) -> list:
    items = [(photos.Picture("video", i, None, None), boxes) for i, boxes in per_frame]  # type: ignore[arg-type]
    return [(p.frame, boxes) for p, boxes in photos.confirm_in_time(items, photos.DEFAULT_CONFIRM_FRAMES)]


def _scale_factor_times(args, recipe, jpeg_path) -> tuple[dict[str, dict[str, float]], list]:
    """Detection of the 512 px portrait at scale factor 1.1 (the default) and 1.3 (the authors' video demo),
    interleaved; and its face crops."""
    _, photos, _, _, _, _ = recipe
    rgb = photos.read_image(jpeg_path)
    fns = {}
    for scale_factor in (1.1, 1.3):
        detector = photos.FaceDetector(scale_factor=scale_factor)
        if not detector(rgb):
            raise SystemExit(f"predict benchmark: the cascade found no face at scale factor {scale_factor}")
        fns[f"detect_{scale_factor}"] = lambda d=detector: [photos.crop_face(rgb, b) for b in d(rgb)]
    timings = C.time_interleaved(fns, repeats=args.stage_repeats, warmup=1)
    return timings, [photos.crop_face(rgb, b) for b in photos.FaceDetector()(rgb)]


def _classifiers(args, recipe):
    model, photos, _, transforms, _, _ = recipe
    torch.manual_seed(0)
    net = C.randomize_batchnorm(model.DAN(num_classes=7, num_heads=4).eval())
    info = model.ModelInfo(("a", "b", "c", "d", "e", "f", "g"), args.image_size, transforms.IMAGENET_MEAN,
                                 transforms.IMAGENET_STD, 4, "authors", None, "")  # fmt: skip
    fast = dan_layers.reparameterize_model(copy.deepcopy(net)).to(memory_format=torch.channels_last)
    return {"fast": photos.FaceClassifier(fast, info, channels_last=True),
            "plain": photos.FaceClassifier(net, info)}, info  # fmt: skip


def _row(batch: int, name: str, portrait: dict, classify: dict, faces: int) -> dict:
    """One table row: per-face milliseconds of each stage (CPU time, and wall time), faces/s; decode and detect
    are the new path's on the 512 px portrait (its row of the scenes)."""
    row = {"batch": batch, "variant": name, "rounds": classify[name]["n"]}
    for clock, key in (("", "cpu_median_s"), ("_wall", "median_s")):
        decode = portrait[f"decode_ms{clock}"] / faces
        detect = portrait[f"detect_ms{clock}"] / faces
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
    p.add_argument("--stage-repeats", type=int, default=30, help="calls timed for decode and detect")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds per batch size")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per picture scene")
    p.add_argument("--video-rounds", type=int, default=3, help="interleaved rounds of the 60-frame video")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.image_size, args.stage_repeats = [1, 2], 64, 3
    C.setup(args)
    load_at_start = C.load_average()
    import cv2

    cv2.setNumThreads(torch.get_num_threads())
    recipe = _recipe()
    classifiers, info = _classifiers(args, recipe)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out, prefix=f".{NAME}-") as tmp:
        folder = Path(tmp)
        scene_rows = _scene_rows(args, recipe, classifiers["fast"], info.class_names, folder)
        quality = _quality(args, recipe, folder)
        stages, crops = _scale_factor_times(args, recipe, folder / "astronaut.jpg")
    portrait = next(r for r in scene_rows if r["scene"] == "astronaut" and r["path"] == "new")
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
            rows.append(_row(batch, name, portrait, t, len(crops)))
        C.print_table([r for r in rows if r["batch"] == batch],
                      ["batch", "variant", "decode_ms_per_face", "detect_ms_per_face", "classify_ms_per_face",
                       "faces_per_s", "classify_share", "fast_speedup"],
                      title=f"{NAME}: batch {batch}")  # fmt: skip
    payload = {
        "name": NAME,
        "question": "DAN on photos, videos and streams: today's detection path against the octave scan, end to "
        "end; classification fast path vs plain",
        "command": C.command_line(),
        "env": {**C.env_info("cpu"), "opencv": cv2.__version__, "opencv_threads": cv2.getNumThreads()},
        "config": {
            "batches": args.batches,
            "image_size": args.image_size,
            "picture_size": 512,
            "faces_per_picture": len(crops),
            "quick": args.quick,
            "stage_repeats": args.stage_repeats,
            "repeats_max": repeats,
            "scene_rounds": args.rounds,
            "video_rounds": args.video_rounds,
            "scene_batch": BATCH,
            "timing": "scenes: today's path and the new one interleaved round by round (order alternated, one "
            "warm-up round), medians per stage of this process's CPU time; scale factors 1.1 and 1.3 "
            "interleaved; classify fast and plain interleaved per batch; *_wall: wall clock",
        },  # fmt: skip
        "summary": {
            "logits_rel_err_fast_vs_plain": parity,
            "detect_ms_per_picture_scale_factor_1_3": 1e3 * stages["detect_1.3"]["cpu_median_s"],
            "detect_ms_per_picture_scale_factor_1_1": 1e3 * stages["detect_1.1"]["cpu_median_s"],
            "stages": stages,
            "toolkits_fps": TOOLKITS,
        },
        "scenes": scene_rows,
        "quality": quality,
        "rows": rows,
    }
    payload["env"]["load_average_end"] = payload["env"]["load_average"]
    payload["env"]["load_average"] = load_at_start
    C.write_json(C.result_name(NAME, args), payload, args.out)
    return payload


if __name__ == "__main__":
    main()
