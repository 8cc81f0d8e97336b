"""What do DAN's heads learn? An ablation over seeds on the built-in synthetic faces.

Three studies, every run trained from scratch by ``examples/train_dan.py`` on the
synthetic faces at 112 px (ResNet-18's feature map, and so every attention map,
has 4 x 4 cells), with everything but the schedule fixed in ``SETTINGS``:

* **grid**, 4 epochs, seeds 0-2: one factor at a time around DAN's defaults
  (4 heads, affinity loss, partition loss "paper"): partition none / paper (Eq. 6)
  / official (the authors' code) / normalize (ours: Eq. 6 on unit-RMS heads);
  heads 1, 2, 4, 8; feature loss affinity / center / none (9 configurations);
* **partition**: the rows none / paper / normalize (4 heads, affinity loss) with
  8 seeds (0-7) at the grid's 4 epochs, 3 seeds (0-2) at 7 and 5 seeds (0-4) at
  10 epochs, compared seed by seed (paired differences with a 95% t interval);
* **two heads**: K = 2 with partition none / normalize at 4 epochs, and none /
  paper / normalize at 10 epochs, 3 seeds (does the K = 2 failure persist?).

A run's seed fixes its faces, its initial weights and its batches, so two
configurations run with one seed differ only in the configuration.

Each finished run is cached in ``benchmarks/results/ablation.json`` (rewritten
after every run), so an interrupted plan resumes where it stopped; a cached run is
reused only if its settings equal today's. The JSON holds ``plan``, ``runs``
(config with ``epochs``, seed, final test metrics, the per-epoch training
partition loss, wall time and host), ``summary`` (per configuration: mean and
sample std over the seeds, failures = runs below 70% accuracy) and ``paired``
(per schedule and pair of partition settings: the seed-by-seed differences).

    python benchmarks/ablation.py                 # run (or finish) every planned run
    python benchmarks/ablation.py --dry-run       # list what is still to run
    python benchmarks/ablation.py --docs          # regenerate the JSON's summary, docs/ablation.md, plots
    python benchmarks/ablation.py --quick         # 2 tiny runs into a scratch folder (smoke test)
"""

from __future__ import annotations

import argparse
import datetime as _dt
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

#: What every run shares (flags of train_dan.py); the schedule is ``config["epochs"]``.
#: 1,200 faces x 4 epochs at 112 px is about 3 minutes of 2-thread training on an idle
#: 2-core machine, 10 epochs about 7 minutes.
SETTINGS: dict[str, Any] = {
    "preset": "demo",
    "image_size": 112,
    "synthetic_train": 1200,
    "synthetic_test": 400,
    "val_fraction": 0.0,
    "batch_size": 32,
    "threads": 2,
}
QUICK_SETTINGS: dict[str, Any] = {**SETTINGS, "image_size": 48, "synthetic_train": 64, "synthetic_test": 32,
                                  "batch_size": 16, "threads": 1}  # fmt: skip
GRID_EPOCHS, LONG_EPOCHS = 4, 10

DEFAULT = {"partition": "paper", "num_heads": 4, "affinity": "affinity", "epochs": GRID_EPOCHS}
#: The grid: one factor at a time around DAN's defaults, at GRID_EPOCHS.
FACTORS: dict[str, tuple[Any, ...]] = {
    "partition": ("none", "paper", "official", "normalize"),
    "num_heads": (1, 2, 4, 8),
    "affinity": ("affinity", "center", "none"),
}
GRID_SEEDS = (0, 1, 2)
#: The partition study: these rows (4 heads, affinity loss), seeds per schedule.
PARTITION_ROWS = ("none", "paper", "normalize")
#: MID_EPOCHS (3 seeds) shows where between the two schedules the differences close.
MID_EPOCHS = 7
PARTITION_SEEDS: dict[int, tuple[int, ...]] = {GRID_EPOCHS: tuple(range(8)), MID_EPOCHS: (0, 1, 2),
                                               LONG_EPOCHS: tuple(range(5))}  # fmt: skip
#: Paired comparisons (a, b) of the partition study: b - a, seed by seed.
PAIRS = (("paper", "normalize"), ("none", "paper"), ("none", "normalize"))
#: Two heads (affinity loss): partition settings per schedule (the 4-epoch "paper" row is the grid's).
TWO_HEADS: dict[int, tuple[str, ...]] = {GRID_EPOCHS: ("none", "normalize"),
                                         LONG_EPOCHS: ("none", "paper", "normalize")}  # fmt: skip
TWO_HEADS_SEEDS = (0, 1, 2)
#: A run that ends below this test accuracy counts as failed (chance is 1/7).
FAILED_BELOW = 0.70
METRICS = ("accuracy", "balanced_accuracy", "head_overlap", "partition", "head_norm")
SCHEMA = 2  # 1: epochs in "settings", two-head runs in "extra_runs"; 2: config["epochs"], one "runs" list


def grid() -> list[dict[str, Any]]:
    """The grid's configurations, DAN's default first, each once."""
    configs = [dict(DEFAULT)]
    for factor, values in FACTORS.items():
        for value in values:
            config = {**DEFAULT, factor: value}
            if config not in configs:
                configs.append(config)
    return configs


def plan() -> list[dict[str, Any]]:
    """Every planned configuration with its study and seeds, in the order they run (grid first)."""
    entries = [{"study": "grid", "config": c, "seeds": list(GRID_SEEDS)} for c in grid()]
    for epochs, seeds in PARTITION_SEEDS.items():
        for partition in PARTITION_ROWS:
            config = {**DEFAULT, "partition": partition, "epochs": epochs}
            entries.append({"study": "partition", "config": config, "seeds": list(seeds)})
    for epochs, partitions in TWO_HEADS.items():
        for partition in partitions:
            config = {**DEFAULT, "partition": partition, "num_heads": 2, "epochs": epochs}
            entries.append({"study": "two_heads", "config": config, "seeds": list(TWO_HEADS_SEEDS)})
    return entries


def configs() -> list[dict[str, Any]]:
    """The distinct planned configurations, in plan order."""
    out: list[dict[str, Any]] = []
    for entry in plan():
        if entry["config"] not in out:
            out.append(entry["config"])
    return out


def planned_runs() -> list[tuple[dict[str, Any], int]]:
    """Every planned (config, seed) once, in running order: by study, then schedule, then seed.

    Seed-major order inside a study makes the configurations of a seed finish together, so
    a stopped plan leaves complete pairs.
    """
    order = {"grid": 0, "partition": 1, "two_heads": 2}
    keyed: dict[str, tuple[tuple[int, int, int, int], dict[str, Any], int]] = {}
    for i, entry in enumerate(plan()):
        for seed in entry["seeds"]:
            name = run_name(entry["config"], seed)
            key = (order[entry["study"]], entry["config"]["epochs"], seed, i)
            if name not in keyed or key < keyed[name][0]:
                keyed[name] = (key, entry["config"], seed)
    return [(config, seed) for _, config, seed in sorted(keyed.values(), key=lambda t: t[0])]


def run_name(config: Mapping[str, Any], seed: int) -> str:
    return (f"partition-{config['partition']}_heads-{config['num_heads']}_{config['affinity']}"
            f"_epochs-{config['epochs']}_seed-{seed}")  # fmt: skip


def train_flags(config: Mapping[str, Any], seed: int, settings: Mapping[str, Any], out: Path) -> list[str]:
    """train_dan.py's command line for one run."""
    partition = config["partition"]
    flags = [
        "--data", "synthetic", "--preset", settings["preset"], "--image-size", str(settings["image_size"]),
        "--synthetic-train", str(settings["synthetic_train"]),
        "--synthetic-test", str(settings["synthetic_test"]),
        "--val-fraction", str(settings["val_fraction"]), "--epochs", str(config["epochs"]),
        "--batch-size", str(settings["batch_size"]), "--threads", str(settings["threads"]),
        "--num-heads", str(config["num_heads"]), "--affinity", config["affinity"],
        "--partition", "paper" if partition == "normalize" else partition,
        "--seed", str(seed), "--out", str(out), "--overwrite", "--no-progress", "--no-plots",
    ]  # fmt: skip
    if partition == "normalize":
        flags.append("--partition-normalize")
    return flags


def result_of(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What the ablation keeps of a run's metrics.json: the final test metrics and the epochs' losses."""
    final = metrics["final"]
    return {
        **{k: final.get(k) for k in METRICS},
        "ce": final["ce"],
        "affinity": final["affinity"],
        "train_partition_by_epoch": [e["train"]["partition"] for e in metrics["epochs"]],
        "train_seconds": metrics["train_seconds"],
        "selected_by": final.get("selected_by"),
    }


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name:")),
                "unknown")  # fmt: skip


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run_one(config: Mapping[str, Any], seed: int, settings: Mapping[str, Any], work: Path, *,
            keep: bool) -> dict[str, Any]:  # fmt: skip
    """Train one configuration with one seed; return its record (checkpoints removed unless ``keep``).

    ``host`` records the CPU and the 1/5/15-minute load average before and after: the
    machine is shared, so wall times are comparable only at similar load.
    """
    out = work / run_name(config, seed)
    cmd = [sys.executable, str(TRAIN), *train_flags(config, seed, settings, out)]
    load_before = _load()
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"{run_name(config, seed)} failed (status {done.returncode}):\n" + "\n".join(tail))
    wall = round(time.perf_counter() - started, 1)
    metrics = json.loads((out / "metrics.json").read_text())
    if not keep:
        for name in ("last.pt", "best.pt"):
            (out / name).unlink(missing_ok=True)
    host = {"cpu": _cpu_model(), "load_before": load_before, "load_after": _load(),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    return {"name": run_name(config, seed), "config": dict(config), "seed": seed, "wall_seconds": wall,
            **result_of(metrics), "host": host}  # fmt: skip


# --------------------------------------------------------------------------------------
# Statistics: summary, Student's t, paired differences
# --------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(
    runs: Iterable[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One row per configuration (in plan order): seeds, mean / std of every metric, failures."""
    out = []
    runs = list(runs)
    for config in configs() if rows is None else rows:
        mine = [r for r in runs if r["config"] == config]
        if not mine:
            continue
        row: dict[str, Any] = {"config": dict(config), "n_seeds": len(mine),
                               "seeds": sorted(r["seed"] for r in mine)}  # fmt: skip
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r[metric] for r in mine])
        row["failures"] = sum(r["accuracy"] < FAILED_BELOW for r in mine)
        row["failure_rate"] = row["failures"] / len(mine)
        row["wall_seconds_mean"] = statistics.fmean(r["wall_seconds"] for r in mine)
        out.append(row)
    return out


def t_central(t: float, df: int) -> float:
    r"""$P(|T| \le t)$ for Student's $T$ with ``df`` degrees of freedom (exact for integer ``df``).

    The finite series of Abramowitz & Stegun 26.7.3-4 in $\theta = \arctan(t / \sqrt{\nu})$:
    odd $\nu$: $\frac{2}{\pi}(\theta + \sin\theta \sum_j a_j \cos^{2j+1}\theta)$,
    $a_0 = 1$, $a_j = a_{j-1} \frac{2j}{2j+1}$, $j \le (\nu - 3)/2$;
    even $\nu$: $\sin\theta \sum_j b_j \cos^{2j}\theta$, $b_0 = 1$,
    $b_j = b_{j-1} \frac{2j-1}{2j}$, $j \le (\nu - 2)/2$.
    """
    if df < 1:
        raise ValueError(f"df: expected an integer >= 1, got {df!r}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    total, coef = 0.0, 1.0
    if df % 2:
        for j in range((df - 1) // 2):
            coef = coef * (2 * j) / (2 * j + 1) if j else 1.0
            total += coef * c ** (2 * j + 1)
        return 2.0 / math.pi * (theta + s * total)
    for j in range(df // 2):
        coef = coef * (2 * j - 1) / (2 * j) if j else 1.0
        total += coef * c ** (2 * j)
    return s * total


def t_quantile(level: float, df: int) -> float:
    r"""The $t$ with $P(|T| \le t) = $ ``level`` (0.95 gives the 97.5th percentile), by bisection."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a probability in (0, 1), got {level!r}")
    lo, hi = 0.0, math.pi / 2  # over theta, where t_central is increasing
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central(math.sqrt(df) * math.tan(mid), df) < level else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def paired(runs: Iterable[Mapping[str, Any]], a: Mapping[str, Any], b: Mapping[str, Any],
           metric: str = "accuracy") -> dict[str, Any] | None:  # fmt: skip
    """``metric`` of ``b`` minus that of ``a``, seed by seed, over the seeds both have.

    Returns the seeds, the differences, their mean, sample std, 95% t interval of the
    mean (None below 2 seeds) and how many seeds favour each side; None without a
    shared seed.
    """
    runs = list(runs)
    values_a = {r["seed"]: r[metric] for r in runs if r["config"] == a and r[metric] is not None}
    values_b = {r["seed"]: r[metric] for r in runs if r["config"] == b and r[metric] is not None}
    seeds = sorted(set(values_a) & set(values_b))
    if not seeds:
        return None
    diffs = [values_b[s] - values_a[s] for s in seeds]
    mean, std = _mean_std(diffs)
    assert mean is not None and std is not None
    n = len(diffs)
    half = t_quantile(0.95, n - 1) * std / math.sqrt(n) if n > 1 else None
    return {
        "a": dict(a), "b": dict(b), "metric": metric, "seeds": seeds, "differences": diffs,
        "mean": mean, "std": std, "ci95": None if half is None else [mean - half, mean + half],
        "b_higher": sum(d > 0 for d in diffs), "a_higher": sum(d < 0 for d in diffs),
        "equal": sum(d == 0 for d in diffs),
    }  # fmt: skip


def paired_all(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The partition study's paired differences: every schedule, pair and metric that has seeds."""
    out = []
    for epochs in PARTITION_SEEDS:
        for metric in ("accuracy", "head_overlap"):
            for a, b in PAIRS:
                row = {**DEFAULT, "epochs": epochs}
                result = paired(runs, {**row, "partition": a}, {**row, "partition": b}, metric)
                if result is not None:
                    out.append(result)
    return out


# --------------------------------------------------------------------------------------
# The cache: benchmarks/results/ablation.json
# --------------------------------------------------------------------------------------


def migrate(payload: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 -> 2: the schedule moves from ``settings`` into every run's config (and name), the
    two-head runs from ``extra_runs`` into ``runs``; each run gets ``host`` (schema 1 kept one CPU
    for the whole file, in ``env``). Schema 2 comes back as it is."""
    if payload.get("schema") == SCHEMA:
        return payload
    settings = dict(payload.get("settings", {}))
    epochs = settings.pop("epochs", GRID_EPOCHS)
    cpu = payload.get("env", {}).get("cpu", "unknown")
    runs = []
    for run in [*payload.get("runs", []), *payload.get("extra_runs", [])]:
        config = {**run["config"], "epochs": epochs}
        runs.append({**run, "name": run_name(config, run["seed"]), "config": config,
                     "host": run.get("host", {"cpu": cpu, "load_before": None, "load_after": None,
                                              "finished": None})})  # fmt: skip
    old = {"runs", "extra_runs", "summary", "extra_summary", "seeds", "grid"}
    return {**{k: v for k, v in payload.items() if k not in old}, "schema": SCHEMA, "settings": settings,
            "runs": runs}  # fmt: skip


def load_cache(path: Path, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The finished runs in ``path`` made with ``settings`` (an older schema is migrated)."""
    if not path.is_file():
        return []
    payload = migrate(json.loads(path.read_text()))
    if payload.get("settings") != dict(settings):
        print(f"{path}: made with other settings ({payload.get('settings')}); starting afresh")
        return []
    return list(payload.get("runs", []))


def build_payload(settings: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON: settings, plan, environment, every run, and what is derived from the runs."""
    sys.path.insert(0, str(HERE))
    import _common as C  # noqa: PLC0415 - torch is imported only once a run has finished

    position = {json.dumps(c, sort_keys=True): i for i, c in enumerate(configs())}
    return {
        "name": "ablation",
        "schema": SCHEMA,
        "question": "Do DAN's heads attend to different regions, thanks to the partition loss, "
                    "and are 4 heads best? (synthetic faces, 112 px, over seeds; partition settings "
                    "compared seed by seed at two schedules)",
        "command": "python benchmarks/ablation.py",
        "settings": dict(settings),
        "failed_below": FAILED_BELOW,
        "plan": plan(),
        "env": C.env_info(),
        "runs": sorted(runs, key=lambda r: (position.get(json.dumps(r["config"], sort_keys=True), 1 << 30),
                                            r["seed"])),  # fmt: skip
        "summary": summarise(runs),
        "paired": paired_all(runs),
    }


def write_cache(path: Path, settings: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``path`` atomically with ``runs`` and their summary."""
    payload = build_payload(settings, runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def save_run(path: Path, settings: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """Add ``record`` to the runs in ``path`` (read afresh, so edits made meanwhile are kept)."""
    runs = [r for r in load_cache(path, settings) if r["name"] != record["name"]]
    write_cache(path, settings, [*runs, dict(record)])


def remaining(cache: Path, settings: Mapping[str, Any]) -> list[tuple[dict[str, Any], int]]:
    """The planned (config, seed) pairs ``cache`` lacks, in running order."""
    done = {r["name"] for r in load_cache(cache, settings)}
    return [(c, s) for c, s in planned_runs() if run_name(c, s) not in done]


def run_plan(settings: Mapping[str, Any], cache: Path, work: Path) -> None:
    """Run what ``cache`` lacks of the plan, saving after each run."""
    todo = remaining(cache, settings)
    print(f"ablation: {len(planned_runs()) - len(todo)} planned runs cached in {cache}, {len(todo)} to go",
          flush=True)  # fmt: skip
    for i, (config, seed) in enumerate(todo, 1):
        keep = config == DEFAULT and seed == GRID_SEEDS[0]  # its checkpoint makes the docs' picture
        record = run_one(config, seed, settings, work, keep=keep)
        save_run(cache, settings, record)
        host = record["host"]
        print(f"[{i}/{len(todo)}] {record['name']}: acc {record['accuracy']:.4f} "
              f"overlap {record['head_overlap']} ({record['wall_seconds']:.0f} s, "
              f"load {host['load_before']} -> {host['load_after']})", flush=True)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=RESULTS / "ablation.json")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "ablation", help="the runs' folders")
    p.add_argument("--docs", action="store_true",
                   help="only rewrite the JSON's summary from its runs, the docs page and plots")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="list the planned runs the cache lacks")
    p.add_argument("--quick", action="store_true", help="2 tiny runs into a scratch folder (smoke test)")
    args = p.parse_args(argv)
    if args.docs:
        import ablation_docs  # noqa: PLC0415 - matplotlib only for the page

        write_cache(args.cache, SETTINGS, load_cache(args.cache, SETTINGS))
        ablation_docs.write_docs(args.cache, DOCS_PAGE, ASSETS)
        return 0
    if args.dry_run:
        todo = remaining(args.cache, SETTINGS)
        for config, seed in todo:
            print(run_name(config, seed))
        print(f"{len(todo)} of {len(planned_runs())} planned runs to go")
        return 0
    if args.quick:
        work = args.work / "quick"
        shutil.rmtree(work, ignore_errors=True)
        tiny = {**DEFAULT, "epochs": 1}
        for config in (tiny, {**tiny, "partition": "normalize", "num_heads": 1}):
            print(run_one(config, 0, QUICK_SETTINGS, work, keep=False))
        return 0
    run_plan(SETTINGS, args.cache, args.work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
