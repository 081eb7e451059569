"""k-means clustering of a feature store: fit on a sample, label every pixel lazily."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import xarray as xr

from ..config import option
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

__all__ = ["MAX_CLUSTERS", "KMeansModel", "KMeansOptions", "fit_kmeans", "run_cluster"]

log = logging.getLogger(__name__)

#: Most clusters: labels ``0 .. k-1`` must fit the largest label dtype (uint16).
MAX_CLUSTERS = MAX_LABEL + 1


@dataclass(frozen=True)
class KMeansOptions(AcrossMembers):
    """The options of :func:`fit_kmeans`, of the ``cluster`` workflow step and of
    ``hrdv2 cluster``."""

    SECTION: ClassVar[str] = "cluster"

    k: int = option(6, "number of clusters", minimum=2, maximum=MAX_CLUSTERS, cli="-k")
    samples: int = option(100_000, "pixels sampled for the fit", minimum=2, api="n_samples")
    seed: int = option(0, "seed of the sample and of k-means", minimum=0)
    save_model: str | None = option(
        None, "also save the fitted model to this folder (hrdv2 apply uses it)", metavar="PATH"
    )

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
    settings : dict, optional
        The feature settings it was fitted on; :meth:`apply` refuses features made with other
        ones.
    """

    centres: np.ndarray
    inertia: float = float("nan")
    n_samples: int = 0
    settings: dict | None = None

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
        if self.settings is not None:
            object.__setattr__(self, "settings", dict(self.settings))

    @property
    def k(self) -> int:
        return int(self.centres.shape[0])

    def predict(self, features: xr.DataArray | xr.DataTree) -> xr.DataArray | xr.DataTree:
        """Label of the nearest centre for every pixel, lazily (numpy, one task per chunk).

        Returns
        -------
        xarray.DataArray or xarray.DataTree
            ``(y, x)`` uint8 labels ``0 .. k-1`` (uint16 when ``k > 256``). Pixels with NaN
            features get label 0. For a collection a DataTree of them, one per member, with
            the same labels for the same centres in every member.
        """
        if is_tree(features):
            return map_members(features, self.predict)
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

    def apply(self, features: xr.DataArray | xr.DataTree) -> xr.DataArray | xr.DataTree:
        """:meth:`predict`, after checking that the features have the model's settings."""
        check_settings(self.settings, features, "This k-means model")
        return self.predict(features)

    def save(self, path: str | os.PathLike) -> Path:
        """Save to the folder ``path`` (JSON + npz); :func:`~hrdv2_dask.load_model` reads it."""
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return save_fields(path, "kmeans", fields)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; :meth:`from_dict` inverts it."""
        out = {
            "kind": "kmeans",
            "centres": self.centres.tolist(),
            "inertia": self.inertia,
            "n_samples": self.n_samples,
        }
        if self.settings is not None:
            out["settings"] = self.settings
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KMeansModel:
        """Rebuild a model from :meth:`to_dict` output."""
        return cls(**model_fields(cls, data, "kmeans"))


def fit_kmeans(
    features: xr.DataArray | xr.DataTree,
    *,
    k: int = KMeansOptions.k,
    n_samples: int = KMeansOptions.samples,
    seed: int = KMeansOptions.seed,
    sample: str = KMeansOptions.sample,
    images: tuple[str, ...] | None = KMeansOptions.images,
    max_chunks: int | None = 64,
) -> KMeansModel:
    """Cluster a random sample of pixels with mini-batch k-means.

    On a collection the sample is drawn across the members (``sample``), so that one set of
    centres labels them all: a label means the same in every image (co-segmentation).

    Uses scikit-learn's ``MiniBatchKMeans(init="k-means++", n_init=3, random_state=seed)``;
    the same seed gives the same centres and labels.

    Parameters
    ----------
    features : xarray.DataArray or xarray.DataTree
        ``(feature, y, x)``, dask-backed; or a collection.
    k : int, optional
        Number of clusters, 2 to :data:`MAX_CLUSTERS` (65536).
    n_samples : int, optional
        Pixels sampled (see :func:`~hrdv2_dask.analysis.sample_pixels`); must be >= ``k``.
    seed : int, optional
        Seed of the sample and of k-means.
    sample : {"balanced", "proportional"}, optional
        On a collection: as many pixels from each member, or in proportion to their pixels.
    images : tuple of str, optional
        On a collection: the member keys to fit on (default all).
    max_chunks : int or None, optional
        Most ``(y, x)`` chunks read for the sample (per member).

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
    options = KMeansOptions(k=k, samples=n_samples, seed=seed, sample=sample, images=images)
    return _fit_kmeans(features, options, max_chunks=max_chunks)


def _fit_kmeans(
    features: xr.DataArray | xr.DataTree, options: KMeansOptions, *, max_chunks: int | None = 64
) -> KMeansModel:
    mems = members(features, options.images)
    datas = member_arrays(mems)
    k, seed = options.k, options.seed
    try:
        from sklearn.cluster import MiniBatchKMeans
    except ImportError as err:
        raise sklearn_missing(err) from err
    x, _, _, _ = draw_members(
        datas,
        n=options.samples,
        seed=seed,
        sample=options.sample,
        max_chunks=check_max_chunks(max_chunks),
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
    return KMeansModel(
        centres=centres,
        inertia=inertia,
        n_samples=len(x),
        settings=feature_settings(mems[0][1]),
    )


def write_clusters(
    model: KMeansModel,
    features: xr.DataArray | xr.DataTree,
    out: str | os.PathLike,
    *,
    attrs: dict[str, Any] | None = None,
    images: tuple[str, ...] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Write ``clusters.zarr`` and ``clusters.png`` under ``out`` (``out/<key>/`` per member
    of a collection) and return their paths."""
    check_settings(model.settings, features, "This k-means model")
    attrs = {**(attrs or {}), **model.to_dict()}

    def write_one(arr: xr.DataArray, folder: Path) -> dict:
        labels = model.predict(arr)
        outputs.write_labels(labels, folder / "clusters.zarr", attrs=attrs, overwrite=True)
        outputs.write_png(labels, folder / "clusters.png", palette=outputs.PALETTE)
        return {"cluster": [str(folder / "clusters.zarr"), str(folder / "clusters.png")]}

    figures = {"k": model.k, "inertia": round(model.inertia, 6), **(extra or {})}
    if not is_tree(features):
        figures = dict(extra or {})  # one store: the files, as before
    return write_members(
        features, out, write_one, images=images, picture="clusters.png", figures=figures
    )


@register(
    "cluster",
    KMeansOptions,
    help="k-means labels of a feature store or (co-segmentation) a collection",
    function=fit_kmeans,
)
def run_cluster(options: KMeansOptions, features: xr.DataArray | xr.DataTree, out: Path) -> dict:
    """Fit, then write ``clusters.zarr`` and ``clusters.png`` under ``out`` (per member for a
    collection); return their paths."""
    model = _fit_kmeans(features, options)
    extra = saved(model, options.save_model)
    return write_clusters(
        model, features, out, attrs=run_attrs(options), images=options.images, extra=extra
    )
