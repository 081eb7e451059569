"""``mask`` suite: background skipping on a slide-like image, with and without ``mask="auto"``.

A synthetic ``S × S`` "slide" is written once as a chunked Zarr v3 array: bright, slightly noisy
glass (gray 236–244) with tissue sections (the ``e2e`` suite's textured pattern) inside a few
ellipses that cover ``1 - background`` of the area. :func:`hrdv2_dask.extract` then runs twice on
an embedded ``LocalCluster``: on every window, and with ``mask="auto"`` (Otsu on a thumbnail),
which computes only the windows that touch tissue.

Reported: wall time of each run, windows computed, the speed-up, and whether the foreground
cells of both stores agree exactly (they must: foreground pixels keep all their windows).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .common import BackboneSpec, Column, environment, environment_line, markdown_table, view_set
from .e2e import run_once, synthetic_tile

__all__ = ["add_arguments", "run", "run_mask", "slide_tile", "to_markdown", "write_slide"]

log = logging.getLogger(__name__)

# Tissue sections as ellipses (centre y, centre x, radius y, radius x) in units of the side.
_SECTIONS = ((0.32, 0.30, 0.22, 0.20), (0.66, 0.68, 0.24, 0.22))


def _tissue(yy: np.ndarray, xx: np.ndarray, size: int, scale: float) -> np.ndarray:
    inside = np.zeros(np.broadcast_shapes(yy.shape, xx.shape), bool)
    for cy, cx, ry, rx in _SECTIONS:
        inside |= ((yy / size - cy) / (ry * scale)) ** 2 + (
            (xx / size - cx) / (rx * scale)
        ) ** 2 < 1
    return inside


def tissue_scale(background: float, *, size: int = 512) -> float:
    """Scale of the ellipses that leaves ``background`` of the area empty (bisection)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    lo, hi = 0.05, 2.5
    for _ in range(40):
        mid = (lo + hi) / 2
        if 1 - _tissue(yy, xx, size, mid).mean() > background:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def slide_tile(
    origin: tuple[int, int], shape: tuple[int, int], *, size: int, scale: float, seed: int = 0
) -> np.ndarray:
    """Pixels ``(h, w, 3)`` uint8 of the synthetic slide at ``origin``."""
    y0, x0 = origin
    yy, xx = np.mgrid[y0 : y0 + shape[0], x0 : x0 + shape[1]].astype(np.float64)
    rng = np.random.default_rng([seed, y0, x0, 1])
    glass = rng.integers(236, 245, (*shape, 3), dtype=np.uint8)
    tissue = synthetic_tile(origin, shape, seed=seed) // 2 + 40  # darker than the glass
    return np.where(_tissue(yy, xx, size, scale)[..., None], tissue, glass)


def write_slide(path: Path, *, size: int, background: float, chunk: int = 1024, seed: int = 0):
    """Write (or reuse) the slide as a chunked Zarr v3 array; returns ``(path, tissue mask)``."""
    import zarr

    scale = tissue_scale(background)
    recipe = {"size": size, "background": background, "chunk": chunk, "seed": seed}
    if not ((path / "zarr.json").exists() and zarr.open_array(path).attrs.get("slide") == recipe):
        arr = zarr.create_array(
            path, shape=(size, size, 3), chunks=(chunk, chunk, 3), dtype="uint8", overwrite=True
        )
        for y0 in range(0, size, chunk):
            for x0 in range(0, size, chunk):
                shape = (min(chunk, size - y0), min(chunk, size - x0))
                arr[y0 : y0 + shape[0], x0 : x0 + shape[1]] = slide_tile(
                    (y0, x0), shape, size=size, scale=scale, seed=seed
                )
        arr.attrs["slide"] = recipe
    return path, scale


def run_mask(
    *,
    spec: BackboneSpec,
    out_dir: str | os.PathLike,
    size: int,
    background: float,
    n_views: int,
    tile: int,
    out_stride: int,
    workers: int,
) -> dict[str, Any]:
    """The suite's result: the same extraction without and with ``mask="auto"``."""
    import zarr

    label, tset = view_set(n_views)
    work = Path(out_dir) / "work"
    work.mkdir(parents=True, exist_ok=True)
    source, scale = write_slide(work / f"slide_{size}.zarr", size=size, background=background)
    rows, stores = [], {}
    for mask in (None, "auto"):
        store = work / f"mask_{mask or 'none'}.zarr"
        row = run_once(
            spec,
            source,
            store,
            workers=workers,
            transforms=tset,
            tile=tile,
            out_stride=out_stride,
            components=None,
            progress=False,
            mask=mask,
        )
        row["mask"] = mask or "none"
        row["speedup"] = rows[0]["wall_s"] / row["wall_s"] if rows else 1.0
        rows.append(row)
        stores[mask] = store
    a = zarr.open_group(stores[None], mode="r")["features"][...]
    b = zarr.open_group(stores["auto"], mode="r")["features"][...]
    c = np.arange(a.shape[1]) * out_stride + (out_stride - 1) / 2
    fg = _tissue(c[:, None], c[None, :], size, scale)
    identical = bool(np.array_equal(a[:, fg], b[:, fg]))
    nan_fraction = float(np.isnan(b).all(0).mean())
    for store in stores.values():
        shutil.rmtree(store, ignore_errors=True)
    return {
        "suite": "mask",
        "environment": environment(spec.device, weights=spec.weights_label),
        "settings": {
            "model_label": spec.describe(),
            "device": spec.device,
            "size": size,
            "background": background,
            "views": n_views,
            "views_label": label,
            "tile": tile,
            "out_stride": out_stride,
            "workers": workers,
        },
        "rows": rows,
        "foreground_identical": identical,
        "nan_fraction": nan_fraction,
    }


COLUMNS = [
    Column("mask", "mask"),
    Column("computed_windows", "windows computed"),
    Column("windows", "windows"),
    Column("wall_s", "wall (s)", "{:.1f}"),
    Column("mps", "MP/s", "{:.3f}"),
    Column("speedup", "speed-up", "{:.2f}"),
]


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    return "\n".join(
        [
            f"### Background skipping ({s['device']})",
            "",
            environment_line(result["environment"], speed_only=True),
            f"Synthetic {s['size']}×{s['size']} slide, {s['background']:.0%} background glass, "
            f"{s['model_label']}, {s['views']} views ({s['views_label']}), tile {s['tile']}, "
            f"out_stride {s['out_stride']}, {s['workers']} worker(s). Foreground cells identical "
            f"with and without the mask: {result['foreground_identical']}; "
            f"{result['nan_fraction']:.0%} of the masked store is NaN (skipped).",
            "",
            markdown_table(result["rows"], COLUMNS),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=3072, help="side (default: %(default)s)")
    parser.add_argument(
        "--background", type=float, default=0.6, help="empty fraction (default: %(default)s)"
    )
    parser.add_argument("--views", type=int, default=1, help="views (default: %(default)s)")
    parser.add_argument("--tile", type=int, default=518, help="window side (default: %(default)s)")
    parser.add_argument("--out-stride", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="(default: %(default)s)")


def run(args: argparse.Namespace, spec: BackboneSpec) -> dict[str, Any]:
    return run_mask(
        spec=spec,
        out_dir=args.out,
        size=args.size,
        background=args.background,
        n_views=args.views,
        tile=args.tile,
        out_stride=args.out_stride,
        workers=args.workers,
    )
