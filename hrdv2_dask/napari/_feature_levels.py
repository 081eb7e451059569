"""Pyramid levels of a feature store's mean image that cost what napari shows, not the store.

A dask pyramid of a gigapixel store is a graph of every chunk at every level (50,000 chunks at
25,000² cells): napari's slicing then spends seconds on the graph before reading anything.
:class:`FeatureMean` is a plain array-like (``shape``, ``dtype``, ``__getitem__``) whose
indexing builds a graph of the requested region's chunks only: the mean over the features of
each chunk (float32), then the ``factor``-fold block mean. A placeholder level answers NaN
(transparent in napari) without reading.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

__all__ = ["FeatureMean"]


def _chunk_mean(block: np.ndarray) -> np.ndarray:
    return block.astype(np.float32).mean(axis=0)


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

    Examples
    --------
    >>> f = da.from_array(np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6), chunks=2)
    >>> level = FeatureMean(f, 2)
    >>> level.shape, level[0, 1:3].tolist()
    ((2, 3), [17.5, 19.5])
    >>> np.isnan(FeatureMean(f, 2, placeholder=True)[:, 0]).all()
    np.True_
    """

    def __init__(self, features: da.Array, factor: int = 1, *, placeholder: bool = False):
        _, rows, cols = features.shape
        self.features = features
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
            region = self.features[:, y0 * f : y1 * f, x0 * f : x1 * f]
            mean = region.map_blocks(_chunk_mean, drop_axis=0, dtype=np.float32).compute()
            if f > 1:
                mean = mean.reshape(y1 - y0, f, x1 - x0, f).mean(axis=(1, 3))
            out = mean[::sy, ::sx]
        squeeze = tuple(a for a, q in enumerate((qy, qx)) if q)
        return np.squeeze(out, axis=squeeze) if squeeze else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)
