"""Reader of PNG and JPEG files through Pillow, decoded whole at open time.

:data:`READER` claims every file named ``*.png``, ``*.jpg`` or ``*.jpeg``; the file's content
must be PNG or JPEG. These formats have no tiles, so very large images belong in TIFF or Zarr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from hrdv2_dask.errors import InputError

from ._base import (
    _FILE_PLANE_FIX,
    _SUPPORTED,
    OpenedImage,
    Reader,
    _check_dtype,
    _check_single_level,
    _finish,
    _is_file_named,
)
from ._layout import _plan_axes, _raw_chunks, _to_yxc

_PNG_SUFFIXES = (".png",)
_JPEG_SUFFIXES = (".jpg", ".jpeg")


def can_open(source: Any) -> bool:
    """Whether ``source`` is a path to a PNG or JPEG file (by its suffix)."""
    return _is_file_named(source, _PNG_SUFFIXES + _JPEG_SUFFIXES)


def _open_pil(
    path: Path,
    axes: str | None,
    *,
    level: int,
    chunks_yx: tuple[int, int] | None,
    plane: int | None = None,
) -> OpenedImage:
    from PIL import Image

    try:
        with Image.open(path) as im:
            pil_format = im.format
            if pil_format not in ("PNG", "JPEG", "MPO"):
                raise InputError(
                    f"File {str(path)!r} is a {pil_format} image, not PNG or JPEG; rename it "
                    f"or convert it to one of: {_SUPPORTED}."
                )
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode == "PA":
                im = im.convert("RGBA")
            elif mode == "1":
                im = im.convert("L")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            arr = np.array(im)
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(
            f"Cannot read image file {str(path)!r}: {type(err).__name__}: {err}. The file may be "
            "truncated or corrupt; very large images should be stored as tiled TIFF or Zarr."
        ) from err
    fmt = "png" if pil_format == "PNG" else "jpeg"
    what = f"{fmt.upper()} file {str(path)!r} of shape {arr.shape} (mode {mode})"
    _check_single_level(level, what)
    _check_dtype(arr.dtype, what)
    if axes is None:
        axes_in, from_meta = ("YX" if arr.ndim == 2 else "YXC"), True
    else:
        axes_in, from_meta = axes, False
    plan = _plan_axes(
        arr.shape, axes_in, from_metadata=from_meta, what=what, fix=_FILE_PLANE_FIX, plane=plane
    )
    raw_chunks = _raw_chunks(arr.shape, plan, None, chunks_yx)
    data = da.from_array(arr, chunks=raw_chunks, name=f"{fmt}-{tokenize(str(path), arr)}")
    return _finish(
        _to_yxc(data, plan),
        path=str(path),
        fmt=fmt,
        axes=plan.axes,
        level=level,
        plane=plan.plane_info(arr.shape),
    )


#: PNG and JPEG files, formats ``"png"`` and ``"jpeg"``.
READER = Reader("pillow", ("png", "jpeg"), can_open=can_open, open=_open_pil)
