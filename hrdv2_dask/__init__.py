"""hrdv2-dask: dense, pixel-level DINOv2 features for images of any size.

The core works on batches of images in memory::

    import hrdv2_dask as hd
    backbone = hd.load_backbone("dinov2_vits14")
    feats = hd.highres_features(hd.normalize(image), backbone, hd.shifts((1, 2)))
"""

from ._version import __version__
from .backbones import Backbone, MeanPool, RandomWeightsWarning, load_backbone
from .cluster import ClusterError, MissingExtraError
from .ensemble import highres_features, output_shape, position_bias
from .errors import (
    ConfigError,
    Hrdv2Error,
    IncompleteStoreError,
    InputError,
    SourceNotFoundError,
    StoreError,
    WeightsFormatError,
    WeightsNotFoundError,
)
from .extract import extract
from .heads import LinearHead
from .io import ImageMeta, open_features, open_image
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

__all__ = [
    "Backbone",
    "ClusterError",
    "Compose",
    "ConfigError",
    "Flip",
    "Hrdv2Error",
    "IncompleteStoreError",
    "InputError",
    "LinearHead",
    "MeanPool",
    "MissingExtraError",
    "RandomWeightsWarning",
    "Rotate",
    "Shift",
    "SourceNotFoundError",
    "StoreError",
    "TransformSet",
    "WeightsFormatError",
    "WeightsNotFoundError",
    "__version__",
    "ImageMeta",
    "combine",
    "extract",
    "flips",
    "highres_features",
    "load_backbone",
    "normalize",
    "open_features",
    "open_image",
    "output_shape",
    "position_bias",
    "rotations",
    "shifts",
]
