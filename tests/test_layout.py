"""The package's layout: one family per file, files that read at one sitting, no private calls
across classes or modules, and state-dict keys that stay what checkpoints hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import dan_layers
from dan_layers import DANHead

PACKAGE = Path(dan_layers.__file__).parent
SOURCES = sorted(PACKAGE.glob("*.py"))

#: "A file reads at one sitting (~500 lines max)" (house rules): a little slack for docstrings.
MAX_LINES = 550


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_names_defined() -> dict[str, set[str]]:
    """Private names each module of the package defines (functions, classes, methods, constants)."""
    defined: dict[str, set[str]] = {}
    for path in SOURCES:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and private(node.name):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name) and private(t.id)}
        defined[path.stem] = names
    return defined


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_every_file_reads_at_one_sitting(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_attention_holds_the_units():
    tree = ast.parse((PACKAGE / "attention.py").read_text())
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes == {"SpatialAttention", "ChannelAttention", "MultiHeadAttentionBlock"}
    # no folding arithmetic and no validation helpers of their own: those live in deploy / _validation
    source = (PACKAGE / "attention.py").read_text()
    foreign_words = ("fuse_conv_bn", "pad_kernel", "running_var", "_BatchNorm", "def check_", "_check_kernel")
    for foreign in foreign_words:
        assert foreign not in source, foreign


def test_folding_lives_in_deploy():
    for path in SOURCES:
        if path.stem not in ("deploy", "functional"):
            assert "fuse_conv_bn" not in path.read_text(), path.name
    assert "fuse_conv_bn" in (PACKAGE / "deploy.py").read_text()


def test_no_private_calls_across_classes_or_modules():
    """A private name of the package is used only on ``self`` / ``cls`` / ``super()`` or as a plain
    name in the module that defines it; it is never imported by another module."""
    defined = private_names_defined()
    everything = set().union(*defined.values())
    offences = []
    for path in SOURCES:
        own = defined[path.stem]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dan_layers"):
                names = [alias.name for alias in node.names if private(alias.name)]
                offences += [f"{path.name}: imports {name} from {node.module}" for name in names]
            elif isinstance(node, ast.Attribute) and node.attr in everything:
                owner = node.value
                on_self = isinstance(owner, ast.Name) and owner.id in ("self", "cls")
                on_super = isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super"
                if not (on_self or on_super):
                    offences.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Name) and private(node.id) and node.id in everything - own:
                offences.append(f"{path.name}:{node.lineno}: uses {node.id} of another module")
    assert not offences, offences


def test_state_dict_keys_and_shapes_are_those_of_0_1():
    # what checkpoints written with dan-layers 0.1 hold (DANHead(16, 5, num_heads=2, channel_reduction=4))
    head = DANHead(16, 5, num_heads=2, channel_reduction=4)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}

    def bn(n: int) -> dict[str, tuple[int, ...]]:
        stats = {"running_mean": (n,), "running_var": (n,), "num_batches_tracked": ()}
        return {"weight": (n,), "bias": (n,), **stats}

    expected = {"attention.spatial.conv1x1.0.weight": (16, 16, 1, 1)}
    expected |= {"attention.spatial.conv1x1.0.bias": (16,)}
    expected |= {f"attention.spatial.conv1x1.1.{k}": v for k, v in bn(16).items()}
    for branch, kernel in (("conv_3x3", (3, 3)), ("conv_1x3", (1, 3)), ("conv_3x1", (3, 1))):
        expected |= {f"attention.spatial.{branch}.0.weight": (32, 8, *kernel)}
        expected |= {f"attention.spatial.{branch}.0.bias": (32,)}
        expected |= {f"attention.spatial.{branch}.1.{k}": v for k, v in bn(32).items()}
    expected |= {"attention.channel.attention.0.weight": (8, 16), "attention.channel.attention.0.bias": (8,)}
    expected |= {f"attention.channel.attention.1.{k}": v for k, v in bn(8).items()}
    expected |= {"attention.channel.attention.3.weight": (32, 4), "attention.channel.attention.3.bias": (32,)}
    expected |= {"fusion.fc.weight": (5, 16), "fusion.fc.bias": (5,)}
    expected |= {f"fusion.bn.{k}": v for k, v in bn(5).items()}
    assert shapes == expected
    assert list(shapes) == list(expected)  # and in the same order
    head.eval().attention.reparameterize()
    folded = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert folded == {
        "attention.spatial.conv1x1.0.weight": (16, 16, 1, 1), "attention.spatial.conv1x1.0.bias": (16,),
        "attention.spatial.conv_fused.weight": (32, 8, 3, 3), "attention.spatial.conv_fused.bias": (32,),
        "attention.channel.attention.0.weight": (8, 16), "attention.channel.attention.0.bias": (8,),
        "attention.channel.attention.3.weight": (32, 4), "attention.channel.attention.3.bias": (32,),
        **{k: v for k, v in expected.items() if k.startswith("fusion.")},
    }
    assert torch.equal(head.state_dict()["fusion.bn.num_batches_tracked"], torch.tensor(0))
