"""Open images of any size as lazy ``(y, x, c)`` dask arrays with their metadata.

:func:`open_image` is the single entry point. It accepts a path to a Zarr v2/v3 array or group
(plain or OME-Zarr 0.4/0.5), a TIFF, OME-TIFF or Aperio SVS file, a PNG or JPEG file, a ``.npy``
file, a numpy array or a dask array, and returns an :class:`OpenedImage` ``(data, meta)`` pair:

* ``data`` is a lazy dask array with dims ``(y, x, c)``, ``c >= 1`` and the source's dtype.
  File-backed sources (Zarr, TIFF, ``.npy``) are read chunk by chunk when computed, never at open
  time. Their graphs hold only a small recipe (path, array path, series, level) that reopens the
  file once per process, so they pickle and compute on distributed workers.
* ``meta`` is an :class:`ImageMeta` describing the source: format, source axes, shape, dtype,
  pixel size and unit where the file records them, pyramid level.

Channels are never converted here (grayscale stays ``c=1``, RGBA stays ``c=4``).

Each format has its own module with a :class:`Reader` that says what it can open
(:mod:`.arrays`, :mod:`.zarr_store`, :mod:`.tiff`, :mod:`.pillow`, :mod:`.npy`);
:data:`READERS` in :mod:`.registry` lists them in the order :func:`open_image` asks them.
"""

from ._base import (
    DEFAULT_CHUNK_PX,
    FORMATS,
    MAX_CHUNK_PX,
    MIN_CHUNK_PX,
    ImageMeta,
    OpenedImage,
    Reader,
)
from .registry import (
    READERS,
    REPAIR,
    checked_image,
    find_reader,
    open_image,
    read_region,
    read_thumbnail,
)

__all__ = [
    "DEFAULT_CHUNK_PX",
    "FORMATS",
    "MAX_CHUNK_PX",
    "MIN_CHUNK_PX",
    "READERS",
    "ImageMeta",
    "OpenedImage",
    "Reader",
    "find_reader",
    "open_image",
    "read_thumbnail",
    "read_region",
    "checked_image",
    "REPAIR",
]
