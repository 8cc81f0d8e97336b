"""Q1: MultiHeadAttentionBlock forward+backward (train mode) vs the authors' per-head loop.

For every number of heads K and batch size B, one ``MultiHeadAttentionBlock``
and one ``RefMultiHead`` (K separate heads looped in Python) hold the same weights;
both do forward + backward of ``(out * g).sum()`` with the input requiring grad (as
inside DAN, where the gradient flows on into the backbone). Timed interleaved in one
process; ``speedup = loop time / ours``. Target: ours never slower (speedup >= 1).

``grouped``: the same block forced onto its grouped convolutions (what it runs on
CUDA); ``cpu_path_gain = grouped / ours`` is what the CPU path (dense
convolutions per head) buys. Parity is checked in float32 (``rel_err_*``, both
implementations against each other) and in float64 (``rel_err_*_f64``): float32
input gradients can differ by ~1e-3 where a pre-ReLU value lies within rounding of
zero, so a ReLU opens in one implementation and not in the other; float64 shows
that the two compute the same function.

    python benchmarks/heads_train.py            # K = 1 2 4 8, B = 32 64, 512 x 7 x 7
    python benchmarks/heads_train.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import copy

import _common as C
import torch
from reference_dan import RefMultiHead, block_from_reference

NAME = "heads_train"


def main(argv: list[str] | None = None) -> dict:
    p = C.make_parser(__doc__.splitlines()[0], device_flags=True)
    p.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--size", type=int, default=7, help="feature map height = width")
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timed rounds per row")
    p.add_argument("--no-grouped", action="store_true",
                   help="do not time the block forced onto its grouped convolutions")
    p.add_argument("--no-f64", action="store_true", help="skip the float64 parity check")
    args = p.parse_args(argv)
    if args.quick:
        args.heads, args.batches, args.channels = [1, 2], [4], 64
    device = C.setup(args)
    dtype = C.dtype_of(args)
    repeats = args.repeats or (2 if args.quick else 15)

    rows = []
    for batch in args.batches:
        for k in args.heads:
            torch.manual_seed(0)
            ref = RefMultiHead(args.channels, k).to(device).train()
            ours = block_from_reference(ref).train()
            x = torch.randn(batch, args.channels, args.size, args.size, device=device)
            g = torch.randn(batch, k, args.channels, device=device)

            def step(model, x=x, g=g):
                def run():
                    model.zero_grad(set_to_none=True)
                    xx = x.detach().requires_grad_()
                    with C.autocast(device, dtype):
                        out = model(xx)
                    (out.to(g.dtype) * g).sum().backward()
                    return out, xx.grad

                return run

            # parity of the two implementations (same weights, train-mode batch statistics);
            # these first calls are also the warm-up (oneDNN primitive creation)
            out_ref, gx_ref = step(ref)()
            out_ours, gx_ours = step(ours)()
            err_out = C.rel_err(out_ours, out_ref)
            err_grad = C.rel_err(gx_ours, gx_ref)
            fns = {"loop": step(ref), "ours": step(ours)}
            if not args.no_grouped and device.type == "cpu":
                fns["grouped"] = step(C.grouped_copy(ours))
                err_out = max(err_out, C.rel_err(fns["grouped"]()[0], out_ref))
            errs64 = {}
            if not args.no_f64:
                ref64, ours64 = (m.double() for m in (copy.deepcopy(ref), copy.deepcopy(ours)))
                x64, g64 = x.double(), g.double()
                (o_r, g_r), (o_o, g_o) = (step(m, x64, g64)() for m in (ref64, ours64))
                errs64 = {"rel_err_out_f64": C.rel_err(o_o, o_r), "rel_err_input_grad_f64": C.rel_err(g_o, g_r)}
                del ref64, ours64

            t = C.time_interleaved(
                fns,
                repeats=repeats,
                warmup=0,
                device=device,
                budget_s=None if args.quick else args.budget,
                min_repeats=2 if args.quick else 3,
            )
            speedup = t["loop"]["median_s"] / t["ours"]["median_s"]
            cpu_speedup = t["loop"]["cpu_median_s"] / t["ours"]["cpu_median_s"]
            rows.append(
                {
                    "heads": k,
                    "batch": batch,
                    "loop_ms": 1e3 * t["loop"]["median_s"],
                    "ours_ms": 1e3 * t["ours"]["median_s"],
                    "speedup": speedup,
                    "cpu_speedup": cpu_speedup,
                    **({"grouped_ms": 1e3 * t["grouped"]["median_s"],
                        "cpu_path_gain": t["grouped"]["median_s"] / t["ours"]["median_s"]}
                       if "grouped" in t else {}),
                    "rounds": t["ours"]["n"],
                    "loop_iqr_ms": [1e3 * t["loop"]["q1_s"], 1e3 * t["loop"]["q3_s"]],
                    "ours_iqr_ms": [1e3 * t["ours"]["q1_s"], 1e3 * t["ours"]["q3_s"]],
                    "rel_err_out": err_out,
                    "rel_err_input_grad": err_grad,
                    **errs64,
                    "ours_not_slower": speedup >= 1.0,
                }
            )
            C.print_table(rows[-1:], ["heads", "batch", "loop_ms", "ours_ms", "speedup", "cpu_speedup",
                                      "cpu_path_gain", "rounds",
                                      "rel_err_out", "rel_err_input_grad_f64"], title="" if len(rows) > 1 else
                          f"{NAME}: fwd+bwd, train mode, {args.channels}x{args.size}x{args.size}, "
                          f"{device} {args.dtype}")

    slower = [r for r in rows if not r["ours_not_slower"]]
    summary = {
        "min_speedup": min(r["speedup"] for r in rows),
        "ours_never_slower": not slower,
        "slower_rows": [(r["heads"], r["batch"], round(r["speedup"], 3)) for r in slower],
    }
    C.print_table(rows, ["heads", "batch", "loop_ms", "ours_ms", "speedup", "cpu_speedup",
                         "grouped_ms", "cpu_path_gain", "rel_err_out", "rel_err_input_grad",
                         "rel_err_input_grad_f64"], title=f"{NAME} summary")
    if slower:
        print("WARNING: fused block slower than the per-head loop at (K, B, speedup) = "
              f"{summary['slower_rows']}")
    payload = {
        "name": NAME,
        "question": "MultiHeadAttentionBlock fwd+bwd (train) vs the authors' per-head loop",
        "command": C.command_line(),
        "env": C.env_info(device),
        "config": {"channels": args.channels, "size": args.size, "dtype": args.dtype,
                   "device": str(device), "quick": args.quick, "repeats_max": repeats,
                   "timing": "interleaved rounds, median; speedup = loop / ours"},
        "rows": rows,
        "summary": summary,
    }
    C.write_json(C.result_name(NAME, args), payload, args.out)
    return payload


if __name__ == "__main__":
    main()
