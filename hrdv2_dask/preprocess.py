"""Turn raw image arrays into normalised tensors for ImageNet-trained backbones."""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "default_value_range",
    "normalize",
    "normalize_batch",
    "to_yxc",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_value_range(dtype: np.dtype) -> tuple[float, float]:
    """The intensity range that maps to [0, 1] when none is given.

    uint8 and uint16 use their full range, floats and booleans are taken to be in [0, 1].

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
        (RGBA) channels; uint8, uint16, bool or float in [0, 1].
    value_range : (float, float), optional
        Intensities mapped to 0 and 1 (values outside are clipped). Default: the dtype's range
        (see :func:`default_value_range`). The tiled pipeline passes one global range here so
        that every window is normalised the same way.

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
    """
    arr = to_yxc(image)
    lo, hi = value_range if value_range is not None else default_value_range(arr.dtype)
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
