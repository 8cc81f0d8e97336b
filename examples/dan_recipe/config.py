"""Presets, the command line and the resolved configuration of a run.

A run's configuration is one flat dict (keys are the flags' names with
underscores). :func:`resolve_config` builds it from three layers, each overriding
the one before: :data:`DEFAULTS`, the preset (:data:`PRESETS`; by ``--data`` when
``--preset`` is not given, see :data:`PRESET_FOR_DATA`) and the flags; it also
returns where every value came from. :func:`presets_markdown_table` renders the
presets for the documentation (a test keeps ``docs/guides/reproduce.md`` equal to
it).

Importing this module needs neither torch nor any other dependency.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .utils import CommandParser, InputError, UsageError

__all__ = [
    "DATA_KEYS",
    "DEFAULTS",
    "MODEL_KEYS",
    "PRESETS",
    "PRESET_FOR_DATA",
    "RESUME_KEEPS_UNLESS_FLAGGED",
    "RUNTIME_OPTIONS",
    "TABLE_KEYS",
    "as_plain_values",
    "build_parser",
    "preset_values",
    "presets_markdown_table",
    "resolve_config",
]

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
    "partition_normalize": False,
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
#: scratch on 2 CPU cores in ~2 minutes: 2,250 training faces at 48 px (+250
#: validation), 4 epochs, batch 32, AdamW 3e-3 with cosine decay. One thread, two
#: such runs side by side: 94.7-96.6 % test accuracy (seeds 0-2) in ~225 s each; the
#: 6-epoch, lr 1.5e-3 preset before it took 1.5x the steps for the same accuracy.
#: The step's time is almost all convolution arithmetic at this size (40 px costs as
#: much as 48 px: the last stages' maps are the same 3 x 3 and 2 x 2), so the budget
#: is the number of images trained on. Batch 32 learns markedly faster than 64 for
#: the same compute; bf16 autocast was no faster with 2 threads and once diverged, so
#: the demo stays in float32.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "data": "synthetic",
        "synthetic_train": 2500,
        "synthetic_test": 700,
        "val_fraction": 0.1,
        "augment": "demo",
        "image_size": 48,
        "epochs": 4,
        "batch_size": 32,
        "optimizer": "adamw",
        "lr": 3e-3,
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
    "folder": {
        "data": "imagefolder",
        "augment": "demo",
        "image_size": 112,
        "epochs": 30,
        "batch_size": 32,
        "optimizer": "adamw",
        "lr": 3e-3,
        "weight_decay": 0.05,
        "scheduler": "cosine",
        "warmup_epochs": 1.0,
        "partition": "paper",
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

#: Preset used when --preset is not given, by --data. Class folders get ``folder``: the
#: authors' RAF-DB recipe (SGD lr 0.1, batch 256) fine-tunes an MS-Celeb backbone and
#: diverges from scratch on a small folder (measured: val loss 797, chance accuracy), so
#: it is the default there only with --backbone-weights.
PRESET_FOR_DATA = {
    "synthetic": "demo",
    "rafdb": "rafdb",
    "affectnet": "affectnet",
    "imagefolder": "folder",
}
#: Where --data-root points, how to tell the kind of data (see :func:`infer_data`).
LAYOUT_HINT = (
    "RAF-DB's EmoLabel/list_patition_label.txt, AffectNet's train/<0..7>/, or class folders "
    "train/<class>/<images>"
)

#: Settings an --eval-only run takes from one of our checkpoints (the model must fit it).
MODEL_KEYS = (
    "num_heads",
    "affinity",
    "partition",
    "partition_normalize",
    "num_centers",
    "lambda_af",
    "lambda_pt",
    "label_smoothing",
)
#: ... and these unless given as flags (which test set, read how).
DATA_KEYS = ("data", "data_root", "image_size", "num_classes", "synthetic_test", "seed")

#: Options a resumed run may change (they do not alter the computation, or extend it).
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
    "overwrite",
}
#: ... of which these, unless given as flags, keep the checkpoint's value.
RESUME_KEEPS_UNLESS_FLAGGED = ("epochs", "data_root")


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
    """The command line of ``train_dan.py``; every option defaults to ``None`` (unset)."""
    p = CommandParser(
        prog="train_dan.py",
        description="Train / evaluate DAN (dan-layers reference model). Unset options take "
        "the preset's value, else the default listed below.",
        epilog=_presets_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None,
    )
    _add_recipe_flags(p.add_argument_group("recipe"))
    _add_data_flags(p.add_argument_group("data"))
    _add_model_flags(p.add_argument_group("model and losses"))
    _add_run_flags(p.add_argument_group("run"))
    return p


def _add_recipe_flags(g: argparse._ArgumentGroup) -> None:
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


def _add_data_flags(g: argparse._ArgumentGroup) -> None:
    bo = argparse.BooleanOptionalAction
    g.add_argument(
        "--data",
        choices=["synthetic", "rafdb", "affectnet", "imagefolder"],
        help="kind of data; default: read from --data-root's layout, synthetic without --data-root",
    )
    g.add_argument(
        "--data-root",
        help="dataset directory: RAF-DB, AffectNet, or class folders train/<class>/ (val/, test/ if present)",
    )
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
        help="augmentation preset of dan_recipe.transforms (default: the preset's name)",
    )
    g.add_argument("--balanced-sampler", action=bo, help="class-balanced sampling")
    g.add_argument("--num-workers", type=int)


def _add_model_flags(g: argparse._ArgumentGroup) -> None:
    bo = argparse.BooleanOptionalAction
    g.add_argument("--num-heads", type=int)
    g.add_argument("--affinity", choices=["affinity", "center", "none"])
    g.add_argument("--partition", choices=["paper", "official", "none"])
    g.add_argument(
        "--partition-normalize",
        action=bo,
        help="scale-invariant partition loss: each head at unit RMS first (ours, not the paper's)",
    )
    g.add_argument("--lambda-af", type=float)
    g.add_argument("--lambda-pt", type=float)
    g.add_argument("--num-centers", type=int, help="centres (authors: 8 on RAF-DB)")
    g.add_argument("--backbone-weights", help="torchvision-format ResNet-18 file (MS-Celeb)")
    g.add_argument("--backbone-strict", action=bo, help="error on any key mismatch")
    g.add_argument("--channels-last", action=bo)


def _add_run_flags(g: argparse._ArgumentGroup) -> None:
    bo = argparse.BooleanOptionalAction
    g.add_argument("--out", help="output directory (default: runs/<preset>)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="continue from a checkpoint (default: <out>/last.pt if it exists)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace the run already in --out (without it, an --out that holds one is refused)",
    )
    g.add_argument("--eval-only", action="store_true", default=None)
    g.add_argument(
        "--checkpoint", help="checkpoint for --eval-only (ours or the authors'); default: --out's best.pt"
    )
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


def resolve_config(argv: Sequence[str] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse ``argv`` and merge defaults < preset < flags.

    Args:
        argv: Arguments without the program name; ``None`` for ``sys.argv[1:]``.

    Returns:
        ``(config, sources)``: the values, and for every key where it came from
        (``"default"``, ``"preset:<name>"``, ``"flag"``).

    Raises:
        UsageError: On values out of range or missing companions (``--data rafdb``
            without ``--data-root``, ``--eval-only`` with ``--resume``).
    """
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    given = {k: v for k, v in vars(args).items() if v is not None}
    data_source = "flag"
    if "data" not in given and "preset" not in given and given.get("data_root"):
        try:
            given["data"] = infer_data(given["data_root"])
            data_source = "read from --data-root's layout"
        except (InputError, UsageError):
            if not (given.get("resume") or given.get("eval_only")):  # they may take --data from a checkpoint
                raise
    preset, reason = _choose_preset(given)
    cfg: dict[str, Any] = dict(DEFAULTS)
    sources = dict.fromkeys(cfg, "default")
    for k, v in PRESETS[preset].items():
        cfg[k] = v
        sources[k] = f"preset:{preset}"
    for k, v in given.items():
        cfg[k] = v
        sources[k] = "flag"
    if "data" in given:
        sources["data"] = data_source
    cfg["preset"], cfg["preset_reason"] = preset, reason
    sources["preset"] = "flag" if "preset" in given else f"by --data {cfg['data']}"
    sources["preset_reason"] = "derived"
    for k in ("out", "resume", "eval_only", "checkpoint", "overwrite"):
        cfg.setdefault(k, None)
        sources.setdefault(k, "flag" if k in given else "default")
    if cfg["augment"] is None:
        cfg["augment"] = preset
    if cfg["out"] is None:
        cfg["out"] = str(Path("runs") / preset)
    cfg["eval_only"] = bool(cfg["eval_only"])
    cfg["overwrite"] = bool(cfg["overwrite"])
    _check_config(cfg)
    return cfg, sources


def infer_data(root: str) -> str:
    """The kind of data at ``--data-root`` (``rafdb``, ``affectnet`` or ``imagefolder``), read from its layout.

    Raises:
        InputError: ``root`` is missing or not a directory.
        UsageError: A layout that is none of :data:`LAYOUT_HINT`'s.
    """
    path = Path(root)
    if not path.is_dir():
        what = "a file" if path.exists() else "a path that does not exist"
        raise InputError(f"expected the dataset directory, got {what}", subject=f"--data-root {root}")
    if (path / "EmoLabel" / "list_patition_label.txt").is_file():
        return "rafdb"
    train = next((p for p in path.iterdir() if p.is_dir() and p.name.lower() == "train"), None)
    if train is not None:
        classes = [p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if classes and all(c.isdigit() and int(c) < 8 for c in classes):
            return "affectnet"
        if classes:
            return "imagefolder"
    raise UsageError(
        f"cannot tell the kind of data: expected {LAYOUT_HINT}; or add --data rafdb|affectnet|"
        "imagefolder (imagefolder also reads <class>/<images> without train/ as the test split of "
        "--eval-only)",
        subject=f"--data-root {root}",
    )


def _choose_preset(given: Mapping[str, Any]) -> tuple[str, str | None]:
    """The preset and, when it was not given, why it was chosen."""
    if "preset" in given:
        return given["preset"], None
    data = given.get("data", "synthetic")
    if data == "imagefolder" and given.get("backbone_weights"):
        return "rafdb", (
            "rafdb (the authors' SGD recipe) for class folders with --backbone-weights; "
            "--preset folder trains from scratch"
        )
    preset = PRESET_FOR_DATA[data]
    if preset == "folder":
        return preset, (
            "folder (AdamW with a cosine schedule, from scratch: no --backbone-weights); the authors' "
            "rafdb recipe fine-tunes a pretrained backbone and diverges from scratch"
        )
    return preset, f"{preset}, the recipe of --data {data}"


def _check_config(cfg: Mapping[str, Any]) -> None:
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in ("epochs", "batch_size", "lr", "num_heads", "synthetic_train", "synthetic_test", "num_classes"):
        if cfg[name] is not None and cfg[name] <= 0:
            raise UsageError(f"expected > 0, got {cfg[name]}", subject=flag(name))
    if cfg["image_size"] < 16:
        raise UsageError(f"expected >= 16 pixels, got {cfg['image_size']}", subject="--image-size")
    if not 0.0 <= cfg["val_fraction"] < 1.0:
        raise UsageError(f"expected in [0, 1), got {cfg['val_fraction']}", subject="--val-fraction")
    if cfg["data"] == "synthetic" and cfg["data_root"] and not (cfg["eval_only"] or cfg["resume"]):
        raise UsageError(
            "expected no --data-root with synthetic faces (they need no files); drop one of them",
            subject=f"--data-root {cfg['data_root']}",
        )
    if cfg["data"] != "synthetic" and not cfg["data_root"]:
        raise UsageError("expected --data-root DIR (the dataset's directory)", subject=f"--data {cfg['data']}")
    if cfg["eval_only"] and cfg["resume"]:
        raise UsageError(
            "expected no --resume with --eval-only (it evaluates --checkpoint)", subject="--resume"
        )


def as_plain_values(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration as plain values (str/int/float/bool/None), for JSON and checkpoints."""
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in cfg.items()}


# --------------------------------------------------------------------------------------
# The presets as a table (for the docs)
# --------------------------------------------------------------------------------------

#: Rows of :func:`presets_markdown_table`: the settings that make up a recipe.
TABLE_KEYS: tuple[str, ...] = (
    "data",
    "synthetic_train",
    "synthetic_test",
    "val_fraction",
    "image_size",
    "augment",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "center_weight_decay",
    "scheduler",
    "step_size",
    "gamma",
    "warmup_epochs",
    "min_lr_ratio",
    "balanced_sampler",
    "num_heads",
    "affinity",
    "num_centers",
    "partition",
    "lambda_af",
    "lambda_pt",
    "threads",
)


def preset_values(name: str) -> dict[str, Any]:
    """Every setting of preset ``name``: :data:`DEFAULTS` overlaid with the preset.

    Raises:
        ValueError: On an unknown preset.
    """
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    values = {**DEFAULTS, **PRESETS[name]}
    if values["augment"] is None:
        values["augment"] = name
    return values


def presets_markdown_table() -> str:
    """The presets as a Markdown table: one row per setting, one column per preset.

    A value the preset leaves at its default is shown as it is, and ``-`` marks a
    setting that does not apply (``step_size`` without the step scheduler, and so
    on). ``docs/guides/reproduce.md`` holds this table verbatim; print it with
    ``python -m dan_recipe.config`` from ``examples/``.
    """
    names = list(PRESETS)
    columns = {n: preset_values(n) for n in names}
    lines = ["| setting (flag) | " + " | ".join(f"`{n}`" for n in names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for key in TABLE_KEYS:
        cells = [_cell(key, columns[n]) for n in names]
        lines.append(f"| `--{key.replace('_', '-')}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(key: str, values: Mapping[str, Any]) -> str:
    unused = {
        "synthetic_train": values["data"] != "synthetic",
        "synthetic_test": values["data"] != "synthetic",
        "momentum": values["optimizer"] != "sgd",
        "step_size": values["scheduler"] != "step",
        "gamma": values["scheduler"] not in ("step", "exponential"),
        "warmup_epochs": values["scheduler"] != "cosine",
        "min_lr_ratio": values["scheduler"] != "cosine",
    }
    if unused.get(key, False):
        return "-"
    value = values[key]
    if key == "num_centers" and value is None:
        return "one per class"
    if key == "threads" and value is None:
        return "torch's default"
    return f"`{value}`"


if __name__ == "__main__":
    print(presets_markdown_table(), end="")
