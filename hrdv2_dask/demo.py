"""``hrdv2 demo``: a sample image, its features on an embedded cluster, and a PCA picture."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from .errors import WeightsNotFoundError

__all__ = ["make_sample_image", "pca_rgb", "run_demo"]

log = logging.getLogger(__name__)


def make_sample_image(size: int = 2048, *, cells: int = 12, seed: int = 0) -> np.ndarray:
    """A texture mosaic: Voronoi cells, each filled with one of six textures.

    Parameters
    ----------
    size : int
        Side in pixels.
    cells : int
        Number of Voronoi cells.

    Returns
    -------
    numpy.ndarray
        ``(size, size, 3)`` uint8.

    >>> make_sample_image(64, cells=3).shape
    (64, 64, 3)
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centres = rng.uniform(0, size, (cells, 2)).astype(np.float32)
    label = np.argmin([(yy - cy) ** 2 + (xx - cx) ** 2 for cy, cx in centres], axis=0)
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    textures = [
        0.5 + 0.5 * np.sin(xx / 3.0),
        0.5 + 0.5 * np.sin((xx + yy) / 6.0),
        ((xx // 16 + yy // 16) % 2).astype(np.float32),
        np.clip(0.5 + 0.25 * noise, 0, 1),
        0.5 + 0.5 * np.sin(np.hypot(xx - size / 2, yy - size / 2) / 4.0),
        0.5 + 0.5 * np.sign(np.sin(yy / 5.0)) * 0.6,
    ]
    tints = rng.uniform(0.4, 1.0, (len(textures), 3)).astype(np.float32)
    img = np.zeros((size, size, 3), np.float32)
    for k in range(cells):
        t = k % len(textures)
        m = label == k
        img[m] = textures[t][m, None] * tints[t]
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def pca_rgb(features: np.ndarray, *, sample: int = 20000, seed: int = 0) -> np.ndarray:
    """Project ``(C, Y, X)`` features on their first 3 principal components → uint8 RGB.

    >>> f = np.random.default_rng(0).normal(size=(8, 10, 12)).astype(np.float32)
    >>> pca_rgb(f).shape
    (10, 12, 3)
    """
    c = features.shape[0]
    flat = features.reshape(c, -1).T.astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.choice(flat.shape[0], size=min(sample, flat.shape[0]), replace=False)
    mean = flat[idx].mean(0)
    _, _, vt = np.linalg.svd(flat[idx] - mean, full_matrices=False)
    proj = (flat - mean) @ vt[:3].T
    lo, hi = np.percentile(proj[idx] @ np.eye(3), [1, 99], axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return (rgb.reshape(*features.shape[1:], 3) * 255).astype(np.uint8)


def run_demo(
    out_dir: str | os.PathLike = "hrdv2-demo",
    *,
    size: int = 2048,
    weights: str | None = None,
    out_stride: int = 4,
    progress: bool = True,
    client=None,
    model_options: dict | None = None,
) -> dict:
    """Build the sample image, extract features on an embedded cluster, write a PCA PNG.

    Uses real DINOv2 weights when they are given or cached; otherwise runs on random weights and
    says so loudly (the outputs are marked ``random_weights=True``).

    Returns
    -------
    dict
        The summary also written to ``summary.json``.
    """
    import zarr
    from PIL import Image

    from .backbones import load_backbone
    from .extract import extract

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image = make_sample_image(size)
    src = out / "sample.zarr"
    arr = zarr.create_array(
        src, shape=image.shape, chunks=(512, 512, 3), dtype="uint8", overwrite=True, zarr_format=3
    )
    arr[...] = image
    Image.fromarray(image).save(out / "sample.png")

    if weights is None:
        try:
            load_backbone("dinov2_vits14", download=True, **(model_options or {}))
        except WeightsNotFoundError as err:
            log.warning("%s", err)
            log.warning(
                "*** The demo continues with RANDOM WEIGHTS: pictures show no real features ***"
            )
            weights = "random"
    feats = extract(
        src,
        out / "features.zarr",
        weights=weights,
        tile=504,  # a multiple of the patch size (14) and of the output stride (4)
        out_stride=out_stride,
        client=client,
        overwrite=True,
        progress=progress,
        model_options=model_options or {},
    )
    rgb = pca_rgb(np.asarray(feats.values, dtype=np.float32))
    Image.fromarray(rgb).resize((size // 2, size // 2), Image.NEAREST).save(out / "pca.png")
    summary = {
        "image": str(src),
        "image_shape": list(image.shape),
        "features": str(out / "features.zarr"),
        "feature_shape": dict(feats.sizes),
        "random_weights": bool(feats.attrs.get("random_weights")),
        "previews": [str(out / "sample.png"), str(out / "pca.png")],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("demo written to %s: %s", out, json.dumps(summary))
    return summary
