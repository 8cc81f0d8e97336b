"""What a run prints: a clean progress bar, and one warning for ``--amp`` where it is slow.

Issue 10, items 7-8: every run with a progress bar printed PyTorch's "Converting a
tensor with requires_grad=True to a scalar" (the bar read the loss without
detaching it), leaving a dead bar behind; ``--amp`` on a CPU without native
bfloat16 trained ~6x slower without a word.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import train_dan  # noqa: E402
from dan_recipe import runtime  # noqa: E402

TINY = ["--image-size", "32", "--batch-size", "8", "--epochs", "1", "--threads", "1", "--no-plots"]
SYNTH = ["--data", "synthetic", "--synthetic-train", "28", "--synthetic-test", "14"]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal (POSIX)")
def test_progress_bar_run_prints_no_autograd_warning(tmp_path):
    # the bar is drawn only on a terminal: give the script one as its stderr. A fresh
    # process, because PyTorch prints that warning once per process.
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(
        slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0)
    )  # tqdm draws nothing at 0 columns
    cmd = [
        sys.executable,
        str(EXAMPLES / "train_dan.py"),
        *TINY,
        *SYNTH,
        "--progress",
        "--out",
        str(tmp_path / "r"),
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=ROOT)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # read the terminal until the script closes it
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO once the other side is closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=240)
    reader.join(timeout=10)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, terminal[-3000:] + stdout.decode()[-3000:]
    assert "epoch 1/1" in terminal  # the bar was drawn
    assert "requires_grad" not in terminal and "Warning" not in terminal, terminal


def test_amp_without_native_bf16_warns_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda *a, **k: False)
    train_dan.main([*TINY, *SYNTH, "--no-progress", "--amp", "--epochs", "2", "--out", str(tmp_path / "a")])
    assert capsys.readouterr().out.count(runtime.AMP_WITHOUT_BF16_WARNING) == 1
    train_dan.main([*TINY, *SYNTH, "--no-progress", "--out", str(tmp_path / "b")])  # no --amp: nothing
    assert runtime.AMP_WITHOUT_BF16_WARNING not in capsys.readouterr().out
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda *a, **k: True)
    train_dan.main([*TINY, *SYNTH, "--no-progress", "--amp", "--out", str(tmp_path / "c")])
    assert runtime.AMP_WITHOUT_BF16_WARNING not in capsys.readouterr().out


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    bf16 = tmp_path / "bf16"
    bf16.write_text("flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("Features\t: fp asimd bf16 i8mm\n")
    assert runtime.cpu_has_native_bf16(avx2) is False
    assert runtime.cpu_has_native_bf16(bf16) is True
    assert runtime.cpu_has_native_bf16(arm) is True
    assert runtime.cpu_has_native_bf16(tmp_path / "missing") is None
