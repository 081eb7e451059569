"""Readers of in-memory arrays: dask arrays (chunks kept) and numpy arrays (2048 px chunks).

:data:`DASK_READER` claims every :class:`dask.array.Array`, :data:`NUMPY_READER` every
:class:`numpy.ndarray`; neither reads files.
"""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np

from hrdv2_dask.errors import InputError

from ._base import (
    _SINGLE_PLANE_FIX,
    OpenedImage,
    Reader,
    _check_dtype,
    _check_single_level,
    _finish,
)
from ._layout import _plan_axes, _raw_chunks, _to_yxc


def can_open_dask(source: Any) -> bool:
    """Whether ``source`` is a dask array."""
    return isinstance(source, da.Array)


def can_open_numpy(source: Any) -> bool:
    """Whether ``source`` is a numpy array."""
    return isinstance(source, np.ndarray)


def _open_dask(
    arr: da.Array,
    axes: str | None,
    *,
    level: int,
    chunks_yx: tuple[int, int] | None,
    plane: int | None = None,
) -> OpenedImage:
    if any(isinstance(s, float) and math.isnan(s) for s in arr.shape):
        raise InputError(
            f"The dask array has unknown dimension sizes {arr.shape}; call "
            "arr.compute_chunk_sizes() first."
        )
    what = f"dask array of shape {arr.shape}"
    _check_single_level(level, what)
    _check_dtype(arr.dtype, what)
    plan = _plan_axes(
        arr.shape, axes, from_metadata=False, what=what, fix=_SINGLE_PLANE_FIX, plane=plane
    )
    data = _to_yxc(arr, plan)
    rechunk: dict[int, Any] = {}
    if chunks_yx is not None:
        rechunk = {0: chunks_yx[0], 1: chunks_yx[1]}
    if data.numblocks[2] != 1:
        rechunk[2] = -1
    if rechunk:
        data = data.rechunk(rechunk)
    return _finish(
        data,
        path=None,
        fmt="dask",
        axes=plan.axes,
        level=level,
        plane=plan.plane_info(arr.shape),
    )


def _open_numpy(
    arr: np.ndarray,
    axes: str | None,
    *,
    level: int,
    chunks_yx: tuple[int, int] | None,
    plane: int | None = None,
) -> OpenedImage:
    what = f"numpy array of shape {arr.shape}"
    _check_single_level(level, what)
    _check_dtype(arr.dtype, what)
    plan = _plan_axes(
        arr.shape, axes, from_metadata=False, what=what, fix=_SINGLE_PLANE_FIX, plane=plane
    )
    raw_chunks = _raw_chunks(arr.shape, plan, None, chunks_yx)
    data = da.from_array(np.asarray(arr), chunks=raw_chunks)
    return _finish(
        _to_yxc(data, plan),
        path=None,
        fmt="numpy",
        axes=plan.axes,
        level=level,
        plane=plan.plane_info(arr.shape),
    )


#: Dask arrays, format ``"dask"``.
DASK_READER = Reader("dask", ("dask",), can_open=can_open_dask, open=_open_dask)
#: Numpy arrays, format ``"numpy"``.
NUMPY_READER = Reader("numpy", ("numpy",), can_open=can_open_numpy, open=_open_numpy)
