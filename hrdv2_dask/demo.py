"""``hrdv2 demo``: a sample image, its features on an embedded cluster, and a PCA picture."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["make_sample_image", "run_demo", "texture_mosaic", "write_sample_image"]

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


def texture_mosaic(
    size: int, *, textures: Sequence[str] = SAMPLE_IMAGES, cells: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A mosaic of scikit-image textures in Voronoi cells and its label layout.

    Parameters
    ----------
    size : int
        Side in pixels.
    textures : sequence of str
        Names of ``skimage.data`` images; cell ``k`` shows ``textures[k % len(textures)]``.
    cells : int
        Number of Voronoi cells; every texture appears when ``cells >= len(textures)``.
    seed : int
        Seed of the cell centres.

    Returns
    -------
    image : numpy.ndarray
        ``(size, size, 3)`` uint8.
    labels : numpy.ndarray
        ``(size, size)`` int64: the index of each pixel's texture in ``textures``.

    Examples
    --------
    >>> image, labels = texture_mosaic(64, textures=("brick", "grass"), cells=3)
    >>> image.shape, sorted(np.unique(labels).tolist())
    ((64, 64, 3), [0, 1])
    """
    import skimage.data

    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, size, (cells, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    cell = np.argmin([(yy - cy) ** 2 + (xx - cx) ** 2 for cy, cx in centres], axis=0)
    labels = cell % len(textures)
    image = np.zeros((size, size, 3), np.uint8)
    for k, name in enumerate(textures):
        mask = labels == k
        image[mask] = _fill(getattr(skimage.data, name)(), size)[mask]
    return image, labels.astype(np.int64)


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
    return texture_mosaic(size, cells=cells, seed=seed)[0]


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
