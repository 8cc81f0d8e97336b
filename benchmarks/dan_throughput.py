"""Q4: the whole DAN (examples/dan_recipe/model.py): training and inference images/s, achieved FLOP/s.

For each input size (112 and 224 px, batch 16), timed interleaved in one process:

* train: one optimisation step (forward, cross-entropy + affinity + partition loss,
  backward, SGD with momentum) of ``examples/dan_recipe/model.py``'s DAN eager, the same under
  ``torch.compile`` (inductor; at ``--compile-sizes``, default 224 px), and the
  authors' structure (``RefDAN``: per-head loop,
  distance-matrix affinity loss) eager;
* infer: eval mode under ``torch.inference_mode``: DAN train-form eager,
  re-parameterized eager, re-parameterized + channels_last eager, re-parameterized
  compiled, and ``RefDAN`` eager.

A large matrix product (``--matmul``, default 2048^3, float32) runs in the same
rounds; its FLOP/s is the machine's practical limit. A ResNet-like 3x3 convolution
(16 x 256 x 28 x 28) runs too: on this CPU oneDNN's convolution kernels beat MKL's
matrix product, so ``fraction_of_best`` is relative to the faster of the two. Achieved FLOP/s =
2 x MACs x images/s for inference and 3 x that for training (backward ~ 2 x forward),
MACs from the hook-based counter ``dan_recipe.model.count_macs`` (convolutions and linear layers).

    python benchmarks/dan_throughput.py
    python benchmarks/dan_throughput.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import time

import _common as C
import torch
import torch.nn.functional as F
from reference_dan import RefDAN, load_examples_dan, ref_affinity_loss, ref_partition_loss
from torch import nn

import dan_layers

NAME = "dan_throughput"


class OursLoss(nn.Module):
    """DAN + its three losses in one module (what gets compiled)."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.affinity = dan_layers.AffinityLoss(num_classes, 512)
        self.partition = dan_layers.PartitionLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, fmap, heads = self.model(x)
        return F.cross_entropy(logits.float(), y) + self.affinity(fmap, y) + self.partition(heads)


class RefLoss(nn.Module):
    """The authors' structure and loss formulas."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.centers = nn.Parameter(torch.randn(num_classes, 512))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, fmap, heads = self.model(x)
        return (F.cross_entropy(logits.float(), y) + ref_affinity_loss(fmap.float(), y, self.centers)
                + ref_partition_loss(heads.float()))


def make_train_step(module: nn.Module, x, y, device, dtype, compiled=None):
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    fwd = module if compiled is None else compiled

    def step():
        opt.zero_grad(set_to_none=True)
        with C.autocast(device, dtype):
            loss = fwd(x, y)
        loss.backward()
        opt.step()
        return loss

    return step


def make_infer(model: nn.Module, x, device, dtype):
    def run():
        with torch.inference_mode(), C.autocast(device, dtype):
            return model(x)

    return run


def conv_fn(device, dtype):
    """A ResNet-like 3x3 convolution (16 x 256 x 28 x 28), the best case of the conv kernels."""
    x = torch.randn(16, 256, 28, 28, device=device, dtype=dtype)
    w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype)
    return lambda: F.conv2d(x, w, padding=1)


CONV_FLOP = 2 * 16 * 28 * 28 * 256 * 256 * 9


def matmul_fn(n: int, device, dtype):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return lambda: torch.mm(a, b)


def main(argv: list[str] | None = None) -> dict:
    p = C.make_parser(__doc__.splitlines()[0], device_flags=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch.compile (inductor; --quick uses the 'eager' backend)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor)")
    p.add_argument("--compile-sizes", type=int, nargs="*", default=[224],
                   help="input sizes at which compile is timed (default: 224; inductor compiles "
                        "take minutes on 2 cores)")
    p.add_argument("--compile-modes", nargs="*", default=None, choices=["train", "infer"],
                   help="modes in which compile is timed (default: both; --quick: infer)")
    p.add_argument("--no-ref", action="store_true", help="skip the authors' structure")
    p.add_argument("--matmul", type=int, default=2048, help="size of the reference matrix product")
    p.add_argument("--budget", type=float, default=15.0)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.matmul = [32], 2, 256
        args.compile_sizes = [32]
        args.backend = args.backend or "eager"
        args.compile_modes = args.compile_modes or ["infer"]
    backend = args.backend or "inductor"
    device = C.setup(args)
    cache_warm = _inductor_cache_warm()
    dtype = C.dtype_of(args)
    repeats = args.repeats or (2 if args.quick else 10)
    dan = load_examples_dan()
    num_classes = 7
    mm_dtype = dtype if device.type == "cuda" else torch.float32

    rows = []
    for size in args.sizes:
        torch.manual_seed(0)
        x = torch.randn(args.batch, 3, size, size, device=device)
        y = torch.randint(0, num_classes, (args.batch,), device=device)
        base = dan.DAN(num_classes=num_classes, num_heads=4).to(device)
        C.randomize_batchnorm(base)
        macs = dan.count_macs(base, x)
        for mode in args.modes:
            use_compile = (args.compile and (args.compile_sizes is None or size in args.compile_sizes)
                           and (args.compile_modes is None or mode in args.compile_modes))
            fns = {}
            macs_of = {}
            compile_s = None
            if mode == "train":
                ours = OursLoss(copy.deepcopy(base), num_classes).to(device).train()
                fns["ours_eager"] = make_train_step(ours, x, y, device, dtype)
                macs_of["ours_eager"] = macs
                if use_compile:
                    ours_c = OursLoss(copy.deepcopy(base), num_classes).to(device).train()
                    compiled = torch.compile(ours_c, backend=backend)
                    fns["ours_compiled"] = make_train_step(ours_c, x, y, device, dtype, compiled)
                    t0 = time.perf_counter()
                    fns["ours_compiled"]()
                    fns["ours_compiled"]()
                    C.sync(device)
                    compile_s = time.perf_counter() - t0
                    macs_of["ours_compiled"] = macs
                if not args.no_ref:
                    ref = RefLoss(RefDAN(num_classes, 4), num_classes).to(device).train()
                    fns["ref_eager"] = make_train_step(ref, x, y, device, dtype)
                    macs_of["ref_eager"] = macs
            else:
                train_form = copy.deepcopy(base).eval()
                reparam = dan_layers.reparameterize_model(copy.deepcopy(base).eval())
                macs_rep = dan.count_macs(reparam, x)
                reparam_cl = copy.deepcopy(reparam).to(memory_format=torch.channels_last)
                x_cl = x.contiguous(memory_format=torch.channels_last)
                fns["ours_eager"] = make_infer(train_form, x, device, dtype)
                fns["ours_reparam"] = make_infer(reparam, x, device, dtype)
                fns["ours_reparam_cl"] = make_infer(reparam_cl, x_cl, device, dtype)
                macs_of.update(ours_eager=macs, ours_reparam=macs_rep, ours_reparam_cl=macs_rep)
                if use_compile:
                    compiled = torch.compile(copy.deepcopy(reparam), backend=backend)
                    fns["ours_reparam_compiled"] = make_infer(compiled, x, device, dtype)
                    t0 = time.perf_counter()
                    fns["ours_reparam_compiled"]()
                    C.sync(device)
                    compile_s = time.perf_counter() - t0
                    macs_of["ours_reparam_compiled"] = macs_rep
                if not args.no_ref:
                    ref = RefDAN(num_classes, 4).to(device)
                    ref.load_state_dict(_ref_state_from(base), strict=True)
                    ref.eval()
                    fns["ref_eager"] = make_infer(ref, x, device, dtype)
                    macs_of["ref_eager"] = macs
                    with torch.inference_mode():
                        parity = C.rel_err(fns["ours_reparam"]()[0].float(), fns["ref_eager"]()[0].float())
            fns["matmul"] = matmul_fn(args.matmul, device, mm_dtype)
            fns["conv3x3"] = conv_fn(device, mm_dtype)
            for name, fn in fns.items():  # one warm-up call each (compiled ones are warm already)
                if "compiled" not in name:
                    fn()
            t = C.time_interleaved(fns, repeats=repeats, warmup=0, device=device,
                                   budget_s=None if args.quick else args.budget,
                                   min_repeats=2 if args.quick else 3)
            mm_flops = 2 * args.matmul ** 3 / t["matmul"]["median_s"]
            conv_flops = CONV_FLOP / t["conv3x3"]["median_s"]
            factor = 3 if mode == "train" else 1
            for impl in fns:
                if impl in ("matmul", "conv3x3"):
                    continue
                ips = args.batch / t[impl]["median_s"]
                achieved = factor * 2 * macs_of[impl] * ips
                rows.append({
                    "size": size, "mode": mode, "impl": impl, "batch": args.batch,
                    "ms_per_batch": 1e3 * t[impl]["median_s"],
                    "images_per_s": ips,
                    "gmacs_per_image": macs_of[impl] / 1e9,
                    "achieved_gflops": achieved / 1e9,
                    "matmul_gflops": mm_flops / 1e9,
                    "fraction_of_matmul": achieved / mm_flops,
                    "conv3x3_gflops": conv_flops / 1e9,
                    "fraction_of_best": achieved / max(mm_flops, conv_flops),
                    "speedup_vs_ours_eager": t["ours_eager"]["median_s"] / t[impl]["median_s"],
                    "compile_s": compile_s if "compiled" in impl else None,
                    "rounds": t[impl]["n"],
                    **({"logits_rel_err_reparam_vs_ref": parity}
                       if mode == "infer" and impl == "ref_eager" else {}),
                })
            C.print_table([r for r in rows if r["size"] == size and r["mode"] == mode],
                          ["size", "mode", "impl", "ms_per_batch", "images_per_s", "achieved_gflops",
                           "fraction_of_matmul", "fraction_of_best", "speedup_vs_ours_eager", "compile_s"],
                          title=f"{NAME}: {mode} at {size}px, batch {args.batch}, {device} {args.dtype} "
                                f"(matmul {mm_flops / 1e9:.1f}, conv3x3 {conv_flops / 1e9:.1f} GFLOP/s)")

    payload = {
        "name": NAME,
        "question": "whole DAN: training and inference images/s, FLOP/s vs a large matmul, eager vs compile",
        "command": C.command_line(),
        "env": C.env_info(device),
        "config": {"batch": args.batch, "dtype": args.dtype, "device": str(device), "quick": args.quick,
                   "compile_backend": backend if args.compile else None, "matmul_n": args.matmul,
                   "inductor_cache_warm_at_start": cache_warm,
                   "compile_s": "wall time of the first two calls (train) / first call (infer), "
                                "i.e. compilation; much shorter when the inductor cache is warm",
                   "repeats_max": repeats,
                   "flops": "inference 2*MACs*images/s; training 3*2*MACs*images/s; "
                            "MACs by dan_recipe.model.count_macs",
                   "timing": "interleaved rounds (incl. the matmul), median"},
        "rows": rows,
    }
    C.write_json(C.result_name(NAME, args), payload, args.out)
    return payload


def _inductor_cache_warm() -> bool | None:
    """Whether inductor's on-disk cache already holds entries (compile times are then short)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        path = cache_dir()
    except Exception:  # noqa: BLE001 - private API, best effort
        return None
    import os

    return os.path.isdir(path) and any(os.scandir(path))


def _ref_state_from(model: nn.Module) -> dict:
    """``RefDAN`` state dict holding ``model``'s weights (via the authors' key layout)."""
    from dan_recipe.model import to_official_state_dict  # noqa: PLC0415 - examples/ is on sys.path

    official = to_official_state_dict(model)
    out = {}
    for k, v in official.items():
        if k.startswith("features."):
            _, idx, rest = k.split(".", 2)
            top = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}[int(idx)]
            out[f"features.{top}.{rest}"] = v
        elif k.startswith("cat_head"):
            out[f"heads.{k}"] = v
        else:
            out[k] = v
    return out


if __name__ == "__main__":
    main()
