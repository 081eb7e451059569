"""``quality`` suite: k-means on the features of a texture mosaic with a known layout.

The mosaic (:func:`texture_mosaic`) fills the Voronoi cells of seeded random centres with
scikit-image's bundled textures (brick, grass, gravel, moon by default; shipped with
scikit-image, no download), mirror-tiled as in ``hrdv2 demo``; cell ``k`` shows texture
``k % n``, so the true label of a pixel is its texture. Features at every pixel (out_stride 1)
come from four methods that share one set of weights:

low-res bilinear
    identity only, stride 14: the low-resolution map resampled bilinearly to the pixels;
stride trick
    identity only, patch-embedding stride 7;
HR-Dv2
    Moore 1 px shifts (9 views), stride 14;
both
    stride 7 and the 9 shifted views.

k-means (k = number of textures, seeded, fitted on a seeded sample of pixels, applied to all)
turns each feature map into labels, scored against the truth with the mIoU after Hungarian
matching and the boundary F-score at 2 px (:mod:`benchmarks.metrics`). Without ``--weights``
the backbone has random weights and every output says so: the numbers then show the pipeline,
not DINOv2's quality.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import hrdv2_dask as hd
from hrdv2_dask.demo import texture_mosaic

from .common import (
    RANDOM_WEIGHTS_NOTE,
    BackboneSpec,
    Column,
    environment,
    environment_line,
    markdown_table,
    view_set,
)
from .metrics import boundary_fscore, miou_hungarian

__all__ = ["METHODS", "add_arguments", "cluster_pixels", "run", "run_quality", "texture_mosaic"]

log = logging.getLogger(__name__)

DEFAULT_TEXTURES = ("brick", "grass", "gravel", "moon")

# name -> (patch-embedding stride, views)
METHODS: dict[str, tuple[int, int]] = {
    "low-res bilinear": (14, 1),
    "stride trick": (7, 1),
    "HR-Dv2": (14, 9),
    "both": (7, 9),
}


def cluster_pixels(
    features: np.ndarray, k: int, *, seed: int = 0, sample: int = 20_000
) -> np.ndarray:
    """k-means labels ``(Y, X)`` of a ``(C, Y, X)`` feature map (fitted on ``sample`` pixels).

    >>> f = np.zeros((2, 4, 4), np.float32); f[0, :, 2:] = 5.0
    >>> cluster_pixels(f, 2).tolist()[0] in ([0, 0, 1, 1], [1, 1, 0, 0])
    True
    """
    from sklearn.cluster import KMeans

    c, h, w = features.shape
    pixels = np.ascontiguousarray(features.reshape(c, -1).T, dtype=np.float32)
    rng = np.random.default_rng(seed)
    fit = pixels[rng.choice(len(pixels), min(sample, len(pixels)), replace=False)]
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(fit)
    return km.predict(pixels).reshape(h, w)


def _backbone_with_stride(base: hd.Backbone, stride: int) -> hd.Backbone:
    """The same weights (shared, not copied) with another patch-embedding stride."""
    if stride == base.stride:
        return base
    return hd.Backbone(
        base.model, name=base.name, stride=stride, weights_origin=base.weights_origin
    )


def run_quality(
    *,
    spec: BackboneSpec,
    size: int,
    textures: Sequence[str],
    cells: int,
    tolerance_px: float = 2.0,
    sample: int = 20_000,
) -> dict[str, Any]:
    """Score the four methods on one mosaic; the suite's JSON-able result."""
    if cells < len(textures):
        raise ValueError(f"cells={cells} must be >= the {len(textures)} textures.")
    image, truth = texture_mosaic(size, textures=textures, cells=cells, seed=spec.seed)
    x = hd.normalize(image).to(spec.device)
    base = spec.build()
    k = len(textures)
    rows = []
    for method, (stride, n_views) in METHODS.items():
        label, tset = view_set(n_views)
        backbone = _backbone_with_stride(base, stride)
        log.info("quality: %s (stride %d, %d views)", method, stride, n_views)
        t0 = time.perf_counter()
        feats = hd.highres_features(x, backbone, tset).cpu().numpy()
        seconds = time.perf_counter() - t0
        pred = cluster_pixels(feats, k, seed=spec.seed, sample=sample)
        rows.append(
            {
                "method": method,
                "stride": stride,
                "views": n_views,
                "views_label": label,
                "miou": miou_hungarian(pred, truth),
                "boundary_f": boundary_fscore(pred, truth, tolerance_px=tolerance_px),
                "feature_s": seconds,
            }
        )
    result: dict[str, Any] = {
        "suite": "quality",
        "environment": environment(spec.device, weights=spec.weights_label),
        "random_weights": spec.random_weights,
        "settings": {
            "model": spec.model,
            "model_label": spec.describe(),
            "model_options": dict(spec.model_options),
            "device": spec.device,
            "size": size,
            "textures": list(textures),
            "cells": cells,
            "k": k,
            "tolerance_px": tolerance_px,
            "kmeans_sample_pixels": sample,
            "out_stride": 1,
        },
        "rows": rows,
    }
    if spec.random_weights:
        result["warning"] = RANDOM_WEIGHTS_NOTE
        log.warning("quality: *** %s ***", RANDOM_WEIGHTS_NOTE.upper())
    return result


COLUMNS = [
    Column("method", "method"),
    Column("stride", "stride"),
    Column("views", "views"),
    Column("miou", "mIoU", "{:.3f}"),
    Column("boundary_f", "boundary F (2 px)", "{:.3f}"),
    Column("feature_s", "features (s)", "{:.1f}"),
]


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = ["### Texture-mosaic segmentation (k-means vs the true layout)", ""]
    if result.get("random_weights"):
        lines += [f"**RANDOM WEIGHTS — {RANDOM_WEIGHTS_NOTE}.**", ""]
    lines += [
        environment_line(result["environment"]),
        f"{s['size']}×{s['size']} mosaic of {s['cells']} Voronoi cells, textures "
        f"{', '.join(s['textures'])} (k = {s['k']}); {s['model_label']}, out_stride 1; mIoU after "
        f"Hungarian matching, boundary F-score at {s['tolerance_px']:g} px.",
        "",
        markdown_table(result["rows"], COLUMNS),
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=448, help="mosaic side (default: %(default)s)")
    parser.add_argument(
        "--textures",
        type=lambda t: tuple(v.strip() for v in t.split(",") if v.strip()),
        default=DEFAULT_TEXTURES,
        help="skimage.data images (default: %(default)s)",
    )
    parser.add_argument(
        "--cells", type=int, default=10, help="Voronoi cells (default: %(default)s)"
    )
    parser.add_argument("--tolerance", type=float, default=2.0, help="boundary tolerance, px")
    parser.add_argument("--sample", type=int, default=20_000, help="k-means fit pixels")


def run(args: argparse.Namespace, spec: BackboneSpec) -> dict[str, Any]:
    torch.manual_seed(spec.seed)
    return run_quality(
        spec=spec,
        size=args.size,
        textures=args.textures,
        cells=args.cells,
        tolerance_px=args.tolerance,
        sample=args.sample,
    )
