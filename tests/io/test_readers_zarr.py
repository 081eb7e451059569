"""Tests of the Zarr reader (:mod:`hrdv2_dask.io.readers.zarr_store`): Zarr v2/v3, OME-Zarr."""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from readers_testing import check_opened, no_compute, rng

from hrdv2_dask.errors import InputError
from hrdv2_dask.io.readers import ImageMeta, open_image


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_array(tmp_path, zarr_format):
    arr = rng().integers(0, 255, (1100, 700, 3), dtype=np.uint8)
    path = tmp_path / "img.zarr"
    z = zarr.create_array(
        path, shape=arr.shape, chunks=(256, 256, 3), dtype=arr.dtype, zarr_format=zarr_format
    )
    z[:] = arr
    with dask.config.set(scheduler=no_compute):
        opened = open_image(path)
    meta = check_opened(opened, arr)
    data = opened.data
    assert data.chunksize == (512, 512, 3)  # 256 px source chunks widened to 512
    assert data.numblocks == (3, 2, 1)
    assert meta == ImageMeta(
        path=str(path), format="zarr", shape=(1100, 700, 3), dtype="uint8", axes="YXC"
    )
    assert open_image(str(path), chunks=(300, 200)).data.chunksize == (300, 200, 3)


def test_zarr_v3_dimension_names_give_axes(tmp_path):
    arr = rng().integers(0, 255, (2, 40, 50), dtype=np.uint8)
    path = tmp_path / "named.zarr"
    z = zarr.create_array(path, shape=arr.shape, dtype=arr.dtype, dimension_names=("c", "y", "x"))
    z[:] = arr
    meta = check_opened(open_image(path), arr.transpose(1, 2, 0))
    assert meta.axes == "CYX"


def test_zarr_group_with_one_array(tmp_path):
    arr = rng().integers(0, 255, (40, 50), dtype=np.uint8)
    g = zarr.open_group(tmp_path / "g.zarr", mode="w")
    g.create_array("image", shape=arr.shape, dtype=arr.dtype)[:] = arr
    g.create_group("labels")
    meta = check_opened(open_image(tmp_path / "g.zarr"), arr[:, :, None])
    assert meta.format == "zarr"


def test_zarr_group_with_several_arrays_lists_them(tmp_path):
    g = zarr.open_group(tmp_path / "g.zarr", mode="w")
    g.create_array("a", shape=(4, 4), dtype="u1")
    g.create_array("b", shape=(4, 4), dtype="u1")
    with pytest.raises(InputError, match=r"2 arrays \['a', 'b'\]"):
        open_image(tmp_path / "g.zarr")


def _write_ome_zarr_04(path: Path) -> list[np.ndarray]:
    gen = rng()
    levels = [gen.integers(0, 4000, (3, 64, 80), dtype=np.uint16)]
    levels.append(levels[0][:, ::2, ::2].copy())
    g = zarr.open_group(path, mode="w", zarr_format=2)
    for i, lv in enumerate(levels):
        g.create_array(str(i), shape=lv.shape, chunks=(1, 32, 32), dtype=lv.dtype)[:] = lv
    g.attrs["multiscales"] = [
        {
            "version": "0.4",
            "name": "test",
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": [
                {
                    "path": "0",
                    "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.5, 0.25]}],
                },
                {
                    "path": "1",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1.0, 1.0, 0.5]},
                        {"type": "translation", "translation": [0.0, 0.25, 0.125]},
                    ],
                },
            ],
            "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0, 2.0]}],
        }
    ]
    assert (path / ".zattrs").exists()
    return levels


@pytest.mark.parametrize(("level", "pixel_size"), [(0, (1.0, 0.5)), (1, (2.0, 1.0))])
def test_ome_zarr_04(tmp_path, level, pixel_size):
    path = tmp_path / "img.ome.zarr"
    levels = _write_ome_zarr_04(path)
    meta = check_opened(open_image(path, level=level), levels[level].transpose(1, 2, 0))
    assert meta.format == "ome-zarr"
    assert meta.axes == "CYX"
    assert meta.level == level
    assert meta.pixel_size == pytest.approx(pixel_size)
    assert meta.unit == "micrometer"


def test_ome_zarr_level_out_of_range(tmp_path):
    path = tmp_path / "img.ome.zarr"
    _write_ome_zarr_04(path)
    with pytest.raises(InputError, match=r"level=2 .* 2 level\(s\)") as info:
        open_image(path, level=2)
    assert str(path) in str(info.value)


def test_ome_zarr_05(tmp_path):
    arr = rng().integers(0, 255, (1, 2, 1, 48, 40), dtype=np.uint8)
    path = tmp_path / "img.ome.zarr"
    g = zarr.open_group(path, mode="w", zarr_format=3)
    g.create_array("s0", shape=arr.shape, chunks=(1, 1, 1, 16, 16), dtype=arr.dtype)[:] = arr
    g.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "t", "type": "time"},
                    {"name": "c", "type": "channel"},
                    {"name": "z", "type": "space", "unit": "nanometer"},
                    {"name": "y", "type": "space", "unit": "nanometer"},
                    {"name": "x", "type": "space", "unit": "nanometer"},
                ],
                "datasets": [
                    {
                        "path": "s0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1.0, 1.0, 5.0, 3.0, 4.0]}
                        ],
                    }
                ],
            }
        ],
    }
    meta = check_opened(open_image(path), arr[0, :, 0].transpose(1, 2, 0))
    assert (meta.format, meta.axes, meta.pixel_size, meta.unit) == (
        "ome-zarr",
        "TCZYX",
        (3.0, 4.0),
        "nanometer",
    )


def test_zarr_open_is_lazy(tmp_path):
    """Only the chunks a computed region needs are read: the others are corrupt."""
    arr = rng().integers(0, 1000, (300, 300), dtype=np.uint16)
    path = tmp_path / "c.zarr"
    zarr.create_array(path, shape=arr.shape, chunks=(128, 128), dtype=arr.dtype)[:] = arr
    chunk_files = sorted(p for p in (path / "c").rglob("*") if p.is_file())
    assert len(chunk_files) == 9
    for p in chunk_files:
        if p.relative_to(path / "c").parts != ("0", "0"):
            p.write_bytes(b"not zstd data")
    with dask.config.set(scheduler=no_compute):
        data, _ = open_image(path, chunks=128)
    assert data.numblocks == (3, 3, 1)
    np.testing.assert_array_equal(data[:10, :20].compute(), arr[:10, :20, None])
    with pytest.raises(Exception):  # noqa: B017 - any decode error proves the chunk was read
        data.compute()
