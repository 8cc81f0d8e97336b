"""``explain.py``'s picture of one face: the crop, then one panel per head, each map over the face.

Two rows of ``K + 1`` panels. The first column holds the crop as the model saw it,
titled with the predicted class (top row) and the class explained (bottom row).
Then, per head, the top row shows its spatial attention map and the bottom row its
Grad-CAM++ map for the class explained, both upsampled to the crop and drawn over
it. Each map is scaled to its own maximum for display (the saved maps are not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_head_figure"]

_PANEL_INCHES = 1.9


def _scaled(heat: np.ndarray) -> np.ndarray:
    top = float(heat.max())
    return heat / top if top > 0 else np.zeros_like(heat)


def write_head_figure(
    path: Path,
    crop: np.ndarray,
    attention: np.ndarray,
    gradcam: np.ndarray,
    *,
    predicted: str,
    target_name: str,
) -> None:
    """Write the PNG of one face.

    Args:
        path: The ``.png`` to write.
        crop: ``(S, S, 3)`` ``uint8`` face, as the model saw it.
        attention: ``(K, S, S)`` attention maps at the crop's resolution.
        gradcam: ``(K, S, S)`` Grad-CAM++ maps at the crop's resolution.
        predicted: Title of the crop, e.g. ``"predicted: Happy 0.91"``.
        target_name: The class explained by the Grad-CAM++ maps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = attention.shape[0]
    fig, axes = plt.subplots(
        2, heads + 1, figsize=(_PANEL_INCHES * (heads + 1), _PANEL_INCHES * 2 + 0.7), squeeze=False
    )
    rows = (
        (attention, predicted, "attention"),
        (gradcam, f"explained: {target_name}", f"Grad-CAM++: {target_name}"),
    )
    for row, (maps, title, kind) in enumerate(rows):
        axes[row, 0].imshow(crop)
        axes[row, 0].set_title(title, fontsize=8)
        for k in range(heads):
            ax = axes[row, k + 1]
            ax.imshow(crop)
            ax.imshow(_scaled(maps[k]), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            ax.set_title(f"head {k + 1}\n{kind}", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout(pad=0.4)
    fig.savefig(path, dpi=100)
    plt.close(fig)
