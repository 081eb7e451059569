"""``seams`` suite: tiling artefacts on a homogeneous micrograph, with and without debias.

Image: ``../shared/data/micrographs/homogeneous_crop.tif`` (896 × 1008 uint8, from the HR-Dv2
repository's positional-bias data), or ``--image``. When it is absent the suite writes a result
that says so and measures nothing.

Runs, all with the same backbone object, views, intensity mapping and ``out_stride``:

whole
    :func:`hrdv2_dask.highres_features` on the whole image in one piece: the reference, and the
    control for the metrics (same positions, no windows);
tiled
    :func:`hrdv2_dask.extract` with windows of ``--tile`` px (float32 store, in-process Dask
    cluster);
tiled + debias N
    the same with positional-artefact removal, ``extract(..., debias=N)`` (estimate the mean
    feature at each within-window position over N windows and subtract it).

Metrics (:mod:`benchmarks.metrics`), with the window boundaries at the output-chunk boundaries
(every ``chunk_cells`` cells along y and x, ``chunk_cells = (tile - overlap) / out_stride``):

seam ratio
    mean feature-gradient magnitude across window boundaries / elsewhere
    (:func:`~benchmarks.metrics.seam_ratio`; 1.0 = invisible);
relative L2 error
    ``||tiled - whole|| / ||whole||`` over the interior (a band of ``margin_px`` pixels along the
    image border excluded, where the whole run and the windows pad differently);
periodic power
    spectral power of the mean-removed features at the window-stride frequency
    (period ``chunk_cells`` cells) and its harmonics over the median power of the neighbouring
    frequencies (:func:`~benchmarks.metrics.periodic_power`; about 1 = no periodic artefact).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hrdv2_dask as hd
from hrdv2_dask.pipeline.inputs import estimate_value_range

from .common import (
    BackboneSpec,
    Column,
    environment,
    environment_line,
    grid_of,
    markdown_table,
    parse_int_list,
    quiet_random_weights,
    view_set,
)
from .metrics import periodic_power, relative_l2, seam_ratio

__all__ = ["DEFAULT_IMAGE", "add_arguments", "run", "run_seams", "to_markdown", "window_metrics"]

log = logging.getLogger(__name__)

DEFAULT_IMAGE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "micrographs" / "homogeneous_crop.tif"
)


def window_metrics(
    features: np.ndarray, *, period: int, reference: np.ndarray | None = None, border: int = 0
) -> dict[str, float | None]:
    """Seam ratio and periodic power at window stride ``period`` cells; relative L2 error
    against ``reference`` over the interior (``border`` cells dropped on each side)."""
    rows, cols = features.shape[1:]
    inner = (slice(None), slice(border, rows - border), slice(border, cols - border))
    return {
        "seam_ratio": seam_ratio(
            features,
            boundaries_y=list(range(period, rows, period)),
            boundaries_x=list(range(period, cols, period)),
        ),
        "periodic_power": periodic_power(features, period),
        "rel_l2_vs_whole": (
            None if reference is None else relative_l2(features[inner], reference[inner])
        ),
    }


def _tiled(image, store: Path, backbone, client, **options) -> tuple[np.ndarray, dict, float]:
    t0 = time.perf_counter()
    with quiet_random_weights(), warnings.catch_warnings():
        # The backbone object travels in the graph to the in-process worker: expected, once.
        warnings.filterwarnings("ignore", message="Sending large graph")
        fe = hd.extract(image, store, backbone=backbone, dtype="float32", client=client, **options)
    values = fe.values
    return values, dict(fe.attrs), time.perf_counter() - t0


def run_seams(
    *,
    spec: BackboneSpec,
    image_path: Path,
    n_views: int,
    tile: int,
    out_stride: int,
    debias: list[int],
    crop: tuple[int, int] | None = None,
    backbone=None,
) -> dict[str, Any]:
    """Run whole, tiled and tiled + debias; the suite's JSON-able result.

    ``backbone`` (a backbone object) replaces the one ``spec`` builds, e.g. in tests.
    """
    label, tset = view_set(n_views)
    result: dict[str, Any] = {
        "suite": "seams",
        "environment": environment(spec.device, weights=spec.weights_label),
        "settings": {
            "image": str(image_path),
            "model": spec.model,
            "model_label": spec.describe(),
            "model_options": dict(spec.model_options),
            "device": spec.device,
            "views": n_views,
            "views_label": label,
            "tile": tile,
            "out_stride": out_stride,
            "debias": debias,
        },
        "rows": [],
    }
    if not image_path.exists():
        msg = f"skipped: {image_path} not found (it comes with ../shared; pass --image PATH)"
        log.warning("seams: %s", msg)
        result["skipped"] = msg
        return result
    data, _ = hd.open_image(image_path)
    image = np.asarray(data)
    if crop is not None:
        image = image[: crop[0], : crop[1]]
    result["settings"]["image_shape"] = list(image.shape)
    value_range = estimate_value_range(hd.open_image(image)[0])
    backbone = spec.build() if backbone is None else backbone
    log.info("seams: whole image %s, %d views", image.shape[:2], n_views)
    t0 = time.perf_counter()
    x = hd.normalize(image, value_range=value_range).to(spec.device)
    whole = hd.highres_features(x, backbone, tset, out_stride=out_stride).cpu().numpy()
    whole_s = time.perf_counter() - t0

    from distributed import Client, LocalCluster

    options = dict(
        transforms=tset,
        tile=tile,
        out_stride=out_stride,
        value_range=value_range,
        device=spec.device,
        progress=False,
    )
    # In-process worker holding the backbone object; extract sends GPU tasks to a "GPU" resource.
    gpu = {"resources": {"GPU": 1}} if spec.device.startswith("cuda") else {}
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0", **gpu
        ) as cluster,
        Client(cluster) as client,
    ):
        log.info("seams: tiled, tile %d", tile)
        tiled, attrs, tiled_s = _tiled(image, Path(tmp) / "tiled.zarr", backbone, client, **options)
        grid = grid_of(attrs)
        period, border = grid.chunk_cells, -(-grid.margin_px // out_stride)
        metrics = {"period": period, "border": border}
        rows.append({"run": "whole", "seconds": whole_s, **window_metrics(whole, **metrics)})
        rows.append(
            {
                "run": "tiled",
                "seconds": tiled_s,
                **window_metrics(tiled, reference=whole, **metrics),
            }
        )
        for n in debias:
            name = f"tiled + debias {n}"
            log.info("seams: %s", name)
            values, _, seconds = _tiled(
                image, Path(tmp) / f"debias{n}.zarr", backbone, client, debias=n, **options
            )
            rows.append(
                {
                    "run": name,
                    "seconds": seconds,
                    **window_metrics(values, reference=whole, **metrics),
                }
            )
    result["settings"].update(
        period_cells=period,
        border_cells=border,
        overlap_px=grid.overlap_px,
        margin_px=grid.margin_px,
        windows=list(grid.n_windows),
    )
    result["rows"] = rows
    return result


COLUMNS = [
    Column("run", "run"),
    Column("seam_ratio", "seam ratio", "{:.3f}"),
    Column("periodic_power", "periodic power", "{:.2f}"),
    Column("rel_l2_vs_whole", "rel. L2 vs whole", "{:.4f}"),
    Column("seconds", "time (s)", "{:.1f}"),
    Column("note", "note"),
]


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = [
        "### Tiling artefacts on a homogeneous micrograph",
        "",
        environment_line(result["environment"]),
    ]
    if result.get("skipped"):
        return "\n".join([*head, "", f"*{result['skipped']}*"])
    return "\n".join(
        [
            *head,
            f"`{Path(s['image']).name}` {s['image_shape'][0]}×{s['image_shape'][1]}, "
            f"{s['model_label']}, {s['views']} views ({s['views_label']}), tile {s['tile']} "
            f"(overlap {s['overlap_px']}, {s['windows'][0]}×{s['windows'][1]} windows), "
            f"out_stride {s['out_stride']}; window stride {s['period_cells']} cells. "
            "Periodic power ≈ 1: no pattern at the window stride.",
            "",
            markdown_table(result["rows"], COLUMNS),
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image", type=Path, default=DEFAULT_IMAGE, help="image (default: %(default)s)"
    )
    parser.add_argument("--views", type=int, default=9, help="views (default: %(default)s)")
    parser.add_argument("--tile", type=int, default=224, help="window side (default: %(default)s)")
    parser.add_argument("--out-stride", type=int, default=4, help="default: %(default)s")
    parser.add_argument(
        "--debias",
        type=parse_int_list,
        default=[32],
        help="sample windows for positional-artefact removal; one run per value (default: 32)",
    )
    parser.add_argument("--crop", type=parse_int_list, help="use the top-left H,W pixels only")


def run(args: argparse.Namespace, spec: BackboneSpec) -> dict[str, Any]:
    torch.manual_seed(spec.seed)
    return run_seams(
        spec=spec,
        image_path=args.image,
        n_views=args.views,
        tile=args.tile,
        out_stride=args.out_stride,
        debias=[n for n in args.debias if n > 0],
        crop=tuple(args.crop) if args.crop else None,
    )
