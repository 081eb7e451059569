"""Exception hierarchy.

Every error raised on purpose by hrdv2_dask derives from :class:`Hrdv2Error` and from the
builtin that describes its failure class, so ``except ValueError`` keeps working for callers who
do not know this package. Messages say what failed, show the offending value and give the fix.
"""

from __future__ import annotations

__all__ = [
    "Hrdv2Error",
    "ConfigError",
    "InputError",
    "WeightsNotFoundError",
    "WeightsFormatError",
    "StoreError",
    "IncompleteStoreError",
    "StoreBusyError",
    "StoreWriteError",
    "StoreReadError",
    "SourceReadError",
    "RunError",
    "SourceNotFoundError",
    "ClusterError",
    "MissingExtraError",
]


class Hrdv2Error(Exception):
    """Base class of every error raised on purpose by hrdv2_dask."""

    def __reduce__(self):
        # Rebuilt from its message: classes that are also an OSError otherwise fail to unpickle
        # when Dask relays them from a worker with their traceback (``ValueError.__new__`` of an
        # ``OSError`` subclass "is not safe").
        return (type(self), self.args)


class ConfigError(Hrdv2Error, ValueError):
    """An option or a combination of options is invalid."""


class InputError(Hrdv2Error, ValueError):
    """An input image (array or file) cannot be used: wrong shape, dtype, values or format."""


class WeightsNotFoundError(Hrdv2Error, FileNotFoundError):
    """No weights for a backbone were found in any of the places looked in."""


class WeightsFormatError(Hrdv2Error, ValueError):
    """A checkpoint exists but fits neither the requested architecture nor a known format."""


class StoreError(Hrdv2Error, ValueError):
    """A feature store cannot be created, opened or resumed."""


class IncompleteStoreError(StoreError):
    """A feature store exists but its run did not complete."""


class StoreBusyError(StoreError):
    """Another live run holds a feature store's writer lock."""


class StoreWriteError(StoreError, OSError):
    """A feature store cannot be written during a run: no space, read-only, permission denied."""


class StoreReadError(StoreError, OSError):
    """A feature store cannot be read: a damaged or missing chunk or metadata file."""


class SourceReadError(InputError):
    """A region of an input image cannot be read (a corrupt tile or chunk, a vanished file)."""


class RunError(Hrdv2Error, RuntimeError):
    """A task of a run failed for a reason of its own (relayed from the Dask worker)."""


class SourceNotFoundError(Hrdv2Error, FileNotFoundError):
    """An input path does not exist."""


class ClusterError(Hrdv2Error, ConnectionError):
    """The Dask scheduler cannot be reached or used."""


class MissingExtraError(Hrdv2Error, ImportError):
    """An optional dependency (an extra such as ``hrdv2-dask[cuda]``) is not installed."""
