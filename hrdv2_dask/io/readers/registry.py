"""The registry of readers, in priority order, and :func:`open_image`, which consults it.

Adding a format means one new module with a :class:`~._base.Reader` and one entry in
:data:`READERS`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from hrdv2_dask.errors import Hrdv2Error, InputError, SourceReadError

from . import arrays, npy, pillow, tiff, zarr_store
from ._base import _SUPPORTED, OpenedImage, Reader, _existing_path, _is_int, _parse_chunks
from .channels import select_channels

#: Every reader, in the order :func:`open_image` asks them; the first that can open a source
#: opens it.
READERS: tuple[Reader, ...] = (
    arrays.DASK_READER,
    arrays.NUMPY_READER,
    zarr_store.READER,
    tiff.READER,
    pillow.READER,
    npy.READER,
)


def find_reader(source: Any, readers: Sequence[Reader] = READERS) -> Reader | None:
    """The first of ``readers`` whose ``can_open`` accepts ``source``, or None.

    Parameters
    ----------
    source : object
        An in-memory array or a :class:`pathlib.Path`.
    readers : sequence of Reader, optional
        The readers to ask, in order; :data:`READERS` by default.

    Returns
    -------
    Reader or None

    Examples
    --------
    >>> find_reader(np.zeros((2, 2))).name, find_reader(Path("a.PNG")).name
    ('numpy', 'pillow')
    >>> find_reader([[1, 2]]) is None
    True
    """
    for reader in readers:
        if reader.can_open(source):
            return reader
    return None


def open_image(
    source: str | os.PathLike[str] | np.ndarray | da.Array,
    axes: str | None = None,
    *,
    level: int = 0,
    chunks: int | tuple[int, int] | None = None,
    plane: int | None = None,
    channels: Sequence[int] | None = None,
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
    plane : int, optional
        Open plane ``plane`` of a stack (a Z or T axis longer than 1; detected from the shape,
        a leading dim that is no channel count, e.g. ``(6, 518, 518)`` is ZYX); ``meta`` then
        records ``plane_axis``, ``plane`` and ``planes``. For a single image only 0 is valid.
    channels : sequence of int, optional
        Keep only these (one to three) source channels, in this order: R, G, B (two get a zero
        B; see :mod:`.channels`); ``meta.channels`` records them. Default: every channel.

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
    if plane is not None and (not _is_int(plane) or plane < 0):
        raise InputError(f"plane must be an int >= 0 (a plane of a stack), got {plane!r}.")
    chunks_yx = _parse_chunks(chunks)

    if isinstance(source, (str, os.PathLike)):
        source = _existing_path(source)
    reader = find_reader(source, READERS)
    if reader is None:
        raise _unsupported(source)
    if plane is None:
        opened = reader.open(source, axes, level=level, chunks_yx=chunks_yx)
    else:
        opened = reader.open(source, axes, level=level, chunks_yx=chunks_yx, plane=int(plane))
    return opened if channels is None else select_channels(opened, channels)


#: What to do about a region of an input image that cannot be read.
REPAIR = (
    "The file is damaged there (or changed during the run): repair or replace it, then rerun "
    "the same command"
)


def _span(k: Any) -> str:
    """
    >>> _span(slice(0, 10)), _span(slice(0, 10, 3)), _span(4)
    ('0:10', '0:10:3', '4')
    """
    if not isinstance(k, slice):
        return str(k)
    return f"{k.start}:{k.stop}" + (f":{k.step}" if k.step not in (None, 1) else "")


def read_region(
    data: Any, key: tuple, *, name: str, fix: str = REPAIR, scheduler: str | None = "sync"
) -> np.ndarray:
    """``data[key]`` as numpy (computed here with ``scheduler`` when ``data`` is lazy; the
    default, ``"sync"``, suits a call inside a task; ``None`` is dask's current scheduler).

    A region that cannot be read raises :class:`~hrdv2_dask.errors.SourceReadError` naming
    ``name``, the rows and columns of ``key`` and the original error, and ending with ``fix``.
    """
    try:
        region = data[key]
        if hasattr(region, "compute"):
            region = region.compute(scheduler=scheduler)
        return np.asarray(region)
    except (MemoryError, Hrdv2Error):
        raise
    except Exception as err:
        rows, cols = (_span(k) for k in (*key, slice(None), slice(None))[:2])
        detail = " ".join(str(err).split()) or "(no message)"
        raise SourceReadError(
            f"Cannot read rows {rows}, cols {cols} of {name}: {type(err).__name__}: {detail}. "
            f"{fix}."
        ) from err


class _Regions:
    """A lazy image whose regions :func:`read_region` reads (for :func:`checked_image`)."""

    def __init__(self, data: da.Array, name: str, fix: str) -> None:
        self.data, self.name, self.fix = data, name, fix
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim

    def __getitem__(self, key: tuple) -> np.ndarray:
        return read_region(self.data, key, name=self.name, fix=self.fix)

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return ("checked", self.data.name, self.name)


def checked_image(data: da.Array, *, name: str, fix: str = REPAIR) -> da.Array:
    """``data`` (an image from :func:`open_image`), lazily, with the same chunks; a chunk that
    cannot be read raises :class:`~hrdv2_dask.errors.SourceReadError` naming ``name`` and
    the chunk's rows and columns, instead of the reader's own exception.

    >>> data, _ = open_image(np.arange(6, dtype=np.uint8).reshape(2, 3))
    >>> checked_image(data, name="x").compute()[..., 0].tolist()
    [[0, 1, 2], [3, 4, 5]]
    """
    return da.from_array(
        _Regions(data, name, fix),
        chunks=data.chunks,
        meta=np.empty((0,) * data.ndim, data.dtype),
        inline_array=False,  # one graph key holds the wrapped image, not every task
    )


def read_thumbnail(
    data: da.Array, *, max_side: int = 1024, name: str = "the image", fix: str = REPAIR
) -> np.ndarray:
    """A subsampled copy of an opened image, at most ``max_side`` px along its longer side.

    Every ``s``-th pixel (``s = ceil(max(H, W) / max_side)``) of a ``(y, x, c)`` array from
    :func:`open_image`, read chunk by chunk; pixel ``(r, c)`` of the result is image pixel
    ``(r * s, c * s)``. Each source chunk is read once (no pyramid level is needed). A chunk
    that cannot be read raises :class:`~hrdv2_dask.errors.SourceReadError` naming ``name``
    and ending with ``fix``.

    Examples
    --------
    >>> data, _ = open_image(np.arange(100, dtype=np.uint8).reshape(10, 10))
    >>> read_thumbnail(data, max_side=4)[..., 0].tolist()
    [[0, 3, 6, 9], [30, 33, 36, 39], [60, 63, 66, 69], [90, 93, 96, 99]]
    """
    if max_side < 1:
        raise InputError(f"max_side must be >= 1, got {max_side!r}.")
    step = max(1, -(-max(data.shape[:2]) // int(max_side)))
    key = (slice(0, data.shape[0], step), slice(0, data.shape[1], step))
    return read_region(data, key, name=name, fix=fix, scheduler=None)


def _unsupported(source: Any) -> InputError:
    """The error for a source that no reader claims."""
    if isinstance(source, Path):
        return InputError(
            f"Unsupported image file {str(source)!r} (suffix {source.suffix!r}); supported: "
            f"{_SUPPORTED}. Convert the image to one of these formats."
        )
    return InputError(
        f"Cannot open a source of type {type(source).__name__}; pass a path to {_SUPPORTED}."
    )
