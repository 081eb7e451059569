"""Scribble segmentation: a pixel classifier trained on sparse labels, applied lazily."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import dask.array as da
import numpy as np
import xarray as xr

from .._checks import as_int
from ..config import Settings, option
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
class SegmentOptions(Settings):
    """The options of :func:`fit_segmenter`, of the ``segment`` workflow step and of
    ``hrdv2 segment`` (``labels`` is a path there, an array in Python)."""

    SECTION: ClassVar[str] = "segment"

    labels: str | None = option(
        None,
        "label image (PNG/TIFF/Zarr), 0 = unlabelled (in Python also a (y, x) array)",
        positional=True,
        python_value=_is_label_array,
    )
    method: str = option("random_forest", "pixel classifier", choices=_SEGMENTER_METHODS)
    holdout: float = option(
        0.2,
        "share of the labelled pixels kept out of training to measure accuracy",
        check=_fraction,
        fix="E.g. 0.2 keeps a fifth of them for the holdout accuracy; 0 keeps none.",
    )
    seed: int = option(0, "seed of the pixel draw, the holdout split and the forest", minimum=0)
    proba: bool = option(False, "also write per-class probabilities")

    def _check_together(self) -> None:
        if self.labels is None:
            raise ConfigError(
                "segment needs labels: PATH (a sparse label image: 0 = unlabelled, 1, 2, ... "
                "= classes)."
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
    features: xr.DataArray,
    labels: Any,
    *,
    method: str = SegmentOptions.method,
    holdout: float = SegmentOptions.holdout,
    seed: int = SegmentOptions.seed,
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
        Unknown ``method`` or ``label_reduce``, ``holdout`` outside ``[0, 1)`` (the messages
        of :class:`SegmentOptions` for its options).
    """
    options = SegmentOptions(labels=labels, method=method, holdout=holdout, seed=seed)
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


def _fit_segmenter(
    features: xr.DataArray,
    labels: Any,
    options: SegmentOptions,
    *,
    max_samples: int = 200_000,
    label_reduce: str = "mode",
) -> tuple[Segmenter, dict[str, Any]]:
    if label_reduce not in _LABEL_REDUCERS:
        raise ConfigError(f"label_reduce must be one of {_LABEL_REDUCERS}, got {label_reduce!r}.")
    max_samples = as_int("max_samples", max_samples, 2, "use e.g. max_samples=200_000")
    method, seed = options.method, options.seed
    features, data = feature_data(features)
    stride = as_int(
        "features.attrs['out_stride']",
        features.attrs.get("out_stride", 1),
        1,
        "fix the store attributes",
    )
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
        estimator=estimator, classes=classes, method=method, n_features=int(data.shape[0])
    )
    return segmenter, report


@register(
    "segment",
    SegmentOptions,
    help="segmentation from sparse scribble labels",
    function=fit_segmenter,
)
def run_segment(options: SegmentOptions, features: xr.DataArray, out: Path) -> dict:
    """Train on the label image ``options.labels`` and write ``segmentation.zarr``,
    ``segmentation.png`` (and ``probabilities.zarr`` with ``proba``) under ``out``; return
    their paths and the training report."""
    out = Path(out)
    attrs = run_attrs(options)
    data, _ = open_image(options.labels)
    data = checked_image(data, name=f"labels file {options.labels!r}", fix=_LABELS_FIX)
    seg, report = _fit_segmenter(features, data[..., 0], options)
    pred = seg.predict(features)
    outputs.write_labels(pred, out / "segmentation.zarr", attrs={**attrs, **report}, overwrite=True)
    outputs.write_png(pred, out / "segmentation.png", palette=outputs.PALETTE)
    if options.proba:
        outputs.write_array(
            seg.predict(features, proba=True),
            out / "probabilities.zarr",
            attrs=attrs,
            overwrite=True,
        )
    return {
        "segment": [str(out / "segmentation.zarr"), str(out / "segmentation.png")],
        **report,
    }
