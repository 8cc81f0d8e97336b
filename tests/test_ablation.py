"""benchmarks/ablation.py: the grid, the cache, the summary, and the docs page generated from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablation  # noqa: E402


def test_grid_is_one_factor_at_a_time_around_dans_defaults():
    configs = ablation.grid()
    assert configs[0] == {"partition": "paper", "num_heads": 4, "affinity": "affinity"}
    assert len(configs) == 9 and len({json.dumps(c, sort_keys=True) for c in configs}) == 9
    for c in configs:  # every configuration differs from the default in at most one factor
        assert sum(c[k] != ablation.DEFAULT[k] for k in c) <= 1
    assert {c["partition"] for c in configs} == {"none", "paper", "official", "normalize"}
    assert {c["num_heads"] for c in configs} == {1, 2, 4, 8}
    assert {c["affinity"] for c in configs} == {"affinity", "center", "none"}


def test_flags_of_a_run():
    flags = ablation.train_flags({"partition": "normalize", "num_heads": 8, "affinity": "center"}, 2,
                                 ablation.SETTINGS, Path("out"))  # fmt: skip
    text = " ".join(flags)
    assert "--partition paper" in text and "--partition-normalize" in flags
    assert "--num-heads 8" in text and "--affinity center" in text and "--seed 2" in text
    assert "--image-size 112" in text  # 4 x 4 feature-map cells
    default_flags = ablation.train_flags(ablation.DEFAULT, 0, ablation.SETTINGS, Path("o"))
    assert "--partition-normalize" not in default_flags


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [
        {"config": ablation.DEFAULT, "seed": s, "accuracy": a, "balanced_accuracy": a, "head_overlap": o,
         "partition": 0.1, "head_norm": 3.0}
        for s, a, o in ((0, 0.8, 0.5), (1, 0.9, 0.7), (2, 1.0, None))
    ]  # fmt: skip
    (row,) = ablation.summarise(runs)
    assert row["n_seeds"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["accuracy_mean"] == pytest.approx(0.9) and row["accuracy_std"] == pytest.approx(0.1)
    assert row["head_overlap_mean"] == pytest.approx(0.6)  # a missing value is left out
    assert row["partition_std"] == 0.0


def test_cache_resumes_and_drops_runs_of_other_settings(tmp_path):
    cache = tmp_path / "ablation.json"
    run = {"name": ablation.run_name(ablation.DEFAULT, 0), "config": ablation.DEFAULT, "seed": 0,
           **{m: 0.5 for m in ablation.METRICS}}  # fmt: skip
    ablation.write_cache(cache, ablation.SETTINGS, [run], [0])
    assert ablation.load_cache(cache, ablation.SETTINGS) == [run]
    assert ablation.load_cache(cache, {**ablation.SETTINGS, "epochs": 99}) == []
    payload = json.loads(cache.read_text())
    assert payload["summary"][0]["config"] == ablation.DEFAULT and payload["env"]["torch"]


def test_docs_page_tables_are_the_results():
    results = ROOT / "benchmarks" / "results" / "ablation.json"
    if not results.is_file():
        pytest.skip("the grid has not been run in this checkout")
    payload = json.loads(results.read_text())
    page = (ROOT / "docs" / "ablation.md").read_text()
    start = page.index(ablation.TABLE_START) + len(ablation.TABLE_START)
    assert page[start : page.index(ablation.TABLE_END)].strip() == ablation.markdown_tables(payload).strip()
    assert len(payload["runs"]) == 27 and all(r["n_seeds"] == 3 for r in payload["summary"])
    for name in ("ablation_heads.png", "ablation_partition.png"):
        assert (ROOT / "docs" / "assets" / name).stat().st_size > 0


@pytest.mark.slow
def test_a_tiny_run_end_to_end(tmp_path):
    config = {**ablation.DEFAULT, "partition": "normalize", "num_heads": 2}
    record = ablation.run_one(config, 0, ablation.QUICK_SETTINGS, tmp_path, keep=False)
    assert record["config"] == config and record["name"].endswith("seed-0")
    assert 0 <= record["accuracy"] <= 1 and 0 <= record["head_overlap"] <= 1 and record["head_norm"] > 0
    assert len(record["train_partition_by_epoch"]) == ablation.QUICK_SETTINGS["epochs"]
    assert not (tmp_path / record["name"] / "last.pt").exists()  # checkpoints removed, metrics kept
    assert (tmp_path / record["name"] / "metrics.json").is_file()
