"""benchmarks/ablation.py: the plan, the cache, the statistics, and the docs page generated from them."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablation  # noqa: E402
import ablation_docs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ablation.json"


def _run(config, seed, **metrics):
    return {"name": ablation.run_name(config, seed), "config": config, "seed": seed, "wall_seconds": 1.0,
            "host": {"cpu": "test"}, **{m: 0.5 for m in ablation.METRICS}, **metrics}  # fmt: skip


def test_grid_is_one_factor_at_a_time_around_dans_defaults():
    configs = ablation.grid()
    assert configs[0] == {"partition": "paper", "num_heads": 4, "affinity": "affinity", "epochs": 4}
    assert len(configs) == 9 and len({json.dumps(c, sort_keys=True) for c in configs}) == 9
    for c in configs:  # every configuration differs from the default in at most one factor
        assert sum(c[k] != ablation.DEFAULT[k] for k in c) <= 1
    assert {c["partition"] for c in configs} == {"none", "paper", "official", "normalize"}
    assert {c["num_heads"] for c in configs} == {1, 2, 4, 8}
    assert {c["affinity"] for c in configs} == {"affinity", "center", "none"}
    assert {c["epochs"] for c in configs} == {ablation.GRID_EPOCHS}


def test_plan_has_the_seeds_and_schedules_the_partition_study_needs():
    seeds = {}
    for config, seed in ablation.planned_runs():
        if config["num_heads"] == 4 and config["affinity"] == "affinity":
            seeds.setdefault((config["partition"], config["epochs"]), set()).add(seed)
    long = max(ablation.PARTITION_SEEDS)
    assert long >= 2.5 * ablation.GRID_EPOCHS
    for partition in ("none", "paper", "normalize"):
        assert len(seeds[partition, ablation.GRID_EPOCHS]) >= 8
        assert len(seeds[partition, long]) >= 5
    names = [ablation.run_name(c, s) for c, s in ablation.planned_runs()]
    assert len(names) == len(set(names))  # each run once, although the grid and the study share some
    # seed-major order inside the study: the three settings of a seed run back to back
    study = [(c["epochs"], s, c["partition"]) for c, s in ablation.planned_runs()
             if c["num_heads"] == 4 and c["affinity"] == "affinity"
             and (c["epochs"] == long or s >= 3)]  # fmt: skip
    assert study[:3] == [(4, 3, "none"), (4, 3, "paper"), (4, 3, "normalize")]


def test_flags_of_a_run():
    config = {"partition": "normalize", "num_heads": 8, "affinity": "center", "epochs": 10}
    text = " ".join(flags := ablation.train_flags(config, 2, ablation.SETTINGS, Path("out")))
    assert "--partition paper" in text and "--partition-normalize" in flags
    assert "--num-heads 8" in text and "--affinity center" in text and "--seed 2" in text
    assert "--epochs 10" in text and "--threads 2" in text
    assert "--image-size 112" in text  # 4 x 4 feature-map cells
    default_flags = ablation.train_flags(ablation.DEFAULT, 0, ablation.SETTINGS, Path("o"))
    assert "--partition-normalize" not in default_flags and "--epochs 4" in " ".join(default_flags)
    assert "epochs-10" in ablation.run_name(config, 2) and "epochs-4" in ablation.run_name(ablation.DEFAULT, 2)


def test_summary_is_mean_and_sample_std_over_seeds_and_counts_failures():
    runs = [_run(ablation.DEFAULT, s, accuracy=a, balanced_accuracy=a, head_overlap=o, partition=0.1)
            for s, a, o in ((0, 0.8, 0.5), (1, 0.9, 0.7), (2, 0.6, None))]  # fmt: skip
    (row,) = ablation.summarise(runs)
    assert row["n_seeds"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["accuracy_mean"] == pytest.approx(0.7667, abs=1e-4)
    assert row["accuracy_std"] == pytest.approx(0.1528, abs=1e-4)
    assert row["head_overlap_mean"] == pytest.approx(0.6)  # a missing value is left out
    assert row["partition_std"] == 0.0
    assert row["failures"] == 1 and row["failure_rate"] == pytest.approx(1 / 3)  # 0.6 < 0.70


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (7, 2.3646),
                                              (9, 2.2622), (30, 2.0423), (1000, 1.9623)])  # fmt: skip
def test_t_quantile_matches_the_table(df, expected):
    assert ablation.t_quantile(0.95, df) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 13])
def test_t_central_matches_scipy(df):
    stats = pytest.importorskip("scipy.stats")
    for t in (0.1, 0.7, 1.5, 2.3, 4.0, 11.0):
        assert ablation.t_central(t, df) == pytest.approx(stats.t.cdf(t, df) - stats.t.cdf(-t, df), abs=1e-12)


def test_paired_differences_use_the_shared_seeds():
    a, b = {**ablation.DEFAULT, "partition": "none"}, {**ablation.DEFAULT, "partition": "normalize"}
    runs = [_run(a, s, accuracy=x) for s, x in ((0, 0.80), (1, 0.70), (2, 0.90), (3, 0.85))]
    runs += [_run(b, s, accuracy=x) for s, x in ((0, 0.90), (1, 0.75), (2, 0.90), (5, 0.99))]
    p = ablation.paired(runs, a, b)
    assert p["seeds"] == [0, 1, 2] and p["differences"] == pytest.approx([0.10, 0.05, 0.0])
    assert p["mean"] == pytest.approx(0.05) and p["std"] == pytest.approx(0.05)
    half = 4.3027 * 0.05 / math.sqrt(3)
    assert p["ci95"] == pytest.approx([0.05 - half, 0.05 + half], abs=1e-5)
    assert (p["b_higher"], p["a_higher"], p["equal"]) == (2, 0, 1)
    assert ablation.paired(runs[:1], a, b) is None


def test_cache_resumes_drops_runs_of_other_settings_and_migrates_schema_1(tmp_path):
    cache = tmp_path / "ablation.json"
    run = _run(ablation.DEFAULT, 0)
    ablation.write_cache(cache, ablation.SETTINGS, [run])
    assert ablation.load_cache(cache, ablation.SETTINGS) == [run]
    assert ablation.load_cache(cache, {**ablation.SETTINGS, "threads": 1}) == []
    payload = json.loads(cache.read_text())
    assert payload["summary"][0]["config"] == ablation.DEFAULT and payload["env"]["torch"]
    left = [ablation.run_name(*x) for x in ablation.remaining(cache, ablation.SETTINGS)]
    assert ablation.run_name(ablation.DEFAULT, 0) not in left and len(left) == len(ablation.planned_runs()) - 1
    # schema 1: the schedule in "settings", names without it, two-head runs in "extra_runs"
    old_config = {k: v for k, v in ablation.DEFAULT.items() if k != "epochs"}
    two = {**old_config, "num_heads": 2, "partition": "none"}
    old = {"settings": {**ablation.SETTINGS, "epochs": 4}, "env": {"cpu": "AMD EPYC"},
           "runs": [{**run, "name": "partition-paper_heads-4_affinity_seed-0", "config": old_config}],
           "extra_runs": [{**run, "name": "partition-none_heads-2_affinity_seed-0",
                           "config": two}]}  # fmt: skip
    for r in old["runs"] + old["extra_runs"]:
        del r["host"]
    cache.write_text(json.dumps(old))
    migrated = ablation.load_cache(cache, ablation.SETTINGS)
    assert [r["name"] for r in migrated] == ["partition-paper_heads-4_affinity_epochs-4_seed-0",
                                             "partition-none_heads-2_affinity_epochs-4_seed-0"]  # fmt: skip
    assert migrated[0]["config"] == ablation.DEFAULT and migrated[1]["config"]["epochs"] == 4
    assert migrated[0]["host"]["cpu"] == "AMD EPYC"
    assert ablation.load_cache(cache, {**ablation.SETTINGS, "epochs": 4}) == []  # schema 2 has no epochs there


def test_results_file_is_consistent_and_the_docs_page_is_generated_from_it():
    if not RESULTS.is_file():
        pytest.skip("the ablation has not been run in this checkout")
    payload = json.loads(RESULTS.read_text())
    runs = payload["runs"]
    assert payload["schema"] == ablation.SCHEMA and payload["settings"] == ablation.SETTINGS
    planned = {ablation.run_name(c, s) for c, s in ablation.planned_runs()}
    assert {r["name"] for r in runs} <= planned and len({r["name"] for r in runs}) == len(runs)
    for r in runs:
        assert r["name"] == ablation.run_name(r["config"], r["seed"]) and "epochs" in r["config"]
    assert payload["summary"] == json.loads(json.dumps(ablation.summarise(runs)))
    assert payload["paired"] == json.loads(json.dumps(ablation.paired_all(runs)))
    missing = sorted(planned - {r["name"] for r in runs})
    assert not missing, f"planned runs not in the results (run benchmarks/ablation.py): {missing}"
    page = (ROOT / "docs" / "ablation.md").read_text()
    start = page.index(ablation_docs.TABLE_START) + len(ablation_docs.TABLE_START)
    tables = ablation_docs.markdown_tables(payload)
    assert page[start : page.index(ablation_docs.TABLE_END)].strip() == tables.strip()
    for name in ablation_docs.PLOTS:
        assert (ROOT / "docs" / "assets" / name).stat().st_size > 0
        assert f"assets/{name}" in page


@pytest.mark.parametrize(
    ("page", "start"),
    [
        ("README.md", r"\*\*Ablation\*\*"),
        ("docs/guides/partition-loss.md", r"What it does in training, measured"),
    ],
)
def test_quoted_ablation_numbers_are_the_pages(page, start):
    """Every number in the paragraphs that quote the ablation is in the generated tables."""
    if not RESULTS.is_file():
        pytest.skip("the ablation has not been run in this checkout")
    text = (ROOT / page).read_text()
    match = re.search(rf"^{start}.*?(?=\n\n)", text, flags=re.S | re.M)
    assert match is not None, f"{page}: no paragraph starting with {start!r}"
    tables = ablation_docs.markdown_tables(json.loads(RESULTS.read_text()))
    numbers = re.findall(r"[+-]?\d+\.\d+", match.group(0))
    assert numbers, f"{page}'s ablation paragraph quotes no measured number"
    missing = [n for n in numbers if n not in tables]
    assert not missing, f"{page}: numbers not in docs/ablation.md's tables: {missing}"


@pytest.mark.slow
def test_one_seed_means_the_same_faces_and_initial_weights(tmp_path):
    """The pairing the study rests on: with a learning rate of 1e-30 the weights cannot move, so
    after one epoch two configurations of one seed must hold equal weights (the initial ones) and
    equal BatchNorm statistics (the same batches); another seed must not."""
    def last_state(partition, seed):
        config = {**ablation.DEFAULT, "partition": partition, "epochs": 1}
        out = tmp_path / f"{partition}-{seed}"
        flags = ablation.train_flags(config, seed, ablation.QUICK_SETTINGS, out)
        subprocess.run([sys.executable, str(ablation.TRAIN), *flags, "--lr", "1e-30"], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        import torch  # noqa: PLC0415

        return torch.load(out / "last.pt", weights_only=True)["model"]

    def max_diff(x, y):
        assert x.keys() == y.keys()
        return max((x[k].double() - y[k].double()).abs().max().item() for k in x if x[k].numel())

    paper = last_state("paper", 3)
    assert max_diff(paper, last_state("normalize", 3)) < 1e-20
    assert max_diff(paper, last_state("none", 3)) < 1e-20
    assert max_diff(paper, last_state("paper", 4)) > 1e-3


@pytest.mark.slow
def test_a_tiny_run_end_to_end(tmp_path):
    config = {**ablation.DEFAULT, "partition": "normalize", "num_heads": 2, "epochs": 1}
    record = ablation.run_one(config, 0, ablation.QUICK_SETTINGS, tmp_path, keep=False)
    assert record["config"] == config and record["name"].endswith("seed-0")
    assert 0 <= record["accuracy"] <= 1 and 0 <= record["head_overlap"] <= 1 and record["head_norm"] > 0
    assert len(record["train_partition_by_epoch"]) == 1 and record["wall_seconds"] > 0
    assert record["host"]["cpu"] and len(record["host"]["load_before"]) == 3
    assert not (tmp_path / record["name"] / "last.pt").exists()  # checkpoints removed, metrics kept
    assert (tmp_path / record["name"] / "metrics.json").is_file()
