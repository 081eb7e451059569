"""Pure quality metrics of the benchmark suite (numpy and scipy only, no model, no files).

Tiling artefacts (``seams`` suite)
    :func:`seam_ratio` and :func:`relative_l2` compare a tiled run with a whole-image run;
    :func:`periodic_power` measures a pattern that repeats with the window stride.
Segmentation against a known layout (``quality`` suite)
    :func:`miou_hungarian` and :func:`boundary_fscore` score k-means labels against the true
    label map of a texture mosaic.

Feature maps are ``(C, Y, X)`` arrays (a ``(Y, X)`` map is one channel); label maps are ``(Y, X)``
integer arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "boundary_fscore",
    "label_boundaries",
    "miou_hungarian",
    "periodic_power",
    "relative_l2",
    "seam_ratio",
]

# Channels per step when summing squared differences, so temporaries stay small.
_CHANNEL_STEP = 32


def _as_cyx(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features)
    if f.ndim == 2:
        f = f[None]
    if f.ndim != 3:
        raise ValueError(f"features must be (C, Y, X) or (Y, X), got shape {f.shape}.")
    return f


def relative_l2(values: np.ndarray, reference: np.ndarray) -> float:
    """``||values - reference|| / ||reference||`` over all elements (float64).

    >>> round(relative_l2(np.array([1.0, 2.0]), np.array([1.0, 1.0])), 4)
    0.7071
    """
    a = np.asarray(values, np.float64)
    b = np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}.")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(float).tiny))


def _gradient_magnitude(f: np.ndarray, axis: int) -> np.ndarray:
    """``||f[..., k + 1] - f[..., k]||_2`` over channels, along spatial ``axis`` (1 = y, 2 = x)."""
    n = f.shape[axis] - 1
    shape = (n, f.shape[2]) if axis == 1 else (f.shape[1], n)
    sq = np.zeros(shape, np.float64)
    for c0 in range(0, f.shape[0], _CHANNEL_STEP):
        part = f[c0 : c0 + _CHANNEL_STEP].astype(np.float64)
        sq += (np.diff(part, axis=axis) ** 2).sum(axis=0)
    return np.sqrt(sq)


def seam_ratio(
    features: np.ndarray,
    *,
    boundaries_y: Sequence[int] = (),
    boundaries_x: Sequence[int] = (),
) -> float:
    """Mean feature-gradient magnitude across window boundaries / mean elsewhere.

    The gradient between cells ``k`` and ``k + 1`` along an axis is the L2 norm over channels
    of their difference. A boundary at ``b`` is the step between cells ``b - 1`` and ``b``. The
    ratio pools the x steps at ``boundaries_x`` (all rows) and the y steps at ``boundaries_y``
    (all columns) as "on", and every other step along the same axes as "elsewhere". 1.0 means
    the boundaries are invisible; a seam gives > 1.

    Parameters
    ----------
    features : numpy.ndarray
        ``(C, Y, X)`` or ``(Y, X)`` feature map.
    boundaries_y, boundaries_x : sequence of int
        Cell indices ``1 <= b < Y`` (or ``X``) where a new window's output starts.

    Returns
    -------
    float

    Examples
    --------
    >>> f = np.zeros((1, 4, 8)); f[..., 4:] = 1.0; f += np.arange(8) * 0.1
    >>> round(seam_ratio(f, boundaries_x=[4]), 3)  # steps of 0.1, and 1.1 at the boundary
    11.0
    """
    f = _as_cyx(features)
    on: list[np.ndarray] = []
    off: list[np.ndarray] = []
    for axis, bounds in ((1, boundaries_y), (2, boundaries_x)):
        if not len(bounds):
            continue
        g = _gradient_magnitude(f, axis)  # step k sits between cells k and k + 1
        steps = np.zeros(f.shape[axis] - 1, bool)
        for b in bounds:
            if not 1 <= b < f.shape[axis]:
                raise ValueError(f"boundary {b} is outside 1..{f.shape[axis] - 1} on axis {axis}.")
            steps[b - 1] = True
        g = g if axis == 1 else g.T  # steps along the first axis
        on.append(g[steps].ravel())
        off.append(g[~steps].ravel())
    if not on:
        raise ValueError("give at least one boundary in boundaries_y or boundaries_x.")
    return float(np.concatenate(on).mean() / np.concatenate(off).mean())


def _axis_spectrum(f: np.ndarray, axis: int, length: int) -> np.ndarray:
    """Mean power spectrum ``(length // 2 + 1,)`` along ``axis`` of the first ``length`` cells."""
    index = [slice(None)] * 3
    index[axis] = slice(0, length)
    total = np.zeros(length // 2 + 1, np.float64)
    count = 0
    for c0 in range(0, f.shape[0], _CHANNEL_STEP):
        part = f[c0 : c0 + _CHANNEL_STEP][tuple(index)].astype(np.float64)
        part = part - part.mean(axis=(1, 2), keepdims=True)
        power = np.abs(np.fft.rfft(part, axis=axis)) ** 2
        other = 2 if axis == 1 else 1
        total += power.sum(axis=(0, other))
        count += part.shape[0] * part.shape[other]
    return total / count


def periodic_power(
    features: np.ndarray,
    period: int,
    *,
    harmonics: int | None = None,
    neighbours: int = 3,
) -> float:
    """Spectral power at the tile-stride frequency and its harmonics, relative to neighbouring
    frequencies.

    Definition, for a map ``f`` of shape ``(C, Y, X)`` and a window stride of ``period`` cells
    (the pattern of the windows starts at cell 0). For each spatial axis of length ``N`` that
    holds ``n = N // period >= 2`` whole periods:

    1. keep the first ``L = n * period`` cells along the axis (whole periods only, so the
       tile-stride frequency falls exactly on FFT bin ``n``);
    2. remove each channel's mean;
    3. ``S(k)`` = mean over channels and over the other axis of ``|rfft(f)[k]|**2``,
       ``k = 0 .. L // 2``;
    4. the harmonics are the bins ``k_m = m * n``, ``m = 1 .. M`` with ``k_m <= L // 2`` (and
       ``m <= harmonics`` when given);
    5. the background of harmonic ``m`` is the median of ``S`` over the bins ``k_m ± 1 ..
       k_m ± neighbours`` inside ``[1, L // 2]`` that are not harmonics themselves.

    The result is ``sum S(k_m) / sum background_m``, summed over the harmonics of both axes,
    i.e. 1 + (power of the periodic pattern) / (background power in the same bins). A map
    without a pattern at the window stride gives about 1 (white noise: 1 within a few per cent
    once many rows and channels are averaged); a periodic artefact gives ``> 1``. A pattern
    confined to one harmonic and one axis is diluted by the background of the others (the
    window artefacts of a ViT are not sinusoids: they have power at many harmonics).

    Parameters
    ----------
    features : numpy.ndarray
        ``(C, Y, X)`` or ``(Y, X)`` feature map.
    period : int
        Window stride in cells of the map (``TileGrid.chunk_cells``), ``>= 2``.
    harmonics : int, optional
        Use at most this many harmonics per axis; default all up to the Nyquist frequency.
    neighbours : int, optional
        Bins on each side of a harmonic that form its background, ``>= 1``.

    Returns
    -------
    float

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> noise = rng.normal(size=(8, 128, 128))
    >>> 0.9 < periodic_power(noise, 16) < 1.1
    True
    >>> pattern = 3 * np.cos(2 * np.pi * np.arange(128) / 16)
    >>> periodic_power(noise + pattern[None, None, :], 16) > 10
    True
    """
    f = _as_cyx(features)
    if int(period) != period or period < 2:
        raise ValueError(f"period must be an integer >= 2 cells, got {period!r}.")
    if neighbours < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours!r}.")
    peak = background = 0.0
    used = False
    for axis in (1, 2):
        n = f.shape[axis] // period
        if n < 2:
            continue
        length = n * period
        spectrum = _axis_spectrum(f, axis, length)
        nyquist = length // 2
        m_max = nyquist // n if harmonics is None else min(harmonics, nyquist // n)
        bins = [m * n for m in range(1, m_max + 1)]
        for k in bins:
            around = [
                j
                for d in range(1, neighbours + 1)
                for j in (k - d, k + d)
                if 1 <= j <= nyquist and j % n
            ]
            if not around:
                continue
            peak += spectrum[k]
            background += float(np.median(spectrum[around]))
            used = True
    if not used:
        raise ValueError(
            f"a map of shape {f.shape[1:]} holds fewer than 2 periods of {period} cells along "
            "both axes; use a larger image or a smaller tile."
        )
    return float(peak / max(background, np.finfo(float).tiny))


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Boundary pixels of a label map: pixels whose right or lower neighbour differs.

    >>> label_boundaries(np.array([[0, 0, 1], [0, 0, 1]])).astype(int).tolist()
    [[0, 1, 0], [0, 1, 0]]
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be 2-D (Y, X), got shape {lab.shape}.")
    edge = np.zeros(lab.shape, bool)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    return edge


def boundary_fscore(
    predicted: np.ndarray, truth: np.ndarray, *, tolerance_px: float = 2.0
) -> float:
    """Boundary F-score: harmonic mean of boundary precision and recall within a tolerance.

    Precision is the fraction of predicted boundary pixels (:func:`label_boundaries`) within
    ``tolerance_px`` (Euclidean) of a true boundary pixel; recall the fraction of true boundary
    pixels within ``tolerance_px`` of a predicted one. Label values do not matter, only where
    they change. Two maps without boundaries score 1; one without boundaries scores 0.

    Parameters
    ----------
    predicted, truth : numpy.ndarray
        ``(Y, X)`` integer label maps of the same shape.
    tolerance_px : float, optional

    Returns
    -------
    float
        In ``[0, 1]``.

    Examples
    --------
    >>> truth = np.zeros((20, 20), int); truth[:, 10:] = 1
    >>> moved = np.zeros((20, 20), int); moved[:, 11:] = 1
    >>> boundary_fscore(moved, truth)
    1.0
    """
    from scipy.ndimage import distance_transform_edt

    bp, bt = label_boundaries(predicted), label_boundaries(truth)
    if bp.shape != bt.shape:
        raise ValueError(f"shapes differ: {bp.shape} vs {bt.shape}.")
    if not bp.any() and not bt.any():
        return 1.0
    if not bp.any() or not bt.any():
        return 0.0
    precision = float((distance_transform_edt(~bt)[bp] <= tolerance_px).mean())
    recall = float((distance_transform_edt(~bp)[bt] <= tolerance_px).mean())
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def miou_hungarian(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU over the true classes after matching clusters to classes one-to-one.

    Clusters are assigned to classes with the Hungarian algorithm
    (:func:`scipy.optimize.linear_sum_assignment`) maximising the summed IoU; a class left
    without a cluster (fewer clusters than classes) counts as IoU 0.

    Parameters
    ----------
    predicted, truth : numpy.ndarray
        Integer label maps of the same shape (any values; only equality matters).

    Returns
    -------
    float
        In ``[0, 1]``; 1 when ``predicted`` is ``truth`` with the labels renamed.

    Examples
    --------
    >>> truth = np.array([0, 0, 1, 1, 2, 2])
    >>> miou_hungarian(np.array([5, 5, 3, 3, 4, 4]), truth)
    1.0
    >>> round(miou_hungarian(np.array([0, 0, 1, 1, 1, 1]), truth), 4)
    0.5
    """
    from scipy.optimize import linear_sum_assignment

    p, t = np.asarray(predicted).ravel(), np.asarray(truth).ravel()
    if p.shape != t.shape:
        raise ValueError(f"shapes differ: {np.shape(predicted)} vs {np.shape(truth)}.")
    _, p_idx = np.unique(p, return_inverse=True)
    classes, t_idx = np.unique(t, return_inverse=True)
    n_t, n_p = len(classes), int(p_idx.max()) + 1
    inter = np.bincount(t_idx * n_p + p_idx, minlength=n_t * n_p).reshape(n_t, n_p)
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    iou = inter / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / n_t)
