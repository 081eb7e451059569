"""Running a planned extraction on a connected cluster: the estimates, then the block graph.

:class:`Run` submits the tasks of :mod:`hrdv2_dask.pipeline.graph` and gathers their results
with a progress bar; the estimates (positional artefact, PCA) are summed in a fixed order, so a
store is bit-identical whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import dask
import numpy as np

from ..errors import ClusterError
from ..heads import pca_basis
from .graph import (
    BlockPlan,
    bias_sums,
    block_windows_count,
    build_tasks,
    feature_sample,
    pick_windows,
    shipped,
)
from .progress import Progress
from .workers import progress_topic

__all__ = ["Run"]

log = logging.getLogger(__name__)

# Windows and cells that the PCA of ``components`` is fitted on.
_PCA_WINDOWS = 8
_PCA_PIXELS = 50_000
# Windows per positional-artefact task.
_BIAS_GROUP = 4


class Run:
    """The work of one extraction on a connected cluster: estimates, then the block graph."""

    def __init__(self, client, plan: BlockPlan, source, recipe, resources, progress) -> None:
        self.client = client
        self.plan = plan  # of the backbone's features: the estimates come before any head
        self.resources = resources
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:12]
        self.raw_source = source
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
        counts, weights = self.block_tasks(plan, done, token_bias)
        # A task whose worker dies is rerun elsewhere (it rewrites identical chunks); lost
        # results that later blocks need are recomputed from the graph.
        self.gather(counts, weights, desc="windows", megapixels=megapixels)
        return sum(weights)

    def block_tasks(
        self, plan: BlockPlan, done: np.ndarray, token_bias: list | None
    ) -> tuple[list, list[int]]:
        """Delayed tasks that compute the blocks of ``plan`` not ``done``, and their windows.

        The tasks of several runs (the members of a collection) can go to one :meth:`gather`.
        """
        one_task = int(np.prod(plan.n_blocks)) - int(done.sum()) == 1
        tasks = build_tasks(
            plan,
            # a source that one task reads travels inside it, not as a Dask key of its own
            # (a collection of small images: one task fewer a member)
            source=self.raw_source if one_task else self.source,
            ship_source=not one_task,
            backbone=self.backbone,
            done=done,
            run_id=self.run_id,
            token_bias=token_bias,
        )
        todo = [k for k in tasks if not done[k]]
        weights = [block_windows_count(plan, *k) for k in todo]
        count = dask.delayed(_count, pure=False)
        # a task's strips stay on the workers; the bottom-right block passes none on, so it
        # needs no counting task (one task fewer a member for a collection of small images)
        last = (plan.n_blocks[0] - 1, plan.n_blocks[1] - 1)
        counts = [
            tasks[k] if k == last else count(tasks[k], n)
            for k, n in zip(todo, weights, strict=True)
        ]
        return counts, weights

    def submit(self, tasks: list) -> list:
        """Start computing delayed ``tasks``; their futures, which :meth:`gather` also takes."""
        return self.client.compute(tasks, optimize_graph=False, resources=self.resources)

    def gather(
        self,
        tasks: list,
        weights: list[int],
        *,
        desc: str,
        megapixels: float | None = None,
        keep_errors: bool = False,
        on_done: Callable[[int, Any], None] | None = None,
        topics: list[str] | None = None,
        status: Callable[[], str] | None = None,
    ) -> list:
        """Results of delayed ``tasks`` or their futures (:meth:`submit`), in order, with a
        progress bar of ``weights`` windows.

        With ``keep_errors`` a failed task's exception is its result instead of being raised
        (the other tasks go on); ``on_done(k, result)`` is called as each task ends. The bar
        listens to ``topics`` (default: this run's, for block tasks) and shows ``status()``.
        """
        from distributed import Future, KilledWorker, as_completed

        if tasks and all(isinstance(t, Future) for t in tasks):
            futures = list(tasks)
        else:
            futures = self.submit(tasks)
        index = {f.key: k for k, f in enumerate(futures)}
        results: list = [None] * len(futures)
        # block tasks report their windows as they go; the others count when they finish
        if topics is None:
            topics = [progress_topic(self.run_id)] if desc == "windows" else []
        bar = Progress(
            self.client,
            topics,
            total=sum(weights),
            desc=desc,
            megapixels=megapixels,
            enabled=self.progress,
            status=status,
        )
        finished = False
        try:
            for fut in as_completed(futures):
                k = index[fut.key]
                failed = keep_errors and fut.status == "error"
                results[k] = fut.exception() if failed else fut.result()
                if on_done is not None:
                    on_done(k, results[k])
                bar.task_done(weights[k])
            finished = True
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
            if not finished:
                _settle(self.client)
        return results


def _settle(client, timeout_s: float = 30.0) -> None:
    """Wait (up to ``timeout_s``) until no worker runs a task of ours any more.

    After a fault the other block tasks are cancelled, but a task already running finishes its
    window and writes; closing the cluster under it prints its aborted writes' noise above the
    error line, and a rerun started at once could meet its half-written chunk.
    """
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(Exception):  # the cluster itself may be what failed
        while time.monotonic() < deadline and any(client.run(_executing).values()):
            time.sleep(0.1)


def _executing(dask_worker) -> int:
    return dask_worker.state.executing_count  # cancelled tasks still running included


def _count(_halo, n: int) -> int:
    return n
