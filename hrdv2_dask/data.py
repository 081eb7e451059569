"""Sample images made from the pictures that scikit-image ships (no download).

A leaf: numpy and scikit-image only. :func:`hrdv2_dask.io.samples.write_sample_image` stores
one as chunked Zarr for the demo and the workflows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SAMPLE_IMAGES", "make_sample_image", "texture_mosaic"]


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
