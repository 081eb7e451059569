"""What runs on a worker process: its backbone (built once), warm-up and the preload hook.

- :class:`BackboneRecipe` says how a worker builds the run's backbone; :func:`worker_backbone`
  builds it once per process and recipe (the only cache in the package).
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
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from ..device import cpu_count, resolve_device

__all__ = [
    "BackbonePlugin",
    "BackboneRecipe",
    "backbone_on_workers",
    "dask_setup",
    "progress_topic",
    "report_progress",
    "seeded",
    "worker_backbone",
]

log = logging.getLogger(__name__)

_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Draw from torch's CPU generator seeded with ``seed`` inside, leave it as it was after.

    Models are built on the CPU (and then moved), so random weights built under the same seed
    are the same on every process and every run; ``None`` changes nothing.
    """
    if seed is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class BackboneRecipe:
    """How a worker builds its backbone: by name (cached per process) or from a factory.

    A named model with ``weights="random"`` is rebuilt on each worker from (name, overrides,
    ``seed``): a few bytes in the graph, the same model everywhere.
    """

    name: str | None = None
    weights: str | None = None
    stride: int | None = None
    device: str = "cpu"
    overrides: tuple[tuple[str, Any], ...] = ()
    seed: int | None = None  # the seed of random weights (weights="random")
    outputs: tuple[tuple[str, Any], ...] = ()  # layer, facet, attention (load_backbone keywords)
    factory: Callable[[], Any] | None = field(default=None, compare=False)
    factory_token: str = ""  # identifies the factory across processes (set by the client)
    # torch intra-op threads in each worker process (None: $HRDV2_THREADS, set by the preload)
    threads: int | None = None

    def key(self) -> tuple:
        return (
            self.name,
            self.weights,
            self.stride,
            self.device,
            self.overrides,
            self.seed,
            self.outputs,
            self.factory_token,
        )

    def build(self) -> Any:
        import warnings

        import torch

        from ..backbones import RandomWeightsWarning, load_backbone

        device = resolve_device(self.device)  # "auto" resolves here, on the worker
        if self.factory is not None:
            bb = self.factory()
        else:
            with warnings.catch_warnings(), seeded(self.seed):
                # The client already warned loudly; workers would repeat it per process.
                warnings.simplefilter("ignore", RandomWeightsWarning)
                bb = load_backbone(
                    self.name,
                    self.weights,
                    self.stride,
                    device,
                    download=False,
                    **dict(self.outputs),
                    **dict(self.overrides),
                )
        if isinstance(bb, torch.nn.Module):
            bb = bb.to(device).eval()
        return bb


def worker_backbone(recipe: BackboneRecipe | Any) -> Any:
    """The backbone for this process, built once per recipe (the only cache in the package)."""
    import torch

    if not isinstance(recipe, BackboneRecipe):
        return recipe  # a backbone object shipped once to each worker
    key = recipe.key()
    with _MODELS_LOCK:
        if key not in _MODELS:
            log.info("building backbone %s on %s", recipe.name or recipe.factory, recipe.device)
            _MODELS[key] = recipe.build()
    threads = recipe.threads or int(os.environ.get("HRDV2_THREADS") or 0)
    if threads:
        # Per calling thread with OpenMP: the model may have been built in another thread.
        torch.set_num_threads(threads)
    return _MODELS[key]


def progress_topic(run_id: str) -> str:
    """The worker-event topic on which the block tasks of run ``run_id`` report windows."""
    return f"hrdv2-progress-{run_id}"


def report_progress(topic: str | None, windows: int) -> None:
    """Tell the client that ``windows`` more windows are computed (a no-op off a worker)."""
    if topic is None:
        return
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return  # run_block called directly, without a cluster
    worker.log_event(topic, windows)


def _has_resources(worker, resources: Mapping[str, float] | None) -> bool:
    have = worker.state.total_resources
    return all(have.get(name, 0) >= amount for name, amount in (resources or {}).items())


def dask_setup(worker) -> None:
    """Dask preload hook: import torch and timm now, give a CPU worker's torch its cores, and log
    the worker's device."""
    import timm
    import torch

    device = resolve_device("auto")
    if device == "cpu" and not os.environ.get("HRDV2_THREADS"):
        # Dask's nanny started this process with OMP_NUM_THREADS=1, which would leave torch on
        # one core; a worker runs one block task at a time, so its torch gets every core this
        # process may use (its affinity: the container's or the SLURM job's CPUs). One CPU
        # worker per machine, or set HRDV2_THREADS.
        os.environ["HRDV2_THREADS"] = str(cpu_count())
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
