"""Tests of the TIFF reader (:mod:`hrdv2_dask.io.readers.tiff`): TIFF, OME-TIFF, SVS."""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest
import tifffile
from readers_testing import check_opened, no_compute, rng

from hrdv2_dask.errors import InputError
from hrdv2_dask.io.readers import open_image


@pytest.mark.parametrize(
    ("resolution", "unit", "expected"),
    [
        ((4.0, 2.0), "CENTIMETER", (5000.0, 2500.0)),  # px per cm (x, y) -> um (y, x)
        ((25400.0, 12700.0), "INCH", (2.0, 1.0)),
        ((4.0, 2.0), "NONE", None),
    ],
)
def test_plain_tiff_yx_with_resolution(tmp_path, resolution, unit, expected):
    arr = rng().integers(0, 65535, (120, 90), dtype=np.uint16)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, arr, resolution=resolution, resolutionunit=unit)
    meta = check_opened(open_image(path), arr[:, :, None])
    assert (meta.format, meta.axes, meta.path) == ("tiff", "YX", str(path))
    if expected is None:
        assert meta.pixel_size is None and meta.unit is None
    else:
        assert meta.pixel_size == pytest.approx(expected)
        assert meta.unit == "micrometer"


def _write_rgb_tiled(path: Path) -> np.ndarray:
    arr = rng().integers(0, 255, (300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(path, arr, tile=(128, 128), compression="zlib", photometric="rgb")
    return arr


def test_rgb_tiled_tiff(tmp_path):
    path = tmp_path / "rgb.tiff"
    arr = _write_rgb_tiled(path)
    with dask.config.set(scheduler=no_compute):
        opened = open_image(path)
    meta = check_opened(opened, arr)
    assert meta.axes == "YXS"
    assert opened.data.chunksize == (300, 400, 3)  # 128 px tiles widened to 512, clipped
    data, _ = open_image(path, chunks=128)
    assert data.numblocks == (3, 4, 1)


def test_tiff_open_is_lazy(tmp_path):
    """Computing one block decodes only its tile: every other tile is corrupt."""
    path = tmp_path / "rgb.tif"
    arr = _write_rgb_tiled(path)
    with tifffile.TiffFile(path) as tif:
        segments = list(zip(tif.pages[0].dataoffsets, tif.pages[0].databytecounts, strict=True))
    with open(path, "r+b") as fh:
        for offset, count in segments[1:]:
            fh.seek(offset)
            fh.write(b"\xff" * count)
    with dask.config.set(scheduler=no_compute):
        data, _ = open_image(path, chunks=128)
    assert data.numblocks == (3, 4, 1)
    np.testing.assert_array_equal(data[:10, :10].compute(), arr[:10, :10])
    with pytest.raises(Exception):  # noqa: B017 - any decode error proves the tile was read
        data.compute()


def _write_pyramid_ome_tiff(path: Path) -> list[np.ndarray]:
    base = rng().integers(0, 4000, (256, 320), dtype=np.uint16)
    levels = [base, base[::2, ::2].copy()]
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            levels[0],
            tile=(64, 64),
            subifds=1,
            metadata={
                "axes": "YX",
                "PhysicalSizeX": 0.5,
                "PhysicalSizeY": 0.25,
                "PhysicalSizeXUnit": "\u00b5m",
                "PhysicalSizeYUnit": "\u00b5m",
            },
        )
        tif.write(levels[1], tile=(64, 64), subfiletype=1)
    return levels


@pytest.mark.parametrize(("level", "pixel_size"), [(0, (0.25, 0.5)), (1, (0.5, 1.0))])
def test_pyramidal_ome_tiff(tmp_path, level, pixel_size):
    path = tmp_path / "pyr.ome.tif"
    levels = _write_pyramid_ome_tiff(path)
    meta = check_opened(open_image(path, level=level), levels[level][:, :, None])
    assert (meta.format, meta.level, meta.unit) == ("ome-tiff", level, "micrometer")
    assert meta.pixel_size == pytest.approx(pixel_size)


def test_tiff_level_out_of_range(tmp_path):
    path = tmp_path / "pyr.ome.tif"
    _write_pyramid_ome_tiff(path)
    with pytest.raises(InputError, match=r"level=5 .* 2 level\(s\)") as info:
        open_image(path, level=5)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "axes"),
    [
        ({"photometric": "minisblack", "metadata": {"axes": "CYX"}}, "CYX"),
        ({"photometric": "rgb", "planarconfig": "separate"}, "SYX"),
        ({"photometric": "minisblack"}, "CYX"),  # tifffile says QYX: detected from the shape
    ],
)
def test_cyx_tiff(tmp_path, kwargs, axes):
    arr = rng().integers(0, 255, (3, 50, 60), dtype=np.uint8)
    path = tmp_path / "cyx.tif"
    tifffile.imwrite(path, arr, **kwargs)
    meta = check_opened(open_image(path), arr.transpose(1, 2, 0))
    assert meta.axes == axes


def test_svs_pixel_size_and_levels(tmp_path):
    rgb = rng().integers(0, 255, (512, 768, 3), dtype=np.uint8)
    header = "Aperio Image Library v11.2.1 \n768x512 [0,0 768x512] (256x256) JPEG/RGB Q=30"
    path = tmp_path / "slide.svs"
    with tifffile.TiffWriter(path) as tif:
        opts = {"photometric": "rgb", "metadata": None}
        tif.write(rgb, tile=(256, 256), description=header + "|AppMag = 20|MPP = 0.25", **opts)
        tif.write(rgb[::8, ::8], description=header + " -> 96x64", **opts)  # thumbnail
        tif.write(rgb[::4, ::4], tile=(64, 64), description=header + " -> 192x128", **opts)
    meta = check_opened(open_image(path), rgb)
    assert (meta.format, meta.axes, meta.pixel_size, meta.unit) == (
        "svs",
        "YXS",
        (0.25, 0.25),
        "micrometer",
    )
    meta = check_opened(open_image(path, level=1), rgb[::4, ::4])
    assert meta.pixel_size == pytest.approx((1.0, 1.0))


def test_tiff_computes_on_distributed_worker(tmp_path):
    distributed = pytest.importorskip("distributed")
    path = tmp_path / "rgb.tif"
    arr = _write_rgb_tiled(path)
    data, _ = open_image(path, chunks=128)
    with (
        distributed.LocalCluster(
            n_workers=1, processes=True, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        result = client.compute(data[50:250, 100:300].sum(axis=(0, 1)), sync=True)
    np.testing.assert_array_equal(result, arr[50:250, 100:300].sum(axis=(0, 1)))


def test_corrupt_tiff(tmp_path):
    path = tmp_path / "x.tif"
    path.write_bytes(b"this is not a tiff file at all" * 10)
    with pytest.raises(InputError, match="Cannot read TIFF") as info:
        open_image(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None
