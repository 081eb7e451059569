"""Retrieval: a FAISS index of region and image embeddings, and queries against it.

:func:`build_index` embeds every ``R x R`` region of output cells of every member of a store
or collection (the mean of its L2-normalised features, normalised again;
:mod:`.embeddings`) and every member as a whole, chunk by chunk, and writes::

    INDEX/
      regions.faiss    the region vectors (inner product = cosine)
      regions.parquet  one row per vector: key, y0, x0, y1, x1 (source pixels, half-open)
      images.faiss     one vector per member (exact, IndexFlatIP)
      images.parquet   key, y0, x0, y1, x1 (the whole image)
      index.json       the settings, the members (store, source, grid) -- written last

Regions with fewer than :data:`~.embeddings.MIN_VALID` of their cells valid (masked cells
are NaN) are left out. The region index is exact (``IndexFlatIP``) up to :data:`FLAT_MAX`
candidate regions and IVF-PQ above (``kind="auto"``): a flat index of 10^6 vectors of 384
float32 is 1.5 GB and answers in tens of milliseconds on two cores; IVF-PQ stores 48 bytes a
vector (benchmarks/RESULTS.md, "Retrieval"). :func:`search` embeds a query the same way (a
point: the R x R cells around it) and returns the ``k`` nearest regions.

faiss and pyarrow are the ``retrieval`` extra (``pip install 'hrdv2-dask[retrieval]'``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import dask
import numpy as np
import xarray as xr

from ..config import Settings, option
from ..errors import ConfigError, InputError, MissingExtraError, StoreError
from ._common import feature_data
from .embeddings import MIN_VALID, Regions, embeddings_of, region_sums
from .queries import Query, as_texts, parse_queries, query_cells, query_vector, resolve_key

__all__ = [
    "FLAT_MAX",
    "IndexOptions",
    "SearchOptions",
    "build_index",
    "load_index",
    "open_members",
    "search",
]

log = logging.getLogger(__name__)

#: ``kind="auto"``: an exact flat index up to this many candidate regions, IVF-PQ above.
FLAT_MAX = 200_000
_VERSION = 1
_INDEX_JSON = "index.json"
_FILES = ("regions.faiss", "regions.parquet", "images.faiss", "images.parquet", _INDEX_JSON)
_COLUMNS = ("key", "y0", "x0", "y1", "x1")
#: IVF-PQ: vectors used to train (per inverted list) and the seed of their sample.
_TRAIN_PER_LIST = 40
_SEED = 0


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise MissingExtraError(_missing("faiss-cpu", err)) from None
    return faiss


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as err:
        raise MissingExtraError(_missing("pyarrow", err)) from None
    return pyarrow


def _missing(package: str, err: ImportError) -> str:
    return (
        f"Retrieval needs {package}, which is not installed ({err}); install it with "
        "`pip install 'hrdv2-dask[retrieval]'` (faiss-cpu and pyarrow)."
    )


# --- options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexOptions(Settings):
    """The options of :func:`build_index` and of ``hrdv2 index``."""

    SECTION: ClassVar[str] = "index"

    region: int = option(8, "region side R in output cells: one embedding per R x R", minimum=1)
    kind: str = option(
        "auto",
        f"auto: exact (flat) up to {FLAT_MAX} regions, IVF-PQ above",
        choices=("auto", "flat", "ivfpq"),
    )
    overwrite: bool = option(False, "replace an existing index")


@dataclass(frozen=True)
class SearchOptions(Settings):
    """The options of :func:`search` and of ``hrdv2 search``: one or more queries."""

    SECTION: ClassVar[str] = "search"

    query: tuple[str, ...] = option(
        (),
        "query point KEY:Y,X in source pixels (the R x R cells around it), repeatable",
        repeat=True,
        metavar="KEY:Y,X",
    )
    query_box: tuple[str, ...] = option(
        (),
        "query box KEY:Y0,X0,Y1,X1 in source pixels, repeatable",
        repeat=True,
        metavar="KEY:Y0,X0,Y1,X1",
    )
    query_mask: tuple[str, ...] = option(
        (),
        "query mask KEY:MASK (an image at source resolution), repeatable",
        repeat=True,
        metavar="KEY:MASK",
    )
    k: int = option(20, "number of hits", minimum=1, short="-k", cli="--top")
    nprobe: int = option(16, "IVF-PQ: inverted lists searched (more: slower, exacter)", minimum=1)

    def _check_together(self) -> None:
        if not (self.query or self.query_box or self.query_mask):
            raise ConfigError(
                "search needs a query: --query KEY:Y,X, --query-box KEY:Y0,X0,Y1,X1 or "
                "--query-mask KEY:MASK (source-image pixels; repeatable, the query is the mean)."
            )
        parse_queries(self.query, self.query_box, self.query_mask)  # malformed: one line


# --- members ---------------------------------------------------------------------------------


def store_key(path: str | os.PathLike) -> str:
    """The key of a single store: its folder name without ``.zarr``.

    >>> store_key("/data/im0.zarr"), store_key("c.zarr/z003")
    ('im0', 'z003')
    """
    name = Path(path).name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def open_members(source: str | os.PathLike) -> dict[str, tuple[Path, xr.DataArray]]:
    """``key -> (store path, features)`` of a store (one member, keyed by :func:`store_key`)
    or a collection (its members with features, in table order)."""
    from .collection import is_tree, members, open_store

    path = Path(source)
    opened = open_store(path)
    if not is_tree(opened):
        return {store_key(path): (path, opened)}
    return {key: (path / key, arr) for key, arr in members(opened)}


# --- building ---------------------------------------------------------------------------------


@dataclass
class _Member:
    key: str
    store: Path
    features: xr.DataArray
    sums: Any  # the lazy region sums
    grid: tuple[int, int]
    stride: int
    source_shape: tuple[int, int]

    def blocks(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """``(block index, first region)`` of every block of the sums, row-major."""
        ry = np.cumsum((0, *self.sums.chunks[1]))
        rx = np.cumsum((0, *self.sums.chunks[2]))
        return [
            ((i, j), (int(ry[i]), int(rx[j])))
            for i in range(len(self.sums.chunks[1]))
            for j in range(len(self.sums.chunks[2]))
        ]

    def pixel_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Cell boxes as source-pixel boxes (cut to the image)."""
        s = self.stride
        px = boxes * s
        px[:, 2] = np.minimum(px[:, 2], self.source_shape[0])
        px[:, 3] = np.minimum(px[:, 3], self.source_shape[1])
        return px


def _member(key: str, store: Path, features: xr.DataArray, region: int) -> _Member:
    features, data = feature_data(features)
    grid = (features.sizes["y"], features.sizes["x"])
    stride = int(features.attrs.get("out_stride", 1))
    shape = features.attrs.get("source_shape") or (grid[0] * stride, grid[1] * stride)
    return _Member(
        key,
        store,
        features,
        region_sums(data, region),
        grid,
        stride,
        (int(shape[0]), int(shape[1])),
    )


def _computed(
    members: Sequence[_Member],
    order: Sequence[tuple[int, tuple[int, int], tuple[int, int]]],
    region: int,
    batch: int,
) -> Iterator[tuple[int, Regions, np.ndarray]]:
    """``(member index, regions, block sums)`` of the blocks in ``order``, computed ``batch``
    at a time (one dask compute each)."""
    for start in range(0, len(order), batch):
        part = order[start : start + batch]
        arrays = [members[m].sums.blocks[(0, *b)] for m, b, _ in part]
        for (m, _, origin), sums in zip(part, dask.compute(*arrays), strict=True):
            regions = embeddings_of(sums, origin=origin, region=region, grid=members[m].grid)
            yield m, regions, sums


def _ivfpq_factory(dim: int, n: int) -> tuple[str, int, int]:
    """The IVF-PQ recipe for ``n`` vectors of ``dim``: ``(factory string, nlist, training
    vectors)``.

    sqrt(n) inverted lists (a power of two), trained on 40 vectors a list (at least 39 * 256,
    what an 8-bit PQ codebook wants); PQ codes of 8 dimensions each, of 8 bits, fewer when
    there are too few vectors to train 256 centroids per sub-quantiser.

    >>> _ivfpq_factory(384, 1_000_000)
    ('IVF1024,PQ48', 1024, 40960)
    >>> _ivfpq_factory(16, 600)
    ('IVF32,PQ2x4', 32, 600)
    """
    nlist = 2 ** max(4, round(math.log2(math.sqrt(max(n, 1)))))
    train = min(n, max(_TRAIN_PER_LIST * nlist, 39 * 256))
    nbits = int(np.clip(math.floor(math.log2(max(train, 1) / 39)), 4, 8))
    m = next(m for m in range(max(dim // 8, 1), 0, -1) if dim % m == 0)
    return f"IVF{nlist},PQ{m}" + ("" if nbits == 8 else f"x{nbits}"), nlist, train


class _Table:
    """A Parquet table written batch by batch (pyarrow.parquet.ParquetWriter)."""

    def __init__(self, path: Path) -> None:
        pa = _pyarrow()
        self.pa = pa
        self.schema = pa.schema([("key", pa.string())] + [(c, pa.int64()) for c in _COLUMNS[1:]])
        self.writer = pa.parquet.ParquetWriter(str(path), self.schema)
        self.rows = 0

    def add(self, key: str, boxes: np.ndarray) -> None:
        if not len(boxes):
            return
        cols = [self.pa.array([key] * len(boxes), self.pa.string())]
        cols += [self.pa.array(boxes[:, i].astype(np.int64)) for i in range(4)]
        self.writer.write_table(self.pa.Table.from_arrays(cols, schema=self.schema))
        self.rows += len(boxes)

    def close(self) -> None:
        self.writer.close()


def _check_target(index: Path, overwrite: bool) -> None:
    """Refuse a file, a foreign folder, or a complete index without ``overwrite``; an
    incomplete index (an interrupted build: no ``index.json``) is replaced."""
    if index.exists() and not index.is_dir():
        raise StoreError(f"Index {str(index)!r} is an existing file; choose a folder path.")
    names = {e.name for e in index.iterdir()} if index.is_dir() else set()
    if names - {*_FILES, ".tmp"}:
        raise StoreError(
            f"Index {str(index)!r} is a non-empty folder that is not an hrdv2 index; refusing "
            "to write into it. Choose a new path."
        )
    if _INDEX_JSON in names and not overwrite:
        raise StoreError(
            f"Index {str(index)!r} exists; pass overwrite=True (CLI: --overwrite) to replace it."
        )


def build_index(
    source: str | os.PathLike,
    index: str | os.PathLike,
    *,
    region: int = IndexOptions.region,
    kind: str = IndexOptions.kind,
    overwrite: bool = IndexOptions.overwrite,
    batch: int | None = None,
) -> dict[str, Any]:
    """Embed every R x R region and every member of a store or collection into a FAISS index.

    Parameters
    ----------
    source : str or os.PathLike
        A feature store or a collection store.
    index : str or os.PathLike
        The index folder to write (see the module docstring for its files).
    region : int, optional
        R, the region side in output cells (``R * out_stride`` source pixels).
    kind : {"auto", "flat", "ivfpq"}, optional
        The region index: exact inner product, IVF-PQ, or by size (:data:`FLAT_MAX`).
    overwrite : bool, optional
        Replace an existing index.
    batch : int, optional
        Blocks computed per dask compute (default: twice the cores).

    Returns
    -------
    dict
        ``path``, ``kind``, ``regions`` (vectors indexed), ``images``, ``region`` and the
        factory string of the region index.

    Raises
    ------
    MissingExtraError
        faiss or pyarrow is not installed.
    StoreError
        ``index`` is a file, a foreign folder, or an existing index without ``overwrite``.
    """
    options = IndexOptions(region=region, kind=kind, overwrite=overwrite)
    faiss, _ = _faiss(), _pyarrow()
    index = Path(index)
    _check_target(index, options.overwrite)
    members = [_member(k, p, f, options.region) for k, (p, f) in open_members(source).items()]
    dims = {m.features.sizes["feature"] for m in members}
    if len(dims) != 1:
        raise InputError(
            f"The members of {str(source)!r} have different feature counts {sorted(dims)}; "
            "index stores made with one backbone."
        )
    dim = dims.pop()
    candidates = sum(int(np.prod(m.sums.shape[1:])) for m in members)
    which = options.kind
    if which == "auto":
        which = "flat" if candidates <= FLAT_MAX else "ivfpq"
    order = [(i, b, o) for i, m in enumerate(members) for b, o in m.blocks()]
    batch = batch or 2 * (os.cpu_count() or 1)
    cache: dict[int, tuple[Regions, np.ndarray]] = {}
    if which == "flat":
        factory = "Flat"
        regions_index = faiss.IndexFlatIP(dim)
    else:
        factory, nlist, need = _ivfpq_factory(dim, candidates)
        regions_index = _trained(
            faiss, factory, dim, nlist, need, members, order, options.region, batch, cache
        )

    if index.exists() and (index / _INDEX_JSON).exists():
        (index / _INDEX_JSON).unlink()  # incomplete from here until written again
    index.mkdir(parents=True, exist_ok=True)
    tmp = index / ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    table = _Table(tmp / "regions.parquet")
    totals = [np.zeros(dim, np.float64) for _ in members]
    pending = [n for n in range(len(order)) if n not in cache]
    stream = _computed(members, [order[n] for n in pending], options.region, batch)
    cached = ((order[n][0], *cache.pop(n)) for n in sorted(cache))
    try:
        # the cached training blocks first, then the others: the same rows, in another order
        for m, regions, sums in itertools.chain(cached, stream):
            member = members[m]
            totals[m] += sums[:dim].sum(axis=(1, 2), dtype=np.float64)
            regions_index.add(regions.vectors)
            table.add(member.key, member.pixel_boxes(regions.boxes))
    finally:
        table.close()
    faiss.write_index(regions_index, str(tmp / "regions.faiss"))
    images = _image_index(faiss, totals, members, dim, tmp / "images.parquet")
    faiss.write_index(images, str(tmp / "images.faiss"))
    for name in _FILES[:-1]:
        os.replace(tmp / name, index / name)
    tmp.rmdir()
    meta = {
        "version": _VERSION,
        "kind": which,
        "factory": factory,
        "region": options.region,
        "min_valid": MIN_VALID,
        "dim": dim,
        "regions": int(regions_index.ntotal),
        "images": int(images.ntotal),
        "members": {
            m.key: {
                "store": str(m.store.resolve()),
                "grid": list(m.grid),
                "out_stride": m.stride,
                "source_shape": list(m.source_shape),
                "source": m.features.attrs.get("source"),
                "value_range": m.features.attrs.get("value_range"),
            }
            for m in members
        },
    }
    (index / _INDEX_JSON).write_text(json.dumps(meta, indent=2, default=str))
    log.info("indexed %d regions of %d members in %s", meta["regions"], len(members), index)
    return {
        "path": str(index),
        "kind": which,
        "factory": factory,
        "regions": meta["regions"],
        "images": meta["images"],
        "region": options.region,
    }


def _trained(faiss, factory, dim, nlist, need, members, order, region, batch, cache):
    """An IVF-PQ index trained on ``need`` vectors from a seeded sample of blocks (kept in
    ``cache`` for adding)."""
    picked = [int(n) for n in np.random.default_rng(_SEED).permutation(len(order))]
    vectors, got = [], 0
    for start in range(0, len(picked), batch):
        part = picked[start : start + batch]
        computed = _computed(members, [order[n] for n in part], region, batch)
        for n, (_, regions, sums) in zip(part, computed, strict=True):
            cache[n] = (regions, sums)
            vectors.append(regions.vectors)
            got += len(regions.vectors)
        if got >= need:
            break
    train = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    if len(train) < nlist:
        raise InputError(
            f"Only {len(train)} regions to index, too few for IVF-PQ with {nlist} lists; use "
            "kind='flat' (CLI: --kind flat)."
        )
    out = new_ivfpq(faiss, factory, dim)
    out.train(train)
    return out


def new_ivfpq(faiss, factory: str, dim: int):
    """An untrained IVF-PQ index for inner products, without polysemous training (which the
    factory switches on, costs most of the training time and only serves Hamming search)."""
    out = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if isinstance(out, faiss.IndexIVFPQ):
        out.do_polysemous_training = False
    return out


def _image_index(faiss, totals, members, dim, table_path: Path):
    vectors = np.zeros((len(members), dim), np.float32)
    keep = []
    for i, total in enumerate(totals):
        norm = float(np.linalg.norm(total))
        if norm > 0:
            vectors[i] = total / norm
            keep.append(i)
    out = faiss.IndexFlatIP(dim)
    out.add(np.ascontiguousarray(vectors[keep]))
    table = _Table(table_path)
    try:
        for i in keep:
            h, w = members[i].source_shape
            table.add(members[i].key, np.array([[0, 0, h, w]]))
    finally:
        table.close()
    return out


# --- searching --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedIndex:
    """An opened index: its settings, the FAISS indexes and the tables (pyarrow)."""

    path: Path
    meta: dict[str, Any]
    regions: Any
    regions_table: Any
    images: Any
    images_table: Any


def load_index(index: str | os.PathLike) -> LoadedIndex:
    """Open an index written by :func:`build_index`.

    Raises
    ------
    StoreError
        Not an index, or an incomplete one (no ``index.json``: its build did not finish).
    """
    faiss, pa = _faiss(), _pyarrow()
    path = Path(index)
    if not (path / _INDEX_JSON).exists():
        what = "an incomplete index (its build did not finish)" if path.is_dir() else "missing"
        raise StoreError(
            f"Index {str(path)!r} is {what}; build it with `hrdv2 index STORE {path}`."
        )
    meta = json.loads((path / _INDEX_JSON).read_text())
    return LoadedIndex(
        path,
        meta,
        faiss.read_index(str(path / "regions.faiss")),
        pa.parquet.read_table(path / "regions.parquet"),
        faiss.read_index(str(path / "images.faiss")),
        pa.parquet.read_table(path / "images.parquet"),
    )


def _region_query(query: Query, member: dict[str, Any], region: int) -> Query:
    """A point query as the box of the R x R cells around it (cut to the grid), in pixels."""
    if query.kind != "point":
        return query
    grid, s = member["grid"], int(member["out_stride"])
    rows, cols = query_cells(
        query, grid=tuple(grid), out_stride=s, source_shape=tuple(member["source_shape"])
    )
    box = []
    for start, n in ((rows.start, grid[0]), (cols.start, grid[1])):
        lo = min(max(start - region // 2, 0), max(n - region, 0))
        box.append((lo, min(lo + region, n)))
    (y0, y1), (x0, x1) = box
    h, w = member["source_shape"]
    return Query("box", query.key, (y0 * s, x0 * s, min(y1 * s, h), min(x1 * s, w)))


def search(
    index: str | os.PathLike | LoadedIndex,
    *,
    query: Sequence[str] = SearchOptions.query,
    query_box: Sequence[str] = SearchOptions.query_box,
    query_mask: Sequence[str] = SearchOptions.query_mask,
    k: int = SearchOptions.k,
    nprobe: int = SearchOptions.nprobe,
    out: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """The ``k`` regions most similar to the mean embedding of the queries.

    Parameters
    ----------
    index : str, os.PathLike or LoadedIndex
        An index folder written by :func:`build_index`.
    query, query_box, query_mask : sequence of str, optional
        ``KEY:Y,X`` (the R x R cells around that source pixel), ``KEY:Y0,X0,Y1,X1`` and
        ``KEY:MASK`` queries on members of the index (the key may be left out on an index of
        one store). The query vector is the normalised mean of their cells' normalised
        features, read from the stores the index records.
    k : int, optional
        Hits to return (fewer when the index holds fewer regions).
    nprobe : int, optional
        Inverted lists searched by an IVF-PQ index (ignored by a flat one).
    out : str or os.PathLike, optional
        A folder for ``hits.json`` and ``contact_sheet.png`` (the point and box queries, then
        the hit regions, cropped from the source images, boxes drawn).

    Returns
    -------
    list of dict
        ``key``, ``box`` (``[y0, x0, y1, x1]`` source pixels) and ``score`` (cosine), best
        first. The query's own region is usually the first hit.

    Raises
    ------
    InputError
        An unknown key or a query outside its member's image.
    """
    options = SearchOptions(
        query=as_texts(query),
        query_box=as_texts(query_box),
        query_mask=as_texts(query_mask),
        k=k,
        nprobe=nprobe,
    )
    loaded = index if isinstance(index, LoadedIndex) else load_index(index)
    meta = loaded.meta
    keys = list(meta["members"])
    where = f"the index {str(loaded.path)!r}"
    queries = []
    for q in parse_queries(options.query, options.query_box, options.query_mask):
        key = resolve_key(q, keys, where)
        q = Query(q.kind, key, q.values, q.path)
        queries.append(_region_query(q, meta["members"][key], int(meta["region"])))
    members = _query_members(meta, {q.key for q in queries})
    vector = query_vector(members, queries, normalise=True, where=where)
    if vector.shape[0] != meta["dim"]:
        raise InputError(
            f"The query has {vector.shape[0]} features but {where} holds {meta['dim']}; the "
            "stores changed since it was built: build it again."
        )
    if loaded.regions.ntotal == 0:
        raise InputError(
            f"{where} holds no region (every region was masked or the stores are empty); "
            "index stores with features."
        )
    if meta["kind"] == "ivfpq":
        _faiss().extract_index_ivf(loaded.regions).nprobe = options.nprobe
    scores, ids = loaded.regions.search(vector[None], min(options.k, loaded.regions.ntotal))
    hits = _hits(loaded.regions_table, ids[0], scores[0])
    if out is not None:
        from .hitsheet import write_hit_sheet

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "hits.json").write_text(json.dumps(hits, indent=2))
        shown = [{"key": q.key, "box": list(q.values)} for q in queries if q.kind == "box"]
        write_hit_sheet(hits, meta["members"], out / "contact_sheet.png", queries=shown)
    return hits


def _query_members(meta: dict[str, Any], keys: set[str]) -> dict[str, xr.DataArray]:
    from ..io.store import open_features

    out = {}
    for key in keys:
        store = meta["members"][key]["store"]
        try:
            out[key] = open_features(store)
        except StoreError as err:
            raise StoreError(
                f"The index records member {key!r} at {store!r}, which cannot be opened now "
                f"({err}); move the store back or build the index again."
            ) from None
    return out


def _hits(table, ids: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
    keep = ids >= 0
    ids, scores = ids[keep], scores[keep]
    rows = table.take(ids.astype(np.int64)).to_pydict()
    return [
        {
            "key": rows["key"][i],
            "box": [int(rows[c][i]) for c in _COLUMNS[1:]],
            "score": round(float(scores[i]), 6),
        }
        for i in range(len(ids))
    ]


def index_vectors(index: str | os.PathLike | LoadedIndex) -> tuple[list[tuple], np.ndarray]:
    """The rows ``(key, y0, x0, y1, x1)`` and vectors of a flat region index (for checks)."""
    loaded = index if isinstance(index, LoadedIndex) else load_index(index)
    if loaded.meta["kind"] != "flat":
        raise ConfigError("index_vectors reads flat indexes only (IVF-PQ codes are lossy).")
    rows = loaded.regions_table.to_pydict()
    table = list(zip(*(rows[c] for c in _COLUMNS), strict=True))
    return table, loaded.regions.reconstruct_n(0, loaded.regions.ntotal)
