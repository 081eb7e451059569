"""Planning an extraction: pure functions of the settings, the image's shape and the backbone.

Nothing here starts a cluster, reads pixels or writes a file: :func:`plan_run` turns
:class:`~hrdv2_dask.config.FeatureSettings` plus what was learnt about the image (shape, value
range, mask) and the backbone (patch, stride, channels, weights) into a :class:`RunPlan`: the
window grid, the block tasks' plan and the settings and provenance the store records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._version import __version__
from ..config import FeatureSettings
from ..errors import ConfigError, InputError
from ..heads import LinearHead
from ..tiling import TileGrid, plan_tiles
from ..transforms import TransformSet, combine, flips, shifts

__all__ = [
    "BackboneFacts",
    "BlockPlan",
    "RunPlan",
    "check_settings",
    "default_block",
    "mask_description",
    "plan_grid",
    "plan_run",
    "transform_set",
]

#: Memory budget of one block task's accumulator.
BLOCK_BYTES = 512 * 2**20


@dataclass(frozen=True)
class BlockPlan:
    """Everything a block task needs, small enough to ship with every task."""

    grid: TileGrid
    block: int  # chunks per block side
    n_blocks: tuple[int, int]
    transforms: TransformSet
    value_range: tuple[float, float]
    channels: int  # feature channels C
    dtype: str
    batch_size: int | None
    store_path: str
    precision: str = "fp32"  # the backbone's arithmetic (hrdv2_dask.precision)
    # Optional linear head (e.g. a PCA projection) applied to each view's low-resolution map
    # before upsampling; exact because resampling and blending are linear with weights that
    # sum to 1. ``channels`` is then the head's output channels.
    head: LinearHead | None = None
    # (n_windows_y, n_windows_x) bool: windows to compute (None: all). Cells that no computed
    # window covers stay NaN (the store's fill value).
    compute: np.ndarray | None = field(default=None, compare=False)

    def computes(self, j: int, i: int) -> bool:
        return self.compute is None or bool(self.compute[j, i])

    @property
    def blend_cells(self) -> int:
        return self.grid.blend_px // self.grid.out_stride

    @property
    def block_cells(self) -> int:
        return self.block * self.grid.chunk_cells

    def chunk_range(self, jb: int, axis: int) -> range:
        n = self.grid.n_windows[axis]
        return range(jb * self.block, min((jb + 1) * self.block, n))

    def halo_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the strips a block passes on, for those that some block receives: none
        for a grid of one block (a small image), only ``right`` for one row of blocks..."""
        c, b, k = self.channels + 1, self.blend_cells, self.block_cells
        rows, cols = self.n_blocks[0] > 1, self.n_blocks[1] > 1
        shapes = {"bottom": (c, b, k), "right": (c, k, b), "corner": (c, b, b)}
        used = {"bottom": rows, "right": cols, "corner": rows and cols}
        return {name: shape for name, shape in shapes.items() if used[name]}


@dataclass(frozen=True)
class BackboneFacts:
    """What planning needs to know of the backbone (read on the client, never shipped)."""

    name: str
    patch_size: int
    stride: int
    channels: int
    random_weights: bool = False
    weights_origin: str | None = None
    random_seed: int | None = None  # the seed random weights were built from (None: not seeded)
    # Its non-default outputs (layer, facet, attention), recorded in the settings.
    options: Mapping[str, Any] = field(default_factory=dict)
    halo_px: int = 0  # context beyond the patch that a feature reads (a filter bank's support)
    channel_names: tuple[str, ...] = ()  # recorded in the provenance where the backbone has them


@dataclass(frozen=True)
class RunPlan:
    """Everything an extraction writes and computes, decided before any of it happens."""

    blocks: BlockPlan
    settings: dict[str, Any]  # what determines the values: a store with others is refused
    provenance: dict[str, Any]  # how they were made
    components: int | None

    @property
    def grid(self) -> TileGrid:
        return self.blocks.grid

    @property
    def out_channels(self) -> int:
        return self.components or self.blocks.channels

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.out_channels, *self.grid.out_shape)

    @property
    def chunks(self) -> tuple[int, int, int]:
        c = self.grid.chunk_cells
        return (min(self.out_channels, 64), c, c)

    @property
    def megapixels(self) -> float:
        h, w = self.grid.image_shape
        return h * w / 1e6


def transform_set(features: FeatureSettings, patch_size: int) -> TransformSet:
    """The transforms that ``features`` describe (shift lengths checked against the patch).

    >>> len(transform_set(FeatureSettings(flips=True), 14))
    27
    """
    if patch_size < 3:  # no shift fits (|d| < P/2): a per-pixel backbone needs no ensemble
        sets = [TransformSet([])]
    else:
        sets = [
            shifts(
                features.shifts, features.neighbourhood, features.boundary, patch_size=patch_size
            )
        ]
    if features.flips:
        sets.append(flips())
    return combine(*sets)


def default_block(channels: int, chunk_cells: int, n_windows: tuple[int, int]) -> int:
    """Chunks per block side: within the memory budget, at most 4, and at least 2 blocks a side
    when the image allows, so that tasks run in parallel and progress shows.

    >>> default_block(384, 440, (10, 10)), default_block(16, 440, (10, 10))
    (1, 4)
    """
    per_chunk = (channels + 1) * (chunk_cells + 1) ** 2 * 4
    by_memory = int(math.sqrt(BLOCK_BYTES / per_chunk))
    by_grid = max(1, min(n_windows) // 2)
    return max(1, min(by_memory, 4, by_grid))


def plan_grid(
    image_shape: tuple[int, int],
    features: FeatureSettings,
    backbone: BackboneFacts,
    transforms: TransformSet,
    *,
    name: str = "the image",
) -> TileGrid:
    """The window grid, after checking that the image holds at least one patch."""
    h, w = image_shape
    patch = backbone.patch_size
    if h < patch or w < patch:
        raise InputError(
            f"Image {name} of {h}x{w} px is smaller than one {patch}x{patch} patch; nothing to "
            "compute. Upscale it or use a larger image."
        )
    return plan_tiles(
        (h, w),
        tile_px=features.tile,
        overlap_px=features.overlap,
        patch_px=patch,
        stride_px=backbone.stride,
        max_shift_px=transforms.max_shift_px + backbone.halo_px,
        out_stride=features.out_stride,
    )


def check_settings(
    features: FeatureSettings, backbone: BackboneFacts, transforms: TransformSet
) -> None:
    """Raise the :class:`~hrdv2_dask.errors.ConfigError` that planning any image with these
    settings would raise (a tile or overlap that no window grid allows, more ``components``
    than the backbone's channels): checked once before a collection writes anything, instead
    of failing every member alike.

    >>> facts = BackboneFacts("m", patch_size=14, stride=14, channels=8)
    >>> check_settings(FeatureSettings(tile=140), facts, TransformSet([]))  # fine: no error
    >>> check_settings(FeatureSettings(components=9), facts, TransformSet([]))
    Traceback (most recent call last):
    ...
    hrdv2_dask.errors.ConfigError: components must be an integer in 1..8, got 9.
    """
    plan_tiles(
        (backbone.patch_size, backbone.patch_size),  # the grid's rules hold whatever the shape
        tile_px=features.tile,
        overlap_px=features.overlap,
        patch_px=backbone.patch_size,
        stride_px=backbone.stride,
        max_shift_px=transforms.max_shift_px + backbone.halo_px,
        out_stride=features.out_stride,
    )
    _check_components(features.components, backbone.channels)


def _check_components(components: int | None, channels: int) -> None:
    if components is not None and components > channels:
        raise ConfigError(f"components must be an integer in 1..{channels}, got {components!r}.")


def mask_description(mask: Any) -> str | None:
    """How a mask is recorded in the settings: its name, or an array's shape and digest.

    >>> mask_description(np.ones((2, 3), bool))
    'array 2x3 sha1:ab461f6b8a68'
    """
    if mask is None:
        return None
    if isinstance(mask, np.ndarray):
        digest = hashlib.sha1(np.packbits(mask.astype(bool)).tobytes()).hexdigest()[:12]
        return f"array {mask.shape[0]}x{mask.shape[1]} sha1:{digest}"
    return str(mask)


def plan_run(
    features: FeatureSettings,
    *,
    backbone: BackboneFacts,
    transforms: TransformSet,
    grid: TileGrid,
    value_range: tuple[float, float],
    source: Mapping[str, Any],
    store: str,
    compute: np.ndarray | None = None,
    intensity: str | None = None,
    precision: tuple[str, str | None] = ("fp32", None),
) -> RunPlan:
    """The plan of one extraction.

    Parameters
    ----------
    features : FeatureSettings
        The checked options.
    backbone : BackboneFacts
        Patch size, stride, channels and weights of the backbone the workers will build.
    transforms : TransformSet
        The views of the ensemble.
    grid : TileGrid
        From :func:`plan_grid`.
    value_range : (float, float)
        The intensities mapped to 0 and 1 (see :func:`hrdv2_dask.preprocess.intensity_range`).
    source : mapping
        The source's :meth:`~hrdv2_dask.io.ImageMeta.to_dict` (shape, path, pixel size).
    store : str
        The output store's path.
    compute : numpy.ndarray, optional
        ``(n_windows_y, n_windows_x)`` bool: the windows to compute (a mask); default all.
    intensity : str, optional
        How ``value_range`` was found (recorded in the provenance).
    precision : (str, str or None), optional
        What the workers run and what the settings record
        (:func:`hrdv2_dask.precision.recorded_precision`; ``None``: nothing, the legacy rule).
    """
    channels = backbone.channels
    components = features.components
    _check_components(components, channels)
    block = features.block or default_block(
        components or channels, grid.chunk_cells, grid.n_windows
    )
    blocks = BlockPlan(
        grid=grid,
        block=block,
        n_blocks=tuple(-(-n // block) for n in grid.n_windows),
        transforms=transforms,
        value_range=tuple(value_range),
        channels=channels,
        dtype=features.dtype,
        batch_size=features.batch_size,
        store_path=str(store),
        precision=precision[0],
        compute=compute,
    )
    settings = {
        "model": backbone.name,
        "weights": "random" if backbone.random_weights else str(features.weights or "default"),
        "random_weights": backbone.random_weights,
        "patch_size": backbone.patch_size,
        "stride": backbone.stride,
        "transforms": transforms.describe(),
        "tile_px": grid.tile_px,
        "overlap_px": grid.overlap_px,
        "margin_px": grid.margin_px,
        "out_stride": features.out_stride,
        "dtype": features.dtype,
        "value_range": list(value_range),
        "source_shape": list(source["shape"]),
        "block": block,
        "components": components,
        "mask": mask_description(features.mask),
        "debias": features.debias,
        **backbone.options,
    }
    if backbone.random_seed is not None:  # only seeded random weights: other stores unchanged
        settings["random_seed"] = backbone.random_seed
    if precision[1] is not None:
        settings["precision"] = precision[1]
    if features.channels is not None:  # only picked channels: other stores unchanged
        settings["channels"] = list(features.channels)
    provenance: dict[str, Any] = {
        "package": "hrdv2-dask",
        "version": __version__,
        "weights_origin": backbone.weights_origin,
        "source": dict(source),
    }
    if intensity is not None:
        provenance["intensity"] = intensity
    if backbone.channel_names and components is None:
        provenance["channel_names"] = list(backbone.channel_names)
    if compute is not None:
        provenance["computed_windows"] = int(compute.sum())
        provenance["skipped_windows"] = int(compute.size - compute.sum())
        provenance["fill_value"] = "NaN (cells that no computed window reaches)"
    return RunPlan(blocks=blocks, settings=settings, provenance=provenance, components=components)


def with_projection(plan: RunPlan, head: Any) -> RunPlan:
    """``plan`` whose blocks apply ``head`` (a PCA projection) to ``plan.components`` channels."""
    return dataclasses.replace(
        plan, blocks=dataclasses.replace(plan.blocks, channels=plan.components, head=head)
    )
