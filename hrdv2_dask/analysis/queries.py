"""Reference queries: ``KEY:Y,X``, ``KEY:Y0,X0,Y1,X1`` and ``KEY:MASK`` in source pixels.

A query names a member of a store or collection (the key may be left out on a single store)
and a place in its source image, in source-image pixels. :func:`parse_query` reads the
command-line text (pure); :func:`query_cells` maps a query onto the member's output grid
(``out_stride`` px per cell) and checks it lies inside; :func:`query_vector` reads the query's
cells (only the chunks they touch) and returns the query feature.

Examples
--------
>>> parse_query("z003:120,64", "point")
Query(kind='point', key='z003', values=(120, 64), path=None)
>>> parse_query("8,8,40,40", "box").key is None
True
>>> query_cells(parse_query("a:120,64", "point"), grid=(50, 40), out_stride=4)
(slice(30, 31, None), slice(16, 17, None))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from ..errors import ConfigError, InputError

__all__ = [
    "KINDS",
    "Query",
    "as_texts",
    "parse_query",
    "parse_queries",
    "query_cells",
    "query_vector",
    "resolve_key",
]

#: Query kinds and the command-line syntax of each.
KINDS = {"point": "KEY:Y,X", "box": "KEY:Y0,X0,Y1,X1", "mask": "KEY:MASK"}
_N_VALUES = {"point": 2, "box": 4}


@dataclass(frozen=True)
class Query:
    """One reference query.

    Parameters
    ----------
    kind : {"point", "box", "mask"}
        A source pixel, a half-open pixel rectangle, or a mask image.
    key : str or None
        The member it is on; None on a single store.
    values : tuple of int
        ``(y, x)`` or ``(y0, x0, y1, x1)`` in source pixels; empty for a mask.
    path : str or None
        The mask image (at source resolution, nonzero = query), for ``kind="mask"``.
    """

    kind: str
    key: str | None
    values: tuple[int, ...] = ()
    path: str | None = None


def parse_query(text: str, kind: str) -> Query:
    """Read one query written ``KEY:Y,X`` (point), ``KEY:Y0,X0,Y1,X1`` (box) or ``KEY:MASK``.

    ``KEY:`` may be left out (a single store). Points and boxes split at the last colon (keys
    may hold one), masks at the first (paths may).

    Raises
    ------
    ConfigError
        Malformed text: the message shows it and the expected syntax.

    Examples
    --------
    >>> parse_query("a:b:1,2", "point").key
    'a:b'
    >>> parse_query("im0:masks/q.png", "mask")
    Query(kind='mask', key='im0', values=(), path='masks/q.png')
    >>> parse_query("im0:1,2,3", "point")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hrdv2_dask.errors.ConfigError: Query 'im0:1,2,3' is not KEY:Y,X ...
    """
    if kind not in KINDS:
        raise ConfigError(f"Query kind must be one of {sorted(KINDS)}, got {kind!r}.")
    syntax = KINDS[kind]
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"A {kind} query must be text {syntax}, got {text!r}.")
    text = text.strip()
    if kind == "mask":
        key, sep, path = text.partition(":")
        if not sep:
            key, path = "", text
        if not path:
            raise ConfigError(f"Query {text!r} is not {syntax}: the mask path is missing.")
        return Query("mask", key or None, (), path)
    key, _, numbers = text.rpartition(":")
    try:
        values = tuple(int(v) for v in numbers.split(","))
    except ValueError:
        values = ()
    if len(values) != _N_VALUES[kind]:
        example = "z000:120,64" if kind == "point" else "z000:0,0,64,64"
        raise ConfigError(
            f"Query {text!r} is not {syntax} (source-image pixels, integers), e.g. {example}; "
            "the key may be left out on a single store."
        )
    if kind == "box" and not (values[0] < values[2] and values[1] < values[3]):
        raise ConfigError(
            f"Query box {text!r} is empty: it needs Y0 < Y1 and X0 < X1 (half-open, pixels)."
        )
    return Query(kind, key or None, values)


def as_texts(value: Any) -> Any:
    """One query text as a tuple of one; anything else unchanged (the options check it).

    >>> as_texts("a:1,2"), as_texts(["a:1,2", "b:3,4"])
    (('a:1,2',), ['a:1,2', 'b:3,4'])
    """
    return (value,) if isinstance(value, str) else value


def parse_queries(
    points: Sequence[str] = (), boxes: Sequence[str] = (), masks: Sequence[str] = ()
) -> list[Query]:
    """All queries of the ``--query``, ``--query-box`` and ``--query-mask`` options."""
    return [
        *(parse_query(t, "point") for t in points or ()),
        *(parse_query(t, "box") for t in boxes or ()),
        *(parse_query(t, "mask") for t in masks or ()),
    ]


def resolve_key(query: Query, keys: Sequence[str], where: str = "") -> str:
    """The member ``query`` is on: its key, or the only member when it has none.

    Raises
    ------
    InputError
        An unknown key, or no key with several members.
    """
    keys = list(keys)
    if query.key is None:
        if len(keys) == 1:
            return keys[0]
        raise InputError(
            f"The query {_describe(query)} names no member but {where or 'the input'} has "
            f"{len(keys)}; write it {KINDS[query.kind]} with KEY one of {_some(keys)}."
        )
    if query.key not in keys:
        import difflib

        hint = difflib.get_close_matches(query.key, keys, n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise InputError(
            f"Unknown member {query.key!r} in the query {_describe(query)} "
            f"({where or 'the input'}).{extra} Members: {_some(keys)}."
        )
    return query.key


def _some(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _describe(query: Query) -> str:
    if query.kind == "mask":
        return f"{query.kind} {query.path!r}"
    return f"{query.kind} {','.join(str(v) for v in query.values)}"


def query_cells(
    query: Query,
    *,
    grid: tuple[int, int],
    out_stride: int,
    source_shape: tuple[int, int] | None = None,
) -> tuple[slice, slice]:
    """The output cells of a point or box query, as ``(rows, cols)`` slices of the grid.

    A source pixel ``p`` lies in cell ``p // out_stride`` (cell ``i`` covers pixels
    ``i*s .. i*s + s - 1``, centred at the store's coordinate ``i*s + (s-1)/2``); a box
    ``[y0, y1)`` covers the cells ``y0 // s .. ceil(y1 / s) - 1``.

    Raises
    ------
    InputError
        The query lies (partly) outside the source image or the grid; the message gives both.

    Examples
    --------
    >>> query_cells(Query("box", "a", (10, 0, 21, 8)), grid=(8, 8), out_stride=4)
    (slice(2, 6, None), slice(0, 2, None))
    >>> query_cells(Query("point", "a", (40, 0)), grid=(8, 8), out_stride=4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hrdv2_dask.errors.InputError: The query point 40,0 on 'a' is outside its image: ...
    """
    s = int(out_stride)
    limit = tuple(source_shape) if source_shape is not None else (grid[0] * s, grid[1] * s)
    if query.kind == "point":
        y, x = query.values
        inside = 0 <= y < limit[0] and 0 <= x < limit[1]
        rows, cols = slice(y // s, y // s + 1), slice(x // s, x // s + 1)
    elif query.kind == "box":
        y0, x0, y1, x1 = query.values
        inside = 0 <= y0 < y1 <= limit[0] and 0 <= x0 < x1 <= limit[1]
        rows, cols = slice(y0 // s, -(-y1 // s)), slice(x0 // s, -(-x1 // s))
    else:
        raise ConfigError(f"query_cells takes point and box queries, got a {query.kind} query.")
    inside = inside and rows.stop <= grid[0] and cols.stop <= grid[1]
    if not inside:
        raise InputError(
            f"The query {_describe(query)} on {query.key!r} is outside its image: use "
            f"0 <= y < {limit[0]} and 0 <= x < {limit[1]} (source pixels; its grid is "
            f"{grid[0]}x{grid[1]} cells of {s} px)."
        )
    return rows, cols


def mask_cells(mask: np.ndarray, *, grid: tuple[int, int], out_stride: int) -> np.ndarray:
    """A source-resolution mask as a ``grid`` bool array: cells at least half inside.

    >>> m = np.zeros((8, 8), bool); m[:4, :3] = True
    >>> mask_cells(m, grid=(2, 2), out_stride=4).astype(int).tolist()
    [[1, 0], [0, 0]]
    """
    s = int(out_stride)
    h, w = mask.shape
    padded = np.zeros((grid[0] * s, grid[1] * s), np.float32)
    padded[:h, :w] = mask != 0
    return padded.reshape(grid[0], s, grid[1], s).mean(axis=(1, 3)) >= 0.5


def _read_mask(query: Query, source_shape: tuple[int, int]) -> np.ndarray:
    from ..io.readers import open_image

    data, _ = open_image(query.path)
    if tuple(data.shape[:2]) != tuple(source_shape):
        raise InputError(
            f"Query mask {query.path!r} is {data.shape[0]}x{data.shape[1]} px but the image of "
            f"{query.key!r} is {source_shape[0]}x{source_shape[1]}; draw the mask at the "
            "image's resolution."
        )
    return np.asarray(data[..., 0].compute()) != 0


def _grid_info(features: xr.DataArray) -> tuple[tuple[int, int], int, tuple[int, int] | None]:
    grid = (features.sizes["y"], features.sizes["x"])
    stride = int(features.attrs.get("out_stride", 1))
    shape = features.attrs.get("source_shape")
    return grid, stride, (tuple(int(v) for v in shape[:2]) if shape else None)


def query_vector(
    members: Mapping[str, xr.DataArray],
    queries: Sequence[Query],
    *,
    normalise: bool = False,
    where: str = "",
) -> np.ndarray:
    """The mean feature of every query's cells (float32, ``(feature,)``), computed now.

    Only the chunks the queries touch are read. Cells with a NaN feature (masked) are left
    out. With ``normalise`` each cell's feature is L2-normalised before the mean (the region
    embeddings of :mod:`.retrieval`).

    Raises
    ------
    InputError
        An unknown key, a query outside its member's grid, a mask of the wrong size, or
        queries that fall on masked cells only.
    """
    from ._common import feature_data

    if not queries:
        raise ConfigError(
            "No query given; pass --query KEY:Y,X, --query-box KEY:Y0,X0,Y1,X1 or "
            "--query-mask KEY:MASK (source-image pixels)."
        )
    total: np.ndarray | None = None
    count = 0
    keys = list(members)
    for query in queries:
        key = resolve_key(query, keys, where)
        query = Query(query.kind, key, query.values, query.path)
        features, data = feature_data(members[key])
        grid, stride, source_shape = _grid_info(features)
        if query.kind == "mask":
            cells = mask_cells(
                _read_mask(query, source_shape or (grid[0] * stride, grid[1] * stride)),
                grid=grid,
                out_stride=stride,
            )
            ys, xs = np.nonzero(cells)
            if not len(ys):
                raise InputError(f"Query mask {query.path!r} on {key!r} covers no output cell.")
            rows, cols = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
            block = np.asarray(data[:, rows, cols].compute(), np.float32)
            vals = block[:, cells[rows, cols]]
        else:
            rows, cols = query_cells(query, grid=grid, out_stride=stride, source_shape=source_shape)
            block = np.asarray(data[:, rows, cols].compute(), np.float32)
            vals = block.reshape(block.shape[0], -1)
        vals = vals[:, np.isfinite(vals).all(axis=0)]
        if normalise:
            norm = np.sqrt((vals * vals).sum(axis=0))
            vals = vals[:, norm > 0] / norm[norm > 0]
        if total is None:
            total = np.zeros(vals.shape[0], np.float64)
        elif vals.shape[0] != total.shape[0]:
            raise InputError(
                f"The query on {key!r} has {vals.shape[0]} features, others {total.shape[0]}; "
                "query members of one collection (made with one backbone)."
            )
        total += vals.sum(axis=1, dtype=np.float64)
        count += vals.shape[1]
    if count == 0:
        raise InputError(
            "Every query cell is masked (NaN features: no window computed there); query a "
            "place inside the image's foreground."
        )
    mean = (total / count).astype(np.float32)
    if normalise:
        mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return mean


def describe_queries(queries: Sequence[Query]) -> list[dict[str, Any]]:
    """The queries as JSON-able dicts (for attrs and summaries)."""
    return [
        {"kind": q.kind, "key": q.key, **({"path": q.path} if q.path else {"px": list(q.values)})}
        for q in queries
    ]
