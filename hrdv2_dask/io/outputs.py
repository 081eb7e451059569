"""Write analysis results: Zarr v3 arrays, OME-Zarr pyramids and PNG previews.

All writers take lazy (dask-backed) :class:`xarray.DataArray` results, such as those of
:mod:`hrdv2_dask.analysis`, and compute them chunk by chunk while writing; only a PNG preview
(at most ``max_side`` pixels per side) is ever held in memory whole.

* :func:`write_array` / :func:`write_labels`: a Zarr v3 group holding one variable with its
  dims, ``y``/``x`` coordinates and attributes (read it back with
  ``xarray.open_zarr(path, consolidated=False)``).
* :func:`write_ome_pyramid`: an OME-Zarr image, NGFF 0.4 on Zarr v2 (the version napari and
  most viewers read), levels ``0, 1, ...`` each a 2x2 mean of the previous one.
* :func:`write_png`: a downsampled preview; integer ``(y, x)`` images are labels and are
  coloured with :data:`LABEL_PALETTE`.
* :func:`write_json`: a JSON summary.

Every writer writes into a hidden sibling (``.NAME.partial-XXXX``) and renames it into place
once it is complete (:func:`staged`), so an output that exists is finished: a run that fails
(no space, read-only, a damaged input) leaves the previous output, or none, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import ConfigError, InputError, StoreError

__all__ = [
    "LABEL_PALETTE",
    "PALETTE",
    "staged",
    "write_array",
    "write_json",
    "write_labels",
    "write_ome_pyramid",
    "write_png",
]

log = logging.getLogger(__name__)

#: 20 RGB colours for label images; label ``v`` gets ``LABEL_PALETTE[v % 20]``. Label 0 (the
#: largest k-means cluster, or unlabelled / no data for a segmentation) is black.
LABEL_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (219, 219, 141),
    (158, 218, 229),
)

#: Alias of :data:`LABEL_PALETTE`.
PALETTE = LABEL_PALETTE

OME_VERSION = "0.4"
_MIN_LEVEL_PX = 256
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


_PARTIAL = ".partial-"


def _check_target(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` as a Path, or a StoreError when it exists and may not be replaced."""
    target = Path(path)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise StoreError(
                f"Output {str(target)!r} already exists; pass overwrite=True to replace it or "
                "choose a new path."
            )
        if target.is_dir() and any(target.iterdir()):
            if not any((target / m).exists() for m in _ZARR_MARKERS):
                raise StoreError(
                    f"Output {str(target)!r} is a non-empty folder that is not a Zarr store; "
                    "refusing to delete it even with overwrite=True. Choose a new path."
                )
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def staged(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Write an output under a temporary sibling and rename it to ``path`` once complete.

    The body writes the file or folder at the yielded path (``.NAME.partial-XXXX`` beside
    ``path``). When it returns, an old ``path`` is moved aside, the new output renamed into
    place (one ``rename``, atomic on one file system) and the old one deleted; when it raises,
    the partial output is deleted and ``path`` is left as it was. Partial outputs of earlier
    runs that were killed are deleted first.

    Parameters
    ----------
    path : str or os.PathLike
        The finished output (a file or a folder).
    overwrite : bool, optional
        Replace an existing ``path``; otherwise an existing one is a :class:`StoreError`
        (raised before anything is written).

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "a.txt"
    >>> with staged(out) as tmp:
    ...     _ = tmp.write_text("done")
    >>> out.read_text(), sorted(p.name for p in out.parent.iterdir())
    ('done', ['a.txt'])
    """
    target = _check_target(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}{_PARTIAL}*"):
        _remove(leftover)  # from a run that was killed before it could clean up
    tmp = target.parent / f".{target.name}{_PARTIAL}{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        old = None
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}{_PARTIAL}old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
    except BaseException:
        _remove(tmp)
        raise
    if old is not None:
        _remove(old)


def _check_dataarray(arr: Any, what: str) -> xr.DataArray:
    if not isinstance(arr, xr.DataArray):
        raise InputError(
            f"{what} must be an xarray.DataArray, got {type(arr).__name__}; wrap arrays with "
            "xr.DataArray(data, dims=('y', 'x'))."
        )
    if "y" not in arr.dims or "x" not in arr.dims:
        raise InputError(f"{what} must have dims 'y' and 'x', got {arr.dims}.")
    return arr


def _regular_chunks(data: da.Array) -> da.Array:
    """Rechunk so every chunk but the last of each axis has the same size (Zarr's grid)."""
    regular = all(len(set(c[:-1])) <= 1 and c[-1] <= c[0] for c in data.chunks)
    return data if regular else data.rechunk(tuple(c[0] for c in data.chunks))


def _as_dask(arr: xr.DataArray) -> da.Array:
    data = arr.data
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks="auto")
    return data


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float means to ``dtype``: integers are rounded (halves to even), clipped, NaN -> 0."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.rint(np.nan_to_num(values, nan=0.0)), info.min, info.max)
    elif dtype == np.bool_:
        values = np.nan_to_num(values, nan=0.0) >= 0.5
    return values.astype(dtype)


def _block_mean(block: np.ndarray, *, factor: int, axis: int, out_dtype: np.dtype) -> np.ndarray:
    """Mean over ``factor x factor`` windows of axes ``axis, axis + 1`` (ceil size).

    Windows cut by the block's far edges average the pixels they hold; NaN is ignored.

    Examples
    --------
    >>> _block_mean(np.arange(9.0).reshape(3, 3), factor=2, axis=0, out_dtype=np.dtype("f8"))
    array([[2. , 3.5],
           [6.5, 8. ]])
    """
    b = block.astype(np.float64)
    pad = [(0, 0)] * b.ndim
    pad[axis] = (0, -b.shape[axis] % factor)
    pad[axis + 1] = (0, -b.shape[axis + 1] % factor)
    b = np.pad(b, pad, constant_values=np.nan)
    shape = (
        b.shape[:axis]
        + (b.shape[axis] // factor, factor, b.shape[axis + 1] // factor, factor)
        + b.shape[axis + 2 :]
    )
    b = b.reshape(shape)
    finite = np.isfinite(b)
    total = np.where(finite, b, 0.0).sum(axis=(axis + 1, axis + 3))
    count = finite.sum(axis=(axis + 1, axis + 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    return _cast(mean, np.dtype(out_dtype))


def _coarsen_mean(data: da.Array, factor: int, *, axis: int, dtype: Any) -> da.Array:
    """Lazy ``factor x factor`` mean over axes ``axis, axis + 1``; output size ``ceil(n / f)``."""
    if factor == 1:
        return data.astype(dtype)
    target = {}
    for ax in (axis, axis + 1):
        target[ax] = max(factor, (data.chunks[ax][0] // factor) * factor)
    data = data.rechunk(target)
    chunks = list(data.chunks)
    for ax in (axis, axis + 1):
        chunks[ax] = tuple(-(-c // factor) for c in data.chunks[ax])
    dtype = np.dtype(dtype)
    return data.map_blocks(
        _block_mean,
        factor=factor,
        axis=axis,
        out_dtype=dtype,
        dtype=dtype,
        chunks=tuple(chunks),
        meta=np.empty((0,) * data.ndim, dtype),
    )


# ---------------------------------------------------------------------------------------------
# Zarr v3 arrays
# ---------------------------------------------------------------------------------------------


def write_array(
    arr: xr.DataArray,
    path: str | os.PathLike,
    *,
    attrs: Mapping[str, Any] | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a (lazy) DataArray to a Zarr v3 group, chunk by chunk.

    The group holds one variable (``name``, else ``arr.name``, else ``"data"``) with the
    array's dims as Zarr ``dimension_names``, its coordinates, and ``arr.attrs`` updated with
    ``attrs`` (made JSON-safe). Chunks follow the dask chunks (made regular if needed).

    Parameters
    ----------
    arr : xarray.DataArray
        Any array; dask-backed arrays are computed chunk by chunk while written.
    path : str or os.PathLike
        Folder of the new store.
    attrs : mapping, optional
        Extra attributes recorded on the variable (e.g. the model or settings used).
    name : str, optional
        Variable name inside the group.
    overwrite : bool, optional
        Replace an existing ``path``.

    Returns
    -------
    pathlib.Path
        ``path``; read it back with ``xarray.open_zarr(path, consolidated=False)[name]``.

    Raises
    ------
    StoreError
        ``path`` exists and ``overwrite`` is False.
    """
    if not isinstance(arr, xr.DataArray):
        raise InputError(f"arr must be an xarray.DataArray, got {type(arr).__name__}.")
    var = name or (str(arr.name) if arr.name is not None else "data")
    data = _regular_chunks(_as_dask(arr))
    out = arr.copy(data=data)
    out.attrs = _jsonable({**arr.attrs, **(attrs or {})})
    out.encoding = {}
    ds = out.to_dataset(name=var)
    for coord in ds.coords.values():
        coord.encoding = {}
    with staged(path, overwrite=overwrite) as tmp:
        ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, compute=True)
    log.info("wrote %s %s %s to %s", var, dict(arr.sizes), arr.dtype, path)
    return Path(path)


def write_labels(
    arr: xr.DataArray,
    path: str | os.PathLike,
    *,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a ``(y, x)`` integer label image to a Zarr v3 group (variable ``"labels"``).

    Same layout as :func:`write_array`; the attributes also record ``kind: "labels"``.

    Raises
    ------
    InputError
        ``arr`` is not 2-D ``(y, x)`` with an integer dtype.
    """
    arr = _check_dataarray(arr, "labels")
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(
            f"labels must be a 2-D (y, x) integer array, got dims {arr.dims} and dtype "
            f"{arr.dtype}; use write_array for other arrays."
        )
    return write_array(
        arr.transpose("y", "x"),
        path,
        attrs={"kind": "labels", **(attrs or {})},
        name="labels",
        overwrite=overwrite,
    )


# ---------------------------------------------------------------------------------------------
# OME-Zarr pyramid
# ---------------------------------------------------------------------------------------------


def _n_levels(shape: tuple[int, int]) -> int:
    """Levels until the largest side is below 256 px (level 0 included).

    Examples
    --------
    >>> _n_levels((200, 100)), _n_levels((256, 10)), _n_levels((1000, 600))
    (1, 2, 3)
    """
    n, side = 1, max(shape)
    while side >= _MIN_LEVEL_PX:
        side = -(-side // 2)
        n += 1
    return n


def _omero(n_channels: int, dtype: np.dtype) -> dict[str, Any]:
    colours = ["FF0000", "00FF00", "0000FF"] if n_channels == 3 else ["FFFFFF"] * n_channels
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        window = {"start": 0, "end": int(info.max), "min": int(info.min), "max": int(info.max)}
    else:
        window = {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}
    return {
        "channels": [
            {"label": f"c{i}", "color": colours[i], "window": window, "active": True}
            for i in range(n_channels)
        ],
        "rdefs": {"model": "color"},
    }


def write_ome_pyramid(
    rgb: xr.DataArray,
    path: str | os.PathLike,
    *,
    levels: int | None = None,
    chunk_px: int = 512,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an image as an OME-Zarr multiscale pyramid (NGFF 0.4 on Zarr v2).

    Level 0 is the full-resolution image; level ``i + 1`` is the 2x2 mean of level ``i``, of
    size ``ceil(n / 2)`` per axis (windows cut by an odd edge average the 1 or 2 pixels they
    hold; integer images are rounded, halves to even). Each level is written before the next is
    read back from disk, so the input is computed once. Arrays are ``(c, y, x)`` with axes
    ``c`` (channel), ``y``, ``x`` (space); level ``i`` has the scale ``(1, 2**i, 2**i)`` and the
    translation ``(0, (2**i - 1) / 2, (2**i - 1) / 2)`` in level-0 pixels (cells of the input
    grid). An ``omero`` block shows 3-channel images as RGB in napari.

    Parameters
    ----------
    rgb : xarray.DataArray
        ``(y, x, c)`` (any channel dim name, or ``(y, x)`` for one channel), typically
        :func:`hrdv2_dask.analysis.pca_rgb`. Dask-backed arrays are computed chunk by chunk.
    path : str or os.PathLike
        Folder of the new OME-Zarr group (e.g. ``pca.ome.zarr``).
    levels : int, optional
        Number of levels; by default, levels are added until the largest side is below 256 px.
    chunk_px : int, optional
        Even ``(y, x)`` chunk size of every level; channels are one chunk.
    name : str, optional
        ``multiscales`` name; defaults to the folder name.
    overwrite : bool, optional
        Replace an existing ``path``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import numcodecs
    import zarr

    rgb = _check_dataarray(rgb, "rgb")
    if rgb.ndim == 2:
        rgb = rgb.expand_dims("c", axis=-1)
    if rgb.ndim != 3:
        raise InputError(f"rgb must be (y, x, c) or (y, x), got dims {rgb.dims}.")
    channel_dim = next(d for d in rgb.dims if d not in ("y", "x"))
    rgb = rgb.transpose(channel_dim, "y", "x")
    if levels is None:
        n_levels = _n_levels(rgb.shape[1:])
    else:
        if isinstance(levels, bool) or not isinstance(levels, int | np.integer) or levels < 1:
            raise ConfigError(f"levels must be an int >= 1 or None (automatic), got {levels!r}.")
        n_levels = int(levels)
    if isinstance(chunk_px, bool) or not isinstance(chunk_px, int | np.integer):
        raise ConfigError(f"chunk_px must be an even int >= 2, got {chunk_px!r}; e.g. 512.")
    if chunk_px < 2 or chunk_px % 2:
        raise ConfigError(f"chunk_px must be an even int >= 2, got {chunk_px!r}; e.g. 512.")
    with staged(path, overwrite=overwrite) as tmp:
        dtype = np.dtype(rgb.dtype)
        n_channels = rgb.shape[0]
        root = zarr.open_group(str(tmp), mode="w-", zarr_format=2)
        compressor = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
        datasets = []
        source = _as_dask(rgb).rechunk((n_channels, chunk_px, chunk_px))
        for level in range(n_levels):
            if level:
                previous = da.from_zarr(
                    root[str(level - 1)], chunks=(n_channels, *(2 * chunk_px,) * 2)
                )
                source = _coarsen_mean(previous, 2, axis=1, dtype=dtype)
            array = root.create_array(
                str(level),
                shape=source.shape,
                chunks=(n_channels, chunk_px, chunk_px),
                dtype=dtype,
                compressors=compressor,
                chunk_key_encoding={"name": "v2", "separator": "/"},
                fill_value=0,
            )
            da.store(_regular_chunks(source).rechunk(array.chunks), array, lock=False)
            factor = float(2**level)
            shift = (factor - 1) / 2
            datasets.append(
                {
                    "path": str(level),
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1.0, factor, factor]},
                        {"type": "translation", "translation": [0.0, shift, shift]},
                    ],
                }
            )
            log.info("OME-Zarr level %d: %s", level, source.shape)
        root.attrs["multiscales"] = [
            {
                "version": OME_VERSION,
                "name": name or Path(path).name,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space"},
                    {"name": "x", "type": "space"},
                ],
                "datasets": datasets,
                "type": "mean",
                "metadata": {
                    "description": "2x2 mean of the previous level, size ceil(n / 2)",
                    "method": "hrdv2_dask.io.outputs.write_ome_pyramid",
                },
            }
        ]
        root.attrs["omero"] = _omero(n_channels, dtype)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------


def _palette_array(palette: Sequence[Sequence[int]] | None) -> np.ndarray:
    colours = np.asarray(LABEL_PALETTE if palette is None else palette)
    if colours.ndim != 2 or colours.shape[1] != 3 or len(colours) == 0:
        raise ConfigError(
            f"palette must be a list of (r, g, b) triples, got shape {colours.shape}; e.g. "
            "LABEL_PALETTE."
        )
    if not np.issubdtype(colours.dtype, np.number) or colours.min() < 0 or colours.max() > 255:
        raise ConfigError("palette colours must be integers in 0..255.")
    return colours.astype(np.uint8)


def _to_uint8(values: np.ndarray, vmin: float | None, vmax: float | None) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if vmin is None or vmax is None:
        lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        vmin = float(lo) if vmin is None else vmin
        vmax = float(hi) if vmax is None else vmax
    scaled = (values - vmin) / max(vmax - vmin, 1e-12)
    scaled = np.where(np.isfinite(scaled), scaled, 0.0)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def write_png(
    img: xr.DataArray,
    path: str | os.PathLike,
    *,
    max_side: int = 2048,
    palette: Sequence[Sequence[int]] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Write a downsampled PNG preview of a (lazy) image.

    The image is reduced by the smallest integer factor ``f`` that brings its longest side to
    at most ``max_side`` (output size ``ceil(n / f)``): labels by taking every ``f``-th cell,
    other images by the mean of ``f x f`` windows, both lazily; only the preview is computed.

    * ``(y, x)`` integer images (any ``(y, x)`` image when ``palette`` is given) are labels:
      label ``v`` gets ``palette[v % len(palette)]`` (default :data:`LABEL_PALETTE`).
    * ``(y, x, 3|4)`` uint8 images are written as RGB(A) as they are.
    * Other images (float, or one channel) are mapped linearly from ``[vmin, vmax]`` (default:
      1st and 99th percentiles of the preview) to 0..255; NaN is black.

    Parameters
    ----------
    img : xarray.DataArray
        ``(y, x)`` or ``(y, x, c)`` with ``c`` in 1, 3, 4 (the channel dim may have any name).
    path : str or os.PathLike
        PNG file to write (parent folders are created; an existing file is replaced).
    max_side : int, optional
        Longest side of the PNG in pixels.
    palette : sequence of (int, int, int), optional
        Colours for label images.
    vmin, vmax : float, optional
        Display range of non-label images.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from PIL import Image

    img = _check_dataarray(img, "img")
    if isinstance(max_side, bool) or not isinstance(max_side, int | np.integer) or max_side < 1:
        raise ConfigError(f"max_side must be an int >= 1, got {max_side!r}; e.g. 2048.")
    extra = [d for d in img.dims if d not in ("y", "x")]
    if len(extra) > 1 or (extra and img.sizes[extra[0]] not in (1, 3, 4)):
        raise InputError(
            f"img must be (y, x) or (y, x, c) with 1, 3 or 4 channels, got sizes "
            f"{dict(img.sizes)}; use pca_rgb for PCA projections or pick channels first."
        )
    img = img.transpose("y", "x", *extra)
    data = _as_dask(img)
    is_labels = not extra and (np.issubdtype(img.dtype, np.integer) or palette is not None)
    factor = max(1, math.ceil(max(img.shape[:2]) / max_side))
    if is_labels:
        small = np.asarray(data[::factor, ::factor].compute())
        colours = _palette_array(palette)
        pixels = colours[np.mod(small.astype(np.int64), len(colours))]
    else:
        rgb_uint8 = img.dtype == np.uint8 and bool(extra) and img.sizes[extra[0]] in (3, 4)
        small = np.asarray(_coarsen_mean(data, factor, axis=0, dtype=np.float64).compute())
        if rgb_uint8:
            pixels = _cast(small, np.dtype(np.uint8))
        else:
            pixels = _to_uint8(small, vmin, vmax)
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[..., 0]
    with staged(path) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG")
    log.info("wrote PNG %s (%d x %d, factor %d)", path, pixels.shape[1], pixels.shape[0], factor)
    return Path(path)


def write_json(value: Any, path: str | os.PathLike) -> Path:
    """Write ``value`` as indented JSON (numpy scalars and arrays as numbers and lists; other
    objects as their ``str``); an existing file is replaced once the new one is complete.

    >>> import tempfile
    >>> p = write_json({"k": np.int64(3)}, Path(tempfile.mkdtemp()) / "summary.json")
    >>> json.loads(p.read_text())
    {'k': 3}
    """
    text = json.dumps(value, indent=2, default=_json_default)
    with staged(path) as tmp:
        tmp.write_text(text)
    return Path(path)
