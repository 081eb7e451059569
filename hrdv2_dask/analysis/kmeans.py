"""k-means clustering of a feature store: fit on a sample, label every pixel lazily."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import xarray as xr

from ..config import Settings, option
from ..errors import ConfigError, InputError
from ..io import outputs
from ._common import (
    MAX_LABEL,
    as_float32,
    check_max_chunks,
    check_n_features,
    feature_data,
    label_dtype,
    model_fields,
    run_attrs,
    sklearn_missing,
    wrap,
)
from .registry import register
from .sampling import draw_pixels

__all__ = ["MAX_CLUSTERS", "KMeansModel", "KMeansOptions", "fit_kmeans", "run_cluster"]

log = logging.getLogger(__name__)

#: Most clusters: labels ``0 .. k-1`` must fit the largest label dtype (uint16).
MAX_CLUSTERS = MAX_LABEL + 1


@dataclass(frozen=True)
class KMeansOptions(Settings):
    """The options of :func:`fit_kmeans`, of the ``cluster`` workflow step and of
    ``hrdv2 cluster``."""

    SECTION: ClassVar[str] = "cluster"

    k: int = option(6, "number of clusters", minimum=2, maximum=MAX_CLUSTERS, cli="-k")
    samples: int = option(100_000, "pixels sampled for the fit", minimum=2, api="n_samples")
    seed: int = option(0, "seed of the sample and of k-means", minimum=0)

    def _check_together(self) -> None:
        if self.samples < self.k:
            raise ConfigError(
                f"cluster.samples must be >= k ({self.k}), got {self.samples}; k-means needs "
                "at least one sampled pixel per cluster."
            )


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
        (label 0 is the largest cluster); ``k <= MAX_CLUSTERS``.
    inertia : float, optional
        Mean squared distance of the sample to its nearest centre.
    n_samples : int, optional
        Pixels the model was fitted on.
    """

    centres: np.ndarray
    inertia: float = float("nan")
    n_samples: int = 0

    def __post_init__(self) -> None:
        centres = as_float32("centres", self.centres)
        if centres.ndim != 2 or centres.shape[0] < 1 or centres.shape[1] < 1:
            raise ConfigError(f"centres must be a (k, C) array, got shape {centres.shape}.")
        if centres.shape[0] > MAX_CLUSTERS:
            raise ConfigError(
                f"k={centres.shape[0]} clusters do not fit uint16 labels; use at most "
                f"{MAX_CLUSTERS}."
            )
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
        features, data = feature_data(features)
        check_n_features("This k-means model", self.centres.shape[1], features)
        dtype = label_dtype(self.k - 1)
        out = data.map_blocks(
            _nearest_block,
            self.centres,
            dtype,
            drop_axis=0,
            dtype=dtype,
            meta=np.empty((0, 0), dtype),
        )
        return wrap(out, ("y", "x"), features, name="kmeans", attrs={"k": self.k})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; :meth:`from_dict` inverts it."""
        return {
            "kind": "kmeans",
            "centres": self.centres.tolist(),
            "inertia": self.inertia,
            "n_samples": self.n_samples,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KMeansModel:
        """Rebuild a model from :meth:`to_dict` output."""
        return cls(**model_fields(cls, data, "kmeans"))


def fit_kmeans(
    features: xr.DataArray,
    *,
    k: int = KMeansOptions.k,
    n_samples: int = KMeansOptions.samples,
    seed: int = KMeansOptions.seed,
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
        Number of clusters, 2 to :data:`MAX_CLUSTERS` (65536).
    n_samples : int, optional
        Pixels sampled (see :func:`~hrdv2_dask.analysis.sample_pixels`); must be >= ``k``.
    seed : int, optional
        Seed of the sample and of k-means.
    max_chunks : int or None, optional
        Most ``(y, x)`` chunks read for the sample.

    Returns
    -------
    KMeansModel

    Raises
    ------
    ConfigError
        An option out of range (the message is that of :class:`KMeansOptions`).
    InputError
        Bad features, or fewer finite pixels than clusters.
    """
    options = KMeansOptions(k=k, samples=n_samples, seed=seed)
    return _fit_kmeans(features, options, max_chunks=max_chunks)


def _fit_kmeans(
    features: xr.DataArray, options: KMeansOptions, *, max_chunks: int | None = 64
) -> KMeansModel:
    features, data = feature_data(features)
    k, seed = options.k, options.seed
    try:
        from sklearn.cluster import MiniBatchKMeans
    except ImportError as err:
        raise sklearn_missing(err) from err
    x, _, _ = draw_pixels(
        data, n=options.samples, seed=seed, max_chunks=check_max_chunks(max_chunks)
    )
    if len(x) < k:
        raise InputError(
            f"Only {len(x)} finite pixels could be sampled, fewer than k={k} clusters; use a "
            "smaller k or check the store for NaN."
        )
    km = MiniBatchKMeans(
        n_clusters=k, init="k-means++", n_init=3, random_state=seed, batch_size=4096
    ).fit(x)
    centres = km.cluster_centers_.astype(np.float32)
    sizes = np.bincount(_nearest(x, centres), minlength=k)
    centres = centres[np.argsort(-sizes, kind="stable")]
    inertia = float(((x - centres[_nearest(x, centres)]) ** 2).sum(axis=1).mean())
    log.info("k-means: k=%d on %d pixels, inertia %.4g", k, len(x), inertia)
    return KMeansModel(centres=centres, inertia=inertia, n_samples=len(x))


@register("cluster", KMeansOptions, help="k-means labels of a feature store", function=fit_kmeans)
def run_cluster(options: KMeansOptions, features: xr.DataArray, out: Path) -> dict:
    """Write ``clusters.zarr`` and ``clusters.png`` under ``out``; return their paths."""
    out = Path(out)
    model = _fit_kmeans(features, options)
    labels = model.predict(features)
    outputs.write_labels(
        labels,
        out / "clusters.zarr",
        attrs={**run_attrs(options), **model.to_dict()},
        overwrite=True,
    )
    outputs.write_png(labels, out / "clusters.png", palette=outputs.PALETTE)
    return {"cluster": [str(out / "clusters.zarr"), str(out / "clusters.png")]}
