"""PCA of a feature store: fit on a sample, project lazily, false-colour pictures."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import xarray as xr

from ..config import Settings, option
from ..errors import ConfigError, InputError
from ..heads import pca_basis
from ..io import outputs
from ..masking import otsu_threshold
from ._common import (
    as_float32,
    check_max_chunks,
    check_n_features,
    feature_data,
    model_fields,
    run_attrs,
    wrap,
    yx_coords,
)
from .registry import register
from .sampling import draw_pixels

__all__ = ["PCAModel", "PCAOptions", "fit_pca", "pca_basis", "pca_rgb", "run_pca"]

log = logging.getLogger(__name__)

_BORDER_FRACTION = 0.05  # outer band (per side) that defines "border" in the foreground recipe


@dataclass(frozen=True)
class PCAOptions(Settings):
    """The options of :func:`fit_pca`, of the ``pca`` workflow step and of ``hrdv2 pca``."""

    SECTION: ClassVar[str] = "pca"

    components: int = option(3, "principal components (the picture needs 3)", minimum=1)
    foreground: bool = option(False, "two-step PCA without background")
    samples: int = option(100_000, "pixels sampled for the fit", minimum=2, api="n_samples")
    seed: int = option(0, "seed of the sample", minimum=0)


def _project_block(
    block: np.ndarray,
    mean: np.ndarray,
    components: np.ndarray,
    foreground: tuple[np.ndarray, np.ndarray, float, bool] | None,
) -> np.ndarray:
    n_feat, h, w = block.shape
    x = block.reshape(n_feat, h * w).astype(np.float32)
    out = components @ (x - mean[:, None])
    if foreground is not None:
        fg_mean, fg_axis, threshold, above = foreground
        score = fg_axis @ (x - fg_mean[:, None])
        keep = score > threshold if above else score <= threshold
        out[:, ~keep] = np.nan
    return out.reshape(len(components), h, w)


@dataclass(frozen=True, eq=False)
class PCAModel:
    """A PCA fitted on a sample of pixels, optionally on the foreground only.

    Parameters
    ----------
    mean : numpy.ndarray
        ``(C,)`` float32 mean feature of the (foreground) sample.
    components : numpy.ndarray
        ``(K, C)`` float32 unit principal directions, by decreasing variance; each one's
        largest entry is positive.
    explained_variance : numpy.ndarray
        ``(K,)`` variance of the sample along each component.
    lo, hi : numpy.ndarray
        ``(K,)`` 1st and 99th percentiles of the projected sample: :func:`pca_rgb` maps
        ``[lo, hi]`` to ``[0, 255]``.
    total_variance : float, optional
        Total variance of the sample (sum over all C directions).
    fg_mean, fg_axis : numpy.ndarray, optional
        ``(C,)`` mean and first principal direction of the whole sample (first step of the
        foreground recipe); None without foreground separation.
    fg_threshold : float, optional
        Threshold on the projection onto ``fg_axis``.
    fg_above : bool, optional
        True when the foreground is ``projection > fg_threshold``, False when it is
        ``projection <= fg_threshold``.
    n_samples : int, optional
        Pixels the components were fitted on.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    total_variance: float = float("nan")
    fg_mean: np.ndarray | None = None
    fg_axis: np.ndarray | None = None
    fg_threshold: float | None = None
    fg_above: bool = True
    n_samples: int = 0

    def __post_init__(self) -> None:
        components = as_float32("components", self.components)
        if components.ndim != 2 or 0 in components.shape:
            raise ConfigError(
                f"components must be a non-empty (K, C) array, got shape {components.shape}."
            )
        k, c = components.shape
        object.__setattr__(self, "components", components)
        object.__setattr__(self, "mean", as_float32("mean", self.mean, (c,)))
        for name in ("explained_variance", "lo", "hi"):
            object.__setattr__(self, name, as_float32(name, getattr(self, name), (k,)))
        fg = (self.fg_mean, self.fg_axis, self.fg_threshold)
        if any(v is None for v in fg) and not all(v is None for v in fg):
            raise ConfigError(
                "fg_mean, fg_axis and fg_threshold go together: give all three (foreground "
                "model) or none."
            )
        if self.fg_mean is not None:
            object.__setattr__(self, "fg_mean", as_float32("fg_mean", self.fg_mean, (c,)))
            object.__setattr__(self, "fg_axis", as_float32("fg_axis", self.fg_axis, (c,)))
            object.__setattr__(self, "fg_threshold", float(self.fg_threshold))
        object.__setattr__(self, "fg_above", bool(self.fg_above))
        object.__setattr__(self, "total_variance", float(self.total_variance))
        object.__setattr__(self, "n_samples", int(self.n_samples))

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.components.shape[1])

    @property
    def foreground(self) -> bool:
        """True when the model separates foreground from background."""
        return self.fg_mean is not None

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        """``(K,)`` share of the total variance along each component."""
        return self.explained_variance / max(self.total_variance, 1e-30)

    def project(self, features: xr.DataArray) -> xr.DataArray:
        """Project every pixel onto the components, lazily (one task per chunk).

        Parameters
        ----------
        features : xarray.DataArray
            ``(feature, y, x)`` with ``C`` features.

        Returns
        -------
        xarray.DataArray
            ``(component, y, x)`` float32, dask-backed; NaN on background pixels of a
            foreground model (and wherever a feature is NaN).
        """
        features, data = feature_data(features)
        check_n_features("This PCA model", self.n_features, features)
        fg = None
        if self.foreground:
            fg = (self.fg_mean, self.fg_axis, self.fg_threshold, self.fg_above)
        out = data.map_blocks(
            _project_block,
            self.mean,
            self.components,
            fg,
            chunks=((self.n_components,), *data.chunks[1:]),
            dtype=np.float32,
            meta=np.empty((0, 0, 0), np.float32),
        )
        return wrap(
            out,
            ("component", "y", "x"),
            features,
            name="pca",
            attrs={"foreground": self.foreground},
            extra_coords={"component": np.arange(self.n_components)},
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists of floats); :meth:`from_dict` inverts it."""
        out: dict[str, Any] = {
            "kind": "pca",
            "mean": self.mean.tolist(),
            "components": self.components.tolist(),
            "explained_variance": self.explained_variance.tolist(),
            "lo": self.lo.tolist(),
            "hi": self.hi.tolist(),
            "total_variance": self.total_variance,
            "fg_above": self.fg_above,
            "n_samples": self.n_samples,
        }
        if self.foreground:
            out.update(
                fg_mean=self.fg_mean.tolist(),
                fg_axis=self.fg_axis.tolist(),
                fg_threshold=self.fg_threshold,
            )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PCAModel:
        """Rebuild a model from :meth:`to_dict` output."""
        return cls(**model_fields(cls, data, "pca"))


def _border_mask(pos: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    band = [max(1, math.ceil(_BORDER_FRACTION * s)) for s in shape]
    y, x = pos[:, 0], pos[:, 1]
    return (y < band[0]) | (y >= shape[0] - band[0]) | (x < band[1]) | (x >= shape[1] - band[1])


def _split_foreground(
    x: np.ndarray, pos: np.ndarray, grid: tuple[int, int], components: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """First step of the foreground recipe: which samples to keep, and the model's fg fields."""
    fg_mean, fg_axis, _, _ = pca_basis(x, 1)
    score = (x - fg_mean) @ fg_axis[0]
    threshold = otsu_threshold(score)
    above = score > threshold
    border = _border_mask(pos, grid)
    fg_above = bool((above[border] if border.any() else above).mean() < 0.5)
    keep = above if fg_above else ~above
    if keep.sum() < max(components + 1, 10):
        raise InputError(
            f"The foreground recipe kept only {int(keep.sum())} of {len(x)} sampled pixels "
            f"(threshold {threshold:.4g} on the first component); the image may have no "
            "clear background. Use foreground=False or a larger n_samples."
        )
    log.info(
        "PCA foreground: %.1f %% of %d sampled pixels (threshold %.4g)",
        100 * keep.mean(),
        len(x),
        threshold,
    )
    fields = dict(fg_mean=fg_mean, fg_axis=fg_axis[0], fg_threshold=threshold, fg_above=fg_above)
    return keep, fields


def fit_pca(
    features: xr.DataArray,
    *,
    components: int = PCAOptions.components,
    n_samples: int = PCAOptions.samples,
    seed: int = PCAOptions.seed,
    foreground: bool = PCAOptions.foreground,
    max_chunks: int | None = 64,
) -> PCAModel:
    """Fit a PCA on a random sample of pixels.

    With ``foreground=True`` the two-step recipe of the DINOv2 paper is used:

    1. a 1-component PCA of the whole sample; its projection is thresholded with Otsu's
       method. The side that holds most of the sampled pixels lying in the outer 5 % band of the
       grid (at least one cell per side) is the background; with no sampled pixel in the band,
       the side with fewer pixels is the foreground;
    2. the PCA is refitted on the foreground pixels of the sample only.

    The first-step mean, axis and threshold are kept, so :meth:`PCAModel.project` returns NaN
    and :func:`pca_rgb` black on background pixels.

    Parameters
    ----------
    features : xarray.DataArray
        ``(feature, y, x)``, dask-backed.
    components : int, optional
        Number of components ``K`` (1 to C; :func:`pca_rgb` needs 3).
    n_samples : int, optional
        Pixels sampled (see :func:`~hrdv2_dask.analysis.sample_pixels`), at least 2.
    seed : int, optional
        Seed of the sample.
    foreground : bool, optional
        Separate foreground from background first (see above).
    max_chunks : int or None, optional
        Most ``(y, x)`` chunks read for the sample.

    Returns
    -------
    PCAModel

    Raises
    ------
    ConfigError
        An option out of range (the message is that of :class:`PCAOptions`), or more
        ``components`` than features.
    InputError
        Bad features, or too few foreground pixels in the sample.

    Examples
    --------
    >>> import dask.array as da, xarray as xr
    >>> feats = xr.DataArray(
    ...     da.random.default_rng(0).normal(size=(8, 64, 64), chunks=(8, 32, 32)),
    ...     dims=("feature", "y", "x"),
    ... )
    >>> fit_pca(feats, components=3, n_samples=2000).components.shape
    (3, 8)
    """
    options = PCAOptions(components=components, foreground=foreground, samples=n_samples, seed=seed)
    return _fit_pca(features, options, max_chunks=max_chunks)


def _fit_pca(
    features: xr.DataArray, options: PCAOptions, *, max_chunks: int | None = 64
) -> PCAModel:
    features, data = feature_data(features)
    n_feat = data.shape[0]
    k = options.components
    if k > n_feat:
        raise ConfigError(
            f"components={k} is more than the {n_feat} features; use at most {n_feat}."
        )
    x, pos, _ = draw_pixels(
        data, n=options.samples, seed=options.seed, max_chunks=check_max_chunks(max_chunks)
    )
    if len(x) < 2:
        raise InputError(
            f"Only {len(x)} finite pixel(s) could be sampled from features of shape "
            f"{data.shape}; check the store for NaN (an incomplete run?)."
        )
    fg_fields: dict[str, Any] = {}
    if options.foreground:
        keep, fg_fields = _split_foreground(x, pos, data.shape[1:], k)
        x = x[keep]
    mean, comps, variance, total = pca_basis(x, k)
    projected = (x - mean) @ comps.T
    lo, hi = np.percentile(projected, [1, 99], axis=0)
    return PCAModel(
        mean=mean,
        components=comps,
        explained_variance=variance,
        lo=lo,
        hi=hi,
        total_variance=total,
        n_samples=len(x),
        **fg_fields,
    )


def _rgb_block(block: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    scale = np.maximum(hi - lo, 1e-12)[:, None, None]
    scaled = (block - lo[:, None, None]) / scale
    scaled = np.where(np.isfinite(scaled), scaled, 0.0)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def pca_rgb(features: xr.DataArray, model: PCAModel) -> xr.DataArray:
    """False-colour image of the first three PCA components, lazily.

    Each component is mapped linearly from the model's ``[lo, hi]`` (1st/99th percentile of
    the sample) to ``[0, 255]`` and clipped; background pixels of a foreground model are black.

    Parameters
    ----------
    features : xarray.DataArray
        ``(feature, y, x)`` features.
    model : PCAModel
        A model with at least 3 components.

    Returns
    -------
    xarray.DataArray
        ``(y, x, rgb)`` uint8, dask-backed, ``rgb`` coordinate ``["r", "g", "b"]``.
    """
    if model.n_components < 3:
        raise ConfigError(
            f"pca_rgb needs a PCA model with >= 3 components, got {model.n_components}; fit it "
            "with fit_pca(..., components=3)."
        )
    proj = model.project(features)
    data = proj.data[:3].map_blocks(
        _rgb_block,
        model.lo[:3],
        model.hi[:3],
        dtype=np.uint8,
        meta=np.empty((0, 0, 0), np.uint8),
    )
    return xr.DataArray(
        data.transpose(1, 2, 0),
        dims=("y", "x", "rgb"),
        coords={**yx_coords(proj), "rgb": ["r", "g", "b"]},
        name="pca_rgb",
        attrs=dict(proj.attrs),
    )


@register(
    "pca",
    PCAOptions,
    help="PCA picture (OME-Zarr pyramid + PNG) of a feature store",
    function=fit_pca,
)
def run_pca(options: PCAOptions, features: xr.DataArray, out: Path) -> dict:
    """Write ``pca.zarr`` (the projection) and, with >= 3 components, ``pca.ome.zarr`` and
    ``pca.png`` under ``out``; return their paths and the explained variance ratios."""
    out = Path(out)
    model = _fit_pca(features, options)
    written = [out / "pca.zarr"]
    if model.n_components >= 3:
        rgb = pca_rgb(features, model)
        outputs.write_ome_pyramid(rgb, out / "pca.ome.zarr", overwrite=True)
        outputs.write_png(rgb, out / "pca.png")
        written += [out / "pca.ome.zarr", out / "pca.png"]
    outputs.write_array(
        model.project(features),
        out / "pca.zarr",
        attrs={**run_attrs(options), **model.to_dict()},
        overwrite=True,
    )
    return {
        "pca": [str(p) for p in written],
        "explained_variance_ratio": [round(float(v), 4) for v in model.explained_variance_ratio],
    }
