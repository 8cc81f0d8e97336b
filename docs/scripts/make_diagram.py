"""Draw the DAN architecture diagram used by docs/concepts.md.

Run from the repository root (needs matplotlib, part of the ``examples`` extra)::

    python docs/scripts/make_diagram.py            # writes docs/assets/architecture.svg
    python docs/scripts/make_diagram.py --png x.png # also a PNG preview

The output is deterministic (fixed SVG id salt, no date metadata), so re-running
the script on an unchanged file gives an unchanged diagram.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "assets" / "architecture.svg"

# colour per sub-network
BACKBONE = "#dbe9f6"
ATTENTION = "#fde7cf"
FUSION = "#dcf0dc"
LOSS = "#f8d7da"
EDGE = "#444444"


def box(ax, x, y, w, h, text, fill, size=9.5, weight="normal"):
    """A rounded box with centred text; (x, y) is the lower-left corner."""
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.12",
            fc=fill,
            ec=EDGE,
            lw=1.1,
        )
    )
    ax.text(
        x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight, linespacing=1.35
    )


def arrow(ax, start, end, label=None, offset=(0.0, 0.14), size=8.5, style="-|>", ls="-"):
    """An arrow from start to end, with an optional shape label above its middle."""
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=11,
            lw=1.1,
            color=EDGE,
            linestyle=ls,
            shrinkA=0,
            shrinkB=0,
        )
    )
    if label:
        mx = (start[0] + end[0]) / 2 + offset[0]
        my = (start[1] + end[1]) / 2 + offset[1]
        ax.text(mx, my, label, ha="center", va="bottom", fontsize=size, family="monospace", color="#222222")


def group(ax, x, y, w, h, title):
    """A dashed outline around one sub-network with its name on top."""
    ax.add_patch(Rectangle((x, y), w, h, fill=False, ls=(0, (4, 3)), lw=1.0, ec="#777777"))
    ax.text(x + 0.12, y + h - 0.12, title, ha="left", va="top", fontsize=10.5, weight="bold", color="#333333")


def draw():
    """Build the figure and return it."""
    fig, ax = plt.subplots(figsize=(13.0, 5.6))
    ax.set_xlim(0, 26)
    ax.set_ylim(0, 11.9)
    ax.axis("off")

    # input and backbone (FCN)
    box(ax, 0.2, 5.6, 2.2, 1.4, "image\n(B, 3, 224, 224)", "#eeeeee")
    group(ax, 3.0, 0.4, 4.6, 10.4, "FCN")
    box(ax, 3.4, 5.4, 3.8, 1.8, "backbone\n(ResNet-18 without\npool and fc)", BACKBONE)
    arrow(ax, (2.4, 6.3), (3.4, 6.3))
    box(ax, 3.4, 1.0, 3.8, 1.8, "AffinityLoss\ncentres (N, C)\n(GAP to (B, C) first)", LOSS)
    arrow(ax, (5.3, 5.4), (5.3, 2.8))
    ax.text(5.45, 4.1, "x (B, C, H, W)", ha="left", va="center", fontsize=8.5, family="monospace")

    # MAN: K heads, each spatial then channel attention
    group(ax, 8.6, 0.4, 7.4, 10.4, "MAN  (K heads)")
    split_x = 8.1
    arrow(ax, (7.2, 6.3), (split_x, 6.3), style="-")
    ax.text(7.65, 6.45, "x", ha="center", va="bottom", fontsize=8.5, family="monospace")
    rows = [8.4, 6.5, 4.6, 1.6]
    for k, y in enumerate(rows):
        name = "K" if k == 3 else str(k + 1)
        arrow(ax, (split_x, 6.3), (9.0, y + 0.6))
        box(ax, 9.0, y, 2.9, 1.2, f"SpatialAttention {name}\nmap (B, 1, H, W)", ATTENTION, size=8.5)
        arrow(ax, (11.9, y + 0.6), (12.7, y + 0.6))
        box(ax, 12.7, y, 2.9, 1.2, f"ChannelAttention {name}\ngate (B, C)", ATTENTION, size=8.5)
        arrow(ax, (15.6, y + 0.6), (16.5, 6.3))
    ax.text(10.45, 3.35, "...", ha="center", va="center", fontsize=16)
    ax.text(14.15, 3.35, "...", ha="center", va="center", fontsize=16)
    ax.text(
        12.3,
        0.75,
        "(B, C, H, W) per head after SA;  (B, C) after CA",
        ha="center",
        va="center",
        fontsize=8,
        family="monospace",
        color="#333333",
    )

    # AFN
    group(ax, 16.4, 0.4, 9.4, 10.4, "AFN")
    box(ax, 16.9, 5.6, 2.6, 1.4, "stack + log-softmax\nover heads (K > 1)", FUSION, size=8.5)
    ax.text(16.55, 7.15, "(B, K, C)", ha="left", va="bottom", fontsize=8.5, family="monospace")
    box(ax, 20.3, 5.6, 1.8, 1.4, "sum over\nheads", FUSION, size=8.5)
    arrow(ax, (19.5, 6.3), (20.3, 6.3))
    box(ax, 22.9, 5.6, 2.5, 1.4, "Linear C -> N\n+ BatchNorm1d", FUSION, size=8.5)
    arrow(ax, (22.1, 6.3), (22.9, 6.3), "(B, C)", offset=(0.0, 0.75))
    box(ax, 22.9, 8.6, 2.5, 1.2, "logits\n(B, N)", "#eeeeee", size=8.5)
    arrow(ax, (24.15, 7.0), (24.15, 8.6))
    box(ax, 22.9, 1.0, 2.5, 1.8, "cross-entropy\nwith labels", LOSS, size=8.5)
    arrow(ax, (24.15, 5.6), (24.15, 2.8), style="-|>", ls=(0, (3, 2)))
    ax.text(24.3, 4.2, "logits", ha="left", va="center", fontsize=8.5, family="monospace")
    box(ax, 16.9, 1.0, 2.6, 1.8, "PartitionLoss\n(batch statistic)", LOSS, size=8.5)
    arrow(ax, (18.2, 5.6), (18.2, 2.8), "scaled heads\n(B, K, C)", offset=(1.05, -0.5))

    ax.text(
        13.0,
        11.75,
        "total loss = cross-entropy + lambda1 * affinity + lambda2 * partition   (lambda1 = lambda2 = 1)",
        ha="center",
        va="top",
        fontsize=10,
        style="italic",
    )
    fig.tight_layout(pad=0.2)
    return fig


def main():
    """Parse arguments and write the diagram."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="SVG to write")
    parser.add_argument("--png", type=Path, default=None, help="optional PNG preview")
    args = parser.parse_args()
    plt.rcParams["svg.hashsalt"] = "dan-layers"
    plt.rcParams["svg.fonttype"] = "none"  # keep text as text: small file, searchable
    fig = draw()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, format="svg", metadata={"Date": None})
    if args.png is not None:
        fig.savefig(args.png, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
