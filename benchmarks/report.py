"""Render the benchmark results (``results/*.json``) as Markdown tables and PNG plots.

    python benchmarks/report.py                       # benchmarks/results -> RESULTS.md, *.png
    python benchmarks/report.py --results /tmp/bench  # another results folder

Device/dtype variants (``heads_train-cuda-bfloat16.json`` ...) get their own sections.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ORDER = ["heads_train", "heads_inference", "affinity", "dan_throughput", "dan_memory", "predict"]


# ----------------------------------------------------------------------------- formatting


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) < 1e-3 or abs(v) >= 1e5:
            return f"{v:.2e}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:,.{max(digits - 2, 1)}f}"
    return str(v)


def ms(v: Any) -> str:
    return "-" if v is None else f"{v:,.1f}"


def ratio(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


def mib(v: Any) -> str:
    return "-" if v is None else f"{v / 2**20:,.1f}"


def sci(v: Any) -> str:
    return "-" if v is None else f"{v:.1e}"


Column = tuple[str, str, Callable[[Any], str]]


def md_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---:" for _ in columns) + "|"
    body = ["| " + " | ".join(f(r.get(k)) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def env_line(env: dict) -> str:
    parts = [f"{env.get('cpu', '?')}", f"{env.get('logical_cpus', '?')} logical CPUs",
             f"torch {env.get('torch', '?')}", f"{env.get('torch_threads', '?')} torch threads"]
    if env.get("gpu"):
        parts.insert(0, f"GPU {env['gpu']} (CUDA {env.get('cuda')})")
    if env.get("load_average"):
        parts.append(f"load average at start {env['load_average'][0]}")
    parts.append(env.get("date", ""))
    return ", ".join(p for p in parts if p)


# ----------------------------------------------------------------------------- sections


def sec_heads_train(d: dict) -> str:
    cols: list[Column] = [("heads", "K", _num), ("batch", "B", _num), ("loop_ms", "loop ms", ms),
                          ("ours_ms", "ours ms", ms), ("speedup", "speedup (wall)", ratio),
                          ("cpu_speedup", "speedup (CPU time)", ratio)]
    if any("cpu_path_gain" in r for r in d["rows"]):
        cols += [("grouped_ms", "grouped ms", ms), ("cpu_path_gain", "grouped / ours", ratio)]
    cols += [("rel_err_out", "rel. err out", sci), ("rel_err_input_grad", "rel. err grad", sci)]
    if any("rel_err_input_grad_f64" in r for r in d["rows"]):
        cols += [("rel_err_input_grad_f64", "rel. err grad (float64)", sci)]
    s = d.get("summary", {})
    note = (f"Minimum speedup {s.get('min_speedup', 0):.2f}x; ours never slower: "
            f"{_num(s.get('ours_never_slower'))}.")
    if any("cpu_path_gain" in r for r in d["rows"]):
        note += (" `grouped`: the same block with plain grouped convolutions (its CUDA path); "
                 "`grouped / ours` is what running each head's group as a dense convolution on CPU "
                 "buys. Every unit runs its submodules as modules (hooks fire, swapped norms are "
                 "computed as themselves, nothing depends on the batch size): the heads' tensors hold "
                 "all K heads, which costs cache locality against the loop's one-head tensors.")
    if any("rel_err_input_grad_f64" in r for r in d["rows"]):
        note += (" Errors are normwise relative differences between the two implementations. In "
                 "float32 an input gradient can differ by ~1e-3 when a pre-ReLU value lies within "
                 "rounding of zero and the ReLU opens in one implementation only; the float64 column "
                 "shows that they compute the same function.")
    return md_table(d["rows"], cols) + "\n\n" + note


def sec_heads_inference(d: dict) -> str:
    cols: list[Column] = [("heads", "K", _num), ("batch", "B", _num), ("loop_ms", "loop ms", ms),
                          ("train_form_ms", "train-form ms", ms), ("reparam_ms", "reparam ms", ms),
                          ("reparam_speedup", "reparam / train-form", ratio),
                          ("reparam_vs_loop", "reparam / loop", ratio), ("mac_ratio", "MAC ratio", ratio),
                          ("cl_vs_reparam", "reparam / channels_last", ratio),
                          ("grouped_vs_reparam", "grouped convs / reparam", ratio),
                          ("rel_err_reparam_vs_loop", "rel. err vs loop", sci)]
    s = d.get("summary", {})
    t = s.get("target_case", {})
    note = (f"Target case K={t.get('heads')}, B={t.get('batch')}: re-parameterized "
            f"{s.get('reparam_speedup', 0):.2f}x faster than the train-form block (goal 1.5x, MAC "
            f"ceiling {s.get('mac_ratio', 0):.2f}x), {s.get('reparam_vs_loop', 0):.2f}x faster than the "
            f"loop; largest relative difference of any output {s.get('max_rel_err', 0):.1e} "
            f"(tolerance {d['config'].get('tolerance')}). `reparam / channels_last` > 1: a "
            "channels_last input and weights would be faster; `grouped convs / reparam` > 1: the "
            "per-group dense convolutions are faster than one grouped convolution.")
    out = md_table(d["rows"], cols) + "\n\n" + note
    prof = d.get("profile")
    if prof:
        out += "\n\nProfile of the target case (share of operator self time, torch.profiler):\n\n"
        rows = []
        for variant, ops in prof.items():
            for o in ops[:4]:
                rows.append({"variant": variant, **o})
        out += md_table(rows, [("variant", "variant", str), ("op", "op", str),
                               ("share", "share", lambda v: f"{100 * v:.1f}%"),
                               ("ms_per_call", "ms per forward", ms), ("calls", "calls", _num)])
    return out


def sec_affinity(d: dict) -> str:
    cols: list[Column] = [("classes", "classes N", _num), ("ours_ms", "gathered ms", ms),
                          ("distmat_ms", "distmat ms", ms), ("speedup", "speedup", ratio),
                          ("ours_peak_bytes", "gathered peak MiB", mib),
                          ("distmat_peak_bytes", "distmat peak MiB", mib),
                          ("ours_rss_delta_bytes", "gathered RSS MiB", mib),
                          ("distmat_rss_delta_bytes", "distmat RSS MiB", mib)]
    err: list[Column] = [("classes", "classes N", _num),
                         ("ours_random_loss_err", "gathered, random", sci),
                         ("distmat_random_loss_err", "distmat, random", sci),
                         ("ours_trained_loss_err", "gathered, trained-like", sci),
                         ("distmat_trained_loss_err", "distmat, trained-like", sci),
                         ("ours_trained_grad_err", "gathered grad, trained-like", sci),
                         ("distmat_trained_grad_err", "distmat grad, trained-like", sci)]
    c = d["config"]
    return (f"Batch {c['batch']}, feature width {c['feat_dim']}, forward + backward.\n\n"
            + md_table(d["rows"], cols)
            + "\n\nfloat32 relative error against the same implementation in float64 "
              "(loss value; centre gradient normwise):\n\n" + md_table(d["rows"], err))


def sec_dan_throughput(d: dict) -> str:
    cols: list[Column] = [("size", "px", _num), ("mode", "mode", str), ("impl", "variant", str),
                          ("ms_per_batch", "ms / batch", ms),
                          ("images_per_s", "images/s", lambda v: f"{v:,.1f}"),
                          ("gmacs_per_image", "GMAC / image", lambda v: f"{v:.2f}"),
                          ("achieved_gflops", "GFLOP/s", lambda v: f"{v:,.1f}"),
                          ("fraction_of_matmul", "of matmul", lambda v: f"{100 * v:.0f}%"),
                          ("fraction_of_best", "of best kernel",
                           lambda v: "-" if v is None else f"{100 * v:.0f}%"),
                          ("speedup_vs_ours_eager", "vs ours eager", ratio),
                          ("compile_s", "compile s", lambda v: "-" if v is None else f"{v:.0f}")]
    mm = sorted({round(r["matmul_gflops"], 1) for r in d["rows"]})
    conv = sorted({round(r["conv3x3_gflops"], 1) for r in d["rows"] if r.get("conv3x3_gflops")})
    c = d["config"]
    return (f"Batch {c['batch']}; {c['flops']}. Matrix-product reference ({c['matmul_n']}^3) "
            f"measured in the same rounds: {', '.join(f'{v:,.1f}' for v in mm)} GFLOP/s"
            + (f"; 3x3 convolution reference (16 x 256 x 28 x 28): {', '.join(f'{v:,.1f}' for v in conv)} "
               "GFLOP/s ('of best kernel' is relative to the faster of the two)" if conv else "")
            + "."
            + ({True: " `compile s` was measured with a warm inductor cache (a cold compile takes much "
                      "longer).", False: " `compile s` is a cold compile (empty inductor cache)."}
               .get(c.get("inductor_cache_warm_at_start"), ""))
            + "\n\n"
            + md_table(d["rows"], cols))


def sec_dan_memory(d: dict) -> str:
    block = [r for r in d["rows"] if r.get("level") == "block"]
    dan = [r for r in d["rows"] if r.get("level") == "dan"]
    out = ""
    if block:
        out += (f"Attention heads alone, forward + backward, batch {d['config']['block_batch']} "
                "(allocator peak, MiB):\n\n")
        out += md_table(block, [("heads", "K", _num), ("loop_alloc_peak_bytes", "loop", mib),
                                ("ours_alloc_peak_bytes", "ours", mib),
                                ("ours_grouped_alloc_peak_bytes", "ours, grouped convs", mib),
                                ("loop_over_ours", "loop / ours", ratio)])
    if dan:
        out += ("\n\nWhole DAN training step (allocator peak of a step; RSS growth over the first step "
                "in a fresh process), MiB:\n\n")
        out += md_table(dan, [("size", "px", _num), ("batch", "B", _num),
                              ("ours_alloc_peak_bytes", "ours alloc", mib),
                              ("ref_alloc_peak_bytes", "authors' alloc", mib),
                              ("ref_over_ours_alloc", "authors' / ours", ratio),
                              ("ours_rss_delta_bytes", "ours RSS", mib),
                              ("ref_rss_delta_bytes", "authors' RSS", mib),
                              ("ref_over_ours_rss", "authors' / ours", ratio)])
    return out


def sec_predict(d: dict) -> str:
    parts = []
    c, env = d["config"], d["env"]
    scenes = d.get("scenes")
    if scenes:
        def shift(r: dict) -> str:
            if "box_shift_px" not in r:
                return "-"
            median = r.get("box_shift_median_px")
            return f"{r['box_shift_px']} px ({100 * r['box_shift_share']:.0f}%)" + (
                f", median {median:g} px" if median is not None else "")

        cols: list[Column] = [("scene", "input", str), ("path", "path", str), ("pictures", "pictures", _num),
                              ("real_faces", "faces found", _num), ("false_boxes", "false boxes", _num),
                              ("decode_ms", "decode", ms), ("detect_ms", "detect", ms),
                              ("classify_ms", "classify", ms), ("write_ms", "write", ms),
                              ("total_ms", "total ms / picture", ms), ("faces_per_s", "faces/s", _num),
                              ("detect_share", "detection share", lambda v: f"{100 * v:.0f}%"),
                              ("detect_speedup", "detect speedup", ratio),
                              ("end_to_end_speedup", "end-to-end speedup", ratio),
                              ("shift", "largest box shift vs today", str)]
        table = md_table([{**r, "shift": shift(r)} for r in scenes], cols)
        toolkits = d.get("summary", {}).get("toolkits_fps", {})
        load_end = env.get("load_average_end")
        parts.append(
            "End to end, the command's pipeline (decode, detect and crop, classify, write the records) with "
            "today's detection path (a faithful copy of the commands before issue 17: OpenCV's full scan, 5 "
            "neighbours, faces from 32 px) and the new one (octave scan from `--min-face auto`, 3 neighbours, "
            "video boxes confirmed by a neighbouring frame), interleaved round by round "
            f"({c.get('scene_rounds')} rounds per picture, {c.get('video_rounds')} of the video), on "
            f"{env.get('cpu', '?')} with 1 thread for torch and OpenCV (load average "
            f"{(env.get('load_average') or ['?'])[0]} at the start"
            + (f", {load_end[0]} at the end" if load_end else "") + ", other jobs on the 2 cores). Times "
            "are CPU milliseconds per picture (a video frame is a picture); faces/s counts the real faces "
            f"found; the authors' DAN at {c['image_size']} px (random weights), fast path, "
            f"{c.get('scene_batch', 16)} faces per batch. A false box is a box on no face; the box shift is "
            "the largest difference in x, y, w or h between today's box of a face and the new one (and its "
            "share of the face's side)."
            + (" For comparison, CPU figures published for the toolkits users run (as quoted in issue 17, not "
               "measured here): " + "; ".join(f"{k} {v:g} fps" for k, v in toolkits.items()) + "."
               if toolkits else "")
            + "\n\n" + table)
    quality = d.get("quality")
    if quality:
        q = quality["rows"]
        faces = q[0]["faces"]
        empty = quality["photos_without_face"]
        cols = [("detector", "detector", str), ("found", f"faces found (of {faces})", _num),
                ("false_on_faces", "false boxes on them", _num),
                ("boxes_without_face", f"boxes on {empty} photos without a face", _num),
                ("video_false_frames", f"video frames with a false box (of {quality['video_frames']})", _num),
                ("video_missed_frames", "video frames without the face", _num),
                ("video_false_frames_confirmed", "same, neighbouring-frame rule", _num),
                ("video_missed_frames_confirmed", "frames without the face, rule", _num)]
        parts.append(
            "Detection quality at each `--min-neighbors`: the astronaut and Grace Hopper shrunk so that the "
            "face is 32 to 222 px, and the 1920 x 1080 picture (faces); scikit-image's sample photos without a "
            "face; the 60 frames of the test video (a false box is a box beside her face; the rule keeps a box "
            "only if the frame before or after has one at the same place).\n\n" + md_table(q, cols))
    if d.get("rows"):
        cols = [("batch", "batch", _num), ("variant", "model", str),
                ("decode_ms_per_face", "decode ms / face", lambda v: f"{v:.1f}"),
                ("detect_ms_per_face", "detect ms / face", lambda v: f"{v:.1f}"),
                ("classify_ms_per_face", "classify ms / face", lambda v: f"{v:.1f}"),
                ("faces_per_s", "faces/s end to end", lambda v: f"{v:.1f}"),
                ("faces_per_s_wall", "faces/s (wall clock)", lambda v: "-" if v is None else f"{v:.1f}"),
                ("classify_faces_per_s", "faces/s classify only", lambda v: f"{v:.1f}"),
                ("classify_share", "classify share", lambda v: f"{100 * v:.0f}%"),
                ("fast_speedup", "fast / plain (classify)", ratio)]
        parity = d.get("summary", {}).get("logits_rel_err_fast_vs_plain")
        parts.append(
            f"Classification alone, per batch size: a {c['picture_size']} x {c['picture_size']} JPEG portrait "
            f"with {c['faces_per_picture']} face (decode and detect of the new path), the authors' DAN at "
            f"{c['image_size']} px. `fast` is predict.py's default (re-parameterized attention, "
            "channels-last), `plain` is `--no-fast`. OpenCV ran "
            f"{env.get('opencv_threads', '?')} thread(s) (OpenCV {env.get('opencv', '?')})."
            + ("" if parity is None else f" Logits of fast vs plain: relative difference {parity:.1e}.")
            + (" Detection at `--scale-factor 1.3` (the authors' video demo): "
               f"{d['summary']['detect_ms_per_picture_scale_factor_1_3']:.1f} ms per picture"
               + (f" against {d['summary']['detect_ms_per_picture_scale_factor_1_1']:.1f} at 1.1 (interleaved)"
                  if "detect_ms_per_picture_scale_factor_1_1" in d["summary"] else "") + "."
               if "detect_ms_per_picture_scale_factor_1_3" in d.get("summary", {}) else "")
            + "\n\n" + md_table(d["rows"], cols))
    return "\n\n".join(parts)


SECTIONS = {
    "heads_train": ("Q1. Attention heads, training step (forward + backward)", sec_heads_train),
    "heads_inference": ("Q2. Attention heads, inference: re-parameterization", sec_heads_inference),
    "affinity": ("Q3. AffinityLoss: gathered distances vs the B x N distance matrix", sec_affinity),
    "dan_throughput": ("Q4. Whole DAN throughput", sec_dan_throughput),
    "dan_memory": ("Q5. Memory of a training step", sec_dan_memory),
    "predict": ("Q6. DAN on photos and videos: faces/s end to end, today's detection against the octave scan",
                sec_predict),
}


# ----------------------------------------------------------------------------- plots


def plot_all(results: dict[str, dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    for key, d in results.items():
        base, suffix = (key.split("-", 1) + [""])[:2]
        tag = f"-{suffix}" if suffix else ""
        rows = d["rows"]
        if base == "heads_train":
            fig, ax = plt.subplots(figsize=(5.5, 3.6))
            for b in sorted({r["batch"] for r in rows}):
                rs = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["heads"])
                ks = [r["heads"] for r in rs]
                ax.plot(ks, [r["speedup"] for r in rs], "o-", label=f"ours, B={b}")
                if "cpu_path_gain" in rs[0]:
                    ax.plot(ks, [r["loop_ms"] / r["grouped_ms"] for r in rs], "s--",
                            label=f"grouped convs, B={b}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("heads K")
            ax.set_ylabel("speedup over the per-head loop")
            ax.set_title("Training step (fwd+bwd) of the attention heads")
            ax.legend(fontsize=8)
            save(fig, f"heads_train{tag}.png")
        elif base == "heads_inference":
            b0 = d.get("summary", {}).get("target_case", {}).get("batch", rows[0]["batch"])
            rs = sorted((r for r in rows if r["batch"] == b0), key=lambda r: r["heads"])
            ks = [r["heads"] for r in rs]
            fig, ax = plt.subplots(figsize=(5.5, 3.6))
            ax.plot(ks, [r["reparam_speedup"] for r in rs], "o-", label="re-parameterized / train-form")
            ax.plot(ks, [r["reparam_vs_loop"] for r in rs], "s-", label="re-parameterized / loop")
            ax.plot(ks, [r["train_form_vs_loop"] for r in rs], "^-", label="train-form / loop")
            ax.axhline(rs[0]["mac_ratio"], color="gray", ls=":", label="MAC ratio")
            ax.axhline(1.5, color="red", lw=0.8, ls="--", label="goal 1.5x")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("heads K")
            ax.set_ylabel("speedup")
            ax.set_title(f"Eval-mode inference of the attention heads, B={b0}")
            ax.set_ylim(bottom=min(0.8, min(r["train_form_vs_loop"] for r in rs) - 0.1))
            ax.legend(fontsize=8, loc="center right", bbox_to_anchor=(1.0, 0.35))
            save(fig, f"heads_inference{tag}.png")
        elif base == "affinity":
            ns = [r["classes"] for r in rows]
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
            a1.loglog(ns, [r["ours_ms"] for r in rows], "o-", label="gathered (ours)")
            a1.loglog(ns, [r["distmat_ms"] for r in rows], "s-", label="B x N distance matrix")
            a1.set_xlabel("classes N")
            a1.set_ylabel("forward + backward, ms")
            a1.legend(fontsize=8)
            a2.loglog(ns, [r["ours_peak_bytes"] / 2**20 for r in rows], "o-", label="gathered (ours)")
            a2.loglog(ns, [r["distmat_peak_bytes"] / 2**20 for r in rows], "s-", label="B x N distance matrix")
            a2.set_xlabel("classes N")
            a2.set_ylabel("allocator peak, MiB")
            a2.legend(fontsize=8)
            fig.suptitle(f"AffinityLoss, batch {d['config']['batch']}, feature width {d['config']['feat_dim']}")
            save(fig, f"affinity{tag}.png")
        elif base == "dan_throughput":
            groups = sorted({(r["mode"], r["size"]) for r in rows})
            impls = list(dict.fromkeys(r["impl"] for r in rows))
            fig, ax = plt.subplots(figsize=(8, 3.8))
            width = 0.8 / len(impls)
            for i, impl in enumerate(impls):
                vals = [next((r["images_per_s"] for r in rows if (r["mode"], r["size"]) == g
                              and r["impl"] == impl), 0) for g in groups]
                ax.bar([j + i * width for j in range(len(groups))], vals, width, label=impl)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
            ax.set_xticklabels([f"{m} {s}px" for m, s in groups])
            ax.set_ylabel("images / s")
            ax.set_title(f"Whole DAN, batch {d['config']['batch']}")
            ax.legend(fontsize=7)
            save(fig, f"dan_throughput{tag}.png")
        elif base == "dan_memory":
            dan = [r for r in rows if r.get("level") == "dan"]
            block = [r for r in rows if r.get("level") == "block"]
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
            if block:
                paired_bars(axes[0], [f"K={r['heads']}" for r in block],
                            ("per-head loop", [r["loop_alloc_peak_bytes"] / 2**20 for r in block]),
                            ("dan-layers", [r["ours_alloc_peak_bytes"] / 2**20 for r in block]))
                axes[0].set_ylabel("allocator peak, MiB")
                axes[0].set_title(f"Attention heads fwd+bwd, B={d['config']['block_batch']}")
            if dan:
                paired_bars(axes[1], [f"{r['size']}px" for r in dan],
                            ("authors' structure", [r["ref_alloc_peak_bytes"] / 2**20 for r in dan]),
                            ("dan-layers", [r["ours_alloc_peak_bytes"] / 2**20 for r in dan]))
                axes[1].set_ylabel("allocator peak of a step, MiB")
                axes[1].set_title(f"DAN training step, B={d['config']['batch']}")
            save(fig, f"dan_memory{tag}.png")
        elif base == "predict":
            save(plot_predict(plt, d), f"predict{tag}.png")
    return written


def plot_predict(plt: Any, d: dict) -> Any:
    """Milliseconds per picture, stacked decode / detect / classify / write, today's path and the new one."""
    rows = d.get("scenes") or []
    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = [f"{r['scene']}, {r['path']}" for r in rows]
    left = [0.0] * len(rows)
    for stage in ("decode", "detect", "classify", "write"):
        values = [r[f"{stage}_ms"] for r in rows]
        ax.barh(labels, values, left=left, label=stage)
        left = [a + b for a, b in zip(left, values, strict=True)]
    for y, (total, r) in enumerate(zip(left, rows, strict=True)):
        ax.text(total, y, f" {r['faces_per_s']:.1f} faces/s", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("CPU ms per picture (log scale)")
    ax.set_xlim(right=max(left or [1]) * 4)
    ax.set_title("predict.py end to end: today's detection vs the octave scan")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4)
    return fig


def paired_bars(ax: Any, labels: Sequence[str], left: tuple[str, Sequence[float]],
                right: tuple[str, Sequence[float]]) -> None:
    """Two bars per label (baseline left, dan-layers right), with a legend."""
    x = range(len(labels))
    for offset, (name, values) in ((-0.2, left), (0.2, right)):
        ax.bar([i + offset for i in x], values, 0.4, label=name)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels)
    ax.legend(fontsize=8)


# ----------------------------------------------------------------------------- main


def load_results(folder: Path) -> dict[str, dict]:
    found = {}
    for base in ORDER:
        for path in sorted(folder.glob(f"{base}*.json")):
            stem = path.stem
            if stem != base and not stem.startswith(base + "-"):
                continue
            found[stem] = json.loads(path.read_text())
    return found


def render(results: dict[str, dict], folder: Path, images: Sequence[Path]) -> str:
    lines = ["# dan-layers benchmark results", ""]
    run_all = folder / "run_all.json"
    if run_all.exists():
        rec = json.loads(run_all.read_text())
        lines.append(f"Full suite run by `benchmarks/run_all.py` in {rec.get('total_seconds', 0):.0f} s"
                     + (" (--quick)" if rec.get("quick") else "") + ".")
        lines.append("")
    lines.append("Machines (each question was run on its own date, on the host and at the load it records):")
    lines.append("")
    for key, d in results.items():
        question = SECTIONS[key.split("-", 1)[0]][0].split(".", 1)[0]
        lines.append(f"- {question} ({key}): {env_line(d['env'])}")
    lines.append("")
    lines.append("Timing: the implementations being compared run in one process, interleaved (one call "
                 "of each per round, order rotated), after a warm-up round; the tables give medians and "
                 "ratios of medians. Speedups > 1 favour dan-layers.")
    for key, d in results.items():
        base, suffix = (key.split("-", 1) + [""])[:2]
        title, fn = SECTIONS[base]
        lines += ["", f"## {title}" + (f" ({suffix})" if suffix else ""), ""]
        lines.append(f"{d.get('question', '')}. Reproduce: `{_repro(d)}`.")
        if d["config"].get("quick"):
            lines.append("")
            lines.append("**Quick (smoke-test) run: sizes and repeats are tiny; numbers are not meaningful.**")
        lines += ["", fn(d)]
        img = folder / f"{key}.png"
        if img in images:
            lines += ["", f"![{key}]({img.name})"]
    return "\n".join(lines) + "\n"


def _repro(d: dict) -> str:
    cmd = d.get("command", "")
    parts = cmd.split()
    # show the script path relative to the repository, drop the --out folder
    out, skip = [], False
    for tok in parts:
        if skip:
            skip = False
            continue
        if tok == "--out":
            skip = True
            continue
        if tok.endswith(".py") and "benchmarks" in tok:
            tok = "benchmarks/" + Path(tok).name
        out.append(tok)
    return " ".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--md", type=Path, default=None, help="default <results>/RESULTS.md")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--docs", type=Path, default=None,
                   help="also publish into this mkdocs page, between its <!-- bench:results --> markers; "
                        "plots are copied to assets/bench/ beside it")
    args = p.parse_args(argv)
    results = load_results(args.results)
    if not results:
        print(f"no results in {args.results}")
        return 1
    images = [] if args.no_plots else plot_all(results, args.results)
    md = args.md or args.results / "RESULTS.md"
    md.write_text(render(results, args.results, images))
    print(f"wrote {md}" + (f" and {len(images)} plots" if images else ""))
    if args.docs:
        publish(md.read_text(), images, args.docs)
        print(f"published into {args.docs}")
    return 0


BEGIN, END = "<!-- bench:results -->", "<!-- /bench:results -->"


def publish(markdown: str, images: Sequence[Path], page: Path) -> None:
    """Replace the text between the page's result markers; copy the plots next to it."""
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{page}: expected the markers {BEGIN} and {END}")
    assets = page.parent / "assets" / "bench"
    assets.mkdir(parents=True, exist_ok=True)
    body = markdown.split("\n", 1)[1]  # drop the page title of RESULTS.md
    body = body.replace("\n## ", "\n### ")
    for image in images:
        shutil.copy2(image, assets / image.name)
        body = body.replace(f"]({image.name})", f"](assets/bench/{image.name})")
    head, rest = text.split(BEGIN, 1)
    page.write_text(head + BEGIN + "\n" + body.strip() + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    raise SystemExit(main())
