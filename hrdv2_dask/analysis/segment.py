"""Scribble segmentation: a pixel classifier trained on sparse labels, applied lazily."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import dask.array as da
import numpy as np
import xarray as xr

from .._checks import as_int
from ..config import option
from ..errors import ConfigError, InputError
from ..io import outputs
from ..io.readers import checked_image, open_image
from ._common import (
    MAX_LABEL,
    check_n_features,
    feature_data,
    label_dtype,
    run_attrs,
    sklearn_missing,
    wrap,
)
from ._saved import save_fields, saved
from .collection import (
    KEYS,
    AcrossMembers,
    all_keys,
    check_keys,
    check_settings,
    draw_members,
    feature_settings,
    is_tree,
    map_members,
    member_data,
    members,
    write_members,
)
from .registry import register
from .sampling import count_chunk_pixels, draw_pixels

__all__ = ["SegmentOptions", "Segmenter", "fit_segmenter", "run_segment"]

log = logging.getLogger(__name__)

_SEGMENTER_METHODS = ("random_forest", "logistic")
_LABEL_REDUCERS = ("mode", "nearest")
_LABELS_FIX = "The labels file is damaged there: save the labels again, then rerun the same command"


def _is_label_array(value: Any) -> bool:
    """Python-only labels (an array, not a path), checked by :func:`fit_segmenter`."""
    return value is not None and not isinstance(value, str)


def _fraction(value: float) -> str | None:
    return None if 0 <= value < 1 else "a fraction in [0, 1)"


@dataclass(frozen=True)
class SegmentOptions(AcrossMembers):
    """The options of :func:`fit_segmenter`, of the ``segment`` workflow step and of
    ``hrdv2 segment`` (``labels`` is a path there, an array or a mapping in Python)."""

    SECTION: ClassVar[str] = "segment"

    labels: str | None = option(
        None,
        "label image (PNG/TIFF/Zarr), 0 = unlabelled; for a collection a label stack (one "
        "plane per member, in key order) or a folder of label images named by key (in Python "
        "also a (y, x) array, or a {key: array} mapping)",
        positional=True,
        python_value=_is_label_array,
    )
    method: str = option("random_forest", "pixel classifier", choices=_SEGMENTER_METHODS)
    holdout: float = option(
        0.2,
        "one store: share of the labelled pixels kept out of training to measure accuracy (a "
        "collection is scored on its --test members instead)",
        check=_fraction,
        fix="E.g. 0.2 keeps a fifth of them for the holdout accuracy; 0 keeps none.",
    )
    seed: int = option(0, "seed of the pixel draw, the holdout split and the forest", minimum=0)
    proba: bool = option(False, "also write per-class probabilities")
    train: tuple[str, ...] | None = option(
        None,
        "on a collection: the members trained on (default: every member with labels but the "
        "--test ones)",
        metavar=KEYS,
        fix="Give member keys, e.g. [z000, z001] (on the command line --train z000,z001).",
    )
    test: tuple[str, ...] | None = option(
        None,
        "on a collection: members held out of training and scored on their labelled pixels",
        metavar=KEYS,
        fix="Give member keys, e.g. [z004] (on the command line --test z004).",
    )
    save_model: str | None = option(
        None, "also save the trained model to this folder (hrdv2 apply uses it)", metavar="PATH"
    )

    def _check_together(self) -> None:
        if self.labels is None:
            raise ConfigError(
                "segment needs labels: PATH (a sparse label image: 0 = unlabelled, 1, 2, ... "
                "= classes)."
            )
        both = set(self.train or ()) & set(self.test or ())
        if both:
            raise ConfigError(
                f"segment.train and segment.test share members {sorted(both)}; a test member "
                "must be held out of training."
            )


# ---------------------------------------------------------------------------------------------
# Labels on the feature grid
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


def _label_array(labels: Any) -> Any:
    """``labels`` as a 2-D integer array (numpy or dask), or an InputError with the fix."""
    if isinstance(labels, xr.DataArray):
        labels = labels.transpose("y", "x").data if set(labels.dims) == {"y", "x"} else labels.data
    if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
        labels = np.asarray(labels)
    shape = tuple(int(s) for s in labels.shape)
    if len(shape) != 2:
        raise InputError(
            f"labels must be a 2-D (y, x) integer array, got shape {shape}; pass one label "
            "plane (0 = unlabelled, 1, 2, ... = classes)."
        )
    dtype = np.dtype(labels.dtype)
    if dtype == np.bool_:
        return labels.astype(np.uint8)
    if not np.issubdtype(dtype, np.integer):
        raise InputError(
            f"labels must be integers (0 = unlabelled), got dtype {dtype}; convert them with "
            ".astype(int) after rounding."
        )
    return labels


def _labels_on_grid(labels: Any, data: da.Array, stride: int, how: str) -> da.Array:
    """``labels`` as a dask ``(Y, X)`` array on the feature grid, chunked like ``data``."""
    labels = _label_array(labels)
    grid = tuple(data.shape[1:])
    shape = tuple(int(s) for s in labels.shape)
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


# ---------------------------------------------------------------------------------------------
# The segmenter
# ---------------------------------------------------------------------------------------------


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
    settings : dict, optional
        The feature settings it was trained on; :meth:`apply` refuses features made with
        other ones.
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
    settings: dict | None = None

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
        if self.settings is not None:
            object.__setattr__(self, "settings", dict(self.settings))

    def predict(
        self, features: xr.DataArray | xr.DataTree, *, proba: bool = False
    ) -> xr.DataArray | xr.DataTree:
        """Classify every pixel, lazily (one task per chunk).

        Parameters
        ----------
        features : xarray.DataArray or xarray.DataTree
            ``(feature, y, x)`` with the same features as training, or a collection (a
            DataTree of results, one per member, comes back).
        proba : bool, optional
            Return class probabilities instead of labels.

        Returns
        -------
        xarray.DataArray
            ``(y, x)`` labels (the label values of :attr:`classes`; 0 where a feature is NaN),
            uint8 (uint16 for labels > 255); or with ``proba=True`` ``(class, y, x)`` float16
            probabilities (0 where a feature is NaN).
        """
        if is_tree(features):
            return map_members(features, lambda arr: self.predict(arr, proba=proba))
        features, data = feature_data(features)
        check_n_features("This segmenter", self.n_features, features)
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
            return wrap(
                out,
                ("class", "y", "x"),
                features,
                name="probability",
                attrs={"method": self.method},
                extra_coords={"class": list(self.classes)},
            )
        dtype = label_dtype(max(self.classes))
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
        return wrap(
            out,
            ("y", "x"),
            features,
            name="segmentation",
            attrs={"method": self.method, "classes": list(self.classes)},
        )

    def apply(
        self, features: xr.DataArray | xr.DataTree, *, proba: bool = False
    ) -> xr.DataArray | xr.DataTree:
        """:meth:`predict`, after checking that the features have the model's settings."""
        check_settings(self.settings, features, "This segmenter")
        return self.predict(features, proba=proba)

    def save(self, path: str | os.PathLike) -> Path:
        """Save to the folder ``path`` (JSON, and the estimator with skops: no pickle);
        :func:`~hrdv2_dask.load_model` reads it."""
        fields = {
            "classes": list(self.classes),
            "method": self.method,
            "n_features": self.n_features,
            "settings": self.settings,
        }
        return save_fields(path, "segmenter", fields, estimator=self.estimator)

    def to_dict(self) -> dict[str, Any]:
        """What the model is, without the estimator (for attrs and summaries)."""
        return {
            "kind": "segmenter",
            "classes": list(self.classes),
            "method": self.method,
            "n_features": self.n_features,
            **({"settings": self.settings} if self.settings is not None else {}),
        }


def _make_estimator(method: str, seed: int) -> Any:
    """The scikit-learn classifier for ``method`` (one table, strings parsed only here)."""
    try:
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as err:
        raise sklearn_missing(err) from err
    factories = {
        "random_forest": lambda: RandomForestClassifier(
            n_estimators=100, n_jobs=-1, random_state=seed
        ),
        "logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
    }
    return factories[method]()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def fit_segmenter(
    features: xr.DataArray | xr.DataTree,
    labels: Any,
    *,
    method: str = SegmentOptions.method,
    holdout: float = SegmentOptions.holdout,
    seed: int = SegmentOptions.seed,
    sample: str = SegmentOptions.sample,
    images: tuple[str, ...] | None = SegmentOptions.images,
    train: tuple[str, ...] | None = SegmentOptions.train,
    test: tuple[str, ...] | None = SegmentOptions.test,
    max_samples: int = 200_000,
    label_reduce: str = "mode",
) -> tuple[Segmenter, dict[str, Any]]:
    """Train a pixel classifier on scribbles (sparse labels), on one store or a collection.

    On a collection the classifier is trained once, on labelled pixels drawn across the
    ``train`` members (``sample``), and scored on the labelled pixels of the ``test`` members,
    which it never saw: the honest measure of how it does on the images it is applied to.

    Parameters
    ----------
    features : xarray.DataArray or xarray.DataTree
        ``(feature, y, x)`` features, or a collection from :func:`~hrdv2_dask.open_collection`.
    labels : array_like of int, mapping or path
        ``(y, x)`` labels (numpy, dask or DataArray): 0 (or negative) = unlabelled, 1, 2, ... =
        classes. Either at the feature grid resolution, or at image resolution ``(H, W)`` with
        ``ceil(H / out_stride), ceil(W / out_stride)`` equal to the grid
        (``out_stride = features.attrs.get("out_stride", 1)``). For a collection: a mapping
        ``key -> labels`` (members without an entry are unlabelled), an ``(n, y, x)`` stack
        with one plane per member of the collection's table (key order), or a path to such a
        stack or to a folder of label images named by key (``z003.png``).
    method : {"random_forest", "logistic"}, optional
        Random forest (100 trees) or standardised logistic regression.
    holdout : float, optional
        One store: share of the labelled pixels kept out of training to measure accuracy, in
        ``[0, 1)``. They are drawn at random, so neighbours of training pixels: expect the
        holdout accuracy to be optimistic for thin scribbles. Not used on a collection.
    seed : int, optional
        Seed of the pixel draw, the holdout split and the forest.
    sample : {"balanced", "proportional"}, optional
        On a collection: as many labelled pixels from each training member, or in proportion
        to their labelled pixels.
    images : tuple of str, optional
        On a collection: the members considered (default all).
    train, test : tuple of str, optional
        On a collection: the members trained on (default: every member with labels that is not
        in ``test``) and the members held out and scored.
    max_samples : int, optional
        Most labelled pixels used for training (a uniform random subset when there are more),
        and most scored on the test members.
    label_reduce : {"mode", "nearest"}, optional
        How image-resolution labels become one label per output cell: the most frequent
        non-zero label of the cell (thin scribbles survive), or the label of the pixel at the
        cell centre (nearest neighbour).

    Returns
    -------
    segmenter : Segmenter
    report : dict
        ``train_accuracy``, ``holdout_accuracy`` (None without holdout pixels),
        ``n_labelled`` (labelled cells in the training grids), ``n_train``, ``n_holdout``,
        ``classes`` (label values) and ``method``. On a collection also ``train`` and ``test``
        (keys), ``test_accuracy``, ``iou`` (per class), ``mean_iou`` (over the classes in the
        test labels), ``n_test`` and ``test_accuracy_per_member`` (None values without test
        members).

    Raises
    ------
    InputError
        Labels of the wrong shape (both shapes named) or dtype, or fewer than two classes; on
        a collection an unknown key, a stack with another number of planes than members, a
        test member without labels.
    ConfigError
        Unknown ``method`` or ``label_reduce``, ``holdout`` outside ``[0, 1)`` (the messages
        of :class:`SegmentOptions` for its options).
    """
    options = SegmentOptions(
        labels=labels,
        method=method,
        holdout=holdout,
        seed=seed,
        sample=sample,
        images=images,
        train=train,
        test=test,
    )
    return _fit_segmenter(
        features, labels, options, max_samples=max_samples, label_reduce=label_reduce
    )


def _training_sample(
    data: da.Array, grid_labels: da.Array, *, seed: int, max_samples: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Features ``(m, C)`` and labels ``(m,)`` of labelled cells, and the number labelled."""
    labelled = grid_labels > 0
    counts = count_chunk_pixels(data, labelled)
    n_labelled = int(counts.sum())
    if n_labelled == 0:
        raise InputError(
            "labels have no labelled pixel (all 0); draw scribbles with values 1, 2, ... for "
            "at least two classes."
        )
    x, _, y = draw_pixels(
        data, n=max_samples, seed=seed, mask=labelled, values=grid_labels, counts=counts
    )
    classes = np.unique(y)
    if len(classes) < 2:
        raise InputError(
            f"labels hold only class {tuple(int(c) for c in classes)} on finite features; draw "
            "scribbles of at least two classes."
        )
    if classes[-1] > MAX_LABEL:
        raise InputError(f"label values must be <= {MAX_LABEL}, got {int(classes[-1])}.")
    return x, y.astype(np.int64), n_labelled


def _stride(features: xr.DataArray) -> int:
    return as_int(
        "features.attrs['out_stride']",
        features.attrs.get("out_stride", 1),
        1,
        "fix the store attributes",
    )


def _fit_segmenter(
    features: xr.DataArray | xr.DataTree,
    labels: Any,
    options: SegmentOptions,
    *,
    max_samples: int = 200_000,
    label_reduce: str = "mode",
) -> tuple[Segmenter, dict[str, Any]]:
    if label_reduce not in _LABEL_REDUCERS:
        raise ConfigError(f"label_reduce must be one of {_LABEL_REDUCERS}, got {label_reduce!r}.")
    max_samples = as_int("max_samples", max_samples, 2, "use e.g. max_samples=200_000")
    if is_tree(features):
        return _fit_collection(
            features, labels, options, max_samples=max_samples, label_reduce=label_reduce
        )
    for name in ("images", "train", "test"):
        if getattr(options, name):
            raise InputError(
                f"segment.{name}={list(getattr(options, name))} selects members of a "
                "collection, but the features are one store; drop it, or pass a collection."
            )
    method, seed = options.method, options.seed
    features, data = feature_data(features)
    stride = _stride(features)
    grid_labels = _labels_on_grid(labels, data, stride, label_reduce)
    x, y, n_labelled = _training_sample(data, grid_labels, seed=seed, max_samples=max_samples)
    order = np.random.default_rng([seed, 1]).permutation(len(x))
    n_hold = int(round(options.holdout * len(x)))
    hold, train = order[:n_hold], order[n_hold:]
    if len(np.unique(y[train])) < 2:
        raise InputError(
            "The training split holds a single class; label more pixels of each class or "
            "lower holdout."
        )
    estimator = _make_estimator(method, seed).fit(x[train], y[train])
    if method == "random_forest":
        estimator.set_params(n_jobs=1)  # one thread per dask task when predicting
    classes = tuple(int(c) for c in np.unique(y))
    report = {
        "train_accuracy": float((estimator.predict(x[train]) == y[train]).mean()),
        "holdout_accuracy": (
            float((estimator.predict(x[hold]) == y[hold]).mean()) if n_hold else None
        ),
        "n_labelled": n_labelled,
        "n_train": int(len(train)),
        "n_holdout": int(n_hold),
        "classes": list(classes),
        "method": method,
    }
    log.info("segmenter %s: %s", method, report)
    segmenter = Segmenter(
        estimator=estimator,
        classes=classes,
        method=method,
        n_features=int(data.shape[0]),
        settings=feature_settings(features),
    )
    return segmenter, report


# ---------------------------------------------------------------------------------------------
# Train once on a collection, score on held-out members
# ---------------------------------------------------------------------------------------------


def _label_files(folder: Path, keys: list[str]) -> dict[str, Path]:
    """``key -> label image`` in ``folder`` (files named by key, any image extension)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        key = path.name.split(".")[0]
        if key not in keys:
            raise InputError(
                f"Label file {str(path)!r} is named after no member of the collection; name "
                f"label images by member key ({keys[:4]}{'...' if len(keys) > 4 else ''})."
            )
        if key in found:
            raise InputError(
                f"Two label files for member {key!r} in {str(folder)!r}: {found[key].name} "
                f"and {path.name}; keep one."
            )
        found[key] = path
    if not found:
        raise InputError(f"The label folder {str(folder)!r} holds no label image.")
    return found


def _stack_planes(arr: Any, keys: list[str], what: str) -> dict[str, Any]:
    n = int(arr.shape[0])
    if n != len(keys):
        raise InputError(
            f"The label stack {what} has {n} planes but the collection has {len(keys)} members "
            f"({keys[0]} ... {keys[-1]}); give one plane per member, in key order, or a folder "
            "of label images named by key."
        )
    return {key: arr[i] for i, key in enumerate(keys)}


def _label_plane(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Channel 0 of a label image (``kwargs``: ``axes``, ``plane``), lazily; a damaged region
    raises one line naming the file and its rows when it is read."""
    data, _ = open_image(path, **kwargs)
    return checked_image(data, name=f"labels file {str(path)!r}", fix=_LABELS_FIX)[..., 0]


def collection_labels(tree: xr.DataTree, labels: Any) -> dict[str, Any]:
    """The label plane of each labelled member: ``key -> (y, x)`` array (lazy where possible).

    ``labels`` is a mapping, an ``(n, y, x)`` array (one plane per member of the table), or a
    path to a label stack (TIFF, .npy, Zarr; one plane per member) or to a folder of label
    images named by key.
    """
    keys = all_keys(tree)
    if isinstance(labels, Mapping):
        check_keys(tree, [str(k) for k in labels], "Labels for member")
        return {str(k): v for k, v in labels.items()}
    if isinstance(labels, str | os.PathLike):
        path = Path(labels)
        if path.is_dir() and not (path / "zarr.json").exists() and not (path / ".zarray").exists():
            files = _label_files(path, keys)
            check_keys(tree, list(files), "Label file for member")
            return {key: _label_plane(p) for key, p in files.items()}
        try:
            first = open_image(path, axes="ZYX", plane=0)
        except InputError:
            single, _ = open_image(path)
            return _stack_planes(single[..., 0][None], keys, repr(str(path)))
        planes = int(first.meta.planes or 1)
        if planes != len(keys):
            return _stack_planes(np.empty((planes, 0)), keys, repr(str(path)))
        return {key: _label_plane(path, axes="ZYX", plane=i) for i, key in enumerate(keys)}
    arr = labels.data if isinstance(labels, xr.DataArray) else labels
    if not hasattr(arr, "shape"):
        arr = np.asarray(arr)
    if len(arr.shape) != 3:
        raise InputError(
            f"Labels for a collection must be a mapping key -> (y, x) labels, an (n, y, x) "
            f"stack or a path; got shape {tuple(arr.shape)}."
        )
    return _stack_planes(arr, keys, f"of shape {tuple(arr.shape)}")


def _member_grids(
    tree: xr.DataTree, planes: Mapping[str, Any], keys: list[str], label_reduce: str
) -> dict[str, tuple[da.Array, da.Array, np.ndarray]]:
    """``key -> (features data, labels on its grid, labelled cells per chunk)``."""
    out = {}
    for key in keys:
        arr, data = feature_data(member_data(tree, key))
        try:
            grid = _labels_on_grid(planes[key], data, _stride(arr), label_reduce)
        except InputError as err:
            raise InputError(f"Member {key!r}: {err}") from None
        out[key] = (data, grid, count_chunk_pixels(data, grid > 0))
    return out


def _iou(pred: np.ndarray, truth: np.ndarray, classes: list[int]) -> dict[str, float | None]:
    """Intersection over union of each class on the scored pixels (None: class absent).

    >>> _iou(np.array([1, 1, 2]), np.array([1, 2, 2]), [1, 2])
    {'1': 0.5, '2': 0.5}
    """
    out: dict[str, float | None] = {}
    for c in classes:
        union = np.count_nonzero((pred == c) | (truth == c))
        out[str(c)] = float(np.count_nonzero((pred == c) & (truth == c)) / union) if union else None
    return out


def _fit_collection(
    tree: xr.DataTree,
    labels: Any,
    options: SegmentOptions,
    *,
    max_samples: int,
    label_reduce: str,
) -> tuple[Segmenter, dict[str, Any]]:
    considered = [k for k, _ in members(tree, options.images)]
    planes = collection_labels(tree, labels)
    test = list(options.test or ())
    check_keys(tree, test, "Test member")
    for key in test:
        if key not in planes:
            raise InputError(
                f"Test member {key!r} has no labels; give labels for it or leave it out of --test."
            )
    if options.train:
        check_keys(tree, options.train, "Training member")
        candidates = list(options.train)
        for key in candidates:
            if key not in planes:
                raise InputError(f"Training member {key!r} has no labels; give labels for it.")
    else:
        candidates = [k for k in considered if k in planes and k not in test]
    grids = _member_grids(tree, planes, [*dict.fromkeys(candidates + test)], label_reduce)
    train = [k for k in candidates if grids[k][2].sum() > 0]
    if options.train and len(train) < len(candidates):
        empty = sorted(set(candidates) - set(train))
        raise InputError(
            f"Training members {empty} have no labelled pixel (all 0); draw scribbles on "
            "them or leave them out of --train."
        )
    if not train:
        raise InputError(
            "No training member has a labelled pixel; draw scribbles (1, 2, ... = classes) on "
            "at least one member that is not a --test member."
        )
    for key in test:
        if grids[key][2].sum() == 0:
            raise InputError(f"Test member {key!r} has no labelled pixel (all 0) to score.")
    seed = options.seed

    def draw(keys: list[str], sample: str, draw_seed: Any) -> tuple[np.ndarray, ...]:
        parts = [grids[k] for k in keys]
        return draw_members(
            [p[0] for p in parts],
            n=max_samples,
            seed=draw_seed,
            sample=sample,
            masks=[p[1] > 0 for p in parts],
            values=[p[1] for p in parts],
            max_chunks=None,
            counts=[p[2] for p in parts],
        )

    x, _, _, y = draw(train, options.sample, seed)
    y = y.astype(np.int64)
    classes = [int(c) for c in np.unique(y)]
    if len(classes) < 2:
        raise InputError(
            f"The training members' labels hold only class {tuple(classes)}; draw scribbles of "
            "at least two classes."
        )
    if classes[-1] > MAX_LABEL:
        raise InputError(f"label values must be <= {MAX_LABEL}, got {classes[-1]}.")
    estimator = _make_estimator(options.method, seed).fit(x, y)
    if options.method == "random_forest":
        estimator.set_params(n_jobs=1)  # one thread per dask task when predicting
    report: dict[str, Any] = {
        "train": train,
        "test": test,
        "train_accuracy": float((estimator.predict(x) == y).mean()),
        "test_accuracy": None,
        "iou": None,
        "mean_iou": None,
        "test_accuracy_per_member": None,
        "holdout_accuracy": None,
        "n_labelled": int(sum(grids[k][2].sum() for k in train)),
        "n_train": int(len(x)),
        "n_holdout": 0,
        "n_test": 0,
        "classes": classes,
        "method": options.method,
    }
    if test:
        xt, _, member, yt = draw(test, "proportional", [seed, 2])
        yt = yt.astype(np.int64)
        pred = estimator.predict(xt)
        scored = sorted({*classes, *np.unique(yt).tolist()})
        iou = _iou(pred, yt, scored)
        present = [iou[str(c)] for c in np.unique(yt).tolist()]
        report.update(
            test_accuracy=float((pred == yt).mean()),
            iou=iou,
            mean_iou=float(np.mean([v or 0.0 for v in present])),
            test_accuracy_per_member={
                k: float((pred[member == i] == yt[member == i]).mean()) for i, k in enumerate(test)
            },
            n_test=int(len(xt)),
        )
    log.info("segmenter %s on %d members: %s", options.method, len(train), report)
    segmenter = Segmenter(
        estimator=estimator,
        classes=tuple(classes),
        method=options.method,
        n_features=int(x.shape[1]),
        settings=feature_settings(member_data(tree, train[0])),
    )
    return segmenter, report


def write_segmentation(
    segmenter: Segmenter,
    features: xr.DataArray | xr.DataTree,
    out: str | os.PathLike,
    *,
    attrs: dict[str, Any] | None = None,
    proba: bool = False,
    images: tuple[str, ...] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Write ``segmentation.zarr``, ``segmentation.png`` (and ``probabilities.zarr`` with
    ``proba``) under ``out`` (``out/<key>/`` per member of a collection)."""
    check_settings(segmenter.settings, features, "This segmenter")
    attrs = {**(attrs or {}), **segmenter.to_dict()}

    def write_one(arr: xr.DataArray, folder: Path) -> dict:
        pred = segmenter.predict(arr)
        outputs.write_labels(pred, folder / "segmentation.zarr", attrs=attrs, overwrite=True)
        outputs.write_png(pred, folder / "segmentation.png", palette=outputs.PALETTE)
        written = [folder / "segmentation.zarr", folder / "segmentation.png"]
        if proba:
            outputs.write_array(
                segmenter.predict(arr, proba=True),
                folder / "probabilities.zarr",
                attrs=attrs,
                overwrite=True,
            )
            written.append(folder / "probabilities.zarr")
        return {"segment": [str(p) for p in written]}

    return write_members(
        features, out, write_one, images=images, picture="segmentation.png", figures=extra
    )


@register(
    "segment",
    SegmentOptions,
    help="segmentation from sparse scribble labels (one store, or train once on a collection)",
    function=fit_segmenter,
)
def run_segment(options: SegmentOptions, features: xr.DataArray | xr.DataTree, out: Path) -> dict:
    """Train on ``options.labels`` and write ``segmentation.zarr``, ``segmentation.png`` (and
    ``probabilities.zarr`` with ``proba``) under ``out``, per member for a collection (every
    member, or ``images``); return their paths and the training report."""
    attrs = run_attrs(options)
    if is_tree(features):
        labels: Any = options.labels
    else:
        labels = _label_plane(options.labels)
    seg, report = _fit_segmenter(features, labels, options)
    extra = {**report, **saved(seg, options.save_model)}
    return write_segmentation(
        seg,
        features,
        out,
        attrs={**attrs, **report},
        proba=options.proba,
        images=options.images,
        extra=extra,
    )
