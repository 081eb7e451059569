"""Analysis of feature stores: PCA colour maps, k-means, similarity maps, scribble segmentation.

Every function takes a ``(feature, y, x)`` :class:`xarray.DataArray` such as the one returned by
:func:`hrdv2_dask.io.store.open_features`, or a collection (the :class:`xarray.DataTree` of
:func:`hrdv2_dask.open_collection`: one sample across its members, one model applied to each,
see :mod:`.collection`), and works chunk by chunk:

* **fitting** (:func:`fit_pca`, :func:`fit_kmeans`, :func:`fit_segmenter`) reads a bounded,
  seeded random sample of pixels (:func:`sample_pixels`), never the whole store;
* **applying** (``project``, :func:`pca_rgb`, ``predict``, :func:`similarity`) builds a lazy dask
  graph with one task per ``(y, x)`` chunk and computes nothing; write the result with
  :mod:`hrdv2_dask.io.outputs` or call ``.compute()`` on a crop.

The ``(y, x)`` coordinates of the input (and ``y_phys``/``x_phys`` when present) are kept on
every output. Chunk functions use numpy only, except :meth:`Segmenter.predict`, which calls the
fitted scikit-learn estimator. scikit-learn is needed only by :func:`fit_kmeans` and
:func:`fit_segmenter`.

Each analysis module defines its options once (:class:`PCAOptions`, :class:`KMeansOptions`,
:class:`SimilarityOptions`, :class:`SegmentOptions`: the YAML keys, command-line flags and
Python keywords with their limits) and registers a run function in :data:`ANALYSES`
(:mod:`.registry`). Adding an analysis is one module plus its import below. Fitted models are
saved with ``model.save(path)`` (or ``--save-model``) and read back by :func:`load_model`
(:mod:`.models`); ``model.apply(features_or_tree)`` refuses features made with other settings.

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
>>> sorted(ANALYSES)
['cluster', 'pca', 'segment', 'similarity']
"""

from .collection import AcrossMembers, MemberOptions, draw_members, open_store
from .kmeans import MAX_CLUSTERS, KMeansModel, KMeansOptions, fit_kmeans
from .models import ApplyOptions, apply_model, load_model
from .pca import PCAModel, PCAOptions, fit_pca, pca_basis, pca_rgb
from .registry import ANALYSES, Analysis, get_analysis, register
from .sampling import sample_pixels
from .segment import Segmenter, SegmentOptions, fit_segmenter
from .similarity import SimilarityOptions, similarity

__all__ = [
    "ANALYSES",
    "MAX_CLUSTERS",
    "AcrossMembers",
    "Analysis",
    "ApplyOptions",
    "KMeansModel",
    "KMeansOptions",
    "MemberOptions",
    "PCAModel",
    "PCAOptions",
    "SegmentOptions",
    "Segmenter",
    "SimilarityOptions",
    "apply_model",
    "draw_members",
    "fit_kmeans",
    "fit_pca",
    "fit_segmenter",
    "get_analysis",
    "load_model",
    "open_store",
    "pca_basis",
    "pca_rgb",
    "register",
    "sample_pixels",
    "similarity",
]
