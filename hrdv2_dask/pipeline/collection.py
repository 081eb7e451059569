"""``extract_collection``: many images (a stack, a folder, a list) in one run and one graph.

One cluster, one model per worker, and the tasks of every member submitted together to one
:meth:`~hrdv2_dask.pipeline.execute.Run.gather`; small images are computed several to a task
(:mod:`~hrdv2_dask.pipeline.packs`), larger ones by their own block graphs. Each
member is planned as :func:`~hrdv2_dask.extract` plans one image and written to its own
complete feature store inside the collection (:mod:`hrdv2_dask.io.collection`). A member that
cannot be read, planned or computed is recorded ``failed`` with its one-line error; the others
complete. Rerunning completes what is missing; ``retry_failed`` computes failed members again.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np

from ..config import ClusterSettings, CollectionSettings, FeatureSettings
from ..errors import ConfigError, Hrdv2Error, InputError, StoreError
from ..io.collection import CollectionStore, open_collection
from ..io.lock import WriterLock
from ..io.readers import checked_image, open_image
from ..io.store import RunStore
from ..preprocess import fixed_intensity_range, intensity_range, sample_chunk_ids
from ..transforms import TransformSet
from .cluster import cluster_client, task_resources
from .execute import Run
from .extraction import _plan, deployment, load_recipe, prepare_blocks, split_options
from .faults import error_line, is_store_fault, run_faults
from .graph import SourceReader
from .members import Member, list_members
from .packs import PACK_WINDOWS, Pack, PackedMember, member_windows, run_pack
from .plan import RunPlan, check_settings, transform_set
from .workers import backbone_on_workers, progress_topic

__all__ = ["extract_collection", "shared_value_range"]

log = logging.getLogger(__name__)

# Seconds between two writes of the members table while members finish.
_SAVE_EVERY_S = 2.0
_RESUME = "rerun the same command to resume (members done are kept; the others are computed)"


def shared_value_range(datas: list, *, seed: int = 0, max_chunks: int = 64) -> tuple[float, float]:
    """One intensity mapping for all ``datas`` (lazy ``(y, x, c)`` images of one dtype).

    The dtype range for uint8/bool; otherwise the policy's percentiles
    (:func:`~hrdv2_dask.preprocess.intensity_range`) of up to ``max_chunks`` chunks drawn with
    ``seed`` from the chunks :func:`~hrdv2_dask.preprocess.sample_chunk_ids` picks in each.
    """
    dtypes = sorted({str(d.dtype) for d in datas})
    if len(dtypes) > 1:
        raise InputError(
            f"intensity='shared' needs members of one dtype, got {', '.join(dtypes)}; use "
            "intensity='per-image' or give value_range=(low, high)."
        )
    fixed = fixed_intensity_range(datas[0].dtype)
    if fixed is not None:
        return fixed
    pairs = [
        (m, j, i)
        for m, d in enumerate(datas)
        for j, i in sample_chunk_ids(d.numblocks[:2], seed=seed, max_chunks=max_chunks)
    ]
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(pairs), min(max_chunks, len(pairs)), replace=False))
    blocks = dask.compute(*[datas[pairs[k][0]].blocks[pairs[k][1:]] for k in picked])
    ch = min(3, *(d.shape[-1] for d in datas))
    sample = np.concatenate([np.asarray(b).reshape(-1, b.shape[-1])[:, :ch] for b in blocks])
    return intensity_range(sample, dtype=datas[0].dtype)


@dataclass
class _Job:
    """One member to compute in this run."""

    member: Member
    data: Any
    meta: Any
    plan: RunPlan
    store: RunStore
    weights: tuple = ()  # windows of each of its tasks (of its pack, for a packed member)
    error: str | None = None
    topic: str | None = None  # where its block tasks report their windows
    packed: PackedMember | None = None  # computed inside a pack


def _root_settings(features: FeatureSettings, facts, tset, intensity: str) -> dict[str, Any]:
    """What every member shares: the collection's settings, stored once at the root."""
    picked = {} if features.channels is None else {"channels": list(features.channels)}
    return {
        **picked,
        "model": facts.name,
        "weights": "random" if facts.random_weights else str(features.weights or "default"),
        "random_weights": facts.random_weights,
        "patch_size": facts.patch_size,
        "stride": facts.stride,
        "transforms": tset.describe(),
        "tile": features.tile,
        "overlap": features.overlap,
        "out_stride": features.out_stride,
        "dtype": features.dtype,
        "components": features.components,
        "debias": features.debias,
        "block": features.block,
        "value_range": None if features.value_range is None else list(features.value_range),
        "intensity": intensity,
    }


def _split(options: dict[str, Any]) -> tuple[FeatureSettings, ClusterSettings, CollectionSettings]:
    names = CollectionSettings.api_names()
    collection = CollectionSettings(**{names[k]: v for k, v in options.items() if k in names})
    features, cluster = split_options({k: v for k, v in options.items() if k not in names})
    if features.plane is not None:
        raise ConfigError(
            f"plane={features.plane} picks one plane for extract(); extract_collection takes "
            "every plane of a stack. Drop plane, or call extract(..., plane=K)."
        )
    return features, cluster, collection


def extract_collection(
    sources,
    store: str | os.PathLike,
    *,
    transforms=None,
    client=None,
    progress: bool = True,
    **options,
):
    """Compute the features of every image of ``sources`` into one collection store.

    Parameters
    ----------
    sources : path, array or list
        A list of paths or arrays, a folder, a glob pattern, a ``.txt`` (one path a line) or
        ``.csv`` list (columns ``path`` and optionally ``key``, ``level``, ``mask``), or a
        stack file whose Z or T axis is longer than 1 (each plane a member ``z000``...).
    store : path
        Output Zarr group: one feature store per member plus the members table.
    transforms, client, progress
        As for :func:`hrdv2_dask.extract`.
    **options
        Every option of :func:`hrdv2_dask.extract`, plus ``intensity`` (``"per-image"`` or
        ``"shared"``; default shared for the planes of one stack, per-image otherwise) and
        ``retry_failed``.

    Returns
    -------
    xarray.DataTree
        The store opened with :func:`hrdv2_dask.open_collection`.
    """
    features, cluster, coll = _split(options)
    embedded, device = deployment(features, cluster, client)
    members = list_members(sources, axes=features.axes, level=features.level)
    intensity = coll.intensity or ("shared" if members.stack else "per-image")
    recipe, facts, precision = load_recipe(
        features, cluster, device, embedded=embedded, store=store
    )
    probe = _plan_probe(features, facts, transforms)
    # settings that no member can use fail here, once, before anything is written (a store
    # written with them would refuse the rerun with fixed settings as "other settings")
    check_settings(features, facts, probe)
    # As for one image: one writer at a time, --overwrite never deletes a store a live run
    # holds, and a fault of the store (no space, read-only...) ends the run in one line.
    with (
        WriterLock(store, stale_after_s=features.stale_lock_hours * 3600),
        run_faults(store, what="collection store", then=_RESUME),
    ):
        cstore = CollectionStore(
            store,
            settings=_root_settings(features, facts, probe, intensity),
            overwrite=features.overwrite,
        )
        cstore.create()
        jobs = _jobs(
            members, cstore, features, facts, transforms, intensity, coll.retry_failed, precision
        )
        if jobs:
            with cluster_client(
                client,
                scheduler=cluster.scheduler,
                cluster=cluster.kind,
                workers=cluster.workers,
                device=device,
                slurm=cluster.slurm,
            ) as c:
                _execute(c, jobs, cstore, recipe, device, progress)
        cstore.consolidate()  # plain xarray opens it now
    rows = cstore.rows.values()
    failed = [r["key"] for r in rows if r.get("status") == "failed"]
    log.info(
        "%d members done, %d failed%s",
        sum(r.get("status") == "done" for r in rows),
        len(failed),
        f" ({', '.join(failed)})" if failed else "",
    )
    return open_collection(store)


def _plan_probe(features, facts, transforms):
    if transforms is None:
        return transform_set(features, facts.patch_size)
    return transforms if isinstance(transforms, TransformSet) else TransformSet(transforms)


def _row(member: Member, meta=None, **extra) -> dict[str, Any]:
    row = {"source": member.label, **extra}
    if meta is not None:
        row.update(shape=list(meta.shape), pixel_size=meta.pixel_size)
    return row


def _jobs(members, cstore, features, facts, transforms, intensity, retry, precision) -> list[_Job]:
    """Open and plan the members still to compute; record the others' rows.

    The table is saved once, at the end, not once a member (a rerun plans again whatever an
    interruption before that left unrecorded).
    """
    try:
        return _plan_jobs(members, cstore, features, facts, transforms, intensity, retry, precision)
    finally:
        cstore.save()


def _plan_jobs(members, cstore, features, facts, transforms, intensity, retry, precision):
    opened = []
    for m in members.members:
        row = cstore.rows.get(m.key) or {}
        if row.get("status") == "done" and (cstore.member_path(m.key) / "zarr.json").exists():
            continue
        if row.get("status") == "failed" and not retry:
            continue
        if m.error is not None:
            cstore.record(m.key, save=False, **_row(m, status="failed", error=m.error))
            continue
        level = features.level if m.level is None else m.level
        try:
            data, meta = open_image(
                m.source, features.axes, level=level, plane=m.plane, channels=features.channels
            )
        except Hrdv2Error as err:
            cstore.record(m.key, save=False, **_row(m, status="failed", error=error_line(err)))
            continue
        opened.append((m, data, meta, bool(row.get("status") == "failed")))
    value_range = features.value_range
    if intensity == "shared" and value_range is None and opened:
        value_range = shared_value_range(
            [checked_image(o[1], name=repr(str(o[0].label))) for o in opened]
        )
        log.info("shared intensity mapping over %d members: %s", len(opened), value_range)
    jobs = []
    for m, data, meta, was_failed in opened:
        f = features.replace(
            mask=m.mask if m.mask is not None else features.mask,
            value_range=value_range,
            overwrite=False,
        )
        path = cstore.member_path(m.key)
        try:
            plan = _plan(f, facts, transforms, data, meta, path, precision)
            if intensity == "shared" and features.value_range is None:
                plan.provenance["intensity"] = f"shared over {len(opened)} members (seed 0)"
            try:
                run_store = RunStore(path, settings=plan.settings)
            except StoreError:
                if not was_failed:
                    raise
                run_store = RunStore(path, settings=plan.settings, overwrite=True)
        except Hrdv2Error as err:
            cstore.record(
                m.key, save=False, **_row(m, meta, status="failed", error=error_line(err))
            )
            continue
        if run_store.complete:  # finished just before an interruption could record it
            cstore.record(m.key, save=False, **_row(m, meta, status="done", error=None))
            continue
        cstore.record(m.key, save=False, **_row(m, meta, status="pending", error=None))
        jobs.append(_Job(m, data, meta, plan, run_store))
    return jobs


def _execute(client, jobs: list[_Job], cstore, recipe, device, progress) -> None:
    """Estimates and store per member, then the block tasks of all members in one gather.

    Each member's tasks are submitted as soon as its store exists (a pack's once its last
    member's does), so the workers compute the first members while the next ones are
    prepared here (many small members would otherwise leave them idle for as long as creating
    all the stores takes).
    """
    resources = task_resources(client, device)
    tasks = _Tasks()
    try:
        _prepare_all(client, jobs, cstore, recipe, resources, progress, tasks)
    except BaseException:
        client.cancel(tasks.futures)  # those submitted
        raise


@dataclass
class _Tasks:
    """The futures submitted for the members: whose each is (job indices), and its windows.

    A future of a pack (:func:`~hrdv2_dask.pipeline.packs.run_pack`) belongs to every member
    it holds and gives one error line or ``None`` per member.
    """

    futures: list = field(default_factory=list)
    owners: list[tuple[int, ...]] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    packed: list[bool] = field(default_factory=list)

    def add(self, futures, owners, weights, packed: bool) -> None:
        self.futures += futures
        self.owners += owners
        self.weights += weights
        self.packed += [packed] * len(futures)


def _pack_target(client, jobs: list[_Job]) -> int:
    """Windows per pack: those of a big image's block task, fewer where the small members'
    windows would otherwise make fewer than two packs per worker thread."""
    small = sum(w for w in (member_windows(j.plan.blocks) for j in jobs) if w <= PACK_WINDOWS)
    threads = max(1, sum(client.nthreads().values()))
    return max(1, min(PACK_WINDOWS, small // (2 * threads)))


def _prepare_all(client, jobs: list[_Job], cstore, recipe, resources, progress, tasks) -> None:
    backbone = None
    target = _pack_target(client, jobs)
    pending: list[int] = []  # small members prepared, waiting for their pack to fill

    def flush() -> None:
        pack = Pack([jobs[n].packed for n in pending])
        windows = [int(sum(jobs[n].weights)) for n in pending]
        packed = dask.delayed(run_pack, pure=False)
        task = packed(pack, backbone=backbone, dask_key_name=f"hrdv2-pack-{uuid.uuid4().hex[:12]}")
        tasks.add(client.compute([task], **compute_kw), [tuple(pending)], [sum(windows)], True)
        log.debug(
            "packed %s (%d windows)", ", ".join(jobs[n].member.key for n in pending), sum(windows)
        )
        pending.clear()

    compute_kw = dict(optimize_graph=False, resources=resources)
    with backbone_on_workers(client, recipe, resources=resources):
        for n, job in enumerate(jobs):
            try:
                run = Run(
                    client,
                    job.plan.blocks,
                    SourceReader(job.data, name=repr(str(job.member.label))),
                    recipe if backbone is None else backbone,
                    resources,
                    progress,
                )
                backbone = run.backbone  # shipped once, shared by every member's tasks
                job.topic = progress_topic(run.run_id)
                plan, done, bias = prepare_blocks(run, job.plan, job.store)
                job.plan = plan
                if member_windows(plan.blocks) <= PACK_WINDOWS:
                    left = member_windows(plan.blocks, done)
                    if not left:
                        continue  # every block done: it is finished with the others
                    job.packed = PackedMember(
                        plan.blocks, run.raw_source, done, bias, topic=job.topic
                    )
                    job.weights = (left,)
                    pending.append(n)
                    if sum(sum(jobs[k].weights) for k in pending) >= target:
                        flush()
                    continue
                counts, weights = run.block_tasks(plan.blocks, done, bias)
                futures = run.submit(counts)
                job.weights = tuple(weights)
                tasks.add(futures, [(n,)] * len(futures), list(weights), False)
            except Exception as err:  # noqa: BLE001 - one member's failure is recorded
                if is_store_fault(err):
                    raise  # the store's, not the member's: it ends the run
                job.error = error_line(err)
                cstore.record(job.member.key, status="failed", error=job.error)
        if pending:
            flush()
        if backbone is not None:  # any member's Run gathers them all
            _gather_all(run, jobs, cstore, tasks)


def _gather_all(gatherer, jobs: list[_Job], cstore, tasks: _Tasks) -> None:
    left = [0] * len(jobs)
    for owners in tasks.owners:
        for n in owners:
            left[n] += 1
    t0 = time.perf_counter()
    saved = [t0]  # when the table was last written

    def finished(n: int) -> None:
        job = jobs[n]
        job.store.finish()
        now = time.perf_counter()
        # A finished member's row is saved with the next one at most every _SAVE_EVERY_S: a
        # rerun after an interruption finds its store complete and records it done then.
        cstore.record(
            job.member.key,
            save=now - saved[0] >= _SAVE_EVERY_S,
            status="done",
            error=None,
            windows=int(sum(job.weights)),
            seconds=round(now - t0, 3),
        )
        if now - saved[0] >= _SAVE_EVERY_S:
            saved[0] = now

    def failed(n: int, error: str) -> None:
        if jobs[n].error is None:
            jobs[n].error = error
            cstore.record(jobs[n].member.key, status="failed", error=error)

    def on_done(k: int, result: Any) -> None:
        owners = tasks.owners[k]
        if isinstance(result, BaseException):
            if is_store_fault(result):
                raise result  # no space, read-only...: every member would fail the same way
            for n in owners:
                left[n] -= 1
                failed(n, error_line(result))
            return
        errors = result if tasks.packed[k] else [None]
        for n, error in zip(owners, errors, strict=True):
            left[n] -= 1
            if error is not None:
                failed(n, error)
            elif left[n] == 0 and jobs[n].error is None:
                finished(n)

    live = [j for j in jobs if j.error is None]
    try:
        for n, job in enumerate(jobs):
            if job.error is None and left[n] == 0:
                finished(n)  # nothing left to compute: all its blocks were done
        if tasks.futures:
            gatherer.gather(
                tasks.futures,
                tasks.weights,
                desc="windows",
                megapixels=sum(j.plan.megapixels for j in live),
                keep_errors=True,
                on_done=on_done,
                topics=[j.topic for j in live],  # one bar over the windows of every member
                status=lambda: _members_status(cstore.rows.values()),
            )
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to report
            cstore.save()
        raise
    cstore.save()


def _members_status(rows) -> str:
    """The bar's text of a collection: members done (of all) and failed.

    >>> _members_status([{"status": "done"}, {"status": "failed"}, {"status": "pending"}])
    'members: 1/3 done, 1 failed'
    """
    rows = list(rows)
    done = sum(r.get("status") == "done" for r in rows)
    failed = sum(r.get("status") == "failed" for r in rows)
    return f"members: {done}/{len(rows)} done, {failed} failed"


def _signature() -> inspect.Signature:
    from .extraction import extract

    params = [
        inspect.Parameter("sources", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *list(inspect.signature(extract).parameters.values())[1:],
    ]
    defaults = CollectionSettings.defaults()
    for api, name in CollectionSettings.api_names().items():
        params.append(
            inspect.Parameter(api, inspect.Parameter.KEYWORD_ONLY, default=defaults[name])
        )
    return inspect.Signature(params, return_annotation="xarray.DataTree")


extract_collection.__signature__ = _signature()  # type: ignore[attr-defined]
