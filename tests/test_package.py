"""Package-level rules: import boundaries, public API, lint."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import hrdv2_dask as hd

PKG = Path(hd.__file__).parent
TORCH_ONLY = [
    "backbones.py",
    "transforms.py",
    "ensemble.py",
    "heads.py",
    "weights.py",
    "preprocess.py",
]
NUMPY_ONLY = ["tiling.py", "_checks.py"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("name", TORCH_ONLY)
def test_core_modules_never_import_dask_or_zarr(name):
    assert not _imports(PKG / name) & {"dask", "distributed", "zarr", "xarray", "tifffile"}


@pytest.mark.parametrize("name", NUMPY_ONLY)
def test_geometry_modules_use_numpy_only(name):
    path = PKG / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    assert not _imports(path) & {"torch", "dask", "distributed", "zarr", "xarray", "tifffile"}


def test_public_api():
    for name in [
        "load_backbone",
        "shifts",
        "flips",
        "rotations",
        "combine",
        "highres_features",
        "normalize",
        "MeanPool",
        "Hrdv2Error",
        "ConfigError",
        "WeightsNotFoundError",
    ]:
        assert name in hd.__all__ and hasattr(hd, name)
    assert issubclass(hd.ConfigError, ValueError) and issubclass(
        hd.WeightsNotFoundError, FileNotFoundError
    )


def test_ruff_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff not installed")
    cmd = [sys.executable, "-m", "ruff", "check", "hrdv2_dask", "tests", "benchmarks"]
    res = subprocess.run(cmd, cwd=PKG.parent, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
