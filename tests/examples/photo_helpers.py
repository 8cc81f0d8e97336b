"""Builders for the tests of predict.py and explain.py: photographs, videos and checkpoints.

* Photographs come from scikit-image's sample data (shipped inside the package, no
  download): ``astronaut()`` is a portrait with one frontal face (Haar box about
  95 px at x=177, y=66 of 512 x 512), ``coffee()`` a cup without a face.
  :func:`two_faces` puts the astronaut's face twice side by side. The pictures and
  the test video that the benchmark shares live in :mod:`photo_scenes`.
* :func:`write_video` writes a short MJPG ``.avi`` with OpenCV (the codec every
  OpenCV wheel can write and read).
* :func:`save_our_checkpoint` writes a checkpoint in the recipe's format
  (``best.pt``'s format: the model and what inference needs) without training;
  :func:`save_authors_checkpoint` writes one in the authors' layout
  (``{"iter", "model_state_dict"}`` with ``features.*``, ``cat_head{i}.*``).
  Both models get non-trivial BatchNorm statistics, so that their probabilities
  are not all 0 and 1.
* :func:`run_cli` runs a command in-process like its ``__main__`` does and returns
  the exit status, stdout and stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from dan_recipe import model as recipe_model  # noqa: E402
from dan_recipe import train, utils  # noqa: E402
from photo_scenes import ASTRONAUT_FACE, astronaut, write_video  # noqa: E402

CLASS_NAMES = ("calm", "joy", "gloom")
#: Flags every command test passes: the CPU, one thread, no progress bar.
QUIET_CPU = ["--device", "cpu", "--threads", "1", "--no-progress"]


def coffee() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.coffee())


def two_faces() -> np.ndarray:
    """The astronaut's head and its mirror image side by side: 300 x 600, two faces."""
    head = astronaut()[:300, 100:400]
    return np.ascontiguousarray(np.concatenate([head, head[:, ::-1]], axis=1))


def save_image(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


@torch.no_grad()
def _vary_batchnorm(net: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    # the fusion's BatchNorm1d sees logits of a fresh head: widen it so the softmax is not saturated
    fusion_bn = net.head.fusion.bn if isinstance(net, recipe_model.DAN) else net.model.head.fusion.bn
    fusion_bn.running_var.fill_(1e4)


def save_our_checkpoint(
    path: Path, *, num_heads: int = 2, image_size: int = 48, seed: int = 0, data: str = "imagefolder"
) -> Path:
    """A checkpoint in best.pt's format, 3 classes (:data:`CLASS_NAMES`), untrained, its data ``data``."""
    torch.manual_seed(seed)
    cfg = {"num_heads": num_heads, "affinity": "affinity", "partition": "paper", "lambda_af": 1.0,
           "lambda_pt": 1.0, "num_centers": None, "label_smoothing": 0.0}  # fmt: skip
    net = train.build_model_with_losses(cfg, len(CLASS_NAMES)).eval()
    _vary_batchnorm(net, seed)
    args = {**cfg, "image_size": image_size, "select_metric": "accuracy", "data": data}
    state = {
        "format": recipe_model.CHECKPOINT_FORMAT,
        "model": net.state_dict(),
        "epoch": 1,
        "args": args,
        "class_names": list(CLASS_NAMES),
        "num_classes": len(CLASS_NAMES),
        "preprocessing": {
            "image_size": image_size,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
    }
    utils.save_torch(state, path)
    return path


def save_authors_checkpoint(path: Path, *, num_classes: int = 7, num_heads: int = 2, seed: int = 1) -> Path:
    """A checkpoint in the authors' key layout (their files are trained at 224 px)."""
    torch.manual_seed(seed)
    net = recipe_model.DAN(num_classes=num_classes, num_heads=num_heads).eval()
    _vary_batchnorm(net, seed)
    torch.save({"iter": 21, "model_state_dict": recipe_model.to_official_state_dict(net)}, path)
    return path


def run_cli(
    main: Callable[[Sequence[str] | None], object], argv: Sequence[str], capsys
) -> tuple[int, str, str]:
    """``utils.run_command(main, argv)``: the status, and what it printed."""
    capsys.readouterr()
    status = utils.run_command(main, list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


__all__ = [
    "ASTRONAUT_FACE",
    "CLASS_NAMES",
    "QUIET_CPU",
    "astronaut",
    "coffee",
    "run_cli",
    "save_authors_checkpoint",
    "save_image",
    "save_our_checkpoint",
    "two_faces",
    "write_video",
]
