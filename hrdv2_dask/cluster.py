"""Where the graph runs: an embedded LocalCluster, an existing scheduler, or a given client."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from .errors import ConfigError, Hrdv2Error

__all__ = ["ClusterError", "cluster_client", "resolve_device"]

log = logging.getLogger(__name__)


class ClusterError(Hrdv2Error, ConnectionError):
    """The Dask scheduler cannot be reached or used."""


def resolve_device(device: str) -> str:
    """``"auto"`` → ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA GPU is visible; use --device cpu.")
    return device


def local_workers(device: str, workers: int | None) -> int:
    """Default worker count: one worker (on the GPU, or using all CPU cores)."""
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers!r}.")
        return workers
    # One worker either way: a plain LocalCluster does not pin workers to different GPUs
    # (several GPUs need dask-cuda's LocalCUDACluster, one worker per GPU).
    return 1


@contextlib.contextmanager
def cluster_client(
    client=None, *, scheduler: str | None = None, workers: int | None = None, device: str = "cpu"
) -> Iterator:
    """Yield a ``distributed.Client``; embedded clusters are started and closed here.

    Parameters
    ----------
    client : distributed.Client, optional
        Used as is (not closed).
    scheduler : str, optional
        Address of an existing scheduler (``tcp://host:8786``).
    workers : int, optional
        Worker processes of the embedded cluster (default: one).
    device : str
        ``"cpu"`` or ``"cuda"``; GPU workers advertise a ``GPU`` resource.
    """
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if scheduler is not None:
        try:
            c = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as err:
            raise ClusterError(
                f"Cannot reach the Dask scheduler at {scheduler!r}: {err}. Check the address and "
                "that `dask scheduler` is running, or omit --scheduler to run locally."
            ) from err
        try:
            yield c
        finally:
            c.close()
        return
    n = local_workers(device, workers)
    cores = os.cpu_count() or 1
    kwargs = dict(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    if device.startswith("cuda"):
        kwargs["resources"] = {"GPU": 1}
    log.info("starting a local Dask cluster: %d worker(s), %d core(s)", n, cores)
    with LocalCluster(**kwargs) as cluster, Client(cluster) as c:
        yield c
