"""Foreground masks: which parts of an image are worth computing (numpy and scipy only).

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
    """Otsu's threshold of a sample (maximises the between-class variance of ``v > t``).

    The threshold is a histogram bin edge, so ``values > t`` splits exactly as the histogram
    does (no value of a bin ends up on the other side).

    Examples
    --------
    >>> v = np.r_[np.zeros(50), np.ones(50)]
    >>> 0.0 < otsu_threshold(v) < 1.0
    True
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        m0 = s0 / w0
        m1 = (s0[-1] - s0) / w1
        between = w0 * w1 * (m0 - m1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[int(np.argmax(between)) + 1])


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
