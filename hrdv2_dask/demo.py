"""``hrdv2 demo``: a sample image, its features on an embedded cluster, and a PCA picture."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

__all__ = ["make_sample_image", "run_demo", "write_sample_image"]

log = logging.getLogger(__name__)


SAMPLE_IMAGES = ("brick", "grass", "gravel", "immunohistochemistry", "cell", "moon")


def _fill(image: np.ndarray, size: int) -> np.ndarray:
    """Mirror-tile an (h, w[, 3]) image to (size, size, 3) uint8 without seams."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    reps = (-(-size // image.shape[0]), -(-size // image.shape[1]))
    rows = np.concatenate([image if k % 2 == 0 else image[::-1] for k in range(reps[0])], axis=0)
    tiled = np.concatenate([rows if k % 2 == 0 else rows[:, ::-1] for k in range(reps[1])], axis=1)
    return np.ascontiguousarray(tiled[:size, :size, :3]).astype(np.uint8)


def make_sample_image(size: int = 2048, *, cells: int = 12, seed: int = 0) -> np.ndarray:
    """A mosaic of scikit-image's bundled textures and micrographs in Voronoi cells.

    Brick, grass and gravel textures, an immunohistochemistry slide, a cell micrograph and the
    moon surface (all shipped inside scikit-image, no download), mirror-tiled to fill the image;
    cell ``k`` shows image ``k % 6``.

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
    import skimage.data

    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, size, (cells, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    label = np.argmin([(yy - cy) ** 2 + (xx - cx) ** 2 for cy, cx in centres], axis=0)
    img = np.zeros((size, size, 3), np.uint8)
    for k in range(cells):
        source = getattr(skimage.data, SAMPLE_IMAGES[k % len(SAMPLE_IMAGES)])()
        mask = label == k
        img[mask] = _fill(source, size)[mask]
    return img


def write_sample_image(
    path: str | os.PathLike, *, size: int = 2048, png: str | os.PathLike | None = None
) -> Path:
    """Write :func:`make_sample_image` as a chunked Zarr v3 array (and optionally a PNG)."""
    import zarr
    from PIL import Image

    image = make_sample_image(size)
    arr = zarr.create_array(
        path, shape=image.shape, chunks=(512, 512, 3), dtype="uint8", overwrite=True, zarr_format=3
    )
    arr[...] = image
    if png is not None:
        Image.fromarray(image).save(png)
    return Path(path)


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
    """The demo workflow: sample image → features on an embedded cluster → PCA picture, clusters.

    Uses real DINOv2 weights when they are given or cached; otherwise runs on random weights and
    says so loudly (the outputs are marked ``random_weights=True``). Same as
    ``hrdv2 run workflows/demo.yaml``.

    Returns
    -------
    dict
        The summary also written to ``summary.json``.
    """
    from .workflows import Workflow, run_workflow

    wf = Workflow.from_dict(
        {
            "input": "sample",
            "sample_size": size,
            "output_dir": str(out_dir),
            "features": {
                "model": "dinov2_vits14",
                "weights": weights,
                "shifts": [1],
                "tile": 504,  # a multiple of the patch size (14) and of the output stride (4)
                "out_stride": out_stride,
                "model_options": model_options,
            },
            "analyses": [{"pca": {"components": 3}}, {"cluster": {"k": 6}}],
        }
    )
    summary = run_workflow(wf, client=client, progress=progress)
    log.info("demo written to %s; look at pca.png and clusters.png", out_dir)
    return summary
