"""Turn raw image arrays into normalised tensors for ImageNet-trained backbones.

One intensity policy, shared by :func:`normalize` and the tiled pipeline: uint8 maps its dtype
range 0..255 and bool 0..1 to [0, 1]; every other dtype (uint16, int16, int32, uint32, floats...)
maps the 0.5/99.5 percentiles of its first three channels (:func:`intensity_range`), which the
pipeline takes from the chunks :func:`sample_chunk_ids` picks; or an explicit ``value_range``.
"""

from __future__ import annotations

import numpy as np
import torch

from ._checks import as_int
from .errors import InputError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "default_value_range",
    "fixed_intensity_range",
    "intensity_range",
    "normalize",
    "normalize_batch",
    "sample_chunk_ids",
    "to_yxc",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_value_range(dtype: np.dtype) -> tuple[float, float]:
    """The former default of :func:`normalize`, kept for compatibility; it no longer uses it.

    uint8 and uint16 use their full range, floats and booleans are taken to be in [0, 1]. The
    policy now is :func:`intensity_range`.

    >>> default_value_range(np.dtype("uint16"))
    (0.0, 65535.0)
    """
    dtype = np.dtype(dtype)
    if dtype == np.bool_ or dtype.kind == "f":
        return (0.0, 1.0)
    if dtype in (np.uint8, np.uint16):
        return (0.0, float(np.iinfo(dtype).max))
    raise InputError(
        f"Unsupported image dtype {dtype}: use uint8, uint16, bool or float (in [0, 1]), or give "
        "value_range=(low, high) to map other integer images."
    )


def fixed_intensity_range(dtype: np.dtype) -> tuple[float, float] | None:
    """The intensity range fixed by ``dtype``, or None where it comes from the pixels.

    Parameters
    ----------
    dtype : numpy.dtype
        The image's dtype.

    Returns
    -------
    (float, float) or None
        ``(0.0, 255.0)`` for uint8, ``(0.0, 1.0)`` for bool; None for other integer and float
        dtypes, whose range :func:`intensity_range` takes from percentiles of a sample.

    Raises
    ------
    InputError
        Not an integer, float or bool dtype (complex, string, object...).

    Examples
    --------
    >>> fixed_intensity_range(np.uint8), fixed_intensity_range(bool)
    ((0.0, 255.0), (0.0, 1.0))
    >>> fixed_intensity_range(np.uint16) is None
    True
    """
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return (0.0, 255.0)
    if dtype == np.bool_:
        return (0.0, 1.0)
    if dtype.kind not in "iuf":
        raise InputError(
            f"Unsupported image dtype {dtype}: use an integer, float or bool image (convert it, "
            "e.g. np.abs(image) for complex data), or give value_range=(low, high)."
        )
    return None


def intensity_range(sample: np.ndarray, *, dtype: np.dtype | None = None) -> tuple[float, float]:
    """The intensities that map to 0 and 1: the one policy of :func:`normalize` and the pipeline.

    The dtype range for uint8 (0..255) and bool (0..1); for every other dtype the 0.5 and 99.5
    percentiles of ``sample[..., :3]`` in float64 (``high = low + 1`` when they are equal).

    Parameters
    ----------
    sample : numpy.ndarray
        ``(..., C)`` raw pixels (the whole ``(H, W, C)`` image, or the pipeline's sampled chunks
        as ``(n, C)``); channels after the third are ignored. Not read for uint8 and bool.
    dtype : numpy.dtype, optional
        The image's dtype, which picks the rule; default ``sample.dtype``.

    Returns
    -------
    (float, float)
        ``(low, high)`` with ``low < high``.

    Raises
    ------
    InputError
        An unsupported dtype, an empty sample, or NaN or infinite values in it.

    Examples
    --------
    >>> intensity_range(np.zeros((2, 2, 3), np.uint8))
    (0.0, 255.0)
    >>> intensity_range(np.arange(1001, dtype=np.uint16)[:, None])
    (5.0, 995.0)
    >>> intensity_range(np.full((4, 4, 1), 7.0))
    (7.0, 8.0)
    """
    fixed = fixed_intensity_range(sample.dtype if dtype is None else dtype)
    if fixed is not None:
        return fixed
    values = np.asarray(sample)[..., :3].astype(np.float64)
    if values.size == 0:
        raise InputError(
            f"Cannot take the intensity range of an empty sample of shape {np.shape(sample)}; "
            "pass at least one pixel, or give value_range=(low, high)."
        )
    if not np.isfinite(values).all():
        raise InputError(
            "The image has NaN or infinite pixels; fill or mask them first (e.g. np.nan_to_num)."
        )
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return (float(lo), float(hi))


def sample_chunk_ids(
    numblocks_yx: tuple[int, int], *, seed: int = 0, max_chunks: int = 64
) -> list[tuple[int, int]]:
    """The chunks whose pixels :func:`intensity_range` reads in the tiled pipeline.

    All chunks when there are at most ``max_chunks``; else ``max_chunks`` of them drawn without
    replacement by ``numpy.random.default_rng(seed)``, so a run is the same on every machine and
    never needs the whole image in memory.

    Parameters
    ----------
    numblocks_yx : (int, int)
        Number of chunks along y and x (``dask_array.numblocks[:2]``).
    seed : int, optional
        Seed of the generator.
    max_chunks : int, optional
        At most this many chunks, >= 1.

    Returns
    -------
    list of (int, int)
        Distinct ``(j, i)`` chunk indices in row-major order.

    Raises
    ------
    ConfigError
        ``max_chunks`` below 1, or chunk counts that are not integers >= 0.

    Examples
    --------
    >>> sample_chunk_ids((2, 2))
    [(0, 0), (0, 1), (1, 0), (1, 1)]
    >>> ids = sample_chunk_ids((100, 100), max_chunks=3)
    >>> len(ids), ids == sample_chunk_ids((100, 100), max_chunks=3)
    (3, True)
    """
    ny, nx = (as_int("numblocks_yx", n, 0, "pass array.numblocks[:2]") for n in numblocks_yx)
    max_chunks = as_int("max_chunks", max_chunks, 1, "use e.g. max_chunks=64")
    ids = [(j, i) for j in range(ny) for i in range(nx)]
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(ids), size=min(max_chunks, len(ids)), replace=False))
    return [ids[k] for k in picked]


def to_yxc(image: np.ndarray) -> np.ndarray:
    """View ``image`` as ``(H, W, C)``: YX, YXC (C <= 4) or CYX (C <= 4) layouts are accepted.

    >>> to_yxc(np.zeros((3, 20, 30))).shape, to_yxc(np.zeros((20, 30))).shape
    ((20, 30, 3), (20, 30, 1))
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise InputError(
            f"Cannot read an image of shape {np.shape(image)}: expected (H, W), (H, W, C) or "
            "(C, H, W) with C in 1..4 channels (gray, gray+alpha, RGB, RGBA)."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"Image of shape {np.shape(image)} is empty.")
    return arr


def normalize(image: np.ndarray, *, value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Normalise an image for a DINOv2 backbone.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with 1 (gray), 2 (gray + alpha), 3 (RGB) or 4
        (RGBA) channels; any integer, float or bool dtype.
    value_range : (float, float), optional
        Intensities mapped to 0 and 1 (values outside are clipped). Default
        (:func:`intensity_range` of the whole image): the dtype range for uint8/bool; else the
        0.5/99.5 percentiles of the first three channels. The tiled pipeline applies the same
        policy to its sampled chunks (all of them for an image of at most 64 chunks) and passes
        one global range, so that every window is normalised the same way.

    Returns
    -------
    torch.Tensor
        ``(3, H, W)`` float32, ImageNet mean/std normalised.

    Raises
    ------
    InputError
        Empty or wrongly shaped arrays, unsupported dtypes, NaN or infinite values.

    Examples
    --------
    >>> x = normalize(np.full((4, 5), 255, np.uint8))
    >>> tuple(x.shape), round(float(x[0, 0, 0]), 4)
    ((3, 4, 5), 2.2489)
    >>> z = normalize(np.arange(20, dtype=np.int32).reshape(4, 5))  # percentiles 0.095, 18.905
    >>> round(float(z[0, 0, 0]), 4), round(float(z[0, 3, 4]), 4)  # both ends clipped
    (-2.1179, 2.2489)
    """
    arr = to_yxc(image)
    lo, hi = value_range if value_range is not None else intensity_range(arr)
    return normalize_batch(torch.from_numpy(np.ascontiguousarray(arr))[None], (lo, hi))[0]


def normalize_batch(windows: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """The maths of :func:`normalize` on a batch, on any device.

    Parameters
    ----------
    windows : torch.Tensor
        ``(n, H, W, C)`` raw intensities, C in 1..4 (gray, gray + alpha, RGB, RGBA).
    value_range : (float, float)
        Intensities mapped to 0 and 1 (clipped), the same for every window of an image.

    Returns
    -------
    torch.Tensor
        ``(n, 3, H, W)`` float32, ImageNet mean/std normalised.
    """
    lo, hi = (float(v) for v in value_range)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        raise InputError(f"value_range must be finite with low < high, got {value_range!r}.")
    x = windows.to(torch.float32)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(
            f"Image of shape {tuple(windows.shape[1:])} has {bad} NaN or infinite values; fill or "
            "mask them first (e.g. np.nan_to_num(image))."
        )
    x = x[..., :1].expand(*x.shape[:-1], 3) if x.shape[-1] in (1, 2) else x[..., :3]
    x = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)
    std = torch.tensor(IMAGENET_STD, device=x.device)
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()
