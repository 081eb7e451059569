"""What every reader shares: the public types, the reader record, lazy file arrays and checks.

* :class:`ImageMeta` and :class:`OpenedImage`, what :func:`~hrdv2_dask.io.readers.open_image`
  returns; :class:`Reader`, one entry of the registry.
* :class:`_LazyArray`, the picklable recipe that file-backed readers wrap in dask, and
  :func:`_finish`, the common last step of every reader.
* Option checks (level, chunks, dtype) and path helpers for the readers' ``can_open``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import dask.array as da
import numpy as np
from dask.base import tokenize

from hrdv2_dask.errors import InputError, SourceNotFoundError

logger = logging.getLogger(__name__)

#: Values of :attr:`ImageMeta.format`.
FORMATS = ("zarr", "ome-zarr", "tiff", "ome-tiff", "svs", "png", "jpeg", "npy", "numpy", "dask")

#: Smallest and largest dask chunk side (px) derived from a source's own chunking.
MIN_CHUNK_PX = 512
MAX_CHUNK_PX = 4096
#: Chunk side (px) for sources without chunking (numpy arrays, ``.npy``, PNG, JPEG).
DEFAULT_CHUNK_PX = 2048

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
    plane_axis : str, optional
        The stack axis (``"Z"`` or ``"T"``) one plane of which was opened with ``plane=``;
        None for a single image.
    plane : int, optional
        Index of that plane along ``plane_axis``.
    planes : int, optional
        Number of planes along ``plane_axis``.
    channels : tuple of int, optional
        The source channels picked with ``channels=`` (R, G, B in that order); None: all.

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
    plane_axis: str | None = None
    plane: int | None = None
    planes: int | None = None
    channels: tuple[int, ...] | None = None

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
        if self.plane_axis is not None and not (
            _is_int(self.plane) and _is_int(self.planes) and 0 <= self.plane < self.planes
        ):
            raise InputError(
                f"ImageMeta.plane must be an int in 0..planes-1 with plane_axis, got "
                f"plane={self.plane!r}, planes={self.planes!r}."
            )
        if self.channels is not None:
            picked = _as_int_tuple(self.channels)
            if not picked or min(picked) < 0:
                raise InputError(
                    f"ImageMeta.channels must be channel indices >= 0 or None, got "
                    f"{self.channels!r}."
                )
            object.__setattr__(self, "channels", picked)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (lists for tuples), e.g. for Zarr attributes.

        Returns
        -------
        dict
            Keys are the field names (``plane_axis``, ``plane`` and ``planes`` only for a plane
        of a stack, ``channels`` only where picked); :meth:`from_dict` inverts it.
        """
        out = asdict(self)
        if self.plane_axis is None:
            for key in ("plane_axis", "plane", "planes"):
                del out[key]
        if self.channels is None:
            del out["channels"]
        else:
            out["channels"] = list(self.channels)
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
        known |= {"plane_axis", "plane", "planes", "channels"}
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


@dataclass(frozen=True)
class Reader:
    """One source format of the registry: what it can open and how.

    Parameters
    ----------
    name : str
        Short name of the reader, e.g. ``"tiff"``.
    formats : tuple of str
        The :attr:`ImageMeta.format` values its images get, a subset of :data:`FORMATS`.
    can_open : callable
        ``can_open(source) -> bool``: whether this reader claims ``source`` (an in-memory array
        or a :class:`pathlib.Path`), judged from its type, suffix or being a folder, without
        reading it.
    open : callable
        ``open(source, axes, *, level, chunks_yx, plane=None) -> OpenedImage`` for a claimed
        source: an array, or an existing absolute :class:`pathlib.Path`. ``axes`` (str or None),
        ``level`` (int >= 0), ``chunks_yx`` (``(y, x)`` px or None) and ``plane`` (int >= 0 or
        None: a plane of a stack) are already checked.

    Examples
    --------
    >>> r = Reader("none", ("numpy",), can_open=lambda source: False, open=lambda *a, **k: None)
    >>> r.can_open(np.zeros((2, 2)))
    False
    """

    name: str
    formats: tuple[str, ...]
    can_open: Callable[[Any], bool]
    open: Callable[..., OpenedImage]

    def __post_init__(self) -> None:
        if (
            isinstance(self.formats, str)
            or not set(self.formats)
            or set(self.formats) - set(FORMATS)
        ):
            raise InputError(
                f"Reader {self.name!r}: formats must be a non-empty tuple of values from "
                f"{FORMATS}, got {self.formats!r}; add a new format to FORMATS first."
            )
        object.__setattr__(self, "formats", tuple(self.formats))


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
# The end of every reader
# ---------------------------------------------------------------------------------------------


def _finish(
    data: da.Array,
    *,
    path: str | None,
    fmt: str,
    axes: str,
    level: int,
    pixel_size: tuple[float, float] | None = None,
    unit: str | None = None,
    plane: tuple[str, int, int] | None = None,
) -> OpenedImage:
    """``data`` in native byte order and its :class:`ImageMeta`; ``plane`` is
    ``(axis, index, count)`` for one plane of a stack."""
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
        **(
            {} if plane is None else {"plane_axis": plane[0], "plane": plane[1], "planes": plane[2]}
        ),
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


# ---------------------------------------------------------------------------------------------
# Checks and paths
# ---------------------------------------------------------------------------------------------


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


def _as_path(source: Any) -> Path | None:
    """``source`` as a :class:`pathlib.Path` when it is a str or os.PathLike, else None."""
    if isinstance(source, (str, os.PathLike)):
        return Path(os.fspath(source))
    return None


def _is_file_named(source: Any, suffixes: tuple[str, ...]) -> bool:
    """Whether ``source`` is a path, not a folder, whose name ends with one of ``suffixes``.

    Examples
    --------
    >>> _is_file_named("a/B.TIF", (".tif",)), _is_file_named(np.zeros(2), (".tif",))
    (True, False)
    """
    path = _as_path(source)
    return path is not None and path.name.lower().endswith(suffixes) and not path.is_dir()


def _existing_path(source: str | os.PathLike[str]) -> Path:
    """The absolute, user-expanded path of ``source``; :class:`SourceNotFoundError` if absent."""
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise SourceNotFoundError(
            f"Image path {str(path)!r} does not exist (resolved to {os.path.abspath(path)!r}); "
            "check the path. Supported sources: " + _SUPPORTED + "."
        )
    return Path(os.path.abspath(path))
