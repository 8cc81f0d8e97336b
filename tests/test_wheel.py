"""The wheel builds, carries py.typed, and installs into a clean venv beside torch alone."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _pip(python: Path | str, *args: str, cwd: Path | None = None) -> None:
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args], check=True, cwd=cwd)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _pip(sys.executable, "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT))
    wheels = list(out.glob("dan_layers-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents_and_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    for module in ("__init__", "functional", "losses", "attention", "fusion", "deploy"):
        assert f"dan_layers/{module}.py" in names
    assert "dan_layers/py.typed" in names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    requires = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    bare = sorted(r.split(">=")[0].strip() for r in requires)
    assert bare == ["einops", "torch", "typing-extensions"], requires
    assert all(">=" in r and "<" not in r for r in requires), requires  # lower bounds, no caps
    assert meta["Requires-Python"] == ">=3.10"


def test_wheel_installs_beside_torch_alone(wheel: Path, tmp_path: Path) -> None:
    import torch

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # the locally available build
    _pip(python, "install", "--quiet", torch_pin, str(wheel))
    code = (
        "import sys, torch, dan_layers\n"
        "from dan_layers import PartitionLoss, MultiHeadAttentionBlock\n"
        "assert 'torchvision' not in sys.modules\n"
        "heads = MultiHeadAttentionBlock(16, num_heads=2)(torch.randn(2, 16, 5, 5))\n"
        "print(dan_layers.__version__, float(PartitionLoss()(heads)) > 0)\n"
    )
    result = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    assert result.stdout.split() == [__import__("dan_layers").__version__, "True"]
