"""Warm Dask workers: torch and the backbone are loaded before the first block task.

Two mechanisms, both optional for correctness (the per-worker cache in
:func:`hrdv2_dask.graph.worker_backbone` builds the model on first use anyway):

- ``dask worker SCHEDULER --preload hrdv2_dask.preload`` runs :func:`dask_setup` when a worker
  starts: it imports torch and timm, gives a CPU worker's torch the process's cores, and logs
  the device the worker will use.
- :class:`BackbonePlugin`, registered by :func:`hrdv2_dask.extract` for each run, builds the
  run's backbone on every worker, including workers that join or replace dead ones mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .graph import BackboneRecipe, worker_backbone

__all__ = ["BackbonePlugin", "backbone_on_workers", "dask_setup"]

log = logging.getLogger(__name__)


def _has_resources(worker, resources: Mapping[str, float] | None) -> bool:
    have = worker.state.total_resources
    return all(have.get(name, 0) >= amount for name, amount in (resources or {}).items())


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def dask_setup(worker) -> None:
    """Dask preload hook: import torch and timm now, give a CPU worker's torch its cores, and log
    the worker's device."""
    import timm
    import torch

    from .cluster import resolve_device

    device = resolve_device("auto")
    if device == "cpu" and not os.environ.get("HRDV2_THREADS"):
        # Dask's nanny started this process with OMP_NUM_THREADS=1, which would leave torch on
        # one core; a worker runs one block task at a time, so its torch gets every core this
        # process may use (its affinity: the container's or the SLURM job's CPUs). One CPU
        # worker per machine, or set HRDV2_THREADS.
        os.environ["HRDV2_THREADS"] = str(_usable_cores())
    gpu = f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""
    log.info(
        "hrdv2 worker %s: torch %s, timm %s, device %s%s, torch threads %s",
        worker.name,
        torch.__version__,
        timm.__version__,
        device,
        gpu,
        os.environ.get("HRDV2_THREADS", "torch's default"),
    )
    if device == "cpu" and _has_resources(worker, {"GPU": 1}):
        log.warning(
            "worker %s advertises a GPU resource but torch sees no CUDA device; with --device auto "
            "its tasks run on the CPU. Check the CUDA build of torch and the visible GPUs.",
            worker.name,
        )


class BackbonePlugin(WorkerPlugin):
    """Build a run's backbone once on each worker that can run its tasks.

    Parameters
    ----------
    recipe : BackboneRecipe
        The recipe the block tasks carry (same cache key, so the tasks find the model).
    resources : mapping, optional
        Resources the tasks ask for; workers without them build nothing.
    """

    name = "hrdv2-backbone"

    def __init__(
        self, recipe: BackboneRecipe, *, resources: Mapping[str, float] | None = None
    ) -> None:
        self.recipe = recipe
        self.resources = dict(resources or {})

    async def setup(self, worker: Any) -> None:
        if not _has_resources(worker, self.resources):
            return
        # In a thread: the worker keeps answering the scheduler while a large model loads.
        await asyncio.to_thread(worker_backbone, self.recipe)


@contextlib.contextmanager
def backbone_on_workers(
    client, recipe: Any, *, resources: Mapping[str, float] | None = None
) -> Iterator[None]:
    """Keep a :class:`BackbonePlugin` registered for the duration of one run.

    Backbone objects shipped as they are (not a :class:`BackboneRecipe`) need no plugin.
    """
    if not isinstance(recipe, BackboneRecipe):
        yield
        return
    client.register_plugin(BackbonePlugin(recipe, resources=resources))
    try:
        yield
    finally:
        try:
            client.unregister_worker_plugin(BackbonePlugin.name)
        except Exception as err:  # noqa: BLE001 - never hide the run's own error
            log.debug("could not unregister %s: %s", BackbonePlugin.name, err)
