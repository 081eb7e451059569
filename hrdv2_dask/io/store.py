"""Feature stores: Zarr v3 groups holding a ``(feature, y, x)`` array and run bookkeeping.

Layout of a store::

    store.zarr/
      features        (feature, y, x) array, dims named, compressed chunks
      _run/done       (block_y, block_x) uint8: 1 once a block's chunks and halo strips are written
      _run/halo_*     float32 halo strips passed between neighbouring blocks (for resume;
                      uncompressed, like _run/done: block tasks write their chunks as files)
      _run/token_bias the positional artefact subtracted from every window (with ``debias``)
      y, x            pixel centres of the output cells (written when the run completes)
      y_phys, x_phys  the same in physical units, where the source has a pixel size

The group attribute ``hrdv2`` holds the settings and provenance of the run; ``complete`` is set
to ``true`` last, and :func:`open_features` refuses a store without it. A complete store also
holds what plain xarray reads: the coordinate arrays, the settings and provenance as the
``features`` array's attributes, and consolidated metadata, so that ``xarray.open_zarr(store)``
gives the array :func:`open_features` gives, without a warning.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.array.core import normalize_chunks
from zarr.codecs import BloscCodec
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync

from ..errors import IncompleteStoreError, StoreError, StoreReadError
from .lock import LOCK_NAME
from .nodes import (
    array_node,
    group_metadata,
    is_plain,
    read_attributes,
    read_metadata,
    write_document,
    write_plain_chunk,
    write_plain_chunks,
)

__all__ = [
    "FEATURES",
    "BlockWriter",
    "RunStore",
    "StoreChunks",
    "feature_attrs",
    "feature_coords",
    "is_consolidated",
    "open_features",
    "publish_metadata",
]

log = logging.getLogger(__name__)

FEATURES = "features"
RUN = "_run"
ATTR = "hrdv2"
# lz4 rather than zstd: a full-resolution window of 384 float16 channels is 145 MB, and zstd
# (level 3) encodes ~100 MB/s per core against ~640 MB/s for lz4, for a ratio of 1.45 vs 1.25
# (measured on feature chunks, benchmarks/RESULTS.md): with zstd the writer, not the model,
# would set the pace.
_COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _check_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise StoreError(
            f"Output {str(path)!r} is an existing file, not a Zarr store. Choose another path "
            "(e.g. features.zarr)."
        )
    entries = [p for p in path.iterdir() if p.name != LOCK_NAME] if path.is_dir() else []
    if entries and not (path / "zarr.json").exists():
        raise StoreError(
            f"Output {str(path)!r} is a non-empty folder that is not a Zarr store; refusing to "
            "write into it. Choose a new path."
        )


class RunStore:
    """Check, create, resume and finish the store of one extraction run.

    Constructing one only reads: it checks ``path`` and an existing store's settings, so that a
    run that fails before :meth:`create` (an unreachable scheduler, a failed estimate) leaves
    nothing behind, not even a replaced store.

    Parameters
    ----------
    path : str or os.PathLike
        Folder of the Zarr v3 store.
    settings : dict
        Everything that determines the output values (model, weights, transforms, tiling,
        output stride, dtype, intensity mapping, source shape). A store made with other settings
        is refused unless ``overwrite``.
    overwrite : bool, optional
        Replace an existing store (at :meth:`create`) instead of resuming or refusing it.
    """

    def __init__(
        self, path: str | os.PathLike, *, settings: dict[str, Any], overwrite: bool = False
    ) -> None:
        self.path = Path(path)
        self.settings = _jsonable(settings)
        self.overwrite = overwrite
        _check_target(self.path)
        self.resumed = False
        self._group: zarr.Group | None = None
        self._written = False  # by create(): the group is opened when first needed
        existing = self._existing_settings()
        if existing is None or overwrite:
            return
        if existing != self.settings:
            diff = sorted(
                k
                for k in set(existing) | set(self.settings)
                if existing.get(k) != self.settings.get(k)
            )
            raise StoreError(
                f"Store {str(self.path)!r} was made with other settings (differs in: "
                f"{', '.join(diff)}). Use overwrite=True (CLI: --overwrite) to replace it, "
                "or write to a new path."
            )
        group = zarr.open_group(self.path, mode="r+", zarr_format=3)
        if not group.attrs[ATTR].get("complete") and not _created(group):
            log.warning("%s was interrupted while being created; creating it again", self.path)
            self.overwrite = True  # nothing in it to keep
            return
        self.resumed = True
        self._group = group

    @property
    def group(self) -> zarr.Group | None:
        """The store's Zarr group (None before :meth:`create` of a new store)."""
        if self._group is None and self._written:
            self._group = zarr.open_group(self.path, mode="r+", zarr_format=3)
        return self._group

    @property
    def provenance(self) -> dict[str, Any]:
        """The provenance recorded in the store (empty before :meth:`create`)."""
        return dict(self.group.attrs[ATTR].get("provenance") or {}) if self.group else {}

    def saved(self, name: str) -> np.ndarray | None:
        """Array ``name`` saved in the run bookkeeping by :meth:`create`, if any."""
        if self.group is None or RUN not in self.group or name not in self.group[RUN]:
            return None
        return self.group[RUN][name][...]

    def create(
        self,
        *,
        provenance: dict[str, Any],
        shape: tuple[int, int, int],
        chunks: tuple[int, int, int],
        dtype: str,
        blocks: tuple[int, int],
        halo_shapes: dict[str, tuple[int, ...]],
        saved: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write the empty store (replacing an old one with ``overwrite``); nothing when resumed.

        ``saved`` arrays (e.g. estimates that every block needs) are kept with the run
        bookkeeping, so that a resumed run uses exactly the same ones.
        """
        if self.resumed:
            return
        if self.overwrite and (self.path / "zarr.json").exists():
            _clear(self.path)
        # The documents are written as files (io.nodes: the bytes Zarr writes, without its
        # round trips); "done" last: a store without it was interrupted while being created.
        meta = {"settings": self.settings, "provenance": _jsonable(provenance), "complete": False}
        write_document(self.path, group_metadata({ATTR: meta}))
        _write_array(
            self.path / FEATURES,
            shape=tuple(shape),
            chunks=tuple(chunks),
            dtype=dtype,
            compressors=_COMPRESSORS,
            dimension_names=("feature", "y", "x"),
            fill_value=np.nan,
        )
        write_document(self.path / RUN, group_metadata())
        for name, hshape in halo_shapes.items():
            # uncompressed, as the done flags: bookkeeping that a block task writes itself
            # as files, without a trip to Zarr's loop (dropped when the run completes)
            _write_array(
                self.path / RUN / f"halo_{name}",
                shape=(*blocks, *hshape),
                chunks=(1, 1, *hshape),
                dtype="float32",
                compressors=None,
                fill_value=0.0,
            )
        if saved:
            run = zarr.open_group(self.path / RUN, mode="r+", zarr_format=3)
            for name, values in saved.items():
                run.create_array(name, data=np.ascontiguousarray(values), compressors=_COMPRESSORS)
        _write_array(
            self.path / RUN / "done",
            shape=tuple(blocks),
            chunks=(1, 1),
            dtype="uint8",
            compressors=None,
            fill_value=0,
        )
        self._group, self._written = None, True

    def _existing_settings(self) -> dict[str, Any] | None:
        if not (self.path / "zarr.json").exists():
            return None
        try:
            attrs = zarr.open_group(self.path, mode="r", zarr_format=3).attrs.asdict()
        except Exception as err:  # noqa: BLE001 - any unreadable store is the same problem
            raise StoreError(f"Cannot open existing store {str(self.path)!r}: {err}") from err
        meta = attrs.get(ATTR)
        if not isinstance(meta, dict) or "settings" not in meta:
            raise StoreError(
                f"{str(self.path)!r} is a Zarr store not written by hrdv2_dask; refusing to touch "
                "it. Choose a new path or delete it."
            )
        return meta["settings"]

    @property
    def complete(self) -> bool:
        return self.group is not None and bool(self.group.attrs[ATTR].get("complete"))

    def done_blocks(self) -> np.ndarray:
        """``(block_y, block_x)`` bool array of blocks already written."""
        return self.group[RUN]["done"][...].astype(bool)

    def finish(self) -> None:
        """Mark the store complete and drop the resume bookkeeping; then consolidate.

        The coordinates and the ``features`` attributes come first (a run interrupted before
        ``complete`` redoes them), the consolidated metadata last: a store that is not complete
        is never consolidated, so plain xarray does not take it for a finished one.
        """
        root = read_metadata(self.path)
        meta = dict(root.attributes[ATTR])
        nodes = _write_plain_metadata(self.path, meta)
        if (self.path / RUN).exists():
            shutil.rmtree(self.path / RUN)
        meta["complete"] = True
        # complete and consolidated in one write of the root document (never one without the
        # other), as zarr.consolidate_metadata writes it over the nodes left
        attrs = {**root.attributes, ATTR: _jsonable(meta)}
        write_document(self.path, group_metadata(attrs, consolidated=nodes), atomic=True)
        self._group, self._written = None, True  # reopened when needed


def _write_array(node: Path, **options: Any) -> ArrayV3Metadata:
    """Write the document of an array (:func:`~hrdv2_dask.io.nodes.array_node` options)."""
    meta, data = array_node(**options)
    write_document(node, meta, data=data)
    return meta


def _created(group: zarr.Group) -> bool:
    """Whether :meth:`RunStore.create` finished (its last array exists)."""
    return RUN in group and "done" in group[RUN]


def _clear(path: Path) -> None:
    """Delete a store's contents but its writer lock (held by the run that replaces it)."""
    for entry in path.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class BlockWriter:
    """What a block task writes into a store that :class:`RunStore` created: its chunks, the
    halo strips it passes on (kept for resume) and its ``done`` flag, in that order.

    Parameters
    ----------
    path : str or os.PathLike
        The store's folder (opened on each call: the writer travels to workers as a path).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self._arrays: dict[str, Any] | None = None  # opened at the first write, then kept

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> dict[str, Any]:
        if self._arrays is None:
            group = zarr.open_group(self.path, mode="r+", zarr_format=3)
            run = group[RUN]
            self._arrays = {FEATURES: group[FEATURES], **dict(run.arrays())}
        return self._arrays

    def write_block(
        self,
        block: tuple[int, int],
        values: np.ndarray,
        reached: np.ndarray,
        *,
        origin: tuple[int, int],
        chunk: int,
        halo: dict[str, np.ndarray],
    ) -> None:
        """Write one block's ``values`` ``(C, rows, cols)`` at output cell ``origin``.

        Chunks of ``chunk`` cells that no computed window ``reached`` (a ``(rows, cols)`` bool
        array) stay unwritten and read as the fill value (NaN). ``halo`` maps the strip names
        (``bottom``, ``right``, ``corner``) to the strips that later blocks need. One writer
        can write several blocks of a store (the arrays are opened once).
        """
        arrays = self._open()
        _write_all(_chunk_writes(arrays[FEATURES], values, reached, origin, chunk))
        strips = [(f"halo_{name}", strip) for name, strip in halo.items()]
        for name, part in [*strips, ("done", np.uint8(1))]:  # done last
            self._write_run_chunk(arrays[name], name, block, part)

    def _write_run_chunk(self, array, name: str, block: tuple[int, int], part) -> None:
        """Chunk ``block`` (all of ``block``'s part) of a bookkeeping array: written as a file
        where it is uncompressed (stores created by this version), else through Zarr (a store
        of an older version, resumed)."""
        if not is_plain(array.metadata):
            array[block] = part
            return
        shape = array.metadata.chunk_grid.chunk_shape
        coords = (*block, *(0,) * (len(shape) - 2))
        values = np.broadcast_to(np.asarray(part), shape[2:]).reshape(shape)
        write_plain_chunk(Path(self.path) / RUN / name, array.metadata, coords, values)

    def saved_halo(self, block: tuple[int, int]) -> dict[str, np.ndarray]:
        """The strips of ``block`` written by an earlier, interrupted run."""
        run = zarr.open_group(self.path, mode="r", zarr_format=3)[RUN]
        # only the strips that some block receives are kept (none for a grid of one block)
        names = [n for n in ("bottom", "right", "corner") if f"halo_{n}" in run]
        return {name: run[f"halo_{name}"][block] for name in names}


def _chunk_writes(
    array, values: np.ndarray, reached: np.ndarray, origin: tuple[int, int], chunk: int
) -> list[tuple[Any, tuple[slice, ...], np.ndarray]]:
    """``(array, region, values)`` writes of a block's values, leaving out the chunks that no
    computed window reached.

    Zarr's own check for empty chunks (a comparison of every chunk with NaN, slow in float16)
    is switched off: it would find none.
    """
    array = array.with_config({"write_empty_chunks": True})
    y0, x0 = origin
    if reached.all():
        region = (slice(None), slice(y0, y0 + values.shape[1]), slice(x0, x0 + values.shape[2]))
        return [(array, region, values)]
    writes = []
    for r in range(0, values.shape[1], chunk):
        for c in range(0, values.shape[2], chunk):
            if reached[r : r + chunk, c : c + chunk].any():
                part = values[:, r : r + chunk, c : c + chunk]
                region = (
                    slice(None),
                    slice(y0 + r, y0 + r + part.shape[1]),
                    slice(x0 + c, x0 + c + part.shape[2]),
                )
                writes.append((array, region, part))
    return writes


def _write_all(*stages: list[tuple[Any, Any, np.ndarray]]) -> None:
    """Each stage's writes concurrently, the stages in order, in one trip to Zarr's event loop
    (a block's chunks and strips, then its ``done`` flag)."""

    async def run() -> None:
        for writes in stages:
            await asyncio.gather(*(a.async_array.setitem(k, v) for a, k, v in writes))

    sync(run())


def feature_coords(
    sizes: tuple[int, int],
    out_stride: int,
    *,
    pixel_size: tuple[float, float] | None = None,
    unit: str | None = None,
) -> dict[str, xr.Variable]:
    """The coordinates of a store's ``(y, x)`` output cells: pixel centres, physical units.

    Parameters
    ----------
    sizes : (int, int)
        Output cells along y and x.
    out_stride : int
        Source pixels per output cell.
    pixel_size : (float, float), optional
        ``(y, x)`` size of a source pixel in ``unit``: adds ``y_phys`` and ``x_phys``.
    unit : str, optional
        Unit of ``pixel_size`` (``"unknown"`` if not given).

    Returns
    -------
    dict of str to xarray.Variable
        ``y``, ``x`` (float64, centre of each cell in source pixels) and, with a pixel size,
        ``y_phys``, ``x_phys``.

    Examples
    --------
    >>> c = feature_coords((2, 3), 4, pixel_size=(0.5, 0.25), unit="micrometer")
    >>> c["y"].values.tolist(), c["x_phys"].values.tolist(), c["x_phys"].attrs["units"]
    ([1.5, 5.5], [0.375, 1.375, 2.375], 'micrometer')
    """
    names = {"y": "row (pixel centre)", "x": "column (pixel centre)"}
    coords = {}
    for i, dim in enumerate(("y", "x")):
        centres = np.arange(sizes[i], dtype=np.float64) * out_stride + (out_stride - 1) / 2
        coords[dim] = xr.Variable(dim, centres, {"units": "pixel", "long_name": names[dim]})
        if pixel_size:
            phys = centres * float(pixel_size[i])
            coords[f"{dim}_phys"] = xr.Variable(dim, phys, {"units": unit or "unknown"})
    return coords


def _store_coords(
    settings: dict[str, Any], provenance: dict[str, Any], sizes: tuple[int, int]
) -> dict[str, xr.Variable]:
    """:func:`feature_coords` of a store's settings and provenance."""
    source = (provenance or {}).get("source") or {}
    return feature_coords(
        sizes,
        int(settings["out_stride"]),
        pixel_size=source.get("pixel_size"),
        unit=source.get("unit"),
    )


def feature_attrs(settings: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """The attributes of the ``features`` DataArray: the run's settings and provenance, but
    those that are ``None``.

    >>> feature_attrs({"tile_px": 518, "components": None}, {"version": "0.1.0"})
    {'tile_px': 518, 'version': '0.1.0'}
    """
    merged = {**settings, **(provenance or {})}
    return {k: v for k, v in merged.items() if v is not None}


def _write_plain_metadata(path: Path, meta: dict[str, Any]) -> dict[str, ArrayV3Metadata]:
    """Write the coordinate arrays and the ``features`` attributes that plain xarray reads;
    the metadata of these nodes.

    The ``features`` array's values and its metadata but the attributes stay as they are;
    ``coordinates`` names the non-index coordinates (the CF rule xarray decodes).
    """
    features = read_metadata(path / FEATURES)
    settings, prov = meta["settings"], meta.get("provenance") or {}
    coords = _store_coords(settings, prov, features.shape[1:])
    written = {}
    for name, var in coords.items():
        if (path / name).exists():
            shutil.rmtree(path / name)
        written[name] = _write_array(
            path / name,
            shape=var.shape,
            dtype=str(var.dtype),
            dimension_names=var.dims,
            compressors=None,
            fill_value=np.nan,
            attributes=var.attrs,
        )
        write_plain_chunks(path / name, written[name], var.values)
    extra = [name for name in coords if name not in ("y", "x")]
    attrs = feature_attrs(settings, prov)
    if extra:
        attrs["coordinates"] = " ".join(extra)
    written[FEATURES] = features.update_attributes(_jsonable(attrs))
    write_document(path / FEATURES, written[FEATURES])
    return written


def _consolidate(path: Path) -> None:
    """Consolidate the metadata of the store at ``path`` (as xarray expects it)."""
    with warnings.catch_warnings():
        # zarr: consolidated metadata is not (yet) in the v3 spec; xarray reads it all the same
        warnings.filterwarnings("ignore", "Consolidated metadata is currently not part")
        # a run holding the writer lock: not a Zarr node
        warnings.filterwarnings("ignore", f"Object at {LOCK_NAME} is not recognized")
        zarr.consolidate_metadata(str(path), zarr_format=3)


def is_consolidated(path: str | os.PathLike) -> bool:
    """Whether the group at ``path`` carries consolidated metadata."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta.get("consolidated_metadata"), dict)


def publish_metadata(store: str | os.PathLike) -> None:
    """Give a complete store what plain xarray reads, if it lacks it (a store completed by an
    older version, or a run interrupted just before consolidating)."""
    path = Path(store)
    group = zarr.open_group(path, mode="r+", zarr_format=3, use_consolidated=False)
    meta = group.attrs.asdict().get(ATTR)
    if not isinstance(meta, dict) or not meta.get("complete"):
        raise IncompleteStoreError(
            f"Feature store {str(path)!r} is incomplete; only a complete store is consolidated."
        )
    if is_consolidated(path) and "y" in group:
        return
    _write_plain_metadata(path, meta)
    _consolidate(path)


def open_features(store: str | os.PathLike) -> xr.DataArray:
    """Open a feature store lazily as an :class:`xarray.DataArray`.

    Parameters
    ----------
    store : str or os.PathLike
        A store written by :func:`hrdv2_dask.extract`.

    Returns
    -------
    xarray.DataArray
        Dask-backed, dims ``("feature", "y", "x")``, coordinates ``y``/``x`` at the centres of
        the output cells in source pixels (and ``y_phys``/``x_phys`` in physical units when the
        source has a pixel size); attrs hold the settings and provenance of the run.

    Raises
    ------
    IncompleteStoreError
        The run that writes the store did not complete (rerun the same command to resume).
    StoreError
        Not a feature store.
    """
    path = Path(store)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{str(path)!r} is not a Zarr v3 feature store (no zarr.json).")
    try:
        meta = read_attributes(path).get(ATTR)
    except Exception as err:  # noqa: BLE001 - an unreadable zarr.json, whatever the reason
        raise _damaged(path, "its metadata file zarr.json cannot be read", err) from err
    if not isinstance(meta, dict):
        raise StoreError(f"{str(path)!r} is a Zarr store but not a hrdv2_dask feature store.")
    if not meta.get("complete"):
        raise IncompleteStoreError(
            f"Feature store {str(path)!r} is incomplete: its run did not finish. Rerun the same "
            "command to resume it, or use --overwrite to start again."
        )
    try:
        # Built from the array's document, not through xarray.open_zarr (which reads every
        # node, then these values would be replaced): what open_zarr gives, ~5x faster, and a
        # collection opens one store per member.
        features = read_metadata(path / FEATURES)
        dims = tuple(features.dimension_names or ())
        if features.node_type != "array" or dims != ("feature", "y", "x"):
            raise ValueError(f"not a (feature, y, x) array: {features.node_type} {dims}")
    except Exception as err:  # noqa: BLE001 - a missing or damaged features/zarr.json
        raise _damaged(path, f"its array {FEATURES!r} cannot be opened", err) from err
    shape = tuple(int(n) for n in features.shape)
    dtype = features.data_type.to_native_dtype()
    # every chunk exists in a store computed without a mask: a missing one is damage, not NaN
    chunks = StoreChunks(path, shape, dtype, all_written=meta["settings"].get("mask") is None)
    data = da.from_array(
        chunks,
        chunks=normalize_chunks(features.chunk_grid.chunk_shape, shape),  # Zarr's chunks
        meta=np.empty((0,) * 3, dtype),
        inline_array=True,
    )
    settings, prov = meta["settings"], meta.get("provenance", {})
    # Computed, not read: the same for stores written before the coordinates were stored;
    # the stored arrays hold these values (a test holds the two to each other).
    return xr.DataArray(
        data,
        dims=dims,
        coords=_store_coords(settings, prov, shape[1:]),
        attrs=feature_attrs(settings, prov),
        name=FEATURES,
    )


_RECOMPUTE = (
    "The store is damaged: compute it again (the same `hrdv2 features` command with "
    "--overwrite), or restore it from a copy."
)


def _damaged(path: Path, what: str, err: BaseException) -> StoreReadError:
    detail = " ".join(str(err).split()) or "(no message)"
    return StoreReadError(
        f"Cannot read feature store {str(path)!r}: {what} ({type(err).__name__}: {detail}). "
        f"{_RECOMPUTE}"
    )


class StoreChunks:
    """The ``features`` array of a complete store, read region by region for dask.

    A chunk that cannot be read (a damaged or vanished file), or is missing in a store whose
    every chunk was written (computed without a mask), raises :class:`StoreReadError` naming
    the chunk's file and its rows and columns; elsewhere a chunk never written reads as NaN.
    Travels to workers as its path (the Zarr array is reopened there).
    """

    def __init__(
        self, path: str | os.PathLike, shape: tuple[int, ...], dtype, *, all_written: bool
    ) -> None:
        self.path = str(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.all_written = all_written
        self._array = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        stamp = os.stat(os.path.join(self.path, FEATURES, "zarr.json")).st_mtime_ns
        return ("StoreChunks", self.path, self.shape, str(self.dtype), stamp)

    def _open(self):
        if self._array is None:
            self._array = zarr.open_array(
                os.path.join(self.path, FEATURES), mode="r", zarr_format=3
            )
        return self._array

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        array = self._open()
        try:
            if self.all_written:
                for coords in self._chunk_coords(key, array.chunks):
                    name = array.metadata.encode_chunk_key(coords)
                    if not os.path.exists(os.path.join(self.path, FEATURES, name)):
                        raise self._error(array, coords, "is missing", None)
            return array[key]
        except StoreReadError:
            raise
        except Exception as err:  # noqa: BLE001 - a codec's or the file system's error
            raise self._error(array, self._bad_chunk(array, key), "cannot be read", err) from err

    def _chunk_coords(self, key, chunks) -> list[tuple[int, ...]]:
        ranges = []
        for k, n, c in zip(key, self.shape, chunks, strict=True):
            start, stop, _ = k.indices(n)
            ranges.append(range(start // c, -(-stop // c)))
        return list(itertools.product(*ranges))

    def _bad_chunk(self, array, key) -> tuple[int, ...]:
        """The first chunk of ``key`` that fails to read alone (only on the failure path)."""
        coords = self._chunk_coords(key, array.chunks)
        for cell in coords:
            region = tuple(
                slice(i * c, (i + 1) * c) for i, c in zip(cell, array.chunks, strict=True)
            )
            try:
                array[region]
            except Exception:  # noqa: BLE001 - this one is damaged
                return cell
        return coords[0]

    def _error(self, array, coords, problem: str, err: BaseException | None) -> StoreReadError:
        name = array.metadata.encode_chunk_key(coords)
        _, cy, cx = array.chunks
        rows = f"{coords[1] * cy}:{min((coords[1] + 1) * cy, self.shape[1])}"
        cols = f"{coords[2] * cx}:{min((coords[2] + 1) * cx, self.shape[2])}"
        why = ""
        if err is not None:
            why = f" ({type(err).__name__}: {' '.join(str(err).split()) or '(no message)'})"
        return StoreReadError(
            f"Cannot read feature store {self.path!r}: its chunk file "
            f"{os.path.join(self.path, FEATURES, name)} (output rows {rows}, cols {cols}) "
            f"{problem}{why}. {_RECOMPUTE}"
        )
