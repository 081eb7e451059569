"""Feature stores and collections written directly (no extraction), for analysis tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hrdv2_dask.io.collection import CollectionStore
from hrdv2_dask.io.store import RunStore


def write_store(
    path: Path,
    values: np.ndarray,
    *,
    out_stride: int = 1,
    chunk: int = 16,
    image: np.ndarray | None = None,
) -> Path:
    """A complete feature store holding ``values`` ``(F, H, W)`` float32.

    With ``image`` (``(H*s, W*s)`` or ``(.., 3)`` uint8) it is saved next to the store as
    ``<name>.npy`` and recorded as the source (so contact sheets can crop it).
    """
    n_feat, h, w = values.shape
    source_shape = [h * out_stride, w * out_stride, 1]
    source = {
        "path": None,
        "format": "numpy",
        "shape": source_shape,
        "dtype": "uint8",
        "axes": "YX",
    }
    if image is not None:
        src = path.parent / f"{path.name}.npy"
        np.save(src, image)
        source.update(path=str(src.resolve()), shape=[*image.shape[:2], 1])
        source_shape = [*image.shape[:2], 1]
    settings = {
        "model": "synthetic",
        "out_stride": out_stride,
        "source_shape": source_shape,
        "value_range": [0.0, 255.0],
        "dtype": "float32",
    }
    store = RunStore(path, settings=settings)
    store.create(
        provenance={"package": "hrdv2-dask", "source": source},
        shape=(n_feat, h, w),
        chunks=(n_feat, chunk, chunk),
        dtype="float32",
        blocks=(1, 1),
        halo_shapes={},
    )
    store.group["features"][...] = values.astype(np.float32)
    store.finish()
    return path


def write_collection(
    path: Path, members: dict[str, np.ndarray], *, images: dict | None = None, **kw
) -> Path:
    """A collection store whose members hold ``members[key]`` (each via :func:`write_store`)."""
    coll = CollectionStore(path, settings={"model": "synthetic"})
    coll.create()
    for key, values in members.items():
        write_store(coll.member_path(key), values, image=(images or {}).get(key), **kw)
        coll.record(key, status="done", shape=list(values.shape))
    return path
