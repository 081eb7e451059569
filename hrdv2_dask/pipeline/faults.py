"""Faults during a run, as one line each: what failed, where, and what to do.

Dask relays a task's own exception to the client; :func:`run_faults` maps it (and the client's
own store writes) in one place: a full disk, a read-only or forbidden location, an unreadable
source region, or any other failure of a task. The store is left incomplete, so rerunning the
same command once the cause is fixed resumes it (only the blocks not marked done are computed).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import Hrdv2Error, RunError, StoreWriteError

__all__ = ["describe_fault", "error_line", "is_store_fault", "results_faults", "run_faults"]

log = logging.getLogger(__name__)

_RESUME = "rerun the same command to resume (the store is incomplete; finished blocks are kept)"


def _gb(n_bytes: float) -> str:
    """
    >>> _gb(3.2e9), _gb(4.5e6), _gb(12)
    ('3.20 GB', '4.5 MB', '0.0 MB')
    """
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def _mount_point(path: Path) -> Path:
    """The mount point of the file system that holds ``path``."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    dev = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == dev:
        path = path.parent
    return path


def _remaining_bytes(store: Path) -> int | None:
    """Uncompressed bytes of the feature chunks that the run has still to write."""
    try:
        import zarr

        group = zarr.open_group(store, mode="r", zarr_format=3)
        arr = group["features"]
        done = group["_run"]["done"][...]
        left = 1.0 - float(done.mean()) if done.size else 1.0
        return int(arr.nbytes * left)
    except Exception:  # noqa: BLE001 - only an estimate for the message
        return None


def _space(store: Path) -> str:
    import shutil

    mount = _mount_point(store)
    free = shutil.disk_usage(mount).free
    need = _remaining_bytes(store)
    needs = f"; the run still writes up to {_gb(need)} (uncompressed)" if need else ""
    return f"{_gb(free)} free on {mount}{needs}"


def describe_fault(
    err: BaseException,
    *,
    store: str | os.PathLike,
    what: str = "feature store",
    then: str = _RESUME,
) -> Hrdv2Error:
    """The one-line error for ``err`` raised while a run wrote ``store`` (a ``what``); the
    message ends with ``then`` (what to do once the cause is fixed).

    >>> err = OSError(errno.EROFS, "Read-only file system", "/s.zarr/c")
    >>> str(describe_fault(err, store="/s.zarr")).split(":")[0]
    "Cannot write feature store '/s.zarr'"
    """
    if isinstance(err, Hrdv2Error):
        return err
    store = Path(store)
    where = f"Cannot write {what} {str(store)!r}"
    if isinstance(err, OSError) and err.errno is not None:
        name = f" ({err.filename})" if err.filename else ""
        if err.errno == errno.ENOSPC:
            space = ""
            with contextlib.suppress(OSError, ValueError):
                space = f" ({_space(store)})"
            return StoreWriteError(
                f"{where}: no space left on its device{name}{space}. Free space (or write to "
                f"another disk), then {then}."
            )
        if err.errno == errno.EROFS:
            return StoreWriteError(
                f"{where}: the file system is read-only{name}. Write to a writable location, or "
                f"make it writable and {then}."
            )
        if err.errno in (errno.EACCES, errno.EPERM):
            return StoreWriteError(
                f"{where}: permission denied{name}. Give this user (and the Dask workers) write "
                f"access, then {then}; or write to another path."
            )
        if err.errno == errno.EDQUOT:
            return StoreWriteError(f"{where}: disk quota exceeded{name}. Free space, then {then}.")
    detail = " ".join(str(err).split()) or "(no message)"
    return RunError(
        f"The run writing {what} {str(store)!r} failed: {type(err).__name__}: {detail}. Fix the "
        f"cause (-v shows the traceback), then {then}."
    )


_STORE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


def error_line(err: BaseException) -> str:
    """A failed member's error, as the members table records it: its type and its message on
    one line.

    >>> error_line(ValueError("bad   tile "))
    'ValueError: bad tile'
    """
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def is_store_fault(err: BaseException) -> bool:
    """Whether ``err`` is a fault of the output store (no space, read-only, permission denied,
    quota) that ends the whole run, rather than a fault of one input.

    Reads of the inputs raise :class:`~hrdv2_dask.errors.Hrdv2Error` s of their own
    (:class:`~hrdv2_dask.errors.SourceReadError`), so a bare ``OSError`` with one of these
    codes comes from writing.

    >>> is_store_fault(OSError(errno.ENOSPC, "No space left on device"))
    True
    >>> is_store_fault(OSError(errno.ENOENT, "No such file")), is_store_fault(ValueError())
    (False, False)
    """
    if isinstance(err, StoreWriteError):
        return True
    return (
        isinstance(err, OSError) and not isinstance(err, Hrdv2Error) and err.errno in _STORE_ERRNOS
    )


@contextlib.contextmanager
def run_faults(store: str | os.PathLike, **describe) -> Iterator[None]:
    """Re-raise every failure inside as the one-line error of :func:`describe_fault` (with the
    keywords ``describe``)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, Hrdv2Error):
        raise
    except Exception as err:
        log.debug("the run writing %s failed", store, exc_info=err)
        raise describe_fault(err, store=store, **describe) from err


_AGAIN = (
    "rerun the same command (outputs it did not finish were not written: each one appears "
    "only once complete)"
)


def results_faults(out: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
    """:func:`run_faults` for an analysis or workflow writing its results into folder ``out``:
    a fault while writing (no space, read-only, permission denied) names ``out``; a damaged
    feature store or input file is named by its own one-line error."""
    return run_faults(out, what="results folder", then=_AGAIN)
