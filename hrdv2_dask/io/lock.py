"""The writer lock of a feature store: one run writes a store at a time.

A run that writes a store holds ``STORE/_writer.lock``, a small JSON file made with
``O_CREAT | O_EXCL`` (atomic on local and network file systems) that names its holder: host,
pid, user, start time and command. A second writer is refused with a line naming the holder.
A lock is *stale*, and taken over with a warning, when its process is gone (same host) or when
it is older than ``stale_after_s`` (another host, where the process cannot be checked). Readers
never look at it, and Zarr ignores it (it is not a ``zarr.json``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import getpass
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import StoreBusyError, StoreError, StoreWriteError

__all__ = ["LOCK_NAME", "WriterLock", "holder_description", "stale_reason"]

log = logging.getLogger(__name__)

#: The lock file's name inside a store.
LOCK_NAME = "_writer.lock"
# A lock file younger than this that cannot be parsed is being written by its holder.
_FRESH_S = 10.0


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except OSError:
        return False
    with contextlib.suppress(OSError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    return True


def stale_reason(
    holder: Mapping[str, Any],
    *,
    host: str,
    now: float,
    stale_after_s: float,
    alive: Callable[[int], bool] = pid_alive,
) -> str | None:
    """Why the lock of ``holder`` may be taken over, or ``None`` while its run may be alive.

    >>> h = {"host": "a", "pid": 7, "time": 0.0}
    >>> stale_reason(h, host="a", now=10.0, stale_after_s=60, alive=lambda pid: False)
    'its process 7 on a is gone'
    >>> stale_reason(h, host="b", now=10.0, stale_after_s=60) is None
    True
    >>> stale_reason(h, host="b", now=100.0, stale_after_s=60)
    'it is 100 s old (more than 60 s) and held from another host (a)'
    """
    if holder.get("host") == host:
        pid = int(holder.get("pid", -1))
        return None if alive(pid) else f"its process {pid} on {host} is gone"
    age = now - float(holder.get("time", now))
    if age > stale_after_s:
        return (
            f"it is {age:.0f} s old (more than {stale_after_s:.0f} s) and held from another host "
            f"({holder.get('host')})"
        )
    return None


def holder_description(holder: Mapping[str, Any]) -> str:
    """One phrase naming a lock's holder.

    >>> holder_description({"pid": 7, "host": "a", "user": "u", "started": "T", "command": "c"})
    "pid 7 on host a (user u) since T, command 'c'"
    """
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (user {holder.get('user')}) "
        f"since {holder.get('started')}, command {holder.get('command')!r}"
    )


_PROBLEMS = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on its device",
    errno.EDQUOT: "disk quota exceeded",
}


def _unwritable(path: Path, err: OSError) -> StoreWriteError:
    """The one line for a store whose folder or writer lock cannot be created."""
    problem = _PROBLEMS.get(err.errno, " ".join(str(err).split()))
    where = f" ({err.filename})" if err.filename else ""
    return StoreWriteError(
        f"Cannot write feature store {str(path)!r}: {problem}{where}. Write to a writable "
        "location with free space (or give this user write access there), then rerun the same "
        "command."
    )


class WriterLock:
    """Hold the writer lock of store ``path`` (a context manager; released on any exit).

    Parameters
    ----------
    path : str or os.PathLike
        The store's folder (created if missing, and removed again at release if the lock was
        all it held).
    stale_after_s : float, optional
        Age after which a lock held from another host is taken over.
    command : str, optional
        What the holder runs (default: this process's command line).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        stale_after_s: float = 86_400.0,
        command: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.file = self.path / LOCK_NAME
        self.stale_after_s = float(stale_after_s)
        self.command = command if command is not None else " ".join(sys.argv)
        self.token: str | None = None
        self._made_dir = False

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise :class:`StoreBusyError` naming its live holder."""
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(
                f"Output {str(self.path)!r} is an existing file, not a Zarr store. Choose another "
                "path (e.g. features.zarr)."
            )
        created = False
        try:
            if not self.path.exists():
                self.path.mkdir(parents=True)
                self._made_dir = True
            token = uuid.uuid4().hex
            for _ in range(3):
                try:
                    fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    self._take_over_if_stale()
                    continue
                created = True
                with os.fdopen(fd, "w") as f:
                    json.dump(self._holder(token), f)
                    f.flush()
                    os.fsync(f.fileno())
                self.token = token
                return
        except StoreError:
            raise
        except OSError as err:  # read-only, permission denied, no space: before any work
            if created:
                self.file.unlink(missing_ok=True)  # ours, but not fully written
            if self._made_dir:
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            raise _unwritable(self.path, err) from err
        raise StoreBusyError(  # pragma: no cover - three writers raced for a stale lock
            f"Store {str(self.path)!r}: could not take its writer lock ({self.file}); another "
            "run keeps taking it. Rerun when it is done."
        )

    def release(self) -> None:
        """Remove the lock if this object holds it (and the folder if it made it empty)."""
        if self.token is None:
            return
        if (self.read() or {}).get("token") == self.token:
            self.file.unlink(missing_ok=True)
        self.token = None
        if self._made_dir:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only when empty: a run that failed before writing

    def read(self) -> dict[str, Any] | None:
        """The holder recorded in the lock file, or ``None`` (no file, or not readable)."""
        try:
            value = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _holder(self, token: str) -> dict[str, Any]:
        now = time.time()
        started = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds")
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": _user(),
            "started": started,
            "time": now,
            "command": self.command,
            "token": token,
        }

    def _take_over_if_stale(self) -> None:
        holder = self.read()
        if holder is None:
            try:
                age = time.time() - self.file.stat().st_mtime
            except FileNotFoundError:
                return  # released meanwhile: try again
            if age < _FRESH_S:
                raise StoreBusyError(
                    f"Store {str(self.path)!r} is being locked by another run right now "
                    f"({self.file}). Wait for it to finish, or write to another path."
                )
            reason = f"its lock file is unreadable and {age:.0f} s old"
        else:
            reason = stale_reason(
                holder,
                host=socket.gethostname(),
                now=time.time(),
                stale_after_s=self.stale_after_s,
            )
            if reason is None:
                raise StoreBusyError(
                    f"Store {str(self.path)!r} is being written by another run: "
                    f"{holder_description(holder)}. Wait for it to finish or stop it, or write "
                    f"to another path (a lock whose process is gone is taken over; from another "
                    f"host after {self.stale_after_s:.0f} s)."
                )
        log.warning(
            "taking over the writer lock of %s: %s (%s)",
            self.path,
            reason,
            "unreadable" if holder is None else holder_description(holder),
        )
        self.file.unlink(missing_ok=True)
