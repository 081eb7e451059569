"""Pyramid levels of a feature store's mean image that cost what napari shows, not the store.

A dask pyramid of a gigapixel store is a graph of every chunk at every level (50,000 chunks at
25,000² cells): napari's slicing then spends seconds on the graph before reading anything.
:class:`FeatureMean` is a plain array-like (``shape``, ``dtype``, ``__getitem__``) whose
indexing computes the mean over the features (float32) of the requested region's chunks only,
then the ``factor``-fold block mean. The chunk means are kept (:class:`ChunkMeans`, shared by
the levels of one store, least recently used out first): a region seen again, or its 2x
coarser level, reads nothing. A placeholder level answers NaN (transparent in napari) without
reading.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import dask
import dask.array as da
import numpy as np

__all__ = ["ChunkMeans", "FeatureMean"]

#: Bytes of chunk means a store keeps (float32: 512 MiB is 11,000 chunks of 112² cells).
CACHE_BYTES = 512 * 2**20


class ChunkMeans:
    """The feature means of a store's ``(y, x)`` chunks, computed on demand and kept.

    Thread-safe (napari slices in a worker thread with async slicing). ``region(y0, y1, x0,
    x1)`` returns the mean image of those level-0 cells, computing (in one ``dask.compute``)
    only the chunks not kept yet.
    """

    def __init__(self, features: da.Array, capacity_bytes: int = CACHE_BYTES):
        self.features = features
        self.edges = [np.cumsum((0, *c)) for c in features.chunks[1:]]
        self.capacity = int(capacity_bytes)
        self._kept: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.computed = 0  # chunks computed so far (for tests and benchmarks)

    def _chunks(self, axis: int, start: int, stop: int) -> range:
        e = self.edges[axis]
        return range(int(np.searchsorted(e, start, "right")) - 1, int(np.searchsorted(e, stop)))

    def region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        ey, ex = self.edges
        rows, cols = self._chunks(0, y0, y1), self._chunks(1, x0, x1)
        wanted = [(j, i) for j in rows for i in cols]
        with self._lock:
            have = {k: self._kept[k] for k in wanted if k in self._kept}
            for k in have:
                self._kept.move_to_end(k)
        missing = [k for k in wanted if k not in have]
        if missing:
            lazy = [
                self.features.blocks[0, j, i].astype(np.float32).mean(axis=0) for j, i in missing
            ]
            computed = dask.compute(*lazy)
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
        out = np.empty((y1 - y0, x1 - x0), np.float32)
        for (j, i), mean in have.items():
            ry0, rx0 = max(int(ey[j]), y0), max(int(ex[i]), x0)
            ry1, rx1 = min(int(ey[j + 1]), y1), min(int(ex[i + 1]), x1)
            out[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = mean[
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
            raise IndexError("FeatureMean takes slices with a positive step only")
        return start, max(stop, start), step, False
    raise TypeError(f"FeatureMean takes ints and slices, not {type(key).__name__}")


class FeatureMean:
    """The mean over the features of a ``(feature, y, x)`` store, ``factor`` times smaller.

    Parameters
    ----------
    features : dask.array.Array
        The store's ``(feature, y, x)`` array (the feature axis one chunk).
    factor : int
        Level-0 cells per level cell along each axis: a level cell is the mean of a
        ``factor × factor`` block (sides cut to a multiple of ``factor``).
    placeholder : bool
        Answer NaN without reading (a level whose view would read too much).
    means : ChunkMeans, optional
        The store's kept chunk means, shared by its levels (default: a new one).

    Examples
    --------
    >>> f = da.from_array(np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6), chunks=2)
    >>> level = FeatureMean(f, 2)
    >>> level.shape, level[0, 1:3].tolist()
    ((2, 3), [17.5, 19.5])
    >>> np.isnan(FeatureMean(f, 2, placeholder=True)[:, 0]).all()
    np.True_
    """

    def __init__(
        self,
        features: da.Array,
        factor: int = 1,
        *,
        placeholder: bool = False,
        means: ChunkMeans | None = None,
    ):
        _, rows, cols = features.shape
        self.features = features
        self.means = means if means is not None else ChunkMeans(features)
        self.factor = int(factor)
        self.placeholder = placeholder
        self.shape = (rows // self.factor, cols // self.factor)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2
        self.size = self.shape[0] * self.shape[1]

    def __repr__(self) -> str:
        kind = "placeholder" if self.placeholder else "mean"
        return f"FeatureMean({kind}, factor={self.factor}, shape={self.shape})"

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key)) + key[i + 1 :]
        key = key + (slice(None),) * (2 - len(key))
        if len(key) != 2:
            raise IndexError(f"FeatureMean is 2-D, got an index of {len(key)} axes")
        (y0, y1, sy, qy), (x0, x1, sx, qx) = (
            _range(k, n) for k, n in zip(key, self.shape, strict=True)
        )
        if self.placeholder or y1 == y0 or x1 == x0:
            shape = (len(range(y0, y1, sy)), len(range(x0, x1, sx)))
            out = np.full(shape, np.nan, np.float32)
        else:
            f = self.factor
            mean = self.means.region(y0 * f, y1 * f, x0 * f, x1 * f)
            if f > 1:
                mean = mean.reshape(y1 - y0, f, x1 - x0, f).mean(axis=(1, 3))
            out = mean[::sy, ::sx]
        squeeze = tuple(a for a, q in enumerate((qy, qx)) if q)
        return np.squeeze(out, axis=squeeze) if squeeze else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)
