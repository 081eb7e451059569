"""Cosine similarity of every pixel to the mean feature of some query pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import dask.array as da
import numpy as np
import xarray as xr

from ..config import option
from ..errors import ConfigError, InputError
from ..io import outputs
from ._common import feature_data, run_attrs, wrap
from .collection import MemberOptions, is_tree, map_members, write_members
from .registry import register

__all__ = ["SimilarityOptions", "run_similarity", "similarity"]


def _is_array(value: Any) -> bool:
    """Python-only query values (numpy arrays), checked against the grid by the function."""
    return isinstance(value, np.ndarray)


def _non_empty(value: tuple) -> str | None:
    return None if len(value) else "a non-empty list of [y, x] pairs"


@dataclass(frozen=True)
class SimilarityOptions(MemberOptions):
    """The options of :func:`similarity`, of the ``similarity`` workflow step and of
    ``hrdv2 similarity``: exactly one of ``points`` and ``box``, in output cells."""

    SECTION: ClassVar[str] = "similarity"

    points: tuple[tuple[int, int], ...] | None = option(
        None,
        "query output cell (grid indices, not pixels), repeatable; the query is their mean",
        cli="--point",
        repeat=True,
        metavar="Y,X",
        check=_non_empty,
        fix="Give output cells as [[y, x], ...], e.g. [[10, 20]] (on the command line "
        "--point 10,20).",
        python_value=_is_array,
    )
    box: tuple[int, int, int, int] | None = option(
        None,
        "query rectangle of output cells, half-open; the query is its mean",
        metavar="Y0,X0,Y1,X1",
        fix="Give [y0, x0, y1, x1] in output cells, e.g. [0, 0, 8, 8].",
        python_value=_is_array,
    )

    def _check_together(self) -> None:
        if (self.points is None) == (self.box is None):
            raise ConfigError(
                "similarity needs exactly one of points: [[y, x], ...] or box: "
                "[y0, x0, y1, x1] (on the command line --point Y,X, repeatable, or "
                "--box Y0,X0,Y1,X1), not both or neither."
            )


def _query_points(points: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(points)
    if arr.ndim == 1 and arr.size == 2:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise InputError(
            f"points must be a non-empty list of (y, x) pairs, got {points!r}; e.g. "
            "points=[(10, 20)]."
        )
    if not np.issubdtype(arr.dtype, np.number) or not np.all(arr == np.round(arr)):
        raise InputError(
            f"points must be integer (y, x) output cells, got {points!r}; round them or divide "
            "pixel positions by out_stride first."
        )
    arr = arr.astype(np.int64)
    for y, x in arr:
        if not (0 <= y < shape[0] and 0 <= x < shape[1]):
            raise InputError(
                f"Query point (y={y}, x={x}) is outside the feature grid of shape {shape}; "
                f"use 0 <= y < {shape[0]} and 0 <= x < {shape[1]} (output cells, not pixels)."
            )
    return arr[:, 0], arr[:, 1]


def _query_box(box: Any, shape: tuple[int, int]) -> tuple[slice, slice]:
    vals = np.asarray(box)
    if vals.shape != (4,) or not np.issubdtype(vals.dtype, np.number):
        raise InputError(f"box must be (y0, x0, y1, x1), got {box!r}.")
    y0, x0, y1, x1 = (int(v) for v in vals)
    if not (0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1]):
        raise InputError(
            f"Query box (y0={y0}, x0={x0}, y1={y1}, x1={x1}) is empty or outside the feature "
            f"grid of shape {shape}; use 0 <= y0 < y1 <= {shape[0]} and 0 <= x0 < x1 <= "
            f"{shape[1]} (half-open, output cells)."
        )
    return slice(y0, y1), slice(x0, x1)


def _cosine_block(block: np.ndarray, query: np.ndarray, dtype: np.dtype) -> np.ndarray:
    n_feat, h, w = block.shape
    x = block.reshape(n_feat, h * w).astype(np.float32)
    q = np.asarray(query, dtype=np.float32)
    dot = q @ x
    norm = np.sqrt((x * x).sum(axis=0)) * np.float32(np.sqrt(q @ q))
    return (dot / np.maximum(norm, np.float32(1e-12))).astype(dtype).reshape(h, w)


def similarity(
    features: xr.DataArray,
    *,
    points: Sequence[tuple[int, int]] | np.ndarray | None = SimilarityOptions.points,
    box: tuple[int, int, int, int] | np.ndarray | None = SimilarityOptions.box,
    images: tuple[str, ...] | None = SimilarityOptions.images,
    dtype: str | np.dtype = "float32",
) -> xr.DataArray | xr.DataTree:
    """Cosine similarity of every pixel to the mean feature of some query pixels, lazily.

    Parameters
    ----------
    features : xarray.DataArray or xarray.DataTree
        ``(feature, y, x)`` features, or a collection: each member's map to its own query.
    points : sequence of (int, int), optional
        Query output cells ``(y, x)`` (grid indices, not source pixels: divide by
        ``out_stride``); also an ``(n, 2)`` integer array.
    box : (int, int, int, int), optional
        Query rectangle ``(y0, x0, y1, x1)`` of output cells, half-open. Give exactly one of
        ``points`` and ``box``.
    images : tuple of str, optional
        On a collection: the member keys (default all).
    dtype : str or numpy.dtype, optional
        ``"float32"`` or ``"float16"``; computations are float32 either way.

    Returns
    -------
    xarray.DataArray
        ``(y, x)`` similarity in ``[-1, 1]``, dask-backed; the query mean is part of the graph
        (nothing is computed here). NaN where the query or pixel features are NaN.

    Raises
    ------
    InputError
        A point or box outside the grid (the message names it and the grid shape).
    ConfigError
        Neither or both of ``points`` and ``box``, or a malformed one (the message is that of
        :class:`SimilarityOptions`); an unsupported ``dtype``.

    Examples
    --------
    >>> f = xr.DataArray(np.ones((2, 4, 4), np.float32), dims=("feature", "y", "x"))
    >>> sim = similarity(f, points=[(0, 0)])
    >>> sim.dims, round(float(sim.min()), 4)
    (('y', 'x'), 1.0)
    """
    options = SimilarityOptions(points=points, box=box, images=images)
    return _similarity(features, options, dtype=dtype)


def _similarity(
    features: xr.DataArray | xr.DataTree,
    options: SimilarityOptions,
    *,
    dtype: str | np.dtype = "float32",
) -> xr.DataArray | xr.DataTree:
    if is_tree(features):
        return map_members(
            features, lambda arr: _similarity(arr, options, dtype=dtype), options.images
        )
    features, data = feature_data(features)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ConfigError(f"dtype must be 'float32' or 'float16', got {str(dtype)!r}.")
    shape = data.shape[1:]
    if options.points is not None:
        ys, xs = _query_points(options.points, shape)
        query = data.vindex[:, ys, xs].astype(np.float32).mean(axis=0)
        what = {"query_points": [[int(y), int(x)] for y, x in zip(ys, xs, strict=True)]}
    else:
        sy, sx = _query_box(options.box, shape)
        query = data[:, sy, sx].astype(np.float32).mean(axis=(1, 2))
        what = {"query_box": [sy.start, sx.start, sy.stop, sx.stop]}
    query = query.rechunk(-1)
    out = da.blockwise(
        _cosine_block,
        "yx",
        data,
        "fyx",
        query,
        "f",
        dtype,
        None,
        concatenate=True,
        dtype=dtype,
        meta=np.empty((0, 0), dtype),
    )
    return wrap(out, ("y", "x"), features, name="similarity", attrs=what)


@register(
    "similarity", SimilarityOptions, help="cosine similarity to query pixels", function=similarity
)
def run_similarity(
    options: SimilarityOptions, features: xr.DataArray | xr.DataTree, out: Path
) -> dict:
    """Write ``similarity.zarr`` (float16) and ``similarity.png`` under ``out`` (per member
    for a collection, each to its own query)."""

    def write_one(arr: xr.DataArray, folder: Path) -> dict:
        sim = _similarity(arr, options, dtype="float16")
        outputs.write_array(
            sim, folder / "similarity.zarr", attrs=run_attrs(options), overwrite=True
        )
        outputs.write_png(sim, folder / "similarity.png")
        return {"similarity": [str(folder / "similarity.zarr"), str(folder / "similarity.png")]}

    return write_members(features, out, write_one, images=options.images, picture="similarity.png")
