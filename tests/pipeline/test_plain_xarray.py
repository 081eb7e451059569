"""Plain xarray opens what we write: ``xarray.open_zarr`` of a store and
``xarray.open_datatree`` of a collection give what ``open_features`` / ``open_collection``
give (dims, coords, attrs, values), without a warning; an incomplete store is not consolidated
and does not look complete."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import tifffile
import xarray as xr
import zarr

import hrdv2_dask as hd
from hrdv2_dask.cli import main
from hrdv2_dask.io.collection import CollectionStore
from hrdv2_dask.io.store import feature_coords, is_consolidated


@pytest.fixture(scope="module")
def client(local_client):
    return local_client


def _kw(client, **extra):
    return dict(
        backbone=hd.MeanPool(), tile=140, dtype="float32", client=client, progress=False, **extra
    )


def _tiff(path, seed: int = 0, shape=(150, 170)) -> None:
    """A uint16 TIFF whose pixels are 5000 x 2500 um (y, x): 2 and 4 px per cm."""
    rng = np.random.default_rng(seed)
    img = (rng.random(shape) * 60_000).astype(np.uint16)
    tifffile.imwrite(path, img, resolution=(4.0, 2.0), resolutionunit="CENTIMETER")


def _plain_open(store) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "not consolidated": a test failure
        return xr.open_zarr(store)


class _Failing(hd.MeanPool):
    """MeanPool that raises at its ``fail_at``-th call (one worker thread)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("worker died")
        return super().forward(x)


def test_open_zarr_equals_open_features_with_physical_coords(tmp_path, client):
    _tiff(tmp_path / "a.tif")
    store = tmp_path / "a.zarr"
    fe = hd.extract(tmp_path / "a.tif", store, **_kw(client, out_stride=2))
    assert "y_phys" in fe.coords and fe.y_phys.attrs["units"] == "micrometer"
    ds = _plain_open(store)
    xr.testing.assert_identical(ds["features"], fe)
    assert np.array_equal(ds["features"].values, fe.values, equal_nan=True)
    assert ds.attrs["hrdv2"]["complete"] is True
    # the stored arrays are the computed coordinates, value for value
    expected = feature_coords((75, 85), 2, pixel_size=(5000.0, 2500.0), unit="micrometer")
    group = zarr.open_group(store, mode="r")
    for name, var in expected.items():
        assert np.array_equal(group[name][...], var.values), name
        assert dict(group[name].attrs) == var.attrs
    assert fe.y.values[:2].tolist() == [0.5, 2.5] and fe.x_phys.values[1] == 2.5 * 2500.0


def test_an_incomplete_store_is_not_consolidated_and_resumes_to_a_consolidated_one(
    tmp_path, client, capsys
):
    src = np.random.default_rng(2).random((300, 300, 3)).astype(np.float32)
    store = tmp_path / "s.zarr"
    kw = _kw(client, block=1)
    kw.pop("backbone")
    with pytest.raises(RuntimeError, match="worker died"):
        hd.extract(src, store, backbone=_Failing(fail_at=5), **kw)
    assert not is_consolidated(store)
    with pytest.warns(RuntimeWarning, match="consolidated"):
        ds = xr.open_zarr(store)
    assert ds.attrs["hrdv2"]["complete"] is False
    assert "model" not in ds["features"].attrs  # nothing says "finished"
    assert main(["info", str(store)]) == 2
    assert "incomplete" in capsys.readouterr().err
    fe = hd.extract(src, store, backbone=hd.MeanPool(), **kw)
    assert is_consolidated(store)
    xr.testing.assert_identical(_plain_open(store)["features"], fe)


def test_overwrite_and_an_unconsolidated_complete_store(tmp_path, client):
    src = np.random.default_rng(3).random((150, 150)).astype(np.float32)
    store = tmp_path / "s.zarr"
    hd.extract(src, store, **_kw(client))
    fe = hd.extract(src, store, **_kw(client, out_stride=2, overwrite=True))
    ds = _plain_open(store)
    assert ds.sizes["y"] == 75
    xr.testing.assert_identical(ds["features"], fe)
    # a complete store without coordinates or consolidation (an older version wrote it):
    # rerunning the same command adds them, values untouched
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    del group["y"], group["x"]
    group["features"].attrs.put({})
    meta = json.loads((store / "zarr.json").read_text())
    meta.pop("consolidated_metadata")
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.warns(RuntimeWarning, match="consolidated"):
        assert "y" not in xr.open_zarr(store).coords
    again = hd.extract(src, store, **_kw(client, out_stride=2))
    xr.testing.assert_identical(_plain_open(store)["features"], again)
    assert np.array_equal(again.values, fe.values)


def test_open_datatree_equals_open_collection(tmp_path, client):
    folder = tmp_path / "f"
    folder.mkdir()
    for k in range(2):
        _tiff(folder / f"im{k}.tif", seed=k)
    (folder / "broken.tif").write_bytes(b"not a tiff")
    out = tmp_path / "c.zarr"
    tree = hd.extract_collection(folder, out, **_kw(client))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = xr.open_datatree(out, engine="zarr")
        member = xr.open_zarr(out / "im1")
    xr.testing.assert_identical(plain, tree)
    assert sorted(plain.children) == ["im0", "im1"]  # not the failed one
    assert plain.attrs["settings"] == tree.attrs["settings"]
    assert [r["status"] for r in plain.attrs["members"]] == ["failed", "done", "done"]
    xr.testing.assert_identical(member["features"], hd.open_features(out / "im1"))
    xr.testing.assert_identical(plain["im0"]["features"], hd.open_features(out / "im0"))

    # a member being written (a partial store) is no node of the consolidated tree
    ghost = zarr.open_group(out / "ghost", mode="w", zarr_format=3)
    ghost.create_array("features", shape=(3, 4, 4), dtype="float32")
    xr.testing.assert_identical(xr.open_datatree(out, engine="zarr"), tree)

    # a change to the table drops the root's consolidation until the run ends
    store = CollectionStore(out, settings=tree.attrs["settings"])
    store.record("im0", status="pending")
    assert not is_consolidated(out)
    store.record("im0", status="done")
    _tiff(folder / "im2.tif", seed=2)
    tree = hd.extract_collection(folder, out, **_kw(client))
    assert is_consolidated(out) and sorted(tree.children) == ["im0", "im1", "im2"]
    xr.testing.assert_identical(xr.open_datatree(out, engine="zarr"), tree)
