"""Devices and cores: the spelling of a device, where ``"auto"`` points, how many cores to use.

A leaf: torch and dask are imported only inside the functions that need them.
"""

from __future__ import annotations

from .errors import ConfigError

__all__ = ["check_device", "cpu_count", "resolve_device"]


def check_device(device: str) -> str:
    """Check the spelling of a device (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``).

    >>> check_device("cuda:1")
    'cuda:1'
    """
    if not isinstance(device, str) or (
        device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:")
    ):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}.")
    return device


def resolve_device(device: str) -> str:
    """``"auto"`` → ``"cuda"`` when this process sees a GPU, else ``"cpu"``.

    Runs where the model runs: on the client for the embedded cluster, on each worker otherwise.
    """
    import torch

    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA GPU is visible; use --device cpu.")
    return device


def cpu_count() -> int:
    """Cores this process may use: Dask's count (CPU affinity and cgroup quota included).

    The one core count of the package: embedded workers' thread shares, the preload's torch
    threads, the benchmarks' reports.

    >>> cpu_count() >= 1
    True
    """
    from dask.system import CPU_COUNT

    return max(1, int(CPU_COUNT))
