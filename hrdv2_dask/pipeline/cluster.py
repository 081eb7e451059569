"""Where the graph runs, and the checks that make a cluster safe to use.

Deployments (:func:`cluster_client`): an embedded ``LocalCluster`` (default), one worker per GPU
of this host (``cluster="cuda"``, dask-cuda), SLURM jobs (``cluster="slurm"``, dask-jobqueue),
an existing scheduler (``scheduler="tcp://host:8786"``) or a given client. Workers that
advertise a ``GPU`` resource get every block task (:func:`task_resources`); the workers of an
existing scheduler must run the same package versions as the client (:func:`check_versions`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

from .._version import __version__
from ..config import CLUSTERS, ClusterSettings, SlurmSettings
from ..device import check_device, cpu_count, resolve_device
from ..errors import ClusterError, ConfigError, MissingExtraError

__all__ = [
    "CLUSTERS",
    "WORKER_ENVIRON",
    "ClusterError",
    "MissingExtraError",
    "check_deployment",
    "check_device",
    "check_versions",
    "cluster_client",
    "package_versions",
    "resolve_device",
    "slurm_cluster_kwargs",
    "task_resources",
    "version_mismatches",
    "worker_environ",
]

log = logging.getLogger(__name__)

#: Packages whose versions must agree between the client and every worker.
VERSIONED = ("hrdv2-dask", "torch", "timm", "dask", "distributed", "zarr", "numpy")
_CONNECT_TIMEOUT = "10s"
#: Environment of the worker processes this package starts. Dask's nannies set
#: ``MALLOC_TRIM_THRESHOLD_``, and glibc then also freezes its mmap threshold at 128 KiB: every
#: larger tensor of a ViT forward is a fresh mmap that page-faults on first use (2.4x the page
#: faults, a backbone up to 1.4x slower; benchmarks/RESULTS.md). 32 MiB, the ceiling of glibc's
#: own adaptive threshold, restores the default placement and keeps Dask's trimming. A value
#: set in the environment wins.
WORKER_ENVIRON = {"MALLOC_MMAP_THRESHOLD_": "33554432"}


def package_versions() -> dict[str, str | None]:
    """Installed versions of :data:`VERSIONED` in this process (``None``: not installed)."""
    from importlib import metadata

    versions: dict[str, str | None] = {"hrdv2-dask": __version__}
    for name in VERSIONED[1:]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _release(version: str | None) -> str | None:
    """The version without its local label: ``2.4.0+cu121`` and ``2.4.0+cpu`` are one release."""
    return None if version is None else version.split("+")[0]


def version_mismatches(
    client_versions: Mapping[str, str | None],
    worker_versions: Mapping[str, Mapping[str, str | None]],
) -> list[str]:
    """One line per package whose version differs between the client and some workers.

    Parameters
    ----------
    client_versions : mapping
        ``package -> version`` of the client (:func:`package_versions`).
    worker_versions : mapping
        ``worker address -> {package -> version}``.

    Examples
    --------
    >>> version_mismatches({"torch": "2.4.0+cpu"}, {"tcp://w:1": {"torch": "2.4.0+cu121"}})
    []
    >>> version_mismatches({"zarr": "3.1.5"}, {"tcp://a:1": {"zarr": "3.0.0"}})
    ['zarr: client 3.1.5, worker tcp://a:1 3.0.0']
    """
    lines = []
    for name, mine in client_versions.items():
        differ = sorted(
            (addr, versions.get(name))
            for addr, versions in worker_versions.items()
            if _release(versions.get(name)) != _release(mine)
        )
        if differ:
            addr, theirs = differ[0]
            more = f" (and {len(differ) - 1} more workers)" if len(differ) > 1 else ""
            lines.append(f"{name}: client {mine}, worker {addr} {theirs}{more}")
    return lines


def check_versions(client, *, scheduler: str) -> None:
    """Raise :class:`ClusterError` unless every worker runs the client's package versions."""
    try:
        worker_versions = client.run(package_versions)
    except Exception as err:  # noqa: BLE001 - whatever the workers fail with, the fix is the same
        raise ClusterError(
            f"The workers of the Dask scheduler at {scheduler!r} cannot run hrdv2_dask "
            f"({type(err).__name__}: {err}). Install hrdv2-dask {__version__} in the workers' "
            "environment (e.g. the same docker image as the client)."
        ) from err
    lines = version_mismatches(package_versions(), worker_versions)
    if lines:
        raise ClusterError(
            f"Package versions differ between this client and the workers of {scheduler!r}: "
            f"{'; '.join(lines)}. Install the same versions on both sides (the same image or "
            "lock file), then restart the workers."
        )


def _workers(client) -> dict[str, dict]:
    """``address -> info`` of every worker the scheduler knows now."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # distributed < 2025: no n_workers, and all workers are listed
        return client.scheduler_info()["workers"]


def task_resources(client, device: str) -> dict[str, int] | None:
    """Resources every block task asks for: ``{"GPU": 1}`` or ``None`` (any worker).

    Tasks are kept on GPU workers when the device is CUDA or when some workers advertise a
    ``GPU`` resource (``dask worker --resources GPU=1``); one task then runs per GPU at a time.
    """
    workers = _workers(client)
    gpu = [a for a, w in workers.items() if (w.get("resources") or {}).get("GPU", 0) >= 1]
    if not gpu and not device.startswith("cuda"):
        return None
    if workers and not gpu:
        raise ClusterError(
            f"device={device!r} but none of the {len(workers)} Dask workers advertises a GPU "
            "resource, so no task could run. Start the workers with `--resources GPU=1` (one "
            "per GPU), or use --device auto or cpu."
        )
    return {"GPU": 1}


def slurm_cluster_kwargs(settings: SlurmSettings) -> dict[str, Any]:
    """``dask_jobqueue.SLURMCluster`` arguments: one job per worker, one task at a time.

    Settings left at ``None`` are not passed, so the site's Dask config (``jobqueue.slurm``)
    applies. ``cores`` books CPU cores per job for torch; the worker itself runs one task
    thread. A job with a GPU advertises it as the ``GPU`` resource.

    >>> from hrdv2_dask.config import SlurmSettings
    >>> kw = slurm_cluster_kwargs(SlurmSettings(queue="gpu", memory="32GB"))
    >>> kw["job_extra_directives"], kw["worker_extra_args"][-2:]
    (['--gres=gpu:1'], ['--resources', 'GPU=1'])
    """
    directives = list(settings.job_extra)
    worker_args = ["--preload", "hrdv2_dask.preload"]
    if settings.gpus_per_job:
        directives.append(f"--gres=gpu:{settings.gpus_per_job}")
        worker_args += ["--resources", f"GPU={settings.gpus_per_job}"]
    optional = {
        "queue": settings.queue,
        "account": settings.account,
        "walltime": settings.walltime,
        "memory": settings.memory,
        "job_cpu": settings.cores,
        "local_directory": settings.local_directory,
        "python": settings.python,
    }
    return {
        "job_name": "hrdv2",
        "cores": 1,  # worker threads: one block task at a time
        "processes": 1,
        "job_extra_directives": directives,
        "job_script_prologue": [f"export {k}={v}" for k, v in worker_environ().items()],
        "worker_extra_args": worker_args,
        **{k: v for k, v in optional.items() if v is not None},
    }


def check_deployment(
    *,
    scheduler: str | None = None,
    cluster: str = "local",
    slurm: Any = None,
    workers: int | None = None,
) -> None:
    """Raise :class:`~hrdv2_dask.errors.ConfigError` for a deployment that contradicts itself
    (the rules of :class:`~hrdv2_dask.config.ClusterSettings`), and
    :class:`~hrdv2_dask.errors.MissingExtraError` when its optional package is missing.

    >>> check_deployment(scheduler="tcp://h:8786", cluster="cuda")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hrdv2_dask.errors.ConfigError: cluster.scheduler ('tcp://h:8786') connects to workers ...
    """
    if isinstance(slurm, dict):
        slurm = SlurmSettings.from_dict(slurm)
    ClusterSettings(kind=cluster, scheduler=scheduler, slurm=slurm, workers=workers)
    if cluster in _EXTRAS:
        _require_extra(cluster)


_EXTRAS = {
    "cuda": ("dask_cuda", "cuda", "one Dask worker per GPU"),
    "slurm": ("dask_jobqueue", "hpc", "SLURM jobs as Dask workers"),
}


def _require_extra(cluster: str) -> None:
    """Raise :class:`MissingExtraError` when the package behind ``cluster`` is missing."""
    import importlib.util

    module, extra, what = _EXTRAS[cluster]
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"cluster={cluster!r} ({what}) needs {module.replace('_', '-')}, which is not "
            f'installed: pip install "hrdv2-dask[{extra}]".'
        )


def worker_environ() -> dict[str, str]:
    """The variables of :data:`WORKER_ENVIRON`, with values already in the environment kept."""
    return {k: os.environ.get(k, v) for k, v in WORKER_ENVIRON.items()}


@contextlib.contextmanager
def _pre_spawn_environ(extra: dict[str, str] | None = None) -> Iterator[None]:
    """Nannies created inside set :func:`worker_environ` (and ``extra``) before spawning their
    worker process (the allocator reads it at process start, too early for
    ``LocalCluster(env=...)``)."""
    import dask
    import distributed  # noqa: F401 - registers the distributed config

    key = "distributed.nanny.pre-spawn-environ"
    with dask.config.set({key: {**dask.config.get(key), **worker_environ(), **(extra or {})}}):
        yield


def _shared_cores_environ() -> dict[str, str]:
    """What workers on this machine's cores need: OpenMP threads that sleep when idle.

    OpenMP threads otherwise spin for a while after each parallel region, on the cores that
    the embedded workers share with this process (the scheduler, the client, the stores it
    finishes); with the many short tasks of a collection that doubled the workers' CPU time
    (benchmarks/RESULTS.md, "Collections"). A value already set is kept.
    """
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def _local_cluster(*, workers: int | None, device: str):
    from distributed import LocalCluster

    # One worker by default: a plain LocalCluster does not pin workers to different GPUs
    # (several GPUs need dask-cuda's LocalCUDACluster, one worker per GPU).
    n = workers or 1
    # Dask's nannies start workers with OMP/MKL/OpenBLAS set to one thread each; a worker here
    # runs one task at a time whose torch ops should use its share of the cores.
    share = str(max(1, cpu_count() // n))
    kwargs: dict[str, Any] = dict(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=_worker_log_level(),
        env={v: share for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
    )
    if device.startswith("cuda"):
        kwargs["resources"] = {"GPU": 1}
    log.info("starting a local Dask cluster: %d worker(s), %d core(s)", n, cpu_count())
    with _pre_spawn_environ(_shared_cores_environ()):
        return LocalCluster(**kwargs)


def _worker_log_level() -> int:
    """Embedded workers log nothing but crashes: a task's error reaches the user as the one
    line of :mod:`.faults` (its traceback with -v, when their errors are logged too)."""
    return logging.ERROR if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL


def _cuda_cluster(*, workers: int | None, device: str):
    _require_extra("cuda")
    from dask_cuda import LocalCUDACluster

    if device == "cpu":
        raise ConfigError("cluster='cuda' runs one worker per GPU; use --device auto or cuda.")
    log.info("starting one Dask worker per GPU (dask-cuda)")
    with _pre_spawn_environ():
        return LocalCUDACluster(
            n_workers=workers,
            threads_per_worker=1,
            resources={"GPU": 1},
            dashboard_address=None,
            silence_logs=_worker_log_level(),
        )


def _slurm_cluster(*, workers: int | None, slurm: SlurmSettings | None):
    _require_extra("slurm")
    from dask_jobqueue import SLURMCluster

    settings = slurm if slurm is not None else SlurmSettings()
    jobs = workers or 1
    if shutil.which("sbatch") is None:
        raise ClusterError(
            "cluster='slurm' submits jobs with sbatch, which is not on this machine's PATH. Run "
            "the command on a SLURM login node (or load the slurm module first)."
        )
    try:
        cluster = SLURMCluster(**slurm_cluster_kwargs(settings))
    except ValueError as err:
        raise ConfigError(
            f"Cannot describe the SLURM jobs: {err} Set cluster.slurm.memory (and queue, "
            "walltime...) in the workflow file, or jobqueue.slurm in the Dask config."
        ) from err
    log.info("submitting %d SLURM job(s); tasks start as the jobs start", jobs)
    cluster.scale(jobs=jobs)
    return cluster


@contextlib.contextmanager
def _external_client(scheduler: str) -> Iterator:
    from distributed import Client

    try:
        client = Client(scheduler, timeout=_CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ClusterError(
            f"Cannot reach the Dask scheduler at {scheduler!r} ({reason}). Check the address "
            "and that `dask scheduler` is running there, or omit --scheduler to run locally."
        ) from err
    try:
        n = len(_workers(client))
        if n == 0:
            log.warning("the scheduler at %s has no workers yet; tasks wait for them", scheduler)
        else:
            check_versions(client, scheduler=scheduler)
            log.info("connected to %s: %d worker(s)", scheduler, n)
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def cluster_client(
    client=None,
    *,
    scheduler: str | None = None,
    cluster: str = "local",
    workers: int | None = None,
    device: str = "cpu",
    slurm: SlurmSettings | None = None,
) -> Iterator:
    """Yield a ``distributed.Client``; clusters started here are closed here.

    Parameters
    ----------
    client : distributed.Client, optional
        Used as is (not closed).
    scheduler : str, optional
        Address of an existing scheduler (``tcp://host:8786``); its workers' package versions
        are checked. Excludes a ``cluster`` other than ``"local"``.
    cluster : {"local", "cuda", "slurm"}, optional
        Cluster to start when neither ``client`` nor ``scheduler`` is given: an embedded
        ``LocalCluster``, one worker per GPU of this host (needs ``hrdv2-dask[cuda]``), or
        SLURM jobs of one worker each (needs ``hrdv2-dask[hpc]``).
    workers : int, optional
        Worker processes (local, default 1), GPUs to use (cuda, default all) or SLURM jobs
        (slurm, default 1).
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``; the embedded cluster's workers advertise a ``GPU``
        resource when it is CUDA.
    slurm : SlurmSettings, optional
        Job settings for ``cluster="slurm"`` (default: the Dask config's ``jobqueue.slurm``).

    Raises
    ------
    ClusterError
        The scheduler cannot be reached, or its workers run other package versions.
    MissingExtraError
        The optional package for ``cluster`` is not installed.
    """
    check_deployment(scheduler=scheduler, cluster=cluster, slurm=slurm, workers=workers)
    if client is not None:
        yield client
        return
    if scheduler is not None:
        with _external_client(scheduler) as c:
            yield c
        return
    from distributed import Client

    if cluster == "cuda":
        started = _cuda_cluster(workers=workers, device=device)
    elif cluster == "slurm":
        started = _slurm_cluster(workers=workers, slurm=slurm)
    else:
        started = _local_cluster(workers=workers, device=device)
    with started, Client(started) as c:
        yield c
