"""Shared pieces of the analyses: feature-array checks, wrapping results, small helpers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from .._checks import as_int
from ..config import Settings
from ..errors import ConfigError, InputError

DIMS = ("feature", "y", "x")
#: The largest label value a label image holds (labels are uint8, or uint16 above 255).
MAX_LABEL = int(np.iinfo(np.uint16).max)


def check_max_chunks(value: int | None) -> int | None:
    """``max_chunks`` as an int >= 1, or None (read every chunk)."""
    if value is None:
        return None
    return as_int("max_chunks", value, 1, "pass a positive number of chunks or None for all")


def feature_data(features: Any) -> tuple[xr.DataArray, da.Array]:
    """Check ``features`` and return it as ``(feature, y, x)`` plus its dask data.

    The dask array has the feature axis in one chunk (a no-op for most stores), so every block
    holds all features of its ``(y, x)`` chunk.
    """
    if not isinstance(features, xr.DataArray):
        raise InputError(
            f"features must be an xarray.DataArray with dims {DIMS}, got "
            f"{type(features).__name__}; open a store with hrdv2_dask.open_features(path)."
        )
    if sorted(features.dims) != sorted(DIMS):
        raise InputError(
            f"features must have dims {DIMS}, got {features.dims}; rename or transpose them "
            "(e.g. arr.rename(c='feature')) first."
        )
    features = features.transpose(*DIMS)
    if 0 in features.shape:
        raise InputError(f"features of shape {features.shape} are empty; nothing to analyse.")
    if not np.issubdtype(features.dtype, np.number) or np.issubdtype(
        features.dtype, np.complexfloating
    ):
        raise InputError(
            f"features must be real numbers (float16/float32), got dtype {features.dtype}."
        )
    data = features.data
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(-1, "auto", "auto"))
    if data.numblocks[0] != 1:
        data = data.rechunk({0: -1})
    return features, data


def yx_coords(features: xr.DataArray) -> dict[str, xr.Variable]:
    """Coordinates of ``features`` that live on ``y`` and/or ``x`` only."""
    return {
        name: coord.variable
        for name, coord in features.coords.items()
        if coord.dims and set(coord.dims) <= {"y", "x"}
    }


def wrap(
    data: da.Array,
    dims: tuple[str, ...],
    features: xr.DataArray,
    *,
    name: str,
    attrs: Mapping[str, Any],
    extra_coords: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """``data`` as a DataArray with the ``(y, x)`` coords and ``out_stride`` of ``features``."""
    coords: dict[str, Any] = dict(yx_coords(features))
    coords.update(extra_coords or {})
    base = {k: features.attrs[k] for k in ("out_stride",) if k in features.attrs}
    return xr.DataArray(data, dims=dims, coords=coords, name=name, attrs={**base, **attrs})


def check_n_features(what: str, expected: int, features: xr.DataArray) -> None:
    """Raise when a model fitted on ``expected`` features meets features with another count."""
    got = features.sizes["feature"]
    if got != expected:
        raise InputError(
            f"{what} was fitted on {expected} features but these features have {got}; apply "
            "it to a store made with the same backbone, or fit a new one on this store."
        )


def sklearn_missing(err: ImportError) -> ImportError:
    """The error for a missing scikit-learn, with the install command."""
    return ImportError(
        f"scikit-learn is needed for k-means and scribble segmentation ({err}); install it "
        "with `pip install scikit-learn`."
    )


def label_dtype(max_label: int) -> np.dtype:
    """The dtype of a label image whose largest label is ``max_label``.

    >>> label_dtype(255), label_dtype(256)
    (dtype('uint8'), dtype('uint16'))
    """
    return np.dtype(np.uint8 if max_label <= 255 else np.uint16)


def as_float32(name: str, value: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A model array as contiguous float32, of ``shape`` when given."""
    arr = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
    if shape is not None and arr.shape != shape:
        raise ConfigError(
            f"{name} must have shape {shape}, got {arr.shape}; rebuild the model with "
            "fit_pca/fit_kmeans or fix the dict passed to from_dict."
        )
    return arr


def model_fields(cls: type, data: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The constructor keywords of a model ``cls`` from its ``to_dict`` output."""
    data = dict(data)
    if data.pop("kind", kind) != kind:
        raise ConfigError(
            f"{cls.__name__}.from_dict got a dict of kind {data.get('kind')!r}, expected "
            f"{kind!r}; pass the output of {cls.__name__}.to_dict()."
        )
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{cls.__name__}.from_dict got unknown keys {unknown}; expected some of "
            f"{sorted(known)}."
        )
    return data


def run_attrs(options: Settings) -> dict[str, Any]:
    """The attributes every analysis output records: its name and its options."""
    return {"analysis": options.SECTION, "options": options.to_dict()}
