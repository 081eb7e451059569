"""Live progress of a run: windows as the workers finish them, honest rates, a final line.

A block task reports each group of windows it has computed as a Dask worker event (one small
message per backbone call, :func:`~hrdv2_dask.pipeline.workers.report_progress`); the client
subscribes to the run's topic, so the bar moves within about one window's time on the
embedded cluster and on an external scheduler alike. Finished tasks are counted too, so the bar
is right even where events are late or lost; it never counts past the total. A collection's bar
listens to the topics of all its members and shows the members done and failed in its text.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Progress"]

log = logging.getLogger(__name__)

# Seconds of history for the moving rates.
_RATE_WINDOW_S = 30.0


class Progress:
    """A progress bar of ``total`` windows fed by worker events and finished tasks.

    Parameters
    ----------
    client : distributed.Client or None
        Subscribe to ``topic`` on it (``None``: finished tasks only).
    topic : str, sequence of str, or None
        The run's event topic (a collection: one per member, all on one bar).
    total : int
        Windows to compute.
    desc : str
    megapixels : float, optional
        Megapixels of the whole run (for MP/s); ``None``: windows/s only.
    enabled : bool
        Show the bar (the final line is logged either way).
    status : callable, optional
        ``status() -> str``, shown after the rates (e.g. members done and failed); asked
        again as each task finishes, in the thread that calls :meth:`task_done`.
    """

    def __init__(
        self,
        client: Any,
        topic: str | Sequence[str] | None,
        *,
        total: int,
        desc: str,
        megapixels: float | None = None,
        enabled: bool = True,
        status: Callable[[], str] | None = None,
    ) -> None:
        from tqdm.auto import tqdm

        self.total, self.desc, self.megapixels = total, desc, megapixels
        self.client, self.status = client, status
        self.topics = (topic,) if isinstance(topic, str) else tuple(topic or ())
        self._lock = threading.Lock()
        self._live = 0  # windows reported by workers
        self._finished = 0  # windows of finished tasks
        self._shown = 0  # windows on the bar (a disabled tqdm does not count)
        self.t0 = time.perf_counter()
        self._history: collections.deque = collections.deque([(self.t0, 0)])
        self.updates: list[tuple[float, int]] = []  # (seconds since start, windows): for tests
        self.text = ""  # the bar's text after the count (rates, status)
        self._rate = ""
        self._status = status() if status else ""
        self.bar = tqdm(total=total, unit="win", disable=not enabled, desc=desc)
        if client is not None:
            for name in self.topics:
                client.subscribe_topic(name, self._on_event)

    @property
    def n(self) -> int:
        return min(max(self._live, self._finished), self.total)

    def _on_event(self, event) -> None:
        _, msg = event
        with self._lock:
            self._live += int(msg)
            self._refresh()

    def task_done(self, windows: int) -> None:
        """A task of ``windows`` windows finished (its result is in)."""
        status = self.status() if self.status else ""
        with self._lock:
            self._finished += windows
            self._status = status
            self._refresh()

    def _refresh(self) -> None:
        n, now = self.n, time.perf_counter()
        if n <= self._shown:
            self._show()  # e.g. a member done whose windows were all reported already
            return
        self.bar.update(n - self._shown)
        self._shown = n
        self.updates.append((now - self.t0, n))
        self._history.append((now, n))
        while len(self._history) > 2 and now - self._history[0][0] > _RATE_WINDOW_S:
            self._history.popleft()
        t_old, n_old = self._history[0]
        rate = (n - n_old) / max(now - t_old, 1e-9)  # windows/s over the moving window
        post = f"{rate:.2f} win/s"
        if self.megapixels is not None:
            post += f", {rate * self.megapixels / max(self.total, 1):.2f} MP/s"
        self._rate = post
        self._show()

    def _show(self) -> None:
        text = ", ".join(t for t in (self._rate, self._status) if t)
        if text != self.text:
            self.text = text
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        """Close the bar, stop listening and log the final line."""
        for name in self.topics if self.client is not None else ():
            try:
                self.client.unsubscribe_topic(name)
            except Exception as err:  # noqa: BLE001 - never hide the run's own error
                log.debug("could not unsubscribe %s: %s", name, err)
        self.bar.close()
        wall = time.perf_counter() - self.t0
        if self.megapixels is not None and self.n == self.total:
            status = f" ({self._status})" if self._status else ""
            log.info(
                "%s: %d windows in %.1f s, %.2f MP/s%s",
                self.desc,
                self.total,
                wall,
                self.megapixels / max(wall, 1e-9),
                status,
            )
