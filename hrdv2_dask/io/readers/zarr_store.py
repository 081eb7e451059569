"""Reader of Zarr v2/v3 stores through zarr-python: plain arrays, groups and OME-Zarr images.

:data:`READER` claims every folder and opens, read chunk by chunk:

* a Zarr array, with axes from Zarr v3 ``dimension_names`` or xarray's ``_ARRAY_DIMENSIONS``;
* a Zarr group holding exactly one array;
* an OME-Zarr 0.4/0.5 multiscale image (``level`` picks the dataset), also the first image of a
  bioformats2raw layout, with axes and pixel size from its ``multiscales`` metadata.

A folder that is not a Zarr store is reported as such.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hrdv2_dask.errors import InputError

from ._base import (
    _SUPPORTED,
    OpenedImage,
    Reader,
    _as_path,
    _check_level,
    _check_single_level,
    _combine_units,
    _LazyArray,
)
from ._layout import _open_chunked

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


def can_open(source: Any) -> bool:
    """Whether ``source`` is a path to a folder (every folder is taken for a Zarr store)."""
    path = _as_path(source)
    return path is not None and path.is_dir()


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


class _ZarrImage(NamedTuple):
    """The array of a Zarr store to open, with what its metadata says about it."""

    array: Any  # zarr.Array
    array_path: str  # path of the array inside the store, "" for the store itself
    fmt: str  # "zarr" or "ome-zarr"
    meta_axes: str | None
    pixel_size: tuple[float, float] | None
    unit: str | None


def _open_zarr(
    path: Path,
    axes: str | None,
    *,
    level: int,
    chunks_yx: tuple[int, int] | None,
    plane: int | None = None,
) -> OpenedImage:
    import zarr

    markers = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
    if not any((path / m).exists() for m in markers):
        raise InputError(
            f"Directory {str(path)!r} is not a Zarr store (none of {list(markers)} found); pass "
            f"a Zarr array or group directory or an image file ({_SUPPORTED})."
        )
    try:
        image = _find_image(zarr.open(store=str(path), mode="r"), path, level)
        array, array_path = image.array, image.array_path
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
        fmt=image.fmt,
        axes=axes,
        meta_axes=image.meta_axes,
        src_chunks=tuple(src_chunks),
        chunks_yx=chunks_yx,
        level=level,
        pixel_size=image.pixel_size,
        unit=image.unit,
        plane=plane,
    )


def _find_image(node: Any, path: Path, level: int) -> _ZarrImage:
    """The array to open in the root ``node`` of the store at ``path``, and its metadata."""
    import zarr

    prefix = ""
    if isinstance(node, zarr.Group):
        attrs = node.attrs.asdict()
        if "bioformats2raw.layout" in attrs and "0" in node:
            # bioformats2raw: the first image is the OME-Zarr group "0".
            node = node["0"]
            prefix = "0/"
            attrs = node.attrs.asdict()
        multiscales = _ome_multiscales(attrs)
        if multiscales is not None:
            return _find_ome_dataset(node, multiscales[0], path, level, prefix)
        arrays = sorted(name for name, _ in node.arrays())
        if len(arrays) != 1:
            raise InputError(
                f"Zarr group {str(path)!r} is not an OME-Zarr image and holds "
                f"{len(arrays)} arrays {arrays}; pass the path of one array, e.g. "
                f"{str(path / arrays[0]) if arrays else str(path / '<array>')!r}."
            )
        node, prefix = node[arrays[0]], prefix + arrays[0]
    _check_single_level(level, f"Zarr array {str(path)!r}")
    return _ZarrImage(node, prefix, "zarr", _zarr_dimension_axes(node), None, None)


def _find_ome_dataset(
    group: Any, ms: Mapping[str, Any], path: Path, level: int, prefix: str
) -> _ZarrImage:
    """Dataset ``level`` of the OME-Zarr multiscale ``ms`` of ``group``, with axes and scale."""
    datasets = ms.get("datasets") or []
    _check_level(level, len(datasets), f"OME-Zarr {str(path)!r}")
    dataset = datasets[level]
    array = group[str(dataset["path"])]
    meta_axes, axis_units = _ome_axes(ms, array.ndim, path)
    pixel_size, unit = _ome_pixel_size(ms, dataset, meta_axes, axis_units)
    return _ZarrImage(array, prefix + str(dataset["path"]), "ome-zarr", meta_axes, pixel_size, unit)


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


#: Zarr stores, formats ``"zarr"`` and ``"ome-zarr"``.
READER = Reader("zarr", ("zarr", "ome-zarr"), can_open=can_open, open=_open_zarr)
