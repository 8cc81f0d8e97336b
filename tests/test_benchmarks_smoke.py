"""Smoke test of the benchmark suite: every script runs with --quick and the report renders.

Runs ``benchmarks/run_all.py --quick`` (tiny sizes, one thread) into a temporary folder,
so the checked-in results in ``benchmarks/results/`` are untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SCRIPTS = ["heads_train", "heads_inference", "affinity", "dan_throughput", "dan_memory", "predict"]


@pytest.mark.slow
def test_all_benchmarks_run_quick_and_report(tmp_path):
    pytest.importorskip("matplotlib")
    res = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    record = json.loads((tmp_path / "run_all.json").read_text())
    assert set(record["scripts"]) == set(SCRIPTS)
    for name in SCRIPTS:
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["name"] == name
        assert data["rows"], name
        assert data["config"]["quick"] is True
        assert data["env"]["torch"]
    # the parity checks inside the benchmarks hold even at the quick sizes
    inference = json.loads((tmp_path / "heads_inference.json").read_text())
    assert inference["summary"]["all_equal_within_tol"], inference["summary"]
    train = json.loads((tmp_path / "heads_train.json").read_text())
    assert all(r["rel_err_out"] < 1e-5 and r["rel_err_input_grad"] < 1e-5 for r in train["rows"])
    photos = json.loads((tmp_path / "predict.json").read_text())
    assert {r["variant"] for r in photos["rows"]} == {"fast", "plain"}
    assert photos["summary"]["logits_rel_err_fast_vs_plain"] < 1e-4
    # today's detection path and the new one, side by side, on the pictures and the test video
    assert {(r["scene"], r["path"]) for r in photos["scenes"]} >= {("video", "today"), ("video", "new")}
    assert all(r["real_faces"] == r["pictures"] for r in photos["scenes"] if r["path"] == "new")
    assert photos["quality"]["rows"][0]["faces"] > 0
    md = (tmp_path / "RESULTS.md").read_text()
    for name in SCRIPTS:
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        assert f"]({name}.png)" in md


def test_gpu_script_fails_clearly_without_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: gpu.sh would run the full GPU suite")
    bash = "/bin/bash"
    if not Path(bash).exists():
        pytest.skip("needs bash")
    res = subprocess.run([bash, str(BENCH / "gpu.sh"), str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert res.returncode == 2
    assert "CUDA is not available" in res.stderr
