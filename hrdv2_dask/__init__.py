"""hrdv2-dask: dense, pixel-level DINOv2 features for images of any size.

The core works on batches of images in memory::

    import hrdv2_dask as hd
    backbone = hd.load_backbone("dinov2_vits14")
    feats = hd.highres_features(hd.normalize(image), backbone, hd.shifts((1, 2)))

Public names are imported on first use (PEP 562), so ``import hrdv2_dask`` and the in-memory
core never import dask, distributed, zarr or xarray; :func:`extract` and the stores do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> the module that defines it
_EXPORTS = {
    "Backbone": ".backbones",
    "MeanPool": ".backbones",
    "RandomWeightsWarning": ".backbones",
    "load_backbone": ".backbones",
    "highres_features": ".ensemble",
    "output_shape": ".ensemble",
    "position_bias": ".ensemble",
    "ClusterError": ".errors",
    "ConfigError": ".errors",
    "Hrdv2Error": ".errors",
    "IncompleteStoreError": ".errors",
    "InputError": ".errors",
    "MissingExtraError": ".errors",
    "SourceNotFoundError": ".errors",
    "StoreError": ".errors",
    "WeightsFormatError": ".errors",
    "WeightsNotFoundError": ".errors",
    "LinearHead": ".heads",
    "pca_basis": ".heads",
    "normalize": ".preprocess",
    "Compose": ".transforms",
    "Flip": ".transforms",
    "Rotate": ".transforms",
    "Shift": ".transforms",
    "TransformSet": ".transforms",
    "combine": ".transforms",
    "flips": ".transforms",
    "rotations": ".transforms",
    "shifts": ".transforms",
    "ClusterSettings": ".config",
    "CollectionSettings": ".config",
    "FeatureSettings": ".config",
    "SlurmSettings": ".config",
    "ImageMeta": ".io.readers",
    "open_image": ".io.readers",
    "open_features": ".io.store",
    "extract": ".pipeline.extraction",
    "extract_collection": ".pipeline.collection",
    "open_collection": ".io.collection",
    "KMeansModel": ".analysis",
    "PCAModel": ".analysis",
    "Segmenter": ".analysis",
    "apply_model": ".analysis",
    "load_model": ".analysis",
    "build_index": ".analysis.retrieval",
    "search": ".analysis.retrieval",
}

__all__ = [
    "Backbone",
    "ClusterError",
    "ClusterSettings",
    "CollectionSettings",
    "Compose",
    "ConfigError",
    "FeatureSettings",
    "Flip",
    "Hrdv2Error",
    "ImageMeta",
    "IncompleteStoreError",
    "InputError",
    "KMeansModel",
    "LinearHead",
    "MeanPool",
    "MissingExtraError",
    "PCAModel",
    "RandomWeightsWarning",
    "Rotate",
    "Segmenter",
    "Shift",
    "SlurmSettings",
    "SourceNotFoundError",
    "StoreError",
    "TransformSet",
    "WeightsFormatError",
    "WeightsNotFoundError",
    "__version__",
    "apply_model",
    "build_index",
    "combine",
    "extract",
    "extract_collection",
    "flips",
    "highres_features",
    "load_backbone",
    "load_model",
    "normalize",
    "open_collection",
    "open_features",
    "open_image",
    "output_shape",
    "pca_basis",
    "position_bias",
    "rotations",
    "search",
    "shifts",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from .analysis import KMeansModel, PCAModel, Segmenter, apply_model, load_model
    from .analysis.retrieval import build_index, search
    from .backbones import Backbone, MeanPool, RandomWeightsWarning, load_backbone
    from .config import ClusterSettings, CollectionSettings, FeatureSettings, SlurmSettings
    from .ensemble import highres_features, output_shape, position_bias
    from .errors import (
        ClusterError,
        ConfigError,
        Hrdv2Error,
        IncompleteStoreError,
        InputError,
        MissingExtraError,
        SourceNotFoundError,
        StoreError,
        WeightsFormatError,
        WeightsNotFoundError,
    )
    from .heads import LinearHead, pca_basis
    from .io.collection import open_collection
    from .io.readers import ImageMeta, open_image
    from .io.store import open_features
    from .pipeline.collection import extract_collection
    from .pipeline.extraction import extract
    from .preprocess import normalize
    from .transforms import (
        Compose,
        Flip,
        Rotate,
        Shift,
        TransformSet,
        combine,
        flips,
        rotations,
        shifts,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hrdv2_dask' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
