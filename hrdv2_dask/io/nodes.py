"""Zarr v3 metadata documents written as files, in one go, without Zarr's store round trips.

Creating a node with Zarr's API checks that nothing is there, writes its parents' documents
and its own, each a hop to Zarr's event loop and a thread: ~3 ms a node, and a store has up
to nine. A collection creates and finishes one store per image, so its stores' documents are
built here, with Zarr's public API in memory (array documents, kept for arrays of the same
options) and its metadata classes (groups, consolidated metadata), exactly as
:func:`zarr.create_array` and :func:`zarr.consolidate_metadata` write them (the same bytes: a
test holds them to each other), and written as plain files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import ConsolidatedMetadata, GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.storage import MemoryStore

__all__ = [
    "array_metadata",
    "array_node",
    "document",
    "group_metadata",
    "is_plain",
    "read_attributes",
    "read_metadata",
    "write_document",
    "write_file",
    "write_plain_chunk",
    "write_plain_chunks",
]

_DOC = "zarr.json"


def array_metadata(
    *,
    shape: tuple[int, ...],
    dtype: Any,
    chunks: tuple[int, ...] | str = "auto",
    compressors: Any = "auto",
    fill_value: Any = None,
    dimension_names: tuple[str, ...] | None = None,
    attributes: dict[str, Any] | None = None,
) -> ArrayV3Metadata:
    """The metadata :func:`zarr.create_array` gives an unsharded v3 array of these options.

    Made by :func:`zarr.create_array` itself, in memory (~0.5 ms; :func:`array_node` keeps
    the result for arrays of the same options), so it follows Zarr's defaults release by
    release.
    """
    array = zarr.create_array(
        store=MemoryStore(),
        shape=tuple(int(n) for n in shape),
        dtype=dtype,
        chunks=chunks,
        compressors=compressors,
        fill_value=fill_value,
        dimension_names=dimension_names,
        attributes=attributes,
        zarr_format=3,
    )
    return array.metadata


_NODES: dict[str, tuple[ArrayV3Metadata, bytes]] = {}


def array_node(**options: Any) -> tuple[ArrayV3Metadata, bytes]:
    """``(metadata, zarr.json bytes)`` of :func:`array_metadata` with ``options``, kept for
    the next store: a collection's members have arrays of the same options (their halo
    strips, ``done`` flags, coordinates of images of one size)."""
    key = repr(sorted(options.items()))
    hit = _NODES.get(key)
    if hit is None:
        meta = array_metadata(**options)
        hit = (meta, document(meta))
        if len(_NODES) >= 256:
            _NODES.clear()
        _NODES[key] = hit
    return hit


def group_metadata(
    attributes: dict[str, Any] | None = None,
    consolidated: Mapping[str, ArrayV3Metadata | GroupMetadata] | None = None,
) -> GroupMetadata:
    """A v3 group's metadata; with ``consolidated``, its members' metadata as
    :func:`zarr.consolidate_metadata` records them (names relative to the group)."""
    meta = GroupMetadata(attributes=attributes or {}, zarr_format=3)
    if consolidated is None:
        return meta
    return dataclasses.replace(
        meta,
        consolidated_metadata=ConsolidatedMetadata(metadata=dict(sorted(consolidated.items()))),
    )


def document(meta: ArrayV3Metadata | GroupMetadata) -> bytes:
    """The ``zarr.json`` bytes of ``meta``."""
    return meta.to_buffer_dict(default_buffer_prototype())[_DOC].to_bytes()


def write_file(path: Path, data: bytes, *, atomic: bool = False) -> None:
    """Write ``data`` to ``path``; ``atomic``: through a temporary file, never half-written.

    Every file of this module is written here (where tests plant faults of the disk).
    """
    if not atomic:
        path.write_bytes(data)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_document(
    node: Path,
    meta: ArrayV3Metadata | GroupMetadata,
    *,
    atomic: bool = False,
    data: bytes | None = None,
) -> None:
    """Write ``meta`` (its document ``data`` where known) as the ``zarr.json`` of the node at
    folder ``node`` (made if missing)."""
    node.mkdir(parents=True, exist_ok=True)
    write_file(node / _DOC, document(meta) if data is None else data, atomic=atomic)


def read_metadata(node: Path) -> ArrayV3Metadata | GroupMetadata:
    """The metadata of the node at folder ``node``."""
    data = json.loads((node / _DOC).read_bytes())
    if data.get("node_type") == "array":
        return ArrayV3Metadata.from_dict(data)
    return GroupMetadata.from_dict(data)


def read_attributes(node: Path) -> dict[str, Any]:
    """The attributes of the node at folder ``node``, as ``zarr.open_group(...).attrs``."""
    data = json.loads((node / _DOC).read_bytes())
    if data.get("zarr_format") != 3 or data.get("node_type") != "group":
        raise ValueError(f"{str(node)!r} holds no Zarr v3 group")
    return dict(data.get("attributes") or {})


def is_plain(meta: ArrayV3Metadata) -> bool:
    """Whether the array's only codec is ``bytes`` (no compression): its chunks are its values."""
    return len(meta.codecs) == 1 and meta.codecs[0].to_dict()["name"] == "bytes"


def _encoded(meta: ArrayV3Metadata, part: np.ndarray) -> bytes:
    """One whole chunk of ``meta`` holding ``part`` (padded with the fill value), as bytes."""
    (codec,) = meta.codecs
    order = "<" if codec.endian is None or codec.endian.value == "little" else ">"
    shape = meta.chunk_grid.chunk_shape
    if part.shape == tuple(shape):
        return np.ascontiguousarray(part, dtype=np.dtype(part.dtype).newbyteorder(order)).tobytes()
    chunk = np.full(shape, meta.fill_value, dtype=np.dtype(part.dtype).newbyteorder(order))
    chunk[tuple(slice(0, n) for n in part.shape)] = part
    return chunk.tobytes()


def write_plain_chunk(
    node: Path, meta: ArrayV3Metadata, coords: tuple[int, ...], values: np.ndarray
) -> None:
    """Write chunk ``coords`` of the uncompressed (:func:`is_plain`) array at ``node``."""
    if not is_plain(meta):
        raise ValueError("write_plain_chunk writes uncompressed arrays only")
    path = node / meta.encode_chunk_key(tuple(int(k) for k in coords))
    os.makedirs(path.parent, exist_ok=True)
    write_file(path, _encoded(meta, np.asarray(values, dtype=meta.data_type.to_native_dtype())))


def write_plain_chunks(node: Path, meta: ArrayV3Metadata, values: np.ndarray) -> None:
    """Write ``values`` into the uncompressed float array at ``node`` as Zarr does: whole
    chunks, the last padded with the fill value, chunks that hold only the fill value left
    out."""
    if not is_plain(meta) or not isinstance(meta.fill_value, np.floating):
        raise ValueError("write_plain_chunks writes uncompressed float arrays only")
    shape = meta.chunk_grid.chunk_shape
    grid = [range(0, n, c) for n, c in zip(values.shape, shape, strict=True)]
    for starts in np.ndindex(*(len(g) for g in grid)):
        origin = [g[k] for g, k in zip(grid, starts, strict=True)]
        part = values[tuple(slice(o, o + c) for o, c in zip(origin, shape, strict=True))]
        if np.isnan(meta.fill_value) and np.isnan(part).all():
            continue
        write_plain_chunk(node, meta, starts, part)
