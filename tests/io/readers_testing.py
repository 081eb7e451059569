"""Helpers shared by the reader tests in ``tests/io`` (imported as ``readers_testing``)."""

from __future__ import annotations

import dask.array as da
import numpy as np

from hrdv2_dask.io.readers import ImageMeta, OpenedImage


def rng() -> np.random.Generator:
    """The same seeded generator in every test."""
    return np.random.default_rng(1234)


def no_compute(*args, **kwargs):
    """A dask scheduler that fails: ``dask.config.set(scheduler=no_compute)``."""
    raise AssertionError("open_image must not compute anything")


def yxc(arr: np.ndarray) -> np.ndarray:
    """``(y, x)`` or ``(y, x, c)`` as ``(y, x, c)``."""
    return arr[:, :, None] if arr.ndim == 2 else arr


def check_opened(opened: OpenedImage, expected_yxc: np.ndarray) -> ImageMeta:
    """Check ``(data, meta)`` against the expected ``(y, x, c)`` pixels; return ``meta``."""
    data, meta = opened
    assert isinstance(data, da.Array)
    assert data.shape == expected_yxc.shape
    assert data.dtype == expected_yxc.dtype
    assert data.numblocks[2] == 1
    assert meta.shape == expected_yxc.shape
    assert meta.dtype == expected_yxc.dtype.name
    np.testing.assert_array_equal(data.compute(), expected_yxc)
    return meta
