"""The DAN training recipe: the machinery behind ``examples/train_dan.py``, one concern per module.

Importable with ``examples/`` on ``sys.path`` (``train_dan.py`` and the tests put it
there); importing the package imports none of its modules.

Configuration and commands
    ``config`` (presets, flags, resolved configuration), ``errors`` (one-line user
    errors), ``runner`` (a run's entry point), ``session`` (the ``--out`` guard and
    process setup), ``runtime`` (threads, device, seeds, autocast), ``distributed``.
Data
    ``data`` (RAF-DB, AffectNet and class-folder readers), ``synthetic_faces`` and
    ``face_drawing`` (faces without files), ``transforms`` and ``augment`` (torch-only
    image transforms and the recipe's presets), ``samplers``, ``loaders`` (the
    splits, class list and loaders of a run).
Model and training
    ``model`` (the reference ``DAN``, ``ResNet18Features``, ``count_macs``,
    ``DANWithLosses``), ``optim`` (optimizer, schedule), ``engine``
    (``train_one_epoch``, ``evaluate``), ``training`` (a training run),
    ``evaluation`` (``--eval-only``), ``reporting`` (metrics, log lines, figures).
Weight files
    ``checkpoints`` (our format, atomic writes, RNG state, and ``load_model`` for
    ours and the authors' checkpoints), ``weights`` (safe loading, torchvision
    backbones, the authors' key layout).

For inference::

    from dan_recipe.checkpoints import load_model
    from dan_recipe.transforms import eval_transform

    model, info = load_model("runs/demo/best.pt")
    preprocess = eval_transform(info.image_size, info.mean, info.std)
"""

__all__: list[str] = []
