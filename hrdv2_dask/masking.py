"""Foreground masks: which parts of an image are worth computing (numpy, scipy, skimage).

Whole-slide images are mostly empty glass. :func:`foreground_mask` finds the foreground on a
small thumbnail with Otsu's threshold; :func:`hrdv2_dask.tiling.windows_touching` then lists the
windows that touch it, and the pipeline computes only those. Background cells read as NaN.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .errors import ConfigError, InputError

__all__ = ["foreground_mask", "otsu_threshold"]

Background = Literal["bright", "dark"]


def otsu_threshold(values: np.ndarray, *, bins: int = 256) -> float:
    """Otsu's threshold of a sample, by :func:`skimage.filters.threshold_otsu`.

    A thin wrapper for three things skimage does not do: NaN and infinite values are dropped,
    an empty or constant sample returns its value (0.0 when empty), and the threshold is moved
    from skimage's bin centre to just below the upper edge of that bin, so that ``values > t``
    splits exactly as the histogram does (no value of a bin ends up on the other side).

    Parameters
    ----------
    values : numpy.ndarray
        Any shape, any real dtype.
    bins : int, optional
        Number of histogram bins over ``[min, max]`` of the finite values.

    Returns
    -------
    float
        ``values > t`` is the upper class.

    Examples
    --------
    >>> v = np.r_[np.zeros(50), np.ones(50)]
    >>> 0.0 < otsu_threshold(v) < 1.0
    True
    >>> otsu_threshold(np.array([3.0, 3.0, np.nan]))
    3.0
    """
    from skimage.filters import threshold_otsu

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if hi <= lo:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    k = int(np.searchsorted(centres, threshold_otsu(hist=(counts, centres))))
    # bin k holds edges[k] <= v < edges[k + 1]: the largest float below that edge splits it off
    return float(np.nextafter(edges[k + 1], -np.inf))


def foreground_mask(
    thumbnail: np.ndarray, *, background: Background = "bright", dilate_px: int = 1
) -> np.ndarray:
    """Foreground of an image from a thumbnail, by Otsu's threshold on its gray level.

    Parameters
    ----------
    thumbnail : numpy.ndarray
        ``(h, w)`` or ``(h, w, c)`` image, any numeric dtype (colour channels are averaged; a
        4th (alpha) channel is ignored).
    background : {"bright", "dark"}, optional
        ``"bright"``: background is lighter than the tissue (bright-field slides, the default);
        ``"dark"``: darker (fluorescence, dark-field).
    dilate_px : int, optional
        Grow the foreground by this many thumbnail pixels, so that faint borders are kept.

    Returns
    -------
    numpy.ndarray
        ``(h, w)`` bool, True on foreground. An image of one gray level is all foreground:
        nothing can be told apart, so nothing is skipped.

    Examples
    --------
    >>> thumb = np.full((4, 6), 250, np.uint8)
    >>> thumb[1:3, 1:3] = 60
    >>> foreground_mask(thumb, dilate_px=0).astype(int).tolist()[1]
    [0, 1, 1, 0, 0, 0]
    """
    from scipy import ndimage

    if background not in ("bright", "dark"):
        raise ConfigError(f"background must be 'bright' or 'dark', got {background!r}.")
    arr = np.asarray(thumbnail)
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float64).mean(-1) if arr.shape[-1] != 2 else arr[..., 0]
    if arr.ndim != 2 or 0 in arr.shape:
        raise InputError(f"thumbnail must be (h, w) or (h, w, c), got shape {thumbnail.shape}.")
    gray = arr.astype(np.float64)
    finite = np.isfinite(gray)
    if not finite.any() or np.ptp(gray[finite]) == 0:
        return np.ones(gray.shape, bool)
    t = otsu_threshold(gray[finite])
    fg = (gray <= t) if background == "bright" else (gray > t)
    fg &= finite
    if dilate_px > 0:
        fg = ndimage.binary_dilation(fg, iterations=int(dilate_px))
    return fg
