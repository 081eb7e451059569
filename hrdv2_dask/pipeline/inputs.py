"""What an extraction learns from its inputs before planning: intensities, mask, backbone.

These read a little of the source (a seeded sample of chunks, a thumbnail) or load the backbone
on the client; none of them needs the cluster.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from typing import Any

import dask
import numpy as np

from ..backbones import FILTERBANK, RandomWeightsWarning, load_backbone, model_spec
from ..errors import ConfigError, InputError
from ..io.readers import REPAIR, checked_image, open_image, read_thumbnail
from ..masking import foreground_mask
from ..preprocess import fixed_intensity_range, intensity_range, sample_chunk_ids
from ..tiling import TileGrid, windows_touching
from .plan import BackboneFacts
from .workers import BackboneRecipe, seeded

__all__ = ["backbone_recipe", "describe_intensities", "estimate_value_range", "resolve_mask"]

log = logging.getLogger(__name__)

_AUTO_MASKS = {"auto": "bright", "auto-dark": "dark"}
_OUTPUT_DEFAULTS = {"layer": -1, "facet": "token", "attention": "none"}


def estimate_value_range(
    data, *, seed: int = 0, max_chunks: int = 64, name: str = "the image"
) -> tuple[float, float]:
    """The intensity policy (:func:`hrdv2_dask.preprocess.intensity_range`) on a lazy image.

    The dtype range for uint8/bool; otherwise the 0.5/99.5 percentiles of up to ``max_chunks``
    chunks picked with a fixed seed (:func:`~hrdv2_dask.preprocess.sample_chunk_ids`), so the
    mapping is the same on every run and never needs the whole image in memory.
    """
    fixed = fixed_intensity_range(data.dtype)
    if fixed is not None:
        return fixed
    ids = sample_chunk_ids(data.numblocks[:2], seed=seed, max_chunks=max_chunks)
    checked = checked_image(data, name=name, fix=f"{REPAIR} (or give value_range)")
    blocks = dask.compute(*[checked.blocks[j, i] for j, i in ids])
    sample = np.concatenate([np.asarray(b).reshape(-1, data.shape[-1]) for b in blocks])
    return intensity_range(sample, dtype=data.dtype)


def describe_intensities(dtype, value_range: tuple[float, float] | None) -> str:
    """How the intensities were mapped, for the store's provenance.

    >>> describe_intensities(np.dtype("uint16"), None)
    'percentiles 0.5/99.5 of up to 64 chunks (seed 0)'
    """
    if value_range is not None:
        return "given value_range"
    if fixed_intensity_range(dtype) is not None:
        return "dtype range"
    return "percentiles 0.5/99.5 of up to 64 chunks (seed 0)"


def resolve_mask(mask, data, grid: TileGrid, *, name: str) -> np.ndarray | None:
    """The windows to compute for ``mask`` (see :func:`hrdv2_dask.extract`); ``None``: all.

    Raises :class:`InputError` when the mask's aspect ratio does not match the image or it has
    no foreground at all.
    """
    if mask is None:
        return None
    if isinstance(mask, str) and mask in _AUTO_MASKS:
        thumb = read_thumbnail(data, max_side=1024, name=name, fix=f"{REPAIR}, or use no mask")
        fg = foreground_mask(thumb, background=_AUTO_MASKS[mask])
        origin = f"mask {mask!r}"
    elif isinstance(mask, np.ndarray):
        if mask.ndim != 2:
            raise InputError(f"A mask array must be 2-D (h, w), got shape {mask.shape}.")
        fg, origin = mask.astype(bool), "the mask array"
    elif isinstance(mask, str | os.PathLike):
        origin = f"mask file {str(mask)!r}"
        mdata, _ = open_image(mask)
        fix = "The mask file is damaged: save the mask again (or run without it), then rerun"
        fg = read_thumbnail(mdata, max_side=4096, name=origin, fix=fix)[..., 0] > 0
    else:
        raise ConfigError(
            f"mask must be 'auto', 'auto-dark', a path to a mask image or a 2-D array, got "
            f"{mask!r}."
        )
    h, w = grid.image_shape
    if abs(fg.shape[0] / fg.shape[1] - h / w) > 0.05 * (h / w) + 2 / min(fg.shape):
        raise InputError(
            f"{origin} of {fg.shape[0]}x{fg.shape[1]} px does not have the aspect ratio of "
            f"{name} ({h}x{w} px); give a mask of the whole image at any scale."
        )
    if not fg.any():
        raise InputError(
            f"{origin} has no foreground (no non-zero pixel) for {name}; nothing would be "
            "computed. Use another mask, or none."
        )
    compute = windows_touching(grid, fg)
    log.info(
        "%s: %d of %d windows touch the foreground (%.0f %% skipped)",
        origin,
        int(compute.sum()),
        compute.size,
        100 * (1 - compute.mean()),
    )
    return compute


def _resolved_path(backbone) -> str | None:
    """The local checkpoint file the client loaded, so workers load exactly that file."""
    if not getattr(backbone, "needs_weights", True):
        return None  # the filter bank
    return str(getattr(backbone, "weights_path", None) or backbone.weights_origin)


def _facts(local: Any, name: str, seed: int | None = None) -> BackboneFacts:
    return BackboneFacts(
        name=name,
        patch_size=int(local.patch_size),
        stride=int(local.stride),
        channels=int(local.embed_dim),
        random_weights=getattr(local, "weights_origin", "") == "random",
        weights_origin=getattr(local, "weights_origin", None),
        random_seed=seed,
        options=dict(getattr(local, "options", {})),
        halo_px=int(getattr(local, "halo_px", 0)),
        channel_names=tuple(getattr(local, "channel_names", ())),
    )


def _check_outputs_by_name(backbone: Any, outputs: dict) -> None:
    """Layer, facet and attention are load_backbone's keywords: a given backbone has its own."""
    chosen = {k: v for k, v in outputs.items() if v != _OUTPUT_DEFAULTS[k]}
    if chosen and not isinstance(backbone, str):
        raise ConfigError(
            f"{chosen} apply to a backbone given by name; for a backbone object or factory pass "
            "them to load_backbone(...) instead."
        )


def backbone_recipe(
    backbone: Any,
    weights: str | None,
    stride: int | None,
    device: str,
    model_options: dict,
    threads: int | None,
    outputs: dict | None = None,
    *,
    seed: int = 0,
) -> tuple[Any, BackboneFacts]:
    """``(what the workers get, what planning needs)`` for a backbone option.

    A model name is loaded once here (to check it and read its facts) and shipped as a
    :class:`~hrdv2_dask.pipeline.workers.BackboneRecipe` naming the resolved checkpoint file, or,
    with ``weights="random"``, the ``seed`` that every worker builds the same random model from;
    a zero-argument callable is shipped as the recipe's factory; a backbone object as it is.
    ``outputs`` (``layer``, ``facet``, ``attention``) go to :func:`load_backbone` with a name.
    """
    outputs = dict(outputs or {})
    _check_outputs_by_name(backbone, outputs)
    with warnings.catch_warnings():
        # load_backbone warns about random weights; extract's warning names the store instead.
        warnings.simplefilter("ignore", RandomWeightsWarning)
        if isinstance(backbone, str):
            timm_name = backbone if backbone == FILTERBANK else model_spec(backbone).timm_name
            random = weights is not None and str(weights) == "random"
            with seeded(seed if random else None):
                local = load_backbone(backbone, weights, stride, "cpu", **outputs, **model_options)
            recipe = BackboneRecipe(
                name=backbone,
                # Workers load exactly the file the client resolved (no download race), or
                # rebuild the client's random model from its seed.
                weights="random" if random else _resolved_path(local),
                stride=stride,
                device=device,
                overrides=tuple(sorted(model_options.items())),
                outputs=tuple(sorted(outputs.items())),
                seed=seed if random else None,
                threads=threads,
            )
            return recipe, _facts(local, timm_name, seed if random else None)
        if callable(backbone) and not hasattr(backbone, "patch_size"):
            local = backbone()
            recipe = BackboneRecipe(
                factory=backbone, factory_token=uuid.uuid4().hex, device=device, threads=threads
            )
            return recipe, _facts(local, getattr(local, "name", type(local).__name__))
    for attr in ("patch_size", "stride", "embed_dim"):
        if not hasattr(backbone, attr):
            raise ConfigError(
                f"backbone must be a model name, a backbone object (with patch_size, stride, "
                f"embed_dim) or a zero-argument callable that builds one; {backbone!r} has no "
                f"{attr!r}."
            )
    return backbone, _facts(backbone, getattr(backbone, "name", type(backbone).__name__))
