"""A synthetic feature store of a gigapixel source that costs megabytes of disk.

A real store of a 100k × 100k px source at ``out_stride`` 4 holds 25,000² cells of 384 float16
features (480 GB). This one has the same metadata, chunk grid, codecs and chunk sizes, written
by :class:`hrdv2_dask.io.store.RunStore` like any run's, but only ``variants`` distinct chunks
are computed (through the Zarr API, at the first place each is used); every other chunk file is
a hard link to one of them, chosen by a deterministic pattern of the chunk's position. Reading
it is real (the files are decompressed and averaged like a real store's), but the few distinct
files stay in the page cache, so disk reads are free.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["chunk_variant", "variant_values", "write_gigapixel_source", "write_gigapixel_store"]

log = logging.getLogger(__name__)

#: Distinct chunks written per array; all the others are hard links to them.
_VARIANTS = 8


def chunk_variant(j: int, i: int, variants: int) -> int:
    """Which of the ``variants`` distinct chunks sits at chunk row ``j``, column ``i``.

    >>> [chunk_variant(0, i, 4) for i in range(6)], chunk_variant(1, 0, 4)
    ([0, 3, 2, 1, 0, 3], 2)
    """
    return (2 * j - i) % variants


def variant_values(v: int, *, dim: int, chunk: int, variants: int, seed: int = 0) -> np.ndarray:
    """The ``(dim, chunk, chunk)`` float16 values of variant ``v``: a level that grows with
    ``v`` (so the mean image shows the chunk pattern), a diagonal ramp and noise."""
    rng = np.random.default_rng([seed, v])
    yy, xx = np.mgrid[0:chunk, 0:chunk].astype(np.float32)
    ramp = (yy + xx) / (2 * chunk)
    noise = rng.normal(0.0, 0.2, (dim, chunk, chunk)).astype(np.float32)
    return (v / max(variants - 1, 1) + 0.5 * ramp + noise).astype(np.float16)


def _link_chunks(arr: Any, folder: Path, grid: tuple[int, int], write: Callable) -> None:
    """Write each variant once through ``write(v, j, i)`` at its first chunk, then hard-link
    every other chunk file of ``arr`` (stored in ``folder``) to its variant's."""
    first: dict[int, tuple[int, int]] = {}
    for j in range(grid[0]):
        for i in range(grid[1]):
            first.setdefault(chunk_variant(j, i, _VARIANTS), (j, i))
    files = {}
    for v, (j, i) in sorted(first.items()):
        write(v, j, i)
        files[v] = folder / arr.metadata.encode_chunk_key(_key(arr, j, i))
    for j in range(grid[0]):
        for i in range(grid[1]):
            target = folder / arr.metadata.encode_chunk_key(_key(arr, j, i))
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(files[chunk_variant(j, i, _VARIANTS)], target)


def _key(arr: Any, j: int, i: int) -> tuple[int, ...]:
    return (0,) * (arr.ndim - 2) + (j, i)


def write_gigapixel_source(
    path: str | os.PathLike, *, size: int, pixel_size: float | None, chunk: int = 1024
) -> Path:
    """An RGB OME-Zarr pyramid ``size``² px (levels halve down to <= 1024 px), chunks of
    ``chunk`` px linked to :data:`_VARIANTS` distinct ones per level (coloured stripes)."""
    import numcodecs
    import zarr

    path = Path(path)
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    compressor = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
    datasets, side, level = [], size, 0
    while True:
        arr = root.create_array(
            str(level),
            shape=(3, side, side),
            chunks=(3, chunk, chunk),
            dtype="uint8",
            compressors=compressor,
            chunk_key_encoding={"name": "v2", "separator": "/"},
            fill_value=0,
        )

        def write(v: int, j: int, i: int, arr=arr, side=side, level=level) -> None:
            yy, xx = np.mgrid[0:chunk, 0:chunk]
            stripes = ((yy + 2 * xx) // (16 + 8 * v) % 2).astype(np.uint8)
            colour = np.array([60 + 25 * v, 200 - 20 * v, 120 + 10 * level], np.uint8)
            tile = 40 + stripes[None] * colour[:, None, None]
            h, w = min(chunk, side - j * chunk), min(chunk, side - i * chunk)
            arr[:, j * chunk : j * chunk + h, i * chunk : i * chunk + w] = tile[:, :h, :w]

        n = -(-side // chunk)
        _link_chunks(arr, path / str(level), (n, n), write)
        factor = float(2**level) * (pixel_size or 1.0)
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [{"type": "scale", "scale": [1.0, factor, factor]}],
            }
        )
        if side <= 1024:
            break
        side, level = -(-side // 2), level + 1
    unit = {"unit": "micrometer"} if pixel_size else {}
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "name": path.name,
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", **unit},
                {"name": "x", "type": "space", **unit},
            ],
            "datasets": datasets,
        }
    ]
    return path


def write_gigapixel_store(
    path: str | os.PathLike,
    *,
    source_px: int,
    out_stride: int,
    dim: int,
    chunk: int,
    pixel_size: float | None = 0.25,
    seed: int = 0,
) -> dict[str, Any]:
    """Write (or reuse, when its recipe matches) the synthetic store; returns its recipe.

    Parameters
    ----------
    path : str or os.PathLike
        Folder of the store.
    source_px : int
        Side of the (absent) square source image, in pixels.
    out_stride : int
        Source pixels per output cell: the store is ``ceil(source_px / out_stride)`` cells a
        side.
    dim : int
        Features per cell.
    chunk : int
        Chunk side in cells (a run's is ``step_px // out_stride``, e.g. 108 at stride 4).
    pixel_size : float, optional
        Recorded source pixel size in micrometres (None: none).
    """
    import zarr

    from hrdv2_dask.io.store import ATTR, RunStore

    path = Path(path)
    cells = -(-source_px // out_stride)
    recipe = {
        "source_px": source_px,
        "out_stride": out_stride,
        "dim": dim,
        "chunk": chunk,
        "variants": _VARIANTS,
        "pixel_size": pixel_size,
        "seed": seed,
    }
    if (path / "zarr.json").exists():
        attrs = zarr.open_group(path, mode="r").attrs.asdict().get(ATTR) or {}
        if attrs.get("complete") and attrs.get("settings", {}).get("synthetic") == recipe:
            return {**recipe, "cells": cells, "chunks": (-(-cells // chunk)) ** 2, "reused": True}
    settings = {
        "model": "synthetic",
        "out_stride": out_stride,
        "source_shape": [source_px, source_px, 3],
        "dtype": "float16",
        "synthetic": recipe,
    }
    image = write_gigapixel_source(
        path.with_name(path.stem + "_source.ome.zarr"), size=source_px, pixel_size=pixel_size
    )
    source: dict[str, Any] = {
        "path": str(image.resolve()),
        "format": "ome-zarr",
        "shape": [source_px, source_px, 3],
        "dtype": "uint8",
        "axes": "CYX",
        "level": 0,
    }
    if pixel_size is not None:
        source.update(pixel_size=[pixel_size, pixel_size], unit="micrometer")
    store = RunStore(path, settings=settings, overwrite=True)
    store.create(
        provenance={"package": "hrdv2-dask", "source": source},
        shape=(dim, cells, cells),
        chunks=(dim, chunk, chunk),
        dtype="float16",
        blocks=(1, 1),
        halo_shapes={},
    )
    arr = store.group["features"]
    n = -(-cells // chunk)

    def write(v: int, j: int, i: int) -> None:
        values = variant_values(v, dim=dim, chunk=chunk, variants=_VARIANTS, seed=seed)
        h, w = min(chunk, cells - j * chunk), min(chunk, cells - i * chunk)
        arr[:, j * chunk : j * chunk + h, i * chunk : i * chunk + w] = values[:, :h, :w]

    _link_chunks(arr, path / "features", (n, n), write)
    store.finish()
    log.info("synthetic store %s: %d² cells, %d chunks, %d distinct", path, cells, n * n, _VARIANTS)
    return {**recipe, "cells": cells, "chunks": n * n, "reused": False}
