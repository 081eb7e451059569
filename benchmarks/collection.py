"""``collection`` suite: many small images in one run, against one big image and a shell loop.

``N`` synthetic ``S × S`` RGB uint8 images (the ``e2e`` suite's pattern, each its own seed) are
written once as ``.npy`` files under ``OUT/work/``. On the embedded cluster, with the same
settings everywhere:

1. :func:`hrdv2_dask.extract_collection` of the ``N`` images (one cluster, one model per worker,
   one graph in which the block tasks of all members interleave);
2. :func:`hrdv2_dask.extract` of one image whose window grid has as many windows (the grid of
   one small image repeated ``R × C`` times, ``R · C = N``);
3. a shell loop of ``hrdv2 features IMAGE OUT.zarr`` over the first ``L`` images (a process, a
   cluster and a model per image), against ``extract_collection`` of the same ``L`` images.

Reported: wall seconds of each call (cluster start included), windows, windows per second; the
throughput ratio collection / one image (the target is ≥ 0.8: a per-image overhead of at most
20 %) and the speed-up of one collection run over the loop (expected ≥ 5× for 50 images).
Stores are deleted after each run. ``--quick`` is a small setting for the smoke test.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import hrdv2_dask as hd
from hrdv2_dask.tiling import plan_tiles

from .common import (
    BackboneSpec,
    Column,
    environment,
    environment_line,
    markdown_table,
    quiet_random_weights,
)
from .e2e import synthetic_tile

__all__ = ["add_arguments", "factor_pair", "matching_side", "run", "run_collection", "to_markdown"]

log = logging.getLogger(__name__)

QUICK = {"images": 4, "size": 112, "loop": 1, "tile": 112}


def factor_pair(n: int) -> tuple[int, int]:
    """``(rows, cols)`` with ``rows · cols = n`` and ``rows <= cols``, as square as possible.

    >>> factor_pair(200), factor_pair(7), factor_pair(1)
    ((10, 20), (1, 7), (1, 1))
    """
    rows = max(r for r in range(1, int(n**0.5) + 1) if n % r == 0)
    return rows, n // rows


def matching_side(windows: int, grid_kw: dict[str, Any], *, start: int) -> int:
    """The shortest side (px) whose window grid along one axis has ``windows`` windows.

    >>> kw = dict(tile_px=224, overlap_px=None, patch_px=14, stride_px=14, max_shift_px=1)
    >>> side = matching_side(4, kw, start=14)
    >>> plan_tiles((side, side), **kw).n_windows
    (4, 4)
    """
    side = start
    while plan_tiles((side, side), **grid_kw).n_windows[0] < windows:
        side += 1
    return side


def _write_images(folder: Path, *, n: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        path = folder / f"im{k:03d}.npy"
        if not path.exists():
            np.save(path, synthetic_tile((0, 0), (size, size), seed=k))
        paths.append(path)
    return paths


def _options(spec: BackboneSpec, tile: int, out_stride: int) -> dict[str, Any]:
    return dict(
        backbone=spec.model,
        weights=spec.weights or "random",
        model_options=dict(spec.model_options),
        stride=spec.stride,
        device=spec.device,
        shifts=(1,),
        neighbourhood="von_neumann",
        tile=tile,
        out_stride=out_stride,
        dtype="float16",
        precision="fp32",
        overwrite=True,
        progress=False,
    )


def _cli_flags(spec: BackboneSpec, tile: int, out_stride: int) -> list[str]:
    """The same settings as :func:`_options`, as ``hrdv2 features`` flags."""
    flags = ["--model", spec.model, "--weights", spec.weights or "random"]
    for key, value in spec.model_options:
        flags += ["--model-option", f"{key}={value}"]
    if spec.stride is not None:
        flags += ["--stride", str(spec.stride)]
    flags += ["--device", spec.device, "--shifts", "1", "--neighbourhood", "von_neumann"]
    flags += ["--tile", str(tile), "--out-stride", str(out_stride), "--dtype", "float16"]
    return [*flags, "--precision", "fp32", "--overwrite", "--quiet"]


def _hrdv2() -> list[str]:
    """The ``hrdv2`` command a user's loop runs (this Python's, where the script is missing)."""
    script = shutil.which("hrdv2") or str(Path(sys.executable).with_name("hrdv2"))
    if Path(script).exists():
        return [script]
    return [sys.executable, "-c", "import sys; from hrdv2_dask.cli import main; sys.exit(main())"]


def _timed_collection(paths: list[Path], store: Path, options: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    with quiet_random_weights():
        t0 = time.perf_counter()
        hd.extract_collection([str(p) for p in paths], store, **options)
        wall = time.perf_counter() - t0
    rows = hd.open_collection(store).attrs["members"]
    failed = [f"{r['key']}: {r['error']}" for r in rows if r["status"] != "done"]
    if failed:
        raise RuntimeError(f"members not done: {failed[:3]}")
    windows = sum(int(r["windows"]) for r in rows)
    shutil.rmtree(store, ignore_errors=True)
    return {"images": len(paths), "windows": windows, "wall_s": wall}


def run_collection(
    *,
    spec: BackboneSpec,
    out_dir: str | os.PathLike,
    images: int,
    size: int,
    loop: int,
    tile: int,
    out_stride: int,
) -> dict[str, Any]:
    """The suite's result (see the module's docstring)."""
    work = Path(out_dir) / "work"
    paths = _write_images(work / f"collection_{size}_{images}", n=images, size=size)
    options = _options(spec, tile, out_stride)
    rows: list[dict[str, Any]] = []
    spec.build()  # warm-up: the first run would pay for importing and building the model

    coll = _timed_collection(paths, work / "collection.zarr", options)
    rows.append({"run": f"extract_collection, {images} images of {size}²", **coll})

    grid_kw = dict(tile_px=tile, overlap_px=None, patch_px=14, stride_px=spec.stride or 14)
    grid_kw["max_shift_px"] = 1
    per = plan_tiles((size, size), **grid_kw).n_windows
    r, c = factor_pair(images)
    h = matching_side(per[0] * r, grid_kw, start=size)
    w = matching_side(per[1] * c, grid_kw, start=size)
    big = work / f"single_{h}x{w}.npy"
    if not big.exists():
        np.save(big, synthetic_tile((0, 0), (h, w), seed=images))
    t0 = time.perf_counter()
    with quiet_random_weights():
        fe = hd.extract(str(big), work / "single.zarr", **options)
    wall = time.perf_counter() - t0
    windows = int(np.prod(plan_tiles((h, w), **grid_kw).n_windows))
    shutil.rmtree(work / "single.zarr", ignore_errors=True)
    rows.append({"run": f"extract, one {h}×{w} image", "images": 1, "windows": windows})
    rows[-1]["wall_s"] = wall
    del fe

    loop_rows = []
    if loop:
        subset = paths[:loop]
        flags = _cli_flags(spec, tile, out_stride)
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        t0 = time.perf_counter()
        for k, path in enumerate(subset):
            out = work / f"loop_{k}.zarr"
            cmd = [*_hrdv2(), "features", str(path), str(out), *flags]
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            shutil.rmtree(out, ignore_errors=True)
        loop_wall = time.perf_counter() - t0
        same = _timed_collection(subset, work / "subset.zarr", options)
        loop_rows = [
            {"run": f"shell loop of `hrdv2 features`, {loop} images", "images": loop},
            {"run": f"extract_collection, the same {loop} images", **same},
        ]
        loop_rows[0].update(windows=same["windows"], wall_s=loop_wall)
    for row in rows + loop_rows:
        row["windows_per_s"] = row["windows"] / row["wall_s"]
    result = {
        "suite": "collection",
        "environment": environment(spec.device, weights=spec.weights_label),
        "settings": {
            "model_label": spec.describe(),
            "device": spec.device,
            "images": images,
            "size": size,
            "tile": tile,
            "out_stride": out_stride,
            "views": "von Neumann 1 px (5 views)",
            "loop": loop,
        },
        "rows": rows + loop_rows,
        "throughput_ratio": rows[0]["windows_per_s"] / rows[1]["windows_per_s"],
        "windows_equal": rows[0]["windows"] == rows[1]["windows"],
    }
    if loop_rows:
        result["loop_speedup"] = loop_rows[0]["wall_s"] / loop_rows[1]["wall_s"]
    return result


COLUMNS = [
    Column("run", "run"),
    Column("images", "images"),
    Column("windows", "windows"),
    Column("wall_s", "wall (s)", "{:.1f}"),
    Column("windows_per_s", "windows/s", "{:.2f}"),
]


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"### Collections ({s['device']})",
        "",
        environment_line(result["environment"], speed_only=True),
        f"{s['images']} synthetic {s['size']}² RGB images, {s['model_label']}, {s['views']}, "
        f"tile {s['tile']}, out_stride {s['out_stride']}, float16, embedded cluster; wall "
        "times include the cluster start.",
        "",
        markdown_table(result["rows"], COLUMNS),
        "",
        f"Throughput of the collection / one image of as many windows "
        f"({'equal' if result['windows_equal'] else 'NOT equal'} window counts): "
        f"**{result['throughput_ratio']:.2f}** (target ≥ 0.8).",
    ]
    if "loop_speedup" in result:
        lines.append(
            f"One collection run against a shell loop of `hrdv2 features` over {s['loop']} "
            f"images: **{result['loop_speedup']:.1f}×** faster."
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=200, help="(default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="image side (default: %(default)s)")
    parser.add_argument(
        "--loop", type=int, default=10, help="images of the shell loop, 0: none (%(default)s)"
    )
    parser.add_argument("--tile", type=int, default=224, help="window side (default: %(default)s)")
    parser.add_argument("--out-stride", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"small settings: {QUICK}")


def run(args: argparse.Namespace, spec: BackboneSpec) -> dict[str, Any]:
    settings = {k: getattr(args, k) for k in ("images", "size", "loop", "tile")}
    if args.quick:
        settings.update({k: v for k, v in QUICK.items() if k != "loop"})
        settings["loop"] = min(args.loop, QUICK["loop"])
    return run_collection(spec=spec, out_dir=args.out, out_stride=args.out_stride, **settings)
