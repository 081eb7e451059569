"""``extract``: high-resolution features of an image of any size into a Zarr store."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import uuid
import warnings
from typing import Any

import dask
import numpy as np

from ._version import __version__
from .analysis import pca_basis
from .backbones import RandomWeightsWarning, load_backbone, model_spec
from .cluster import (
    ClusterError,
    check_deployment,
    check_device,
    cluster_client,
    resolve_device,
    task_resources,
)
from .errors import ConfigError, InputError
from .graph import (
    BackboneRecipe,
    BlockPlan,
    SourceReader,
    bias_sums,
    block_windows_count,
    build_tasks,
    feature_sample,
    pick_windows,
    shipped,
)
from .heads import LinearHead
from .io.readers import open_image, read_thumbnail
from .io.store import RunStore, open_features
from .masking import foreground_mask
from .tiling import TileGrid, plan_tiles, windows_touching
from .transforms import Transform, TransformSet, shifts

__all__ = ["extract", "estimate_value_range"]

log = logging.getLogger(__name__)

_BLOCK_BYTES = 512 * 2**20
_OPTIONS = {
    "stride",
    "device",
    "workers",
    "scheduler",
    "cluster",
    "slurm",
    "batch_size",
    "block",
    "overwrite",
    "progress",
    "axes",
    "level",
    "value_range",
    "model_options",
    "components",
    "mask",
    "debias",
}


def estimate_value_range(data, *, seed: int = 0, max_chunks: int = 64) -> tuple[float, float]:
    """Global intensity mapping: dtype range for uint8/bool, else 0.5/99.5 percentiles.

    The percentiles come from up to ``max_chunks`` chunks picked with a fixed seed, so the
    mapping is the same on every run and never needs the whole image in memory.
    """
    dtype = np.dtype(data.dtype)
    if dtype == np.uint8:
        return (0.0, 255.0)
    if dtype == np.bool_:
        return (0.0, 1.0)
    grid = [range(n) for n in data.numblocks[:2]]
    ids = [(j, i) for j in grid[0] for i in grid[1]]
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(ids), size=min(max_chunks, len(ids)), replace=False))
    blocks = dask.compute(*[data.blocks[ids[k][0], ids[k][1]] for k in picked])
    sample = np.concatenate([np.asarray(b).reshape(-1, data.shape[-1]) for b in blocks])
    sample = sample[:, :3].astype(np.float64)
    if not np.isfinite(sample).all():
        raise InputError(
            "The image has NaN or infinite pixels; fill or mask them first (e.g. np.nan_to_num)."
        )
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return (float(lo), float(hi))


def _backbone_recipe(backbone, weights, stride, device, model_options, threads):
    """(recipe shipped to workers, client-side backbone for attributes, description)."""
    if isinstance(backbone, str):
        spec = model_spec(backbone)
        local = load_backbone(backbone, weights, stride, "cpu", **model_options)
        if local.weights_origin == "random":
            # Every worker must run the same random model: ship the client's, once per worker.
            recipe = BackboneRecipe(
                factory=_Fixed(local),
                factory_token=uuid.uuid4().hex,
                device=device,
                threads=threads,
            )
            return recipe, local, spec.timm_name
        recipe = BackboneRecipe(
            name=backbone,
            # Workers load exactly the file the client resolved (no download race, no random).
            weights=_resolved_path(local),
            stride=stride,
            device=device,
            overrides=tuple(sorted(model_options.items())),
            threads=threads,
        )
        return recipe, local, spec.timm_name
    if callable(backbone) and not hasattr(backbone, "patch_size"):
        local = backbone()
        recipe = BackboneRecipe(
            factory=backbone, factory_token=uuid.uuid4().hex, device=device, threads=threads
        )
        return recipe, local, getattr(local, "name", type(local).__name__)
    for attr in ("patch_size", "stride", "embed_dim"):
        if not hasattr(backbone, attr):
            raise ConfigError(
                f"backbone must be a model name, a backbone object (with patch_size, stride, "
                f"embed_dim) or a zero-argument callable that builds one; {backbone!r} has no "
                f"{attr!r}."
            )
    return backbone, backbone, getattr(backbone, "name", type(backbone).__name__)


class _Fixed:
    """A zero-argument factory that returns one given backbone."""

    def __init__(self, backbone) -> None:
        self.backbone = backbone

    def __call__(self):
        return self.backbone


def _resolved_path(backbone) -> str:
    """The local checkpoint file the client loaded, so workers load exactly that file."""
    return str(getattr(backbone, "weights_path", None) or backbone.weights_origin)


def _default_block(channels: int, chunk_cells: int, n_windows: tuple[int, int]) -> int:
    """Chunks per block side: within the memory budget, at most 4, and at least 2 blocks a side
    when the image allows, so that tasks run in parallel and progress shows."""
    per_chunk = (channels + 1) * (chunk_cells + 1) ** 2 * 4
    by_memory = int(math.sqrt(_BLOCK_BYTES / per_chunk))
    by_grid = max(1, min(n_windows) // 2)
    return max(1, min(by_memory, 4, by_grid))


_AUTO_MASKS = {"auto": "bright", "auto-dark": "dark"}


def _mask_description(mask) -> str:
    if isinstance(mask, np.ndarray):
        import hashlib

        digest = hashlib.sha1(np.packbits(mask.astype(bool)).tobytes()).hexdigest()[:12]
        return f"array {mask.shape[0]}x{mask.shape[1]} sha1:{digest}"
    return str(mask)


def resolve_mask(mask, data, grid: TileGrid, *, name: str) -> tuple[np.ndarray | None, str | None]:
    """The windows to compute for ``mask`` (see :func:`extract`) and a description of it.

    Returns ``(None, None)`` without a mask. Raises :class:`InputError` when the mask's aspect
    ratio does not match the image or it has no foreground at all.
    """
    if mask is None:
        return None, None
    if isinstance(mask, str) and mask in _AUTO_MASKS:
        fg = foreground_mask(read_thumbnail(data, max_side=1024), background=_AUTO_MASKS[mask])
        origin = f"mask {mask!r}"
    elif isinstance(mask, np.ndarray):
        if mask.ndim != 2:
            raise InputError(f"A mask array must be 2-D (h, w), got shape {mask.shape}.")
        fg, origin = mask.astype(bool), "the mask array"
    elif isinstance(mask, str | os.PathLike):
        mdata, _ = open_image(mask)
        fg = read_thumbnail(mdata, max_side=4096)[..., 0] > 0
        origin = f"mask file {str(mask)!r}"
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
    return compute, _mask_description(mask)


def extract(
    source,
    store: str | os.PathLike,
    backbone: Any = "dinov2_vits14",
    weights: str | None = None,
    transforms: TransformSet | list[Transform] | None = None,
    tile: int = 518,
    overlap: int | None = None,
    out_stride: int = 1,
    dtype: str = "float16",
    client=None,
    **options,
):
    """Compute HR-Dv2 features of an image of any size and write them to a Zarr store.

    Parameters
    ----------
    source : path, numpy.ndarray or dask.array.Array
        Image to read with :func:`hrdv2_dask.io.open_image` (Zarr, OME-Zarr, TIFF, OME-TIFF, SVS,
        PNG, JPEG, ``.npy``, arrays); never loaded whole.
    store : path
        Output Zarr v3 store (created, or resumed when it holds an interrupted run with the
        same settings).
    backbone : str, backbone object or callable, optional
        Model name (``"dinov2_vits14"``, a timm name...), a backbone object, or a zero-argument
        callable that builds one (called once per worker process).
    weights : str, optional
        Checkpoint path, or ``"random"`` (outputs are then marked ``random_weights=True``).
    transforms : TransformSet, optional
        Default :func:`hrdv2_dask.shifts` (9 views).
    tile, overlap : int, optional
        Window size and overlap in pixels (overlap default from the patch size and shifts).
    out_stride : int, optional
        Pixels per output cell.
    dtype : str, optional
        Stored dtype (``"float16"`` or ``"float32"``).
    client : distributed.Client, optional
        Run on this client; default: start and close an embedded LocalCluster.
    **options
        ``stride`` (stride trick), ``device`` (``"auto"``/``"cpu"``/``"cuda"``; ``"auto"`` is
        resolved on each worker unless the cluster is the embedded one), ``workers``,
        ``scheduler`` (address), ``cluster`` (``"local"``/``"cuda"``/``"slurm"``) and ``slurm``
        (:class:`~hrdv2_dask.workflows.SlurmSettings`), see
        :func:`~hrdv2_dask.cluster.cluster_client`; ``batch_size``, ``block`` (chunks per task
        side), ``overwrite``, ``progress``, ``axes``, ``level``, ``value_range``, ``components``
        (PCA channel reduction, applied on the workers to each view's low-resolution map before
        upsampling), ``mask`` (``"auto"``: skip windows without foreground found by Otsu's
        threshold on a thumbnail, background bright as on bright-field slides; ``"auto-dark"``:
        background dark; a path to a mask image of the whole image at any scale, non-zero =
        foreground; or a 2-D bool array; skipped cells read as NaN), ``debias`` (number of
        windows over which the positional artefact of the backbone is estimated and then
        subtracted from every window; 0 = off), ``model_options`` (dict passed to
        ``timm.create_model``).

    Returns
    -------
    xarray.DataArray
        The store opened lazily with :func:`open_features`.

    Notes
    -----
    The PCA of ``components`` and the positional artefact of ``debias`` are estimated by tasks
    on the workers (on the device that computes the blocks) from windows picked with a fixed
    seed, and kept in the store: a resumed run uses the same ones. Nothing is written before
    the cluster is up and the estimates are made.
    """
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigError(f"Unknown option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}.")
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"dtype must be 'float16' or 'float32', got {dtype!r}.")
    check_deployment(
        scheduler=options.get("scheduler"),
        cluster=options.get("cluster", "local"),
        slurm=options.get("slurm"),
    )
    embedded = (
        client is None
        and options.get("scheduler") is None
        and options.get("cluster", "local") == "local"
    )
    device = options.get("device", "auto")
    # The embedded cluster runs on this machine; elsewhere each worker resolves "auto" itself.
    device = resolve_device(device) if embedded else check_device(device)
    workers = options.get("workers")
    data, meta = open_image(source, options.get("axes"), level=options.get("level", 0))
    h, w = meta.shape[:2]

    threads = None
    if embedded:
        threads = max(1, (os.cpu_count() or 1) // (workers or 1))
    with warnings.catch_warnings():
        # load_backbone warns about random weights; the warning below names the store instead.
        warnings.simplefilter("ignore", RandomWeightsWarning)
        recipe, local, model_name = _backbone_recipe(
            backbone,
            weights,
            options.get("stride"),
            device,
            dict(options.get("model_options") or {}),
            threads,
        )
    random_weights = getattr(local, "weights_origin", "") == "random"
    if random_weights:
        msg = f"*** RANDOM WEIGHTS: the features in {store} are meaningless (testing only) ***"
        log.warning(msg)
        warnings.warn(msg, RandomWeightsWarning, stacklevel=2)
    patch, stride = int(local.patch_size), int(local.stride)
    if h < patch or w < patch:
        raise InputError(
            f"Image {meta.path or 'array'} of {h}x{w} px is smaller than one {patch}x{patch} "
            "patch; nothing to compute. Upscale it or use a larger image."
        )
    tset = (
        transforms
        if isinstance(transforms, TransformSet)
        else (shifts(patch_size=patch) if transforms is None else TransformSet(transforms))
    )
    grid = plan_tiles(
        (h, w),
        tile_px=tile,
        overlap_px=overlap,
        patch_px=patch,
        stride_px=stride,
        max_shift_px=tset.max_shift_px,
        out_stride=out_stride,
    )
    value_range = tuple(options.get("value_range") or estimate_value_range(data))
    channels = int(local.embed_dim)
    components = options.get("components")
    if components is not None and not (isinstance(components, int) and 1 <= components <= channels):
        raise ConfigError(f"components must be an integer in 1..{channels}, got {components!r}.")
    out_channels = components or channels
    block = int(
        options.get("block") or _default_block(out_channels, grid.chunk_cells, grid.n_windows)
    )
    n_blocks = tuple(-(-n // block) for n in grid.n_windows)
    plan = BlockPlan(
        grid=grid,
        block=block,
        n_blocks=n_blocks,
        transforms=tset,
        value_range=value_range,
        channels=channels,
        dtype=dtype,
        batch_size=options.get("batch_size"),
        store_path=str(store),
    )
    compute, mask_desc = resolve_mask(
        options.get("mask"), data, grid, name=str(meta.path or "the image")
    )
    plan = dataclasses.replace(plan, compute=compute)
    debias = options.get("debias") or 0
    if isinstance(debias, bool) or not isinstance(debias, int) or debias < 0:
        raise ConfigError(f"debias must be a number of windows >= 0 (e.g. 16), got {debias!r}.")
    settings = {
        "model": model_name,
        "weights": "random" if random_weights else str(weights or "default"),
        "random_weights": random_weights,
        "patch_size": patch,
        "stride": stride,
        "transforms": tset.describe(),
        "tile_px": grid.tile_px,
        "overlap_px": grid.overlap_px,
        "margin_px": grid.margin_px,
        "out_stride": out_stride,
        "dtype": dtype,
        "value_range": list(value_range),
        "source_shape": list(meta.shape),
        "block": block,
        "components": components,
        "mask": mask_desc,
        "debias": debias,
    }
    provenance = {
        "package": "hrdv2-dask",
        "version": __version__,
        "weights_origin": getattr(local, "weights_origin", None),
        "source": meta.to_dict(),
    }
    if compute is not None:
        provenance["computed_windows"] = int(compute.sum())
        provenance["skipped_windows"] = int(compute.size - compute.sum())
        provenance["fill_value"] = "NaN (cells that no computed window reaches)"
    # Only checks here: the store is written once the cluster is up and the estimates are made.
    run_store = RunStore(store, settings=settings, overwrite=bool(options.get("overwrite")))
    if run_store.complete:
        log.info("%s is already complete with these settings; nothing to do", store)
        return open_features(store)

    from .preload import backbone_on_workers

    t0 = time.perf_counter()
    with cluster_client(
        client,
        scheduler=options.get("scheduler"),
        cluster=options.get("cluster", "local"),
        workers=workers,
        device=device,
        slurm=options.get("slurm"),
    ) as c:
        resources = task_resources(c, device)
        run = _Run(c, plan, SourceReader(data), recipe, resources, options.get("progress", True))
        with backbone_on_workers(c, recipe, resources=resources):
            token_bias = run.position_bias(debias, saved=run_store.saved("token_bias"))
            if components is not None:
                mean, comps = run.projection(components, token_bias, saved=run_store.provenance)
                provenance["projection_mean"] = mean.tolist()
                provenance["projection_components"] = comps.tolist()
                head = LinearHead.from_pca(mean, comps)
                plan = dataclasses.replace(plan, channels=components, head=head)
            y, x = grid.out_shape
            run_store.create(
                provenance=provenance,
                shape=(out_channels, y, x),
                chunks=(min(out_channels, 64), grid.chunk_cells, grid.chunk_cells),
                dtype=dtype,
                blocks=n_blocks,
                halo_shapes=plan.halo_shapes(),
                saved=None if token_bias is None else {"token_bias": np.stack(token_bias)},
            )
            done = run_store.done_blocks() if run_store.resumed else np.zeros(n_blocks, bool)
            if run_store.resumed:
                log.info(
                    "resuming %s: %d of %d blocks already done", store, int(done.sum()), done.size
                )
            n_windows = run.blocks(plan, done, token_bias, megapixels=h * w / 1e6)
    log.info("%d windows in %.1f s", n_windows, time.perf_counter() - t0)
    run_store.finish()
    return open_features(store)


# Windows and cells that the PCA of ``components`` is fitted on.
_PCA_WINDOWS = 8
_PCA_PIXELS = 50_000
# Windows per positional-artefact task.
_BIAS_GROUP = 4


class _Run:
    """The work of one extraction on a connected cluster: estimates, then the block graph."""

    def __init__(self, client, plan: BlockPlan, source, recipe, resources, progress) -> None:
        self.client = client
        self.plan = plan  # of the backbone's features: the estimates come before any head
        self.resources = resources
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:12]
        self.source = shipped(source, "source", self.run_id)
        self.backbone = shipped(recipe, "backbone", self.run_id)

    def position_bias(self, n_windows: int, *, saved: np.ndarray | None) -> list | None:
        """The positional artefact per transform over ``n_windows`` windows (0: none)."""
        if not n_windows:
            return None
        if saved is not None:
            return list(saved)
        log.info("estimating the positional artefact over %d windows", n_windows)
        picked = pick_windows(self.plan, n_windows)
        groups = [picked[k : k + _BIAS_GROUP] for k in range(0, len(picked), _BIAS_GROUP)]
        task = dask.delayed(bias_sums, pure=False)
        parts = self.gather(
            [task(g, plan=self.plan, source=self.source, backbone=self.backbone) for g in groups],
            [len(g) for g in groups],
            desc="debias",
        )
        # summed in a fixed order: the same estimate whatever the number of workers
        return [sum(p[v] for p in parts) / len(picked) for v in range(len(parts[0]))]

    def projection(
        self, components: int, token_bias: list | None, *, saved: dict
    ) -> tuple[np.ndarray, np.ndarray]:
        """PCA ``(mean, components)`` fitted on features of a few windows, on the workers."""
        if "projection_components" in saved:
            return (
                np.asarray(saved["projection_mean"], np.float32),
                np.asarray(saved["projection_components"], np.float32),
            )
        log.info("fitting a %d-component PCA on sample windows", components)
        picked = pick_windows(self.plan, _PCA_WINDOWS)
        bias = shipped(token_bias, "bias", self.run_id)
        task = dask.delayed(feature_sample, pure=False)
        per_window = -(-_PCA_PIXELS // len(picked))
        parts = self.gather(
            [
                task(
                    w,
                    plan=self.plan,
                    source=self.source,
                    backbone=self.backbone,
                    token_bias=bias,
                    n_pixels=per_window,
                )
                for w in picked
            ],
            [1] * len(picked),
            desc="PCA sample",
        )
        mean, comps, _, _ = pca_basis(np.concatenate(parts), components)
        return mean.astype(np.float32), comps.astype(np.float32)

    def blocks(
        self, plan: BlockPlan, done: np.ndarray, token_bias: list | None, *, megapixels: float
    ) -> int:
        """Compute and write every block of ``plan`` not ``done``; the windows computed."""
        tasks = build_tasks(
            plan,
            source=self.source,
            backbone=self.backbone,
            done=done,
            run_id=self.run_id,
            token_bias=token_bias,
        )
        todo = [k for k in tasks if not done[k]]
        weights = [block_windows_count(plan, *k) for k in todo]
        count = dask.delayed(_count, pure=False)
        counts = [count(tasks[k], n) for k, n in zip(todo, weights, strict=True)]
        # A task whose worker dies is rerun elsewhere (it rewrites identical chunks); lost
        # results that later blocks need are recomputed from the graph.
        self.gather(counts, weights, desc="windows", megapixels=megapixels)
        return sum(weights)

    def gather(
        self, tasks: list, weights: list[int], *, desc: str, megapixels: float | None = None
    ) -> list:
        """Results of delayed ``tasks`` (in order), with a progress bar of ``weights`` windows."""
        from distributed import KilledWorker, as_completed
        from tqdm.auto import tqdm

        futures = self.client.compute(tasks, optimize_graph=False, resources=self.resources)
        index = {f.key: k for k, f in enumerate(futures)}
        results: list = [None] * len(futures)
        total = sum(weights)
        t0 = time.perf_counter()
        bar = tqdm(total=total, unit="win", disable=not self.progress, desc=desc)
        try:
            for fut in as_completed(futures):
                k = index[fut.key]
                results[k] = fut.result()
                bar.update(weights[k])
                if megapixels is not None:
                    rate = megapixels * bar.n / max(total, 1) / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{rate:.2f} MP/s")
        except KilledWorker as err:
            # A dead worker's tasks are rerun elsewhere; a task that keeps killing workers is not.
            raise ClusterError(
                f"{' '.join(str(err).split())} If the workers ran out of memory, lower "
                "--batch-size or --tile, or give them more; rerun the same command to resume."
            ) from err
        finally:
            bar.close()
            for fut in futures:
                fut.cancel()
        return results


def _count(_halo, n: int) -> int:
    return n
