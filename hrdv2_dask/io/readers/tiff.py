"""Reader of TIFF, OME-TIFF and Aperio SVS files through tifffile, read tile by tile.

:data:`READER` claims every file named ``*.tif``, ``*.tiff``, ``*.svs``, ``*.btf`` or
``*.tf8``. It opens series 0 at the requested pyramid level, and takes the pixel size from the
OME-XML, the SVS description or the resolution tags.
"""

from __future__ import annotations

import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from hrdv2_dask.errors import InputError

from ._base import (
    _UNITS,
    OpenedImage,
    Reader,
    _check_level,
    _combine_units,
    _is_file_named,
    _LazyArray,
)
from ._layout import _open_chunked

logger = logging.getLogger(__name__)

_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8")


def can_open(source: Any) -> bool:
    """Whether ``source`` is a path to a TIFF, OME-TIFF or SVS file (by its suffix)."""
    return _is_file_named(source, _TIFF_SUFFIXES)


class _TiffArray(_LazyArray):
    """One level of one series of a TIFF file, read through tifffile's Zarr store."""

    def __init__(
        self, path: str, series: int, level: int, shape: tuple[int, ...], dtype: np.dtype
    ) -> None:
        super().__init__(path, shape, dtype)
        self.series = series
        self.level = level

    def _recipe(self) -> tuple[Any, ...]:
        return (self.path, self.series, self.level)

    def _open(self) -> Any:
        import tifffile
        import zarr

        tif = tifffile.TiffFile(self.path)
        try:
            store = tif.series[self.series].aszarr(level=self.level)
            array = zarr.open_array(store, mode="r")
        except Exception:
            tif.close()
            raise
        return tif, array

    def __getitem__(self, key: Any) -> np.ndarray:
        _, array = self._get()
        return np.asarray(array[key])

    def close(self) -> None:
        with self._lock:
            if self._handle is not None and self._pid == os.getpid():
                self._handle[0].close()
            self._handle = None
            self._pid = None

    def __del__(self) -> None:
        # Close the cached file when the graph holding this recipe is garbage collected.
        handle = getattr(self, "_handle", None)
        if handle is not None and getattr(self, "_pid", None) == os.getpid():
            try:
                handle[0].close()
            except Exception:  # interpreter shutdown or already closed
                pass


def _open_tiff(
    path: Path,
    axes: str | None,
    *,
    level: int,
    chunks_yx: tuple[int, int] | None,
    plane: int | None = None,
) -> OpenedImage:
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(path) as tif:
            fmt = "svs" if tif.is_svs else "ome-tiff" if tif.is_ome else "tiff"
            if not tif.series:
                raise InputError(f"TIFF file {str(path)!r} holds no image series.")
            series = tif.series[0]
            _check_level(level, len(series.levels), f"TIFF file {str(path)!r}")
            lvl = series.levels[level]
            store = series.aszarr(level=level)
            try:
                array = zarr.open_array(store, mode="r")
                shape = tuple(int(s) for s in array.shape)
                dtype = np.dtype(array.dtype)
                src_chunks = tuple(int(c) for c in array.chunks)
            finally:
                store.close()
            meta_axes = str(lvl.axes).upper()
            if len(meta_axes) != len(shape):
                logger.warning(
                    "TIFF %s: series axes %r do not match its Zarr shape %s; detecting axes.",
                    path,
                    meta_axes,
                    shape,
                )
                meta_axes = None
            pixel_size, unit = _tiff_pixel_size(tif, fmt, series.levels[0], lvl)
    except InputError:
        raise
    except Exception as err:
        raise InputError(
            f"Cannot read TIFF file {str(path)!r}: {type(err).__name__}: {err}. The file may be "
            "truncated, corrupt or not a TIFF; check it opens in tifffile or another viewer."
        ) from err

    return _open_chunked(
        _TiffArray(str(path), 0, level, shape, dtype),
        what=f"TIFF file {str(path)!r} (series 0, level {level}) of shape {shape}",
        path=path,
        fmt=fmt,
        axes=axes,
        meta_axes=meta_axes,
        src_chunks=tuple(src_chunks),
        chunks_yx=chunks_yx,
        level=level,
        pixel_size=pixel_size,
        unit=unit,
        plane=plane,
    )


def _tiff_pixel_size(
    tif: Any, fmt: str, base: Any, lvl: Any
) -> tuple[tuple[float, float] | None, str | None]:
    """Return the ``(y, x)`` pixel size and unit at ``lvl`` of the first series of ``tif``."""
    size: tuple[float, float] | None = None
    unit: str | None = None
    try:
        if fmt == "ome-tiff":
            size, unit = _ome_xml_pixel_size(tif.ome_metadata)
        elif fmt == "svs":
            size, unit = _svs_pixel_size(tif.pages.first.description)
        else:
            size, unit = _resolution_pixel_size(tif)
    except Exception as err:  # metadata is optional: never fail the open on it
        logger.warning("Ignoring unreadable pixel size metadata in %s: %s", tif.filename, err)
        return None, None
    if size is None:
        return None, None
    # Scale by the level's downsample factor (ratio of extents).
    base_axes, lvl_axes = str(base.axes).upper(), str(lvl.axes).upper()
    if "Y" not in base_axes or "X" not in base_axes:
        return None, None
    fy = base.shape[base_axes.index("Y")] / lvl.shape[lvl_axes.index("Y")]
    fx = base.shape[base_axes.index("X")] / lvl.shape[lvl_axes.index("X")]
    return (size[0] * fy, size[1] * fx), unit


def _ome_xml_pixel_size(xml: str | None) -> tuple[tuple[float, float] | None, str | None]:
    if not xml:
        return None, None
    root = ET.fromstring(xml)
    for elem in root.iter():
        if elem.tag.rsplit("}", 1)[-1] == "Pixels":
            sy, sx = elem.get("PhysicalSizeY"), elem.get("PhysicalSizeX")
            if sy is None or sx is None:
                return None, None
            uy = elem.get("PhysicalSizeYUnit", "\u00b5m")
            ux = elem.get("PhysicalSizeXUnit", "\u00b5m")
            return _combine_units(float(sy), uy, float(sx), ux)
    return None, None


def _svs_pixel_size(description: str | None) -> tuple[tuple[float, float] | None, str | None]:
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description or "")
    if match is None:
        return None, None
    mpp = float(match.group(1))
    if not (math.isfinite(mpp) and mpp > 0):
        return None, None
    return (mpp, mpp), "micrometer"


def _resolution_pixel_size(tif: Any) -> tuple[tuple[float, float] | None, str | None]:
    """Pixel size from X/YResolution and ResolutionUnit (or ImageJ's ``unit``)."""
    page = tif.pages.first
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None, None
    rx, ry = (_rational(tags["XResolution"].value), _rational(tags["YResolution"].value))
    if not (rx > 0 and ry > 0 and math.isfinite(rx) and math.isfinite(ry)):
        return None, None
    res_unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else None
    if res_unit == 2:  # inch
        return (25400.0 / ry, 25400.0 / rx), "micrometer"
    if res_unit == 3:  # centimeter
        return (10000.0 / ry, 10000.0 / rx), "micrometer"
    if tif.is_imagej:
        ij_unit = (tif.imagej_metadata or {}).get("unit")
        known = _UNITS.get(str(ij_unit).replace("\\u00B5", "\u00b5"))
        if known is not None:
            return (1.0 / ry, 1.0 / rx), known[0]
    return None, None


def _rational(value: Any) -> float:
    if isinstance(value, tuple):
        num, den = value
        return float(num) / float(den) if den else math.nan
    return float(value)


#: TIFF-based files, formats ``"tiff"``, ``"ome-tiff"`` and ``"svs"``.
READER = Reader("tiff", ("tiff", "ome-tiff", "svs"), can_open=can_open, open=_open_tiff)
