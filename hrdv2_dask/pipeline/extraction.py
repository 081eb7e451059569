"""``extract``: high-resolution features of an image of any size into a Zarr store.

It reads as plan → store → execute: the options are checked once against the schema
(:mod:`hrdv2_dask.config`), the run is planned without a cluster (:mod:`.plan`), the store is
checked (and resumed), and only then does the cluster start (:mod:`.execute`).
"""

from __future__ import annotations

import inspect
import logging
import os
import time
import warnings
from typing import Any

import numpy as np

from ..backbones import RandomWeightsWarning
from ..config import ClusterSettings, FeatureSettings, SlurmSettings, unknown_key
from ..device import check_device, cpu_count, resolve_device
from ..heads import LinearHead
from ..io.lock import WriterLock
from ..io.readers import open_image
from ..io.readers.channels import check_channel_count
from ..io.store import RunStore, open_features, publish_metadata
from ..precision import recorded_precision
from ..transforms import Transform, TransformSet
from .cluster import check_deployment, cluster_client, task_resources
from .execute import Run
from .faults import run_faults
from .graph import SourceReader
from .inputs import backbone_recipe, describe_intensities, estimate_value_range, resolve_mask
from .plan import RunPlan, plan_grid, plan_run, transform_set, with_projection
from .workers import backbone_on_workers

__all__ = ["deployment", "extract", "load_recipe", "prepare_blocks", "split_options"]

log = logging.getLogger(__name__)


def split_options(options: dict[str, Any]) -> tuple[FeatureSettings, ClusterSettings]:
    """The keyword options of :func:`extract` as checked feature and cluster settings.

    Keywords are the Python names of the schema's fields (``backbone`` for ``model``,
    ``cluster`` for ``kind``); an unknown one is an error that suggests the closest.
    """
    feature_names, cluster_names = FeatureSettings.api_names(), ClusterSettings.api_names()
    known = sorted({*feature_names, *cluster_names})
    for key in options:
        if key not in known:
            raise unknown_key(key, known, "", what="option")
    slurm = options.get("slurm")
    if isinstance(slurm, dict):
        options = {**options, "slurm": SlurmSettings.from_dict(slurm)}
    features = FeatureSettings(
        **{feature_names[k]: v for k, v in options.items() if k in feature_names}
    )
    cluster = ClusterSettings(
        **{cluster_names[k]: v for k, v in options.items() if k in cluster_names}
    )
    return features, cluster


def extract(
    source,
    store: str | os.PathLike,
    *,
    transforms: TransformSet | list[Transform] | None = None,
    client=None,
    progress: bool = True,
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
    transforms : TransformSet, optional
        The views, instead of ``shifts``/``neighbourhood``/``boundary``/``flips``.
    client : distributed.Client, optional
        Run on this client; default: the cluster that the cluster options describe (an
        embedded LocalCluster unless told otherwise), started and closed here.
    progress : bool, optional
        Show a progress bar.
    **options
        Every field of :class:`~hrdv2_dask.config.FeatureSettings` and
        :class:`~hrdv2_dask.config.ClusterSettings` by its Python name (listed with their
        defaults and limits below and in ``inspect.signature(extract)``): ``backbone`` (a model
        name, a backbone object, or a zero-argument callable that builds one, called once per
        worker process), ``weights`` (a path, or ``"random"``: outputs are then marked
        ``random_weights=True``), ``mask`` (also a 2-D bool array), ``cluster``,
        ``workers``, ``scheduler``, ``slurm`` (a :class:`~hrdv2_dask.config.SlurmSettings`
        or a dict)...

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
    features, cluster = split_options(options)
    embedded, device = deployment(features, cluster, client)
    data, meta = open_image(
        source,
        features.axes,
        level=features.level,
        plane=features.plane,
        channels=features.channels,
    )
    recipe, facts, precision = load_recipe(
        features, cluster, device, embedded=embedded, store=store
    )
    plan = _plan(features, facts, transforms, data, meta, store, precision)
    # Held until the end, whatever happens: no second writer, and --overwrite never deletes a
    # store that another live run writes.
    with WriterLock(store, stale_after_s=features.stale_lock_hours * 3600):
        # Only checks here: the store is written once the cluster is up and the estimates made.
        run_store = RunStore(store, settings=plan.settings, overwrite=features.overwrite)
        if run_store.complete:
            log.info("%s is already complete with these settings; nothing to do", store)
            publish_metadata(store)  # a store of an older version, or not yet consolidated
            return open_features(store)
        t0 = time.perf_counter()
        source = SourceReader(data, name=repr(str(meta.path)) if meta.path else "the image")
        with (
            run_faults(store),  # every fault from here on: one line, the store resumable
            cluster_client(
                client,
                scheduler=cluster.scheduler,
                cluster=cluster.kind,
                workers=cluster.workers,
                device=device,
                slurm=cluster.slurm,
            ) as c,
        ):
            n_windows = _execute(c, plan, run_store, source, recipe, device, progress)
            log.info("%d windows in %.1f s", n_windows, time.perf_counter() - t0)
            run_store.finish()
    return open_features(store)


def deployment(features: FeatureSettings, cluster: ClusterSettings, client) -> tuple[bool, str]:
    """``(embedded, device)``: the deployment checked and the device named.

    The embedded cluster runs on this machine, so ``"auto"`` is resolved here; elsewhere each
    worker resolves it itself.
    """
    check_deployment(
        scheduler=cluster.scheduler,
        cluster=cluster.kind,
        slurm=cluster.slurm,
        workers=cluster.workers,
    )
    embedded = client is None and cluster.scheduler is None and cluster.kind == "local"
    device = resolve_device(features.device) if embedded else check_device(features.device)
    return embedded, device


def load_recipe(
    features: FeatureSettings, cluster: ClusterSettings, device: str, *, embedded: bool, store
) -> tuple[Any, Any, tuple[str, str | None]]:
    """``(recipe, facts, precision)`` of the backbone the workers will build; random weights
    are announced loudly, naming ``store``."""
    threads = max(1, cpu_count() // (cluster.workers or 1)) if embedded else None
    recipe, facts = backbone_recipe(
        features.model,
        features.weights,
        features.stride,
        device,
        dict(features.model_options or {}),
        threads,
        outputs={"layer": features.layer, "facet": features.facet, "attention": features.attention},
        seed=features.random_seed,
    )
    if facts.random_weights:
        msg = f"*** RANDOM WEIGHTS: the features in {store} are meaningless (testing only) ***"
        log.warning(msg)
        warnings.warn(msg, RandomWeightsWarning, stacklevel=3)
    return recipe, facts, recorded_precision(features.precision, device)


def _plan(features, facts, transforms, data, meta, store, precision) -> RunPlan:
    """Plan the run: transforms, grid, intensities and mask (reads a sample, no cluster)."""
    check_channel_count(meta)  # more than RGBA: which channels is the user's choice
    if transforms is None:
        tset = transform_set(features, facts.patch_size)
    else:
        tset = transforms if isinstance(transforms, TransformSet) else TransformSet(transforms)
    name = repr(str(meta.path)) if meta.path else "the image"
    grid = plan_grid(meta.shape[:2], features, facts, tset, name=str(meta.path or "array"))
    value_range = features.value_range or estimate_value_range(data, name=name)
    compute = resolve_mask(features.mask, data, grid, name=name)
    return plan_run(
        features,
        backbone=facts,
        transforms=tset,
        grid=grid,
        value_range=value_range,
        source=meta.to_dict(),
        store=str(store),
        compute=compute,
        intensity=describe_intensities(data.dtype, features.value_range),
        precision=precision,
    )


def _execute(client, plan: RunPlan, run_store: RunStore, source, recipe, device, progress) -> int:
    """Estimates, store creation and the block graph on a connected cluster; windows computed."""
    resources = task_resources(client, device)
    run = Run(client, plan.blocks, source, recipe, resources, progress)
    with backbone_on_workers(client, recipe, resources=resources):
        plan, done, token_bias = prepare_blocks(run, plan, run_store)
        return run.blocks(plan.blocks, done, token_bias, megapixels=plan.megapixels)


def prepare_blocks(run: Run, plan: RunPlan, run_store: RunStore) -> tuple[RunPlan, Any, Any]:
    """The estimates (on the workers) and the store's creation, before the block graph.

    Returns ``(plan, done, token_bias)``: the plan with its projection head, the blocks already
    written (resume) and the positional artefact.
    """
    provenance = dict(plan.provenance)
    token_bias = run.position_bias(plan.settings["debias"], saved=run_store.saved("token_bias"))
    if plan.components is not None:
        mean, comps = run.projection(plan.components, token_bias, saved=run_store.provenance)
        provenance["projection_mean"] = mean.tolist()
        provenance["projection_components"] = comps.tolist()
        plan = with_projection(plan, LinearHead.from_pca(mean, comps))
    run_store.create(
        provenance=provenance,
        shape=plan.shape,
        chunks=plan.chunks,
        dtype=plan.blocks.dtype,
        blocks=plan.blocks.n_blocks,
        halo_shapes=plan.blocks.halo_shapes(),
        saved=None if token_bias is None else {"token_bias": np.stack(token_bias)},
    )
    n_blocks = plan.blocks.n_blocks
    done = run_store.done_blocks() if run_store.resumed else np.zeros(n_blocks, bool)
    if run_store.resumed:
        log.info(
            "resuming %s: %d of %d blocks already done",
            run_store.path,
            int(done.sum()),
            done.size,
        )
    return plan, done, token_bias


def _signature() -> inspect.Signature:
    """``extract``'s signature with every schema option as a keyword-only parameter."""
    params = list(inspect.signature(extract).parameters.values())[:-1]  # without **options
    seen = {p.name for p in params}
    for cls in (FeatureSettings, ClusterSettings):
        defaults = cls.defaults()
        for api, name in cls.api_names().items():
            if api not in seen:
                params.append(
                    inspect.Parameter(api, inspect.Parameter.KEYWORD_ONLY, default=defaults[name])
                )
                seen.add(api)
    return inspect.Signature(params, return_annotation="xarray.DataArray")


def _options_doc() -> str:
    lines = ["", "    Options", "    -------"]
    for cls in (FeatureSettings, ClusterSettings):
        defaults, specs = cls.defaults(), cls.specs()
        for api, name in cls.api_names().items():
            lines.append(f"    {api} : default {defaults[name]!r}")
            lines.append(f"        {specs[name].help}.")
    return "\n".join(lines) + "\n"


extract.__signature__ = _signature()  # type: ignore[attr-defined]
extract.__doc__ = (extract.__doc__ or "") + _options_doc()
