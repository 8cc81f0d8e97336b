"""What every part of the recipe shares: its errors, safe file writes, RNG state, metrics, logging, threads.

* **Errors.** A mistake a user can fix raises a :class:`RecipeError` that carries
  what it is about: :class:`UsageError` (a flag; a ``ValueError``),
  :class:`InputError` (a file or folder; an ``OSError``), :class:`CheckpointError`
  (a weights file; a ``RuntimeError``). A Python caller catches them with
  ``except Exception`` like any error; only the commands turn them into one
  ``error: ...`` line and status 1 (:func:`run_command`), and only there.
  :class:`CommandParser` makes argparse's own mistakes the same.
* **Files.** :func:`atomic_write` (and :func:`save_torch`, :func:`write_json`):
  a crash or Ctrl-C leaves the old file or the new one, never half of one.
* **RNG.** :func:`rng_state` / :func:`set_rng_state`: every global generator, as
  ``torch.load(weights_only=True)`` reads it (resume is bit-identical).
* **Metrics.** :func:`confusion_matrix`, accuracy and balanced accuracy (mean
  per-class recall, as the authors' corrected figures are) from it, and
  :func:`summarise_split`.
* **Logging.** :class:`Logger` prints on rank 0 without breaking a progress bar.
* **Threads and devices.** :func:`set_threads` (``--threads N`` or ``auto``: the
  CPUs other processes leave free), :class:`AutoThreads` (decided again every
  epoch), :func:`pick_device`.
* **Label orders** of the data sets DAN was published on (:data:`LABEL_SETS`): the
  data readers and the authors' checkpoints both use them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

__all__ = [
    "AFFECTNET_CLASSES",
    "LABEL_SETS",
    "RAFDB_CLASSES",
    "AutoThreads",
    "CheckpointError",
    "CommandParser",
    "InputError",
    "Logger",
    "RecipeError",
    "UsageError",
    "accuracy_from_confusion",
    "atomic_write",
    "auto_threads",
    "balanced_accuracy_from_confusion",
    "confusion_matrix",
    "one_line",
    "per_class_recall",
    "pick_device",
    "rng_state",
    "run_command",
    "save_torch",
    "set_rng_state",
    "set_threads",
    "stderr_is_terminal",
    "summarise_split",
    "write_json",
]

#: RAF-DB's classes in label order (label ``i`` is line label ``i + 1`` of its annotation file).
RAFDB_CLASSES: tuple[str, ...] = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
#: AffectNet's classes; label ``i`` is folder ``str(i)``. AffectNet-7 drops the last.
AFFECTNET_CLASSES: tuple[str, ...] = (
    "Neutral",
    "Happy",
    "Sad",
    "Surprise",
    "Fear",
    "Disgust",
    "Anger",
    "Contempt",
)
#: The published label orders by name (``--labels``, ``load_model(labels=...)``).
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "rafdb": RAFDB_CLASSES,
    "affectnet7": AFFECTNET_CLASSES[:7],
    "affectnet": AFFECTNET_CLASSES,
}


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(message).split())


class RecipeError(Exception):
    """A mistake the user can fix; ``str(error)`` is one line that says what and where.

    Args:
        message: What was expected and what came.
        subject: What it is about (a flag such as ``"--data-root"``, a path); put
            in front of the message, and kept as an attribute.
    """

    def __init__(self, message: str, *, subject: str | None = None) -> None:
        self.subject = subject
        self.reason = one_line(message)
        super().__init__(f"{subject}: {self.reason}" if subject else self.reason)


class UsageError(RecipeError, ValueError):
    """A flag (or argument) with a value that cannot work; ``subject`` is the flag and its value."""


class InputError(RecipeError, OSError):
    """A file or folder that is missing, unreadable or laid out wrongly; ``subject`` names it."""


class CheckpointError(RecipeError, RuntimeError):
    """A weights file that cannot be read or does not fit the model; names the keys that do not fit."""


def run_command(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main(argv)``; return its exit status.

    A :class:`RecipeError` becomes one ``error: ...`` line on stderr and status 1;
    Ctrl-C becomes status 130. Anything else is a bug and keeps its traceback.
    """
    try:
        main(argv)
    except KeyboardInterrupt:
        return 130
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose mistakes are :class:`UsageError` s (one line, status 1)."""

    def error(self, message: str) -> NoReturn:
        """Raise argparse's complaint as a :class:`UsageError`."""
        raise UsageError(f"{message} (see {self.prog} --help)")


# --------------------------------------------------------------------------------------
# Files, written atomically
# --------------------------------------------------------------------------------------


class _DeferInterrupt:
    """Hold Ctrl-C (SIGINT) while a file is being replaced; re-raise it afterwards."""

    def __enter__(self) -> _DeferInterrupt:
        self.received = False
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.getsignal(signal.SIGINT)

            def handler(signum: int, frame: Any) -> None:
                self.received = True

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.received:
            raise KeyboardInterrupt


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Any, *, binary: bool = True, also: Sequence[str | Path] = ()) -> None:
    """Write ``path`` via a temp file in the same directory, fsync, then ``os.replace``.

    A crash or Ctrl-C at any point leaves either the old file or the new one, never
    a partial file. ``also``: further paths (same directory) that receive the same
    content, by a hard link to the temp file (a copy where links are not supported),
    each replaced atomically BEFORE ``path`` itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _DeferInterrupt():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        extra: list[str] = []
        try:
            with os.fdopen(fd, "wb" if binary else "w") as f:
                with contextlib.suppress(OSError, AttributeError):  # mkstemp makes 0600
                    os.fchmod(f.fileno(), 0o666 & ~_umask())
                write(f)
                f.flush()
                os.fsync(f.fileno())
            for other in also:
                other = Path(other)
                fd2, tmp2 = tempfile.mkstemp(prefix=f".{other.name}.", suffix=".tmp", dir=other.parent)
                os.close(fd2)
                extra.append(tmp2)
                os.unlink(tmp2)
                try:
                    os.link(tmp, tmp2)
                except OSError:
                    shutil.copyfile(tmp, tmp2)
                os.replace(tmp2, other)
                extra.pop()
            os.replace(tmp, path)
        except BaseException:
            for t in [tmp, *extra]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(t)
            raise
        _fsync_dir(path.parent)


def save_torch(obj: Mapping[str, Any], path: str | Path, *, also: Sequence[str | Path] = ()) -> None:
    """``torch.save`` atomically to ``path`` (and, hard-linked, to every path in ``also``)."""
    atomic_write(path, lambda f: torch.save(dict(obj), f), also=also)


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically (values JSON lacks become strings)."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str), binary=False)


# --------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors / lists / numbers (weights_only-loadable)."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(name),
            "keys": torch.as_tensor(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss": gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def confusion_matrix(
    preds: Tensor | Sequence[int], targets: Tensor | Sequence[int], num_classes: int
) -> Tensor:
    """Counts ``cm[true, predicted]``.

    Args:
        preds: Predicted labels ``(N,)`` (or logits ``(N, num_classes)``, arg-maxed).
        targets: True labels ``(N,)``.
        num_classes: Number of classes.

    Returns:
        ``LongTensor (num_classes, num_classes)``; rows are true classes.

    Raises:
        ValueError: On mismatched lengths or labels outside ``[0, num_classes)``.

    Example:
        >>> confusion_matrix([0, 1, 1], [0, 1, 0], 2).tolist()
        [[1, 1], [0, 1]]
    """
    p = torch.as_tensor(preds)
    t = torch.as_tensor(targets)
    if p.dim() == 2:
        p = p.argmax(1)
    p, t = p.long().flatten().cpu(), t.long().flatten().cpu()
    if p.shape != t.shape:
        raise ValueError(
            f"confusion_matrix: expected as many predictions as targets, got {p.numel()} and {t.numel()}"
        )
    for name, v in (("preds", p), ("targets", t)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            raise ValueError(
                f"confusion_matrix: expected {name} in [0, {num_classes}), got range "
                f"[{int(v.min())}, {int(v.max())}]"
            )
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(
        num_classes, num_classes
    )


def _check_cm(cm: Tensor) -> Tensor:
    cm = torch.as_tensor(cm)
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {tuple(cm.shape)}")
    return cm.double()


def accuracy_from_confusion(cm: Tensor) -> float:
    """Overall accuracy, ``trace / total``; ``nan`` for an empty matrix."""
    c = _check_cm(cm)
    total = float(c.sum())
    return float(c.diagonal().sum()) / total if total > 0 else float("nan")


def per_class_recall(cm: Tensor) -> Tensor:
    """Recall of every class (``diag / row sum``); ``nan`` for classes without samples."""
    c = _check_cm(cm)
    support = c.sum(1)
    return torch.where(support > 0, c.diagonal() / support.clamp_min(1), torch.full_like(support, float("nan")))


def balanced_accuracy_from_confusion(cm: Tensor) -> float:
    """Mean per-class recall over the classes that have samples.

    Classes with no true samples (an all-zero row) are excluded from the mean,
    because their recall is undefined; predictions *into* such a class still
    lower the recall of the true classes. ``nan`` if no class has samples.

    Example:
        >>> balanced_accuracy_from_confusion(torch.tensor([[8, 0], [1, 1]]))
        0.75
    """
    r = per_class_recall(cm)
    r = r[~torch.isnan(r)]
    return float(r.mean()) if r.numel() else float("nan")


def summarise_split(cm: Tensor, loss_sums: Tensor, count: int) -> dict[str, Any]:
    """Accuracy, balanced accuracy (from the confusion matrix) and mean losses of a split.

    Args:
        cm: Confusion matrix ``(N, N)``, rows true classes.
        loss_sums: Sums over the samples of ``(loss, ce, affinity, partition)``.
        count: Number of samples.

    Returns:
        ``accuracy``, ``balanced_accuracy``, ``loss``, ``ce``, ``affinity``,
        ``partition``, ``samples`` and ``confusion_matrix`` (nested lists).
        Accuracies are ``nan`` when ``count`` is 0.
    """
    cm_cpu = cm.detach().cpu().to(torch.int64)
    n = max(int(count), 1)
    return {
        "accuracy": accuracy_from_confusion(cm_cpu),
        "balanced_accuracy": balanced_accuracy_from_confusion(cm_cpu),
        "loss": float(loss_sums[0]) / n,
        "ce": float(loss_sums[1]) / n,
        "affinity": float(loss_sums[2]) / n,
        "partition": float(loss_sums[3]) / n,
        "samples": int(count),
        "confusion_matrix": cm_cpu.tolist(),
    }


# --------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (a progress bar is drawn only there)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class Logger:
    """Prints on rank 0 only, through ``tqdm.write`` so that a live bar is not broken.

    Args:
        enabled: Whether this process prints (rank 0).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._said: set[str] = set()

    def __call__(self, msg: str = "") -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def once(self, msg: str) -> None:
        """Print ``msg`` unless this logger printed it before."""
        if msg not in self._said:
            self._said.add(msg)
            self(msg)


# --------------------------------------------------------------------------------------
# Threads and devices
# --------------------------------------------------------------------------------------


def _cpu_jiffies(stat: str | os.PathLike[str] = "/proc/stat") -> tuple[int, int] | None:
    """``(idle, total)`` clock ticks of all CPUs since boot (Linux), or ``None``."""
    try:
        with open(stat) as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return vals[3] + (vals[4] if len(vals) > 4 else 0), sum(vals)  # idle + iowait
    except (OSError, ValueError, IndexError):
        return None


def _busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None, cpus: int) -> float | None:
    """How many CPUs were busy, on average, between two :func:`_cpu_jiffies` samples."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (1.0 - (after[0] - before[0]) / (after[1] - before[1])) * cpus


def threads_left(cpus: int, busy_elsewhere: float) -> int:
    """Threads for this process: the CPUs that other processes leave free (at least 1).

    On a 2-core machine, two OpenMP threads run at ~1.7x one thread when the machine
    is idle but several times SLOWER than one thread when another process keeps a
    core busy (the threads wait for each other at every parallel region).
    """
    return max(1, min(cpus, int(cpus - busy_elsewhere + 0.25)))


def busy_cpus(interval: float = 0.5) -> float | None:
    """CPUs kept busy by other processes right now (this one sleeps while it samples), or ``None``."""
    before = _cpu_jiffies()
    time.sleep(interval)
    return _busy_share(before, _cpu_jiffies(), os.cpu_count() or 1)


def auto_threads() -> tuple[int, str]:
    """Threads for this process now, and why. Under torchrun the launcher's OMP_NUM_THREADS wins."""
    n = os.cpu_count() or 1
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads(), "OMP_NUM_THREADS is set"
    busy = busy_cpus()
    if busy is None:
        return n, "all CPUs (CPU usage unknown)"
    return threads_left(n, busy), f"{busy:.1f} of {n} CPUs busy with other processes"


def set_threads(setting: int | str | None, log: Callable[[str], None]) -> int:
    """``--threads``: a count, ``"auto"`` (decided once, now, and logged) or ``None`` (torch's).

    Returns:
        The thread count now in use.
    """
    if setting == "auto":
        n, why = auto_threads()
        torch.set_num_threads(n)
        log(f"threads: {n} (auto: {why})")
    elif setting:
        torch.set_num_threads(int(setting))
    return torch.get_num_threads()


class AutoThreads:
    """``--threads auto`` for training: the CPUs other processes leave free, decided again every epoch.

    The first decision samples the machine for half a second at start-up; each
    :meth:`update` looks at the time since the one before: the CPU time spent on the
    whole machine (``/proc/stat``) minus this process's own. So a moment of load at
    start-up costs one epoch on fewer threads, not the whole run. Not adapting with
    ``OMP_NUM_THREADS`` set, or when DataLoader workers (other processes) share the work.

    Args:
        log: Where to say what was decided.
        adapt: Whether :meth:`update` may change the count.
        clock: Wall clock (seconds).
        cpu_clock: This process's CPU time (seconds, all threads).
        stat: ``(idle, total)`` CPU ticks of the machine, or ``None``.
    """

    def __init__(
        self,
        log: Callable[[str], None],
        *,
        adapt: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
        stat: Callable[[], tuple[int, int] | None] = _cpu_jiffies,
    ) -> None:
        self.log, self.clock, self.cpu_clock, self.stat = log, clock, cpu_clock, stat
        self.cpus = os.cpu_count() or 1
        self.adapt = adapt and "OMP_NUM_THREADS" not in os.environ
        set_threads("auto", log)
        self._mark = (self.clock(), self.cpu_clock(), self.stat())

    def update(self) -> None:
        """Set the thread count from what other processes used since the last call."""
        wall0, own0, stat0 = self._mark
        self._mark = (self.clock(), self.cpu_clock(), self.stat())
        wall = self._mark[0] - wall0
        busy = _busy_share(stat0, self._mark[2], self.cpus)
        if not self.adapt or busy is None or wall < 1.0:
            return
        elsewhere = max(0.0, busy - (self._mark[1] - own0) / wall)
        threads = threads_left(self.cpus, elsewhere)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.log(
                f"threads: {threads} (auto: {elsewhere:.1f} of {self.cpus} CPUs busy with other processes)"
            )


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    """The device for ``--device`` (``auto``: CUDA if present); one GPU per local rank.

    Raises:
        UsageError: ``--device cuda`` without CUDA, or an unknown device name.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError("expected auto, cpu, cuda or cuda:<index>", subject=f"--device {spec}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("CUDA is not available on this machine", subject=f"--device {spec}")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device
