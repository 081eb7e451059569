"""Saved models: fit once (``--save-model``), apply to any store or collection with the same
feature settings (``hrdv2 apply``, :func:`load_model`).

A model saved by ``pca``, ``cluster`` or ``segment`` records the feature settings it was fitted
on (model, layer/facet, stride, transforms, out_stride...; see
:data:`~hrdv2_dask.analysis.collection.RECORD`). Applying it to features made with another
setting in :data:`~hrdv2_dask.analysis.collection.MATCH` is refused in one line naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import xarray as xr

from ..config import option
from ..errors import ConfigError, InputError
from ._saved import read_fields
from .collection import MemberOptions, is_tree
from .kmeans import KMeansModel, write_clusters
from .pca import PCAModel, write_pca
from .segment import Segmenter, write_segmentation

__all__ = ["MODELS", "ApplyOptions", "Model", "apply_model", "load_model"]

Model = PCAModel | KMeansModel | Segmenter

#: ``kind`` in ``model.json`` -> the model class.
MODELS: dict[str, type] = {"pca": PCAModel, "kmeans": KMeansModel, "segmenter": Segmenter}


@dataclass(frozen=True)
class ApplyOptions(MemberOptions):
    """The options of ``hrdv2 apply MODEL STORE OUT`` and :func:`apply_model`."""

    SECTION: ClassVar[str] = "apply"

    proba: bool = option(False, "segmenters: also write per-class probabilities")


def load_model(path: str | os.PathLike) -> Model:
    """Load a model saved with ``--save-model`` / ``model.save(path)``.

    Parameters
    ----------
    path : str or os.PathLike
        The model folder.

    Returns
    -------
    PCAModel, KMeansModel or Segmenter
        Call ``.apply(features_or_tree)`` on it: the projection, labels or predictions of a
        store (DataArray) or of each member of a collection (DataTree), lazily.

    Raises
    ------
    InputError
        Not a saved model, or an estimator holding types that are not trusted (nothing in the
        folder is run: no pickle).
    """
    kind, fields, estimator = read_fields(path)
    cls = MODELS.get(kind)
    if cls is None:
        raise InputError(
            f"{str(path)!r} holds a model of unknown kind {kind!r}; known kinds: {sorted(MODELS)}."
        )
    if (estimator is not None) != (cls is Segmenter):
        raise InputError(
            f"{str(path)!r}: a {kind} model with{'' if estimator else 'out'} an estimator."
        )
    try:
        return cls(**fields, **({"estimator": estimator} if estimator is not None else {}))
    except (TypeError, ConfigError) as err:
        raise InputError(f"{str(path)!r} is not a valid {kind} model: {err}") from None


def apply_model(
    model: Model | str | os.PathLike,
    features: xr.DataArray | xr.DataTree,
    out: str | os.PathLike,
    *,
    images: tuple[str, ...] | None = ApplyOptions.images,
    proba: bool = ApplyOptions.proba,
) -> dict:
    """Write a fitted model's outputs for a store, or for each member of a collection.

    The files are those the fitting command writes (``pca.*``, ``clusters.*``,
    ``segmentation.*``), under ``out`` or ``out/<key>/``, with a contact sheet and
    ``summary.json`` for a collection.

    Raises
    ------
    InputError
        Features made with other settings than the model's (the message names the first
        setting that differs), or an unknown member key.
    """
    options = ApplyOptions(images=images, proba=proba)
    if isinstance(model, str | os.PathLike):
        source = str(model)
        model = load_model(model)
    else:
        source = None
    attrs = {"analysis": "apply", "model_path": source}
    extra = {"model": source, "kind": type(model).__name__}
    if not is_tree(features) and options.images:
        raise InputError("images selects members of a collection, but the features are one store.")
    if isinstance(model, Segmenter):
        return write_segmentation(
            model,
            features,
            out,
            attrs=attrs,
            proba=options.proba,
            images=options.images,
            extra=extra,
        )
    if options.proba:
        raise InputError(
            f"proba is for segmenters; {source or 'this model'} is a {type(model).__name__}."
        )
    writer = write_pca if isinstance(model, PCAModel) else write_clusters
    return writer(model, features, Path(out), attrs=attrs, images=options.images, extra=extra)
