"""Faults while an analysis or a workflow reads a feature store or writes its results: one line
(exit 2) naming the file, the problem and the fix; an output that did not finish is not there
(each appears only once complete); the rerun after the fix gives the same outputs."""

from __future__ import annotations

import errno
import os
import shutil
import warnings

import numpy as np
import pytest
import tifffile
import xarray as xr
import yaml
from PIL import Image
from zarr.storage import LocalStore

import hrdv2_dask as hd
from hrdv2_dask.cli import main
from hrdv2_dask.demo import make_sample_image


@pytest.fixture(scope="module")
def store(tmp_path_factory, local_client):
    root = tmp_path_factory.mktemp("faults")
    hd.extract(
        make_sample_image(224, cells=4),
        root / "f.zarr",
        backbone=hd.MeanPool(14, 14),
        tile=112,
        out_stride=2,
        client=local_client,
        progress=False,
    )
    return root / "f.zarr"


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """The outputs of ``hrdv2 pca`` without faults."""
    out = tmp_path_factory.mktemp("ref") / "pca"
    assert main(["pca", str(store), str(out)]) == 0
    return out


def _last_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    return lines[-1]


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def _same_outputs(a, b) -> None:
    """Folders ``a`` and ``b`` hold the same files with the same values."""
    assert _listing(a) == _listing(b)
    for name in _listing(a):
        if name.endswith(".png"):
            np.testing.assert_array_equal(np.asarray(Image.open(a / name)), Image.open(b / name))
        elif name.endswith(".ome.zarr"):
            levels = sorted(p.name for p in (a / name).iterdir() if p.name.isdigit())
            assert levels and levels == sorted(p.name for p in (b / name).iterdir() if p.is_dir())
            for level in levels:
                np.testing.assert_array_equal(
                    _zarr_values(a / name / level), _zarr_values(b / name / level)
                )
        elif name.endswith(".zarr"):
            xr.testing.assert_identical(
                xr.open_zarr(a / name, consolidated=False).load(),
                xr.open_zarr(b / name, consolidated=False).load(),
            )


def _zarr_values(path) -> np.ndarray:
    import zarr

    return zarr.open_array(path, mode="r")[...]


class _FailingSet:
    """LocalStore.set raises OSError(code) once ``limit`` bytes went to stores whose root
    matches (a disk that fills up, or a folder that turns read-only, mid-write)."""

    def __init__(self, monkeypatch, code: int, *, limit: int = 0, root: str = "") -> None:
        self.written = 0
        original = LocalStore.set

        async def set_(store, key, value):
            if root in str(store.root):
                self.written += len(value.to_bytes())
                if self.written > limit:
                    raise OSError(code, os.strerror(code), f"{store.root}/{key}")
            return await original(store, key, value)

        monkeypatch.setattr(LocalStore, "set", set_)
        self.undo = lambda: monkeypatch.setattr(LocalStore, "set", original)


def test_no_space_mid_write_leaves_no_partial_output_and_the_rerun_matches(
    store, reference, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "pca"
    fault = _FailingSet(monkeypatch, errno.ENOSPC, limit=20_000, root=".pca.zarr.partial-")
    assert main(["pca", str(store), str(out)]) == 2
    line = _last_line(capsys)
    assert line.startswith(f"hrdv2: error: Cannot write results folder {str(out)!r}: no space")
    assert ".pca.zarr.partial-" in line and " free on " in line and "rerun the same" in line
    assert fault.written > 20_000  # it failed mid-array, not before writing
    # the two outputs written before it are complete; pca.zarr is not there, nor any partial one
    assert _listing(out) == ["pca.ome.zarr", "pca.png"]
    fault.undo()
    assert main(["pca", str(store), str(out)]) == 0
    _same_outputs(out, reference)


@pytest.mark.parametrize(("code", "words"), [(errno.EROFS, "read-only"), (errno.EACCES, "perm")])
def test_a_failing_png_write_keeps_the_previous_output(
    code, words, store, reference, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "pca"
    shutil.copytree(reference, out)
    before = (out / "pca.png").read_bytes()
    save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(code, os.strerror(code), str(fp))

    monkeypatch.setattr(Image.Image, "save", failing_save)
    assert main(["pca", str(store), str(out)]) == 2
    line = _last_line(capsys)
    assert (
        line.startswith(f"hrdv2: error: Cannot write results folder {str(out)!r}") and words in line
    )
    assert (out / "pca.png").read_bytes() == before  # the old preview, whole
    assert _listing(out) == _listing(reference)  # and no half-written sibling
    monkeypatch.setattr(Image.Image, "save", save)
    assert main(["pca", str(store), str(out)]) == 0
    _same_outputs(out, reference)


def _damaged_copy(store, tmp_path):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    chunks = sorted(p for p in (damaged / "features" / "c").rglob("*") if p.is_file())
    return damaged, chunks[len(chunks) // 2]


@pytest.mark.parametrize("command", ["pca", "cluster", "similarity"])
def test_a_damaged_feature_chunk_names_its_file(command, store, tmp_path, capsys):
    damaged, chunk = _damaged_copy(store, tmp_path)
    chunk.write_bytes(b"\xff" * 64)
    out = tmp_path / "out"
    extra = ["--point", "3,4"] if command == "similarity" else []
    assert main([command, str(damaged), str(out), *extra]) == 2
    line = _last_line(capsys)
    assert line.startswith(f"hrdv2: error: Cannot read feature store {str(damaged)!r}")
    assert f"its chunk file {chunk} (output rows " in line and "cannot be read" in line
    assert "--overwrite" in line
    assert not [n for n in _listing(out) if n.endswith(".zarr")]  # no result from bad data


def test_a_missing_chunk_of_an_unmasked_store_is_named(store, tmp_path, capsys):
    damaged, chunk = _damaged_copy(store, tmp_path)
    chunk.unlink()
    assert main(["cluster", str(damaged), str(tmp_path / "k"), "-k", "3"]) == 2
    line = _last_line(capsys)
    assert f"its chunk file {chunk} (output rows " in line and "is missing" in line


def test_missing_or_damaged_metadata_is_one_line(store, tmp_path, capsys):
    damaged, _ = _damaged_copy(store, tmp_path)
    (damaged / "features" / "zarr.json").unlink()
    assert main(["pca", str(damaged), str(tmp_path / "p")]) == 2
    assert "its array 'features' cannot be opened" in _last_line(capsys)
    (damaged / "zarr.json").write_text("{not json")
    assert main(["pca", str(damaged), str(tmp_path / "p")]) == 2
    assert "its metadata file zarr.json cannot be read" in _last_line(capsys)


def test_an_unreadable_labels_file_is_named_with_the_region(store, tmp_path, capsys):
    labels = np.zeros((224, 224), np.uint8)
    labels[20:24, 10:100] = 1
    labels[180:184, 100:200] = 2
    path = tmp_path / "labels.tif"
    tifffile.imwrite(path, labels, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tf:
        offset, count = tf.pages[0].dataoffsets[-1], tf.pages[0].databytecounts[-1]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * count)
    out = tmp_path / "seg"
    assert main(["segment", str(store), str(path), str(out)]) == 2
    line = _last_line(capsys)
    assert line.startswith("hrdv2: error: Cannot read rows 0:224, cols 0:224 of labels file ")
    assert str(path) in line and "save the labels again" in line
    assert _listing(out) == []
    path.write_bytes(b"not a tiff at all")
    assert main(["segment", str(store), str(path), str(out)]) == 2
    assert str(path) in _last_line(capsys)


def test_a_workflow_fault_writes_no_summary_and_the_rerun_completes(
    tmp_path, capsys, monkeypatch, local_client
):
    wf = {
        "input": "sample",
        "sample_size": 224,
        "output_dir": "out",
        "features": {"model": "filterbank", "tile": 224, "out_stride": 4},
        "analyses": [{"pca": {}}, {"cluster": {"k": 3}}],
    }
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(wf))
    out = tmp_path / "out"
    fault = _FailingSet(monkeypatch, errno.EACCES, root=".clusters.zarr.partial-")
    assert main(["run", str(path), "--quiet"]) == 2
    line = _last_line(capsys)
    assert line.startswith(f"hrdv2: error: Cannot write results folder {str(out)!r}")
    assert "permission denied" in line
    names = _listing(out)
    assert "summary.json" not in names and "clusters.zarr" not in names and "pca.png" in names
    assert not [n for n in names if n.startswith(".")]
    fault.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        assert main(["run", str(path), "--quiet"]) == 0
    assert {"summary.json", "clusters.zarr", "clusters.png"} <= set(_listing(out))
    # the same clusters as the analysis run alone on the finished store
    assert main(["cluster", str(out / "features.zarr"), str(tmp_path / "k"), "-k", "3"]) == 0
    _same_outputs(
        tmp_path / "k", _subset(out, tmp_path / "only", ("clusters.zarr", "clusters.png"))
    )


def _subset(folder, into, names):
    into.mkdir()
    for name in names:
        (shutil.copytree if (folder / name).is_dir() else shutil.copy)(folder / name, into / name)
    return into
