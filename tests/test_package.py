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
NUMPY_ONLY = ["tiling.py", "_checks.py", "data.py"]
LEAVES = ["errors.py", "_checks.py", "_schema.py", "config.py", "device.py", "data.py"]


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


def test_layers_contract_holds():
    """``lint-imports`` with the contracts in pyproject.toml: no import goes up a layer, at the
    top of a module or inside a function."""
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter not installed (pip install -e '.[test]')")
    res = subprocess.run([str(exe)], cwd=PKG.parent, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_import_is_lazy_for_the_in_memory_core():
    """``import hrdv2_dask`` and its in-memory core pull in none of dask, zarr, xarray."""
    code = (
        "import sys, hrdv2_dask as hd; hd.highres_features; hd.load_backbone; hd.normalize; "
        "hd.shifts; hd.FeatureSettings; "
        "print(sorted(m for m in ('dask', 'distributed', 'zarr', 'xarray') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
    code = "import sys, hrdv2_dask as hd; hd.extract; print('zarr' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "True"  # the pipeline imports them when it is used


def test_every_public_name_resolves():
    for name in hd.__all__:
        assert getattr(hd, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hd.nope  # noqa: B018


@pytest.mark.parametrize("name", LEAVES)
def test_leaves_import_only_leaves(name):
    """The bottom layer imports nothing of the package above it (checked on the source)."""
    tree = ast.parse((PKG / name).read_text())
    internal = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module
    }
    assert internal <= {"errors", "device", "_checks", "_schema", "_version"}, internal


def test_all_lists_exactly_the_lazy_exports():
    assert sorted(hd.__all__) == sorted([*hd._EXPORTS, "__version__"])


def test_no_module_is_shadowed_by_a_function_of_its_name():
    import hrdv2_dask.pipeline
    import hrdv2_dask.pipeline.extraction  # noqa: F401 - sets the submodule attribute

    assert callable(hd.extract) and hd.extract is hrdv2_dask.pipeline.extract
    assert hd.extract.__module__ == "hrdv2_dask.pipeline.extraction"
