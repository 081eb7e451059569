"""Cosine similarity of every pixel to the mean feature of some query pixels.

Two kinds of query, one of which is given:

* ``points`` / ``box``: output cells of the same store (on a collection, of each member: each
  member's map is to its own query);
* reference queries ``query`` / ``query_box`` / ``query_mask``: ``KEY:Y,X``,
  ``KEY:Y0,X0,Y1,X1`` and ``KEY:MASK`` in source-image pixels on named members
  (:mod:`.queries`); the mean feature of all of them is the one query every member is
  compared with ("segment with a reference image"). ``threshold`` also gives masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
from .collection import MemberOptions, is_tree, map_members, member_data, write_members
from .queries import as_texts, describe_queries, parse_queries, query_vector
from .registry import register

__all__ = ["SimilarityOptions", "cosine_map", "run_similarity", "similarity"]


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

    query: tuple[str, ...] = option(
        (),
        "reference query KEY:Y,X in source pixels on member KEY (KEY: may be left out on one "
        "store), repeatable; every member is compared with the mean of all queries",
        repeat=True,
        metavar="KEY:Y,X",
    )
    query_box: tuple[str, ...] = option(
        (), "reference query box KEY:Y0,X0,Y1,X1 in source pixels, repeatable", repeat=True,
        metavar="KEY:Y0,X0,Y1,X1",
    )  # fmt: skip
    query_mask: tuple[str, ...] = option(
        (), "reference query mask KEY:MASK (an image at source resolution, nonzero = query), "
        "repeatable", repeat=True, metavar="KEY:MASK",
    )  # fmt: skip
    threshold: float | None = option(
        None,
        "also write similarity_mask (1 where similarity >= T); in Python: return that mask",
        minimum=-1,
        maximum=1,
        metavar="T",
    )

    @property
    def references(self) -> bool:
        """Whether the query is given as reference queries (source pixels on members)."""
        return bool(self.query or self.query_box or self.query_mask)

    def _check_together(self) -> None:
        given = (self.points is not None) + (self.box is not None) + self.references
        if given != 1:
            raise ConfigError(
                "similarity needs exactly one of points: [[y, x], ...] or box: "
                "[y0, x0, y1, x1] (on the command line --point Y,X, repeatable, or "
                "--box Y0,X0,Y1,X1), or reference queries (query, query_box, query_mask: "
                "--query KEY:Y,X ...), not several or none."
            )
        parse_queries(self.query, self.query_box, self.query_mask)  # malformed: one line


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
    query: Sequence[str] = SimilarityOptions.query,
    query_box: Sequence[str] = SimilarityOptions.query_box,
    query_mask: Sequence[str] = SimilarityOptions.query_mask,
    threshold: float | None = SimilarityOptions.threshold,
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
        Query rectangle ``(y0, x0, y1, x1)`` of output cells, half-open.
    query, query_box, query_mask : sequence of str, optional
        Reference queries ``KEY:Y,X``, ``KEY:Y0,X0,Y1,X1`` (half-open) and ``KEY:MASK`` (an
        image file at the source's resolution) in source-image pixels on the member ``KEY``
        (left out on one store): every member is compared with the mean feature of all
        their cells (read now: only the chunks they touch). Give exactly one of ``points``,
        ``box`` and these.
    threshold : float, optional
        Return the ``uint8`` mask ``similarity >= threshold`` (``similarity_mask``) instead
        of the map.
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
    options = SimilarityOptions(
        points=points,
        box=box,
        query=as_texts(query),
        query_box=as_texts(query_box),
        query_mask=as_texts(query_mask),
        threshold=threshold,
        images=images,
    )
    out = _similarity(features, options, dtype=dtype)
    if threshold is None:
        return out
    if not is_tree(out):
        return _mask(out, threshold)
    nodes = {"/": xr.Dataset(attrs=dict(out.attrs))}
    for key in out.children:
        nodes[f"/{key}"] = _mask(out[key]["similarity"], threshold).to_dataset()
    return xr.DataTree.from_dict(nodes)


def _mask(sim: xr.DataArray, threshold: float) -> xr.DataArray:
    """``similarity >= threshold`` as uint8 (0 where the similarity is NaN)."""
    mask = (sim >= threshold).astype(np.uint8)
    mask.name = "similarity_mask"
    mask.attrs = {**sim.attrs, "threshold": float(threshold)}
    return mask


def _reference_query(
    features: xr.DataArray | xr.DataTree, options: SimilarityOptions
) -> tuple[np.ndarray, dict[str, Any]]:
    """The mean feature of the reference queries (computed) and its description."""
    queries = parse_queries(options.query, options.query_box, options.query_mask)
    if is_tree(features):
        mems = {key: member_data(features, key) for key in features.children}
        where = "the collection"
    else:
        mems = {None: features}
        where = "one store"
        for q in queries:
            if q.key is not None:
                raise InputError(
                    f"The query names member {q.key!r} but the features are one store; "
                    f"drop {q.key + ':'!r} or pass the collection store."
                )
    vector = query_vector(mems, queries, where=where)
    return vector, {"queries": describe_queries(queries)}


def _reference_map(
    features: xr.DataArray | xr.DataTree, options: SimilarityOptions, dtype: np.dtype
) -> Callable[[xr.DataArray], xr.DataArray]:
    """``one(member) -> its lazy map`` to the mean of the reference queries (read now)."""
    vector, what = _reference_query(features, options)

    def one(arr: xr.DataArray) -> xr.DataArray:
        arr, data = feature_data(arr)
        if data.shape[0] != vector.shape[0]:
            raise InputError(
                f"The query has {vector.shape[0]} features but a member has {data.shape[0]}; "
                "compare members made with one backbone."
            )
        return cosine_map(arr, data, da.from_array(vector, chunks=-1), what, dtype)

    return one


def _similarity(
    features: xr.DataArray | xr.DataTree,
    options: SimilarityOptions,
    *,
    dtype: str | np.dtype = "float32",
) -> xr.DataArray | xr.DataTree:
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ConfigError(f"dtype must be 'float32' or 'float16', got {str(dtype)!r}.")
    if options.references:
        one = _reference_map(features, options, dtype)
        return map_members(features, one, options.images) if is_tree(features) else one(features)
    if is_tree(features):
        return map_members(
            features, lambda arr: _similarity(arr, options, dtype=dtype), options.images
        )
    features, data = feature_data(features)
    shape = data.shape[1:]
    if options.points is not None:
        ys, xs = _query_points(options.points, shape)
        query = data.vindex[:, ys, xs].astype(np.float32).mean(axis=0)
        what = {"query_points": [[int(y), int(x)] for y, x in zip(ys, xs, strict=True)]}
    else:
        sy, sx = _query_box(options.box, shape)
        query = data[:, sy, sx].astype(np.float32).mean(axis=(1, 2))
        what = {"query_box": [sy.start, sx.start, sy.stop, sx.stop]}
    return cosine_map(features, data, query.rechunk(-1), what, dtype)


def cosine_map(
    features: xr.DataArray, data: da.Array, query: da.Array, what: dict, dtype: np.dtype
) -> xr.DataArray:
    """The lazy cosine similarity of every cell of ``data`` to one query vector.

    Parameters
    ----------
    features : xarray.DataArray
        The ``(feature, y, x)`` features ``data`` comes from (coordinates and attributes).
    data : dask.array.Array
        Its ``(feature, y, x)`` values, the feature axis one chunk.
    query : dask.array.Array
        The ``(feature,)`` query vector, one chunk.
    what : dict
        The attributes of the result (how the query was made).
    dtype : numpy.dtype
        The result's dtype.

    Returns
    -------
    xarray.DataArray
        ``(y, x)`` similarity named ``similarity``, one task per ``(y, x)`` chunk.
    """
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
    for a collection: each to its own query, or all to the reference queries), and with a
    ``threshold`` ``similarity_mask.zarr`` and ``.png``."""
    if options.references:
        reference = _reference_map(features, options, np.dtype(np.float16))

    def write_one(arr: xr.DataArray, folder: Path) -> dict:
        if options.references:
            sim = reference(arr)
        else:
            sim = _similarity(arr, options, dtype="float16")
        outputs.write_array(
            sim, folder / "similarity.zarr", attrs=run_attrs(options), overwrite=True
        )
        outputs.write_png(sim, folder / "similarity.png")
        written = {"similarity": [str(folder / "similarity.zarr"), str(folder / "similarity.png")]}
        if options.threshold is not None:
            mask = _mask(sim, options.threshold)
            outputs.write_labels(
                mask, folder / "similarity_mask.zarr", attrs=run_attrs(options), overwrite=True
            )
            outputs.write_png(mask, folder / "similarity_mask.png")
            written["similarity_mask"] = [
                str(folder / "similarity_mask.zarr"),
                str(folder / "similarity_mask.png"),
            ]
        return written

    return write_members(features, out, write_one, images=options.images, picture="similarity.png")
