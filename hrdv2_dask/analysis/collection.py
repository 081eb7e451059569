"""Analyses across a collection: its members, one sample drawn across them, outputs per member.

Every analysis takes one feature store (a ``(feature, y, x)`` :class:`xarray.DataArray`) or a
collection (the :class:`xarray.DataTree` of :func:`~hrdv2_dask.io.collection.open_collection`,
one child per member). On a collection it fits once, on a bounded seeded sample drawn across the
members (:func:`draw_members`), and applies that one model to each member, so PCA colours and
cluster labels mean the same thing in every image. The collection options every analysis has
are defined once, in :class:`AcrossMembers`, which the analyses' options classes extend.

Outputs of a collection (:func:`write_members`)::

    OUT/<key>/...          the files one store gives, for each member
    OUT/contact_sheet.png  the members' pictures side by side, each with its key
    OUT/summary.json       the figures of the fit and each member's files
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import dask.array as da
import numpy as np
import xarray as xr

from ..config import Settings, option
from ..errors import InputError
from ..io.collection import is_collection, open_collection
from ..io.sheets import write_contact_sheet
from ..io.store import open_features
from ._common import feature_data
from .sampling import count_chunk_pixels, draw_pixels

__all__ = [
    "KEYS",
    "SAMPLES",
    "AcrossMembers",
    "MemberOptions",
    "allocate",
    "draw_members",
    "feature_settings",
    "is_tree",
    "map_members",
    "member_data",
    "members",
    "open_store",
    "write_members",
]

log = logging.getLogger(__name__)

#: How a sample is shared between members: as many pixels from each, or in proportion.
SAMPLES = ("balanced", "proportional")
#: The metavar of options that hold member keys (``a,b`` on the command line is two keys).
KEYS = "KEY,..."
#: The variable a collection's member nodes hold.
FEATURES = "features"


def split_keys(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Member keys with comma-separated items split (``("a,b", "c")`` -> ``("a", "b", "c")``).

    >>> split_keys(("a,b", " c")), split_keys(None)
    (('a', 'b', 'c'), None)
    """
    if value is None:
        return None
    return tuple(k.strip() for item in value for k in str(item).split(",") if k.strip())


@dataclass(frozen=True)
class MemberOptions(Settings):
    """The collection option of every analysis: which members (options classes extend it).

    ``images`` on a single store is an error. Fields whose metavar is :data:`KEYS` take
    comma-separated keys on the command line.
    """

    SECTION: ClassVar[str] = ""

    images: tuple[str, ...] | None = option(
        None,
        "on a collection: the members to fit on and apply to (keys; default all)",
        metavar=KEYS,
        fix="Give member keys, e.g. [z000, z002] (on the command line --images z000,z002).",
    )

    def __post_init__(self) -> None:
        keys = [
            f.name
            for f in dataclasses.fields(self)
            if f.metadata.get("spec") is not None and f.metadata["spec"].metavar == KEYS
        ]
        for name in keys:  # "a,b" (the command line) is the list [a, b]
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, split_keys((getattr(self, name),)))
        super().__post_init__()
        for name in keys:
            object.__setattr__(self, name, split_keys(getattr(self, name)))


@dataclass(frozen=True)
class AcrossMembers(MemberOptions):
    """The collection options of every analysis that fits a model: which members, and how
    the fit sample is shared between them. Without effect on a single store."""

    sample: str = option(
        "balanced",
        "on a collection: draw the fit sample evenly from the members (balanced) or in "
        "proportion to their pixels (proportional)",
        choices=SAMPLES,
    )


# ---------------------------------------------------------------------------------------------
# Stores and members
# ---------------------------------------------------------------------------------------------


def is_tree(features: Any) -> bool:
    """Whether ``features`` is a collection (a DataTree) rather than one store."""
    return isinstance(features, xr.DataTree)


def open_store(path: str | os.PathLike) -> xr.DataArray | xr.DataTree:
    """Open a feature store (a DataArray) or a collection store (a DataTree), lazily."""
    return open_collection(path) if is_collection(path) else open_features(path)


def all_keys(tree: xr.DataTree) -> list[str]:
    """Every member key of a collection, failed ones included, in the table's order."""
    rows = tree.attrs.get("members") or []
    keys = [str(r["key"]) for r in rows if isinstance(r, Mapping) and "key" in r]
    return keys or list(tree.children)


def check_keys(tree: xr.DataTree, keys: Sequence[str], what: str) -> None:
    """Raise a one-line InputError for a key in ``keys`` that is no member of ``tree``."""
    known = list(tree.children)
    for key in keys:
        if key not in known:
            failed = key in all_keys(tree)
            why = "is a member that failed (no features)" if failed else "is not a member"
            raise InputError(
                f"{what} {key!r} {why} of the collection; its members with features are "
                f"{known} (`hrdv2 info STORE` lists them)."
            )


def members(
    features: Any, images: Sequence[str] | None = None, *, what: str = "images"
) -> list[tuple[str | None, xr.DataArray]]:
    """``(key, features)`` of each member to use: ``[(None, features)]`` for one store.

    Raises
    ------
    InputError
        An unknown key in ``images``; ``images`` given for a single store; a collection
        without any member with features.
    """
    if not is_tree(features):
        if images:
            raise InputError(
                f"{what}={list(images)} selects members of a collection, but the features are "
                "one store; drop it, or pass a collection store."
            )
        return [(None, features)]
    keys = list(features.children)
    if not keys:
        raise InputError(
            "The collection has no member with features (all failed or pending); complete it "
            "with `hrdv2 features` (--retry-failed) first."
        )
    if images:
        check_keys(features, images, "Member")
        keys = [k for k in keys if k in set(images)]
    return [(k, member_data(features, k)) for k in keys]


def member_data(tree: xr.DataTree, key: str) -> xr.DataArray:
    """The ``(feature, y, x)`` features of member ``key``."""
    node = tree[key]
    if FEATURES not in node.data_vars:
        raise InputError(f"Member {key!r} holds no {FEATURES!r} array; is this a feature store?")
    return node[FEATURES]


def member_arrays(mems: list[tuple[str | None, xr.DataArray]]) -> list[da.Array]:
    """The checked dask data of each member; every member must have the same features."""
    datas = [feature_data(arr)[1] for _, arr in mems]
    counts = {int(d.shape[0]) for d in datas}
    if len(counts) > 1:
        sizes = {k: int(d.shape[0]) for (k, _), d in zip(mems, datas, strict=True)}
        raise InputError(
            f"The members have different feature counts {sizes}; analyse members made with "
            "the same backbone together."
        )
    return datas


def map_members(features: Any, fn: Callable[[xr.DataArray], xr.DataArray], images=None) -> Any:
    """``fn(features)`` for one store; for a collection a DataTree of ``fn`` per member."""
    if not is_tree(features):
        return fn(features)
    nodes: dict[str, Any] = {"/": xr.Dataset(attrs=dict(features.attrs))}
    for key, arr in members(features, images):
        out = fn(arr)
        nodes[f"/{key}"] = out.to_dataset(name=out.name or "result")
    return xr.DataTree.from_dict(nodes)


#: The feature settings a fitted model records (from the store's attrs); those in
#: :data:`MATCH` must be equal for the model to apply to another store.
RECORD = (
    "model",
    "layer",
    "facet",
    "attention",
    "stride",
    "patch_size",
    "transforms",
    "out_stride",
    "components",
    "debias",
    "random_weights",
    "random_seed",
    "weights",
    "weights_origin",
    "tile_px",
    "overlap_px",
    "dtype",
    "precision",
)
#: Settings that only record how the features were made (weights file, window geometry,
#: storage, arithmetic): a model applies across them.
_INFORMATIVE = (
    "random_weights",
    "weights",
    "weights_origin",
    "tile_px",
    "overlap_px",
    "dtype",
    "precision",
)
MATCH = (*(k for k in RECORD if k not in _INFORMATIVE), "n_features")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _short(value: Any) -> str:
    """``repr`` of a setting, long lists shortened (transforms)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def feature_settings(features: Any) -> dict[str, Any]:
    """The settings of the features a model is fitted on (for a collection, its first member).

    The keys of :data:`RECORD` found in the store's attrs, plus ``n_features``.
    """
    arr = members(features)[0][1] if is_tree(features) else features
    attrs = arr.attrs
    out = {k: _plain(attrs[k]) for k in RECORD if attrs.get(k) is not None}
    out["n_features"] = int(arr.sizes["feature"]) if "feature" in arr.sizes else None
    return out


def check_settings(settings: Mapping[str, Any] | None, features: Any, what: str) -> None:
    """Refuse features made with other settings than the model's (one line, the first one).

    Only the keys of :data:`MATCH` count; a key missing on either side (e.g. features built in
    memory without attrs) is not compared.
    """
    if not settings:
        return
    for key, arr in members(features) if is_tree(features) else [(None, features)]:
        have = feature_settings(arr)
        differ = [
            n for n in MATCH if n in settings and n in have and _plain(settings[n]) != have[n]
        ]
        if differ:
            where = f"member {key!r}" if key is not None else "these features"
            ours = ", ".join(f"{n}={_short(settings[n])}" for n in differ)
            theirs = ", ".join(f"{n}={_short(have[n])}" for n in differ)
            raise InputError(
                f"{what} was fitted on features with {ours} but {where} have {theirs}; apply "
                "it to stores made with the same settings, or fit a new model on this store."
            )


# ---------------------------------------------------------------------------------------------
# One sample across members
# ---------------------------------------------------------------------------------------------


def allocate(available: Sequence[int], n: int, sample: str, rng: np.random.Generator) -> np.ndarray:
    """How many of ``n`` sampled pixels each member gives (never more than it has).

    ``balanced``: the same number from each member, the share of a member with too few pixels
    going to the others; ``proportional``: a multivariate hypergeometric draw (each pixel of the
    collection equally likely).

    >>> rng = np.random.default_rng(0)
    >>> allocate([100, 5, 100], 60, "balanced", rng).tolist()
    [28, 5, 27]
    >>> int(allocate([100, 300], 40, "proportional", rng).sum())
    40
    """
    avail = np.asarray(available, dtype=np.int64)
    if n >= avail.sum():
        return avail.copy()
    if sample == "proportional":
        return rng.multivariate_hypergeometric(avail, n, method="marginals")
    take = np.zeros_like(avail)
    left = int(n)
    while left > 0:
        open_ = np.flatnonzero(take < avail)
        share = left // len(open_)
        if share == 0:
            take[open_[:left]] += 1
            break
        add = np.minimum(share, avail[open_] - take[open_])
        take[open_] += add
        left -= int(add.sum())
    return take


def draw_members(
    datas: Sequence[da.Array],
    *,
    n: int,
    seed: int,
    sample: str = "balanced",
    masks: Sequence[da.Array | None] | None = None,
    values: Sequence[da.Array | None] | None = None,
    max_chunks: int | None = 64,
    counts: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Random pixels drawn across members: features, positions, member index, values.

    With one member this is :func:`~hrdv2_dask.analysis.sampling.draw_pixels` itself (the same
    pixels as before collections existed). With several, :func:`allocate` shares ``n`` between
    them by their selectable pixels (``masks``) and each member is drawn with its own seed
    ``(seed, index)``, reading at most ``max_chunks`` of its chunks; the result is shuffled.
    ``counts`` are the members' :func:`~hrdv2_dask.analysis.sampling.count_chunk_pixels`
    when already known.

    Returns
    -------
    tuple
        ``(m, C)`` float32 features, ``(m, 2)`` int64 ``(y, x)`` in each member's grid,
        ``(m,)`` int64 member index, and ``(m,)`` values (or None without ``values``).
    """
    k = len(datas)
    masks = list(masks) if masks is not None else [None] * k
    values = list(values) if values is not None else None
    if k == 1:
        x, pos, vals = draw_pixels(
            datas[0],
            n=n,
            seed=seed,
            mask=masks[0],
            values=None if values is None else values[0],
            max_chunks=max_chunks,
            counts=None if counts is None else counts[0],
        )
        return x, pos, np.zeros(len(x), np.int64), vals
    if counts is None:
        counts = [count_chunk_pixels(d, m) for d, m in zip(datas, masks, strict=True)]
    totals = [int(c.sum()) for c in counts]
    if not any(totals):
        raise InputError(
            "The masks or labels select no pixel in any member; pass labels or masks with at "
            "least one selected pixel."
        )
    rng = np.random.default_rng(seed)
    take = allocate(totals, n, sample, rng)
    parts = []
    for i, (d, m, c, t) in enumerate(zip(datas, masks, counts, take, strict=True)):
        if t == 0:
            continue
        v = None if values is None else values[i]
        x, pos, vals = draw_pixels(
            d, n=int(t), seed=int(np.random.default_rng([seed, i]).integers(2**62)),
            mask=m, values=v, max_chunks=max_chunks, counts=c,
        )  # fmt: skip
        parts.append((x, pos, np.full(len(x), i, np.int64), vals))
    x = np.concatenate([p[0] for p in parts])
    pos = np.concatenate([p[1] for p in parts])
    member = np.concatenate([p[2] for p in parts])
    vals = None if values is None else np.concatenate([p[3] for p in parts])
    order = rng.permutation(len(x))
    log.debug("sampled %s pixels from %d members (%s)", take.tolist(), k, sample)
    return x[order], pos[order], member[order], None if vals is None else vals[order]


# ---------------------------------------------------------------------------------------------
# Outputs per member
# ---------------------------------------------------------------------------------------------


def write_members(
    features: Any,
    out: str | os.PathLike,
    write_one: Callable[[xr.DataArray, Path], dict],
    *,
    images: Sequence[str] | None = None,
    picture: str | None = None,
    figures: Mapping[str, Any] | None = None,
) -> dict:
    """Write an analysis's outputs for one store, or for each member of a collection.

    Parameters
    ----------
    features : xarray.DataArray or xarray.DataTree
        One store, or a collection.
    out : path
        The output folder (created).
    write_one : callable
        ``write_one(features, folder) -> dict``: writes one store's files into ``folder`` and
        names them.
    images : sequence of str, optional
        Members to write (default all).
    picture : str, optional
        The file name of the PNG each member gets, for the contact sheet.
    figures : mapping, optional
        Figures of the fit (e.g. explained variance), in the summary.

    Returns
    -------
    dict
        One store: ``write_one``'s dict plus ``figures``. A collection: ``figures``,
        ``members`` (key -> ``write_one``'s dict), ``left_out`` (members of the table without
        features, if any), ``contact_sheet`` and ``summary`` (the path of ``summary.json``,
        which holds this same dict).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not is_tree(features):
        return {**write_one(features, out), **(figures or {})}
    done: dict[str, Any] = {}
    tiles = []
    for key, arr in members(features, images):
        folder = out / key
        folder.mkdir(parents=True, exist_ok=True)
        done[key] = write_one(arr, folder)
        if picture and (folder / picture).is_file():
            tiles.append((key, folder / picture))
    summary: dict[str, Any] = {**(figures or {}), "members": done}
    failed = [k for k in all_keys(features) if k not in features.children]
    if failed:  # members without features (failed or pending): named, not silently missing
        summary["left_out"] = failed
    if tiles:
        write_contact_sheet(tiles, out / "contact_sheet.png")
        summary["contact_sheet"] = str(out / "contact_sheet.png")
    summary["summary"] = str(out / "summary.json")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("wrote %d members under %s", len(done), out)
    return summary
