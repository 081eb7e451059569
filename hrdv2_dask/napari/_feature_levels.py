"""Pyramid levels of a per-chunk function of a store's features that cost what napari shows.

A dask pyramid of a gigapixel store is a graph of every chunk at every level (50,000 chunks at
25,000² cells): napari's slicing then spends seconds on the graph before reading anything.
A :class:`LazyLevel` is a plain array-like (``shape``, ``dtype``, ``__getitem__``) whose
indexing computes only the requested region's chunks of a lazy result (a ``(y, x)`` or
``(y, x, c)`` dask array whose chunks are those of the features: the mean over the features
(:func:`feature_mean`, the reader's image), the cosine similarity to a query, a segmenter's or
k-means' prediction, the PCA picture), then the ``factor``-fold level: block means for images,
every ``factor``-th cell for labels (a mean of labels is no label). The chunk results are kept
(:class:`ChunkResults`, shared by the levels of one result, least recently used out first): a
region seen again, or its 2x coarser level, computes nothing. A placeholder level answers
NaN, 0 for integers (transparent in napari), without computing. Thread-safe: napari's
asynchronous slicing indexes levels from a worker thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np

__all__ = ["CACHE_BYTES", "ChunkResults", "LazyLevel", "feature_mean", "lazy_levels"]

#: Bytes of chunk results a result keeps (float32: 512 MiB is 11,000 chunks of 112² cells).
CACHE_BYTES = 512 * 2**20


def feature_mean(features: da.Array) -> da.Array:
    """The ``(y, x)`` float32 mean of ``(feature, y, x)`` features (one task per chunk)."""
    return features.astype(np.float32).mean(axis=0)


class ChunkResults:
    """The ``(y, x)`` chunks of a lazy result, computed on demand and kept.

    ``region(y0, y1, x0, x1)`` returns those cells (``(y1 - y0, x1 - x0, *tail)``), computing
    (in one ``dask.compute``) only the chunks it touches that are not kept yet, each from a
    graph of that chunk alone (``make(rows, cols)``): slicing a chunk out of the whole grid's
    graph instead (50,000 chunks) materialises and keeps that graph, 4x slower and a million
    objects more for Python's garbage collector, whose full passes then freeze the GUI thread.

    Parameters
    ----------
    make : callable
        ``make(rows, cols)`` -> the lazy (dask) or computed result of those cells (slices).
    shape : tuple of int
        ``(y, x)`` or ``(y, x, c)``.
    dtype : numpy.dtype
    chunks : (tuple of int, tuple of int)
        The chunk sides along ``y`` and ``x`` (the features').
    capacity_bytes : int
        Bytes of chunk results kept (least recently used out first).
    """

    def __init__(
        self,
        make: Callable[[slice, slice], Any],
        shape: Sequence[int],
        dtype: Any,
        chunks: Sequence[Sequence[int]],
        capacity_bytes: int = CACHE_BYTES,
    ):
        self.make = make
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.edges = [np.cumsum((0, *c)) for c in chunks[:2]]
        self.capacity = int(capacity_bytes)
        self._kept: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.computed = 0  # chunks computed so far (for tests and benchmarks)

    @classmethod
    def of_features(
        cls,
        features: da.Array,
        fn: Callable[[da.Array], da.Array] = None,  # type: ignore[assignment]
        capacity_bytes: int = CACHE_BYTES,
    ) -> ChunkResults:
        """The chunks of ``fn`` (default :func:`feature_mean`) of ``(feature, y, x)``
        features, a per-cell function run on each chunk's features."""
        fn = fn or feature_mean
        probe = fn(features[:, :1, :1])
        shape = (*features.shape[1:], *probe.shape[2:])

        def make(rows: slice, cols: slice) -> da.Array:
            return fn(features[:, rows, cols])

        return cls(make, shape, probe.dtype, features.chunks[1:], capacity_bytes)

    def _chunks(self, axis: int, start: int, stop: int) -> range:
        e = self.edges[axis]
        return range(int(np.searchsorted(e, start, "right")) - 1, int(np.searchsorted(e, stop)))

    def region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Cells ``[y0, y1) x [x0, x1)``, computed where not kept."""
        ey, ex = self.edges
        wanted = [(j, i) for j in self._chunks(0, y0, y1) for i in self._chunks(1, x0, x1)]
        with self._lock:
            have = {k: self._kept[k] for k in wanted if k in self._kept}
            for k in have:
                self._kept.move_to_end(k)
        missing = [k for k in wanted if k not in have]
        if missing:
            computed = dask.compute(
                *[
                    self.make(slice(int(ey[j]), int(ey[j + 1])), slice(int(ex[i]), int(ex[i + 1])))
                    for j, i in missing
                ]
            )
            computed = [np.asarray(c) for c in computed]
            have.update(zip(missing, computed, strict=True))
            with self._lock:
                self.computed += len(missing)
                for k, v in zip(missing, computed, strict=True):
                    if k not in self._kept:
                        self._kept[k] = v
                        self._bytes += v.nbytes
                while self._bytes > self.capacity and self._kept:
                    _, old = self._kept.popitem(last=False)
                    self._bytes -= old.nbytes
        out = np.empty((y1 - y0, x1 - x0, *self.shape[2:]), self.dtype)
        for (j, i), block in have.items():
            ry0, rx0 = max(int(ey[j]), y0), max(int(ex[i]), x0)
            ry1, rx1 = min(int(ey[j + 1]), y1), min(int(ex[i + 1]), x1)
            out[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = block[
                ry0 - int(ey[j]) : ry1 - int(ey[j]), rx0 - int(ex[i]) : rx1 - int(ex[i])
            ]
        return out


def _range(key: Any, n: int) -> tuple[int, int, int, bool]:
    """``(start, stop, step, squeeze)`` of one index along an axis of length ``n``."""
    if isinstance(key, int | np.integer):
        i = int(key) + n if key < 0 else int(key)
        if not 0 <= i < n:
            raise IndexError(f"index {int(key)} is out of bounds for an axis of size {n}")
        return i, i + 1, 1, True
    if isinstance(key, slice):
        start, stop, step = key.indices(n)
        if step < 1:
            raise IndexError("LazyLevel takes slices with a positive step only")
        return start, max(stop, start), step, False
    raise TypeError(f"LazyLevel takes ints and slices, not {type(key).__name__}")


class LazyLevel:
    """One pyramid level of a lazy result, ``factor`` times smaller along ``y`` and ``x``.

    Parameters
    ----------
    results : ChunkResults
        The result's kept chunks, shared by its levels.
    factor : int
        Level-0 cells per level cell along each axis (sides cut to a multiple of ``factor``).
    labels : bool
        A label image: a level cell is the level-0 cell at its block's first corner; else the
        block's mean (rounded for integers).
    placeholder : bool
        Answer NaN (0 for integers) without computing (a level whose view would read too much).

    Examples
    --------
    >>> f = da.from_array(np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6), chunks=2)
    >>> level = LazyLevel(ChunkResults.of_features(f), 2)
    >>> level.shape, level[0, 1:3].tolist()
    ((2, 3), [17.5, 19.5])
    >>> cells = np.arange(24).reshape(4, 6)
    >>> chunks = ChunkResults(lambda r, c: cells[r, c], (4, 6), int, ((2, 2), (3, 3)))
    >>> labels = LazyLevel(chunks, 2, labels=True)
    >>> labels[:, :].tolist()
    [[0, 2, 4], [12, 14, 16]]
    >>> np.isnan(LazyLevel(ChunkResults.of_features(f), 2, placeholder=True)[:, 0]).all()
    np.True_
    """

    def __init__(
        self,
        results: ChunkResults,
        factor: int = 1,
        *,
        labels: bool = False,
        placeholder: bool = False,
    ):
        self.results = results
        self.factor = int(factor)
        self.labels = labels
        self.placeholder = placeholder
        rows, cols, *tail = results.shape
        self.shape = (rows // self.factor, cols // self.factor, *tail)
        self.dtype = results.dtype
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))

    def __repr__(self) -> str:
        kind = "placeholder" if self.placeholder else ("labels" if self.labels else "image")
        return f"LazyLevel({kind}, factor={self.factor}, shape={self.shape})"

    def __len__(self) -> int:
        return self.shape[0]

    def _key(self, key: Any) -> tuple:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim + 1 - len(key)) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        if len(key) != self.ndim:
            raise IndexError(f"LazyLevel is {self.ndim}-D, got an index of {len(key)} axes")
        return key

    def __getitem__(self, key: Any) -> np.ndarray:
        key = self._key(key)
        (y0, y1, sy, qy), (x0, x1, sx, qx) = (
            _range(k, n) for k, n in zip(key[:2], self.shape[:2], strict=True)
        )
        tail = self.shape[2:]
        if self.placeholder or y1 == y0 or x1 == x0:
            shape = (len(range(y0, y1, sy)), len(range(x0, x1, sx)), *tail)
            out = np.full(shape, np.nan if self.dtype.kind == "f" else 0, self.dtype)
        else:
            out = self._level(y0, y1, x0, x1)[::sy, ::sx]
        out = out[(slice(None), slice(None), *key[2:])]
        squeeze = tuple(a for a, q in enumerate((qy, qx)) if q)
        return np.squeeze(out, axis=squeeze) if squeeze else out

    def _level(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Level cells ``[y0, y1) x [x0, x1)``."""
        f = self.factor
        if f == 1:
            return self.results.region(y0, y1, x0, x1)
        if self.labels:
            return self.results.region(y0 * f, (y1 - 1) * f + 1, x0 * f, (x1 - 1) * f + 1)[::f, ::f]
        cells = self.results.region(y0 * f, y1 * f, x0 * f, x1 * f)
        tail = cells.shape[2:]
        mean = cells.reshape(y1 - y0, f, x1 - x0, f, *tail).mean(axis=(1, 3), dtype=np.float64)
        return (
            mean.round().astype(self.dtype) if self.dtype.kind in "iu" else mean.astype(self.dtype)
        )

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[(slice(None),) * self.ndim]
        return out if dtype is None else out.astype(dtype)


def lazy_levels(
    results: ChunkResults,
    n_levels: int,
    *,
    labels: bool = False,
    first_placeholder: int | None = None,
) -> list[LazyLevel]:
    """``n_levels`` levels (factors 1, 2, 4, ...) sharing ``results``; levels from
    ``first_placeholder`` on are placeholders.

    >>> f = da.zeros((2, 40, 30), chunks=10)
    >>> levels = lazy_levels(ChunkResults.of_features(f), 3, first_placeholder=2)
    >>> [(lv.shape, lv.placeholder) for lv in levels]
    [((40, 30), False), ((20, 15), False), ((10, 7), True)]
    """
    first = n_levels if first_placeholder is None else first_placeholder
    return [
        LazyLevel(results, 2**k, labels=labels, placeholder=k >= first) for k in range(n_levels)
    ]
