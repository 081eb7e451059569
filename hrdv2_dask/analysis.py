"""Analysis of feature stores: PCA colour maps, k-means, similarity maps, scribble segmentation.

Every function takes a ``(feature, y, x)`` :class:`xarray.DataArray` such as the one returned by
:func:`hrdv2_dask.io.store.open_features` and works chunk by chunk:

* **fitting** (:func:`fit_pca`, :func:`fit_kmeans`, :func:`fit_segmenter`) reads a bounded,
  seeded random sample of pixels (:func:`sample_pixels`), never the whole store;
* **applying** (``project``, :func:`pca_rgb`, ``predict``, :func:`similarity`) builds a lazy dask
  graph with one task per ``(y, x)`` chunk and computes nothing; write the result with
  :mod:`hrdv2_dask.io.outputs` or call ``.compute()`` on a crop.

The ``(y, x)`` coordinates of the input (and ``y_phys``/``x_phys`` when present) are kept on
every output. Chunk functions use numpy only, except :meth:`Segmenter.predict`, which calls the
fitted scikit-learn estimator. scikit-learn is needed only by :func:`fit_kmeans` and
:func:`fit_segmenter`.

Examples
--------
>>> import dask.array as da, xarray as xr
>>> feats = xr.DataArray(
...     da.random.default_rng(0).normal(size=(8, 64, 64), chunks=(8, 32, 32)),
...     dims=("feature", "y", "x"),
... )
>>> model = fit_pca(feats, components=3, n_samples=2000)
>>> pca_rgb(feats, model).dims
('y', 'x', 'rgb')
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ._checks import as_int as _as_int
from .errors import ConfigError, InputError
from .masking import otsu_threshold

__all__ = [
    "KMeansModel",
    "PCAModel",
    "Segmenter",
    "fit_kmeans",
    "fit_pca",
    "fit_segmenter",
    "pca_basis",
    "pca_rgb",
    "sample_pixels",
    "similarity",
]

log = logging.getLogger(__name__)

DIMS = ("feature", "y", "x")
_BORDER_FRACTION = 0.05  # outer band (per side) that defines "border" in the foreground recipe
_SEGMENTER_METHODS = ("random_forest", "logistic")
_LABEL_REDUCERS = ("mode", "nearest")


# ---------------------------------------------------------------------------------------------
# Checks and small helpers
# ---------------------------------------------------------------------------------------------


def _max_chunks(value: int | None) -> int | None:
    if value is None:
        return None
    return _as_int("max_chunks", value, 1, "pass a positive number of chunks or None for all")


def _feature_data(features: Any) -> tuple[xr.DataArray, da.Array]:
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


def _yx_coords(features: xr.DataArray) -> dict[str, xr.Variable]:
    """Coordinates of ``features`` that live on ``y`` and/or ``x`` only."""
    return {
        name: coord.variable
        for name, coord in features.coords.items()
        if coord.dims and set(coord.dims) <= {"y", "x"}
    }


def _wrap(
    data: da.Array,
    dims: tuple[str, ...],
    features: xr.DataArray,
    *,
    name: str,
    attrs: Mapping[str, Any],
    extra_coords: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    coords: dict[str, Any] = dict(_yx_coords(features))
    coords.update(extra_coords or {})
    base = {k: features.attrs[k] for k in ("out_stride",) if k in features.attrs}
    return xr.DataArray(data, dims=dims, coords=coords, name=name, attrs={**base, **attrs})


def _check_n_features(what: str, expected: int, features: xr.DataArray) -> None:
    got = features.sizes["feature"]
    if got != expected:
        raise InputError(
            f"{what} was fitted on {expected} features but these features have {got}; apply "
            "it to a store made with the same backbone, or fit a new one on this store."
        )


def _sklearn_missing(err: ImportError) -> ImportError:
    return ImportError(
        f"scikit-learn is needed for k-means and scribble segmentation ({err}); install it "
        "with `pip install scikit-learn`."
    )


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _count_block(block: np.ndarray) -> np.ndarray:
    return np.array([[np.count_nonzero(block)]], dtype=np.int64)


def _chunk_counts(data: da.Array, mask: da.Array | None) -> np.ndarray:
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


def _sample(
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
    chunked like ``data``; ``counts`` is :func:`_chunk_counts` when already known. Pixels are
    drawn without replacement, uniformly among the mask's pixels of the chunks read; non-finite
    pixels are skipped (so ``m`` may fall short of ``n``).
    """
    ychunks, xchunks = data.chunks[1], data.chunks[2]
    if counts is None:
        counts = _chunk_counts(data, mask)
    flat = counts.ravel()
    candidates = np.flatnonzero(flat)
    if candidates.size == 0:
        raise InputError(
            "The mask selects no pixel (all False / all unlabelled); pass a mask or labels "
            "with at least one selected pixel."
        )
    rng = np.random.default_rng(seed)
    if max_chunks is not None and candidates.size > max_chunks:
        p = flat[candidates] / flat[candidates].sum()
        chosen = np.sort(rng.choice(candidates, size=max_chunks, replace=False, p=p))
    else:
        chosen = candidates
    available = flat[chosen]
    if n >= available.sum():
        take = available
    else:
        take = rng.multivariate_hypergeometric(available, n, method="marginals")
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
    log.debug("sampling %d pixels from %d of %d chunks", int(take.sum()), len(tasks), flat.size)
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
    n = _as_int("n", n, 1, "pass the number of pixels to draw")
    seed = _as_int("seed", seed, 0, "pass a non-negative integer seed")
    features, data = _feature_data(features)
    mask_d = None if mask is None else _mask_like(mask, data)
    feats, _, _ = _sample(data, n=n, seed=seed, mask=mask_d, max_chunks=_max_chunks(max_chunks))
    return feats


# ---------------------------------------------------------------------------------------------
# PCA
# ---------------------------------------------------------------------------------------------


def pca_basis(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """PCA of samples ``x (n, C)``: mean, top-``k`` components, their variances, total variance.

    Component signs are fixed (largest entry positive) so that fits are reproducible.
    """
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
    for start in range(0, len(x), 16384):
        xc = x[start : start + 16384].astype(np.float64) - mean
        cov += xc.T @ xc
    cov /= max(len(x) - 1, 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:k]
    comps = evecs[:, order].T
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    return mean, comps, np.clip(evals[order], 0.0, None), float(np.clip(evals, 0, None).sum())


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


def _array(name: str, value: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
    if shape is not None and arr.shape != shape:
        raise ConfigError(
            f"{name} must have shape {shape}, got {arr.shape}; rebuild the model with "
            "fit_pca/fit_kmeans or fix the dict passed to from_dict."
        )
    return arr


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
        components = _array("components", self.components)
        if components.ndim != 2 or 0 in components.shape:
            raise ConfigError(
                f"components must be a non-empty (K, C) array, got shape {components.shape}."
            )
        k, c = components.shape
        object.__setattr__(self, "components", components)
        object.__setattr__(self, "mean", _array("mean", self.mean, (c,)))
        for name in ("explained_variance", "lo", "hi"):
            object.__setattr__(self, name, _array(name, getattr(self, name), (k,)))
        fg = (self.fg_mean, self.fg_axis, self.fg_threshold)
        if any(v is None for v in fg) and not all(v is None for v in fg):
            raise ConfigError(
                "fg_mean, fg_axis and fg_threshold go together: give all three (foreground "
                "model) or none."
            )
        if self.fg_mean is not None:
            object.__setattr__(self, "fg_mean", _array("fg_mean", self.fg_mean, (c,)))
            object.__setattr__(self, "fg_axis", _array("fg_axis", self.fg_axis, (c,)))
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
        features, data = _feature_data(features)
        _check_n_features("This PCA model", self.n_features, features)
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
        return _wrap(
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
        return cls(**_fields_from(cls, data, "pca"))


def _fields_from(cls: type, data: Mapping[str, Any], kind: str) -> dict[str, Any]:
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


def _border_mask(pos: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    band = [max(1, math.ceil(_BORDER_FRACTION * s)) for s in shape]
    y, x = pos[:, 0], pos[:, 1]
    return (y < band[0]) | (y >= shape[0] - band[0]) | (x < band[1]) | (x >= shape[1] - band[1])


def fit_pca(
    features: xr.DataArray,
    *,
    components: int = 3,
    n_samples: int = 100_000,
    seed: int = 0,
    foreground: bool = False,
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
        Pixels sampled (see :func:`sample_pixels`).
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
        ``components`` out of range.
    InputError
        Bad features, or too few foreground pixels in the sample.
    """
    features, data = _feature_data(features)
    n_feat = data.shape[0]
    components = _as_int("components", components, 1, "use e.g. components=3")
    if components > n_feat:
        raise ConfigError(
            f"components={components} is more than the {n_feat} features; use at most {n_feat}."
        )
    n_samples = _as_int("n_samples", n_samples, 2, "use e.g. n_samples=100_000")
    seed = _as_int("seed", seed, 0, "pass a non-negative integer seed")
    x, pos, _ = _sample(data, n=n_samples, seed=seed, max_chunks=_max_chunks(max_chunks))
    if len(x) < 2:
        raise InputError(
            f"Only {len(x)} finite pixel(s) could be sampled from features of shape "
            f"{data.shape}; check the store for NaN (an incomplete run?)."
        )
    fg_fields: dict[str, Any] = {}
    if foreground:
        fg_mean, fg_axis, _, _ = pca_basis(x, 1)
        score = (x - fg_mean) @ fg_axis[0]
        threshold = otsu_threshold(score)
        above = score > threshold
        border = _border_mask(pos, data.shape[1:])
        if border.any():
            fg_above = bool(above[border].mean() < 0.5)
        else:
            fg_above = bool(above.mean() < 0.5)
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
        x = x[keep]
        fg_fields = dict(
            fg_mean=fg_mean, fg_axis=fg_axis[0], fg_threshold=threshold, fg_above=fg_above
        )
    mean, comps, variance, total = pca_basis(x, components)
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
    out = xr.DataArray(
        data.transpose(1, 2, 0),
        dims=("y", "x", "rgb"),
        coords={**_yx_coords(proj), "rgb": ["r", "g", "b"]},
        name="pca_rgb",
        attrs=dict(proj.attrs),
    )
    return out


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------


def _label_dtype(max_label: int) -> np.dtype:
    return np.dtype(np.uint8 if max_label <= 255 else np.uint16)


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for each row of ``x`` (squared Euclidean distance)."""
    d = (centres * centres).sum(axis=1)[None, :] - 2.0 * (x @ centres.T)
    return np.argmin(d, axis=1)


def _nearest_block(block: np.ndarray, centres: np.ndarray, dtype: np.dtype) -> np.ndarray:
    n_feat, h, w = block.shape
    x = block.reshape(n_feat, h * w).T.astype(np.float32)
    return _nearest(x, centres).astype(dtype).reshape(h, w)


@dataclass(frozen=True, eq=False)
class KMeansModel:
    """k-means centres fitted on a sample of pixels.

    Parameters
    ----------
    centres : numpy.ndarray
        ``(k, C)`` float32 cluster centres, ordered by decreasing cluster size in the sample
        (label 0 is the largest cluster).
    inertia : float, optional
        Mean squared distance of the sample to its nearest centre.
    n_samples : int, optional
        Pixels the model was fitted on.
    """

    centres: np.ndarray
    inertia: float = float("nan")
    n_samples: int = 0

    def __post_init__(self) -> None:
        centres = _array("centres", self.centres)
        if centres.ndim != 2 or centres.shape[0] < 1 or centres.shape[1] < 1:
            raise ConfigError(f"centres must be a (k, C) array, got shape {centres.shape}.")
        if centres.shape[0] > 65536:
            raise ConfigError(f"k={centres.shape[0]} clusters do not fit uint16 labels.")
        object.__setattr__(self, "centres", centres)
        object.__setattr__(self, "inertia", float(self.inertia))
        object.__setattr__(self, "n_samples", int(self.n_samples))

    @property
    def k(self) -> int:
        return int(self.centres.shape[0])

    def predict(self, features: xr.DataArray) -> xr.DataArray:
        """Label of the nearest centre for every pixel, lazily (numpy, one task per chunk).

        Returns
        -------
        xarray.DataArray
            ``(y, x)`` uint8 labels ``0 .. k-1`` (uint16 when ``k > 256``). Pixels with NaN
            features get label 0.
        """
        features, data = _feature_data(features)
        _check_n_features("This k-means model", self.centres.shape[1], features)
        dtype = _label_dtype(self.k - 1)
        out = data.map_blocks(
            _nearest_block,
            self.centres,
            dtype,
            drop_axis=0,
            dtype=dtype,
            meta=np.empty((0, 0), dtype),
        )
        return _wrap(out, ("y", "x"), features, name="kmeans", attrs={"k": self.k})

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "kmeans",
            "centres": self.centres.tolist(),
            "inertia": self.inertia,
            "n_samples": self.n_samples,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KMeansModel:
        return cls(**_fields_from(cls, data, "kmeans"))


def fit_kmeans(
    features: xr.DataArray,
    *,
    k: int = 6,
    n_samples: int = 100_000,
    seed: int = 0,
    max_chunks: int | None = 64,
) -> KMeansModel:
    """Cluster a random sample of pixels with mini-batch k-means.

    Uses scikit-learn's ``MiniBatchKMeans(init="k-means++", n_init=3, random_state=seed)``;
    the same seed gives the same centres and labels.

    Parameters
    ----------
    features : xarray.DataArray
        ``(feature, y, x)``, dask-backed.
    k : int, optional
        Number of clusters, 2 to 65536.
    n_samples : int, optional
        Pixels sampled (see :func:`sample_pixels`); must be >= ``k``.
    seed : int, optional
        Seed of the sample and of k-means.
    max_chunks : int or None, optional
        Most ``(y, x)`` chunks read for the sample.

    Returns
    -------
    KMeansModel
    """
    features, data = _feature_data(features)
    k = _as_int("k", k, 2, "use e.g. k=6")
    if k > 65536:
        raise ConfigError(f"k={k} is too many clusters for uint16 labels; use k <= 65536.")
    n_samples = _as_int("n_samples", n_samples, k, f"sample at least k={k} pixels")
    seed = _as_int("seed", seed, 0, "pass a non-negative integer seed")
    try:
        from sklearn.cluster import MiniBatchKMeans
    except ImportError as err:
        raise _sklearn_missing(err) from err
    x, _, _ = _sample(data, n=n_samples, seed=seed, max_chunks=_max_chunks(max_chunks))
    if len(x) < k:
        raise InputError(
            f"Only {len(x)} finite pixels could be sampled, fewer than k={k} clusters; use a "
            "smaller k or check the store for NaN."
        )
    km = MiniBatchKMeans(
        n_clusters=k, init="k-means++", n_init=3, random_state=seed, batch_size=4096
    ).fit(x)
    centres = km.cluster_centers_.astype(np.float32)
    labels = _nearest(x, centres)
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    centres = centres[order]
    inertia = float(((x - centres[_nearest(x, centres)]) ** 2).sum(axis=1).mean())
    log.info("k-means: k=%d on %d pixels, inertia %.4g", k, len(x), inertia)
    return KMeansModel(centres=centres, inertia=inertia, n_samples=len(x))


# ---------------------------------------------------------------------------------------------
# Similarity
# ---------------------------------------------------------------------------------------------


def _query_points(points: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(points)
    if arr.ndim == 1 and arr.size == 2:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise InputError(
            f"points must be a non-empty list of (y, x) pairs, got {points!r}; e.g. "
            "points=[(10, 20)]."
        )
    if not np.issubdtype(arr.dtype, np.number) or not np.all(arr == np.round(arr)):
        raise InputError(
            f"points must be integer (y, x) output cells, got {points!r}; round them or divide "
            "pixel positions by out_stride first."
        )
    arr = arr.astype(np.int64)
    for y, x in arr:
        if not (0 <= y < shape[0] and 0 <= x < shape[1]):
            raise InputError(
                f"Query point (y={y}, x={x}) is outside the feature grid of shape {shape}; "
                f"use 0 <= y < {shape[0]} and 0 <= x < {shape[1]} (output cells, not pixels)."
            )
    return arr[:, 0], arr[:, 1]


def _query_box(box: Any, shape: tuple[int, int]) -> tuple[slice, slice]:
    vals = np.asarray(box)
    if vals.shape != (4,) or not np.issubdtype(vals.dtype, np.number):
        raise InputError(f"box must be (y0, x0, y1, x1), got {box!r}.")
    y0, x0, y1, x1 = (int(v) for v in vals)
    if not (0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1]):
        raise InputError(
            f"Query box (y0={y0}, x0={x0}, y1={y1}, x1={x1}) is empty or outside the feature "
            f"grid of shape {shape}; use 0 <= y0 < y1 <= {shape[0]} and 0 <= x0 < x1 <= "
            f"{shape[1]} (half-open, output cells)."
        )
    return slice(y0, y1), slice(x0, x1)


def _cosine_block(block: np.ndarray, query: np.ndarray, dtype: np.dtype) -> np.ndarray:
    n_feat, h, w = block.shape
    x = block.reshape(n_feat, h * w).astype(np.float32)
    q = np.asarray(query, dtype=np.float32)
    dot = q @ x
    norm = np.sqrt((x * x).sum(axis=0)) * np.float32(np.sqrt(q @ q))
    return (dot / np.maximum(norm, np.float32(1e-12))).astype(dtype).reshape(h, w)


def similarity(
    features: xr.DataArray,
    *,
    points: Sequence[tuple[int, int]] | np.ndarray | None = None,
    box: tuple[int, int, int, int] | None = None,
    dtype: str | np.dtype = "float32",
) -> xr.DataArray:
    """Cosine similarity of every pixel to the mean feature of some query pixels, lazily.

    Parameters
    ----------
    features : xarray.DataArray
        ``(feature, y, x)`` features.
    points : sequence of (int, int), optional
        Query output cells ``(y, x)`` (grid indices, not source pixels: divide by
        ``out_stride``).
    box : (int, int, int, int), optional
        Query rectangle ``(y0, x0, y1, x1)`` of output cells, half-open. Give exactly one of
        ``points`` and ``box``.
    dtype : str or numpy.dtype, optional
        ``"float32"`` or ``"float16"``; computations are float32 either way.

    Returns
    -------
    xarray.DataArray
        ``(y, x)`` similarity in ``[-1, 1]``, dask-backed; the query mean is part of the graph
        (nothing is computed here). NaN where the query or pixel features are NaN.

    Raises
    ------
    InputError
        A point or box outside the grid (the message names it and the grid shape).
    ConfigError
        Neither or both of ``points`` and ``box``; an unsupported ``dtype``.
    """
    features, data = _feature_data(features)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ConfigError(f"dtype must be 'float32' or 'float16', got {str(dtype)!r}.")
    if (points is None) == (box is None):
        raise ConfigError(
            "Give exactly one of points=[(y, x), ...] and box=(y0, x0, y1, x1) as the query."
        )
    shape = data.shape[1:]
    if points is not None:
        ys, xs = _query_points(points, shape)
        query = data.vindex[:, ys, xs].astype(np.float32).mean(axis=0)
        what = {"query_points": [[int(y), int(x)] for y, x in zip(ys, xs, strict=True)]}
    else:
        sy, sx = _query_box(box, shape)
        query = data[:, sy, sx].astype(np.float32).mean(axis=(1, 2))
        what = {"query_box": [sy.start, sx.start, sy.stop, sx.stop]}
    query = query.rechunk(-1)
    out = da.blockwise(
        _cosine_block,
        "yx",
        data,
        "fyx",
        query,
        "f",
        dtype,
        None,
        concatenate=True,
        dtype=dtype,
        meta=np.empty((0, 0), dtype),
    )
    return _wrap(out, ("y", "x"), features, name="similarity", attrs=what)


# ---------------------------------------------------------------------------------------------
# Scribble segmentation
# ---------------------------------------------------------------------------------------------


def _reduce_labels_block(block: np.ndarray, stride: int, how: str) -> np.ndarray:
    """Labels of one image-resolution chunk (starting at a multiple of ``stride``) per cell."""
    h, w = block.shape
    if how == "nearest":
        ys = np.minimum(np.arange(0, h, stride) + stride // 2, h - 1)
        xs = np.minimum(np.arange(0, w, stride) + stride // 2, w - 1)
        return block[np.ix_(ys, xs)]
    padded = np.pad(block, ((0, -h % stride), (0, -w % stride)))
    hh, ww = padded.shape[0] // stride, padded.shape[1] // stride
    cells = padded.reshape(hh, stride, ww, stride).transpose(0, 2, 1, 3).reshape(hh, ww, -1)
    out = np.zeros((hh, ww), dtype=block.dtype)
    best = np.zeros((hh, ww), dtype=np.int64)
    for value in np.unique(cells[cells > 0]):  # ascending: ties go to the smaller label
        count = (cells == value).sum(axis=-1)
        better = count > best
        out[better] = value
        best[better] = count[better]
    return out


def _labels_on_grid(labels: Any, data: da.Array, stride: int, how: str) -> da.Array:
    """``labels`` as a dask ``(Y, X)`` array on the feature grid, chunked like ``data``."""
    if isinstance(labels, xr.DataArray):
        labels = labels.transpose("y", "x").data if set(labels.dims) == {"y", "x"} else labels.data
    if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
        labels = np.asarray(labels)
    grid = tuple(data.shape[1:])
    shape = tuple(int(s) for s in labels.shape)
    if len(shape) != 2:
        raise InputError(
            f"labels must be a 2-D (y, x) integer array, got shape {shape}; pass one label "
            "plane (0 = unlabelled, 1, 2, ... = classes)."
        )
    dtype = np.dtype(labels.dtype)
    if dtype == np.bool_:
        labels = labels.astype(np.uint8)
    elif not np.issubdtype(dtype, np.integer):
        raise InputError(
            f"labels must be integers (0 = unlabelled), got dtype {dtype}; convert them with "
            ".astype(int) after rounding."
        )
    if not isinstance(labels, da.Array):
        labels = da.from_array(np.asarray(labels), chunks=data.chunks[1:] if shape == grid else -1)
    if shape == grid:
        return labels.rechunk(data.chunks[1:])
    expected = tuple(-(-s // stride) for s in shape)
    if stride <= 1 or expected != grid:
        lo = tuple((g - 1) * stride + 1 for g in grid)
        hi = tuple(g * stride for g in grid)
        raise InputError(
            f"labels have shape {shape} but the features have a (y, x) grid of {grid} "
            f"(out_stride {stride}); pass labels of shape {grid} (one per output cell) or at "
            f"image resolution, between {lo} and {hi}."
        )
    chunks = tuple(
        tuple(c * stride for c in ch[:-1]) + (size - stride * sum(ch[:-1]),)
        for ch, size in zip(data.chunks[1:], shape, strict=True)
    )
    return labels.rechunk(chunks).map_blocks(
        _reduce_labels_block,
        stride,
        how,
        chunks=data.chunks[1:],
        dtype=labels.dtype,
        meta=np.empty((0, 0), labels.dtype),
    )


def _segment_block(
    block: np.ndarray, estimator: Any, n_classes: int, proba: bool, dtype: np.dtype
) -> np.ndarray:
    n_feat, h, w = block.shape
    x = block.reshape(n_feat, h * w).T.astype(np.float32)
    ok = np.isfinite(x).all(axis=1)
    if proba:
        out = np.zeros((n_classes, h * w), dtype=dtype)
        if ok.any():
            out[:, ok] = estimator.predict_proba(x[ok]).T
        return out.reshape(n_classes, h, w)
    labels = np.zeros(h * w, dtype=dtype)
    if ok.any():
        labels[ok] = estimator.predict(x[ok])
    return labels.reshape(h, w)


@dataclass(frozen=True, eq=False)
class Segmenter:
    """A pixel classifier trained on scribbles; see :func:`fit_segmenter`.

    Parameters
    ----------
    estimator : object
        Fitted scikit-learn classifier (``predict``/``predict_proba`` on ``(n, C)`` float32).
    classes : tuple of int
        Label values of the classes, ascending (the ``class`` axis of probabilities).
    method : str
        ``"random_forest"`` or ``"logistic"``.
    n_features : int
        Number of features ``C`` it was trained on.

    Notes
    -----
    The estimator is a scikit-learn object: save a segmenter with :mod:`pickle` or ``joblib``.
    """

    estimator: Any = field(repr=False)
    classes: tuple[int, ...]
    method: str
    n_features: int

    def __post_init__(self) -> None:
        if self.method not in _SEGMENTER_METHODS:
            raise ConfigError(f"method must be one of {_SEGMENTER_METHODS}, got {self.method!r}.")
        classes = tuple(int(c) for c in self.classes)
        if len(classes) < 2 or list(classes) != sorted(set(classes)) or classes[0] < 1:
            raise ConfigError(
                f"classes must be >= 2 distinct ascending labels >= 1, got {self.classes!r}."
            )
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "n_features", int(self.n_features))

    def predict(self, features: xr.DataArray, *, proba: bool = False) -> xr.DataArray:
        """Classify every pixel, lazily (one task per chunk).

        Parameters
        ----------
        features : xarray.DataArray
            ``(feature, y, x)`` with the same features as training.
        proba : bool, optional
            Return class probabilities instead of labels.

        Returns
        -------
        xarray.DataArray
            ``(y, x)`` labels (the label values of :attr:`classes`; 0 where a feature is NaN),
            uint8 (uint16 for labels > 255); or with ``proba=True`` ``(class, y, x)`` float16
            probabilities (0 where a feature is NaN).
        """
        features, data = _feature_data(features)
        _check_n_features("This segmenter", self.n_features, features)
        n_cls = len(self.classes)
        if proba:
            dtype = np.dtype(np.float16)
            out = data.map_blocks(
                _segment_block,
                self.estimator,
                n_cls,
                True,
                dtype,
                chunks=((n_cls,), *data.chunks[1:]),
                dtype=dtype,
                meta=np.empty((0, 0, 0), dtype),
            )
            return _wrap(
                out,
                ("class", "y", "x"),
                features,
                name="probability",
                attrs={"method": self.method},
                extra_coords={"class": list(self.classes)},
            )
        dtype = _label_dtype(max(self.classes))
        out = data.map_blocks(
            _segment_block,
            self.estimator,
            n_cls,
            False,
            dtype,
            drop_axis=0,
            dtype=dtype,
            meta=np.empty((0, 0), dtype),
        )
        return _wrap(
            out,
            ("y", "x"),
            features,
            name="segmentation",
            attrs={"method": self.method, "classes": list(self.classes)},
        )


def _make_estimator(method: str, seed: int) -> Any:
    """The scikit-learn classifier for ``method`` (one table, strings parsed only here)."""
    try:
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as err:
        raise _sklearn_missing(err) from err
    factories = {
        "random_forest": lambda: RandomForestClassifier(
            n_estimators=100, n_jobs=-1, random_state=seed
        ),
        "logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
    }
    return factories[method]()


def fit_segmenter(
    features: xr.DataArray,
    labels: Any,
    *,
    method: str = "random_forest",
    holdout: float = 0.2,
    seed: int = 0,
    max_samples: int = 200_000,
    label_reduce: str = "mode",
) -> tuple[Segmenter, dict[str, Any]]:
    """Train a pixel classifier on scribbles (sparse labels).

    Parameters
    ----------
    features : xarray.DataArray
        ``(feature, y, x)`` features.
    labels : array_like of int
        ``(y, x)`` labels (numpy, dask or DataArray): 0 (or negative) = unlabelled, 1, 2, ... =
        classes. Either at the feature grid resolution, or at image resolution ``(H, W)`` with
        ``ceil(H / out_stride), ceil(W / out_stride)`` equal to the grid
        (``out_stride = features.attrs.get("out_stride", 1)``).
    method : {"random_forest", "logistic"}, optional
        Random forest (100 trees) or standardised logistic regression.
    holdout : float, optional
        Share of the labelled pixels kept out of training to measure accuracy, in ``[0, 1)``.
        They are drawn at random, so neighbours of training pixels: expect the holdout
        accuracy to be optimistic for thin scribbles.
    seed : int, optional
        Seed of the pixel draw, the holdout split and the forest.
    max_samples : int, optional
        Most labelled pixels used (a uniform random subset when there are more).
    label_reduce : {"mode", "nearest"}, optional
        How image-resolution labels become one label per output cell: the most frequent
        non-zero label of the cell (thin scribbles survive), or the label of the pixel at the
        cell centre (nearest neighbour).

    Returns
    -------
    segmenter : Segmenter
    report : dict
        ``train_accuracy``, ``holdout_accuracy`` (None without holdout pixels),
        ``n_labelled`` (labelled cells in the whole grid), ``n_train``, ``n_holdout``,
        ``classes`` (label values) and ``method``.

    Raises
    ------
    InputError
        Labels of the wrong shape (both shapes named) or dtype, or fewer than two classes.
    ConfigError
        Unknown ``method`` or ``label_reduce``, ``holdout`` outside ``[0, 1)``.
    """
    if method not in _SEGMENTER_METHODS:
        raise ConfigError(f"method must be one of {_SEGMENTER_METHODS}, got {method!r}.")
    if label_reduce not in _LABEL_REDUCERS:
        raise ConfigError(f"label_reduce must be one of {_LABEL_REDUCERS}, got {label_reduce!r}.")
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0 <= holdout < 1:
        raise ConfigError(f"holdout must be a fraction in [0, 1), got {holdout!r}; e.g. 0.2.")
    seed = _as_int("seed", seed, 0, "pass a non-negative integer seed")
    max_samples = _as_int("max_samples", max_samples, 2, "use e.g. max_samples=200_000")
    features, data = _feature_data(features)
    stride = _as_int(
        "features.attrs['out_stride']",
        features.attrs.get("out_stride", 1),
        1,
        "fix the store attributes",
    )
    grid_labels = _labels_on_grid(labels, data, stride, label_reduce)
    labelled = grid_labels > 0
    counts = _chunk_counts(data, labelled)
    n_labelled = int(counts.sum())
    if n_labelled == 0:
        raise InputError(
            "labels have no labelled pixel (all 0); draw scribbles with values 1, 2, ... for "
            "at least two classes."
        )
    x, _, y = _sample(
        data, n=max_samples, seed=seed, mask=labelled, values=grid_labels, counts=counts
    )
    classes = tuple(int(c) for c in np.unique(y))
    if len(classes) < 2:
        raise InputError(
            f"labels hold only class {classes} on finite features; draw scribbles of at least "
            "two classes."
        )
    if classes[-1] > 65535:
        raise InputError(f"label values must be <= 65535, got {classes[-1]}.")
    y = y.astype(np.int64)
    order = np.random.default_rng([seed, 1]).permutation(len(x))
    n_hold = int(round(holdout * len(x)))
    hold, train = order[:n_hold], order[n_hold:]
    if len(np.unique(y[train])) < 2:
        raise InputError(
            "The training split holds a single class; label more pixels of each class or "
            "lower holdout."
        )
    estimator = _make_estimator(method, seed).fit(x[train], y[train])
    if method == "random_forest":
        estimator.set_params(n_jobs=1)  # one thread per dask task when predicting
    train_acc = float((estimator.predict(x[train]) == y[train]).mean())
    hold_acc = float((estimator.predict(x[hold]) == y[hold]).mean()) if n_hold else None
    report = {
        "train_accuracy": train_acc,
        "holdout_accuracy": hold_acc,
        "n_labelled": n_labelled,
        "n_train": int(len(train)),
        "n_holdout": int(n_hold),
        "classes": list(classes),
        "method": method,
    }
    log.info("segmenter %s: %s", method, report)
    segmenter = Segmenter(
        estimator=estimator, classes=classes, method=method, n_features=int(data.shape[0])
    )
    return segmenter, report
