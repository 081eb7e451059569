"""Reader of ``.npy`` files (numpy.save), memory-mapped and read chunk by chunk.

:data:`READER` claims every file named ``*.npy``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hrdv2_dask.errors import InputError

from ._base import (
    _FILE_PLANE_FIX,
    OpenedImage,
    Reader,
    _check_dtype,
    _check_single_level,
    _finish,
    _from_lazy,
    _is_file_named,
    _LazyArray,
)
from ._layout import _plan_axes, _raw_chunks, _to_yxc

_NPY_SUFFIXES = (".npy",)


def can_open(source: Any) -> bool:
    """Whether ``source`` is a path to a ``.npy`` file (by its suffix)."""
    return _is_file_named(source, _NPY_SUFFIXES)


class _NpyArray(_LazyArray):
    """A ``.npy`` file, memory-mapped once per process."""

    def _open(self) -> Any:
        return np.load(self.path, mmap_mode="r", allow_pickle=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.array(self._get()[key])  # copy out of the memory map


def _open_npy(
    path: Path,
    axes: str | None,
    *,
    level: int,
    chunks_yx: tuple[int, int] | None,
    plane: int | None = None,
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
    plan = _plan_axes(shape, axes, from_metadata=False, what=what, fix=_FILE_PLANE_FIX, plane=plane)
    lazy = _NpyArray(str(path), shape, dtype)
    data = _from_lazy(lazy, _raw_chunks(shape, plan, None, chunks_yx), "npy")
    return _finish(
        _to_yxc(data, plan),
        path=str(path),
        fmt="npy",
        axes=plan.axes,
        level=level,
        plane=plan.plane_info(shape),
    )


#: ``.npy`` files, format ``"npy"``.
READER = Reader("npy", ("npy",), can_open=can_open, open=_open_npy)
