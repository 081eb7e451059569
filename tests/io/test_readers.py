"""Tests of :mod:`hrdv2_dask.io.readers`: every source format, axes, laziness, pickling, errors."""

from __future__ import annotations

import json
from pathlib import Path

import cloudpickle
import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from hrdv2_dask.errors import InputError, SourceNotFoundError
from hrdv2_dask.io.readers import ImageMeta, OpenedImage, open_image

MICROGRAPHS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "micrographs"


def _rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _no_compute(*args, **kwargs):
    raise AssertionError("open_image must not compute anything")


def _yxc(arr: np.ndarray) -> np.ndarray:
    return arr[:, :, None] if arr.ndim == 2 else arr


def _check(opened: OpenedImage, expected_yxc: np.ndarray) -> ImageMeta:
    data, meta = opened
    assert isinstance(data, da.Array)
    assert data.shape == expected_yxc.shape
    assert data.dtype == expected_yxc.dtype
    assert data.numblocks[2] == 1
    assert meta.shape == expected_yxc.shape
    assert meta.dtype == expected_yxc.dtype.name
    np.testing.assert_array_equal(data.compute(), expected_yxc)
    return meta


# --- ImageMeta ----------------------------------------------------------------------------------


def test_meta_round_trip_through_json():
    meta = ImageMeta(
        path="/a/b.tif",
        format="ome-tiff",
        shape=(10, 20, 3),
        dtype="uint16",
        axes="TCZYX",
        pixel_size=(0.25, 0.5),
        unit="micrometer",
        level=2,
    )
    d = json.loads(json.dumps(meta.to_dict()))
    assert d["shape"] == [10, 20, 3]
    assert ImageMeta.from_dict(d) == meta
    minimal = ImageMeta(path=None, format="numpy", shape=(1, 1, 1), dtype=np.uint8, axes="YX")
    assert minimal.dtype == "uint8"
    assert ImageMeta.from_dict(json.loads(json.dumps(minimal.to_dict()))) == minimal


@pytest.mark.parametrize(
    "change",
    [
        {"format": "bmp"},
        {"shape": (10, 20)},
        {"shape": (10, 0, 3)},
        {"dtype": "not-a-dtype"},
        {"pixel_size": (0.0, 1.0)},
        {"level": -1},
        {"axes": ""},
    ],
)
def test_meta_rejects_bad_values(change):
    d = ImageMeta(path=None, format="numpy", shape=(4, 5, 1), dtype="uint8", axes="YX").to_dict()
    d.update(change)
    with pytest.raises(InputError):
        ImageMeta.from_dict(d)


def test_meta_from_dict_rejects_unknown_and_missing_keys():
    d = ImageMeta(path=None, format="numpy", shape=(4, 5, 1), dtype="uint8", axes="YX").to_dict()
    with pytest.raises(InputError, match="unknown keys"):
        ImageMeta.from_dict({**d, "colour": "red"})
    del d["axes"]
    with pytest.raises(InputError, match="missing required keys"):
        ImageMeta.from_dict(d)


# --- in-memory arrays ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axes", "expected_axes", "to_yxc"),
    [
        ((30, 40), None, "YX", lambda a: a[:, :, None]),
        ((30, 40, 3), None, "YXC", lambda a: a),
        ((30, 40, 4), None, "YXC", lambda a: a),
        ((3, 30, 40), None, "CYX", lambda a: a.transpose(1, 2, 0)),
        ((1, 1, 3, 30, 40), None, "TZCYX", lambda a: a[0, 0].transpose(1, 2, 0)),
        ((1, 30, 40, 3), None, "ZYXC", lambda a: a[0]),
        ((1, 30, 40), "ZYX", "ZYX", lambda a: a[0][:, :, None]),
        ((4, 30, 3), "CYX", "CYX", lambda a: a.transpose(1, 2, 0)),
        ((30, 40, 10), "yxc", "YXC", lambda a: a),
        ((10, 20, 30), "cyx", "CYX", lambda a: a.transpose(1, 2, 0)),
    ],
)
def test_numpy_layouts(shape, axes, expected_axes, to_yxc):
    arr = _rng().integers(0, 255, shape, dtype=np.uint8)
    meta = _check(open_image(arr, axes), to_yxc(arr))
    assert meta.format == "numpy"
    assert meta.axes == expected_axes
    assert meta.path is None and meta.pixel_size is None and meta.level == 0


def test_numpy_chunks_option():
    arr = _rng().random((100, 90, 3), dtype=np.float32)
    data, _ = open_image(arr, chunks=32)
    assert data.chunks[:2] == ((32, 32, 32, 4), (32, 32, 26))
    data, _ = open_image(arr, chunks=(50, 45))
    assert data.chunksize == (50, 45, 3)
    np.testing.assert_array_equal(data.compute(), arr)


def test_dask_input_keeps_chunks_and_merges_channels():
    arr = _rng().integers(0, 1000, (3, 64, 48), dtype=np.uint16)
    src = da.from_array(arr, chunks=(1, 16, 24))
    data, meta = open_image(src)
    assert meta.format == "dask" and meta.axes == "CYX"
    assert data.chunks == ((16, 16, 16, 16), (24, 24), (3,))
    np.testing.assert_array_equal(data.compute(), arr.transpose(1, 2, 0))
    data, _ = open_image(src, chunks=32)
    assert data.chunks == ((32, 32), (32, 16), (3,))


def test_dask_grayscale_5d():
    arr = _rng().random((1, 1, 1, 20, 30))
    meta = _check(open_image(da.from_array(arr, chunks=10)), arr[0, 0, 0][:, :, None])
    assert meta.axes == "TZCYX" and meta.dtype == "float64"


# --- Zarr ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_array(tmp_path, zarr_format):
    arr = _rng().integers(0, 255, (1100, 700, 3), dtype=np.uint8)
    path = tmp_path / "img.zarr"
    z = zarr.create_array(
        path, shape=arr.shape, chunks=(256, 256, 3), dtype=arr.dtype, zarr_format=zarr_format
    )
    z[:] = arr
    with dask.config.set(scheduler=_no_compute):
        opened = open_image(path)
    meta = _check(opened, arr)
    data = opened.data
    assert data.chunksize == (512, 512, 3)  # 256 px source chunks widened to 512
    assert data.numblocks == (3, 2, 1)
    assert meta == ImageMeta(
        path=str(path), format="zarr", shape=(1100, 700, 3), dtype="uint8", axes="YXC"
    )
    assert open_image(str(path), chunks=(300, 200)).data.chunksize == (300, 200, 3)


def test_zarr_v3_dimension_names_give_axes(tmp_path):
    arr = _rng().integers(0, 255, (2, 40, 50), dtype=np.uint8)
    path = tmp_path / "named.zarr"
    z = zarr.create_array(path, shape=arr.shape, dtype=arr.dtype, dimension_names=("c", "y", "x"))
    z[:] = arr
    meta = _check(open_image(path), arr.transpose(1, 2, 0))
    assert meta.axes == "CYX"


def test_zarr_group_with_one_array(tmp_path):
    arr = _rng().integers(0, 255, (40, 50), dtype=np.uint8)
    g = zarr.open_group(tmp_path / "g.zarr", mode="w")
    g.create_array("image", shape=arr.shape, dtype=arr.dtype)[:] = arr
    g.create_group("labels")
    meta = _check(open_image(tmp_path / "g.zarr"), arr[:, :, None])
    assert meta.format == "zarr"


def test_zarr_group_with_several_arrays_lists_them(tmp_path):
    g = zarr.open_group(tmp_path / "g.zarr", mode="w")
    g.create_array("a", shape=(4, 4), dtype="u1")
    g.create_array("b", shape=(4, 4), dtype="u1")
    with pytest.raises(InputError, match=r"2 arrays \['a', 'b'\]"):
        open_image(tmp_path / "g.zarr")


def _write_ome_zarr_04(path: Path) -> list[np.ndarray]:
    rng = _rng()
    levels = [rng.integers(0, 4000, (3, 64, 80), dtype=np.uint16)]
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
    meta = _check(open_image(path, level=level), levels[level].transpose(1, 2, 0))
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
    arr = _rng().integers(0, 255, (1, 2, 1, 48, 40), dtype=np.uint8)
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
    meta = _check(open_image(path), arr[0, :, 0].transpose(1, 2, 0))
    assert (meta.format, meta.axes, meta.pixel_size, meta.unit) == (
        "ome-zarr",
        "TCZYX",
        (3.0, 4.0),
        "nanometer",
    )


def test_zarr_open_is_lazy(tmp_path):
    """Only the chunks a computed region needs are read: the others are corrupt."""
    arr = _rng().integers(0, 1000, (300, 300), dtype=np.uint16)
    path = tmp_path / "c.zarr"
    zarr.create_array(path, shape=arr.shape, chunks=(128, 128), dtype=arr.dtype)[:] = arr
    chunk_files = sorted(p for p in (path / "c").rglob("*") if p.is_file())
    assert len(chunk_files) == 9
    for p in chunk_files:
        if p.relative_to(path / "c").parts != ("0", "0"):
            p.write_bytes(b"not zstd data")
    with dask.config.set(scheduler=_no_compute):
        data, _ = open_image(path, chunks=128)
    assert data.numblocks == (3, 3, 1)
    np.testing.assert_array_equal(data[:10, :20].compute(), arr[:10, :20, None])
    with pytest.raises(Exception):  # noqa: B017 - any decode error proves the chunk was read
        data.compute()


# --- TIFF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolution", "unit", "expected"),
    [
        ((4.0, 2.0), "CENTIMETER", (5000.0, 2500.0)),  # px per cm (x, y) -> um (y, x)
        ((25400.0, 12700.0), "INCH", (2.0, 1.0)),
        ((4.0, 2.0), "NONE", None),
    ],
)
def test_plain_tiff_yx_with_resolution(tmp_path, resolution, unit, expected):
    arr = _rng().integers(0, 65535, (120, 90), dtype=np.uint16)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, arr, resolution=resolution, resolutionunit=unit)
    meta = _check(open_image(path), arr[:, :, None])
    assert (meta.format, meta.axes, meta.path) == ("tiff", "YX", str(path))
    if expected is None:
        assert meta.pixel_size is None and meta.unit is None
    else:
        assert meta.pixel_size == pytest.approx(expected)
        assert meta.unit == "micrometer"


def _write_rgb_tiled(path: Path) -> np.ndarray:
    arr = _rng().integers(0, 255, (300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(path, arr, tile=(128, 128), compression="zlib", photometric="rgb")
    return arr


def test_rgb_tiled_tiff(tmp_path):
    path = tmp_path / "rgb.tiff"
    arr = _write_rgb_tiled(path)
    with dask.config.set(scheduler=_no_compute):
        opened = open_image(path)
    meta = _check(opened, arr)
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
    with dask.config.set(scheduler=_no_compute):
        data, _ = open_image(path, chunks=128)
    assert data.numblocks == (3, 4, 1)
    np.testing.assert_array_equal(data[:10, :10].compute(), arr[:10, :10])
    with pytest.raises(Exception):  # noqa: B017 - any decode error proves the tile was read
        data.compute()


def _write_pyramid_ome_tiff(path: Path) -> list[np.ndarray]:
    base = _rng().integers(0, 4000, (256, 320), dtype=np.uint16)
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
    meta = _check(open_image(path, level=level), levels[level][:, :, None])
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
    arr = _rng().integers(0, 255, (3, 50, 60), dtype=np.uint8)
    path = tmp_path / "cyx.tif"
    tifffile.imwrite(path, arr, **kwargs)
    meta = _check(open_image(path), arr.transpose(1, 2, 0))
    assert meta.axes == axes


def test_svs_pixel_size_and_levels(tmp_path):
    rgb = _rng().integers(0, 255, (512, 768, 3), dtype=np.uint8)
    header = "Aperio Image Library v11.2.1 \n768x512 [0,0 768x512] (256x256) JPEG/RGB Q=30"
    path = tmp_path / "slide.svs"
    with tifffile.TiffWriter(path) as tif:
        opts = {"photometric": "rgb", "metadata": None}
        tif.write(rgb, tile=(256, 256), description=header + "|AppMag = 20|MPP = 0.25", **opts)
        tif.write(rgb[::8, ::8], description=header + " -> 96x64", **opts)  # thumbnail
        tif.write(rgb[::4, ::4], tile=(64, 64), description=header + " -> 192x128", **opts)
    meta = _check(open_image(path), rgb)
    assert (meta.format, meta.axes, meta.pixel_size, meta.unit) == (
        "svs",
        "YXS",
        (0.25, 0.25),
        "micrometer",
    )
    meta = _check(open_image(path, level=1), rgb[::4, ::4])
    assert meta.pixel_size == pytest.approx((1.0, 1.0))


# --- PNG / JPEG / npy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((40, 50), np.uint8), ((40, 50), np.uint16), ((40, 50, 4), np.uint8), ((40, 50, 3), np.uint8)],
)
def test_png(tmp_path, shape, dtype):
    arr = _rng().integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    meta = _check(open_image(path), _yxc(arr))
    assert meta.format == "png"
    assert meta.axes == ("YX" if arr.ndim == 2 else "YXC")


@pytest.mark.parametrize("shape", [(64, 80), (64, 80, 3)])
def test_jpeg_is_close(tmp_path, shape):
    yy, xx = np.mgrid[:64, :80]
    arr = ((yy * 2 + xx) % 256).astype(np.uint8)
    if len(shape) == 3:
        arr = np.stack([arr, arr[::-1], 255 - arr], axis=-1)
    path = tmp_path / "img.jpg"
    Image.fromarray(arr).save(path, quality=95)
    data, meta = open_image(path)
    assert (meta.format, meta.shape, meta.dtype) == ("jpeg", _yxc(arr).shape, "uint8")
    diff = np.abs(data.compute().astype(int) - _yxc(arr).astype(int))
    assert diff.mean() < 3


def test_npy(tmp_path):
    arr = _rng().random((2, 60, 70), dtype=np.float32)
    path = tmp_path / "img.npy"
    np.save(path, arr)
    meta = _check(open_image(path), arr.transpose(1, 2, 0))
    assert (meta.format, meta.axes, meta.path) == ("npy", "CYX", str(path))


# --- pickling and distributed -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tiff", "zarr", "npy"])
def test_graph_pickles(tmp_path, kind):
    arr = _rng().integers(0, 255, (300, 400, 3), dtype=np.uint8)
    if kind == "tiff":
        path = tmp_path / "img.tif"
        tifffile.imwrite(path, arr, tile=(128, 128), photometric="rgb")
    elif kind == "zarr":
        path = tmp_path / "img.zarr"
        zarr.create_array(path, shape=arr.shape, chunks=(128, 128, 3), dtype=arr.dtype)[:] = arr
    else:
        path = tmp_path / "img.npy"
        np.save(path, arr)
    data, _ = open_image(path, chunks=128)
    data[:5, :5].compute()  # opens the file handle, which must not be pickled
    payload = cloudpickle.dumps(data)
    assert len(payload) < 50_000  # a recipe, not the pixels
    np.testing.assert_array_equal(cloudpickle.loads(payload).compute(), arr)


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


# --- errors --------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    path = tmp_path / "nope.tif"
    with pytest.raises(SourceNotFoundError, match="nope.tif"):
        open_image(path)
    with pytest.raises(FileNotFoundError):
        open_image(str(path))


def test_corrupt_tiff(tmp_path):
    path = tmp_path / "x.tif"
    path.write_bytes(b"this is not a tiff file at all" * 10)
    with pytest.raises(InputError, match="Cannot read TIFF") as info:
        open_image(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None


def test_corrupt_png_and_non_zarr_dir_and_corrupt_zarr(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG garbage")
    with pytest.raises(InputError, match="x.png"):
        open_image(png)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(InputError, match="not a Zarr store"):
        open_image(empty)
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{not json")
    with pytest.raises(InputError, match="Cannot read Zarr store"):
        open_image(bad)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "img.bmp"
    path.write_bytes(b"BM")
    with pytest.raises(InputError, match=r"img\.bmp.*\.tif.*\.png.*\.npy"):
        open_image(path)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 1, 3, 8, 9), r"\(2, 1, 3, 8, 9\).*arr\[0\]"),
        ((7,), r"\(7,\).*at least 2"),
        ((1, 1, 1, 1, 3, 8), r"\(1, 1, 1, 1, 3, 8\).*at most 5"),
        ((0, 10), r"\(0, 10\).*zero-size"),
        ((10, 20, 30), r"\(10, 20, 30\).*ambiguous.*axes="),
    ],
)
def test_bad_array_shapes(shape, match):
    with pytest.raises(InputError, match=match):
        open_image(np.zeros(shape, dtype=np.uint8))


def test_bad_options():
    arr = np.zeros((8, 9), dtype=np.uint8)
    with pytest.raises(InputError, match="ZYX"):
        open_image(arr, "ZYX")  # 3 letters for 2 dims
    with pytest.raises(InputError, match=r"Z=2"):
        open_image(np.zeros((2, 8, 9)), "ZYX")
    with pytest.raises(InputError, match="level=1"):
        open_image(arr, level=1)
    with pytest.raises(InputError, match="level"):
        open_image(arr, level=-1)
    with pytest.raises(InputError, match="chunks"):
        open_image(arr, chunks=(0, 4))
    with pytest.raises(InputError, match="complex"):
        open_image(arr.astype(np.complex64))
    with pytest.raises(InputError, match="list"):
        open_image([[1, 2], [3, 4]])


# --- real micrographs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "fmt"),
    [
        ("sofc.jpg", (896, 1024, 1), "jpeg"),
        ("needle_block.jpg", (629, 750, 3), "jpeg"),
        ("homogeneous_crop.tif", (896, 1008, 1), "tiff"),
    ],
)
def test_real_micrographs(name, shape, fmt):
    path = MICROGRAPHS / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    data, meta = open_image(path)
    assert (data.shape, meta.shape, meta.format, meta.dtype) == (shape, shape, fmt, "uint8")
    block = data[:16, :16].compute()
    assert block.shape == (16, 16, shape[2]) and block.dtype == np.uint8
