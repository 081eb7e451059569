"""Collection stores: one Zarr group holding a complete feature store per image and a table.

Layout::

    collection.zarr/
      zarr.json       attrs ``settings`` (once, for all members), ``members`` (the table) and
                      ``hrdv2_collection`` (the mark of a collection store)
      <key>/          one feature store per member (:mod:`hrdv2_dask.io.store`), opened by
                      :func:`~hrdv2_dask.io.store.open_features` like any other

The members table has one row per image: ``key``, ``source``, ``shape``, ``pixel_size``,
``status`` (``done``, ``failed`` or ``pending``), ``error`` (one line), ``windows`` (computed
in the run that finished it) and ``seconds``. :func:`open_collection` opens it all lazily as
an :class:`xarray.DataTree`.

When a run ends, the root's metadata is consolidated over the ``done`` members (each itself
consolidated when it completed), so ``xarray.open_datatree(store, engine="zarr")`` gives the
tree :func:`open_collection` gives, without a warning; every change to the table drops that
consolidation until the run ends again, so a collection being written is never taken for a
finished one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import xarray as xr
from zarr.core.group import ConsolidatedMetadata

from ..errors import StoreError
from .nodes import group_metadata, read_attributes, read_metadata, write_document
from .store import ATTR, _check_target, _clear, is_consolidated, open_features, publish_metadata

__all__ = [
    "COLLECTION",
    "STATUSES",
    "TABLE_COLUMNS",
    "CollectionStore",
    "is_collection",
    "members_csv",
    "open_collection",
    "read_members",
]

#: The root group attribute that marks a collection store.
COLLECTION = "hrdv2_collection"
_FORMAT = 2  # 1: settings and members inside the COLLECTION attribute
#: Columns of the members table.
TABLE_COLUMNS = ("key", "source", "shape", "pixel_size", "status", "error", "windows", "seconds")
#: Values of its ``status`` column.
STATUSES = ("done", "failed", "pending")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _root_attrs(path: Path) -> dict[str, Any] | None:
    if not (path / "zarr.json").exists():
        return None
    try:  # the document itself, not through Zarr: a collection reads one per member
        return read_attributes(path)
    except Exception as err:  # noqa: BLE001 - any unreadable store is the same problem
        raise StoreError(f"Cannot open existing store {str(path)!r}: {err}") from err


def _collection_meta(attrs: dict[str, Any] | None) -> dict[str, Any] | None:
    """``{"settings", "members"}`` of a collection's root attrs; None: not a collection."""
    mark = (attrs or {}).get(COLLECTION)
    if not isinstance(mark, dict):
        return None
    if "settings" in mark:  # format 1
        return mark
    return {"settings": attrs.get("settings"), "members": attrs.get("members") or []}


def is_collection(store: str | os.PathLike) -> bool:
    """Whether ``store`` is a collection store (not a single-image feature store).

    An unreadable root counts as not a collection, so that :func:`open_features` names the
    damage and the fix.
    """
    try:
        attrs = _root_attrs(Path(store))
    except StoreError:
        return False
    return _collection_meta(attrs) is not None


class CollectionStore:
    """Check, create and update a collection store; member stores are :class:`RunStore` s.

    Constructing one only reads: an existing collection with other ``settings`` is refused
    unless ``overwrite`` (then replaced at :meth:`create`).

    Parameters
    ----------
    path : str or os.PathLike
        Folder of the collection's Zarr group.
    settings : dict
        What every member shares (backbone, transforms, tiling, intensity policy...).
    overwrite : bool, optional
        Replace an existing collection instead of resuming or refusing it.
    """

    def __init__(
        self, path: str | os.PathLike, *, settings: dict[str, Any], overwrite: bool = False
    ) -> None:
        self.path = Path(path)
        self.settings = _jsonable(settings)
        self.overwrite = overwrite
        _check_target(self.path)
        self.rows: dict[str, dict[str, Any]] = {}
        attrs = _root_attrs(self.path)
        self.exists = attrs is not None and not overwrite
        if attrs is None or overwrite:
            return
        meta = _collection_meta(attrs)
        if meta is None:
            kind = "a single-image feature store" if ATTR in attrs else "not a collection store"
            raise StoreError(
                f"{str(self.path)!r} is {kind}; refusing to write a collection into it. Choose "
                "a new path, or --overwrite to replace it."
            )
        if meta.get("settings") != self.settings:
            old = meta.get("settings") or {}
            diff = sorted(k for k in {*old, *self.settings} if old.get(k) != self.settings.get(k))
            raise StoreError(
                f"Collection {str(self.path)!r} was made with other settings (differs in: "
                f"{', '.join(diff)}). Use overwrite=True (CLI: --overwrite) to replace it, or "
                "write to a new path."
            )
        self.rows = {row["key"]: row for row in meta.get("members") or []}

    def member_path(self, key: str) -> Path:
        """The folder of member ``key``'s feature store."""
        return self.path / key

    def create(self) -> None:
        """Write the empty collection group (replacing an old one with ``overwrite``)."""
        if self.exists:
            return
        if self.overwrite and self.path.exists():
            _clear(self.path)  # but the writer lock, held by the run that replaces it
        self.path.mkdir(parents=True, exist_ok=True)
        self.exists = True
        self._write()

    def record(self, key: str, *, save: bool = True, **row: Any) -> None:
        """Set member ``key``'s row (the columns given; the others kept) and save the table.

        With ``save=False`` the row is only kept in memory until the next :meth:`save` (or
        saved record): rewriting the whole table for each of many members costs O(N²).
        """
        current = self.rows.get(key) or {c: None for c in TABLE_COLUMNS}
        self.rows[key] = _jsonable({**current, "key": key, **row})
        if save:
            self._write()

    def save(self) -> None:
        """Write the members table as it stands in memory."""
        self._write()

    def _write(self) -> None:
        # not consolidated: the consolidation is dropped until the run ends (consolidate); a
        # document written whole as a file (the bytes Zarr's attrs.put writes, io.nodes)
        attrs = {
            COLLECTION: {"format": _FORMAT},
            "settings": self.settings,
            "members": list(self.rows.values()),
        }
        write_document(self.path, group_metadata(_jsonable(attrs)), atomic=True)

    def consolidate(self) -> None:
        """Consolidate the root's metadata over the ``done`` members (call when a run ends).

        A member that completed without consolidating (interrupted just before) is
        consolidated first. Failed and pending members stay out: plain xarray sees the members
        :func:`open_collection` shows.
        """
        nodes = {}
        for key, row in self.rows.items():
            path = self.member_path(key)
            if row.get("status") != "done" or not (path / "zarr.json").exists():
                continue
            if not is_consolidated(path):
                publish_metadata(path)
            nodes[key] = read_metadata(path)  # its document, consolidated: one file read
        root = read_metadata(self.path)
        meta = dataclasses.replace(root, consolidated_metadata=ConsolidatedMetadata(metadata=nodes))
        write_document(self.path, meta, atomic=True)  # never a half-written root


def read_members(store: str | os.PathLike) -> list[dict[str, Any]]:
    """The members table of a collection store (one dict a row, in the store's order)."""
    meta = _collection_meta(_root_attrs(Path(store)))
    if meta is None:
        raise StoreError(f"{str(store)!r} is not a hrdv2_dask collection store.")
    return list(meta.get("members") or [])


def members_csv(rows: list[dict[str, Any]]) -> str:
    """The members table as CSV text (shapes and pixel sizes as ``AxB``).

    >>> print(members_csv([{"key": "a", "shape": [2, 3, 1], "status": "done"}]).strip())
    key,source,shape,pixel_size,status,error,windows,seconds
    a,,2x3x1,,done,,,
    """
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {}
        for col in TABLE_COLUMNS:
            value = row.get(col)
            if isinstance(value, list):
                value = "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
            cells[col] = "" if value is None else value
        writer.writerow(cells)
    return out.getvalue()


def open_collection(store: str | os.PathLike) -> xr.DataTree:
    """Open a collection store lazily as an :class:`xarray.DataTree`.

    Parameters
    ----------
    store : str or os.PathLike
        A store written by :func:`hrdv2_dask.extract_collection`.

    Returns
    -------
    xarray.DataTree
        One child per ``done`` member, named by its key, holding the ``features`` DataArray
        that :func:`~hrdv2_dask.io.store.open_features` gives for that member (same dims,
        coords and attrs, dask-backed; the child's attrs are the member group's, as
        ``xarray.open_zarr`` gives them); the root's attrs hold the collection's ``settings``
        and its ``members`` table (every member, with its status). Nothing is computed. Once a
        run has ended, ``xarray.open_datatree(store, engine="zarr")`` gives the same tree.

    Raises
    ------
    StoreError
        Not a collection store.
    """
    path = Path(store)
    attrs = _root_attrs(path)
    meta = _collection_meta(attrs)
    if meta is None:
        raise StoreError(
            f"{str(path)!r} is not a hrdv2_dask collection store; open a single-image store "
            "with open_features."
        )
    rows = list(meta.get("members") or [])
    old = "settings" in attrs[COLLECTION]  # format 1
    nodes: dict[str, Any] = {"/": xr.Dataset(attrs=dict(meta) if old else attrs)}
    for row in rows:
        if row.get("status") == "done":
            member = path / row["key"]
            ds = open_features(member).to_dataset()
            nodes[f"/{row['key']}"] = ds.assign_attrs(_root_attrs(member))
    return xr.DataTree.from_dict(nodes)
