"""What do DAN's heads learn? An ablation grid over seeds on the built-in synthetic faces.

A grid around DAN's defaults (4 heads, affinity loss, partition loss "paper"),
one factor at a time:

* partition: none / paper (Eq. 6) / official (the authors' code) / normalize
  (ours: Eq. 6 on unit-RMS heads), at 4 heads with the affinity loss;
* heads: 1, 2, 4, 8, with the affinity loss and partition "paper";
* feature loss: affinity / center / none, at 4 heads with partition "paper".

That is 9 configurations, each trained from scratch with ``--seeds`` (3 by default)
by ``examples/train_dan.py`` on the synthetic faces at 112 px, where ResNet-18's
feature map, and so every attention map, has 4 x 4 cells. Everything else is
fixed in ``SETTINGS`` below (chosen so that the whole grid takes about 90 minutes
on this project's 2-core machine) and recorded in the JSON.

Each finished run is cached in ``benchmarks/results/ablation.json`` (written after
every run), so an interrupted grid resumes where it stopped; a cached run is reused
only if its settings equal today's. The JSON holds ``runs`` (config, seed, final
test metrics, the per-epoch training partition loss) and ``summary`` (per
configuration: mean and sample std over the seeds of accuracy, balanced accuracy,
``head_overlap``, the partition loss and the heads' feature norm).

    python benchmarks/ablation.py                 # run (or finish) the grid
    python benchmarks/ablation.py --extra         # the diagnostic runs outside the grid (EXTRA)
    python benchmarks/ablation.py --docs          # regenerate docs/ablation.md's tables and plots
    python benchmarks/ablation.py --quick         # 2 tiny runs into a scratch folder (smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOCS_PAGE = ROOT / "docs" / "ablation.md"
ASSETS = ROOT / "docs" / "assets"
TRAIN = ROOT / "examples" / "train_dan.py"

#: What every run shares (flags of train_dan.py). 1,200 faces x 4 epochs at 112 px is
#: about 3 minutes of 2-thread training per run, 27 runs about 90 minutes.
SETTINGS: dict[str, Any] = {
    "preset": "demo",
    "image_size": 112,
    "synthetic_train": 1200,
    "synthetic_test": 400,
    "val_fraction": 0.0,
    "epochs": 4,
    "batch_size": 32,
    "threads": 2,
}
QUICK_SETTINGS: dict[str, Any] = {**SETTINGS, "image_size": 48, "synthetic_train": 64, "synthetic_test": 32,
                                  "epochs": 1, "batch_size": 16, "threads": 1}  # fmt: skip

DEFAULT = {"partition": "paper", "num_heads": 4, "affinity": "affinity"}
#: The grid: one factor at a time around DAN's defaults.
FACTORS: dict[str, tuple[Any, ...]] = {
    "partition": ("none", "paper", "official", "normalize"),
    "num_heads": (1, 2, 4, 8),
    "affinity": ("affinity", "center", "none"),
}
#: Outside the grid: do two heads collapse because of the partition loss? (``--extra``)
EXTRA: tuple[dict[str, Any], ...] = (
    {"partition": "none", "num_heads": 2, "affinity": "affinity"},
    {"partition": "normalize", "num_heads": 2, "affinity": "affinity"},
)
METRICS = ("accuracy", "balanced_accuracy", "head_overlap", "partition", "head_norm")


def grid() -> list[dict[str, Any]]:
    """The configurations, DAN's default first, each once."""
    configs = [dict(DEFAULT)]
    for factor, values in FACTORS.items():
        for value in values:
            config = {**DEFAULT, factor: value}
            if config not in configs:
                configs.append(config)
    return configs


def run_name(config: Mapping[str, Any], seed: int) -> str:
    return f"partition-{config['partition']}_heads-{config['num_heads']}_{config['affinity']}_seed-{seed}"


def train_flags(config: Mapping[str, Any], seed: int, settings: Mapping[str, Any], out: Path) -> list[str]:
    """train_dan.py's command line for one run."""
    partition = config["partition"]
    flags = [
        "--data", "synthetic", "--preset", settings["preset"], "--image-size", str(settings["image_size"]),
        "--synthetic-train", str(settings["synthetic_train"]),
        "--synthetic-test", str(settings["synthetic_test"]),
        "--val-fraction", str(settings["val_fraction"]), "--epochs", str(settings["epochs"]),
        "--batch-size", str(settings["batch_size"]), "--threads", str(settings["threads"]),
        "--num-heads", str(config["num_heads"]), "--affinity", config["affinity"],
        "--partition", "paper" if partition == "normalize" else partition,
        "--seed", str(seed), "--out", str(out), "--overwrite", "--no-progress", "--no-plots",
    ]  # fmt: skip
    if partition == "normalize":
        flags.append("--partition-normalize")
    return flags


def result_of(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What the grid keeps of a run's metrics.json: the final test metrics and the epochs' losses."""
    final = metrics["final"]
    return {
        **{k: final.get(k) for k in METRICS},
        "ce": final["ce"],
        "affinity": final["affinity"],
        "train_partition_by_epoch": [e["train"]["partition"] for e in metrics["epochs"]],
        "train_seconds": metrics["train_seconds"],
        "selected_by": final.get("selected_by"),
    }


def run_one(config: Mapping[str, Any], seed: int, settings: Mapping[str, Any], work: Path, *,
            keep: bool) -> dict[str, Any]:  # fmt: skip
    """Train one configuration with one seed; return its record (checkpoints removed unless ``keep``)."""
    out = work / run_name(config, seed)
    cmd = [sys.executable, str(TRAIN), *train_flags(config, seed, settings, out)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"{run_name(config, seed)} failed (status {done.returncode}):\n" + "\n".join(tail))
    metrics = json.loads((out / "metrics.json").read_text())
    if not keep:
        for name in ("last.pt", "best.pt"):
            (out / name).unlink(missing_ok=True)
    return {"name": run_name(config, seed), "config": dict(config), "seed": seed,
            "wall_seconds": round(time.perf_counter() - started, 1), **result_of(metrics)}  # fmt: skip


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(
    runs: Iterable[Mapping[str, Any]], configs: Sequence[Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One row per configuration (in grid order): n_seeds and mean / std of every metric."""
    rows = []
    runs = list(runs)
    for config in grid() if configs is None else configs:
        mine = [r for r in runs if r["config"] == config]
        if not mine:
            continue
        row: dict[str, Any] = {"config": config, "n_seeds": len(mine), "seeds": sorted(r["seed"] for r in mine)}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r[metric] for r in mine])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# The cache: benchmarks/results/ablation.json
# --------------------------------------------------------------------------------------


def load_cache(path: Path, settings: Mapping[str, Any], key: str = "runs") -> list[dict[str, Any]]:
    """The finished runs (``key``: ``runs`` or ``extra_runs``) in ``path`` made with ``settings``."""
    if not path.is_file():
        return []
    payload = json.loads(path.read_text())
    if payload.get("settings") != dict(settings):
        print(f"{path}: made with other settings ({payload.get('settings')}); starting afresh")
        return []
    return list(payload.get(key, []))


def write_cache(
    path: Path,
    settings: Mapping[str, Any],
    runs: list[dict[str, Any]],
    seeds: Sequence[int],
    extra_runs: list[dict[str, Any]] | None = None,
) -> None:
    """Rewrite ``path`` atomically with the runs so far and their summary (and the extra runs)."""
    sys.path.insert(0, str(HERE))
    import _common as C  # noqa: PLC0415 - torch is imported only once a run has finished

    payload = {
        "name": "ablation",
        "question": "Do DAN's heads attend to different regions, thanks to the partition loss, "
                    "and are 4 heads best? (synthetic faces, 112 px, mean and std over seeds)",
        "command": "python benchmarks/ablation.py",
        "settings": dict(settings),
        "seeds": list(seeds),
        "grid": grid(),
        "env": C.env_info(),
        "runs": sorted(runs, key=lambda r: (grid().index(r["config"]), r["seed"])),
        "summary": summarise(runs),
    }
    if extra_runs:
        payload["extra_runs"] = sorted(extra_runs, key=lambda r: (list(EXTRA).index(r["config"]), r["seed"]))
        payload["extra_summary"] = summarise(extra_runs, EXTRA)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def run_grid(
    settings: Mapping[str, Any], seeds: Sequence[int], cache: Path, work: Path, *, extra: bool = False
) -> list[dict[str, Any]]:
    """Run what ``cache`` lacks of the grid (or, with ``extra``, of :data:`EXTRA`), saving after each run."""
    runs = load_cache(cache, settings)
    extra_runs = load_cache(cache, settings, "extra_runs")
    target = extra_runs if extra else runs
    done = {r["name"] for r in target}
    todo = [(c, s) for c in (EXTRA if extra else grid()) for s in seeds if run_name(c, s) not in done]
    print(f"ablation: {len(done)} runs cached in {cache}, {len(todo)} to go")
    for i, (config, seed) in enumerate(todo, 1):
        keep = config == DEFAULT and seed == seeds[0]  # its checkpoint makes the README's picture
        t0 = time.perf_counter()
        record = run_one(config, seed, settings, work, keep=keep)
        target.append(record)
        write_cache(cache, settings, runs, seeds, extra_runs)
        print(f"[{i}/{len(todo)}] {record['name']}: acc {record['accuracy']:.4f} "
              f"overlap {record['head_overlap']} ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    return runs


# --------------------------------------------------------------------------------------
# The docs page
# --------------------------------------------------------------------------------------

TABLE_START, TABLE_END = "<!-- ablation-tables:start -->", "<!-- ablation-tables:end -->"


def _fmt(mean: float | None, std: float | None, digits: int, percent: bool = False) -> str:
    if mean is None:
        return "n/a"
    scale = 100.0 if percent else 1.0
    return f"{mean * scale:.{digits}f} ± {(std or 0.0) * scale:.{digits}f}"


def _fmt_small(mean: float | None, std: float | None) -> str:
    """Three significant digits: the partition loss spans 1e-4 to 2."""
    return "n/a" if mean is None else f"{mean:.3g} ± {(std or 0.0):.2g}"


def _row(label: str, row: Mapping[str, Any]) -> str:
    return (
        f"| {label} | {row['n_seeds']} | "
        f"{_fmt(row['accuracy_mean'], row['accuracy_std'], 1, True)} | "
        f"{_fmt(row['balanced_accuracy_mean'], row['balanced_accuracy_std'], 1, True)} | "
        f"{_fmt(row['head_overlap_mean'], row['head_overlap_std'], 3)} | "
        f"{_fmt_small(row['partition_mean'], row['partition_std'])} | "
        f"{_fmt(row['head_norm_mean'], row['head_norm_std'], 0)} |"
    )


_HEADER = (
    "| {name} | seeds | accuracy % | balanced acc. % | head overlap | partition loss | head norm |\n"
    "|---|---:|---:|---:|---:|---:|---:|"
)


def markdown_tables(payload: Mapping[str, Any]) -> str:
    """The tables of docs/ablation.md: one per factor, DAN's default in every one."""
    rows = payload["summary"]
    out = []
    titles = {"partition": "Partition loss (4 heads, affinity loss)",
              "num_heads": "Number of heads (partition paper, affinity loss)",
              "affinity": "Feature loss (4 heads, partition paper)"}  # fmt: skip
    for factor, values in FACTORS.items():
        out += [f"**{titles[factor]}**\n", _HEADER.format(name=factor)]
        for value in values:
            config = {**DEFAULT, factor: value}
            row = next((r for r in rows if r["config"] == config), None)
            if row is not None:
                out.append(_row(f"`{value}`" + (" (DAN)" if config == DEFAULT else ""), row))
        out.append("")
    if payload.get("extra_summary"):
        out += ["**Outside the grid: two heads (affinity loss)**\n", _HEADER.format(name="partition")]
        out += [_row(f"`{r['config']['partition']}`", r) for r in payload["extra_summary"]]
        out.append("")
    s = payload["settings"]
    out.append(
        f"{len(payload['runs'])} runs in the grid"
        + (f" and {len(payload['extra_runs'])} outside it" if payload.get("extra_runs") else "")
        + f", all with {s['synthetic_train']} training and {s['synthetic_test']} test faces at "
        f"{s['image_size']} px, {s['epochs']} epochs (preset `{s['preset']}`), seeds "
        f"{', '.join(map(str, payload['seeds']))}; mean ± sample std over the seeds of the test split "
        "after the last epoch. Head overlap: `dan_layers.functional.head_overlap` of the test maps "
        "(1 = identical, 0 = disjoint; n/a for one head). Partition loss: the run's own term on "
        "the test heads (0 where it is off). Head norm: mean L2 norm of a head's 512-vector before the "
        "log-softmax."
    )
    return "\n".join(out) + "\n"


def plot(payload: Mapping[str, Any], assets: Path) -> list[Path]:
    """Accuracy and head overlap against the number of heads, and per partition variant."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = payload["summary"]
    paths = []
    for factor, name in (("num_heads", "ablation_heads.png"), ("partition", "ablation_partition.png")):
        values = [v for v in FACTORS[factor] if any(r["config"] == {**DEFAULT, factor: v} for r in rows)]
        picked = [next(r for r in rows if r["config"] == {**DEFAULT, factor: v}) for v in values]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        xs = list(range(len(values)))
        for ax, metric, label in ((axes[0], "accuracy", "test accuracy (%)"),
                                  (axes[1], "head_overlap", "head overlap (1 = same map)")):  # fmt: skip
            means = [r[f"{metric}_mean"] for r in picked]
            stds = [r[f"{metric}_std"] or 0.0 for r in picked]
            scale = 100.0 if metric == "accuracy" else 1.0
            pts = [(x, m * scale, s * scale) for x, m, s in zip(xs, means, stds, strict=True) if m is not None]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-", capsize=4)
            for run in payload["runs"]:
                if run["config"] in [{**DEFAULT, factor: v} for v in values] and run[metric] is not None:
                    x = values.index(run["config"][factor])
                    ax.plot(x + 0.08, run[metric] * scale, ".", color="gray", alpha=0.6)
            ax.set_xticks(xs, [str(v) for v in values])
            ax.set_xlabel({"num_heads": "heads", "partition": "partition loss"}[factor])
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle(f"mean ± std over {len(payload['seeds'])} seeds (dots: single runs)", fontsize=9)
        fig.tight_layout()
        path = assets / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_docs(cache: Path, page: Path, assets: Path) -> None:
    """Put the tables from ``cache`` between the markers of ``page`` and redraw the plots."""
    payload = json.loads(cache.read_text())
    text = page.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    page.write_text(text[:start] + "\n" + markdown_tables(payload) + text[end:])
    for p in plot(payload, assets):
        print(f"wrote {p}")
    print(f"wrote {page}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cache", type=Path, default=RESULTS / "ablation.json")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "ablation", help="the runs' folders")
    p.add_argument("--docs", action="store_true", help="only regenerate docs/ablation.md from the cache")
    p.add_argument("--quick", action="store_true", help="2 tiny runs into a scratch folder (smoke test)")
    p.add_argument("--extra", action="store_true", help="the runs outside the grid (EXTRA), same settings")
    args = p.parse_args(argv)
    if args.docs:
        write_docs(args.cache, DOCS_PAGE, ASSETS)
        return 0
    if args.quick:
        work = args.work / "quick"
        shutil.rmtree(work, ignore_errors=True)
        for config, seed in ((DEFAULT, 0), ({**DEFAULT, "partition": "normalize", "num_heads": 1}, 0)):
            print(run_one(config, seed, QUICK_SETTINGS, work, keep=False))
        return 0
    run_grid(SETTINGS, args.seeds, args.cache, args.work, extra=args.extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
