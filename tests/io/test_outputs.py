"""Tests of :mod:`hrdv2_dask.io.outputs`: every OME-Zarr it writes is valid NGFF metadata.

The pixel values and level sizes of :func:`write_ome_pyramid` are tested in
``tests/test_analysis.py``; here each written image is validated with ome-zarr-models.
"""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from ome import assert_valid_ome_zarr

from hrdv2_dask.io import outputs


def _image(shape: tuple[int, ...], dtype: str) -> xr.DataArray:
    values = np.random.default_rng(0).integers(0, 200, shape).astype(dtype)
    dims = ("y", "x", "rgb")[: len(shape)]
    return xr.DataArray(da.from_array(values, chunks=64), dims=dims)


@pytest.mark.parametrize(
    ("shape", "dtype", "kwargs"),
    [
        ((601, 515, 3), "uint8", {"chunk_px": 128}),  # the PCA RGB preview: 3 levels
        ((300, 200), "float32", {}),  # one channel, from (y, x)
        ((90, 70, 5), "uint16", {"levels": 1}),
        ((100, 80, 2), "int16", {"levels": 3, "name": "two channels"}),
        ((64, 64, 3), "float64", {"levels": 2, "chunk_px": 16}),
    ],
)
def test_write_ome_pyramid_is_valid_ome_zarr(tmp_path, shape, dtype, kwargs):
    path = outputs.write_ome_pyramid(_image(shape, dtype), tmp_path / "img.ome.zarr", **kwargs)
    image = assert_valid_ome_zarr(path)
    (ms,) = image.attributes.multiscales
    assert ms.version == "0.4"
    assert [a.name for a in ms.axes] == ["c", "y", "x"]
    assert [a.type for a in ms.axes] == ["channel", "space", "space"]
    n_levels = kwargs.get("levels", len(ms.datasets))
    assert [d.path for d in ms.datasets] == [str(i) for i in range(n_levels)]
    n_channels = shape[2] if len(shape) == 3 else 1
    assert len(image.attributes.omero.channels) == n_channels
    assert image.members["0"].shape == (n_channels, *shape[:2])


def test_write_ome_pyramid_overwrite_is_valid_ome_zarr(tmp_path):
    rgb = _image((300, 260, 3), "uint8")
    path = outputs.write_ome_pyramid(rgb, tmp_path / "pca.ome.zarr")
    assert_valid_ome_zarr(path)
    outputs.write_ome_pyramid(rgb[:100, :100], path, levels=2, overwrite=True)
    image = assert_valid_ome_zarr(path)
    assert [d.path for d in image.attributes.multiscales[0].datasets] == ["0", "1"]


def test_assert_valid_ome_zarr_catches_broken_metadata(tmp_path):
    path = outputs.write_ome_pyramid(_image((40, 30, 3), "uint8"), tmp_path / "x.ome.zarr")
    attrs_file = path / ".zattrs"
    attrs = json.loads(attrs_file.read_text())
    attrs["multiscales"][0]["datasets"].append(
        {"path": "9", "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 2]}]}
    )
    attrs_file.write_text(json.dumps(attrs))
    with pytest.raises(AssertionError, match="invalid OME-Zarr 0.4"):
        assert_valid_ome_zarr(path)
    attrs["multiscales"][0]["version"] = "0.9"
    attrs_file.write_text(json.dumps(attrs))
    with pytest.raises(AssertionError, match="version '0.9'"):
        assert_valid_ome_zarr(path)


def test_staged_keeps_the_old_output_when_the_new_one_fails(tmp_path):
    """An output appears only once complete: a failure leaves the old one and no partial one;
    leftovers of a killed run are removed; a non-Zarr folder is never replaced."""
    target = tmp_path / "out.zarr"
    with outputs.staged(target) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("old")
    with pytest.raises(OSError, match="planted"), outputs.staged(target) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("half")
        raise OSError(28, "planted")
    assert (target / "zarr.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
    (tmp_path / ".out.zarr.partial-dead").mkdir()  # a run killed mid-write
    with outputs.staged(target) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("new")
    assert (target / "zarr.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
    with (
        pytest.raises(outputs.StoreError, match="already exists"),
        outputs.staged(target, overwrite=False),
    ):
        pass
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with (
        pytest.raises(outputs.StoreError, match="not a Zarr store"),
        outputs.staged(tmp_path / "docs"),
    ):
        pass


def test_writers_leave_nothing_when_the_disk_fills(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    async def full(self, key, value):
        raise OSError(28, "No space left on device", f"{self.root}/{key}")

    monkeypatch.setattr(LocalStore, "set", full)
    img = _image((300, 200, 3), "uint8")
    for write, name in [
        (outputs.write_ome_pyramid, "p.ome.zarr"),
        (outputs.write_array, "a.zarr"),
    ]:
        with pytest.raises(OSError, match="No space"):
            write(img, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
