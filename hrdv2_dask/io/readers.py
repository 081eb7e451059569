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
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import dask.array as da
import numpy as np
from dask.base import tokenize

from hrdv2_dask.errors import InputError, SourceNotFoundError

__all__ = ["ImageMeta", "OpenedImage", "open_image"]

logger = logging.getLogger(__name__)

#: Values of :attr:`ImageMeta.format`.
FORMATS = ("zarr", "ome-zarr", "tiff", "ome-tiff", "svs", "png", "jpeg", "npy", "numpy", "dask")

#: Smallest and largest dask chunk side (px) derived from a source's own chunking.
MIN_CHUNK_PX = 512
MAX_CHUNK_PX = 4096
#: Chunk side (px) for sources without chunking (numpy arrays, ``.npy``, PNG, JPEG).
DEFAULT_CHUNK_PX = 2048

_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8")
_PNG_SUFFIXES = (".png",)
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_NPY_SUFFIXES = (".npy",)
_SUPPORTED = (
    "a Zarr v2/v3 array or group directory (plain or OME-Zarr 0.4/0.5), "
    "TIFF/OME-TIFF/SVS (.tif, .tiff, .svs, .btf, .tf8), PNG (.png), JPEG (.jpg, .jpeg), "
    "NumPy (.npy), a numpy array or a dask array"
)
_SINGLE_PLANE_FIX = "select a single 2-D plane first, e.g. arr[0]"
_FILE_PLANE_FIX = (
    "save a single 2-D plane (YX, YXC or CYX) to a new file, or open it as an array, select one "
    "plane (e.g. arr[0]) and pass that"
)

# Unit aliases -> (canonical UDUNITS name, micrometres per unit).
_UNITS: dict[str, tuple[str, float]] = {
    "m": ("meter", 1e6),
    "meter": ("meter", 1e6),
    "cm": ("centimeter", 1e4),
    "centimeter": ("centimeter", 1e4),
    "mm": ("millimeter", 1e3),
    "millimeter": ("millimeter", 1e3),
    "\u00b5m": ("micrometer", 1.0),  # micro sign
    "\u03bcm": ("micrometer", 1.0),  # greek mu
    "um": ("micrometer", 1.0),
    "micron": ("micrometer", 1.0),
    "microns": ("micrometer", 1.0),
    "micrometer": ("micrometer", 1.0),
    "micrometre": ("micrometer", 1.0),
    "nm": ("nanometer", 1e-3),
    "nanometer": ("nanometer", 1e-3),
    "pm": ("picometer", 1e-6),
    "picometer": ("picometer", 1e-6),
    "\u00c5": ("angstrom", 1e-4),
    "angstrom": ("angstrom", 1e-4),
    "in": ("inch", 25400.0),
    "inch": ("inch", 25400.0),
}

# Axis names found in metadata (OME-Zarr axes, Zarr dimension names) -> axis letter.
_AXIS_NAMES = {
    "t": "T",
    "time": "T",
    "c": "C",
    "channel": "C",
    "channels": "C",
    "band": "C",
    "s": "S",
    "sample": "S",
    "z": "Z",
    "y": "Y",
    "x": "X",
}


# ---------------------------------------------------------------------------------------------
# Public types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageMeta:
    """Description of an opened image source.

    Parameters
    ----------
    path : str or None
        Absolute path of the source file or directory; None for in-memory arrays.
    format : str
        One of ``"zarr"``, ``"ome-zarr"``, ``"tiff"``, ``"ome-tiff"``, ``"svs"``, ``"png"``,
        ``"jpeg"``, ``"npy"``, ``"numpy"``, ``"dask"``.
    shape : tuple of int
        ``(y, x, c)`` shape of the opened data, px and channels.
    dtype : str
        Numpy dtype name of the data, e.g. ``"uint8"``.
    axes : str
        Axes of the source as read, before reordering to ``(y, x, c)``, e.g. ``"TCZYX"``,
        ``"YXS"`` (tifffile's name for interleaved samples) or ``"CYX"``.
    pixel_size : tuple of float, optional
        ``(y, x)`` physical size of one pixel at this level, in ``unit``; None when unknown.
    unit : str, optional
        Unit of ``pixel_size``, a UDUNITS name such as ``"micrometer"``; None when unknown.
    level : int, optional
        Pyramid level that was opened; 0 is full resolution.

    Examples
    --------
    >>> meta = ImageMeta(path=None, format="numpy", shape=(4, 5, 1), dtype="uint8", axes="YX")
    >>> ImageMeta.from_dict(meta.to_dict()) == meta
    True
    """

    path: str | None
    format: str
    shape: tuple[int, int, int]
    dtype: str
    axes: str
    pixel_size: tuple[float, float] | None = None
    unit: str | None = None
    level: int = 0

    def __post_init__(self) -> None:
        if self.path is not None and not isinstance(self.path, str):
            raise InputError(f"ImageMeta.path must be a str or None, got {self.path!r}.")
        if self.format not in FORMATS:
            raise InputError(f"ImageMeta.format must be one of {FORMATS}, got {self.format!r}.")
        shape = _as_int_tuple(self.shape)
        if shape is None or len(shape) != 3 or min(shape) < 1:
            raise InputError(
                f"ImageMeta.shape must be three positive ints (y, x, c), got {self.shape!r}."
            )
        object.__setattr__(self, "shape", shape)
        try:
            dtype = np.dtype(self.dtype)
        except TypeError as err:
            raise InputError(
                f"ImageMeta.dtype must be a numpy dtype name such as 'uint8', got {self.dtype!r}."
            ) from err
        object.__setattr__(self, "dtype", dtype.name)
        if not isinstance(self.axes, str) or not self.axes:
            raise InputError(f"ImageMeta.axes must be a non-empty str, got {self.axes!r}.")
        if self.pixel_size is not None:
            try:
                size = tuple(float(v) for v in self.pixel_size)
            except (TypeError, ValueError) as err:
                raise InputError(
                    f"ImageMeta.pixel_size must be two positive floats (y, x) or None, "
                    f"got {self.pixel_size!r}."
                ) from err
            if len(size) != 2 or not all(math.isfinite(v) and v > 0 for v in size):
                raise InputError(
                    f"ImageMeta.pixel_size must be two positive floats (y, x) or None, "
                    f"got {self.pixel_size!r}."
                )
            object.__setattr__(self, "pixel_size", size)
        if self.unit is not None and not isinstance(self.unit, str):
            raise InputError(f"ImageMeta.unit must be a str or None, got {self.unit!r}.")
        if not _is_int(self.level) or self.level < 0:
            raise InputError(f"ImageMeta.level must be an int >= 0, got {self.level!r}.")
        object.__setattr__(self, "level", int(self.level))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (lists for tuples), e.g. for Zarr attributes.

        Returns
        -------
        dict
            Keys are the field names; :meth:`from_dict` inverts it.
        """
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["pixel_size"] = None if self.pixel_size is None else list(self.pixel_size)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageMeta:
        """Build an :class:`ImageMeta` from the output of :meth:`to_dict`.

        Parameters
        ----------
        data : mapping
            Must hold ``path``, ``format``, ``shape``, ``dtype`` and ``axes``; ``pixel_size``,
            ``unit`` and ``level`` are optional.

        Returns
        -------
        ImageMeta

        Raises
        ------
        InputError
            On unknown or missing keys or invalid values.
        """
        if not isinstance(data, Mapping):
            raise InputError(f"ImageMeta.from_dict needs a mapping, got {type(data).__name__}.")
        known = {"path", "format", "shape", "dtype", "axes", "pixel_size", "unit", "level"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"ImageMeta.from_dict got unknown keys {unknown}; expected some of {sorted(known)}."
            )
        missing = sorted({"path", "format", "shape", "dtype", "axes"} - set(data))
        if missing:
            raise InputError(f"ImageMeta.from_dict is missing required keys {missing}.")
        return cls(**dict(data))


class OpenedImage(NamedTuple):
    """An opened image: ``data, meta = open_image(source)``.

    Attributes
    ----------
    data : dask.array.Array
        Lazy ``(y, x, c)`` array with the source's dtype.
    meta : ImageMeta
        Description of the source.
    """

    data: da.Array
    meta: ImageMeta


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def open_image(
    source: str | os.PathLike[str] | np.ndarray | da.Array,
    axes: str | None = None,
    *,
    level: int = 0,
    chunks: int | tuple[int, int] | None = None,
) -> OpenedImage:
    """Open an image as a lazy ``(y, x, c)`` dask array plus its metadata.

    Parameters
    ----------
    source : str, os.PathLike, numpy.ndarray or dask.array.Array
        Path to a Zarr v2/v3 array or group, a TIFF/OME-TIFF/SVS, PNG, JPEG or ``.npy`` file, or
        an in-memory array. A Zarr group must be an OME-Zarr multiscale image (``level`` picks
        the dataset) or hold exactly one array.
    axes : str, optional
        Axes of the source, one letter per dimension from ``T``, ``Z``, ``C`` (or ``S``), ``Y``,
        ``X``, e.g. ``"CYX"``. Overrides the axes in the file's metadata and the detection used
        otherwise (2-D: ``YX``; 3-D: ``YXC`` when the last dim is 1-4, else ``CYX`` when the first
        is; leading singleton dims are dropped). Every axis other than Y, X and C must have
        length 1.
    level : int, optional
        Pyramid level (OME-Zarr dataset, TIFF/SVS resolution level); 0 is full resolution.
    chunks : int or tuple of int, optional
        ``(y, x)`` chunk size in px of the returned array; an int is used for both. By default
        the source's chunking is kept, widened to at least 512 px and split to at most 4096 px
        per side; unchunked sources get 2048 px chunks; dask inputs keep their chunks. Channels
        are always one chunk.

    Returns
    -------
    OpenedImage
        ``(data, meta)``: ``data`` a lazy dask array of shape ``(y, x, c)`` with the source's
        dtype (converted to native byte order), ``meta`` an :class:`ImageMeta`.

    Raises
    ------
    SourceNotFoundError
        If a path does not exist.
    InputError
        If the source cannot be read, has an unsupported format, dtype or layout (non-singleton
        T/Z, fewer than 2 dims, zero size, ambiguous 3-D shape), or ``level`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> data, meta = open_image(np.zeros((3, 64, 48), dtype=np.uint8))
    >>> data.shape, meta.axes, meta.format
    ((64, 48, 3), 'CYX', 'numpy')
    """
    if axes is not None and not isinstance(axes, str):
        raise InputError(f"axes must be a str such as 'YXC' or 'CYX', or None; got {axes!r}.")
    if not _is_int(level) or level < 0:
        raise InputError(f"level must be an int >= 0 (0 is full resolution), got {level!r}.")
    level = int(level)
    chunks_yx = _parse_chunks(chunks)

    if isinstance(source, da.Array):
        return _open_dask(source, axes, level=level, chunks_yx=chunks_yx)
    if isinstance(source, np.ndarray):
        return _open_numpy(source, axes, level=level, chunks_yx=chunks_yx)
    if isinstance(source, (str, os.PathLike)):
        return _open_path(source, axes, level=level, chunks_yx=chunks_yx)
    raise InputError(
        f"Cannot open a source of type {type(source).__name__}; pass a path to {_SUPPORTED}."
    )


def read_thumbnail(data: da.Array, *, max_side: int = 1024) -> np.ndarray:
    """A subsampled copy of an opened image, at most ``max_side`` px along its longer side.

    Every ``s``-th pixel (``s = ceil(max(H, W) / max_side)``) of a ``(y, x, c)`` array from
    :func:`open_image`, read chunk by chunk; pixel ``(r, c)`` of the result is image pixel
    ``(r * s, c * s)``. Each source chunk is read once (no pyramid level is needed).

    Examples
    --------
    >>> data, _ = open_image(np.arange(100, dtype=np.uint8).reshape(10, 10))
    >>> read_thumbnail(data, max_side=4)[..., 0].tolist()
    [[0, 3, 6, 9], [30, 33, 36, 39], [60, 63, 66, 69], [90, 93, 96, 99]]
    """
    if max_side < 1:
        raise InputError(f"max_side must be >= 1, got {max_side!r}.")
    step = max(1, -(-max(data.shape[:2]) // int(max_side)))
    return np.asarray(data[::step, ::step].compute())


# ---------------------------------------------------------------------------------------------
# In-memory sources
# ---------------------------------------------------------------------------------------------


def _open_dask(
    arr: da.Array, axes: str | None, *, level: int, chunks_yx: tuple[int, int] | None
) -> OpenedImage:
    if any(isinstance(s, float) and math.isnan(s) for s in arr.shape):
        raise InputError(
            f"The dask array has unknown dimension sizes {arr.shape}; call "
            "arr.compute_chunk_sizes() first."
        )
    what = f"dask array of shape {arr.shape}"
    _check_single_level(level, what)
    _check_dtype(arr.dtype, what)
    plan = _plan_axes(arr.shape, axes, from_metadata=False, what=what, fix=_SINGLE_PLANE_FIX)
    data = _to_yxc(arr, plan)
    rechunk: dict[int, Any] = {}
    if chunks_yx is not None:
        rechunk = {0: chunks_yx[0], 1: chunks_yx[1]}
    if data.numblocks[2] != 1:
        rechunk[2] = -1
    if rechunk:
        data = data.rechunk(rechunk)
    return _finish(data, path=None, fmt="dask", axes=plan.axes, level=level)


def _open_numpy(
    arr: np.ndarray, axes: str | None, *, level: int, chunks_yx: tuple[int, int] | None
) -> OpenedImage:
    what = f"numpy array of shape {arr.shape}"
    _check_single_level(level, what)
    _check_dtype(arr.dtype, what)
    plan = _plan_axes(arr.shape, axes, from_metadata=False, what=what, fix=_SINGLE_PLANE_FIX)
    raw_chunks = _raw_chunks(arr.shape, plan, None, chunks_yx)
    data = da.from_array(np.asarray(arr), chunks=raw_chunks)
    return _finish(_to_yxc(data, plan), path=None, fmt="numpy", axes=plan.axes, level=level)


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def _open_path(
    source: str | os.PathLike[str],
    axes: str | None,
    *,
    level: int,
    chunks_yx: tuple[int, int] | None,
) -> OpenedImage:
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise SourceNotFoundError(
            f"Image path {str(path)!r} does not exist (resolved to {os.path.abspath(path)!r}); "
            "check the path. Supported sources: " + _SUPPORTED + "."
        )
    path = Path(os.path.abspath(path))
    name = path.name.lower()
    if path.is_dir():
        return _open_zarr(path, axes, level=level, chunks_yx=chunks_yx)
    if name.endswith(_TIFF_SUFFIXES):
        return _open_tiff(path, axes, level=level, chunks_yx=chunks_yx)
    if name.endswith(_PNG_SUFFIXES + _JPEG_SUFFIXES):
        return _open_pil(path, axes, level=level, chunks_yx=chunks_yx)
    if name.endswith(_NPY_SUFFIXES):
        return _open_npy(path, axes, level=level, chunks_yx=chunks_yx)
    raise InputError(
        f"Unsupported image file {str(path)!r} (suffix {path.suffix!r}); supported: {_SUPPORTED}. "
        "Convert the image to one of these formats."
    )


# --- Zarr ---------------------------------------------------------------------------------------


def _open_zarr(
    path: Path, axes: str | None, *, level: int, chunks_yx: tuple[int, int] | None
) -> OpenedImage:
    import zarr

    markers = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
    if not any((path / m).exists() for m in markers):
        raise InputError(
            f"Directory {str(path)!r} is not a Zarr store (none of {list(markers)} found); pass "
            f"a Zarr array or group directory or an image file ({_SUPPORTED})."
        )
    try:
        node = zarr.open(store=str(path), mode="r")
        fmt = "zarr"
        array_path = ""
        meta_axes: str | None = None
        pixel_size: tuple[float, float] | None = None
        unit: str | None = None
        n_levels = 1
        if isinstance(node, zarr.Group):
            attrs = node.attrs.asdict()
            if "bioformats2raw.layout" in attrs and "0" in node:
                # bioformats2raw: the first image is the OME-Zarr group "0".
                node = node["0"]
                array_path = "0/"
                attrs = node.attrs.asdict()
            multiscales = _ome_multiscales(attrs)
            if multiscales is not None:
                fmt = "ome-zarr"
                ms = multiscales[0]
                datasets = ms.get("datasets") or []
                n_levels = len(datasets)
                _check_level(level, n_levels, f"OME-Zarr {str(path)!r}")
                dataset = datasets[level]
                array_path += str(dataset["path"])
                array = node[str(dataset["path"])]
                meta_axes, axis_units = _ome_axes(ms, array.ndim, path)
                pixel_size, unit = _ome_pixel_size(ms, dataset, meta_axes, axis_units)
            else:
                arrays = sorted(name for name, _ in node.arrays())
                if len(arrays) != 1:
                    raise InputError(
                        f"Zarr group {str(path)!r} is not an OME-Zarr image and holds "
                        f"{len(arrays)} arrays {arrays}; pass the path of one array, e.g. "
                        f"{str(path / arrays[0]) if arrays else str(path / '<array>')!r}."
                    )
                array = node[arrays[0]]
                array_path += arrays[0]
        else:
            array = node
        if fmt == "zarr":
            _check_level(level, n_levels, f"Zarr array {str(path)!r}")
            meta_axes = _zarr_dimension_axes(array)
        zarr_format = int(array.metadata.zarr_format)
        shape = tuple(int(s) for s in array.shape)
        dtype = np.dtype(array.dtype)
        src_chunks = getattr(array, "shards", None) or array.chunks
    except InputError:
        raise
    except Exception as err:
        raise InputError(
            f"Cannot read Zarr store {str(path)!r}: {type(err).__name__}: {err}. Check that it "
            "is a complete Zarr v2/v3 array or group (zarr-python 3 can open it)."
        ) from err

    what = f"Zarr array {str(path / array_path) if array_path else str(path)!r} of shape {shape}"
    return _open_chunked(
        _ZarrArray(str(path), array_path, zarr_format, shape, dtype),
        what=what,
        path=path,
        fmt=fmt,
        axes=axes,
        meta_axes=meta_axes,
        src_chunks=tuple(src_chunks),
        chunks_yx=chunks_yx,
        level=level,
        pixel_size=pixel_size,
        unit=unit,
    )


def _ome_multiscales(attrs: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """Return the OME-Zarr ``multiscales`` list (0.4: top level, 0.5: under ``"ome"``)."""
    ome = attrs.get("ome")
    if isinstance(ome, Mapping) and ome.get("multiscales"):
        return list(ome["multiscales"])
    if attrs.get("multiscales"):
        return list(attrs["multiscales"])
    return None


def _ome_axes(ms: Mapping[str, Any], ndim: int, path: Path) -> tuple[str | None, list[str | None]]:
    """Return the axis letters and per-axis units of an OME-Zarr multiscale."""
    entries = ms.get("axes")
    if entries is None:
        # OME-Zarr <= 0.2 has no axes and is always 5-D TCZYX.
        return ("TCZYX" if ndim == 5 else None), [None] * ndim
    letters = []
    units: list[str | None] = []
    for entry in entries:
        if isinstance(entry, str):  # 0.3
            name, kind, unit = entry, None, None
        else:
            name, kind, unit = entry.get("name", ""), entry.get("type"), entry.get("unit")
        letter = _AXIS_NAMES.get(str(name).lower())
        if letter is None:
            letter = {"channel": "C", "time": "T"}.get(str(kind), "Q")
        letters.append(letter)
        units.append(unit)
    if len(letters) != ndim:
        raise InputError(
            f"OME-Zarr {str(path)!r} lists {len(letters)} axes {entries!r} but its array has "
            f"{ndim} dims; fix the multiscales metadata or pass axes= explicitly."
        )
    return "".join(letters), units


def _ome_pixel_size(
    ms: Mapping[str, Any],
    dataset: Mapping[str, Any],
    axes: str | None,
    axis_units: Sequence[str | None],
) -> tuple[tuple[float, float] | None, str | None]:
    """Return the ``(y, x)`` pixel size and unit of one OME-Zarr dataset."""
    if axes is None or "Y" not in axes or "X" not in axes:
        return None, None
    scale = [1.0] * len(axes)
    found = False
    for transforms in (
        dataset.get("coordinateTransformations"),
        ms.get("coordinateTransformations"),
    ):
        for t in transforms or []:
            if t.get("type") == "scale" and "scale" in t and len(t["scale"]) == len(axes):
                scale = [a * float(b) for a, b in zip(scale, t["scale"], strict=True)]
                found = True
    if not found:
        return None, None
    iy, ix = axes.index("Y"), axes.index("X")
    return _combine_units(scale[iy], axis_units[iy], scale[ix], axis_units[ix])


def _zarr_dimension_axes(array: Any) -> str | None:
    """Axis letters from Zarr v3 ``dimension_names`` or xarray's ``_ARRAY_DIMENSIONS``."""
    names = getattr(array.metadata, "dimension_names", None)
    if not names:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    if not names or len(names) != array.ndim or any(n is None for n in names):
        return None
    letters = [_AXIS_NAMES.get(str(n).lower()) for n in names]
    if any(x is None for x in letters) or len(set(letters)) != len(letters):
        return None
    return "".join(letters)  # type: ignore[arg-type]


# --- TIFF -------------------------------------------------------------------------------------


def _open_tiff(
    path: Path, axes: str | None, *, level: int, chunks_yx: tuple[int, int] | None
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
    )


def _open_chunked(
    lazy: Any,
    *,
    what: str,
    path: Path,
    fmt: str,
    axes: str | None,
    meta_axes: str | None,
    src_chunks: tuple[int, ...],
    chunks_yx: tuple[int, int] | None,
    level: int,
    pixel_size: tuple[float, float] | None,
    unit: str | None,
) -> OpenedImage:
    """The shared end of the chunked-file readers (Zarr, TIFF): check, plan axes, wrap lazily.

    ``lazy`` is a picklable array recipe (``_ZarrArray``, ``_TiffArray``) with ``shape`` and
    ``dtype``; ``axes`` (the caller's) wins over ``meta_axes`` (the file's).
    """
    _check_dtype(lazy.dtype, what)
    plan = _plan_axes(
        lazy.shape,
        axes if axes is not None else meta_axes,
        from_metadata=axes is None and meta_axes is not None,
        what=what,
        fix=_FILE_PLANE_FIX,
    )
    data = _from_lazy(lazy, _raw_chunks(lazy.shape, plan, src_chunks, chunks_yx), fmt)
    return _finish(
        _to_yxc(data, plan),
        path=str(path),
        fmt=fmt,
        axes=plan.axes,
        level=level,
        pixel_size=pixel_size,
        unit=unit,
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


# --- PNG / JPEG --------------------------------------------------------------------------------


def _open_pil(
    path: Path, axes: str | None, *, level: int, chunks_yx: tuple[int, int] | None
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
    plan = _plan_axes(arr.shape, axes_in, from_metadata=from_meta, what=what, fix=_FILE_PLANE_FIX)
    raw_chunks = _raw_chunks(arr.shape, plan, None, chunks_yx)
    data = da.from_array(arr, chunks=raw_chunks, name=f"{fmt}-{tokenize(str(path), arr)}")
    return _finish(_to_yxc(data, plan), path=str(path), fmt=fmt, axes=plan.axes, level=level)


# --- .npy -------------------------------------------------------------------------------------


def _open_npy(
    path: Path, axes: str | None, *, level: int, chunks_yx: tuple[int, int] | None
) -> OpenedImage:
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
        shape, dtype = tuple(int(s) for s in mm.shape), np.dtype(mm.dtype)
        del mm
    except (OSError, ValueError, EOFError) as err:
        raise InputError(
            f"Cannot read .npy file {str(path)!r}: {type(err).__name__}: {err}. It must be a "
            "single numeric array saved with numpy.save (no pickled objects, not .npz)."
        ) from err
    what = f".npy file {str(path)!r} of shape {shape}"
    _check_single_level(level, what)
    _check_dtype(dtype, what)
    plan = _plan_axes(shape, axes, from_metadata=False, what=what, fix=_FILE_PLANE_FIX)
    lazy = _NpyArray(str(path), shape, dtype)
    data = _from_lazy(lazy, _raw_chunks(shape, plan, None, chunks_yx), "npy")
    return _finish(_to_yxc(data, plan), path=str(path), fmt="npy", axes=plan.axes, level=level)


# ---------------------------------------------------------------------------------------------
# Lazy, picklable file-backed arrays
# ---------------------------------------------------------------------------------------------


class _LazyArray:
    """Array-like that stores how to open a file and reopens it once per process.

    Pickling keeps only the recipe (path and selection), never the open handle, so dask graphs
    built on it are small and compute in other processes (the idea of xarray's
    ``CachingFileManager``). The handle is cached on the instance, guarded by a lock, and
    reopened after a fork.
    """

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = path
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._handle: Any = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _recipe(self) -> tuple[Any, ...]:
        return (self.path,)

    def _open(self) -> Any:
        raise NotImplementedError

    def _get(self) -> Any:
        with self._lock:
            if self._handle is None or self._pid != os.getpid():
                self._handle = self._open()
                self._pid = os.getpid()
            return self._handle

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._get()[key])

    def close(self) -> None:
        """Drop the cached handle; the next read reopens the file."""
        with self._lock:
            self._handle = None
            self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        return (type(self).__name__, self._recipe(), self.shape, self.dtype.str, stamp)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._recipe()!r}, shape={self.shape}, dtype={self.dtype}"


class _ZarrArray(_LazyArray):
    """One array of a local Zarr store, reopened by path."""

    def __init__(
        self,
        path: str,
        array_path: str,
        zarr_format: int,
        shape: tuple[int, ...],
        dtype: np.dtype,
    ) -> None:
        super().__init__(path, shape, dtype)
        self.array_path = array_path
        self.zarr_format = zarr_format

    def _recipe(self) -> tuple[Any, ...]:
        return (self.path, self.array_path, self.zarr_format)

    def _open(self) -> Any:
        import zarr

        return zarr.open_array(
            store=self.path, path=self.array_path, mode="r", zarr_format=self.zarr_format
        )


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


class _NpyArray(_LazyArray):
    """A ``.npy`` file, memory-mapped once per process."""

    def _open(self) -> Any:
        return np.load(self.path, mmap_mode="r", allow_pickle=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.array(self._get()[key])  # copy out of the memory map


def _from_lazy(lazy: _LazyArray, raw_chunks: tuple[int, ...], fmt: str) -> da.Array:
    return da.from_array(
        lazy,
        chunks=raw_chunks,
        name=f"{fmt}-{tokenize(lazy)}",
        meta=np.empty((0,) * lazy.ndim, dtype=lazy.dtype),
        asarray=False,
        fancy=False,
    )


# ---------------------------------------------------------------------------------------------
# Axes, chunks and checks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AxesPlan:
    """How to turn a source of some layout into ``(y, x, c)``."""

    axes: str  # source axes as reported in ImageMeta.axes
    y: int  # source dim of y
    x: int  # source dim of x
    c: int | None  # source dim of the channels, None for grayscale
    drop: tuple[int, ...]  # singleton source dims indexed away


def _plan_axes(
    shape: Sequence[int],
    axes: str | None,
    *,
    from_metadata: bool,
    what: str,
    fix: str,
) -> _AxesPlan:
    """Work out where y, x and c are in ``shape`` from ``axes`` or, without it, from the shape.

    Parameters
    ----------
    shape : sequence of int
        Source shape.
    axes : str, optional
        Axis letters, one per dim, from file metadata or the user; None to detect.
    from_metadata : bool
        Whether ``axes`` came from metadata (unknown letters allowed as singletons) rather than
        from the user (only ``TZCSYX``).
    what : str
        Description of the source for messages, including its shape.
    fix : str
        How to select a single plane, for messages.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise InputError(
            f"{what} has {len(shape)} dim(s); an image needs at least 2 (y, x). Reshape it to "
            "(height, width) or (height, width, channels)."
        )
    if 0 in shape:
        raise InputError(f"{what} is empty (zero-size); pass an image with at least one pixel.")
    if (
        axes is not None
        and from_metadata
        and len(axes) == len(shape)
        and any(a not in "TZCSYX" and s != 1 for a, s in zip(axes.upper(), shape, strict=True))
    ):
        # Metadata names a long axis it does not understand (tifffile's Q, I, ...): use the
        # shape instead, as for a plain array.
        logger.debug("%s: metadata axes %r name an unknown axis; detecting axes", what, axes)
        axes = None
    if axes is None:
        axes = _detect_axes(shape, what=what, fix=fix)
        reported = axes
    else:
        reported = axes
        axes = axes.upper()
        if len(axes) != len(shape):
            raise InputError(
                f"axes={reported!r} has {len(axes)} letters but {what} has {len(shape)} dims; "
                "give one letter per dim, e.g. 'YX', 'YXC' or 'CYX'."
            )
        if not from_metadata:
            bad = sorted(set(axes) - set("TZCSYX"))
            if bad:
                raise InputError(
                    f"axes={reported!r} contains unknown letters {bad}; use T, Z, C (or S), Y, X."
                )
            reported = axes
    dupes = sorted({a for a in axes if axes.count(a) > 1})
    if dupes:
        raise InputError(f"Axes {reported!r} of {what} repeat {dupes}; each axis may appear once.")
    if "Y" not in axes or "X" not in axes:
        raise InputError(
            f"Axes {reported!r} of {what} must contain both Y and X; pass axes= explicitly, "
            "e.g. axes='CYX'."
        )
    # Channels: C or tifffile's S (samples); if both, one must be a singleton.
    c_letters = [a for a in "SC" if a in axes]
    if len(c_letters) == 2:
        s_len, c_len = shape[axes.index("S")], shape[axes.index("C")]
        if s_len > 1 and c_len > 1:
            raise InputError(
                f"{what} has both samples (S={s_len}) and channels (C={c_len}) with axes "
                f"{reported!r}; only one channel axis is supported: {fix}."
            )
        c_letters = ["S"] if s_len > 1 else ["C"]
    c_dim = axes.index(c_letters[0]) if c_letters else None
    y_dim, x_dim = axes.index("Y"), axes.index("X")
    drop = []
    for dim, (letter, size) in enumerate(zip(axes, shape, strict=True)):
        if dim in (y_dim, x_dim, c_dim):
            continue
        if size != 1:
            raise InputError(
                f"{what} with axes {reported!r} has {letter}={size}; only Y, X and one channel "
                f"axis may be longer than 1 (supported layouts: YX, YXC, CYX with leading "
                f"singleton T/Z). To use one plane, {fix}."
            )
        drop.append(dim)
    return _AxesPlan(axes=reported, y=y_dim, x=x_dim, c=c_dim, drop=tuple(drop))


def _detect_axes(shape: tuple[int, ...], *, what: str, fix: str) -> str:
    """Guess the axes of a shape without metadata (leading singletons are T/Z)."""
    if len(shape) > 5:
        raise InputError(
            f"{what} has {len(shape)} dims; at most 5 (T, Z, C, Y, X) are supported. {fix}, "
            "or pass axes= for a layout with singleton extra dims."
        )
    if len(shape) == 2:
        return "YX"
    lead = shape[:-3]
    if any(s != 1 for s in lead):
        raise InputError(
            f"{what} has leading dims {lead} that are not singletons; supported layouts are YX, "
            f"YXC and CYX with leading singleton T/Z. To use one plane, {fix}."
        )
    prefix = "TZ"[2 - len(lead) :] if lead else ""
    first, last = shape[-3], shape[-1]
    if last in (1, 2, 3, 4):
        return prefix + "YXC"
    if first in (1, 2, 3, 4):
        return prefix + "CYX"
    raise InputError(
        f"{what} is ambiguous: neither its first nor its last of 3 dims is a channel count "
        "(1-4). Pass axes= explicitly, e.g. axes='CYX' or axes='ZYX' (with a singleton Z)."
    )


def _raw_chunks(
    shape: Sequence[int],
    plan: _AxesPlan,
    src_chunks: Sequence[int] | None,
    chunks_yx: tuple[int, int] | None,
) -> tuple[int, ...]:
    """Dask chunk sizes in source dim order: y/x per policy, channels whole, others 1."""
    out = []
    for dim, size in enumerate(shape):
        if dim in (plan.y, plan.x):
            if chunks_yx is not None:
                n = chunks_yx[0] if dim == plan.y else chunks_yx[1]
            elif src_chunks is not None:
                n = _sane_chunk_px(int(src_chunks[dim]))
            else:
                n = DEFAULT_CHUNK_PX
            out.append(max(1, min(n, size)))
        elif dim == plan.c:
            out.append(size)
        else:
            out.append(1)
    return tuple(out)


def _sane_chunk_px(src: int) -> int:
    """Chunk side near a source chunk side ``src``, within [MIN_CHUNK_PX, MAX_CHUNK_PX].

    Small source chunks are grouped (a multiple of ``src``), large ones split evenly.

    Examples
    --------
    >>> _sane_chunk_px(256), _sane_chunk_px(1000), _sane_chunk_px(100), _sane_chunk_px(10000)
    (512, 1000, 600, 3334)
    """
    if src < MIN_CHUNK_PX:
        return src * math.ceil(MIN_CHUNK_PX / src)
    if src > MAX_CHUNK_PX:
        return math.ceil(src / math.ceil(src / MAX_CHUNK_PX))
    return src


def _to_yxc(arr: da.Array, plan: _AxesPlan) -> da.Array:
    """Lazily drop singleton dims and transpose to ``(y, x, c)``."""
    if plan.drop:
        arr = arr[tuple(0 if d in plan.drop else slice(None) for d in range(arr.ndim))]
    keep = [d for d in range(len(plan.axes)) if d not in plan.drop]
    order = [keep.index(plan.y), keep.index(plan.x)]
    if plan.c is not None:
        order.append(keep.index(plan.c))
    if order != list(range(len(order))):
        arr = arr.transpose(order)
    if plan.c is None:
        arr = arr[:, :, None]
    return arr


def _finish(
    data: da.Array,
    *,
    path: str | None,
    fmt: str,
    axes: str,
    level: int,
    pixel_size: tuple[float, float] | None = None,
    unit: str | None = None,
) -> OpenedImage:
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    meta = ImageMeta(
        path=path,
        format=fmt,
        shape=tuple(int(s) for s in data.shape),  # type: ignore[arg-type]
        dtype=data.dtype.name,
        axes=axes,
        pixel_size=pixel_size,
        unit=unit if pixel_size is not None else None,
        level=level,
    )
    logger.debug(
        "Opened %s as %s: shape %s, dtype %s, axes %r, chunks %s, pixel size %s %s",
        path if path is not None else "in-memory array",
        fmt,
        meta.shape,
        meta.dtype,
        axes,
        data.chunksize,
        pixel_size,
        unit,
    )
    return OpenedImage(data, meta)


def _combine_units(
    sy: float, uy: str | None, sx: float, ux: str | None
) -> tuple[tuple[float, float] | None, str | None]:
    """Return ``((sy, sx), unit)`` in one unit; micrometres when the two units differ."""
    if not (math.isfinite(sy) and math.isfinite(sx) and sy > 0 and sx > 0):
        return None, None
    ky, kx = _UNITS.get(str(uy).strip()), _UNITS.get(str(ux).strip())
    name_y = ky[0] if ky else uy
    name_x = kx[0] if kx else ux
    if name_y == name_x:
        return (float(sy), float(sx)), name_y
    if ky and kx:
        return (sy * ky[1], sx * kx[1]), "micrometer"
    logger.warning("Pixel size units differ (%r, %r) and cannot be combined; ignoring", uy, ux)
    return None, None


def _parse_chunks(chunks: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if chunks is None:
        return None
    if _is_int(chunks):
        pair: Any = (chunks, chunks)
    elif isinstance(chunks, Sequence) and not isinstance(chunks, str) and len(chunks) == 2:
        pair = tuple(chunks)
    else:
        raise InputError(f"chunks must be an int or a (y, x) pair of ints, got {chunks!r}.")
    if not all(_is_int(v) and v > 0 for v in pair):
        raise InputError(f"chunks must be positive ints (px), got {chunks!r}.")
    return int(pair[0]), int(pair[1])


def _check_level(level: int, n_levels: int, what: str) -> None:
    if level >= n_levels:
        raise InputError(
            f"level={level} is out of range: {what} has {n_levels} level(s); pass level= "
            f"between 0 and {n_levels - 1}."
        )


def _check_single_level(level: int, what: str) -> None:
    _check_level(level, 1, what)


def _check_dtype(dtype: Any, what: str) -> None:
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise InputError(
            f"{what} has dtype {dtype}; only bool, integer and float images are supported. "
            "Convert it with arr.astype(...) first."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_int_tuple(value: Any) -> tuple[int, ...] | None:
    try:
        items = tuple(value)
    except TypeError:
        return None
    if not all(_is_int(v) for v in items):
        return None
    return tuple(int(v) for v in items)
