"""Deprecated import path of the reference DAN: use ``dan_recipe.model`` and ``dan_recipe.weights``.

Only re-exports (no code of its own), kept while ``tests/test_export.py`` imports
``dan``; delete it once that test imports ``dan_recipe.model``.
"""

from dan_recipe.errors import CheckpointError
from dan_recipe.model import DAN, BasicBlock, ResNet18Features, count_macs
from dan_recipe.weights import (
    check_state_dict_keys,
    format_key_report,
    infer_official_config,
    is_official_state_dict,
    load_backbone_weights,
    load_official_checkpoint,
    official_key_names,
    read_state_dict,
    to_official_state_dict,
)

__all__ = [
    "DAN",
    "BasicBlock",
    "CheckpointError",
    "ResNet18Features",
    "check_state_dict_keys",
    "count_macs",
    "format_key_report",
    "infer_official_config",
    "is_official_state_dict",
    "load_backbone_weights",
    "load_official_checkpoint",
    "official_key_names",
    "read_state_dict",
    "to_official_state_dict",
]
