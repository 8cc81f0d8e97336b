"""docs/ablation.md's tables and plots, generated from ``benchmarks/results/ablation.json``.

``python benchmarks/ablation.py --docs`` calls :func:`write_docs`: it replaces what lies
between the page's markers with :func:`markdown_tables` and redraws the PNGs in
``docs/assets``. A test keeps the page equal to the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ablation as A

TABLE_START, TABLE_END = "<!-- ablation-tables:start -->", "<!-- ablation-tables:end -->"
PLOTS = ("ablation_schedule.png", "ablation_paired.png", "ablation_partition.png", "ablation_heads.png")
COLORS = {"none": "tab:gray", "paper": "tab:blue", "official": "tab:purple", "normalize": "tab:orange"}


def _fmt(mean: float | None, std: float | None, digits: int, percent: bool = False) -> str:
    if mean is None:
        return "n/a"
    scale = 100.0 if percent else 1.0
    return f"{mean * scale:.{digits}f} ± {(std or 0.0) * scale:.{digits}f}"


def _fmt_small(mean: float | None, std: float | None) -> str:
    """Three significant digits: the partition loss spans 1e-4 to 2."""
    return "n/a" if mean is None else f"{mean:.3g} ± {(std or 0.0):.2g}"


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}"


_HEADER = (
    "| {name} | seeds | accuracy % | balanced acc. % | failed | head overlap | partition loss | head norm |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def _row(label: str, row: Mapping[str, Any]) -> str:
    return (
        f"| {label} | {row['n_seeds']} | "
        f"{_fmt(row['accuracy_mean'], row['accuracy_std'], 1, True)} | "
        f"{_fmt(row['balanced_accuracy_mean'], row['balanced_accuracy_std'], 1, True)} | "
        f"{row['failures']} of {row['n_seeds']} | "
        f"{_fmt(row['head_overlap_mean'], row['head_overlap_std'], 3)} | "
        f"{_fmt_small(row['partition_mean'], row['partition_std'])} | "
        f"{_fmt(row['head_norm_mean'], row['head_norm_std'], 0)} |"
    )


def _find(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return next((r for r in rows if r["config"] == config), None)


def _paired_by_key(payload: Mapping[str, Any]) -> dict[tuple[str, str, int, str], Mapping[str, Any]]:
    """The paired differences by (a's partition, b's partition, epochs, metric)."""
    return {(p["a"]["partition"], p["b"]["partition"], p["a"]["epochs"], p["metric"]): p
            for p in payload["paired"]}  # fmt: skip


def _paired_table(payload: Mapping[str, Any]) -> list[str]:
    out = [
        "| epochs | difference | seeds | accuracy, points | 95% interval | seeds first higher / lower "
        "| head overlap | 95% interval |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    found = _paired_by_key(payload)
    for epochs in A.PARTITION_SEEDS:
        for a, b in A.PAIRS:
            acc, ovl = found.get((a, b, epochs, "accuracy")), found.get((a, b, epochs, "head_overlap"))
            if acc is None:
                continue
            cells = [f"{epochs}", f"`{b}` − `{a}`", f"{len(acc['seeds'])}",
                     f"{_signed(100 * acc['mean'], 1)} ± {100 * acc['std']:.1f}",
                     "n/a" if acc["ci95"] is None else
                     f"[{_signed(100 * acc['ci95'][0], 1)}, {_signed(100 * acc['ci95'][1], 1)}]",
                     f"{acc['b_higher']} / {acc['a_higher']}"
                     + (f", {acc['equal']} tied" if acc["equal"] else "")]  # fmt: skip
            if ovl is not None:
                cells += [f"{_signed(ovl['mean'], 3)} ± {ovl['std']:.3f}",
                          "n/a" if ovl["ci95"] is None else
                          f"[{_signed(ovl['ci95'][0], 3)}, {_signed(ovl['ci95'][1], 3)}]"]  # fmt: skip
            else:
                cells += ["n/a", "n/a"]
            out.append("| " + " | ".join(cells) + " |")
    return out


def _span(seeds: Sequence[int]) -> str:
    consecutive = list(seeds) == list(range(seeds[0], seeds[-1] + 1))
    return f"{seeds[0]}-{seeds[-1]}" if consecutive else ", ".join(map(str, seeds))


def _hosts(runs: Sequence[Mapping[str, Any]]) -> str:
    """Per CPU: runs, total and median wall time per schedule."""
    parts = []
    for cpu in sorted({r["host"]["cpu"] for r in runs}):
        mine = [r for r in runs if r["host"]["cpu"] == cpu]
        per = []
        for epochs in sorted({r["config"]["epochs"] for r in mine}):
            walls = sorted(r["wall_seconds"] for r in mine if r["config"]["epochs"] == epochs)
            per.append(f"{len(walls)} of {epochs} epochs, median {walls[len(walls) // 2]:.0f} s")
        total = sum(r["wall_seconds"] for r in mine) / 3600
        parts.append(f"{cpu}: {len(mine)} runs, {total:.1f} h of wall time ({'; '.join(per)})")
    return "; ".join(parts)


def markdown_tables(payload: Mapping[str, Any]) -> str:
    """The tables of docs/ablation.md, all from the JSON."""
    rows, d = payload["summary"], A.DEFAULT
    out = ["**Partition loss (4 heads, affinity loss), by schedule**\n", _HEADER.format(name="partition")]
    for epochs in sorted({A.GRID_EPOCHS, *A.PARTITION_SEEDS}):
        for value in A.FACTORS["partition"]:
            row = _find(rows, {**d, "partition": value, "epochs": epochs})
            if row is not None:
                dan = " (DAN)" if value == d["partition"] else ""
                out.append(_row(f"`{value}`, {epochs} epochs{dan}", row))
    out += ["", "**Paired differences (same seed: same faces, same initial weights)**\n"]
    out += [*_paired_table(payload), ""]
    titles = {"num_heads": "Number of heads (partition paper, affinity loss, 4 epochs)",
              "affinity": "Feature loss (4 heads, partition paper, 4 epochs)"}  # fmt: skip
    for factor in ("num_heads", "affinity"):
        out += [f"**{titles[factor]}**\n", _HEADER.format(name=factor)]
        for value in A.FACTORS[factor]:
            config = {**d, factor: value}
            row = _find(rows, config)
            if row is not None:
                out.append(_row(f"`{value}`" + (" (DAN)" if config == d else ""), row))
        out.append("")
    out += ["**Two heads (affinity loss), by schedule**\n", _HEADER.format(name="partition")]
    for epochs in sorted({A.GRID_EPOCHS, *A.TWO_HEADS}):
        for value in ("none", "paper", "normalize"):
            row = _find(rows, {**d, "partition": value, "num_heads": 2, "epochs": epochs})
            if row is not None:
                out.append(_row(f"`{value}`, {epochs} epochs", row))
    s, runs = payload["settings"], payload["runs"]
    plan = payload["plan"]
    planned = len({A.run_name(e["config"], seed) for e in plan for seed in e["seeds"]})
    out += [
        "",
        f"{len(runs)} runs ({planned} planned), all with {s['synthetic_train']} training and "
        f"{s['synthetic_test']} test faces at {s['image_size']} px, preset `{s['preset']}`, batch "
        f"{s['batch_size']}, {s['threads']} threads, no validation split; mean ± sample std over the seeds "
        f"(grid: seeds {_span(A.GRID_SEEDS)}; partition rows: "
        + ", ".join(f"{_span(seeds)} at {e} epochs" for e, seeds in A.PARTITION_SEEDS.items())
        + f"; two heads: {_span(A.TWO_HEADS_SEEDS)}) of the test split after the last epoch. "
        f"Failed: runs below {100 * payload['failed_below']:.0f}% test accuracy (chance is 14%). "
        "Paired differences: the first setting minus the second, seed by seed, over the seeds both "
        "have; mean ± sample std, 95% Student-t interval of the mean, and how many seeds favour the "
        "first setting / the second. Head overlap: `dan_layers.functional.head_overlap` of the test "
        "maps (1 = identical, 0 = disjoint; n/a for one head). Partition loss: the run's own term on "
        "the test heads (0 where it is off). Head norm: mean L2 norm of a head's 512-vector before "
        "the log-softmax. "
        f"Hosts: {_hosts(runs)}.",
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _partition_runs(payload: Mapping[str, Any], partition: str, epochs: int) -> list[Mapping[str, Any]]:
    config = {**A.DEFAULT, "partition": partition, "epochs": epochs}
    return [r for r in payload["runs"] if r["config"] == config]


def plot_schedule(payload: Mapping[str, Any], path: Path) -> Path:
    """Accuracy and head overlap against the schedule, one line per partition setting."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    epochs = sorted(A.PARTITION_SEEDS)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, label in ((axes[0], "accuracy", "test accuracy (%)"),
                              (axes[1], "head_overlap", "head overlap (1 = same map)")):  # fmt: skip
        scale = 100.0 if metric == "accuracy" else 1.0
        for k, partition in enumerate(A.PARTITION_ROWS):
            shift = (k - 1) * 0.25
            pts = []
            for e in epochs:
                vals = [r[metric] * scale for r in _partition_runs(payload, partition, e)]
                if not vals:
                    continue
                ax.plot([e + shift + 0.08] * len(vals), vals, ".", color=COLORS[partition], alpha=0.35)
                mean, std = A._mean_std(vals)
                pts.append((e + shift, mean, std, len(vals)))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-",
                            capsize=4, color=COLORS[partition], label=f"{partition}")  # fmt: skip
        ax.set_xticks(epochs, [f"{e} epochs" for e in epochs])
        ax.set_xlim(epochs[0] - 1.5, epochs[-1] + 1.5)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(100 * A.FAILED_BELOW, color="red", lw=0.8, ls=":")
    axes[0].legend(title="partition loss", fontsize=8, title_fontsize=8, loc="lower right")
    seeds = ", ".join(f"{len(s)} seeds at {e} epochs" for e, s in A.PARTITION_SEEDS.items())
    fig.suptitle(f"4 heads, affinity loss: mean ± std ({seeds}; dots: single runs; red: {A.FAILED_BELOW:.0%})",
                 fontsize=9)  # fmt: skip
    return _save(fig, path)


def plot_paired(payload: Mapping[str, Any], path: Path) -> Path:
    """Every seed's difference between two partition settings, with the mean and its 95% interval."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    found = _paired_by_key(payload)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "accuracy", "accuracy difference (points)"),
                              (axes[1], "head_overlap", "head overlap difference")):  # fmt: skip
        scale = 100.0 if metric == "accuracy" else 1.0
        ticks, names = [], []
        x = 0.0
        for a, b in A.PAIRS:
            ax.text(x + (len(A.PARTITION_SEEDS) - 1) / 2, 0.98, f"{b} − {a}", ha="center", va="top", fontsize=8,
                    transform=ax.get_xaxis_transform())  # fmt: skip
            for epochs in sorted(A.PARTITION_SEEDS):
                p = found.get((a, b, epochs, metric))
                if p is not None:
                    diffs = [d * scale for d in p["differences"]]
                    ax.plot([x + 0.12] * len(diffs), diffs, ".", color=COLORS[b], alpha=0.6)
                    if p["ci95"] is not None:
                        mean, (lo, hi) = p["mean"] * scale, (c * scale for c in p["ci95"])
                        ax.errorbar([x], [mean], yerr=[[mean - lo], [hi - mean]], fmt="s", color="black",
                                    capsize=4)  # fmt: skip
                ticks.append(x)
                names.append(f"{epochs} ep.")
                x += 1.0
            x += 0.5
        ax.axhline(0.0, color="black", lw=0.8)
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.12 * (high - low))  # room for the pairs' names
        ax.set_xticks(ticks, names, fontsize=8)
        ax.set_xlim(-0.6, x - 0.9)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("paired by seed (same faces, same initial weights): dots = seeds, "
                 "square = mean with 95% t interval", fontsize=9)  # fmt: skip
    return _save(fig, path)


def plot_factor(payload: Mapping[str, Any], factor: str, path: Path) -> Path:
    """Accuracy and head overlap across one factor of the 4-epoch grid."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = payload["summary"]
    values = [v for v in A.FACTORS[factor] if _find(rows, {**A.DEFAULT, factor: v}) is not None]
    picked = [_find(rows, {**A.DEFAULT, factor: v}) for v in values]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    xs = list(range(len(values)))
    for ax, metric, label in ((axes[0], "accuracy", "test accuracy (%)"),
                              (axes[1], "head_overlap", "head overlap (1 = same map)")):  # fmt: skip
        scale = 100.0 if metric == "accuracy" else 1.0
        pts = [(x, r[f"{metric}_mean"] * scale, (r[f"{metric}_std"] or 0.0) * scale)
               for x, r in zip(xs, picked, strict=True)
               if r is not None and r[f"{metric}_mean"] is not None]  # fmt: skip
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-", capsize=4)
        for run in payload["runs"]:
            for x, v in enumerate(values):
                if run["config"] == {**A.DEFAULT, factor: v} and run[metric] is not None:
                    ax.plot(x + 0.08, run[metric] * scale, ".", color="gray", alpha=0.6)
        ax.set_xticks(xs, [str(v) for v in values])
        ax.set_xlabel({"num_heads": "heads", "partition": "partition loss"}[factor])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    seeds = ", ".join(f"{v}: {r['n_seeds']}" for v, r in zip(values, picked, strict=True) if r is not None)
    fig.suptitle(f"{A.GRID_EPOCHS} epochs, mean ± std over seeds ({seeds}; dots: single runs)", fontsize=9)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(payload: Mapping[str, Any], assets: Path) -> list[Path]:
    """Every plot of the page, into ``assets`` (names in :data:`PLOTS`)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    return [
        plot_schedule(payload, assets / PLOTS[0]),
        plot_paired(payload, assets / PLOTS[1]),
        plot_factor(payload, "partition", assets / PLOTS[2]),
        plot_factor(payload, "num_heads", assets / PLOTS[3]),
    ]


def write_docs(cache: Path, page: Path, assets: Path) -> None:
    """Put the tables from ``cache`` between the markers of ``page`` and redraw the plots."""
    payload = json.loads(cache.read_text())
    text = page.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    page.write_text(text[:start] + "\n" + markdown_tables(payload) + text[end:])
    for p in plot(payload, assets):
        print(f"wrote {p}")
    print(f"wrote {page}")
