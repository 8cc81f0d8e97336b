#!/usr/bin/env python
r"""Train and evaluate the reference DAN on synthetic faces, RAF-DB, AffectNet or an image folder.

Usage (see ``--help`` for every flag)::

    python examples/train_dan.py --preset demo --out runs/demo          # CPU demo, synthetic faces
    python examples/train_dan.py --preset rafdb --data-root data/raf-basic --out runs/raf
    python examples/train_dan.py --preset affectnet --data-root data/affectnet --num-classes 7
    python examples/train_dan.py --data imagefolder --data-root data/sfew --preset rafdb
    python examples/train_dan.py --resume --out runs/raf                # continue runs/raf/last.pt
    python examples/train_dan.py --eval-only --checkpoint rafdb_epoch21_acc0.897.pth \\
        --data rafdb --data-root data/raf-basic                        # authors' checkpoint
    torchrun --nproc_per_node=4 examples/train_dan.py --preset rafdb ...  # DistributedDataParallel

What it does, and what it writes to ``--out``:

* Presets (``demo``, ``rafdb``, ``affectnet``) set the recipe; every value can be
  overridden by its flag and the resolved configuration is logged with where each
  value came from (preset, flag, default).
* The model is selected on a VALIDATION split held out from the training split
  (``--val-fraction``); the test split is only used to report the selected (best)
  and the last model. ``metrics.json`` holds the per-epoch history, ``final`` (test
  metrics of the best-on-validation epoch), ``last``, timings, configuration, class
  names and environment; ``confusion_matrix.png`` and ``attention_maps.png`` show
  the test confusion matrix and each head's spatial attention over a few test faces.
* Checkpoints ``last.pt`` (every epoch) and ``best.pt`` (on improvement) are written
  atomically and hold everything needed to continue bit-exactly with ``--resume``:
  model, loss centres, optimizer, scheduler, AMP scaler, epoch, step, best metric,
  arguments and RNG states, all loadable with ``torch.load(weights_only=True)``.
* Under ``torchrun`` the model *and* the affinity loss (whose centres are learnable)
  are wrapped together in one DistributedDataParallel module, so the centres stay
  identical on every rank.

Weight decay on the affinity/center-loss centres: none by default
(``--center-weight-decay 0``). The centres are points in feature space, not
model capacity; decaying them pulls them toward the origin and shrinks their
variance, which is the affinity loss's denominator, working against the loss's
push-apart term. The authors' scripts pass the centres to the same optimizer
group as the network (RAF-DB: weight decay 1e-4); ``--center-weight-decay 1e-4``
reproduces that exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # so that `import dan` works when imported from elsewhere
    sys.path.insert(0, str(_HERE))

import dan as dan_model  # noqa: E402

import dan_layers  # noqa: E402

# --------------------------------------------------------------------------------------
# Presets and configuration
# --------------------------------------------------------------------------------------

#: Values used when neither the preset nor a flag sets them.
DEFAULTS: dict[str, Any] = {
    "data": "synthetic",
    "data_root": None,
    "num_classes": None,  # dataset's own (RAF-DB 7, AffectNet 8, synthetic 7, folders)
    "synthetic_train": 2000,
    "synthetic_test": 700,
    "val_fraction": 0.1,
    "augment": None,  # transform preset; None -> the preset's name
    "balanced_sampler": False,
    "image_size": 224,
    "epochs": 40,
    "batch_size": 256,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "center_weight_decay": 0.0,
    "scheduler": "step",
    "step_size": 10,
    "gamma": 0.1,
    "warmup_epochs": 0.0,
    "min_lr_ratio": 0.0,
    "num_heads": 4,
    "affinity": "affinity",
    "partition": "paper",
    "lambda_af": 1.0,
    "lambda_pt": 1.0,
    "num_centers": None,  # None -> num_classes
    "label_smoothing": 0.0,
    "select_metric": "accuracy",
    "backbone_weights": None,
    "backbone_strict": True,
    "channels_last": False,
    "amp": False,
    "amp_dtype": "auto",
    "seed": 0,
    "deterministic": True,
    "device": "auto",
    "num_workers": 0,
    "threads": None,
    "progress": True,
    "plots": True,
    "viz_faces": 6,
    "stop_after_epoch": None,
}

#: Recipes. ``rafdb``/``affectnet`` are the authors' scripts (yaoing/DAN rafdb.py,
#: affectnet.py); ``demo`` is sized to train the full DAN (ResNet-18 + 4 heads) from
#: scratch on 2 CPU cores: 2,250 training faces at 48 px (+250 validation), 6 epochs,
#: batch 32, AdamW 1.5e-3 with cosine decay: ~140-160 s and 94-97 % test accuracy
#: (seeds 0-2; ~225 s with one thread when another process holds the second core).
#: Batch 32 learns markedly faster than 64 for the same compute; bf16 autocast was
#: no faster with 2 threads and once diverged, so the demo stays in float32.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "data": "synthetic",
        "synthetic_train": 2500,
        "synthetic_test": 700,
        "val_fraction": 0.1,
        "augment": "demo",
        "image_size": 48,
        "epochs": 6,
        "batch_size": 32,
        "optimizer": "adamw",
        "lr": 1.5e-3,
        "weight_decay": 0.05,
        "scheduler": "cosine",
        "warmup_epochs": 0.3,
        "partition": "paper",
        "threads": "auto",
    },
    "rafdb": {
        "data": "rafdb",
        "augment": "rafdb",
        "image_size": 224,
        "epochs": 40,
        "batch_size": 256,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "scheduler": "step",
        "step_size": 10,
        "gamma": 0.1,
        "num_centers": 8,  # the authors' AffinityLoss default: 8 centres for 7 classes
        "partition": "official",
    },
    "affectnet": {
        "data": "affectnet",
        "augment": "affectnet",
        "image_size": 224,
        "epochs": 40,
        "batch_size": 256,
        "optimizer": "adam",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "scheduler": "exponential",
        "gamma": 0.6,
        "balanced_sampler": True,
        "partition": "official",
    },
}

#: Preset used when --preset is not given, by --data.
PRESET_FOR_DATA = {
    "synthetic": "demo",
    "rafdb": "rafdb",
    "affectnet": "affectnet",
    "imagefolder": "rafdb",
}

#: Settings an --eval-only run takes from one of our checkpoints (the model must fit it).
_MODEL_KEYS = ("num_heads", "affinity", "partition", "num_centers", "lambda_af", "lambda_pt", "label_smoothing")
#: ... and these unless given as flags (which test set, read how).
_DATA_KEYS = ("data", "data_root", "image_size", "num_classes", "synthetic_test", "seed")

#: Options a resumed run may change (they do not alter the computation).
RUNTIME_OPTIONS = {
    "out",
    "resume",
    "device",
    "num_workers",
    "threads",
    "progress",
    "plots",
    "viz_faces",
    "epochs",
    "stop_after_epoch",
    "data_root",
    "eval_only",
    "checkpoint",
}


def _presets_help() -> str:
    lines = ["presets (flags override every value):"]
    for name, values in PRESETS.items():
        lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    lines.append("defaults: " + ", ".join(f"{k}={v}" for k, v in DEFAULTS.items()))
    lines.append(
        "preset by --data when --preset is not given: "
        + ", ".join(f"{k} -> {v}" for k, v in PRESET_FOR_DATA.items())
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_dan.py",
        description="Train / evaluate DAN (dan-layers reference model). Unset options take "
        "the preset's value, else the default listed below.",
        epilog=_presets_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None,
    )
    bo = argparse.BooleanOptionalAction
    g = p.add_argument_group("recipe")
    g.add_argument("--preset", choices=sorted(PRESETS), help="recipe; default: by --data")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch size (split over ranks)")
    g.add_argument("--lr", type=float)
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument(
        "--center-weight-decay",
        type=float,
        help="weight decay of the loss centres (default 0; the authors used the model's)",
    )
    g.add_argument(
        "--scheduler",
        choices=["step", "exponential", "cosine", "none"],
        help="step/exponential: per epoch (authors); cosine: per step, with warmup",
    )
    g.add_argument("--step-size", type=int, help="StepLR period in epochs")
    g.add_argument("--gamma", type=float, help="StepLR / ExponentialLR factor")
    g.add_argument("--warmup-epochs", type=float, help="linear warmup (cosine scheduler)")
    g.add_argument("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--select-metric", choices=["accuracy", "balanced_accuracy"])

    g = p.add_argument_group("data")
    g.add_argument("--data", choices=["synthetic", "rafdb", "affectnet", "imagefolder"])
    g.add_argument("--data-root", help="dataset directory (not for synthetic)")
    g.add_argument(
        "--num-classes",
        type=int,
        help="AffectNet: 7 drops Contempt; default: the dataset's",
    )
    g.add_argument("--synthetic-train", type=int, help="synthetic training faces")
    g.add_argument("--synthetic-test", type=int, help="synthetic test faces")
    g.add_argument(
        "--val-fraction",
        type=float,
        help="fraction of the training split held out for model selection (0: last epoch)",
    )
    g.add_argument("--image-size", type=int)
    g.add_argument(
        "--augment",
        choices=["rafdb", "affectnet", "demo", "none"],
        help="augmentation preset of transforms.py (default: the preset's name)",
    )
    g.add_argument("--balanced-sampler", action=bo, help="class-balanced sampling")
    g.add_argument("--num-workers", type=int)

    g = p.add_argument_group("model and losses")
    g.add_argument("--num-heads", type=int)
    g.add_argument("--affinity", choices=["affinity", "center", "none"])
    g.add_argument("--partition", choices=["paper", "official", "none"])
    g.add_argument("--lambda-af", type=float)
    g.add_argument("--lambda-pt", type=float)
    g.add_argument("--num-centers", type=int, help="centres (authors: 8 on RAF-DB)")
    g.add_argument("--backbone-weights", help="torchvision-format ResNet-18 file (MS-Celeb)")
    g.add_argument("--backbone-strict", action=bo, help="error on any key mismatch")
    g.add_argument("--channels-last", action=bo)

    g = p.add_argument_group("run")
    g.add_argument("--out", help="output directory (default: runs/<preset>)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="continue from a checkpoint (default: <out>/last.pt if it exists)",
    )
    g.add_argument("--eval-only", action="store_true", default=None)
    g.add_argument("--checkpoint", help="checkpoint for --eval-only (ours or the authors')")
    g.add_argument("--amp", action=bo, help="autocast: bf16 on CPU; bf16/fp16 on CUDA")
    g.add_argument("--amp-dtype", choices=["auto", "bf16", "fp16"])
    g.add_argument("--seed", type=int)
    g.add_argument("--deterministic", action=bo)
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument(
        "--threads",
        type=_threads_arg,
        help="torch.set_num_threads: N, or 'auto' (all CPUs on an idle machine, fewer when other "
        "processes keep CPUs busy: oversubscribed OpenMP threads stall)",
    )
    g.add_argument("--progress", action=bo, help="tqdm bar (off when not a tty)")
    g.add_argument("--plots", action=bo, help="write the PNGs")
    g.add_argument("--viz-faces", type=int, help="rows of the attention-map figure")
    g.add_argument(
        "--stop-after-epoch",
        type=int,
        help="stop cleanly after this epoch (time-sliced jobs; continue with --resume)",
    )
    return p


def _threads_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'auto', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'auto', got {text!r}")
    return n


def _busy_cpus(interval: float = 0.5) -> float | None:
    """CPUs kept busy by other processes right now (from /proc/stat), or None."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return idle, sum(vals)

    try:
        i0, t0 = sample()
        time.sleep(interval)
        i1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (1.0 - (i1 - i0) / (t1 - t0)) * (os.cpu_count() or 1)


def auto_threads() -> tuple[int, str]:
    """Threads for this process: the CPUs that other processes leave free right now.

    On a 2-core machine, two OpenMP threads run at ~1.7x one thread when the machine
    is idle but several times SLOWER than one thread when another process keeps a
    core busy (the threads wait for each other at every parallel region). So a busy
    machine gets fewer threads. Under torchrun the launcher's OMP_NUM_THREADS wins.
    """
    n = os.cpu_count() or 1
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads(), "OMP_NUM_THREADS is set"
    busy = _busy_cpus()
    if busy is None:
        return n, "all CPUs (CPU usage unknown)"
    threads = max(1, min(n, int(n - busy + 0.25)))
    return threads, f"{busy:.1f} of {n} CPUs busy with other processes"


def resolve_config(argv: Sequence[str] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse ``argv`` and merge defaults < preset < flags; return (config, sources)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    given = {k: v for k, v in vars(args).items() if v is not None}
    preset = given.get("preset") or PRESET_FOR_DATA[given.get("data", "synthetic")]
    cfg: dict[str, Any] = dict(DEFAULTS)
    sources = dict.fromkeys(cfg, "default")
    for k, v in PRESETS[preset].items():
        cfg[k] = v
        sources[k] = f"preset:{preset}"
    for k, v in given.items():
        cfg[k] = v
        sources[k] = "flag"
    cfg["preset"] = preset
    sources["preset"] = "flag" if "preset" in given else f"by --data {cfg['data']}"
    for k in ("out", "resume", "eval_only", "checkpoint"):
        cfg.setdefault(k, None)
        sources.setdefault(k, "flag" if k in given else "default")
    if cfg["augment"] is None:
        cfg["augment"] = preset
    if cfg["out"] is None:
        cfg["out"] = str(Path("runs") / preset)
    cfg["eval_only"] = bool(cfg["eval_only"])
    _check_config(cfg)
    return cfg, sources


def _check_config(cfg: Mapping[str, Any]) -> None:
    def positive(name: str) -> None:
        if cfg[name] is not None and cfg[name] <= 0:
            raise SystemExit(f"--{name.replace('_', '-')}: expected > 0, got {cfg[name]}")

    for name in ("epochs", "batch_size", "lr", "image_size", "num_heads", "synthetic_train"):
        positive(name)
    if not 0.0 <= cfg["val_fraction"] < 1.0:
        raise SystemExit(f"--val-fraction: expected in [0, 1), got {cfg['val_fraction']}")
    if cfg["data"] != "synthetic" and not cfg["data_root"]:
        raise SystemExit(f"--data {cfg['data']} needs --data-root")
    if cfg["eval_only"] and not cfg["checkpoint"]:
        raise SystemExit("--eval-only needs --checkpoint PATH")


# --------------------------------------------------------------------------------------
# Small utilities: distributed, logging, RNG, atomic files
# --------------------------------------------------------------------------------------


class Dist:
    """Rank/world information; all helpers are no-ops for a single process."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.owns_group = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if not self.enabled or dist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        self.owns_group = True

    def all_reduce_(self, t: Tensor) -> Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_true(self, flag: bool, device: torch.device) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers_(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        if self.enabled:
            for b in module.buffers():
                dist.broadcast(b, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class Logger:
    """Prints on rank 0 only, through tqdm.write so that a live bar is not broken."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str = "") -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


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


def save_checkpoint(obj: Mapping[str, Any], path: str | Path, *, also: Sequence[str | Path] = ()) -> None:
    """``torch.save`` atomically to ``path`` (and, hard-linked, to every path in ``also``)."""
    atomic_write(path, lambda f: torch.save(dict(obj), f), also=also)


def write_json(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str), binary=False)


def tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def state_sha256(state: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Model + losses in one module (what DDP wraps)
# --------------------------------------------------------------------------------------


class DANWithLosses(nn.Module):
    """DAN and its losses in one module, so that DDP also synchronises the loss centres.

    ``forward(images, labels)`` returns a dict: ``loss`` (the total, to backpropagate),
    ``ce``, ``affinity``, ``partition`` (detached parts) and ``logits`` (detached).
    The losses are computed in float32 even under autocast.

    Total loss = CE + lambda_af * affinity (or center) loss + lambda_pt * partition loss.
    """

    def __init__(
        self,
        model: dan_model.DAN,
        *,
        affinity: str = "affinity",
        partition: str = "paper",
        lambda_af: float = 1.0,
        lambda_pt: float = 1.0,
        num_centers: int | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        feat_dim = model.fusion.fc.in_features
        self.affinity: nn.Module | None
        if affinity == "affinity":
            self.affinity = dan_layers.AffinityLoss(model.num_classes, feat_dim, num_centers=num_centers)
        elif affinity == "center":
            if num_centers not in (None, model.num_classes):
                raise ValueError(
                    f"--num-centers: center loss expects one centre per class "
                    f"({model.num_classes}), got {num_centers}"
                )
            self.affinity = dan_layers.CenterLoss(model.num_classes, feat_dim)
        elif affinity == "none":
            self.affinity = None
        else:
            raise ValueError(f"affinity: expected affinity|center|none, got {affinity!r}")
        self.partition: nn.Module | None
        if partition in ("paper", "official"):
            self.partition = dan_layers.PartitionLoss(partition)
        elif partition == "none":
            self.partition = None
        else:
            raise ValueError(f"partition: expected paper|official|none, got {partition!r}")
        self.lambda_af = float(lambda_af)
        self.lambda_pt = float(lambda_pt)
        self.label_smoothing = float(label_smoothing)

    def loss_parameters(self) -> list[nn.Parameter]:
        return [] if self.affinity is None else list(self.affinity.parameters())

    def forward(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits, feature_map, heads = self.model(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            zero = ce.new_zeros(())
            af = self.affinity(feature_map.float(), labels) if self.affinity is not None else zero
            pt = self.partition(heads.float()) if self.partition is not None else zero
            loss = ce + self.lambda_af * af + self.lambda_pt * pt
        return {
            "loss": loss,
            "ce": ce.detach(),
            "affinity": af.detach(),
            "partition": pt.detach(),
            "logits": logits.detach(),
        }


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` that is a function of (seed, epoch) only."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ShardSampler(Sampler[int]):
    """Rank ``r``'s share of another sampler's indices (or of ``range(n)``).

    With ``pad=True`` (training) every rank gets the same count, the list being
    wrapped around as DistributedSampler does; with ``pad=False`` (evaluation)
    each index is visited exactly once over all ranks, so summed confusion
    matrices count every sample once.
    """

    def __init__(self, base: Sampler[int] | int, rank: int, world: int, *, pad: bool) -> None:
        self.base = base
        self.rank = rank
        self.world = world
        self.pad = pad

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def _indices(self) -> list[int]:
        idx = list(range(self.base)) if isinstance(self.base, int) else list(iter(self.base))
        if self.pad and idx:
            total = math.ceil(len(idx) / self.world) * self.world
            idx = (idx * math.ceil(total / len(idx)))[:total]
        return idx[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        n = self.base if isinstance(self.base, int) else len(self.base)
        if self.pad:
            return math.ceil(n / self.world)
        return len(range(self.rank, n, self.world))


def dataset_labels(ds: Dataset) -> list[int]:
    """Integer labels of a dataset without loading its images."""
    if isinstance(ds, Subset):
        inner = dataset_labels(ds.dataset)
        return [inner[i] for i in ds.indices]
    for attr in ("targets", "labels"):
        if hasattr(ds, attr):
            return [int(v) for v in getattr(ds, attr)]
    if hasattr(ds, "samples"):
        return [int(s[1]) for s in ds.samples]
    raise TypeError(f"cannot read labels of {type(ds).__name__} without loading images")


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list, list]:
    """Indices (train, val): ``fraction`` of every class (at least 1 if it has 2+)."""
    g = torch.Generator().manual_seed(seed + 7919)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, val = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        k = round(len(idx) * fraction)
        if fraction > 0 and k == 0 and len(idx) >= 2:
            k = 1
        val.extend(perm[:k])
        train.extend(perm[k:])
    return sorted(train), sorted(val)


class RenderCache(Dataset):
    """Synthetic faces rendered once and kept (uint8), the transform applied per access.

    A synthetic sample is a pure function of its index, so caching changes nothing
    but the time: rendering is then paid once instead of once per epoch.
    """

    def __init__(self, faces: Any) -> None:
        self.faces = faces
        self.targets = list(faces.targets)
        self.classes = list(faces.classes)
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = self._cache.get(index)
        if img is None:
            img = torch.from_numpy(self.faces.render(index)).permute(2, 0, 1).contiguous()
            self._cache[index] = img
        x = img.float().div_(255.0)
        if self.faces.transform is not None:
            x = self.faces.transform(x)
        return x, self.targets[index]


def build_data(cfg: Mapping[str, Any], *, need_train: bool = True) -> dict[str, Any]:
    """Datasets for train / val / test and class names, from examples/data.py.

    The validation split is a stratified ``--val-fraction`` of the TRAINING split
    (read without augmentation); the test split is never used to choose anything.
    ``--augment none`` trains on the evaluation pipeline (resize + normalise).
    """
    import data as data_mod
    import transforms as tf_mod

    kind = cfg["data"]

    def make(split: str, train: bool, n: int | None = None) -> Dataset:
        kw: dict[str, Any] = {}
        if kind == "synthetic":
            kw = {"num_samples": n, "seed": cfg["seed"]}
        if cfg["augment"] == "none":
            kw["transform"] = tf_mod.build_transforms("demo", cfg["image_size"], False)
        ds = data_mod.build_dataset(
            kind,
            cfg["data_root"],
            split,
            cfg["image_size"],
            cfg["num_classes"],
            None if cfg["augment"] == "none" else cfg["augment"],
            train=train,
            **kw,
        )
        if kind == "synthetic" and hasattr(ds, "render") and cfg["num_workers"] == 0:
            ds = RenderCache(ds)
        return ds

    n_train = cfg["synthetic_train"] if kind == "synthetic" else None
    n_test = cfg["synthetic_test"] if kind == "synthetic" else None
    test = make("test", False, n_test)
    if not need_train:
        return {
            "train": None,
            "val": None,
            "test": test,
            "class_names": list(getattr(test, "classes", []) or []),
            "collate": data_mod.collate_skip_none,
            "module": data_mod,
        }
    train_aug = make("train", True, n_train)
    val = None
    if cfg["val_fraction"] > 0:
        train_plain = make("train", False, n_train)
        tr_idx, va_idx = stratified_split(dataset_labels(train_aug), cfg["val_fraction"], cfg["seed"])
        val = Subset(train_plain, va_idx)
        train = Subset(train_aug, tr_idx)
    else:
        train = train_aug
    class_names = list(getattr(train_aug, "classes", None) or getattr(test, "classes", []))
    return {
        "train": train,
        "val": val,
        "test": test,
        "class_names": class_names,
        "collate": data_mod.collate_skip_none,
        "module": data_mod,
    }


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def summarise(cm: Tensor, sums: Tensor, count: int, data_mod: Any) -> dict[str, Any]:
    """Accuracy, balanced accuracy (from the confusion matrix) and mean losses."""
    cm_cpu = cm.detach().cpu().to(torch.int64)
    n = max(int(count), 1)
    return {
        "accuracy": float(data_mod.accuracy_from_confusion(cm_cpu)),
        "balanced_accuracy": float(data_mod.balanced_accuracy_from_confusion(cm_cpu)),
        "loss": float(sums[0]) / n,
        "ce": float(sums[1]) / n,
        "affinity": float(sums[2]) / n,
        "partition": float(sums[3]) / n,
        "samples": int(count),
        "confusion_matrix": cm_cpu.tolist(),
    }


def _update(cm: Tensor, sums: Tensor, out: Mapping[str, Tensor], y: Tensor) -> None:
    n = cm.shape[0]
    pred = out["logits"].argmax(1)
    cm += torch.bincount(y * n + pred, minlength=n * n).view(n, n)
    b = y.shape[0]
    parts = torch.stack([out["loss"].detach(), out["ce"], out["affinity"], out["partition"]])
    sums += parts.double() * b


@torch.no_grad()
def evaluate(
    net: DANWithLosses,
    loader: DataLoader,
    device: torch.device,
    ddp: Dist,
    amp_ctx: Any,
    data_mod: Any,
    channels_last: bool = False,
) -> dict[str, Any]:
    was_training = net.training
    net.eval()
    n = net.model.num_classes
    cm = torch.zeros(n, n, dtype=torch.int64, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    try:
        for batch in loader:
            if batch is None:
                continue
            x, y = batch
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with amp_ctx():
                out = net(x, y)
            _update(cm, sums, out, y)
    finally:
        net.train(was_training)
    ddp.all_reduce_(cm)
    ddp.all_reduce_(sums)
    return summarise(cm, sums, int(cm.sum()), data_mod)


def _strip_cm(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "confusion_matrix"}


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def plot_confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm_t = torch.tensor(cm, dtype=torch.float64)
    rows = cm_t.sum(1, keepdim=True).clamp_min(1)
    frac = (cm_t / rows).numpy()
    n = len(cm)
    names = list(class_names) if len(class_names) == n else [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.7 * n), dpi=110)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{int(cm_t[i, j])}\n{frac[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if frac[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def plot_attention(
    model: dan_model.DAN,
    dataset: Dataset,
    class_names: Sequence[str],
    path: Path,
    device: torch.device,
    rows: int = 6,
) -> None:
    """Grid: one test face per row (different classes first); columns: face, head maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        labels = dataset_labels(dataset)
    except TypeError:
        labels = None
    chosen: list[int] = []
    seen: set[int] = set()
    order = range(len(dataset))
    if labels is not None:
        for i in order:  # first one face of every class, then fill up
            if labels[i] not in seen:
                seen.add(labels[i])
                chosen.append(i)
            if len(chosen) >= rows:
                break
    for i in order:
        if len(chosen) >= rows:
            break
        if i not in chosen:
            chosen.append(i)
    items = [(i, dataset[i]) for i in chosen]
    items = [(i, s) for i, s in items if s is not None]
    if not items:
        return
    x = torch.stack([s[0] for _, s in items]).to(device)
    y = [int(s[1]) for _, s in items]
    was_training = model.training
    model.eval()
    try:
        logits, _, _ = model(x)
        maps = model.attention_maps(x)  # (B, K, h, w)
    finally:
        model.train(was_training)
    pred = logits.argmax(1).tolist()
    map_hw = tuple(maps.shape[-2:])
    maps = F.interpolate(maps.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    k = maps.shape[1]
    fig, axes = plt.subplots(
        len(items), k + 1, figsize=(1.6 * (k + 1), 1.6 * len(items)), dpi=100, squeeze=False
    )

    def name(c: int) -> str:
        return class_names[c] if c < len(class_names) else str(c)

    for r in range(len(items)):
        img = x[r].float().cpu()
        img = (img - img.amin()) / (img.amax() - img.amin()).clamp_min(1e-8)
        img = img.permute(1, 2, 0).numpy()
        if img.shape[2] == 1:
            img = img[..., 0]
        axes[r][0].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r][0].set_title(f"{name(y[r])} -> {name(pred[r])}", fontsize=7)
        for h in range(k):
            m = maps[r, h].cpu()
            m = (m - m.amin()) / (m.amax() - m.amin()).clamp_min(1e-8)
            axes[r][h + 1].imshow(img, cmap="gray" if img.ndim == 2 else None)
            axes[r][h + 1].imshow(m.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if r == 0:
                axes[r][h + 1].set_title(f"head {h}", fontsize=8)
        for a in axes[r]:
            a.axis("off")
    fig.suptitle(
        f"spatial attention per head ({map_hw[0]}x{map_hw[1]} maps upsampled, each min-max scaled); "
        "title: true -> predicted",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Building blocks of a run
# --------------------------------------------------------------------------------------


def pick_device(spec: str, ddp: Dist) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", ddp.local_rank if ddp.enabled else 0)
        torch.cuda.set_device(device)
    return device


def amp_setup(cfg: Mapping[str, Any], device: torch.device) -> tuple[Any, torch.dtype | None, bool]:
    """(autocast context factory, dtype or None, whether a GradScaler is needed)."""
    if not cfg["amp"]:
        return contextlib.nullcontext, None, False
    want = cfg["amp_dtype"]
    if device.type == "cuda":
        if want == "auto":
            want = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        if want == "fp16":
            raise SystemExit("--amp-dtype fp16 needs CUDA; use bf16 on CPU")
        want = "bf16"
    dtype = torch.bfloat16 if want == "bf16" else torch.float16

    def ctx() -> Any:
        return torch.autocast(device_type=device.type, dtype=dtype)

    return ctx, dtype, dtype == torch.float16


def build_model(cfg: Mapping[str, Any], num_classes: int) -> DANWithLosses:
    model = dan_model.DAN(num_classes=num_classes, num_heads=cfg["num_heads"])
    return DANWithLosses(
        model,
        affinity=cfg["affinity"],
        partition=cfg["partition"],
        lambda_af=cfg["lambda_af"],
        lambda_pt=cfg["lambda_pt"],
        num_centers=cfg["num_centers"],
        label_smoothing=cfg["label_smoothing"],
    )


def build_optimizer(cfg: Mapping[str, Any], net: DANWithLosses) -> torch.optim.Optimizer:
    groups = [
        {"params": list(net.model.parameters()), "weight_decay": cfg["weight_decay"]},
    ]
    centres = net.loss_parameters()
    if centres:
        groups.append({"params": centres, "weight_decay": cfg["center_weight_decay"]})
    name = cfg["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg["lr"])
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"])
    raise SystemExit(f"--optimizer: expected sgd|adam|adamw, got {name!r}")


class _WarmupCosine:
    """LR factor at step s: linear warmup, then cosine from 1 to ``floor``."""

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup = max(int(warmup), 0)
        self.total = max(int(total), 1)
        self.floor = float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(
    cfg: Mapping[str, Any], opt: torch.optim.Optimizer, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler, str]:
    """(scheduler, "epoch" | "step"): when to call ``.step()``."""
    name = cfg["scheduler"]
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, cfg["step_size"], cfg["gamma"]), "epoch"
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, cfg["gamma"]), "epoch"
    if name == "cosine":
        total = cfg["epochs"] * steps_per_epoch
        warm = round(cfg["warmup_epochs"] * steps_per_epoch)
        fn = _WarmupCosine(warm, total, cfg["min_lr_ratio"])
        return torch.optim.lr_scheduler.LambdaLR(opt, fn), "step"
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0), "epoch"
    raise SystemExit(f"--scheduler: unknown {name!r}")


def env_info(cfg: Mapping[str, Any], device: torch.device, ddp: Dist, per_rank_batch: int) -> dict:
    info = {
        "torch": torch.__version__,
        "dan_layers": dan_layers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "world_size": ddp.world,
        "batch_size": per_rank_batch * ddp.world,
        "batch_size_per_rank": per_rank_batch,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "deterministic": bool(cfg["deterministic"]),
        "cuda": torch.version.cuda,
    }
    return info


def make_loader(
    ds: Dataset,
    batch: int,
    sampler: Sampler | None,
    cfg: Mapping[str, Any],
    collate: Any,
    device: torch.device,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        num_workers=cfg["num_workers"],
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=False,
    )


def _args_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain Python values (str/int/float/bool/None)."""
    out = {}
    for k, v in cfg.items():
        out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
    return out


def _load_ckpt(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise dan_model.CheckpointError(
            f"cannot read checkpoint {str(path)!r} with torch.load(weights_only=True): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _is_our_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


CHECKPOINT_FORMAT = "dan-layers/train_dan/1"


def _load_model_state(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    dan_model.check_state_dict_keys(model.state_dict(), state, what)
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the script with ``argv`` (without the program name); return the metrics dict."""
    cfg, sources = resolve_config(argv)
    ddp = Dist()
    log = Logger(ddp.main)
    # process-wide torch settings this run changes; put back afterwards (in-process callers)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )
    try:
        return _run(cfg, sources, ddp, log)
    except KeyboardInterrupt:
        log(
            f"interrupted: {cfg['out']}/last.pt holds the last completed epoch; "
            f"continue with --resume --out {cfg['out']}"
        )
        raise
    finally:
        ddp.close()
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_num_threads(saved[2])


def _run(cfg: dict[str, Any], sources: dict[str, str], ddp: Dist, log: Logger) -> dict[str, Any]:
    t_start = time.perf_counter()
    out_dir = Path(cfg["out"])

    # ---- resume: the checkpoint's recipe wins over flags, except runtime options ----
    resume_ckpt = None
    resume_path: Path | None = None
    if cfg["resume"] and not cfg["eval_only"]:
        resume_path = out_dir / "last.pt" if cfg["resume"] == "auto" else Path(cfg["resume"])
        if resume_path.exists():
            resume_ckpt = _load_ckpt(resume_path)
            if not _is_our_checkpoint(resume_ckpt):
                raise SystemExit(
                    f"--resume {resume_path}: not a train_dan.py checkpoint "
                    "(use --backbone-weights or --eval-only --checkpoint for other files)"
                )
            saved = dict(resume_ckpt["args"])
            for k, v in saved.items():
                if k in RUNTIME_OPTIONS or k not in cfg:
                    continue
                if sources.get(k) == "flag" and cfg[k] != v:
                    log(f"warning: --{k.replace('_', '-')} {cfg[k]} ignored: resuming keeps {v}")
                cfg[k] = v
                sources[k] = "checkpoint"
        elif cfg["resume"] == "auto":
            log(f"--resume: no {resume_path} yet, starting a new run")
            resume_path = None
        else:
            raise SystemExit(f"--resume: {resume_path} does not exist")

    # ---- eval-only: a checkpoint of ours brings its model, loss and data settings ----
    eval_raw = None
    if cfg["eval_only"]:
        eval_raw = _load_ckpt(cfg["checkpoint"])
        if _is_our_checkpoint(eval_raw):
            saved = dict(eval_raw["args"])
            for k in _MODEL_KEYS:
                cfg[k], sources[k] = saved[k], "checkpoint"
            for k in _DATA_KEYS:
                if sources.get(k) != "flag" and k in saved:
                    cfg[k], sources[k] = saved[k], "checkpoint"

    # ---- process-wide settings ----
    if cfg["threads"] == "auto":
        n_threads, why = auto_threads()
        torch.set_num_threads(n_threads)
        log(f"threads: {n_threads} (auto: {why})")
    elif cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = pick_device(cfg["device"], ddp)
    ddp.init(device)
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
    seed_everything(cfg["seed"] + ddp.rank)
    amp_ctx, amp_dtype, use_scaler = amp_setup(cfg, device)

    # ---- data ----
    data = build_data(cfg, need_train=not cfg["eval_only"])
    data_mod = data["module"]
    class_names = data["class_names"]
    num_classes = cfg["num_classes"] or len(class_names)
    if not class_names:
        class_names = [str(i) for i in range(num_classes)]

    if ddp.world > 1 and cfg["batch_size"] % ddp.world:
        raise SystemExit(f"--batch-size {cfg['batch_size']}: expected a multiple of the world size {ddp.world}")
    per_rank = max(1, cfg["batch_size"] // ddp.world)

    # ---- eval-only ----
    if cfg["eval_only"]:
        return _eval_only(
            cfg, sources, ddp, log, device, data, num_classes, amp_ctx, per_rank, t_start, eval_raw
        )

    net = build_model(cfg, num_classes)
    backbone_report = None
    if cfg["backbone_weights"] and resume_ckpt is None:
        backbone_report = dan_model.load_backbone_weights(
            net.model, cfg["backbone_weights"], strict=cfg["backbone_strict"]
        )
        log(
            f"backbone weights {cfg['backbone_weights']}: dropped {backbone_report['dropped']}, "
            f"missing {backbone_report['missing']}, unexpected {backbone_report['unexpected']}"
        )
    net.to(device)
    if cfg["channels_last"]:
        net.to(memory_format=torch.channels_last)

    train_ds, val_ds, test_ds = data["train"], data["val"], data["test"]
    if cfg["balanced_sampler"]:  # one global draw per (seed, epoch), sharded over ranks
        train_sampler: Sampler[int] = data_mod.ClassBalancedSampler(
            dataset_labels(train_ds), seed=cfg["seed"], rank=ddp.rank, world_size=ddp.world
        )
    elif ddp.enabled:
        train_sampler = torch.utils.data.DistributedSampler(
            train_ds, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=cfg["seed"]
        )
    else:
        train_sampler = EpochShuffleSampler(len(train_ds), cfg["seed"])
    collate = data["collate"]
    n_rank = len(train_sampler)
    train_loader = make_loader(
        train_ds,
        per_rank,
        train_sampler,
        cfg,
        collate,
        device,
        drop_last=n_rank > per_rank and n_rank % per_rank == 1,  # no BatchNorm batch of one
    )

    def eval_loader(ds: Dataset) -> DataLoader:
        sampler = ShardSampler(len(ds), ddp.rank, ddp.world, pad=False) if ddp.enabled else None
        return make_loader(ds, per_rank, sampler, cfg, collate, device)

    val_loader = eval_loader(val_ds) if val_ds is not None else None
    test_loader = eval_loader(test_ds)
    steps_per_epoch = max(1, len(train_loader))

    optimizer = build_optimizer(cfg, net)
    scheduler, sched_interval = build_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    start_epoch, global_step = 0, 0
    best_metric, best_epoch = -math.inf, 0
    history: list[dict[str, Any]] = []
    best_state: dict[str, Tensor] | None = None
    if resume_ckpt is not None:
        _load_model_state(net, resume_ckpt["model"], f"checkpoint {resume_path}")
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch = int(resume_ckpt["epoch"])
        global_step = int(resume_ckpt["global_step"])
        best_metric = float(resume_ckpt["best_metric"])
        best_epoch = int(resume_ckpt["best_epoch"])
        history = list(resume_ckpt["history"])
        saved_epochs = resume_ckpt["args"].get("epochs")
        if sched_interval == "step" and saved_epochs != cfg["epochs"]:
            log(
                f"warning: --epochs {cfg['epochs']} differs from the checkpoint's {saved_epochs}; "
                "the per-step schedule keeps the length it was built with"
            )
        if int(resume_ckpt.get("world_size", 1)) != ddp.world:
            log(
                f"warning: checkpoint was written with world size {resume_ckpt.get('world_size')}, "
                f"now {ddp.world}: the data order (and so the result) will differ"
            )
        best_path = resume_path.parent / "best.pt"
        if best_epoch > 0 and best_path.exists():
            best_ckpt = _load_ckpt(best_path)
            if int(best_ckpt.get("epoch", -1)) == best_epoch:
                best_state = {k: v.clone() for k, v in best_ckpt["model"].items()}
        if best_epoch > 0 and best_state is None:
            log(f"warning: best.pt for epoch {best_epoch} not found next to {resume_path}")
        log(f"resumed from {resume_path} at epoch {start_epoch} (step {global_step})")

    wrapped: nn.Module = net
    if ddp.enabled:
        wrapped = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )

    # ---- log the run ----
    env = env_info(cfg, device, ddp, per_rank)
    log(f"DAN training: preset {cfg['preset']}, data {cfg['data']}, {num_classes} classes {class_names}")
    log(
        f"  samples: train {len(train_ds)}, val {len(val_ds) if val_ds is not None else 0} "
        f"(held out from train, for model selection), test {len(test_ds)}"
    )
    log("  config (value [source]):")
    for k in sorted(cfg):
        log(f"    {k} = {cfg[k]!r} [{sources.get(k, 'derived')}]")
    log(
        f"  env: torch {env['torch']}, device {device}, world {ddp.world}, batch {env['batch_size']}"
        f" ({per_rank}/rank), threads {env['threads']}, amp {amp_dtype}, scheduler per {sched_interval}"
    )

    # restore RNG last, after everything that consumes random numbers was built
    if resume_ckpt is not None:
        states = resume_ckpt["rng"]
        if len(states) == ddp.world:
            set_rng_state(states[ddp.rank])
        else:
            log("warning: RNG states saved for another world size; reseeding")

    out_dir_ok = ddp.main
    if out_dir_ok:
        out_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint(epoch: int) -> dict[str, Any] | None:
        rng = ddp.gather(rng_state())  # collective: every rank takes part
        if not ddp.main:
            return None
        return {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "loss_centers": (net.affinity.centers.detach().cpu() if net.affinity is not None else None),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "global_step": global_step,
            "best_metric": best_metric,
            "best_epoch": best_epoch,
            "select_metric": cfg["select_metric"],
            "history": history,
            "args": _args_dict(cfg),
            "class_names": list(class_names),
            "num_classes": num_classes,
            "world_size": ddp.world,
            "rng": rng,
        }

    from tqdm import tqdm

    show_bar = bool(cfg["progress"]) and ddp.main and sys.stderr.isatty()
    train_seconds = sum(float(h.get("seconds", 0.0)) for h in history)
    skipped_batches = 0
    stopped_early = False

    # ---- training ----
    for epoch in range(start_epoch + 1, cfg["epochs"] + 1):
        t_epoch = time.perf_counter()
        if hasattr(train_sampler, "set_epoch"):
            train_sampler.set_epoch(epoch)
        net.train()
        lr_used = optimizer.param_groups[0]["lr"]  # at the start of the epoch
        cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        bar = tqdm(
            train_loader,
            desc=f"epoch {epoch}/{cfg['epochs']}",
            disable=not show_bar,
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            ok = batch is not None and batch[1].shape[0] >= 2
            if not ddp.all_true(ok, device):
                skipped_batches += 1
                continue
            x, y = batch
            x = x.to(device, non_blocking=True)
            if cfg["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with amp_ctx():
                out = wrapped(x, y)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss at epoch {epoch}, step {global_step}: "
                    f"ce {float(out['ce'])}, affinity {float(out['affinity'])}, "
                    f"partition {float(out['partition'])} (try a lower --lr)"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if sched_interval == "step":
                scheduler.step()
            global_step += 1
            _update(cm, sums, out, y)
            if show_bar:
                bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.close()
        # DDP syncs gradients, not BatchNorm statistics: give every rank rank 0's, so that
        # all ranks evaluate (and rank 0 saves) one and the same model.
        ddp.broadcast_buffers_(net)
        if sched_interval == "epoch":
            scheduler.step()
        ddp.all_reduce_(cm)
        ddp.all_reduce_(sums)
        train_m = summarise(cm, sums, int(cm.sum()), data_mod)
        epoch_seconds = time.perf_counter() - t_epoch
        train_seconds += epoch_seconds
        val_m = (
            evaluate(net, val_loader, device, ddp, amp_ctx, data_mod, cfg["channels_last"])
            if val_loader is not None
            else None
        )
        score = val_m[cfg["select_metric"]] if val_m is not None else float(epoch)
        improved = score > best_metric
        if improved:
            best_metric, best_epoch = score, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        record = {
            "epoch": epoch,
            "global_step": global_step,
            "lr": lr_used,
            "seconds": epoch_seconds,
            "train": _strip_cm(train_m),
            "val": _strip_cm(val_m) if val_m is not None else None,
            "best": improved,
        }
        history.append(record)
        msg = (
            f"[epoch {epoch}/{cfg['epochs']}] train loss {train_m['loss']:.4f} "
            f"(ce {train_m['ce']:.4f} af {train_m['affinity']:.4f} pt {train_m['partition']:.4f}) "
            f"acc {train_m['accuracy']:.4f} bacc {train_m['balanced_accuracy']:.4f}"
        )
        if val_m is not None:
            msg += (
                f" | val loss {val_m['loss']:.4f} acc {val_m['accuracy']:.4f} "
                f"bacc {val_m['balanced_accuracy']:.4f}"
            )
        msg += f" | lr {lr_used:.2e} | {epoch_seconds:.1f}s" + (" *" if improved else "")
        log(msg)
        ckpt = checkpoint(epoch)
        if ddp.main:
            # best.pt (on improvement) is the same file as last.pt, linked in first: a crash
            # in between leaves last.pt one epoch behind, and resuming redoes that epoch.
            save_checkpoint(ckpt, out_dir / "last.pt", also=[out_dir / "best.pt"] if improved else [])
            write_json(
                {"config": _args_dict(cfg), "epochs": history, "complete": False},
                out_dir / "metrics.json",
            )
        del ckpt
        if cfg["stop_after_epoch"] is not None and epoch >= cfg["stop_after_epoch"] and epoch < cfg["epochs"]:
            stopped_early = True
            log(f"stopping after epoch {epoch} (--stop-after-epoch); continue with --resume")
            break

    last_epoch = history[-1]["epoch"] if history else 0
    if skipped_batches:
        log(f"skipped {skipped_batches} batches with fewer than 2 readable images")
    if stopped_early:  # no test evaluation for a run that is to be continued
        partial = {
            "complete": False,
            "config": _args_dict(cfg),
            "config_sources": sources,
            "class_names": list(class_names),
            "env": env,
            "epochs": history,
            "best_epoch": best_epoch,
            "train_seconds": train_seconds,
            "skipped_batches": skipped_batches,
        }
        if ddp.main:
            write_json(partial, out_dir / "metrics.json")
        ddp.barrier()
        return partial

    # ---- final evaluation on the test split ----
    t_eval = time.perf_counter()
    last_test = evaluate(net, test_loader, device, ddp, amp_ctx, data_mod, cfg["channels_last"])
    last_test["epoch"] = last_epoch
    if best_state is not None and best_epoch != last_epoch:
        last_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict(best_state)
        final = evaluate(net, test_loader, device, ddp, amp_ctx, data_mod, cfg["channels_last"])
        final["epoch"] = best_epoch
    else:
        last_state = None
        final = dict(last_test)
        final["epoch"] = last_epoch if best_state is None else best_epoch
    final["selected_by"] = (
        f"best validation {cfg['select_metric']}"
        if val_loader is not None
        else "last epoch (no validation split)"
    )
    eval_seconds = time.perf_counter() - t_eval

    consistency = {
        "centers_sha256": ddp.gather(tensor_sha256(net.affinity.centers) if net.affinity is not None else None),
        "model_sha256": ddp.gather(state_sha256(net.model.state_dict())),
    }

    metrics: dict[str, Any] = {
        "complete": not stopped_early,
        "config": _args_dict(cfg),
        "config_sources": sources,
        "class_names": list(class_names),
        "num_classes": num_classes,
        "env": env,
        "tricks": _tricks(cfg, sched_interval, amp_dtype),
        "epochs": history,
        "best_epoch": best_epoch,
        "best_val": {"metric": cfg["select_metric"], "value": best_metric if best_epoch else None},
        "final": final,
        "last": last_test,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "skipped_batches": skipped_batches,
        "backbone_weights_report": backbone_report,
        "ddp": {"world_size": ddp.world, **consistency},
        "files": {},
    }
    if ddp.main:
        metrics["files"] = _write_outputs(metrics, out_dir, cfg, net.model, test_ds, class_names, device, log)
        metrics["total_seconds"] = time.perf_counter() - t_start
        write_json(metrics, out_dir / "metrics.json")
    if last_state is not None:
        net.load_state_dict(last_state)
    log("")
    log(f"==== DAN, preset {cfg['preset']}, data {cfg['data']}: summary ====")
    log(
        f"test accuracy {final['accuracy']:.4f}, balanced accuracy "
        f"{final['balanced_accuracy']:.4f} ({final['samples']} test images; model of epoch "
        f"{final['epoch']}/{last_epoch}, chosen by {final['selected_by']})"
    )
    log(f"last epoch: test accuracy {last_test['accuracy']:.4f}, balanced {last_test['balanced_accuracy']:.4f}")
    log(
        f"time: train {train_seconds:.1f}s, final evaluation {eval_seconds:.1f}s, "
        f"total {metrics['total_seconds']:.1f}s (device {device}, {env['threads']} threads, "
        f"world size {ddp.world})"
    )
    if metrics["files"]:
        log("wrote: " + ", ".join(metrics["files"].values()))
    ddp.barrier()
    return metrics


def _tricks(cfg: Mapping[str, Any], sched_interval: str, amp_dtype: torch.dtype | None) -> list[str]:
    """Every recipe choice that changes results, in words (logged and saved)."""
    t = [
        f"optimizer {cfg['optimizer']} lr {cfg['lr']} momentum {cfg['momentum']} "
        f"weight decay {cfg['weight_decay']} (centres: {cfg['center_weight_decay']})",
        f"scheduler {cfg['scheduler']} stepped per {sched_interval}"
        + (f" (step {cfg['step_size']}, gamma {cfg['gamma']})" if cfg["scheduler"] == "step" else "")
        + (f" (gamma {cfg['gamma']})" if cfg["scheduler"] == "exponential" else "")
        + (
            f" (warmup {cfg['warmup_epochs']} epochs, floor {cfg['min_lr_ratio']})"
            if cfg["scheduler"] == "cosine"
            else ""
        ),
        f"augmentation preset {cfg['augment']!r}, image size {cfg['image_size']}",
        f"class-balanced sampler {'on' if cfg['balanced_sampler'] else 'off'}",
        f"feature loss {cfg['affinity']} x {cfg['lambda_af']}"
        + (f", {cfg['num_centers']} centres" if cfg["num_centers"] else ""),
        f"partition loss {cfg['partition']} x {cfg['lambda_pt']}",
        f"{cfg['num_heads']} attention heads",
        f"label smoothing {cfg['label_smoothing']}",
        f"model selection on validation {cfg['select_metric']} (val fraction {cfg['val_fraction']})",
        f"backbone weights {cfg['backbone_weights'] or 'none (from scratch)'}",
        f"amp {amp_dtype if amp_dtype is not None else 'off'}, seed {cfg['seed']}, "
        f"deterministic {cfg['deterministic']}",
    ]
    return t


def _write_outputs(
    metrics: dict[str, Any],
    out_dir: Path,
    cfg: Mapping[str, Any],
    model: dan_model.DAN,
    test_ds: Dataset,
    class_names: Sequence[str],
    device: torch.device,
    log: Logger,
) -> dict[str, str]:
    files = {"metrics": str(out_dir / "metrics.json")}
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg["plots"]:
        final = metrics["final"]
        cm_path = out_dir / "confusion_matrix.png"
        plot_confusion(
            final["confusion_matrix"],
            class_names,
            cm_path,
            f"test{'' if final.get('epoch') is None else ', epoch ' + str(final['epoch'])}: "
            f"acc {final['accuracy']:.3f}, "
            f"balanced {final['balanced_accuracy']:.3f}",
        )
        files["confusion_matrix"] = str(cm_path)
        att_path = out_dir / "attention_maps.png"
        try:
            plot_attention(model, test_ds, class_names, att_path, device, rows=cfg["viz_faces"])
            files["attention_maps"] = str(att_path)
        except Exception as exc:  # a figure must never cost the run's results
            log(f"warning: attention figure failed: {type(exc).__name__}: {exc}")
    for name in ("last.pt", "best.pt"):
        if (out_dir / name).exists():
            files[name.split(".")[0]] = str(out_dir / name)
    return files


def _eval_only(
    cfg: dict[str, Any],
    sources: dict[str, str],
    ddp: Dist,
    log: Logger,
    device: torch.device,
    data: dict[str, Any],
    num_classes: int,
    amp_ctx: Any,
    per_rank: int,
    t_start: float,
    raw: Mapping[str, Any],
) -> dict[str, Any]:
    """Evaluate a checkpoint (ours or the authors') on the test split."""
    path = Path(cfg["checkpoint"])
    if _is_our_checkpoint(raw):
        saved = raw["args"]
        heads = int(saved["num_heads"])
        ckpt_classes = int(raw["num_classes"])
        kind = "train_dan.py"
    else:
        info = dan_model.infer_official_config(raw)
        heads, ckpt_classes = info["num_heads"], info["num_classes"]
        kind = "authors' (yaoing/DAN layout)"
    if ckpt_classes != num_classes:
        raise SystemExit(
            f"--checkpoint {path}: the model has {ckpt_classes} classes, the {cfg['data']} "
            f"test set {num_classes} (set --num-classes)"
        )
    cfg = dict(cfg)
    cfg["num_heads"] = heads
    if not _is_our_checkpoint(raw):
        cfg["affinity"] = "none"  # their files hold no centres: no affinity loss to report
        sources["affinity"] = "authors' checkpoint has no centres"
    net = build_model(cfg, num_classes)
    if _is_our_checkpoint(raw):
        _load_model_state(net, raw["model"], f"checkpoint {path}")
    else:
        dan_model.load_official_checkpoint(net.model, raw)
    net.to(device)
    data_mod = data["module"]
    test_ds = data["test"]
    sampler = ShardSampler(len(test_ds), ddp.rank, ddp.world, pad=False) if ddp.enabled else None
    loader = make_loader(test_ds, per_rank, sampler, cfg, data["collate"], device)
    log(
        f"evaluating {kind} checkpoint {path} ({heads} heads, {num_classes} classes) on "
        f"{cfg['data']} test ({len(test_ds)} images)"
    )
    t0 = time.perf_counter()
    m = evaluate(net, loader, device, ddp, amp_ctx, data_mod, cfg["channels_last"])
    m["checkpoint"] = str(path)
    m["checkpoint_kind"] = kind
    epoch = raw.get("epoch", raw.get("iter")) if isinstance(raw, Mapping) else None
    m["epoch"] = int(epoch) if isinstance(epoch, (int, float)) else None
    class_names = data["class_names"] or [str(i) for i in range(num_classes)]
    metrics: dict[str, Any] = {
        "complete": True,
        "eval_only": True,
        "config": _args_dict(cfg),
        "config_sources": sources,
        "class_names": list(class_names),
        "num_classes": num_classes,
        "env": env_info(cfg, device, ddp, per_rank),
        "final": m,
        "eval_seconds": time.perf_counter() - t0,
        "total_seconds": time.perf_counter() - t_start,
        "files": {},
    }
    out_dir = Path(cfg["out"])
    if ddp.main:
        metrics["files"] = _write_outputs(metrics, out_dir, cfg, net.model, test_ds, class_names, device, log)
        write_json(metrics, out_dir / "metrics.json")
    log(
        f"test accuracy {m['accuracy']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}, "
        f"loss {m['loss']:.4f} ({m['samples']} images); written to {out_dir}/metrics.json"
    )
    cm = torch.tensor(m["confusion_matrix"])
    log("confusion matrix (rows true, columns predicted):")
    for name, row in zip(class_names, cm.tolist(), strict=False):
        log(f"  {name:>12s} " + " ".join(f"{v:5d}" for v in row))
    ddp.barrier()
    return metrics


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except dan_model.CheckpointError as exc:
        sys.exit(f"error: {exc}")
