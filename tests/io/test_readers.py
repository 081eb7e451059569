"""Tests of :mod:`hrdv2_dask.io.readers`: the registry, ImageMeta, arrays, pickling, errors.

Each format's reader has its own file (``test_readers_zarr.py``, ``test_readers_tiff.py``,
``test_readers_pillow.py``); shared helpers are in ``readers_testing.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cloudpickle
import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from readers_testing import check_opened, rng

from hrdv2_dask.errors import InputError, SourceNotFoundError
from hrdv2_dask.io.readers import (
    FORMATS,
    READERS,
    ImageMeta,
    Reader,
    find_reader,
    open_image,
    registry,
)

# --- the registry --------------------------------------------------------------------------------


def _write_one_of_each(tmp_path: Path) -> dict[str, list[object]]:
    """Reader name -> sources of its format: real, small files for the file formats."""
    img = rng().integers(0, 255, (8, 9, 3), dtype=np.uint8)
    zarr.create_array(tmp_path / "a.zarr", shape=img.shape, dtype=img.dtype)[:] = img
    plain_dir = tmp_path / "plain_dir.tif"  # a folder is never a TIFF, whatever its name
    plain_dir.mkdir()
    for name in ("a.tif", "b.TIFF", "c.svs", "d.btf", "e.tf8"):
        tifffile.imwrite(tmp_path / name, img, photometric="rgb")
    for name in ("a.png", "b.jpg", "c.JPEG"):
        Image.fromarray(img).save(tmp_path / name)
    np.save(tmp_path / "a.npy", img)
    return {
        "dask": [da.from_array(img)],
        "numpy": [img, img[..., 0]],
        "zarr": [tmp_path / "a.zarr", str(tmp_path / "a.zarr"), plain_dir],
        "tiff": [tmp_path / n for n in ("a.tif", "b.TIFF", "c.svs", "d.btf", "e.tf8")],
        "pillow": [tmp_path / "a.png", str(tmp_path / "b.jpg"), tmp_path / "c.JPEG"],
        "npy": [tmp_path / "a.npy"],
    }


def test_registry_lists_every_reader_once_in_priority_order():
    assert [r.name for r in READERS] == ["dask", "numpy", "zarr", "tiff", "pillow", "npy"]
    formats = [f for r in READERS for f in r.formats]
    assert sorted(formats) == sorted(FORMATS)  # every format has exactly one reader


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.name)
def test_each_reader_claims_its_own_format_and_no_other(tmp_path, reader):
    sources = _write_one_of_each(tmp_path)
    assert set(sources) == {r.name for r in READERS}
    for owner, examples in sources.items():
        for source in examples:
            assert reader.can_open(source) == (owner == reader.name), (reader.name, source)
    for other in (tmp_path / "a.bmp", tmp_path / "a", [[1, 2]], 3, None):
        assert not reader.can_open(other)


def test_each_source_opens_with_its_readers_formats(tmp_path):
    for owner, examples in _write_one_of_each(tmp_path).items():
        reader = next(r for r in READERS if r.name == owner)
        for source in examples:
            assert find_reader(source) is reader
            if owner == "zarr" and Path(source).name == "plain_dir.tif":
                with pytest.raises(InputError, match="not a Zarr store"):
                    open_image(source)  # the Zarr reader says what the folder is not
            else:
                assert open_image(source).meta.format in reader.formats


def test_open_image_asks_the_readers_in_order_and_stops_at_the_first(monkeypatch):
    asked: list[str] = []

    def fake(name: str, claims: bool) -> Reader:
        def can_open(source):
            asked.append(name)
            return claims

        def open_(source, axes, *, level, chunks_yx):
            return name, axes, level, chunks_yx

        return Reader(name, ("numpy",), can_open=can_open, open=open_)

    readers = (fake("first", False), fake("second", True), fake("third", True))
    monkeypatch.setattr(registry, "READERS", readers)
    assert open_image(np.zeros((4, 4)), "YX", level=1, chunks=2) == ("second", "YX", 1, (2, 2))
    assert asked == ["first", "second"]
    asked.clear()
    monkeypatch.setattr(registry, "READERS", readers[:1])
    with pytest.raises(InputError, match="Cannot open a source of type ndarray"):
        open_image(np.zeros((4, 4)))
    assert asked == ["first"]


def test_find_reader_returns_none_when_no_reader_claims(tmp_path):
    assert find_reader(tmp_path / "img.bmp") is None
    assert find_reader([[1, 2]]) is None
    assert find_reader(np.zeros(2), ()) is None


@pytest.mark.parametrize("formats", [("bmp",), (), "numpy"])
def test_reader_rejects_unknown_formats(formats):
    with pytest.raises(InputError, match="formats must be"):
        Reader("x", formats, can_open=bool, open=open_image)


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
    arr = rng().integers(0, 255, shape, dtype=np.uint8)
    meta = check_opened(open_image(arr, axes), to_yxc(arr))
    assert meta.format == "numpy"
    assert meta.axes == expected_axes
    assert meta.path is None and meta.pixel_size is None and meta.level == 0


def test_numpy_chunks_option():
    arr = rng().random((100, 90, 3), dtype=np.float32)
    data, _ = open_image(arr, chunks=32)
    assert data.chunks[:2] == ((32, 32, 32, 4), (32, 32, 26))
    data, _ = open_image(arr, chunks=(50, 45))
    assert data.chunksize == (50, 45, 3)
    np.testing.assert_array_equal(data.compute(), arr)


def test_dask_input_keeps_chunks_and_merges_channels():
    arr = rng().integers(0, 1000, (3, 64, 48), dtype=np.uint16)
    src = da.from_array(arr, chunks=(1, 16, 24))
    data, meta = open_image(src)
    assert meta.format == "dask" and meta.axes == "CYX"
    assert data.chunks == ((16, 16, 16, 16), (24, 24), (3,))
    np.testing.assert_array_equal(data.compute(), arr.transpose(1, 2, 0))
    data, _ = open_image(src, chunks=32)
    assert data.chunks == ((32, 32), (32, 16), (3,))


def test_dask_grayscale_5d():
    arr = rng().random((1, 1, 1, 20, 30))
    meta = check_opened(open_image(da.from_array(arr, chunks=10)), arr[0, 0, 0][:, :, None])
    assert meta.axes == "TZCYX" and meta.dtype == "float64"


# --- npy ----------------------------------------------------------------------------------------


def test_npy(tmp_path):
    arr = rng().random((2, 60, 70), dtype=np.float32)
    path = tmp_path / "img.npy"
    np.save(path, arr)
    meta = check_opened(open_image(path), arr.transpose(1, 2, 0))
    assert (meta.format, meta.axes, meta.path) == ("npy", "CYX", str(path))


# --- pickling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tiff", "zarr", "npy"])
def test_graph_pickles(tmp_path, kind):
    arr = rng().integers(0, 255, (300, 400, 3), dtype=np.uint8)
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


# --- errors --------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    path = tmp_path / "nope.tif"
    with pytest.raises(SourceNotFoundError, match="nope.tif"):
        open_image(path)
    with pytest.raises(FileNotFoundError):
        open_image(str(path))


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
