"""Q5: peak memory of a DAN training step, ours vs the authors' structure.

Two levels:

* ``block`` rows: one forward + backward of the attention heads alone (train mode,
  512 x 7 x 7 input requiring grad), ``MultiHeadAttentionBlock`` vs the per-head
  loop vs the block forced onto its grouped convolutions (``_common.grouped_copy``,
  what it runs on CUDA), measured in this process with the
  profiler's allocator peak (``_common.profiled_peak_bytes``);
* ``dan`` rows: one full training step (forward, the three losses, backward, SGD with
  momentum) of ``examples/dan_recipe/model.py``'s DAN vs ``RefDAN`` (same trunk, per-head loop,
  distance-matrix affinity loss), each in a fresh subprocess: the growth of peak RSS
  (``/proc/self/status`` VmHWM, reset just before) over the first step, which includes gradients, momentum
  buffers, activations and oneDNN scratch, and the allocator peak of a second step
  (activations + gradients + temporaries).

    python benchmarks/dan_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import _common as C
import torch
from reference_dan import RefMultiHead, block_from_reference

NAME = "dan_memory"


def child(impl: str, size: int, batch: int) -> None:
    """Fresh process: memory of one DAN training step; prints a JSON line."""
    from dan_throughput import OursLoss, RefLoss, make_train_step
    from reference_dan import RefDAN, load_examples_dan

    torch.manual_seed(0)
    if impl == "ours":
        module = OursLoss(load_examples_dan().DAN(7, 4), 7).train()
    else:
        module = RefLoss(RefDAN(7, 4), 7).train()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 7, (batch,))
    step = make_train_step(module, x, y, torch.device("cpu"), torch.float32)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    growth = C.peak_rss_growth(step)
    peak2 = C.profiled_peak_bytes(step)
    print(json.dumps({"rss_delta_first_step": growth, "alloc_peak_step": peak2,
                      "param_bytes": param_bytes}))


def run_child(impl: str, size: int, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(size), str(batch)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=C.child_env())
    if res.returncode != 0:
        raise RuntimeError(f"child {impl} {size} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def block_rows(heads: list[int], batch: int, channels: int, size: int) -> list[dict]:
    rows = []
    for k in heads:
        torch.manual_seed(0)
        loop = RefMultiHead(channels, k).train()
        ours = block_from_reference(loop).train()
        x = torch.randn(batch, channels, size, size)

        def step(model, x=x):
            def run():
                model.zero_grad(set_to_none=True)
                xx = x.detach().requires_grad_()
                model(xx).sum().backward()

            return run

        fns = {"loop": step(loop), "ours": step(ours),
               "ours_grouped": step(C.grouped_copy(ours))}
        row = {"level": "block", "heads": k, "batch": batch}
        for name, fn in fns.items():
            fn()  # warm-up: first-call allocations are not part of a step
            row[f"{name}_alloc_peak_bytes"] = C.profiled_peak_bytes(fn)
        row["loop_over_ours"] = row["loop_alloc_peak_bytes"] / row["ours_alloc_peak_bytes"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1], int(argv[2]), int(argv[3]))
        return {}
    p = C.make_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block-heads", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--block-batch", type=int, default=64)
    args = p.parse_args(argv)
    channels, fsize = 512, 7
    if args.quick:
        args.sizes, args.batch, args.block_heads, args.block_batch = [32], 2, [2], 4
        channels = 64
    device = C.setup(args)

    rows = block_rows(args.block_heads, args.block_batch, channels, fsize)
    C.print_table(rows, ["heads", "batch", "loop_alloc_peak_bytes", "ours_alloc_peak_bytes",
                         "ours_grouped_alloc_peak_bytes", "loop_over_ours"],
                  title=f"{NAME}: attention heads fwd+bwd, {channels}x{fsize}x{fsize} (allocator peak, bytes)")
    dan_rows = []
    for size in args.sizes:
        res = {impl: run_child(impl, size, args.batch) for impl in ("ours", "ref")}
        dan_rows.append({
            "level": "dan", "size": size, "batch": args.batch,
            "ours_rss_delta_bytes": res["ours"]["rss_delta_first_step"],
            "ref_rss_delta_bytes": res["ref"]["rss_delta_first_step"],
            "ours_alloc_peak_bytes": res["ours"]["alloc_peak_step"],
            "ref_alloc_peak_bytes": res["ref"]["alloc_peak_step"],
            "param_bytes": res["ours"]["param_bytes"],
            "ref_over_ours_alloc": res["ref"]["alloc_peak_step"] / res["ours"]["alloc_peak_step"],
            "ref_over_ours_rss": (res["ref"]["rss_delta_first_step"]
                                  / max(res["ours"]["rss_delta_first_step"], 1)),
        })
    C.print_table(dan_rows, ["size", "batch", "ours_alloc_peak_bytes", "ref_alloc_peak_bytes",
                             "ref_over_ours_alloc", "ours_rss_delta_bytes", "ref_rss_delta_bytes",
                             "ref_over_ours_rss"], title=f"{NAME}: DAN training step (bytes)")
    payload = {
        "name": NAME,
        "question": "peak memory of a DAN training step, ours vs the authors' structure",
        "command": C.command_line(),
        "env": C.env_info(device),
        "config": {"batch": args.batch, "block_batch": args.block_batch, "channels": channels,
                   "quick": args.quick,
                   "memory": "alloc_peak: torch.profiler allocator peak of one step (activations, "
                             "gradients, temporaries); rss_delta: peak-RSS (VmHWM) growth over the "
                             "first step in a fresh subprocess"},
        "rows": rows + dan_rows,
    }
    C.write_json(NAME, payload, args.out)
    return payload


if __name__ == "__main__":
    main()
