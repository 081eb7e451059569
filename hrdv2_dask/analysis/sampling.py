"""Seeded random samples of pixels that read only the chunks they draw from."""

from __future__ import annotations

import logging
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .._checks import as_int
from ..errors import InputError
from ._common import check_max_chunks, feature_data

__all__ = ["sample_pixels"]

log = logging.getLogger(__name__)


def _count_block(block: np.ndarray) -> np.ndarray:
    return np.array([[np.count_nonzero(block)]], dtype=np.int64)


def count_chunk_pixels(data: da.Array, mask: da.Array | None) -> np.ndarray:
    """``(n_chunks_y, n_chunks_x)`` number of selectable pixels per chunk (computes ``mask``)."""
    ychunks, xchunks = data.chunks[1], data.chunks[2]
    if mask is None:
        return np.outer(ychunks, xchunks).astype(np.int64)
    return mask.map_blocks(
        _count_block,
        chunks=((1,) * len(ychunks), (1,) * len(xchunks)),
        dtype=np.int64,
    ).compute()


def _sample_block(
    feats: np.ndarray,
    mask: np.ndarray | None,
    values: np.ndarray | None,
    k: int,
    seed: int,
    offset: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Draw ``k`` distinct valid pixels of one chunk: features, global ``(y, x)``, values."""
    n_feat, h, w = feats.shape
    flat = feats.reshape(n_feat, h * w)
    valid = np.isfinite(flat).all(axis=0)
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool).reshape(-1)
    idx = np.flatnonzero(valid)
    if k < idx.size:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=k, replace=False))
    yy, xx = np.divmod(idx, w)
    pos = np.stack([yy + offset[0], xx + offset[1]], axis=1).astype(np.int64)
    vals = None if values is None else np.asarray(values).reshape(-1)[idx]
    return flat[:, idx].T.astype(np.float32), pos, vals


def _plan_draw(
    counts: np.ndarray, n: int, rng: np.random.Generator, max_chunks: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which chunks to read (flat indices) and how many pixels to draw from each."""
    flat = counts.ravel()
    candidates = np.flatnonzero(flat)
    if candidates.size == 0:
        raise InputError(
            "The mask selects no pixel (all False / all unlabelled); pass a mask or labels "
            "with at least one selected pixel."
        )
    if max_chunks is not None and candidates.size > max_chunks:
        p = flat[candidates] / flat[candidates].sum()
        chosen = np.sort(rng.choice(candidates, size=max_chunks, replace=False, p=p))
    else:
        chosen = candidates
    available = flat[chosen]
    if n >= available.sum():
        return chosen, available, available
    return chosen, available, rng.multivariate_hypergeometric(available, n, method="marginals")


def draw_pixels(
    data: da.Array,
    *,
    n: int,
    seed: int,
    mask: da.Array | None = None,
    values: da.Array | None = None,
    max_chunks: int | None = None,
    counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Random pixels of a ``(C, Y, X)`` dask array (feature axis in one chunk).

    Returns features ``(m, C)`` float32, positions ``(m, 2)`` int64 and ``values`` at those
    positions (or None), shuffled, with ``m <= n``. ``mask``/``values`` are ``(Y, X)`` dask arrays
    chunked like ``data``; ``counts`` is :func:`count_chunk_pixels` when already known. Pixels
    are drawn without replacement, uniformly among the mask's pixels of the chunks read;
    non-finite pixels are skipped (so ``m`` may fall short of ``n``).
    """
    ychunks, xchunks = data.chunks[1], data.chunks[2]
    if counts is None:
        counts = count_chunk_pixels(data, mask)
    rng = np.random.default_rng(seed)
    chosen, available, take = _plan_draw(counts, n, rng, max_chunks)
    seeds = rng.integers(0, 2**62, size=chosen.size)
    y_off = np.r_[0, np.cumsum(ychunks)]
    x_off = np.r_[0, np.cumsum(xchunks)]
    tasks = []
    for block, k, block_seed in zip(chosen, take, seeds, strict=True):
        if k == 0:
            continue
        by, bx = divmod(int(block), len(xchunks))
        tasks.append(
            dask.delayed(_sample_block, pure=True)(
                data.blocks[0, by, bx],
                None if mask is None else mask.blocks[by, bx],
                None if values is None else values.blocks[by, bx],
                int(k),
                int(block_seed),
                (int(y_off[by]), int(x_off[bx])),
            )
        )
    log.debug("sampling %d pixels from %d of %d chunks", int(take.sum()), len(tasks), counts.size)
    parts = dask.compute(*tasks)
    feats = np.concatenate([p[0] for p in parts])
    pos = np.concatenate([p[1] for p in parts])
    vals = None if values is None else np.concatenate([p[2] for p in parts])
    order = rng.permutation(len(feats))
    if len(feats) < min(n, int(available.sum())):
        log.info("sampled %d pixels instead of %d: skipped non-finite pixels", len(feats), n)
    return feats[order], pos[order], None if vals is None else vals[order]


def _mask_like(mask: Any, data: da.Array) -> da.Array:
    """``mask`` as a bool dask array chunked like the ``(y, x)`` axes of ``data``."""
    if isinstance(mask, xr.DataArray):
        mask = mask.transpose("y", "x").data if set(mask.dims) == {"y", "x"} else mask.data
    shape = data.shape[1:]
    if tuple(np.shape(mask)) != shape:
        raise InputError(
            f"mask has shape {tuple(np.shape(mask))} but the feature grid is {shape}; pass a "
            "(y, x) boolean mask at the feature grid resolution."
        )
    if not isinstance(mask, da.Array):
        mask = da.from_array(np.asarray(mask), chunks=data.chunks[1:])
    return mask.astype(bool).rechunk(data.chunks[1:])


def sample_pixels(
    features: xr.DataArray,
    *,
    n: int = 100_000,
    seed: int = 0,
    mask: Any = None,
    max_chunks: int | None = 64,
) -> np.ndarray:
    """Feature vectors of random pixels, reading only the chunks that are sampled.

    ``max_chunks`` chunks are drawn first (with probability proportional to their number of
    selectable pixels, without replacement), then pixels uniformly without replacement among
    the selectable pixels of those chunks. When every chunk is read (``max_chunks=None`` or a
    store with at most ``max_chunks`` chunks) each selectable pixel is equally likely.

    Parameters
    ----------
    features : xarray.DataArray
        ``(feature, y, x)`` features, dask-backed (numpy-backed arrays are chunked).
    n : int, optional
        Number of pixels. All selectable pixels of the chunks read come back when there are
        fewer; pixels with a non-finite feature are skipped.
    seed : int, optional
        Seed of the random draw; the same seed gives the same pixels in the same order.
    mask : array_like of bool, optional
        ``(y, x)`` mask at the feature grid resolution (numpy, dask or DataArray); only True
        pixels are drawn. Computed once, chunk by chunk, to count its pixels per chunk.
    max_chunks : int or None, optional
        Most ``(y, x)`` chunks read; None reads every chunk holding a selectable pixel.

    Returns
    -------
    numpy.ndarray
        ``(m, C)`` float32 with ``m = min(n, selectable pixels)`` (fewer if some are NaN).

    Raises
    ------
    InputError
        Bad features or mask, or a mask without any True pixel.

    Examples
    --------
    >>> import dask.array as da, xarray as xr
    >>> f = xr.DataArray(da.ones((4, 100, 100), chunks=(4, 50, 50)), dims=("feature", "y", "x"))
    >>> sample_pixels(f, n=10).shape
    (10, 4)
    """
    n = as_int("n", n, 1, "pass the number of pixels to draw")
    seed = as_int("seed", seed, 0, "pass a non-negative integer seed")
    features, data = feature_data(features)
    mask_d = None if mask is None else _mask_like(mask, data)
    feats, _, _ = draw_pixels(
        data, n=n, seed=seed, mask=mask_d, max_chunks=check_max_chunks(max_chunks)
    )
    return feats
