"""The members of a collection: what a list, folder, glob, ``.txt``/``.csv`` list or stack holds.

:func:`list_members` turns the ``sources`` of :func:`hrdv2_dask.extract_collection` into
:class:`Member` records with deterministic, unique keys; it reads no pixels (a stack file's
header, to count its planes). The key rules are pure functions (:func:`member_keys`,
:func:`plane_key`), tested alone.

- a folder (not itself a Zarr store): every image file and Zarr store in it, sorted by name;
- a glob pattern (``*``, ``?``, ``[``): the matches, sorted;
- a ``.txt`` file: one path a line (``#`` comments, blank lines skipped), relative to the file;
- a ``.csv`` file: columns ``path`` and optionally ``key``, ``level``, ``mask``;
- a list of paths or arrays, in that order;
- one image: one member, or, for a stack whose Z or T axis is longer than 1, one per plane
  (keys ``z000``, ``t012``...).

A path that does not exist or cannot be opened is a member with an ``error``, not a crash.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, Hrdv2Error, InputError
from ..io.readers import open_image

__all__ = ["Member", "Members", "list_members", "member_keys", "plane_key"]

#: File names a folder's images are recognised by (Zarr stores are folders).
IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".png", ".jpg", ".jpeg", ".npy")
_STEM_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", *IMAGE_SUFFIXES, ".zarr")
_GLOB = re.compile(r"[*?\[]")
_CSV_COLUMNS = ("path", "key", "level", "mask")


@dataclass(frozen=True)
class Member:
    """One image of a collection.

    Parameters
    ----------
    key : str
        Unique name: the member's group in the collection store.
    source : str or array
        What :func:`~hrdv2_dask.io.open_image` opens.
    label : str
        How the members table shows the source (a path, ``stack.tif[z=3]``, ``array 2``).
    plane : int, optional
        The plane of a stack.
    level, mask : optional
        Per-member pyramid level and mask (from a ``.csv``); None: the run's option.
    error : str, optional
        Why the member cannot be read (set when listing found it so).
    """

    key: str
    source: Any
    label: str
    plane: int | None = None
    level: int | None = None
    mask: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Members:
    """The members of a collection, in order; ``stack``: the planes of one stack file."""

    members: tuple[Member, ...]
    stack: bool = False
    single: bool = False  # one image given as one path or array (no folder, list or stack)

    def __len__(self) -> int:
        return len(self.members)


def plane_key(axis: str, index: int, count: int) -> str:
    """The key of plane ``index`` of ``count`` along ``axis``, zero-padded to sort in order.

    >>> plane_key("Z", 3, 6), plane_key("T", 12, 1500)
    ('z003', 't0012')
    """
    return f"{axis.lower()}{index:0{max(3, len(str(count - 1)))}d}"


def _stem(path: str) -> str:
    name = Path(path.rstrip("/\\")).name
    lower = name.lower()
    for suffix in _STEM_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _clean(text: str) -> str:
    """A key usable as a Zarr node name: letters, digits, ``.``, ``_``, ``-``.

    >>> _clean("slide 1 (HE)"), _clean("__x")
    ('slide_1__HE_', 'x')
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("_.") or "image"


def member_keys(paths: Sequence[str]) -> list[str]:
    """Unique keys for ``paths``: file stems, prefixed by as many parent folders as tell
    colliding stems apart, then numbered (``-2``, ``-3``) where folders do not.

    >>> member_keys(["a/x.tif", "b/x.tif", "c/y.png", "y.png", "s/z.ome.tif"])
    ['a_x', 'b_x', 'c_y', 'y', 'z']
    >>> member_keys(["s/x.tif", "s/x.png", "a/s/w.png", "b/s/w.png"])
    ['x', 'x-2', 'a_s_w', 'b_s_w']
    """
    stems = [_clean(_stem(p)) for p in paths]
    parts = [Path(p).parts[:-1] for p in paths]
    keys = list(stems)
    for depth in range(1, max((len(p) for p in parts), default=0) + 1):
        new = list(keys)
        for key in {k for k in keys if keys.count(k) > 1}:
            group = [n for n, k in enumerate(keys) if k == key]
            if len({parts[n][-depth:] for n in group}) > 1:
                for n in group:
                    new[n] = _clean("_".join([*parts[n][-depth:], stems[n]]))
        keys = new
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
        out.append(key if seen[key] == 1 else f"{key}-{seen[key]}")
    return out


def _is_zarr(path: Path) -> bool:
    return any((path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup", ".zattrs"))


def _folder_images(folder: Path) -> list[str]:
    found = [
        str(p)
        for p in sorted(folder.iterdir())
        if (p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)) or (p.is_dir() and _is_zarr(p))
    ]
    if not found:
        raise InputError(
            f"Folder {str(folder)!r} holds no images (files ending in "
            f"{', '.join(IMAGE_SUFFIXES)}, or Zarr stores); point at the folder of the images."
        )
    return found


def _text_list(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    paths = [_relative(line, path) for line in lines if line and not line.startswith("#")]
    if not paths:
        raise InputError(f"List {str(path)!r} names no images (one path a line); add paths.")
    return paths


def _relative(entry: str, listing: Path) -> str:
    p = Path(entry).expanduser()
    return str(p if p.is_absolute() else listing.parent / p)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise InputError(
                f"CSV list {str(path)!r} has no 'path' column (columns: {columns}); the first "
                "line must name the columns, e.g. path,key,level,mask."
            )
        unknown = sorted(set(columns) - set(_CSV_COLUMNS))
        if unknown:
            raise InputError(
                f"CSV list {str(path)!r} has unknown columns {unknown}; known: "
                f"{list(_CSV_COLUMNS)}."
            )
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    rows = [r for r in rows if r.get("path")]
    if not rows:
        raise InputError(f"CSV list {str(path)!r} names no images; add rows with a path.")
    return rows


def _csv_members(path: Path) -> list[Member]:
    rows = _csv_rows(path)
    paths = [_relative(r["path"], path) for r in rows]
    keys = member_keys(paths)
    first: dict[str, int] = {}
    members = []
    for n, (row, src) in enumerate(zip(rows, paths, strict=True)):
        key = _clean(row["key"]) if row.get("key") else keys[n]
        if key in first:
            raise InputError(
                f"CSV list {str(path)!r}: rows {first[key] + 2} and {n + 2} have the same key "
                f"{key!r}; give each row its own key."
            )
        first[key] = n
        level = row.get("level") or None
        if level is not None and not level.isdigit():
            raise InputError(
                f"CSV list {str(path)!r}, row {n + 2}: level must be an integer >= 0, got "
                f"{level!r}."
            )
        mask = row.get("mask") or None
        if mask is not None and mask not in ("auto", "auto-dark"):
            mask = _relative(mask, path)
        members.append(
            Member(key, src, src, level=None if level is None else int(level), mask=mask)
        )
    return members


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _expand_image(
    source: Any, key: str, label: str, *, axes: str | None, level: int
) -> tuple[list[Member], bool]:
    """One image's members (its planes, for a stack) and whether it is a stack."""
    try:
        _, meta = open_image(source, axes, level=level, plane=0)
    except Hrdv2Error as err:
        return [Member(key, source, label, error=_one_line(err))], False
    if meta.plane_axis is None or (meta.planes or 1) <= 1:
        return [Member(key, source, label)], False
    n = int(meta.planes)
    return [
        Member(
            plane_key(meta.plane_axis, k, n),
            source,
            f"{label}[{meta.plane_axis.lower()}={k}]",
            plane=k,
        )
        for k in range(n)
    ], True


def _paths_of(source: str | os.PathLike) -> list[str] | list[Member] | None:
    """The entries a folder, glob, ``.txt`` or ``.csv`` source lists; None for one image."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir() and not _is_zarr(path):
        return _folder_images(path)
    if not path.exists() and _GLOB.search(text):
        matches = sorted(glob.glob(str(path)))
        if not matches:
            raise InputError(f"Glob pattern {text!r} matches no file; check the pattern.")
        return matches
    if path.is_file() and path.suffix.lower() == ".txt":
        return _text_list(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _csv_members(path)
    return None


def list_members(sources: Any, *, axes: str | None = None, level: int = 0) -> Members:
    """The members of ``sources`` (see the module's docstring), in a deterministic order.

    Parameters
    ----------
    sources : path, array, or list of paths and arrays
        A folder, glob, ``.txt``/``.csv`` list, one image or stack, or a list.
    axes : str, optional
        Axes of the sources (as :func:`~hrdv2_dask.io.open_image` takes them).
    level : int, optional
        Pyramid level (a ``.csv`` row's ``level`` wins).

    Raises
    ------
    InputError
        An empty folder, a glob without a match, an empty list, duplicate ``.csv`` keys.
    """
    if isinstance(sources, str | os.PathLike):
        listed = _paths_of(sources)
        if listed is None:
            label = str(Path(os.fspath(sources)).expanduser())
            members, stack = _expand_image(
                sources, _clean(_stem(label)), label, axes=axes, level=level
            )
            return Members(tuple(members), stack=stack, single=not stack)
        if listed and isinstance(listed[0], Member):
            return Members(tuple(_checked(m, axes, level) for m in listed))
        sources = listed
    elif not isinstance(sources, list | tuple):
        if not hasattr(sources, "ndim"):
            raise ConfigError(
                f"sources must be a path (image, stack, folder, glob, .txt or .csv list), an "
                f"array or a list of them, got {type(sources).__name__}."
            )
        members, stack = _expand_image(sources, "image", "array", axes=axes, level=level)
        return Members(tuple(members), stack=stack, single=not stack)
    if not sources:
        raise InputError("The list of sources is empty; give at least one image.")
    return Members(tuple(_list_items(list(sources), axes=axes, level=level)))


def _checked(member: Member, axes: str | None, level: int) -> Member:
    """A ``.csv`` member with the error of a path that cannot be opened."""
    try:
        open_image(member.source, axes, level=level if member.level is None else member.level)
    except Hrdv2Error as err:
        return Member(**{**member.__dict__, "error": _one_line(err)})
    return member


def _list_items(items: list, *, axes: str | None, level: int) -> list[Member]:
    """Members of a list of paths and arrays; a stack file among them gives one per plane."""
    paths = [os.fspath(s) if isinstance(s, str | os.PathLike) else None for s in items]
    keys = member_keys([p for p in paths if p is not None])
    width = max(3, len(str(len(items) - 1)))
    out: list[Member] = []
    k = 0
    for n, (item, path) in enumerate(zip(items, paths, strict=True)):
        if path is None:
            key, label = f"image{n:0{width}d}", f"array {n}"
        else:
            key, label, k = keys[k], str(Path(path).expanduser()), k + 1
        members, stack = _expand_image(item, key, label, axes=axes, level=level)
        if stack:
            members = [Member(**{**m.__dict__, "key": f"{key}_{m.key}"}) for m in members]
        out.extend(members)
    return out
