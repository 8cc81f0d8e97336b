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
Photos and videos (``predict.py``, ``explain.py``)
    ``sources`` (inputs expanded, images and video frames read), ``faces`` (Haar
    detection, crops), ``face_pipeline`` (faces per picture, batches),
    ``inference`` (a checkpoint for the photo commands, ``FaceClassifier``),
    ``predict_output`` (records as JSON Lines / CSV), ``annotate``,
    ``output_folder``, ``gradcam`` (Grad-CAM++), ``head_maps`` (per-head maps),
    ``head_figure``, ``photo_cli`` (shared flags, a run's bookkeeping),
    ``predict_run`` and ``explain_run`` (the two commands).

For inference::

    from dan_recipe.checkpoints import load_model
    from dan_recipe.transforms import eval_transform

    model, info = load_model("runs/demo/best.pt")
    preprocess = eval_transform(info.image_size, info.mean, info.std)
"""

__all__: list[str] = []
