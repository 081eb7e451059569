"""The Dask preload module: ``dask worker SCHEDULER --preload hrdv2_dask.preload``.

Dask calls :func:`dask_setup` when the worker starts (see :mod:`hrdv2_dask.pipeline.workers`).
"""

from .pipeline.workers import dask_setup

__all__ = ["dask_setup"]
