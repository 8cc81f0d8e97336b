"""Shared helpers of the benchmark scripts: arguments, environment record, timing, output.

Timing protocol (2 noisy CPU cores): the implementations being compared run in the
same process, *interleaved* (one call of each per round, the order rotated every
round), after warm-up; each reports the median over the rounds, and the comparison
is the ratio of medians. The interquartile range is kept in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

# make `import reference_dan` and `import dan_layers` work when run as a script
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # silence the profiler's USDT lines

import torch  # noqa: E402

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def make_parser(description: str, *, device_flags: bool = False) -> argparse.ArgumentParser:
    """The arguments every script takes: ``--quick``, ``--out`` (and ``--device``/``--dtype``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes and repeats (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: per script)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    if device_flags:
        p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                       help="float32 or bfloat16 (parameters and inputs; default float32)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``; resolve ``--device`` and fail clearly if it is absent."""
    if args.threads:
        torch.set_num_threads(args.threads)
    name = getattr(args, "device", "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}); run on a CUDA machine or use --device cpu")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif device.type != "cpu":
        raise SystemExit(f"--device {name}: expected cpu or cuda")
    return device


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    return DTYPES[getattr(args, "dtype", "float32")]


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers depend on: machine, library versions, threads."""
    import dan_layers

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dan_layers": dan_layers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "git_commit": _git_commit(),
        "device": str(device),
        "load_average": load_average(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    inner: int = 1,
    budget_s: float | None = None,
    min_repeats: int = 3,
) -> dict[str, dict[str, float]]:
    """Median seconds per call of each function, measured interleaved in rounds.

    Each round calls every function ``inner`` times (order rotated per round), so slow
    drifts of the machine hit all of them alike. Besides wall time, the process's
    CPU time per call is recorded (``cpu_median_s``): with one thread it is robust to
    other processes preempting this one. With ``budget_s`` the number of
    rounds stops once the timed rounds have taken that long (at least
    ``min_repeats``, at most ``repeats`` rounds).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu_samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            sync(device)
            c0 = time.process_time()
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[n]()
            sync(device)
            samples[n].append((time.perf_counter() - t0) / inner)
            cpu_samples[n].append((time.process_time() - c0) / inner)
        if budget_s is not None and r + 1 >= min_repeats and time.perf_counter() - start >= budget_s:
            break
    out = {}
    for n, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        out[n] = {"median_s": statistics.median(s), "q1_s": q[0], "q3_s": q[2], "min_s": min(s),
                  "n": len(s), "cpu_median_s": statistics.median(cpu_samples[n]),
                  "cpu_min_s": min(cpu_samples[n])}
    return out


def result_name(name: str, args: argparse.Namespace) -> str:
    """``name`` for CPU float32 runs, ``name-<device>-<dtype>`` otherwise (no overwriting)."""
    device = str(getattr(args, "device", "cpu"))
    dtype = str(DTYPES[getattr(args, "dtype", "float32")]).replace("torch.", "")
    if device == "cpu" and dtype == "float32":
        return name
    return f"{name}-{device.replace(':', '')}-{dtype}"


def write_json(name: str, payload: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """Print ``rows`` as a fixed-width text table."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v == 0:
                return "0"
            if abs(v) >= 1e4 or abs(v) < 1e-3:
                return f"{v:.3g}"
            return f"{v:.3f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def command_line() -> str:
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes on the machine skew timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Normwise relative error max|a - e| / max|e| (computed in float64)."""
    a = actual.detach().double()
    e = expected.detach().double()
    scale = e.abs().max().clamp_min(1e-300)
    return float((a - e).abs().max() / scale)


@torch.no_grad()
def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters.

    Fresh BatchNorms (mean 0, variance 1, weight 1, bias 0) make folding them almost
    the identity; these values make the re-parameterization checks meaningful.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            dev = m.running_mean.device
            m.running_mean.copy_((torch.rand(n, generator=g) - 0.5).to(dev) * 0.4)
            m.running_var.copy_((torch.rand(n, generator=g) + 0.5).to(dev))
            if m.affine:
                m.weight.copy_((torch.rand(n, generator=g) + 0.5).to(dev))
                m.bias.copy_((torch.rand(n, generator=g) - 0.5).to(dev) * 0.2)
    return model


def _profiled_peak_once(fn: Callable[[], Any]) -> int:
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = sorted(
        (e for e in trace.get("traceEvents", []) if e.get("name") == "[memory]"
         and int(e.get("args", {}).get("Device Type", 0)) == 0),
        key=lambda e: e["ts"],
    )
    if not events:
        return 0
    first = events[0]["args"]
    start = first["Total Allocated"] - first["Bytes"]
    return int(max(e["args"]["Total Allocated"] for e in events) - start)


def profiled_peak_bytes(fn: Callable[[], Any], runs: int = 2) -> int:
    """Peak bytes that torch's CPU allocator held for tensors created while ``fn`` ran.

    Uses the profiler's memory events (``profile_memory=True``): each allocation and
    free is an instant event carrying the allocator's running total; the peak of that
    total minus its value before ``fn`` is what ``fn`` needed on top of what already
    existed (activations, temporaries and newly allocated gradients). It sees only
    allocations made through torch's CPU allocator, not oneDNN scratch space or
    Python objects.

    The profiler cannot credit the freeing of a block allocated before profiling
    was first switched on (e.g. last step's gradients, dropped by
    ``zero_grad(set_to_none=True)``), so the first session over-counts; ``fn`` runs
    ``runs`` times, each profiled, and the smallest peak (steady state) is returned.
    """
    import gc

    peaks = []
    for _ in range(runs):
        gc.collect()
        peaks.append(_profiled_peak_once(fn))
    return min(peaks)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    """Current resident set size."""
    kib = _proc_status_kib("VmRSS")
    return maxrss_bytes() if kib is None else kib * 1024


def maxrss_bytes() -> int:
    """Peak resident set size of this process's address space.

    ``/proc/self/status`` VmHWM where available: unlike ``getrusage().ru_maxrss``, which
    a child inherits from its parent across fork + exec (so a child started by a big
    parent would report the parent's peak), it belongs to the current address space
    and can be reset with :func:`reset_peak_rss`.
    """
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_rss_growth(fn: Callable[[], Any]) -> int:
    """Growth of peak RSS while ``fn`` runs, over the RSS just before it."""
    import gc

    gc.collect()
    before = rss_bytes() if reset_peak_rss() else maxrss_bytes()
    fn()
    return maxrss_bytes() - before


def child_env() -> dict[str, str]:
    """Environment for a memory-measuring subprocess.

    A fixed glibc mmap threshold (64 KiB) makes every tensor-sized allocation its own
    mapping, returned to the system when freed; otherwise glibc raises the threshold
    dynamically and later allocations reuse freed heap memory that peak RSS already
    counted, hiding them from the maxrss delta.
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return env


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``; no context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grouped_copy(block: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a dan-layers block that always runs the grouped convolutions.

    On CPU the block's grouped convolutions (``HeadwiseConv2d``) run each group as
    a dense convolution; on CUDA they run as one grouped convolution. The copy's
    grouped convolutions are plain ``nn.Conv2d`` (same weights), so that a benchmark
    can show what the CPU path buys.
    """
    import copy

    from dan_layers._headwise import HeadwiseConv2d

    clone = copy.deepcopy(block)
    for m in clone.modules():
        if isinstance(m, HeadwiseConv2d):
            m.__class__ = torch.nn.Conv2d
    return clone
