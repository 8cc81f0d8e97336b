"""Q2: inference (eval mode): re-parameterized block vs train-form block vs the authors' loop.

All variants hold the same weights and (randomised, non-trivial) BatchNorm statistics
and run under ``torch.inference_mode``, interleaved in one process:

* ``loop``       the authors' structure: K separate heads looped in Python;
* ``train_form`` ``MultiHeadAttentionBlock`` in eval mode, not re-parameterized;
* ``reparam``    ``reparameterize_model(train_form)``, a folded copy (BatchNorms folded, the
  3x3 / 1x3 / 3x1 branches merged into one 3x3 convolution per head);
* ``reparam_cl`` ``reparam`` with a channels_last input and weights;
* ``reparam_grouped`` ``reparam`` forced onto its grouped convolutions (what it runs
  on CUDA); on CPU the library runs each head's convolutions as dense ones on chunks
  of the grouped weights, and ``grouped_vs_reparam`` (> 1: the CPU path is faster)
  shows what that buys.

``reparam speedup = train_form / reparam`` (target >= 1.5 at K = 4, B = 32; the
multiply-accumulate ceiling is 1.6); outputs must agree within 1e-5 relative.
A torch.profiler breakdown of the K = 4, B = 32 case is stored in the JSON.

    python benchmarks/heads_inference.py
    python benchmarks/heads_inference.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import copy

import _common as C
import torch
from reference_dan import RefMultiHead, block_from_reference

from dan_layers import reparameterize_model

NAME = "heads_inference"
#: agreement required of the re-parameterized output (normwise relative), by compute dtype
TOLS = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def conv_macs(block: torch.nn.Module, channels: int, size: int) -> int:
    """Multiply-accumulates per sample of the block's convolutions and linear layers."""
    total = 0
    hw = size * size
    for m in block.modules():
        if isinstance(m, torch.nn.Conv2d):
            total += hw * m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            total += m.out_features * m.in_features
        elif hasattr(m, "num_heads") and hasattr(m, "in_features") and hasattr(m, "out_features"):
            total += m.num_heads * m.out_features * m.in_features  # per-head linear
    return total


def profile_ops(fns: dict, device: torch.device, rounds: int = 3, top: int = 8) -> dict:
    """Share of self time of the top operators of each variant (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for name, fn in fns.items():
        fn()
        with profile(activities=acts) as prof:
            for _ in range(rounds):
                fn()
            C.sync(device)
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        ev = [e for e in prof.key_averages() if not e.key.startswith(("ProfilerStep", "[memory]"))]
        total = sum(getattr(e, attr) for e in ev) or 1.0
        ev.sort(key=lambda e: getattr(e, attr), reverse=True)
        out[name] = [
            {"op": e.key, "share": getattr(e, attr) / total, "ms_per_call": getattr(e, attr) / 1e3 / rounds,
             "calls": e.count // rounds}
            for e in ev[:top]
        ]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = C.make_parser(__doc__.splitlines()[0], device_flags=True)
    p.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--extra-batches", type=int, nargs="*", default=[1, 8, 64],
                   help="further batch sizes measured at K = 4")
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--size", type=int, default=7)
    p.add_argument("--budget", type=float, default=12.0, help="seconds of timed rounds per row")
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.heads, args.batch, args.extra_batches, args.channels = [1, 4], 4, [2], 64
    device = C.setup(args)
    dtype = C.dtype_of(args)
    tol = TOLS[dtype]
    repeats = args.repeats or (2 if args.quick else 25)
    cases = [(k, args.batch) for k in args.heads]
    ref_k = 4 if 4 in args.heads else args.heads[-1]
    cases += [(ref_k, b) for b in args.extra_batches if b != args.batch]

    rows = []
    profile = None
    for k, batch in cases:
        torch.manual_seed(0)
        loop = RefMultiHead(args.channels, k).to(device)
        C.randomize_batchnorm(loop, seed=k)
        loop.eval()
        train_form = block_from_reference(loop).eval()
        reparam = reparameterize_model(train_form)  # a folded copy; train_form keeps its BatchNorms
        reparam_cl = copy.deepcopy(reparam).to(memory_format=torch.channels_last)
        x = torch.randn(batch, args.channels, args.size, args.size, device=device)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def call(model, inp):
            def run():
                with torch.inference_mode(), C.autocast(device, dtype):
                    return model(inp)
            return run

        fns = {
            "loop": call(loop, x),
            "train_form": call(train_form, x),
            "reparam": call(reparam, x),
            "reparam_cl": call(reparam_cl, x_cl),
            "reparam_grouped": call(C.grouped_copy(reparam), x),
        }
        outs = {n: f().float() for n, f in fns.items()}  # also the warm-up call of each
        errs = {f"rel_err_{n}_vs_loop": C.rel_err(o, outs["loop"]) for n, o in outs.items() if n != "loop"}
        errs["rel_err_reparam_vs_train_form"] = C.rel_err(outs["reparam"], outs["train_form"])
        t = C.time_interleaved(fns, repeats=repeats, warmup=0, device=device,
                               budget_s=None if args.quick else args.budget,
                               min_repeats=2 if args.quick else 5)
        ms = {f"{n}_ms": 1e3 * v["median_s"] for n, v in t.items()}
        macs_train = conv_macs(train_form, args.channels, args.size)
        macs_rep = conv_macs(reparam, args.channels, args.size)
        row = {
            "heads": k,
            "batch": batch,
            **ms,
            "reparam_speedup": t["train_form"]["median_s"] / t["reparam"]["median_s"],
            "reparam_vs_loop": t["loop"]["median_s"] / t["reparam"]["median_s"],
            "train_form_vs_loop": t["loop"]["median_s"] / t["train_form"]["median_s"],
            "cl_vs_reparam": t["reparam"]["median_s"] / t["reparam_cl"]["median_s"],
            "grouped_vs_reparam": t["reparam_grouped"]["median_s"] / t["reparam"]["median_s"],
            "cpu_reparam_speedup": t["train_form"]["cpu_median_s"] / t["reparam"]["cpu_median_s"],
            "cpu_reparam_vs_loop": t["loop"]["cpu_median_s"] / t["reparam"]["cpu_median_s"],
            "mac_ratio": macs_train / macs_rep,
            "macs_train_form": macs_train,
            "macs_reparam": macs_rep,
            "rounds": t["reparam"]["n"],
            **errs,
            "equal_within_tol": max(errs["rel_err_reparam_vs_loop"],
                                    errs["rel_err_reparam_vs_train_form"]) <= tol,
        }
        rows.append(row)
        C.print_table(rows[-1:], ["heads", "batch", "loop_ms", "train_form_ms", "reparam_ms",
                                  "reparam_speedup", "reparam_vs_loop", "cl_vs_reparam",
                                  "grouped_vs_reparam", "rel_err_reparam_vs_loop"],
                      title="" if len(rows) > 1 else f"{NAME}: eval, inference_mode, "
                      f"{args.channels}x{args.size}x{args.size}, {device} {args.dtype}")
        if (k, batch) == (ref_k, args.batch) and not args.no_profile:
            profile = profile_ops({n: fns[n] for n in ("loop", "train_form", "reparam")}, device,
                                  rounds=1 if args.quick else 3)

    target = next((r for r in rows if (r["heads"], r["batch"]) == (ref_k, args.batch)), rows[0])
    summary = {
        "target_case": {"heads": target["heads"], "batch": target["batch"]},
        "reparam_speedup": target["reparam_speedup"],
        "reached_1_5x": target["reparam_speedup"] >= 1.5,
        "reparam_vs_loop": target["reparam_vs_loop"],
        "mac_ratio": target["mac_ratio"],
        "max_rel_err": max(max(v for k_, v in r.items() if k_.startswith("rel_err")) for r in rows),
        "all_equal_within_tol": all(r["equal_within_tol"] for r in rows),
    }
    C.print_table(rows, ["heads", "batch", "loop_ms", "train_form_ms", "reparam_ms", "reparam_speedup",
                         "cpu_reparam_speedup", "reparam_vs_loop", "cpu_reparam_vs_loop", "mac_ratio",
                         "cl_vs_reparam", "grouped_vs_reparam"], title=f"{NAME} summary")
    if profile:
        for name, ops in profile.items():
            C.print_table([{"op": o["op"], "share": o["share"], "ms/call": o["ms_per_call"],
                            "calls": o["calls"]} for o in ops], ["op", "share", "ms/call", "calls"],
                          title=f"profile {name} (K={ref_k}, B={args.batch})")
    if not summary["reached_1_5x"]:
        print(f"NOTE: reparam speedup {summary['reparam_speedup']:.3f} < 1.5 at K={ref_k}, B={args.batch}")
    payload = {
        "name": NAME,
        "question": "eval-mode inference: re-parameterized vs train-form block vs the authors' loop",
        "command": C.command_line(),
        "env": C.env_info(device),
        "config": {"channels": args.channels, "size": args.size, "dtype": args.dtype,
                   "device": str(device), "quick": args.quick, "repeats_max": repeats, "tolerance": tol,
                   "timing": "torch.inference_mode, interleaved rounds, median"},
        "rows": rows,
        "profile": profile,
        "summary": summary,
    }
    C.write_json(C.result_name(NAME, args), payload, args.out)
    return payload


if __name__ == "__main__":
    main()
