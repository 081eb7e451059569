"""``e2e`` suite: end-to-end ``extract`` of a synthetic chunked Zarr image.

A synthetic ``S × S`` RGB uint8 image (smooth stripes plus noise, generated chunk by chunk, so
that 32768² never sits in memory) is written once as a chunked Zarr v3 array under
``OUT/work/`` and reused by later runs with the same size and seed. Then, for each worker count
``W`` in ``--workers``, :func:`hrdv2_dask.extract` runs on it with an embedded ``LocalCluster``
of ``W`` worker processes, each with ``cores / W`` torch threads (the library's default), and
writes a float16 feature store (deleted afterwards unless ``--keep``).

Reported per run: wall time of the whole ``extract`` call (cluster start, PCA fit when
``--components``, all windows, store finished) and of its run phase (cluster start, the PCA
fit, which runs on the workers, and all windows, from the "N windows in T s" line that
``extract`` logs), input megapixels per second
(over each), windows, seconds per window, the peak summed RSS of this process and its worker
processes (sampled every 0.1 s) and, on CUDA, the peak device memory in use during the run
(device-wide, sampled).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import hrdv2_dask as hd

from .common import (
    BackboneSpec,
    Column,
    ProcessTreeSampler,
    environment,
    environment_line,
    grid_of,
    markdown_table,
    parse_int_list,
    quiet_random_weights,
    view_set,
)

__all__ = ["add_arguments", "run", "run_e2e", "synthetic_tile", "to_markdown", "write_synthetic"]

log = logging.getLogger(__name__)

CPU_DEFAULTS = {"size": 1536, "workers": [1, 2], "out_stride": 1, "components": None}
CUDA_DEFAULTS = {"size": 32768, "workers": [1], "out_stride": 4, "components": 16}


def synthetic_tile(origin: tuple[int, int], shape: tuple[int, int], *, seed: int = 0) -> np.ndarray:
    """Pixels ``(h, w, 3)`` uint8 of the synthetic image at ``origin`` (y, x).

    The smooth stripes depend on the pixel position only; the noise is seeded by ``seed`` and
    the tile origin, so the image is reproducible for a given chunk size.

    >>> synthetic_tile((0, 0), (4, 5)).shape
    (4, 5, 3)
    """
    y0, x0 = origin
    yy, xx = np.mgrid[y0 : y0 + shape[0], x0 : x0 + shape[1]].astype(np.float32)
    rng = np.random.default_rng([seed, y0, x0])
    out = np.empty((*shape, 3), np.uint8)
    for c, (fy, fx) in enumerate(((31.0, 47.0), (53.0, 29.0), (71.0, 89.0))):
        smooth = 128 + 60 * np.sin(xx / fx + c) * np.cos(yy / fy)
        noise = rng.normal(0, 20, shape).astype(np.float32)
        out[..., c] = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    return out


def write_synthetic(
    path: str | os.PathLike, *, size: int, chunk: int = 1024, seed: int = 0
) -> Path:
    """Write (or reuse) the ``size × size × 3`` synthetic image as a chunked Zarr v3 array."""
    import zarr

    path = Path(path)
    recipe = {"size": size, "chunk": chunk, "seed": seed}
    if (path / "zarr.json").exists():
        arr = zarr.open_array(path, mode="r")
        if arr.attrs.get("synthetic") == recipe:
            log.info("e2e: reusing %s", path)
            return path
    log.info("e2e: writing a %d x %d synthetic image to %s", size, size, path)
    arr = zarr.create_array(
        path,
        shape=(size, size, 3),
        chunks=(chunk, chunk, 3),
        dtype="uint8",
        overwrite=True,
        zarr_format=3,
    )
    for y0 in range(0, size, chunk):
        for x0 in range(0, size, chunk):
            shape = (min(chunk, size - y0), min(chunk, size - x0))
            arr[y0 : y0 + shape[0], x0 : x0 + shape[1]] = synthetic_tile((y0, x0), shape, seed=seed)
    arr.attrs["synthetic"] = recipe
    return path


class _RunPhaseTime(logging.Handler):
    """Catches ``extract``'s closing log record "N windows in T s" (cluster start + windows)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "%d windows in %.1f s" and len(record.args or ()) == 2:
            self.seconds = float(record.args[1])


@contextlib.contextmanager
def _run_phase_time() -> Iterator[_RunPhaseTime]:
    handler = _RunPhaseTime()
    logger = logging.getLogger("hrdv2_dask.pipeline.extraction")
    level = logger.level
    logger.addHandler(handler)
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_once(
    spec: BackboneSpec,
    source: Path,
    store: Path,
    *,
    workers: int,
    transforms: hd.TransformSet,
    tile: int,
    out_stride: int,
    components: int | None,
    progress: bool,
    mask: str | None = None,
) -> dict[str, Any]:
    """One timed ``extract`` run; returns its row."""
    import torch

    torch.manual_seed(spec.seed)  # random weights: the same model for every run
    with (
        quiet_random_weights(),
        _run_phase_time() as phase,
        ProcessTreeSampler(device=spec.device) as sampler,
    ):
        t0 = time.perf_counter()
        fe = hd.extract(
            str(source),
            store,
            backbone=spec.model,
            weights=spec.weights or "random",
            transforms=transforms,
            tile=tile,
            out_stride=out_stride,
            dtype="float16",
            stride=spec.stride,
            device=spec.device,
            workers=workers,
            components=components,
            model_options=dict(spec.model_options),
            mask=mask,
            precision=spec.precision,
            overwrite=True,
            progress=progress,
        )
        wall = time.perf_counter() - t0
    h, w = fe.attrs["source_shape"][:2]
    windows = int(np.prod(grid_of(fe.attrs).n_windows))
    cores = os.cpu_count() or 1
    return {
        "workers": workers,
        "threads_per_worker": max(1, cores // workers),
        "wall_s": wall,
        "run_phase_s": phase.seconds,
        "run_phase_mps": h * w / 1e6 / phase.seconds if phase.seconds else None,
        "megapixels": h * w / 1e6,
        "mps": h * w / 1e6 / wall,
        "windows": windows,
        "computed_windows": fe.attrs.get("computed_windows", windows),
        "s_per_window": wall / windows,
        "peak_rss_mb": round(sampler.peak_rss / 2**20),
        "peak_device_mb": (
            None if sampler.peak_device is None else round(sampler.peak_device / 2**20)
        ),
        "output_shape": [int(v) for v in fe.shape],
    }


def run_e2e(
    *,
    spec: BackboneSpec,
    out_dir: str | os.PathLike,
    size: int,
    workers: list[int],
    n_views: int,
    tile: int,
    out_stride: int,
    components: int | None,
    keep: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the synthetic image, run ``extract`` once per worker count; the suite's result."""
    label, tset = view_set(n_views)
    work = Path(out_dir) / "work"
    work.mkdir(parents=True, exist_ok=True)
    source = write_synthetic(work / f"synthetic_{size}.zarr", size=size, seed=spec.seed)
    rows = []
    for w in workers:
        store = work / f"e2e_features_w{w}.zarr"
        log.info("e2e: %d px, %d worker(s), %d views", size, w, n_views)
        row = run_once(
            spec,
            source,
            store,
            workers=w,
            transforms=tset,
            tile=tile,
            out_stride=out_stride,
            components=components,
            progress=progress,
        )
        row["speedup"] = rows[0]["wall_s"] / row["wall_s"] if rows else 1.0
        rows.append(row)
        if not keep:
            shutil.rmtree(store, ignore_errors=True)
    return {
        "suite": "e2e",
        "environment": environment(spec.device, weights=spec.weights_label),
        "settings": {
            "model": spec.model,
            "model_label": spec.describe(),
            "model_options": dict(spec.model_options),
            "device": spec.device,
            "size": size,
            "views": n_views,
            "views_label": label,
            "tile": tile,
            "out_stride": out_stride,
            "components": components,
            "dtype": "float16",
            "precision": spec.resolved_precision,
            "source": str(source),
        },
        "rows": rows,
    }


COLUMNS = [
    Column("workers", "workers"),
    Column("threads_per_worker", "threads/worker"),
    Column("windows", "windows"),
    Column("wall_s", "wall (s)", "{:.1f}"),
    Column("run_phase_s", "cluster + estimates + windows (s)", "{:.1f}"),
    Column("mps", "MP/s", "{:.3f}"),
    Column("run_phase_mps", "MP/s (cluster + estimates + windows)", "{:.3f}"),
    Column("s_per_window", "s/window", "{:.2f}"),
    Column("speedup", "speed-up", "{:.2f}"),
    Column("peak_rss_mb", "peak RSS, all processes (MB)", "{:.0f}"),
]


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    columns = COLUMNS + (
        [Column("peak_device_mb", "peak GPU in use (MB)", "{:.0f}")]
        if s["device"].startswith("cuda")
        else []
    )
    return "\n".join(
        [
            f"### End-to-end `extract` ({s['device']}, {s.get('precision', 'fp32')})",
            "",
            environment_line(result["environment"], speed_only=True),
            f"Synthetic {s['size']}×{s['size']} RGB uint8 Zarr, {s['model_label']}, "
            f"{s['views']} views ({s['views_label']}), tile {s['tile']}, "
            f"out_stride {s['out_stride']}, components {s['components'] or 'all'}, float16 store, "
            "embedded LocalCluster.",
            "",
            markdown_table(result["rows"], columns),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, help="image side (default 1536 on CPU, 32768 on CUDA)")
    parser.add_argument(
        "--workers", type=parse_int_list, help="worker counts (default 1,2 on CPU, 1 on CUDA)"
    )
    parser.add_argument("--views", type=int, default=9, help="views (default: %(default)s)")
    parser.add_argument("--tile", type=int, default=518, help="window side (default: %(default)s)")
    parser.add_argument("--out-stride", type=int, help="pixels per output cell (1 CPU, 4 CUDA)")
    parser.add_argument(
        "--components", type=int, help="PCA channels on the workers (default: all on CPU, 16 CUDA)"
    )
    parser.add_argument("--all-channels", action="store_true", help="no PCA, even on CUDA")
    parser.add_argument("--keep", action="store_true", help="keep the feature stores")
    parser.add_argument("--progress", action="store_true", help="show the progress bar")


def run(args: argparse.Namespace, spec: BackboneSpec) -> dict[str, Any]:
    d = CUDA_DEFAULTS if spec.device.startswith("cuda") else CPU_DEFAULTS
    components = None if args.all_channels else (args.components or d["components"])
    return run_e2e(
        spec=spec,
        out_dir=args.out,
        size=args.size or d["size"],
        workers=args.workers or d["workers"],
        n_views=args.views,
        tile=args.tile,
        out_stride=args.out_stride or d["out_stride"],
        components=components,
        keep=args.keep,
        progress=args.progress,
    )
