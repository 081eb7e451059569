"""Tests of the PNG/JPEG reader (:mod:`hrdv2_dask.io.readers.pillow`) and real micrographs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from readers_testing import check_opened, rng, yxc

from hrdv2_dask.io.readers import open_image


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((40, 50), np.uint8), ((40, 50), np.uint16), ((40, 50, 4), np.uint8), ((40, 50, 3), np.uint8)],
)
def test_png(tmp_path, shape, dtype):
    arr = rng().integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    meta = check_opened(open_image(path), yxc(arr))
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
    assert (meta.format, meta.shape, meta.dtype) == ("jpeg", yxc(arr).shape, "uint8")
    diff = np.abs(data.compute().astype(int) - yxc(arr).astype(int))
    assert diff.mean() < 3


@pytest.mark.parametrize(
    ("name", "shape", "fmt"),
    [
        ("sofc.jpg", (896, 1024, 1), "jpeg"),
        ("needle_block.jpg", (629, 750, 3), "jpeg"),
        ("homogeneous_crop.tif", (896, 1008, 1), "tiff"),
    ],
)
def test_real_micrographs(micrographs, name, shape, fmt):
    path = micrographs / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    data, meta = open_image(path)
    assert (data.shape, meta.shape, meta.format, meta.dtype) == (shape, shape, fmt, "uint8")
    block = data[:16, :16].compute()
    assert block.shape == (16, 16, shape[2]) and block.dtype == np.uint8
