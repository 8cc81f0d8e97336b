"""Q3: AffinityLoss, gathered own-centre distances vs the authors' B x N distance matrix.

For N classes from 7 to 10,000 (metric-learning scale; feat_dim 512, batch 256):

* time of forward + backward (features and centres require grad), interleaved;
* memory: (a) the largest intermediate, computed from the shapes, (b) the peak
  bytes torch's CPU allocator held during forward + backward (torch.profiler memory
  events, deterministic), (c) the peak-RSS growth of one forward + backward in a
  fresh subprocess (VmHWM reset just before; ``_common.peak_rss_growth``);
* float32 error of each implementation against the *same* implementation in float64
  (loss value and centre gradient), for random features and for "trained-like"
  features lying close to their centre (where |x|^2 + |c|^2 - 2 x.c cancels).

    python benchmarks/affinity.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import _common as C
import torch
from reference_dan import ref_affinity_loss

from dan_layers import functional as DF

NAME = "affinity"
IMPLS = {"ours": DF.affinity_loss, "distmat": ref_affinity_loss}


def make_inputs(n: int, batch: int, dim: int, regime: str, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n, (batch,), generator=g)
    if regime == "random":
        centers = torch.randn(n, dim, generator=g, dtype=torch.float64)
        feats = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    elif regime == "trained":  # features close to their centre, centres off the origin
        centers = 2.0 + torch.randn(n, dim, generator=g, dtype=torch.float64)
        feats = centers[labels] + 0.1 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    else:
        raise ValueError(regime)
    return feats.to(dtype), labels, centers.to(dtype)


def fwd_bwd(impl, feats, labels, centers):
    f = feats.detach().requires_grad_()
    c = centers.detach().requires_grad_()
    loss = IMPLS[impl](f, labels, c)
    loss.backward()
    return loss.detach(), f.grad, c.grad


def largest_intermediate_bytes(impl: str, n: int, batch: int, dim: int, itemsize: int = 4) -> int:
    """Size of the largest tensor the implementation creates (forward or backward)."""
    if impl == "ours":  # gathered centres / differences (B, C); centre gradient (N, C)
        return itemsize * max(batch * dim, n * dim)
    return itemsize * max(batch * n, n * dim)  # distance matrix (B, N); centre gradient (N, C)


def child(impl: str, n: int, batch: int, dim: int) -> None:
    """Run in a fresh process: print the peak-RSS growth of one forward + backward."""
    g = torch.Generator().manual_seed(0)  # float32 directly: no freed temporaries to reuse
    labels = torch.randint(0, n, (batch,), generator=g)
    c = torch.randn(n, dim, generator=g).requires_grad_()
    f = torch.randn(batch, dim, generator=g).requires_grad_()
    growth = C.peak_rss_growth(lambda: IMPLS[impl](f, labels, c).backward())
    print(json.dumps({"delta": growth}))


def rss_delta(impl: str, n: int, batch: int, dim: int) -> int | None:
    cmd = [sys.executable, __file__, "--child", impl, str(n), str(batch), str(dim)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=C.child_env())
    if res.returncode != 0:
        print(res.stderr[-2000:])
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["delta"]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
        return {}
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs="+", default=[7, 100, 1000, 3000, 10000])
    p.add_argument("--rss-classes", type=int, nargs="*", default=[7, 1000, 10000],
                   help="class counts also measured by peak-RSS growth in fresh subprocesses")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--feat-dim", type=int, default=512)
    p.add_argument("--budget", type=float, default=4.0)
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.rss_classes, args.batch, args.feat_dim = [7, 100], [100], 16, 32
    device = C.setup(args)
    repeats = args.repeats or (3 if args.quick else 50)
    b, d = args.batch, args.feat_dim

    rows = []
    for n in args.classes:
        feats, labels, centers = make_inputs(n, b, d, "random")
        fns = {impl: (lambda impl=impl, inputs=(feats, labels, centers): fwd_bwd(impl, *inputs))
               for impl in IMPLS}
        t = C.time_interleaved(fns, repeats=repeats, warmup=2,
                               budget_s=None if args.quick else args.budget,
                               min_repeats=3 if args.quick else 7)
        row = {"classes": n, "batch": b, "feat_dim": d}
        for impl in IMPLS:
            row[f"{impl}_ms"] = 1e3 * t[impl]["median_s"]
            row[f"{impl}_peak_bytes"] = C.profiled_peak_bytes(fns[impl])
            row[f"{impl}_largest_bytes"] = largest_intermediate_bytes(impl, n, b, d)
        row["speedup"] = t["distmat"]["median_s"] / t["ours"]["median_s"]
        row["peak_ratio"] = row["distmat_peak_bytes"] / max(row["ours_peak_bytes"], 1)
        for regime in ("random", "trained"):
            f32 = make_inputs(n, b, d, regime, torch.float32)
            f64 = make_inputs(n, b, d, regime, torch.float64)
            res64 = {}
            for impl in IMPLS:
                l32, _, gc32 = fwd_bwd(impl, *f32)
                l64, _, gc64 = fwd_bwd(impl, *f64)
                res64[impl] = l64
                row[f"{impl}_{regime}_loss_err"] = abs(float(l32) - float(l64)) / abs(float(l64))
                row[f"{impl}_{regime}_grad_err"] = C.rel_err(gc32, gc64)
            row[f"{regime}_loss"] = float(res64["ours"])
            row[f"{regime}_fp64_ours_vs_distmat"] = abs(float(res64["ours"] - res64["distmat"])) / abs(
                float(res64["ours"]))
        if n in args.rss_classes:
            for impl in IMPLS:
                row[f"{impl}_rss_delta_bytes"] = rss_delta(impl, n, b, d)
        rows.append(row)
        C.print_table(rows[-1:], ["classes", "ours_ms", "distmat_ms", "speedup", "ours_peak_bytes",
                                  "distmat_peak_bytes", "ours_trained_loss_err",
                                  "distmat_trained_loss_err"],
                      title="" if len(rows) > 1 else f"{NAME}: fwd+bwd, batch {b}, feat_dim {d}")

    big = rows[-1]
    summary = {
        "largest_classes": big["classes"],
        "speedup_at_largest": big["speedup"],
        "peak_ratio_at_largest": big["peak_ratio"],
        "max_ours_fp32_loss_err": max(max(r["ours_random_loss_err"], r["ours_trained_loss_err"]) for r in rows),
        "max_distmat_fp32_loss_err": max(max(r["distmat_random_loss_err"], r["distmat_trained_loss_err"])
                                         for r in rows),
    }
    C.print_table(rows, ["classes", "ours_ms", "distmat_ms", "speedup", "ours_peak_bytes",
                         "distmat_peak_bytes", "ours_rss_delta_bytes", "distmat_rss_delta_bytes"],
                  title=f"{NAME}: time and memory")
    C.print_table(rows, ["classes", "ours_random_loss_err", "distmat_random_loss_err",
                         "ours_trained_loss_err", "distmat_trained_loss_err", "ours_trained_grad_err",
                         "distmat_trained_grad_err"], title=f"{NAME}: float32 error vs float64")
    payload = {
        "name": NAME,
        "question": "AffinityLoss: gathered distances vs the B x N distance matrix",
        "command": C.command_line(),
        "env": C.env_info(device),
        "config": {"batch": b, "feat_dim": d, "quick": args.quick, "repeats_max": repeats,
                   "timing": "forward+backward, interleaved rounds, median",
                   "memory": "peak_bytes: torch.profiler allocator peak; rss_delta: peak-RSS (VmHWM) growth "
                             "in a fresh subprocess; largest_bytes: from the shapes"},
        "rows": rows,
        "summary": summary,
    }
    C.write_json(NAME, payload, args.out)
    return payload


if __name__ == "__main__":
    main()
