"""Run every CPU benchmark (one fresh process each), then render the report.

    python benchmarks/run_all.py                 # full suite, ~10 min on 2 cores
    python benchmarks/run_all.py --quick --out /tmp/bench   # smoke run, ~1 min
    python benchmarks/run_all.py --only heads_inference affinity

Each script writes ``<out>/<name>.json``; ``report.py`` then writes ``<out>/RESULTS.md``
and the PNG plots. ``<out>/run_all.json`` records each script's wall time and status (``--only`` updates the
entries of the scripts it reruns).
A failing script does not stop the others; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["heads_train", "heads_inference", "affinity", "dan_throughput", "dan_memory", "predict"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--threads", type=int, default=None, help="passed to every script")
    p.add_argument("--only", nargs="+", choices=SCRIPTS, default=None)
    p.add_argument("--skip", nargs="+", choices=SCRIPTS, default=[])
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)

    flags = ["--out", str(args.out)]
    if args.quick:
        flags.append("--quick")
    if args.threads:
        flags += ["--threads", str(args.threads)]
    scripts = [s for s in (args.only or SCRIPTS) if s not in args.skip]
    args.out.mkdir(parents=True, exist_ok=True)
    record_path = args.out / "run_all.json"
    record = {"quick": args.quick, "threads": args.threads, "scripts": {}}
    if args.only and record_path.exists():  # a partial rerun updates the earlier record
        old = json.loads(record_path.read_text())
        if old.get("quick") == args.quick:
            record["scripts"] = old.get("scripts", {})
    failed = []
    t_all = time.perf_counter()
    for name in scripts:
        cmd = [sys.executable, str(HERE / f"{name}.py"), *flags]
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        dt = time.perf_counter() - t0
        record["scripts"][name] = {"returncode": rc, "seconds": round(dt, 1),
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        print(f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {dt:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    record["this_run_seconds"] = round(time.perf_counter() - t_all, 1)
    record["total_seconds"] = round(sum(v["seconds"] for v in record["scripts"].values()), 1)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    if not args.no_report:
        rc = subprocess.call([sys.executable, str(HERE / "report.py"), "--results", str(args.out)])
        if rc != 0:
            failed.append("report")
    print(f"\nrun_all: {len(scripts)} scripts in {record['this_run_seconds']:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else "; all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
