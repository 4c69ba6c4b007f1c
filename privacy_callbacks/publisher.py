"""Hands each step from the training thread to the exporters, on a background thread."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any, Callable, Sequence

from .exporters.base import Exporter
from .snapshot import PrivacySnapshot

logger = logging.getLogger(__name__)

__all__ = ["Publisher"]


class Publisher:
    """A bounded hand-off: :meth:`put` (the training thread) is a lock-free deque append -- a lock
    there cost the monitor's hooks about 3 of their 14 us a step (bench_overhead.py --hooks-only);
    :meth:`offer` takes snapshots from other threads. The thread, not woken per step, takes
    everything queued every ``interval`` s (each take holds the interpreter lock training waits
    for, ~0.5 ms; a step's mean cost over Opacus, bench_overhead.py --hooks-only: +36 us at four
    a second, +87 us at twenty). A record becomes a snapshot there by ``build(record,
    newest)`` (``newest``: the batch's last record, the one latest-only values are computed for);
    a queued snapshot goes out as it is, to the observers, then the exporters. Past
    ``max_pending`` the deque lets its oldest item go, counted in :attr:`dropped`."""

    name = "publisher"

    def __init__(self, exporters: Sequence[Exporter],
                 build: Callable[[Any, bool], PrivacySnapshot | None], max_pending: int = 10_000,
                 interval: float = 0.25, observers: Sequence[Any] = ()) -> None:
        self.exporters, self.observers = tuple(exporters), tuple(observers)
        self._build, self._interval = build, interval
        self._queue: collections.deque[Any] = collections.deque(maxlen=max_pending)
        self._offered: list[PrivacySnapshot] = []  # other threads', under the lock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Condition()
        # Items let go (counted by the thread), put (by the training thread alone), delivered.
        self.dropped = self._put = self._taken = 0
        self._last_step, self._stop = -1, False
        self._failed: set[str] = set()  # what failed already (logged once)
        self._thread = threading.Thread(target=self._run, name="privacy-publisher", daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        """Queue a record or a snapshot, from the training thread only; never blocks."""
        self._queue.append(item)
        self._put += 1

    def offer(self, snapshot: PrivacySnapshot) -> None:
        """Queue a snapshot from any other thread (a background epsilon); it goes out after the
        records taken with it."""
        with self._lock:
            self._offered.append(snapshot)

    def _run(self) -> None:
        while not self._stop or self._queue or self._offered:
            self._wake.wait(self._interval)
            self._wake.clear()
            put, batch = self._put, []  # read before draining: the drop count never overshoots
            with contextlib.suppress(IndexError):
                while True:
                    batch.append(self._queue.popleft())
            taken = self._taken + len(batch)
            dropped = max(self.dropped, put - taken - len(self._queue))
            with self._lock:
                batch += self._offered
                self._offered = []
            newest = max((i for i, item in enumerate(batch)
                          if not isinstance(item, PrivacySnapshot)), default=-1)
            for i, item in enumerate(batch):
                try:
                    snapshot = (item if isinstance(item, PrivacySnapshot)
                                else self._build(item, i == newest))
                except Exception:
                    snapshot = None
                    self._fail("building the snapshot")
                if snapshot is not None:
                    self._deliver(snapshot)
                    time.sleep(0)  # the training thread waits one step's work, not a batch's
            with self._done:
                self._taken, self.dropped = taken, dropped
                self._done.notify_all()

    def _deliver(self, snapshot: PrivacySnapshot) -> None:
        if snapshot.step < self._last_step:
            return  # a value for an earlier step (a background epsilon) after a later one
        self._last_step = snapshot.step
        for observer in self.observers:
            try:
                observer.privacy_observe(snapshot)
            except Exception:
                self._fail(type(observer).__name__)
        for exporter in self.exporters:
            try:
                exporter.export(snapshot)
            except Exception:
                exporter.dropped += 1
                self._fail(exporter.name)

    def _fail(self, what: str) -> None:
        if what not in self._failed:
            self._failed.add(what)
            logger.exception("Exporting privacy metrics to %s failed; training continues "
                             "(further failures are counted, not logged)", what)

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far was exported (or dropped); False on timeout."""
        target = self._put
        self._wake.set()
        with self._done:
            return self._done.wait_for(lambda: self._taken + self.dropped >= target
                                       or not self._thread.is_alive(), timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Export what is queued (within ``timeout``) and stop the thread."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("The privacy metrics publisher did not finish within %.1f s; %d "
                           "steps not exported", timeout, len(self._queue))
