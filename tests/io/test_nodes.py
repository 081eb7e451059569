"""Stores created and finished from files (io.nodes) hold the bytes Zarr's own API writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from hrdv2_dask.io.nodes import array_metadata, write_document, write_plain_chunks
from hrdv2_dask.io.store import (
    _COMPRESSORS,
    BlockWriter,
    RunStore,
    _store_coords,
    feature_attrs,
)

SETTINGS = {"model": "m", "out_stride": 2, "block": 1}
PROV = {"source": {"shape": [200, 300, 3], "pixel_size": [0.5, 0.25], "unit": "micrometer"}}
SHAPE, CHUNKS, BLOCKS = (8, 100, 150), (8, 64, 64), (2, 3)
HALOS = {"bottom": (9, 4, 64), "right": (9, 64, 4), "corner": (9, 4, 4)}


def _files(root) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _with_zarr(path, bias) -> None:
    """The store as Zarr's API writes it: create, then finish (coordinates, attrs, consolidate)."""
    group = zarr.open_group(path, mode="a", zarr_format=3)
    group.attrs["hrdv2"] = {"settings": SETTINGS, "provenance": PROV, "complete": False}
    features = group.create_array(
        "features",
        shape=SHAPE,
        chunks=CHUNKS,
        dtype="float16",
        compressors=_COMPRESSORS,
        dimension_names=("feature", "y", "x"),
        fill_value=np.nan,
    )
    run = group.create_group("_run")
    for name, hshape in HALOS.items():
        run.create_array(
            f"halo_{name}",
            shape=(*BLOCKS, *hshape),
            chunks=(1, 1, *hshape),
            dtype="float32",
            compressors=None,  # bookkeeping, written by the block tasks as files
            fill_value=0.0,
        )
    run.create_array("token_bias", data=bias, compressors=_COMPRESSORS)
    run.create_array(
        "done", shape=BLOCKS, chunks=(1, 1), dtype="uint8", compressors=None, fill_value=0
    )
    created = _files(path)
    coords = _store_coords(SETTINGS, PROV, SHAPE[1:])
    for name, var in coords.items():
        arr = group.create_array(
            name,
            shape=var.shape,
            dtype=var.dtype,
            dimension_names=var.dims,
            compressors=None,
            fill_value=np.nan,
            attributes=var.attrs,
        )
        arr[...] = var.values
    features.attrs.put({**feature_attrs(SETTINGS, PROV), "coordinates": "y_phys x_phys"})
    del group["_run"]
    group.attrs["hrdv2"] = {"settings": SETTINGS, "provenance": PROV, "complete": True}
    zarr.consolidate_metadata(str(path), zarr_format=3)
    return created


def _created(path: Path, **kwargs) -> RunStore:
    """A new store of the module's settings and shapes."""
    store = RunStore(path, settings=SETTINGS)
    store.create(
        provenance=PROV,
        shape=SHAPE,
        chunks=CHUNKS,
        dtype="float16",
        blocks=BLOCKS,
        halo_shapes=HALOS,
        **kwargs,
    )
    return store


def test_create_and_finish_write_the_bytes_zarr_writes(tmp_path):
    bias = np.arange(5 * 3 * 4 * 4, dtype=np.float32).reshape(5, 3, 4, 4)
    created = _with_zarr(tmp_path / "zarr", bias)
    store = _created(tmp_path / "nodes", saved={"token_bias": bias})
    assert _files(tmp_path / "nodes") == created  # 8 documents and the saved array's chunks
    store.finish()
    assert store.complete
    ours, theirs = _files(tmp_path / "nodes"), _files(tmp_path / "zarr")
    assert sorted(ours) == sorted(theirs) and len(ours) == 1 + 1 + 4 * 2  # root, features, 4 coords
    assert ours == theirs


def test_block_writes_read_back_through_zarr(tmp_path):
    store = _created(tmp_path / "s")
    rng = np.random.default_rng(0)
    halo = {k: rng.random(v).astype(np.float32) for k, v in HALOS.items()}
    values = rng.random((8, 36, 22)).astype(np.float16)  # the bottom-right block, clipped
    writer = BlockWriter(tmp_path / "s")
    writer.write_block(
        (1, 2), values, np.ones((64, 64), bool), origin=(64, 128), chunk=64, halo=halo
    )
    saved = writer.saved_halo((1, 2))
    assert sorted(saved) == sorted(HALOS)
    for name, strip in halo.items():
        np.testing.assert_array_equal(saved[name], strip)
    assert not writer.saved_halo((0, 0))["bottom"].any()  # never written: the fill value
    assert store.done_blocks().tolist() == [[False, False, False], [False, False, True]]
    group = zarr.open_group(tmp_path / "s", mode="r")
    np.testing.assert_array_equal(group["features"][:, 64:, 128:], values)


def test_a_store_of_an_older_version_resumes_through_zarr(tmp_path):
    """Its bookkeeping arrays are compressed: the block tasks write them through Zarr."""
    store = _created(tmp_path / "s")
    run = zarr.open_group(tmp_path / "s" / "_run", mode="r+")
    for name, hshape in HALOS.items():
        run.create_array(
            f"halo_{name}",
            shape=(*BLOCKS, *hshape),
            chunks=(1, 1, *hshape),
            dtype="float32",
            compressors=_COMPRESSORS,
            fill_value=0.0,
            overwrite=True,
        )
    run.create_array(
        "done", shape=BLOCKS, chunks=(1, 1), dtype="uint8", fill_value=0, overwrite=True
    )
    halo = {k: np.full(v, 0.5, np.float32) for k, v in HALOS.items()}
    writer = BlockWriter(tmp_path / "s")
    ones = np.ones((64, 64), bool)
    writer.write_block(
        (0, 1), np.ones((8, 64, 64), np.float16), ones, origin=(0, 64), chunk=64, halo=halo
    )
    assert all((writer.saved_halo((0, 1))[k] == 0.5).all() for k in HALOS)
    assert store.done_blocks().sum() == 1 and store.done_blocks()[0, 1]


@pytest.mark.parametrize("n", [5, 130_001])
def test_plain_chunks_pad_the_last_chunk_as_zarr_does(tmp_path, n):
    values = np.arange(n, dtype=np.float64) * 0.5
    meta = array_metadata(shape=(n,), dtype="float64", compressors=None, fill_value=np.nan)
    write_document(tmp_path / "ours", meta)
    write_plain_chunks(tmp_path / "ours", meta, values)
    arr = zarr.create_array(
        tmp_path / "zarr", shape=(n,), dtype="float64", compressors=None, fill_value=np.nan
    )
    arr[...] = values
    assert _files(tmp_path / "ours") == _files(tmp_path / "zarr")
    assert len(_files(tmp_path / "ours")) == 1 + len(range(0, n, meta.chunk_grid.chunk_shape[0]))
