"""Region embeddings: the mean of L2-normalised features over R x R output cells, chunk-wise.

:func:`region_sums` builds a lazy dask graph with one task per ``(y, x)`` chunk (rechunked to
a multiple of R cells so that no region straddles two chunks): each task L2-normalises its
cells' features and sums them per region, with the count of valid (finite, nonzero) cells.
:func:`embeddings_of` turns one computed block of sums into unit vectors and region boxes.
Nothing is computed until the caller computes the blocks (see :mod:`.retrieval`).

Examples
--------
>>> import dask.array as da
>>> f = da.ones((3, 10, 12), chunks=(3, 8, 8), dtype="float32")
>>> sums = region_sums(f, 4)
>>> sums.shape, sums.chunks[1:]
((4, 3, 3), ((2, 1), (2, 1)))
>>> float(sums[-1].sum().compute())  # every cell counted once
120.0
"""

from __future__ import annotations

from typing import NamedTuple

import dask.array as da
import numpy as np

__all__ = ["MIN_VALID", "Regions", "embeddings_of", "region_block", "region_sums"]

#: A region is indexed when at least this share of its cells is valid (not NaN).
MIN_VALID = 0.5


def region_block(block: np.ndarray, region: int) -> np.ndarray:
    """Per-region sums of the L2-normalised features of ``block`` ``(F, h, w)``.

    Returns ``(F + 1, ceil(h/R), ceil(w/R))`` float32: the sums, then the count of valid cells
    (all features finite, norm > 0). Invalid cells add nothing.

    >>> b = np.zeros((2, 3, 3), np.float32); b[0] = 3.0; b[:, 0, 0] = np.nan
    >>> region_block(b, 2)[:, 0, 0].tolist()  # cells (0,1), (1,0), (1,1) are valid
    [3.0, 0.0, 3.0]
    """
    n_feat, h, w = block.shape
    x = np.asarray(block, dtype=np.float32)
    norm = np.sqrt(np.einsum("fyx,fyx->yx", x, x))
    valid = np.isfinite(norm) & (norm > 0)
    unit = np.where(valid, x / np.where(valid, norm, 1), 0).astype(np.float32)
    ny, nx = -(-h // region), -(-w // region)
    padded = np.zeros((n_feat + 1, ny * region, nx * region), np.float32)
    padded[:n_feat, :h, :w] = unit
    padded[n_feat, :h, :w] = valid
    return padded.reshape(n_feat + 1, ny, region, nx, region).sum(axis=(2, 4), dtype=np.float32)


def region_sums(data: da.Array, region: int) -> da.Array:
    """Lazy ``(F + 1, ceil(H/R), ceil(W/R))`` region sums and counts of ``(F, H, W)`` features.

    The ``(y, x)`` chunks are first rounded to a multiple of ``region`` cells (the features in
    one chunk), so every region lies in one task.
    """
    n_feat, h, w = data.shape
    sizes = []
    for axis in (1, 2):
        typical = max(data.chunks[axis])
        sizes.append(max(region, round(typical / region) * region))
    data = data.rechunk({0: -1, 1: sizes[0], 2: sizes[1]})
    chunks = (
        (n_feat + 1,),
        tuple(-(-c // region) for c in data.chunks[1]),
        tuple(-(-c // region) for c in data.chunks[2]),
    )
    return da.map_blocks(
        region_block,
        data,
        region,
        chunks=chunks,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )


class Regions(NamedTuple):
    """Embeddings of the kept regions of one block, and their boxes in output cells."""

    vectors: np.ndarray  # (n, F) float32, unit length
    boxes: np.ndarray  # (n, 4) int64: y0, x0, y1, x1 in cells, half-open


def embeddings_of(
    sums: np.ndarray,
    *,
    origin: tuple[int, int],
    region: int,
    grid: tuple[int, int],
    min_valid: float = MIN_VALID,
) -> Regions:
    """The unit embeddings of the regions of one computed block of :func:`region_sums`.

    Parameters
    ----------
    sums : numpy.ndarray
        ``(F + 1, ny, nx)`` block; ``origin`` is its first region's index ``(ry, rx)``.
    region : int
        R, the region side in cells.
    grid : (int, int)
        The member's grid in cells (edge regions are cut to it).
    min_valid : float, optional
        The share of a region's cells that must be valid for it to be kept.

    >>> s = np.zeros((3, 1, 2), np.float32); s[0, 0, 0] = 2; s[2] = [[4, 1]]
    >>> r = embeddings_of(s, origin=(0, 0), region=2, grid=(2, 4))
    >>> r.vectors.tolist(), r.boxes.tolist()  # the second region is 1/4 valid: left out
    ([[1.0, 0.0]], [[0, 0, 2, 2]])
    """
    n_feat = sums.shape[0] - 1
    _, ny, nx = sums.shape
    ry, rx = np.meshgrid(np.arange(ny) + origin[0], np.arange(nx) + origin[1], indexing="ij")
    y0, x0 = ry * region, rx * region
    y1, x1 = np.minimum(y0 + region, grid[0]), np.minimum(x0 + region, grid[1])
    area = (y1 - y0) * (x1 - x0)
    vec = sums[:n_feat].reshape(n_feat, -1).T
    norm = np.linalg.norm(vec, axis=1)
    keep = (sums[n_feat].ravel() >= min_valid * area.ravel()) & (norm > 0)
    vectors = (vec[keep] / norm[keep, None]).astype(np.float32)
    boxes = np.stack([y0.ravel(), x0.ravel(), y1.ravel(), x1.ravel()], axis=1)[keep]
    return Regions(np.ascontiguousarray(vectors), boxes.astype(np.int64))
