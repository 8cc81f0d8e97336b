"""Process-wide settings of a run: threads, device, determinism, seeds, autocast.

:class:`ProcessSettings` puts back what a run changes (deterministic algorithms,
thread count) when an in-process caller's run ends.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

import dan_layers

from .distributed import Dist
from .errors import UserError

__all__ = [
    "AMP_WITHOUT_BF16_WARNING",
    "AutoThreads",
    "ProcessSettings",
    "amp_setup",
    "apply_determinism",
    "apply_threads",
    "auto_threads",
    "cpu_has_native_bf16",
    "environment",
    "pick_device",
    "seed_everything",
    "set_threads_once",
    "stderr_is_terminal",
]

#: Printed once by :func:`amp_setup` for ``--amp`` on a CPU without native bfloat16.
AMP_WITHOUT_BF16_WARNING = (
    "warning: --amp: this CPU has no native bfloat16 instructions (AVX512-BF16 or AMX on x86, "
    "BF16 on Arm), so autocast emulates bfloat16 and trains several times slower than float32 "
    "(measured ~6x on an AVX2-only CPU); run without --amp here"
)


class ProcessSettings(contextlib.AbstractContextManager):
    """Saves torch's deterministic-algorithm flags and thread count; restores them on exit."""

    def __enter__(self) -> ProcessSettings:
        self.saved = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.get_num_threads(),
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.use_deterministic_algorithms(self.saved[0], warn_only=self.saved[1])
        torch.set_num_threads(self.saved[2])


def cpu_jiffies(stat: str | os.PathLike[str] = "/proc/stat") -> tuple[int, int] | None:
    """``(idle, total)`` clock ticks of all CPUs since boot (Linux), or ``None``."""
    try:
        with open(stat) as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return vals[3] + (vals[4] if len(vals) > 4 else 0), sum(vals)  # idle + iowait
    except (OSError, ValueError, IndexError):
        return None


def busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None, cpus: int) -> float | None:
    """How many CPUs were busy, on average, between two :func:`cpu_jiffies` samples."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (1.0 - (after[0] - before[0]) / (after[1] - before[1])) * cpus


def busy_cpus(interval: float = 0.5) -> float | None:
    """CPUs kept busy by other processes right now (this one sleeps while it samples), or None."""
    before = cpu_jiffies()
    time.sleep(interval)
    return busy_share(before, cpu_jiffies(), os.cpu_count() or 1)


def threads_left(cpus: int, busy_elsewhere: float) -> int:
    """Threads for this process: the CPUs that other processes leave free (at least 1).

    On a 2-core machine, two OpenMP threads run at ~1.7x one thread when the machine
    is idle but several times SLOWER than one thread when another process keeps a
    core busy (the threads wait for each other at every parallel region).
    """
    return max(1, min(cpus, int(cpus - busy_elsewhere + 0.25)))


def auto_threads() -> tuple[int, str]:
    """Threads for this process now, and why. Under torchrun the launcher's OMP_NUM_THREADS wins."""
    n = os.cpu_count() or 1
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads(), "OMP_NUM_THREADS is set"
    busy = busy_cpus()
    if busy is None:
        return n, "all CPUs (CPU usage unknown)"
    return threads_left(n, busy), f"{busy:.1f} of {n} CPUs busy with other processes"


class AutoThreads:
    """``--threads auto``: the CPUs other processes leave free, decided again before every epoch.

    The first decision samples the machine for half a second at start-up; each
    :meth:`update` looks at the time since the one before: the CPU time spent on the
    whole machine (``/proc/stat``) minus this process's own. So a moment of load at
    start-up costs one epoch on fewer threads, not the whole run, and a run slows down
    less when another process starts. Not used with ``OMP_NUM_THREADS`` set, and
    without adapting when DataLoader workers (other processes) share the work.

    Args:
        log: Where to say what was decided.
        adapt: Whether :meth:`update` may change the count.
        clock: Wall clock (seconds).
        cpu_clock: This process's CPU time (seconds, all threads).
        stat: :func:`cpu_jiffies`.
    """

    def __init__(
        self,
        log: Callable[[str], None],
        *,
        adapt: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
        stat: Callable[[], tuple[int, int] | None] = cpu_jiffies,
    ) -> None:
        self.log, self.clock, self.cpu_clock, self.stat = log, clock, cpu_clock, stat
        self.cpus = os.cpu_count() or 1
        self.adapt = adapt and "OMP_NUM_THREADS" not in os.environ
        threads, why = auto_threads()
        torch.set_num_threads(threads)
        log(f"threads: {threads} (auto: {why})")
        self._mark = (self.clock(), self.cpu_clock(), self.stat())

    def update(self) -> None:
        """Set the thread count from what other processes used since the last call."""
        wall0, own0, stat0 = self._mark
        self._mark = (self.clock(), self.cpu_clock(), self.stat())
        wall = self._mark[0] - wall0
        busy = busy_share(stat0, self._mark[2], self.cpus)
        if not self.adapt or busy is None or wall < 1.0:
            return
        elsewhere = max(0.0, busy - (self._mark[1] - own0) / wall)
        threads = threads_left(self.cpus, elsewhere)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.log(
                f"threads: {threads} (auto: {elsewhere:.1f} of {self.cpus} CPUs busy with other processes)"
            )


def apply_threads(setting: int | str | None) -> None:
    """``torch.set_num_threads`` for a fixed ``--threads`` (a count; ``None`` leaves torch's)."""
    if setting and setting != "auto":
        torch.set_num_threads(int(setting))


def set_threads_once(setting: int | str | None, log: Callable[[str], None]) -> None:
    """``--threads`` of a short command (predict, explain): ``"auto"`` is decided once, now."""
    if setting != "auto":
        apply_threads(setting)
        return
    n_threads, why = auto_threads()
    torch.set_num_threads(n_threads)
    log(f"threads: {n_threads} (auto: {why})")


def pick_device(spec: str, ranks: Dist) -> torch.device:
    """The device for ``--device`` (``auto``: CUDA if present); one GPU per local rank.

    Raises:
        UserError: ``--device cuda`` without CUDA, or an unknown device name.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec}: expected auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", ranks.local_rank if ranks.enabled else 0)
        torch.cuda.set_device(device)
    return device


def apply_determinism(deterministic: bool) -> None:
    """Deterministic algorithms (warn only where none exists) and no cuDNN autotuning."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_native_bf16(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16).

    Args:
        cpuinfo: Where the CPU flags are listed (Linux).

    Returns:
        ``None`` where the flags cannot be read (not Linux).
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def amp_setup(
    cfg: Mapping[str, Any], device: torch.device, log: Callable[[str], None]
) -> tuple[Callable[[], Any], torch.dtype | None, bool]:
    """Autocast for ``--amp`` / ``--amp-dtype``.

    On a CPU without native bfloat16 it warns once (:data:`AMP_WITHOUT_BF16_WARNING`).

    Returns:
        ``(context factory, dtype or None, whether a GradScaler is needed)``.

    Raises:
        UserError: ``--amp-dtype fp16`` on a CPU.
    """
    if not cfg["amp"]:
        return contextlib.nullcontext, None, False
    want = cfg["amp_dtype"]
    if device.type == "cuda":
        if want == "auto":
            want = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        if want == "fp16":
            raise UserError("--amp-dtype fp16: expected bf16 or auto on the CPU (float16 autocast needs CUDA)")
        want = "bf16"
        if cpu_has_native_bf16() is False:
            log(AMP_WITHOUT_BF16_WARNING)
    dtype = torch.bfloat16 if want == "bf16" else torch.float16

    def autocast() -> Any:
        return torch.autocast(device_type=device.type, dtype=dtype)

    return autocast, dtype, dtype == torch.float16


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (a progress bar is drawn only there)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def environment(
    cfg: Mapping[str, Any], device: torch.device, ranks: Dist, per_rank_batch: int
) -> dict[str, Any]:
    """Versions, device, world size, batch sizes and threads: the run record's ``env``."""
    return {
        "torch": torch.__version__,
        "dan_layers": dan_layers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "world_size": ranks.world,
        "batch_size": per_rank_batch * ranks.world,
        "batch_size_per_rank": per_rank_batch,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "deterministic": bool(cfg["deterministic"]),
        "cuda": torch.version.cuda,
    }
