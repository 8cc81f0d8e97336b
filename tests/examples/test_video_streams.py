"""predict.py on videos that end early, files that FFmpeg cannot read, streams and cameras (issue 17).

What a user must be able to rely on: a video that ends before the frame its header
announces is one warning line and a count in the closing line; FFmpeg's own messages
never reach the terminal (the reason is quoted in our line); one unreadable file is
one line; a URL (here a ``file://`` URL, which OpenCV opens as a stream) is read frame
by frame and its records are written as they come; Ctrl-C ends a stream with the
closing line; ``--threads`` sets OpenCV's threads too; the closing line times each stage.
Output is captured at the file-descriptor level (``capfd``), where FFmpeg writes.
"""

from __future__ import annotations

import json
import re

import explain
import numpy as np
import predict
import pytest
import torch
from dan_recipe import photos as recipe_photos
from photo_helpers import QUIET_CPU, astronaut, run_cli, save_our_checkpoint, write_video

FFMPEG_NOISE = re.compile(r"@ 0x|overread|moov atom|\[ ?WARN|VIDEOIO")


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return save_our_checkpoint(tmp_path_factory.mktemp("ours") / "best.pt")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """60 frames, 256 x 256, the astronaut's face (47 px) in each."""
    frame = np.ascontiguousarray(astronaut()[::2, ::2])
    return write_video(tmp_path_factory.mktemp("clip") / "clip.avi", [frame] * 60)


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_video_cut_in_half_is_one_warning_and_a_count_in_the_closing_line(clip, ours, tmp_path, capfd):
    data = clip.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    status, out, err = run_cli(predict.main, [str(cut), "--checkpoint", str(ours), *QUIET_CPU], capfd)
    read = len(_jsonl(out))
    assert status == 0 and 20 < read < 40, err
    warning, closing = err.strip().splitlines()  # two lines, nothing from FFmpeg between them
    assert warning.startswith(f"warning: {cut}: read {read} of the 60 frames its header announces; ")
    assert f"{60 - read} frames lost" in warning
    assert f"1 video ({read} frames)" in closing and f"{60 - read} video frames lost" in closing
    assert not FFMPEG_NOISE.search(err.replace(warning, "")), err


def test_an_mp4_without_its_index_is_one_line(tmp_path, ours, capfd):
    import cv2

    frames = [np.ascontiguousarray(astronaut()[::4, ::4])] * 5
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5, (128, 128))
    if not writer.isOpened():
        pytest.skip("this OpenCV cannot write MP4")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"moov") - 4])  # the index (moov atom) is written last: cut it off
    capfd.readouterr()
    status, out, err = run_cli(predict.main, [str(path), "--checkpoint", str(ours), *QUIET_CPU], capfd)
    assert status == 1 and out == "", err
    (line,) = err.strip().splitlines()  # was: FFmpeg's line twice, a warning, then the error
    assert line.startswith("error: INPUT: nothing could be read") and str(path) in line
    assert "moov atom not found" in line  # FFmpeg's reason, quoted in ours


def test_a_bad_file_among_good_ones_is_one_warning_and_counted(clip, ours, tmp_path, capfd):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    argv = [str(broken), str(clip), "--every", "20", "--checkpoint", str(ours), *QUIET_CPU]
    status, out, err = run_cli(predict.main, argv, capfd)
    assert status == 0 and len(_jsonl(out)) == 3, err
    warning, closing = err.strip().splitlines()
    assert warning.startswith(f"warning: skipped {broken}: OpenCV cannot open it as a video")
    assert "1 unreadable file skipped" in closing


def test_the_closing_line_times_each_stage_and_threads_govern_opencv(clip, ours, capfd):
    import cv2

    before = (cv2.getNumThreads(), torch.get_num_threads())
    cv2.setNumThreads(3)
    try:
        argv = [str(clip), "--every", "30", "--checkpoint", str(ours), "--device", "cpu", "--threads", "2",
                "--no-progress"]  # fmt: skip
        status, _, err = run_cli(predict.main, argv, capfd)
        assert status == 0, err
        assert cv2.getNumThreads() == 2  # was left at OpenCV's own count
    finally:
        cv2.setNumThreads(before[0])
        torch.set_num_threads(before[1])
    closing = err.strip().splitlines()[-1]
    assert re.search(
        r"in \d+\.\d s \(decode \d+\.\d, detect \d+\.\d, classify \d+\.\d, write \d+\.\d s\)$", closing
    )


def test_a_stream_is_written_frame_by_frame_and_ctrl_c_ends_it_with_the_closing_line(
    clip, ours, tmp_path, capfd, monkeypatch
):
    out_file = tmp_path / "live.jsonl"
    classify = recipe_photos.FaceClassifier.classify
    calls = []

    def classify_then_ctrl_c(self, crops, batch_size):
        calls.append(out_file.read_text().count("\n"))  # what a reader of the file sees before this frame
        if len(calls) == 4:
            raise KeyboardInterrupt
        return classify(self, crops, batch_size)

    monkeypatch.setattr(recipe_photos.FaceClassifier, "classify", classify_then_ctrl_c)
    url = clip.resolve().as_uri()  # file:///...: OpenCV opens it as a stream
    argv = [url, "--checkpoint", str(ours), "--out", str(out_file), *QUIET_CPU]
    status, out, err = run_cli(predict.main, argv, capfd)
    assert status == 0, err  # Ctrl-C is how a stream ends
    assert calls == [0, 1, 2, 3]  # one frame per batch, each frame's record in the file before the next
    records = _jsonl(out_file.read_text())
    assert [(r["source"], r["frame"], r["face"]) for r in records] == [(url, i, 0) for i in range(3)]
    assert all(r["time_s"] >= 0 for r in records)
    interrupted, closing = err.strip().splitlines()
    assert interrupted.startswith("interrupted: ")
    assert closing.startswith("predict: 0 images, 0 videos and 1 stream (") and "interrupted; wrote" in closing


def test_a_camera_that_is_not_there_is_one_line(ours, capfd):
    status, out, err = run_cli(predict.main, ["--camera", "63", "--checkpoint", str(ours), *QUIET_CPU], capfd)
    assert status == 1 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("error: INPUT: nothing could be read (camera:63: OpenCV cannot open it"), line


def test_streams_and_cameras_are_sources_and_their_frames_are_batched_alone():
    sources = recipe_photos.expand_inputs(["rtsp://10.0.0.2:554/live", "file:///tmp/x.avi"], cameras=[0, 0])
    expected = [("stream", "rtsp://10.0.0.2:554/live"), ("stream", "file:///tmp/x.avi"), ("stream", "camera:0")]
    assert [(s.kind, s.name) for s in sources] == expected
    live = [recipe_photos.FacesInPicture(recipe_photos.Picture("s", i, 0.0, np.zeros((1, 1, 3)), True))
            for i in range(3)]  # fmt: skip
    assert [len(g) for g in recipe_photos.group_for_batches(live, 16)] == [1, 1, 1]


@pytest.mark.parametrize("main", [predict.main, explain.main], ids=["predict", "explain"])
def test_help_shows_the_new_flags(main, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    assert "auto (default): 5% of its shorter side" in text and "--confirm-frames N" in text
    assert ("--camera N" in text) == (main is predict.main)
