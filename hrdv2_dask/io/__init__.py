"""Input and output: open source images lazily as ``(y, x, c)`` dask arrays.

Only this subpackage opens files. :func:`open_image` reads Zarr (plain and OME-Zarr), TIFF,
OME-TIFF, SVS, PNG, JPEG and ``.npy`` files as well as numpy and dask arrays.
"""

from .readers import ImageMeta, OpenedImage, open_image, read_thumbnail
from .store import open_features

__all__ = ["ImageMeta", "OpenedImage", "open_features", "open_image", "read_thumbnail"]
