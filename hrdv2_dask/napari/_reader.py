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

__all__ = [
    "LayerData",
    "grid_placement",
    "napari_get_reader",
    "napari_get_stack_reader",
    "path_kind",
    "read_path",
    "read_stack",
]

#: napari's layer-data tuple: ``(data, kwargs, layer_type)``.
LayerData = tuple[Any, dict[str, Any], str]

log = logging.getLogger(__name__)

#: Layers whose largest side is above this many cells open as a lazy pyramid (napari draws a
#: level near the screen's resolution instead of the whole array).
MULTISCALE_PX = 4096
_PCA_OME = "pca.ome.zarr"
_OME_METHOD = "hrdv2_dask.io.outputs.write_ome_pyramid"  # its multiscales metadata


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


def _placement(arr: xr.DataArray) -> dict[str, Any]:
    scale, translate = grid_placement(arr["y"].values, arr["x"].values, arr.attrs.get("out_stride"))
    extra = arr.ndim - 2  # leading axes (channels, components) are not placed
    return {"scale": (1.0,) * extra + scale, "translate": (0.0,) * extra + translate}


def pyramid(data: da.Array, *, labels: bool = False) -> list[da.Array]:
    """``data`` and its 2x-smaller versions (lazy), down to :data:`MULTISCALE_PX` cells.

    Levels of ``(y, x)`` or ``(..., y, x)`` arrays, and of RGB ``(y, x, c)`` ``uint8``
    arrays (the ``y``/``x`` axes are found by the dtype), are 2x2 means (rounded for
    integers), except label images, which take every other cell (a mean of labels is no
    label). A side of odd length drops its last cell.

    Examples
    --------
    >>> [lv.shape for lv in pyramid(da.zeros((9000, 5000), chunks=1000))]
    [(9000, 5000), (4500, 2500), (2250, 1250)]
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
    return levels


def _multiscale(layer: LayerData) -> LayerData:
    """``layer`` with a pyramid for data above :data:`MULTISCALE_PX` (placement unchanged)."""
    data, kwargs, kind = layer
    if isinstance(data, list):
        return layer
    levels = pyramid(data, labels=kind == "labels")
    if len(levels) == 1:
        return layer
    return levels, {**kwargs, "multiscale": True}, kind


def _features_layer(arr: xr.DataArray, name: str, path: Path) -> LayerData:
    mean = arr.data.mean(axis=0)  # the feature axis is one chunk: one task per (y, x) chunk
    kwargs = {
        "name": f"{name}: mean of {arr.sizes['feature']} features",
        "metadata": {"hrdv2_kind": "features", "path": str(path)},
        **_placement(arr.isel(feature=0)),
    }
    return mean, kwargs, "image"


def _source_layer(arr: xr.DataArray, name: str) -> LayerData | None:
    """The store's source image (lazy, in source pixels), when its file is still readable."""
    src = arr.attrs.get("source") or {}
    path = src.get("path")
    if not path or not Path(path).exists():
        return None
    try:
        data, _ = open_image(path, level=int(src.get("level") or 0))
    except Hrdv2Error as err:
        log.warning("source of %s not shown: %s", name, err)
        return None
    shape = src.get("shape")
    if shape and list(data.shape[:2]) != list(shape[:2]):
        log.warning("source of %s not shown: %s is %s now, not %s", name, path, data.shape, shape)
        return None
    kwargs: dict[str, Any] = {
        "name": f"{name}: source {Path(path).name}",
        "metadata": {"hrdv2_kind": "source", "path": str(path)},
    }
    if data.shape[2] in (3, 4) and data.dtype == np.uint8:
        kwargs["rgb"] = True
    else:
        data = data[..., 0]
    return data, kwargs, "image"


def _store_layers(arr: xr.DataArray, name: str, path: Path) -> list[LayerData]:
    source = _source_layer(arr, name)
    return ([source] if source else []) + [_features_layer(arr, name, path)]


def _rgb_block(block: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    scaled = (block - lo[:, None, None]) / np.maximum(hi - lo, 1e-12)[:, None, None]
    scaled = np.where(np.isfinite(scaled), scaled, 0.0)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def _open_array(path: Path, var: str) -> xr.DataArray:
    return xr.open_zarr(path, consolidated=False, zarr_format=3)[var]


def _read_pca(path: Path) -> list[LayerData]:
    arr = _open_array(path, "pca")
    name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    meta = {"hrdv2_kind": "pca", "path": str(path)}
    place = _placement(arr.isel(component=0))
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
    meta = {"hrdv2_kind": "ome", "path": str(path)}
    rgb = axes[:1] == ["c"] and levels[0].shape[0] == 3
    if rgb:
        levels = [lv.transpose(1, 2, 0) for lv in levels]
    name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    kwargs: dict[str, Any] = {"name": name, "rgb": rgb, "metadata": meta}
    if len(levels) > 1:
        kwargs["multiscale"] = True
    sibling = path.parent / "pca.zarr"
    if path.name == _PCA_OME and path_kind(sibling) == "pca":
        scale, translate = grid_placement(
            *(_open_array(sibling, "pca")[d].values for d in ("y", "x"))
        )
        kwargs.update(scale=scale, translate=translate)
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
        "metadata": {"hrdv2_kind": kind, "path": str(path)},
        **_placement(arr),
    }
    if kind == "labels":
        return [(arr.data, kwargs, "labels")]
    if kind == "similarity":
        kwargs.update(colormap="inferno", contrast_limits=(0.0, 1.0))
    return [(arr.data, kwargs, "image")]


def read_path(path: str | os.PathLike) -> list[LayerData]:
    """The napari layer-data tuples of a store or an output (see the module docstring); a layer
    above :data:`MULTISCALE_PX` cells is a lazy :func:`pyramid`.

    Raises
    ------
    StoreError
        ``path`` is none of them, or a store that cannot be opened (its one-line message).
    """
    return [_multiscale(layer) for layer in _read_layers(Path(path))]


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


def read_stack(path: str | os.PathLike) -> list[LayerData]:
    """A collection as one image layer: its members' feature means stacked on a first axis
    (in the table's order), for members that share one grid.

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
    place = _placement(arr.isel(feature=0))
    kwargs = {
        "name": f"{p.name}: {len(members)} members, mean of {arr.sizes['feature']} features",
        "metadata": {"hrdv2_kind": "stack", "path": str(p), "members": list(members)},
        "scale": (1.0, *place["scale"]),
        "translate": (0.0, *place["translate"]),
    }
    return [_multiscale((data, kwargs, "image"))]


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
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if path_kind(path) is None:
        return None
    return lambda p, **_: read_path(p[0] if isinstance(p, list) else p)
