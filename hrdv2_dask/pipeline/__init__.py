"""The Dask pipeline: plan (pure), inputs, graph, workers, cluster, execute, and ``extract``.

``plan`` needs no cluster and imports no Dask (``import hrdv2_dask.pipeline.plan`` stays light);
``graph`` builds the tasks; ``execute`` and ``cluster`` need a cluster; ``extract`` ties them
together (plan → store → execute) in ``extraction``; ``extract`` is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["extract", "split_options"]

if TYPE_CHECKING:
    from .extraction import extract, split_options


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".extraction", __name__), name)
    raise AttributeError(f"module 'hrdv2_dask.pipeline' has no attribute {name!r}")
