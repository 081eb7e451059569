"""Write the sample image of :mod:`hrdv2_dask.data` as a chunked Zarr v3 array."""

from __future__ import annotations

import os
from pathlib import Path

from ..data import make_sample_image

__all__ = ["write_sample_image"]


def write_sample_image(
    path: str | os.PathLike, *, size: int = 2048, png: str | os.PathLike | None = None
) -> Path:
    """Write :func:`make_sample_image` as a chunked Zarr v3 array (and optionally a PNG)."""
    import zarr
    from PIL import Image

    image = make_sample_image(size)
    arr = zarr.create_array(
        path, shape=image.shape, chunks=(512, 512, 3), dtype="uint8", overwrite=True, zarr_format=3
    )
    arr[...] = image
    if png is not None:
        Image.fromarray(image).save(png)
    return Path(path)
