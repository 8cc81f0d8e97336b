"""The package's public surface and packaging metadata."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import dan_layers

ROOT = Path(__file__).resolve().parents[1]

#: The public names documented in the API contract and the docs' API pages.
DOCUMENTED = [
    "AffinityLoss",
    "AttentionFusion",
    "CenterLoss",
    "ChannelAttention",
    "DANHead",
    "DANHeadOutput",
    "DANLoss",
    "DANLossOutput",
    "MultiHeadAttentionBlock",
    "PartitionLoss",
    "SpatialAttention",
    "__version__",
    "can_reparameterize",
    "functional",
    "reparameterize_model",
]
DOCUMENTED_FUNCTIONAL = [
    "affinity_loss",
    "attention_pool",
    "center_loss",
    "fuse_conv_bn",
    "head_overlap",
    "pad_kernel",
    "partition_loss",
    "pool_features",
    "scale_heads",
]


def test_all_is_sorted_and_exactly_the_documented_names():
    assert dan_layers.__all__ == sorted(dan_layers.__all__)
    assert dan_layers.__all__ == DOCUMENTED
    for name in dan_layers.__all__:
        assert hasattr(dan_layers, name), name
    public = {n for n in vars(dan_layers) if not n.startswith("_")}
    # nothing public beyond __all__ except the submodules that hold the code
    assert public - set(dan_layers.__all__) <= {"attention", "deploy", "fusion", "head", "losses"}


def test_functional_all():
    assert dan_layers.functional.__all__ == DOCUMENTED_FUNCTIONAL


def test_docs_api_pages_list_the_public_names():
    api = ROOT / "docs" / "api"
    if not api.is_dir():
        pytest.skip("docs/api is not in this checkout")
    text = "\n".join(p.read_text() for p in sorted(api.glob("*.md")))
    documented = set(re.findall(r"^:::\s*dan_layers\.(\w+)\s*$", text, flags=re.M))
    documented_functional = set(re.findall(r"^:::\s*dan_layers\.functional\.(\w+)\s*$", text, flags=re.M))
    assert documented == set(DOCUMENTED) - {"__version__", "functional"}
    assert documented_functional == set(DOCUMENTED_FUNCTIONAL)


def test_version_matches_installed_metadata():
    assert re.fullmatch(r"\d+\.\d+\.\d+([abrc]+\d+|\.dev\d+|\.post\d+)?", dan_layers.__version__)
    assert importlib.metadata.version("dan-layers") == dan_layers.__version__


def test_version_is_single_sourced_from_the_package():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in config["project"]["dynamic"]
    assert "version" not in config["project"]
    assert config["tool"]["hatch"]["version"]["path"] == "dan_layers/__init__.py"


def test_py_typed_is_shipped():
    assert (Path(dan_layers.__file__).parent / "py.typed").is_file()


def _runtime_requirements(raw: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in raw]
    return {r.name.lower().replace("_", "-"): r for r in reqs if r.marker is None}


def _check_bounds(reqs: dict[str, Requirement]) -> None:
    assert set(reqs) == {"torch", "einops", "typing-extensions"}
    for name, req in reqs.items():
        ops = {spec.operator for spec in req.specifier}
        assert ops == {">="}, f"{name}: expected a lower bound only, got {req.specifier}"


def test_runtime_dependencies_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    _check_bounds(_runtime_requirements(config["project"]["dependencies"]))


def test_runtime_dependencies_in_installed_metadata():
    _check_bounds(_runtime_requirements(importlib.metadata.requires("dan-layers") or []))


def test_import_does_not_pull_in_torchvision_or_optional_deps():
    code = (
        "import sys, dan_layers, dan_layers.functional; "
        "print(','.join(m for m in ('torchvision', 'numpy.testing', 'hypothesis', 'onnx', 'PIL', 'matplotlib') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""


def test_private_validation_module_exports_nothing():
    from dan_layers import _validation

    assert _validation.__all__ == []


def test_changelog_has_the_current_version_first():
    changelog = ROOT / "CHANGELOG.md"
    if not (ROOT / ".git").exists() and not changelog.is_file():
        pytest.skip("not a git checkout, and CHANGELOG.md is not in it (an sdist)")
    text = changelog.read_text(encoding="utf-8")
    assert "Keep a Changelog" in text and "Semantic Versioning" in text
    versions = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", text, flags=re.M)
    assert versions and versions[0] == dan_layers.__version__, versions
    assert dan_layers.__version__ == "0.2.0"
    first = text.split(f"## [{versions[0]}]", 1)[1].split("\n## [", 1)[0]
    # the change of default is said where users look first
    assert "### Changed" in first and "reparameterize_model" in first and "inplace" in first
