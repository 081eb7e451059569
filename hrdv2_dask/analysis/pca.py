"""PCA of a feature store: fit on a sample, project lazily, false-colour pictures."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import xarray as xr

from ..config import option
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
from ._saved import save_fields, saved
from .collection import (
    AcrossMembers,
    check_settings,
    draw_members,
    feature_settings,
    is_tree,
    map_members,
    member_arrays,
    members,
    write_members,
)
from .registry import register

__all__ = ["PCAModel", "PCAOptions", "fit_pca", "pca_basis", "pca_rgb", "run_pca"]

log = logging.getLogger(__name__)

_BORDER_FRACTION = 0.05  # outer band (per side) that defines "border" in the foreground recipe


@dataclass(frozen=True)
class PCAOptions(AcrossMembers):
    """The options of :func:`fit_pca`, of the ``pca`` workflow step and of ``hrdv2 pca``."""

    SECTION: ClassVar[str] = "pca"

    components: int = option(3, "principal components (the picture needs 3)", minimum=1)
    foreground: bool = option(False, "two-step PCA without background")
    samples: int = option(100_000, "pixels sampled for the fit", minimum=2, api="n_samples")
    seed: int = option(0, "seed of the sample", minimum=0)
    save_model: str | None = option(
        None, "also save the fitted model to this folder (hrdv2 apply uses it)", metavar="PATH"
    )


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
    settings : dict, optional
        The feature settings it was fitted on (:func:`~hrdv2_dask.analysis.collection.
        feature_settings`); :meth:`apply` refuses features made with other ones.
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
    settings: dict | None = None

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
        if self.settings is not None:
            object.__setattr__(self, "settings", dict(self.settings))

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

    def project(self, features: xr.DataArray | xr.DataTree) -> xr.DataArray | xr.DataTree:
        """Project every pixel onto the components, lazily (one task per chunk).

        Parameters
        ----------
        features : xarray.DataArray or xarray.DataTree
            ``(feature, y, x)`` with ``C`` features, or a collection (each member projected).

        Returns
        -------
        xarray.DataArray or xarray.DataTree
            ``(component, y, x)`` float32, dask-backed; NaN on background pixels of a
            foreground model (and wherever a feature is NaN). A DataTree of them for a
            collection.
        """
        if is_tree(features):
            return map_members(features, self.project)
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

    def apply(self, features: xr.DataArray | xr.DataTree) -> xr.DataArray | xr.DataTree:
        """:meth:`project`, after checking that the features have the model's settings."""
        check_settings(self.settings, features, "This PCA model")
        return self.project(features)

    def save(self, path: str | os.PathLike) -> Path:
        """Save to the folder ``path`` (JSON + npz); :func:`~hrdv2_dask.load_model` reads it."""
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return save_fields(path, "pca", fields)

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
        if self.settings is not None:
            out["settings"] = self.settings
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
    x: np.ndarray, border: np.ndarray, components: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """First step of the foreground recipe: which samples to keep, and the model's fg fields.

    ``border`` says which samples lie in the outer band of their image's grid.
    """
    fg_mean, fg_axis, _, _ = pca_basis(x, 1)
    score = (x - fg_mean) @ fg_axis[0]
    threshold = otsu_threshold(score)
    above = score > threshold
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
    features: xr.DataArray | xr.DataTree,
    *,
    components: int = PCAOptions.components,
    n_samples: int = PCAOptions.samples,
    seed: int = PCAOptions.seed,
    foreground: bool = PCAOptions.foreground,
    sample: str = PCAOptions.sample,
    images: tuple[str, ...] | None = PCAOptions.images,
    max_chunks: int | None = 64,
) -> PCAModel:
    """Fit a PCA on a random sample of pixels (of one store, or across a collection).

    On a collection the sample is drawn across its members (``sample``) and the one model
    projects every member alike: the colours of :func:`pca_rgb` mean the same in every image.
    The foreground recipe then finds one background for all members.

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
    features : xarray.DataArray or xarray.DataTree
        ``(feature, y, x)``, dask-backed; or a collection from
        :func:`~hrdv2_dask.open_collection`.
    components : int, optional
        Number of components ``K`` (1 to C; :func:`pca_rgb` needs 3).
    n_samples : int, optional
        Pixels sampled (see :func:`~hrdv2_dask.analysis.sample_pixels`), at least 2.
    seed : int, optional
        Seed of the sample.
    foreground : bool, optional
        Separate foreground from background first (see above).
    sample : {"balanced", "proportional"}, optional
        On a collection: as many pixels from each member, or in proportion to their pixels.
    images : tuple of str, optional
        On a collection: the member keys to fit on (default all).
    max_chunks : int or None, optional
        Most ``(y, x)`` chunks read for the sample (per member).

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
    options = PCAOptions(
        components=components,
        foreground=foreground,
        samples=n_samples,
        seed=seed,
        sample=sample,
        images=images,
    )
    return _fit_pca(features, options, max_chunks=max_chunks)


def _fit_pca(
    features: xr.DataArray | xr.DataTree, options: PCAOptions, *, max_chunks: int | None = 64
) -> PCAModel:
    mems = members(features, options.images)
    datas = member_arrays(mems)
    n_feat = datas[0].shape[0]
    k = options.components
    if k > n_feat:
        raise ConfigError(
            f"components={k} is more than the {n_feat} features; use at most {n_feat}."
        )
    x, pos, member, _ = draw_members(
        datas,
        n=options.samples,
        seed=options.seed,
        sample=options.sample,
        max_chunks=check_max_chunks(max_chunks),
    )
    if len(x) < 2:
        raise InputError(
            f"Only {len(x)} finite pixel(s) could be sampled from features of shape "
            f"{datas[0].shape}; check the store for NaN (an incomplete run?)."
        )
    fg_fields: dict[str, Any] = {}
    if options.foreground:
        border = np.zeros(len(x), dtype=bool)
        for i, data in enumerate(datas):
            sel = member == i
            border[sel] = _border_mask(pos[sel], data.shape[1:])
        keep, fg_fields = _split_foreground(x, border, k)
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
        settings=feature_settings(mems[0][1]),
        **fg_fields,
    )


def _rgb_block(block: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    scale = np.maximum(hi - lo, 1e-12)[:, None, None]
    scaled = (block - lo[:, None, None]) / scale
    scaled = np.where(np.isfinite(scaled), scaled, 0.0)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def pca_rgb(features: xr.DataArray | xr.DataTree, model: PCAModel) -> xr.DataArray | xr.DataTree:
    """False-colour image of the first three PCA components, lazily.

    Each component is mapped linearly from the model's ``[lo, hi]`` (1st/99th percentile of
    the sample) to ``[0, 255]`` and clipped; background pixels of a foreground model are black.

    Parameters
    ----------
    features : xarray.DataArray or xarray.DataTree
        ``(feature, y, x)`` features, or a collection (a DataTree of pictures comes back).
    model : PCAModel
        A model with at least 3 components.

    Returns
    -------
    xarray.DataArray or xarray.DataTree
        ``(y, x, rgb)`` uint8, dask-backed, ``rgb`` coordinate ``["r", "g", "b"]``.
    """
    if is_tree(features):
        return map_members(features, lambda arr: pca_rgb(arr, model))
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


def write_pca(
    model: PCAModel,
    features: xr.DataArray | xr.DataTree,
    out: str | os.PathLike,
    *,
    attrs: dict[str, Any] | None = None,
    images: tuple[str, ...] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Write a fitted model's ``pca.zarr`` (and with >= 3 components ``pca.ome.zarr`` and
    ``pca.png``) under ``out``, or under ``out/<key>/`` for each member of a collection."""
    check_settings(model.settings, features, "This PCA model")
    attrs = {**(attrs or {}), **model.to_dict()}

    def write_one(arr: xr.DataArray, folder: Path) -> dict:
        written = [folder / "pca.zarr"]
        if model.n_components >= 3:
            rgb = pca_rgb(arr, model)
            outputs.write_ome_pyramid(rgb, folder / "pca.ome.zarr", overwrite=True)
            outputs.write_png(rgb, folder / "pca.png")
            written += [folder / "pca.ome.zarr", folder / "pca.png"]
        outputs.write_array(model.project(arr), folder / "pca.zarr", attrs=attrs, overwrite=True)
        return {"pca": [str(p) for p in written]}

    figures = {
        "explained_variance_ratio": [round(float(v), 4) for v in model.explained_variance_ratio],
        **(extra or {}),
    }
    return write_members(
        features, out, write_one, images=images, picture="pca.png", figures=figures
    )


@register(
    "pca",
    PCAOptions,
    help="PCA picture (OME-Zarr pyramid + PNG) of a feature store or a collection",
    function=fit_pca,
)
def run_pca(options: PCAOptions, features: xr.DataArray | xr.DataTree, out: Path) -> dict:
    """Fit, then write ``pca.zarr`` and, with >= 3 components, ``pca.ome.zarr`` and ``pca.png``
    under ``out`` (per member for a collection); return their paths and the explained variance
    ratios."""
    model = _fit_pca(features, options)
    extra = saved(model, options.save_model)
    return write_pca(
        model, features, out, attrs=run_attrs(options), images=options.images, extra=extra
    )
