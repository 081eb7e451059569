"""The napari reader: a feature store, a collection or an analysis output as napari layers.

Every layer is lazy (dask arrays; nothing is computed when a path is opened) and placed on
the source image's pixel grid, in source pixels: an output cell ``i`` at ``out_stride`` ``s``
covers source pixels ``[i*s, (i+1)*s)``, its centre ``i*s + (s-1)/2`` is the ``y``/``x``
coordinate the stores hold, and napari draws data pixel ``i`` centred at
``translate + i * scale``; so ``scale = s`` and ``translate`` = the first coordinate
(:func:`grid_placement`).

What opens as what (:func:`path_kind`):

* a feature store: an image of the mean over its features, above its source image (at scale
  1) when the source file recorded in the store is still there;
* a collection store: those layers for each member, each its own layer; or, with the second
  reader (:func:`read_stack`, "as a stack" in napari's reader choice), one layer stacking
  the members' means when they share one grid;
* ``pca.zarr``: an RGB image of its first 3 components (mapped like ``pca_rgb``: the model's
  1st-99th percentiles to 0-255), a grey image with fewer components;
* ``pca.ome.zarr`` (an OME-Zarr written by :func:`hrdv2_dask.io.outputs.write_ome_pyramid`):
  the multiscale RGB pyramid, placed with the coordinates of the
  ``pca.zarr`` beside it;
* a ``labels`` array (``clusters.zarr``, ``segmentation.zarr``, ``similarity_mask.zarr``):
  a Labels layer;
* ``similarity.zarr``: an image with a colour map; any other array written by
  :func:`hrdv2_dask.io.outputs.write_array`: an image.

Big stores: above :data:`MULTISCALE_PX` cells a layer is a lazy pyramid; a feature store's is
made of :class:`~._feature_levels.LazyLevel` levels of the feature mean (a read computes only
its region's chunks and keeps their means), and levels whose screenful would read more than
:data:`VIEW_BYTES` are transparent placeholders (zoom in to see the features). The source
image opens with its file's own pyramid levels.

Units: by default the world units are source pixels (what the stores' ``y``/``x`` hold, and
what napari's own readers give the source file). In physical units instead (the third reader,
"in physical units", or ``HRDV2_NAPARI_UNITS=physical`` for the others), every layer whose
source has a pixel size (the ``y_phys``/``x_phys`` coordinates) is scaled by it, the source
image included, and carries napari's ``units``; layers without one stay in pixels. Every
layer's ``metadata`` records ``pixel_size`` and ``unit`` where known.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import Hrdv2Error, StoreError
from ..io.collection import COLLECTION, open_collection
from ..io.readers import open_image
from ..io.store import ATTR, open_features
from ._feature_levels import ChunkResults, lazy_levels

__all__ = [
    "LayerData",
    "grid_placement",
    "has_pixel_size",
    "in_physical_units",
    "levels_above",
    "napari_get_physical_reader",
    "napari_get_reader",
    "napari_get_stack_reader",
    "path_kind",
    "pixel_size",
    "read_path",
    "read_stack",
]

#: napari's layer-data tuple: ``(data, kwargs, layer_type)``.
LayerData = tuple[Any, dict[str, Any], str]

log = logging.getLogger(__name__)

#: Layers whose largest side is above this many cells open as a lazy pyramid (napari draws a
#: level near the screen's resolution instead of the whole array).
MULTISCALE_PX = 4096
#: One view of a pyramid level, in its cells: about a 1920 x 1080 screen.
SCREEN_CELLS = 1920 * 1080
#: A pyramid level above level 0 whose screenful would read more than this many bytes of the
#: store (a 2x smaller level reads 4x the cells) opens as a placeholder: NaN (transparent),
#: 0 in labels. napari draws it at once; zoomed in, it shows the finer levels. Without it, the
#: full view of a 100k x 100k px store reads the whole store (480 GB at 384 float16 features).
VIEW_BYTES = 2**30
#: Placeholder levels continue down to this many cells a side (napari's full view then
#: shows, and thumbnails, a screen-sized level).
PLACEHOLDER_PX = 1024
_PCA_OME = "pca.ome.zarr"
_OME_METHOD = "hrdv2_dask.io.outputs.write_ome_pyramid"  # its multiscales metadata
#: Environment variable choosing the world units of the default readers: ``pixel`` or
#: ``physical``.
UNITS_ENV = "HRDV2_NAPARI_UNITS"
# The canonical length units of the image readers (io.readers._base), all known to napari.
_LENGTH_UNITS = frozenset(
    "meter centimeter millimeter micrometer nanometer picometer angstrom inch".split()
)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _array_var(path: Path) -> str | None:
    """The one data variable of a Zarr v3 group written by ``outputs.write_array``."""
    root = _json(path / "zarr.json")
    if not root or root.get("node_type") != "group":
        return None
    if not all((path / c / "zarr.json").is_file() for c in ("y", "x")):
        return None  # the coordinates place it on the source grid: without them, not ours
    dims = {
        p.name: (_json(p / "zarr.json") or {}).get("dimension_names") or []
        for p in sorted(path.iterdir())
        if p.is_dir() and p.name not in ("y", "x")
    }
    data = [n for n, d in dims.items() if {"y", "x"} <= set(d)]
    return data[0] if len(data) == 1 else None


def path_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is, for the reader: ``"collection"``, ``"features"``, ``"ome"``,
    ``"pca"``, ``"labels"``, ``"similarity"``, ``"array"``, or None (not ours).

    Reads only metadata files (cheap: napari asks every reader about every path dropped).
    """
    p = Path(path)
    if not p.is_dir():
        return None
    root = _json(p / "zarr.json")
    attrs = (root or {}).get("attributes", {})
    if COLLECTION in attrs:
        return "collection"
    if ATTR in attrs:
        return "features"
    if root is None:
        ms = (_json(p / ".zattrs") or {}).get("multiscales") or [{}]
        method = (ms[0].get("metadata") or {}).get("method")
        return "ome" if method == _OME_METHOD else None  # others' OME-Zarr: napari's readers
    var = _array_var(p)
    if var is None:
        return None
    if var in ("pca", "labels", "similarity"):
        return var
    return "array"


def grid_placement(
    y: Sequence[float] | np.ndarray, x: Sequence[float] | np.ndarray, stride: int | None = None
) -> tuple[tuple[float, float], tuple[float, float]]:
    """napari ``(scale, translate)`` of a grid whose cell centres are ``y`` and ``x``.

    The spacing of the coordinates is the scale and the first centre the translate; a
    one-cell axis takes ``stride`` (else ``2 * y[0] + 1``: the first centre of a grid starting
    at pixel 0 is ``(s - 1) / 2``).

    Examples
    --------
    >>> grid_placement([1.5, 5.5, 9.5], [1.5, 5.5])
    ((4.0, 4.0), (1.5, 1.5))
    >>> grid_placement([3.0], [0.0, 1.0])
    ((7.0, 1.0), (3.0, 0.0))
    """
    scale, translate = [], []
    for c in (np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)):
        if c.size >= 2:
            step = float(c[1] - c[0])
        else:
            step = float(stride) if stride else 2 * float(c[0]) + 1
        scale.append(step)
        translate.append(float(c[0]))
    return (scale[0], scale[1]), (translate[0], translate[1])


def pixel_size(arr: xr.DataArray) -> tuple[tuple[float, float], str | None] | None:
    """``((y, x) size of a source pixel, unit)`` from an array's ``y``/``x`` and
    ``y_phys``/``x_phys`` coordinates; None without them (or on a 1-cell stride-1 axis).

    Examples
    --------
    >>> from hrdv2_dask.io.store import feature_coords
    >>> arr = xr.DataArray(np.zeros((2, 3)), dims=("y", "x"))
    >>> arr = arr.assign_coords(feature_coords((2, 3), 4, pixel_size=(0.5, 0.25), unit="nm"))
    >>> pixel_size(arr)
    ((0.5, 0.25), 'nm')
    """
    if "y_phys" not in arr.coords or "x_phys" not in arr.coords:
        return None
    size = []
    for dim in ("y", "x"):
        pix = np.asarray(arr[dim].values, np.float64)
        phys = np.asarray(arr[f"{dim}_phys"].values, np.float64)
        i = int(np.argmax(np.abs(pix)))  # a centre away from 0 (the first is 0 at stride 1)
        if pix[i] == 0:
            return None
        size.append(float(phys[i] / pix[i]))
    unit = arr["y_phys"].attrs.get("units")
    return (size[0], size[1]), (None if unit in (None, "unknown") else str(unit))


def _meta(kind: str, path: Path, arr: xr.DataArray | None, **extra: Any) -> dict[str, Any]:
    """A layer's ``metadata``: what it is, where from, and its source pixel size if known."""
    meta: dict[str, Any] = {"hrdv2_kind": kind, "path": str(path), **extra}
    size = pixel_size(arr) if arr is not None else None
    if size is not None:
        meta["pixel_size"], meta["unit"] = list(size[0]), size[1]
    return meta


def in_physical_units(layer: LayerData) -> LayerData:
    """``layer`` placed in physical units: its ``y``/``x`` scale and translate times its
    ``metadata["pixel_size"]``, with napari ``units``; unchanged without a pixel size.

    Examples
    --------
    >>> meta = {"pixel_size": [0.5, 0.25], "unit": "micrometer"}
    >>> kwargs = {"scale": (4.0, 4.0), "translate": (1.5, 1.5), "metadata": meta}
    >>> kw = in_physical_units((np.zeros((2, 3)), kwargs, "image"))[1]
    >>> kw["scale"], kw["translate"], kw["units"]
    ((2.0, 1.0), (0.75, 0.375), ('micrometer', 'micrometer'))
    """
    data, kwargs, kind = layer
    meta = kwargs.get("metadata") or {}
    size = meta.get("pixel_size")
    if not size:
        return layer
    first = data[0] if isinstance(data, list) else data
    ndim = first.ndim - (1 if kwargs.get("rgb") else 0)
    scale = list(kwargs.get("scale", (1.0,) * ndim))
    translate = list(kwargs.get("translate", (0.0,) * ndim))
    for axis, p in zip((-2, -1), size, strict=True):
        scale[axis] *= float(p)
        translate[axis] *= float(p)
    out = {**kwargs, "scale": tuple(scale), "translate": tuple(translate)}
    unit = meta.get("unit")
    if unit in _LENGTH_UNITS:
        out["units"] = ("pixel",) * (ndim - 2) + (unit, unit)
    return data, out, kind


def _physical_default() -> bool:
    value = os.environ.get(UNITS_ENV, "pixel").strip().lower()
    if value not in ("pixel", "physical"):
        log.warning("%s=%r is neither 'pixel' nor 'physical'; using pixels", UNITS_ENV, value)
    return value == "physical"


def _placement(arr: xr.DataArray, *, drop: str | None = None) -> dict[str, Any]:
    """napari ``scale``/``translate`` of ``arr`` (without its dim ``drop``: no slicing of a
    gigapixel array's data to drop it)."""
    scale, translate = grid_placement(arr["y"].values, arr["x"].values, arr.attrs.get("out_stride"))
    extra = arr.ndim - 2 - (drop is not None)  # leading axes (channels...) are not placed
    return {"scale": (1.0,) * extra + scale, "translate": (0.0,) * extra + translate}


def placeholder_from(n_levels: int, cell_bytes: float) -> int:
    """The first of ``n_levels`` pyramid levels whose screenful (:data:`SCREEN_CELLS`) would
    read more than :data:`VIEW_BYTES` at ``cell_bytes`` bytes per level-0 cell (``n_levels``:
    none); level 0 is always real.

    >>> placeholder_from(4, 384 * 2), placeholder_from(4, 64 * 2), placeholder_from(4, 4)
    (1, 2, 4)
    """
    for k in range(1, n_levels):
        if SCREEN_CELLS * 4**k * cell_bytes > VIEW_BYTES:
            return k
    return n_levels


def pyramid(
    data: da.Array, *, labels: bool = False, cell_bytes: float | None = None
) -> list[da.Array]:
    """``data`` and its 2x-smaller versions (lazy), down to :data:`MULTISCALE_PX` cells.

    Levels of ``(y, x)`` or ``(..., y, x)`` arrays, and of RGB ``(y, x, c)`` ``uint8``
    arrays (the ``y``/``x`` axes are found by the dtype), are 2x2 means (rounded for
    integers), except label images, which take every other cell (a mean of labels is no
    label). A side of odd length drops its last cell. With ``cell_bytes`` (bytes read per
    level-0 cell), levels from :func:`placeholder_from` on are placeholders (NaN for floats,
    0 for labels; RGB and other integer images keep every level).

    Examples
    --------
    >>> [lv.shape for lv in pyramid(da.zeros((9000, 5000), chunks=1000))]
    [(9000, 5000), (4500, 2500), (2250, 1250)]
    >>> levels = pyramid(da.zeros((9000, 5000), chunks=1000), cell_bytes=768)
    >>> [int(np.isnan(lv[0, 0].compute())) for lv in levels]
    [0, 1, 1]
    """
    rgb = data.ndim == 3 and data.dtype == np.uint8 and data.shape[2] in (3, 4)
    axes = (0, 1) if rgb else (data.ndim - 2, data.ndim - 1)
    levels = [data]
    while max(levels[-1].shape[a] for a in axes) > MULTISCALE_PX:
        prev = levels[-1]
        if labels:
            index = tuple(
                slice(None, None, 2) if a in axes else slice(None) for a in range(prev.ndim)
            )
            levels.append(prev[index])
            continue
        mean = da.coarsen(
            np.mean, prev.astype(np.float32), dict.fromkeys(axes, 2), trim_excess=True
        )
        levels.append(mean.round().astype(prev.dtype) if prev.dtype.kind in "iu" else mean)
    fill = 0 if labels else (np.nan if levels[-1].dtype.kind == "f" and not rgb else None)
    if cell_bytes is None or fill is None:
        return levels
    first = placeholder_from(len(levels), cell_bytes)
    return levels[:first] + [
        da.full(lv.shape, fill, dtype=lv.dtype, chunks=lv.chunks) for lv in levels[first:]
    ]


def _cell_bytes(data: da.Array, kwargs: dict[str, Any]) -> float | None:
    """Bytes of the store read per displayed level-0 cell: the layer's own record (a feature
    mean reads every feature), else its dtype times its non-placed chunk axes."""
    known = (kwargs.get("metadata") or {}).get("bytes_per_cell")
    if known is not None:
        return float(known)
    if kwargs.get("rgb"):
        return None
    return float(data.dtype.itemsize * np.prod([c[0] for c in data.chunks[:-2]], dtype=int))


def central_limits(data: da.Array) -> tuple[float, float]:
    """Contrast limits from the chunk at the centre of ``data`` (its 0.5-99.5 percentiles;
    ``(0, 1)`` if it holds no finite value): one chunk read, not the whole array.

    >>> data = da.from_array(np.arange(100.0).reshape(10, 10), chunks=5)
    >>> [round(v) for v in central_limits(data)]  # the chunk [5:10, 5:10]: 55 ... 99
    [55, 99]
    """
    index = _centre_index(data.shape, data.chunks)
    block = np.asarray(data[index].compute(scheduler="sync"), np.float64)
    finite = block[np.isfinite(block)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


def _multiscale(layer: LayerData) -> LayerData:
    """``layer`` with a pyramid for data above :data:`MULTISCALE_PX` (placement unchanged)."""
    data, kwargs, kind = layer
    if isinstance(data, list):
        return layer
    cell_bytes = _cell_bytes(data, kwargs)
    levels = pyramid(data, labels=kind == "labels", cell_bytes=cell_bytes)
    if len(levels) == 1:
        return layer
    out = {**kwargs, "multiscale": True}
    first = placeholder_from(len(levels), cell_bytes) if cell_bytes else len(levels)
    if first < len(levels) and kind != "labels" and not kwargs.get("rgb"):
        out["metadata"] = {**out.get("metadata", {}), "placeholder_levels": first}
        if "contrast_limits" not in out:  # napari's own would come from a placeholder: NaN
            out["contrast_limits"] = central_limits(levels[0])
    return levels, out, kind


def _features_layer(arr: xr.DataArray, name: str, path: Path) -> LayerData:
    """The mean over the features: a dask array; above :data:`MULTISCALE_PX` cells, a pyramid
    of :class:`~._feature_levels.LazyLevel` levels (each indexing reads only its region),
    whose levels from :func:`placeholder_from` on are NaN placeholders (:func:`level_plan`)."""
    cell_bytes = arr.sizes["feature"] * arr.dtype.itemsize  # a cell's mean reads them all
    kwargs: dict[str, Any] = {
        "name": f"{name}: mean of {arr.sizes['feature']} features",
        "metadata": _meta("features", path, arr, bytes_per_cell=cell_bytes),
        **_placement(arr, drop="feature"),
    }
    n_levels, first = level_plan(max(arr.shape[1:]), cell_bytes)
    if n_levels == 1:
        return arr.data.mean(axis=0), kwargs, "image"  # one task per (y, x) chunk
    # one ChunkResults: a level reuses its finer levels' chunk means
    levels = lazy_levels(ChunkResults.of_features(arr.data), n_levels, first_placeholder=first)
    kwargs["multiscale"] = True
    if first < n_levels:
        kwargs["metadata"]["placeholder_levels"] = first
        # napari's own limits would come from the coarsest level: a placeholder
        kwargs["contrast_limits"] = central_limits(_centre_chunk(arr.data).mean(axis=0))
    return levels, kwargs, "image"


def level_plan(side: int, cell_bytes: float) -> tuple[int, int]:
    """``(levels, first placeholder level)`` of a lazy pyramid of a ``side``-cell grid that
    reads ``cell_bytes`` per level-0 cell: levels down to :data:`MULTISCALE_PX` cells; with
    placeholders (they cost nothing), on down to :data:`PLACEHOLDER_PX`, so that napari's
    overview and thumbnail are small. A grid below MULTISCALE_PX whose overview would read too
    much (4096² cells of 384 float16 features: 12.9 GB) gets them too.

    >>> level_plan(25000, 768), level_plan(25000, 4), level_plan(900, 4)
    ((6, 1), (6, 4), (1, 1))
    """
    n_levels = levels_above(side, MULTISCALE_PX)
    n_all = max(n_levels, levels_above(side, PLACEHOLDER_PX))
    first = placeholder_from(n_all, cell_bytes)
    return (n_all, first) if first < n_all else (n_levels, min(first, n_levels))


def levels_above(side: int, px: int) -> int:
    """Pyramid levels (each 2x smaller) of a ``side``-cell array until a side is <= ``px``.

    >>> levels_above(25000, 4096), levels_above(25000, 1024), levels_above(900, 1024)
    (4, 6, 1)
    """
    n = 1
    while side // 2 ** (n - 1) > px:
        n += 1
    return n


def _centre_index(shape: Sequence[int], chunks: Sequence[Sequence[int]]) -> tuple[slice, ...]:
    """The slices of the chunk holding the centre of an array of ``shape`` and ``chunks``."""
    index = []
    for size, sides in zip(shape, chunks, strict=True):
        edges = np.cumsum((0, *sides))
        j = min(int(np.searchsorted(edges, size // 2, "right")) - 1, len(sides) - 1)
        index.append(slice(int(edges[j]), int(edges[j + 1])))
    return tuple(index)


def _centre_chunk(features: da.Array) -> da.Array:
    """The ``(feature, y, x)`` chunk holding the centre cell."""
    return features[(slice(None), *_centre_index(features.shape[1:], features.chunks[1:]))]


def _source_layer(arr: xr.DataArray, name: str) -> LayerData | None:
    """The store's source image (lazy, in source pixels), when its file is still readable."""
    src = arr.attrs.get("source") or {}
    path = src.get("path")
    if not path or not Path(path).exists():
        return None
    level = int(src.get("level") or 0)
    try:
        data, _ = open_image(path, level=level)
    except Hrdv2Error as err:
        log.warning("source of %s not shown: %s", name, err)
        return None
    shape = src.get("shape")
    if shape and list(data.shape[:2]) != list(shape[:2]):
        log.warning("source of %s not shown: %s is %s now, not %s", name, path, data.shape, shape)
        return None
    kwargs: dict[str, Any] = {
        "name": f"{name}: source {Path(path).name}",
        "metadata": _meta("source", Path(path), arr),
    }
    rgb = data.shape[2] in (3, 4) and data.dtype == np.uint8
    kwargs["rgb"] = rgb
    levels = [data, *_coarser_levels(path, level, data.shape)]
    levels = [lv if rgb else lv[..., 0] for lv in levels]
    if len(levels) > 1:
        kwargs["multiscale"] = True
        return levels, kwargs, "image"
    return levels[0], kwargs, "image"


def _coarser_levels(path: str, level: int, shape: tuple[int, ...]) -> list[da.Array]:
    """The source file's own coarser pyramid levels (TIFF/SVS, OME-Zarr), when its level 0 is
    above :data:`MULTISCALE_PX`: napari draws its overview from them, reading little."""
    if max(shape[:2]) <= MULTISCALE_PX:
        return []
    levels: list[da.Array] = []
    while True:
        try:
            data, _ = open_image(path, level=level + len(levels) + 1)
        except Hrdv2Error:
            return levels
        previous = levels[-1].shape if levels else shape
        if data.shape[2] != shape[2] or not all(
            a < b for a, b in zip(data.shape[:2], previous[:2], strict=True)
        ):
            return levels  # not a pyramid napari can use (each level smaller)
        levels.append(data)


def _store_layers(arr: xr.DataArray, name: str, path: Path) -> list[LayerData]:
    source = _source_layer(arr, name)
    return ([source] if source else []) + [_features_layer(arr, name, path)]


def _rgb_block(block: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    scaled = (block - lo[:, None, None]) / np.maximum(hi - lo, 1e-12)[:, None, None]
    scaled = np.where(np.isfinite(scaled), scaled, 0.0)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def _open_array(path: Path, var: str) -> xr.DataArray:
    """``path``'s variable ``var`` as a dask array, its (small) coordinates in memory."""
    arr = xr.open_zarr(path, consolidated=False, zarr_format=3)[var]
    # xarray opens the non-index coordinates (y_phys, x_phys) as dask arrays too; read them
    # without dask (opening computes nothing), from a second, dask-free opening
    lazy = [n for n, c in arr.coords.items() if n not in arr.indexes and c.chunks is not None]
    if lazy:
        plain = xr.open_zarr(path, consolidated=False, zarr_format=3, chunks=None)
        arr = arr.assign_coords({n: plain[n].variable.load() for n in lazy})
    return arr


def _read_pca(path: Path) -> list[LayerData]:
    arr = _open_array(path, "pca")
    name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    meta = _meta("pca", path, arr)
    place = _placement(arr, drop="component")
    lo, hi = arr.attrs.get("lo"), arr.attrs.get("hi")
    if arr.sizes["component"] >= 3 and lo is not None and hi is not None:
        lo3, hi3 = np.asarray(lo[:3], np.float64), np.asarray(hi[:3], np.float64)
        data = arr.data[:3].rechunk({0: 3}).map_blocks(_rgb_block, lo3, hi3, dtype=np.uint8)
        kwargs = {"name": f"{name} (RGB)", "rgb": True, "metadata": meta, **place}
        return [(data.transpose(1, 2, 0), kwargs, "image")]
    kwargs = {"name": f"{name} component 0", "metadata": meta, **place}
    return [(arr.data[0], kwargs, "image")]


def _read_ome(path: Path) -> list[LayerData]:
    attrs = _json(path / ".zattrs") or {}
    ms = attrs["multiscales"][0]
    axes = [a["name"] for a in ms.get("axes", [])]
    levels = [da.from_zarr(str(path / d["path"])) for d in ms["datasets"]]
    meta = _meta("ome", path, None)
    rgb = axes[:1] == ["c"] and levels[0].shape[0] == 3
    if rgb:
        levels = [lv.transpose(1, 2, 0) for lv in levels]
    name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    kwargs: dict[str, Any] = {"name": name, "rgb": rgb, "metadata": meta}
    if len(levels) > 1:
        kwargs["multiscale"] = True
    sibling = path.parent / "pca.zarr"
    if path.name == _PCA_OME and path_kind(sibling) == "pca":
        placed = _open_array(sibling, "pca")
        scale, translate = grid_placement(placed["y"].values, placed["x"].values)
        kwargs.update(scale=scale, translate=translate)
        meta.update(_meta("ome", path, placed))
    else:
        meta["placed"] = "output cells (no pca.zarr beside it to place it on the source)"
        kwargs["name"] = f"{name} (output cells)"
    return [(levels if len(levels) > 1 else levels[0], kwargs, "image")]


def _read_array(path: Path, kind: str) -> list[LayerData]:
    var = _array_var(path)
    assert var is not None  # path_kind said so
    arr = _open_array(path, var)
    dims = [d for d in arr.dims if d not in ("y", "x")] + ["y", "x"]
    arr = arr.transpose(*dims)
    name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    kwargs: dict[str, Any] = {
        "name": name,
        "metadata": _meta(kind, path, arr),
        **_placement(arr),
    }
    if kind == "labels":
        return [(arr.data, kwargs, "labels")]
    if kind == "similarity":
        kwargs.update(colormap="inferno", contrast_limits=(0.0, 1.0))
    return [(arr.data, kwargs, "image")]


def read_path(path: str | os.PathLike, *, physical: bool | None = None) -> list[LayerData]:
    """The napari layer-data tuples of a store or an output (see the module docstring); a layer
    above :data:`MULTISCALE_PX` cells is a lazy :func:`pyramid`.

    ``physical``: place the layers in the source's physical units (:func:`in_physical_units`)
    instead of source pixels; None: as :data:`UNITS_ENV` says (pixels if unset).

    Raises
    ------
    StoreError
        ``path`` is none of them, or a store that cannot be opened (its one-line message).
    """
    layers = [_multiscale(layer) for layer in _read_layers(Path(path))]
    return _units(layers, physical)


def _units(layers: list[LayerData], physical: bool | None) -> list[LayerData]:
    if physical is None:
        physical = _physical_default()
    return [in_physical_units(layer) for layer in layers] if physical else layers


def _read_layers(p: Path) -> list[LayerData]:
    kind = path_kind(p)
    if kind == "features":
        return _store_layers(open_features(p), p.name, p)
    if kind == "collection":
        tree = open_collection(p)
        return [
            layer
            for key, node in tree.children.items()
            for layer in _store_layers(_member(node), key, p / key)
        ]
    if kind == "ome":
        return _read_ome(p)
    if kind == "pca":
        return _read_pca(p)
    if kind in ("labels", "similarity", "array"):
        return _read_array(p, kind)
    raise StoreError(
        f"{str(p)!r} is not a feature store, a collection or an analysis output of hrdv2-dask."
    )


def read_stack(path: str | os.PathLike, *, physical: bool | None = None) -> list[LayerData]:
    """A collection as one image layer: its members' feature means stacked on a first axis
    (in the table's order), for members that share one grid; ``physical`` as in
    :func:`read_path` (the first member's pixel size).

    Raises
    ------
    StoreError
        ``path`` is not a collection, or its members' grids differ (open it as separate layers).
    """
    p = Path(path)
    if path_kind(p) != "collection":
        raise StoreError(f"{str(p)!r} is not a collection store; open it as separate layers.")
    members = {key: _member(node) for key, node in open_collection(p).children.items()}
    if not members:
        raise StoreError(f"Collection {str(p)!r} has no finished member to show.")
    grids = {
        key: (arr["y"].values.tolist(), arr["x"].values.tolist()) for key, arr in members.items()
    }
    first_key, first = next(iter(grids.items()))
    other = next((k for k, g in grids.items() if g != first), None)
    if other is not None:
        raise StoreError(
            f"Collection {str(p)!r} cannot open as a stack: member {other!r} is "
            f"{members[other].shape[1:]} output cells, {first_key!r} is "
            f"{members[first_key].shape[1:]}; open it as separate layers (the other reader)."
        )
    arr = members[first_key]
    data = da.stack([_features_layer(a, k, p / k)[0] for k, a in members.items()])
    place = _placement(arr, drop="feature")
    kwargs = {
        "name": f"{p.name}: {len(members)} members, mean of {arr.sizes['feature']} features",
        "metadata": _meta("stack", p, arr, members=list(members)),
        "scale": (1.0, *place["scale"]),
        "translate": (0.0, *place["translate"]),
    }
    return _units([_multiscale((data, kwargs, "image"))], physical)


def napari_get_stack_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 ``get_reader`` hook of the second reader: :func:`read_stack` for a collection."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if path_kind(path) != "collection":
        return None
    return lambda p, **_: read_stack(p[0] if isinstance(p, list) else p)


def _member(node: xr.DataTree) -> xr.DataArray:
    return node.dataset["features"]


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 ``get_reader`` hook: :func:`read_path` when ``path`` is ours, else None."""
    return _reader_of(path, physical=None)


def napari_get_physical_reader(
    path: str | list[str],
) -> Callable[[Any], list[LayerData]] | None:
    """npe2 ``get_reader`` hook of the third reader: :func:`read_path` in physical units, for
    paths of ours whose source has a pixel size (so that the others open without a choice)."""
    one = path[0] if isinstance(path, list) and len(path) == 1 else path
    if isinstance(one, list) or not has_pixel_size(one):
        return None
    return _reader_of(path, physical=True)


def has_pixel_size(path: str | os.PathLike) -> bool:
    """Whether ``path`` is ours and its source has a pixel size (reads metadata files only)."""
    p = Path(path)
    kind = path_kind(p)
    if kind == "features":
        attrs = ((_json(p / "zarr.json") or {}).get("attributes") or {}).get(ATTR) or {}
        source = (attrs.get("provenance") or {}).get("source") or {}
        return bool(source.get("pixel_size"))
    if kind == "collection":
        return any(has_pixel_size(m) for m in sorted(p.iterdir()) if m.is_dir())
    if kind == "ome":
        if p.name != _PCA_OME:
            return False
        p = p.parent / "pca.zarr"
        kind = path_kind(p)
    return kind is not None and (p / "y_phys" / "zarr.json").is_file()


def _reader_of(path: str | list[str], *, physical: bool | None):
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if path_kind(path) is None:
        return None
    return lambda p, **_: read_path(p[0] if isinstance(p, list) else p, physical=physical)
