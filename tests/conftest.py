"""Shared test configuration: device/dtype options, hypothesis profiles, tolerances.

Options (kornia style):
    --device cpu|cuda|all      device of the parametrised tests (missing CUDA -> skipped)
    --dtype float32|float64|all dtype of the parametrised tests

Hypothesis: the ``dev`` profile is used locally; ``ci`` (derandomized) whenever the
``CI`` environment variable is set; ``HYPOTHESIS_PROFILE`` overrides both
(``HYPOTHESIS_PROFILE=thorough`` runs 1000 examples per property).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Per-dtype tolerances for comparisons of two computations of the same quantity.
TOLERANCES = {
    torch.bfloat16: {"rtol": 7.8e-3, "atol": 7.8e-3},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
}


def pytest_configure(config: pytest.Config) -> None:
    # emitted by torch's own Dynamo internals on torch >= 2.10, not by dan-layers
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="cpu, cuda or all (default cpu)")
    parser.addoption("--dtype", default="float32", help="float32, float64 or all (default float32)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        opt = metafunc.config.getoption("--device")
        names = ["cpu", "cuda"] if opt == "all" else [opt]
        metafunc.parametrize("device", names, indirect=True)
    if "dtype" in metafunc.fixturenames:
        opt = metafunc.config.getoption("--dtype")
        names = list(DTYPES) if opt == "all" else [opt]
        metafunc.parametrize("dtype", names, indirect=True)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.param
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("test requires cuda")
    return torch.device(name)


@pytest.fixture
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return DTYPES[request.param]


@pytest.fixture
def tol(dtype: torch.dtype) -> dict[str, float]:
    """``rtol``/``atol`` for the parametrised dtype."""
    return TOLERANCES[dtype]


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state (tests that draw use a Generator)."""
    torch.manual_seed(0)
