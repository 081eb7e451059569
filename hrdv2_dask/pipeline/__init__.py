"""The Dask pipeline: plan (pure), inputs, graph, workers, cluster, execute, and ``extract``.

Layers: ``plan`` and ``graph`` need no cluster; ``execute`` and ``cluster`` do; ``extract``
ties them together (plan → store → execute).
"""

from .extract import extract, split_options

__all__ = ["extract", "split_options"]
