"""The DAN recipe behind ``examples/train_dan.py``, ``predict.py`` and ``explain.py``.

Importable with ``examples/`` on ``sys.path`` (the commands and the tests put it
there); importing the package imports none of its modules.

========== ===============================================================================
module     what it holds
========== ===============================================================================
config     presets, the flags of ``train_dan.py``, the resolved configuration
data       readers (RAF-DB, AffectNet, class folders), samplers, training augmentations,
           the splits and loaders of a run
synthetic  faces without files (a dataset, and ``python -m dan_recipe.synthetic``)
transforms resize and normalise: the input that inference shares with training
model      the reference DAN, its weight files (ours, the authors'), ``load_model``
train      a training run: setup, DDP, one epoch, evaluation, resume, ``--eval-only``
figures    a run's confusion matrix and attention maps, ``explain.py``'s figure
photos     inputs, video frames, face detection and crops, batches, the classifier
gradcam    Grad-CAM++ and each head's maps
records    face records (JSON Lines, CSV), annotated pictures, output folders
utils      errors, atomic writes, RNG state, metrics, logging, threads, label orders
========== ===============================================================================

For inference::

    from dan_recipe.model import load_model
    from dan_recipe.transforms import eval_transform

    model, info = load_model("runs/demo/best.pt")
    preprocess = eval_transform(info.image_size, info.mean, info.std)
"""

__all__: list[str] = []
