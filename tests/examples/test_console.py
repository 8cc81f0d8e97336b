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

import pytest
import torch
import train_dan
from dan_recipe import train, utils
from tiny_runs import EXAMPLES, ROOT, SYNTH
from tiny_runs import TINY as QUIET_TINY

TINY = [arg for arg in QUIET_TINY if arg != "--no-progress"]


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
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda *a, **k: False)
    # bf16 autocast is emulated (slow) on such a CPU: two epochs of two steps each
    few = ["--synthetic-train", "8", "--synthetic-test", "7", "--batch-size", "4"]
    out = str(tmp_path / "a")
    train_dan.main([*TINY, *SYNTH, *few, "--no-progress", "--amp", "--epochs", "2", "--out", out])
    assert capsys.readouterr().out.count(train.AMP_WITHOUT_BF16_WARNING) == 1
    said: list[str] = []
    cpu = torch.device("cpu")
    train.amp_setup({"amp": False, "amp_dtype": "auto"}, cpu, said.append)  # no --amp: nothing
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda *a, **k: True)
    _, dtype, _ = train.amp_setup({"amp": True, "amp_dtype": "auto"}, cpu, said.append)
    assert said == [] and dtype == torch.bfloat16  # native bf16: autocast without a word


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    bf16 = tmp_path / "bf16"
    bf16.write_text("flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("Features\t: fp asimd bf16 i8mm\n")
    assert train.cpu_has_native_bf16(avx2) is False
    assert train.cpu_has_native_bf16(bf16) is True
    assert train.cpu_has_native_bf16(arm) is True
    assert train.cpu_has_native_bf16(tmp_path / "missing") is None


def test_auto_threads_follow_what_other_processes_use(monkeypatch):
    """``--threads auto`` is decided again every epoch, from the CPU time others used meanwhile."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(utils.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(utils, "busy_cpus", lambda interval=0.5: 1.2)  # busy at start-up
    now = {"wall": 0.0, "own": 0.0, "idle": 0, "total": 0}
    said: list[str] = []

    def advance(seconds: float, own_cpus: float, other_cpus: float) -> None:  # 100 ticks/s per CPU
        now["wall"] += seconds
        now["own"] += seconds * own_cpus
        now["idle"] += round(100 * seconds * (2 - own_cpus - other_cpus))
        now["total"] += round(100 * seconds * 2)

    with train._ProcessSettings():
        threads = utils.AutoThreads(
            said.append, clock=lambda: now["wall"], cpu_clock=lambda: now["own"],
            stat=lambda: (now["idle"], now["total"]),
        )  # fmt: skip
        assert torch.get_num_threads() == 1 and "1.2 of 2 CPUs busy" in said[0]
        advance(30.0, own_cpus=1.0, other_cpus=0.0)  # the other process is gone
        threads.update()
        assert torch.get_num_threads() == 2 and "0.0 of 2" in said[-1]
        advance(30.0, own_cpus=1.0, other_cpus=1.0)  # it is back
        threads.update()
        assert torch.get_num_threads() == 1
        clocks = {"clock": lambda: now["wall"], "cpu_clock": lambda: now["own"]}
        frozen = utils.AutoThreads(said.append, adapt=False, stat=lambda: (now["idle"], now["total"]), **clocks)
        advance(30.0, own_cpus=1.0, other_cpus=0.0)
        frozen.update()  # DataLoader workers: their time would count as another process's
        assert torch.get_num_threads() == 1
