"""``retrieval`` suite: index build and search: regions per second, query latency, memory.

Two parts:

* **build**: :func:`hrdv2_dask.build_index` on a synthetic feature store (``G x G`` cells of
  ``D`` float16 features, Zarr chunks of 128 cells, regions of ``R x R`` cells): wall time,
  cells and regions per second (reading, normalising, summing, adding to a flat index and
  writing the Parquet table), then one ``search`` through the store (query embedding read
  from the store + FAISS).
* **latency**: FAISS alone on ``n`` unit vectors of dimension 384 (``10^5`` and ``10^6`` by
  default; made chunk by chunk, never held twice; ``--data clustered``: near-duplicates
  around 4096 random centres, like the regions of a few textures, or ``random``): the flat
  index (``IndexFlatIP``, exact) and the IVF-PQ recipe ``build_index`` uses above
  ``FLAT_MAX`` regions (sqrt(n) lists, 8-bit codes of 8 dimensions, ``nprobe`` 16): build
  time, index size, the latency of single queries (median and 95th percentile of
  ``--queries`` queries, k = 20) and the IVF-PQ recall@20 against the flat index. Random
  vectors have no neighbours to speak of (every cosine ~0 ± 0.05): their recall is a floor.

``--quick`` runs a small store and ``n = 10^4`` vectors of dimension 32 only (the smoke test).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import BackboneSpec, Column, environment, environment_line, markdown_table

__all__ = ["add_arguments", "run", "run_retrieval", "to_markdown", "write_feature_store"]

log = logging.getLogger(__name__)

_CHUNK = 128
_K = 20


def write_feature_store(path: Path, *, grid: int, dim: int, seed: int = 0) -> Path:
    """A complete synthetic feature store (random float16 features, chunk by chunk)."""
    from hrdv2_dask.io.store import RunStore

    settings = {"model": "synthetic", "out_stride": 1, "source_shape": [grid, grid, 1]}
    recipe = {**settings, "dim": dim, "seed": seed}
    store = RunStore(path, settings=recipe, overwrite=True)
    store.create(
        provenance={"package": "hrdv2-dask", "source": {"path": None, "format": "numpy"}},
        shape=(dim, grid, grid),
        chunks=(dim, _CHUNK, _CHUNK),
        dtype="float16",
        blocks=(1, 1),
        halo_shapes={},
    )
    arr = store.group["features"]
    for y0 in range(0, grid, _CHUNK):
        for x0 in range(0, grid, _CHUNK):
            rng = np.random.default_rng([seed, y0, x0])
            h, w = min(_CHUNK, grid - y0), min(_CHUNK, grid - x0)
            arr[:, y0 : y0 + h, x0 : x0 + w] = rng.normal(size=(dim, h, w)).astype(np.float16)
    store.finish()
    return path


def _build(work: Path, *, grid: int, dim: int, region: int) -> dict[str, Any]:
    import hrdv2_dask as hd

    store = write_feature_store(work / "bench_features.zarr", grid=grid, dim=dim)
    index = work / "bench_index"
    shutil.rmtree(index, ignore_errors=True)
    t0 = time.perf_counter()
    summary = hd.build_index(store, index, region=region, kind="flat")
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = hd.search(index, query=[f"{grid // 2},{grid // 2}"], k=_K)
    search_s = time.perf_counter() - t0
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(index, ignore_errors=True)
    return {
        "grid": grid,
        "dim": dim,
        "region": region,
        "regions": summary["regions"],
        "wall_s": wall,
        "regions_per_s": summary["regions"] / wall,
        "mcells_per_s": grid * grid / wall / 1e6,
        "read_mb_per_s": grid * grid * dim * 2 / wall / 1e6,
        "search_ms": search_s * 1e3,
        "hits": len(hits),
    }


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


_CENTRES = 4096


def _chunks(
    n: int, dim: int, seed: int, data: str = "random", *, part: int = 0, step: int = 100_000
):
    """``(vectors, centre of each)`` of the ``n`` vectors, ``step`` at a time: random unit
    vectors (centre -1), or ``clustered`` ones (one of :data:`_CENTRES` unit centres, the same
    for every ``part``, plus noise of norm ~0.75, normalised: like the regions of a few
    textures). ``part`` 1 gives other vectors around the same centres (the queries)."""
    centres = _unit(np.random.default_rng([seed, 7]), _CENTRES, dim)
    for i, start in enumerate(range(0, n, step)):
        rng = np.random.default_rng([seed, part, i])
        m = min(step, n - start)
        if data == "random":
            yield _unit(rng, m, dim), np.full(m, -1)
            continue
        which = rng.integers(0, _CENTRES, m)
        x = centres[which]
        x += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(0.75 / np.sqrt(dim))
        yield x / np.linalg.norm(x, axis=1, keepdims=True), which


def _latency(index, queries: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Median and p95 single-query latency (ms), and the ids found."""
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, ids = index.search(q[None], _K)
        times.append(time.perf_counter() - t0)
        found.append(ids[0])
    times_ms = np.array(times) * 1e3
    return float(np.median(times_ms)), float(np.percentile(times_ms, 95)), np.array(found)


def _latency_rows(
    n: int, dim: int, n_queries: int, nprobe: int, seed: int, data: str
) -> list[dict]:
    import faiss

    from hrdv2_dask.analysis.retrieval import _ivfpq_factory, new_ivfpq

    queries, query_centres = next(_chunks(n_queries, dim, seed, data, part=1))
    centres = np.concatenate([c for _, c in _chunks(n, dim, seed, data)])
    rows = []
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    for part, _ in _chunks(n, dim, seed, data):
        flat.add(part)
    build = time.perf_counter() - t0
    med, p95, truth = _latency(flat, queries)
    rows.append(
        {"n": n, "kind": "flat", "factory": "Flat", "build_s": build, "size_mib":
         flat.ntotal * dim * 4 / 2**20, "median_ms": med, "p95_ms": p95, "recall": 1.0,
         "same_centre": float((centres[truth] == query_centres[:, None]).mean())
         if data != "random" else None}
    )  # fmt: skip
    del flat
    factory, nlist, need = _ivfpq_factory(dim, n)
    t0 = time.perf_counter()
    ivf = new_ivfpq(faiss, factory, dim)
    train, got = [], 0
    for part, _ in _chunks(n, dim, seed, data):  # the first `need` vectors of the data
        train.append(part)
        got += len(part)
        if got >= need:
            break
    ivf.train(np.concatenate(train)[:need])
    del train
    for part, _ in _chunks(n, dim, seed, data):
        ivf.add(part)
    build = time.perf_counter() - t0
    faiss.extract_index_ivf(ivf).nprobe = nprobe
    med, p95, found = _latency(ivf, queries)
    recall = np.mean([len(set(a) & set(b)) / _K for a, b in zip(found, truth, strict=True)])
    same = float((centres[found] == query_centres[:, None]).mean()) if data != "random" else None
    size = faiss.serialize_index(ivf).nbytes / 2**20
    rows.append(
        {"n": n, "kind": "ivfpq", "factory": f"{factory}, nprobe {nprobe}", "build_s": build,
         "size_mib": size, "median_ms": med, "p95_ms": p95, "recall": float(recall),
         "same_centre": same}
    )  # fmt: skip
    return rows


def run_retrieval(
    *,
    out_dir: str | os.PathLike,
    grid: int,
    dim: int,
    region: int,
    sizes: list[int],
    latency_dim: int,
    data: str,
    n_queries: int,
    nprobe: int,
    seed: int,
) -> dict[str, Any]:
    """The suite's result: one build row and the latency rows."""
    import faiss

    from .common import peak_rss_bytes, reset_peak_rss

    work = Path(out_dir) / "work"
    work.mkdir(parents=True, exist_ok=True)
    reset_peak_rss()
    build = _build(work, grid=grid, dim=dim, region=region)
    build["peak_rss_mib"] = peak_rss_bytes() / 2**20
    rows = []
    for n in sizes:
        log.info("latency at n=%d", n)
        rows += _latency_rows(n, latency_dim, n_queries, nprobe, seed, data)
    env = environment("cpu")
    env["versions"]["faiss-cpu"] = faiss.__version__
    env["faiss_threads"] = faiss.omp_get_max_threads()
    return {
        "suite": "retrieval",
        "environment": env,
        "settings": {
            "queries": n_queries,
            "k": _K,
            "nprobe": nprobe,
            "sizes": sizes,
            "latency_dim": latency_dim,
            "data": data,
        },
        "build": build,
        "rows": rows,
    }


BUILD_COLUMNS = [
    Column("grid", "cells"),
    Column("dim", "features"),
    Column("region", "R"),
    Column("regions", "regions"),
    Column("wall_s", "build (s)", "{:.1f}"),
    Column("regions_per_s", "regions/s", "{:,.0f}"),
    Column("mcells_per_s", "Mcells/s", "{:.2f}"),
    Column("read_mb_per_s", "MB/s read", "{:.0f}"),
    Column("search_ms", "search (ms)", "{:.0f}"),
    Column("peak_rss_mib", "peak RSS (MiB)", "{:.0f}"),
]
COLUMNS = [
    Column("n", "vectors", "{:,}"),
    Column("factory", "index"),
    Column("build_s", "build (s)", "{:.1f}"),
    Column("size_mib", "size (MiB)", "{:.0f}"),
    Column("median_ms", "query median (ms)", "{:.2f}"),
    Column("p95_ms", "query p95 (ms)", "{:.2f}"),
    Column("recall", "recall@20", "{:.3f}"),
    Column("same_centre", "hits of the query's cluster", "{:.3f}"),
]


def to_markdown(result: dict[str, Any]) -> str:
    b = result["build"]
    s = result["settings"]
    env = result["environment"]
    b = {**b, "grid": f"{b['grid']}²"}
    return "\n".join(
        [
            "### Retrieval (index build and search, CPU)",
            "",
            environment_line(env, speed_only=True)
            + f" faiss-cpu {env['versions']['faiss-cpu']} ({env['faiss_threads']} threads).",
            "",
            "`build_index` on a synthetic store (random float16 features, Zarr chunks of "
            f"{_CHUNK} cells), flat index; then one `search` (point query, k = {s['k']}):",
            "",
            markdown_table([b], BUILD_COLUMNS),
            "",
            f"FAISS alone on {s['data']} unit vectors (d = {s['latency_dim']}), {s['queries']} "
            "single queries, "
            f"k = {s['k']}; recall@{s['k']} of IVF-PQ against the exact flat index:",
            "",
            markdown_table(result["rows"], COLUMNS),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", type=int, default=512, help="store side in cells (%(default)s)")
    parser.add_argument("--dim", type=int, default=384, help="features (default: %(default)s)")
    parser.add_argument("--region", type=int, default=4, help="R (default: %(default)s)")
    parser.add_argument(
        "--sizes", default="100000,1000000", help="index sizes for latency (%(default)s)"
    )
    parser.add_argument("--queries", type=int, default=50, help="(default: %(default)s)")
    parser.add_argument("--nprobe", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument(
        "--data",
        choices=("random", "clustered"),
        default="clustered",
        help="latency vectors: random (no neighbours: the worst case for IVF-PQ) or clustered "
        "(near-duplicates around 4096 centres) (default: %(default)s)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small store, d = 32 and n = 10^4 only"
    )


def run(args: argparse.Namespace, spec: BackboneSpec) -> dict[str, Any]:
    quick = args.quick
    return run_retrieval(
        out_dir=args.out,
        grid=64 if quick else args.grid,
        dim=32 if quick else args.dim,
        region=args.region,
        sizes=[10_000] if quick else [int(v) for v in args.sizes.split(",")],
        latency_dim=32 if quick else 384,
        data=args.data,
        n_queries=5 if quick else args.queries,
        nprobe=args.nprobe,
        seed=args.seed,
    )
