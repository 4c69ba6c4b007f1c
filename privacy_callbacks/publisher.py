"""Hands each step from the training thread to the exporters, on a background thread."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Sequence

from .exporters.base import Exporter
from .snapshot import PrivacySnapshot

logger = logging.getLogger(__name__)

__all__ = ["Publisher"]


class Publisher:
    """A bounded hand-off: :meth:`put` is a deque append, nothing more.

    The thread is not woken per step: it takes everything queued every ``interval`` seconds, so
    the training thread never pays a thread switch per step. A queued record (what the training
    thread noted) is turned into a snapshot here by ``build(record, newest)``, ``newest`` telling
    whether it is the last record of the batch taken (what only the latest value of matters is
    computed for that one); a queued snapshot is exported as it is. Observers see each
    snapshot before the exporters. Past ``max_pending`` queued items the oldest is dropped and
    counted in :attr:`dropped`.
    """

    name = "publisher"

    def __init__(self, exporters: Sequence[Exporter],
                 build: Callable[[Any, bool], PrivacySnapshot | None],
                 max_pending: int = 10_000, interval: float = 0.05,
                 observers: Sequence[Any] = ()) -> None:
        self.exporters = tuple(exporters)
        self.observers = tuple(observers)
        self.dropped = 0
        self._build = build
        self._max = max_pending
        self._interval = interval
        self._queue: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._lock = threading.Lock()
        self._put = self._taken = 0  # items queued and items finished (or dropped) so far
        self._last_step = -1
        self._failed: set[str] = set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="privacy-publisher", daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        """Queue a record or a snapshot; never blocks."""
        queue = self._queue
        with self._lock:  # the training thread and the accounting's worker both put
            if len(queue) >= self._max:
                try:
                    queue.popleft()
                    self.dropped += 1
                except IndexError:  # the publisher just took everything
                    pass
            queue.append(item)
            self._put += 1

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            batch = []
            while queue:
                batch.append(queue.popleft())
            newest = max((i for i, item in enumerate(batch)
                          if not isinstance(item, PrivacySnapshot)), default=-1)
            for i, item in enumerate(batch):
                snapshot = item
                if not isinstance(item, PrivacySnapshot):
                    try:
                        snapshot = self._build(item, i == newest)
                    except Exception:
                        snapshot = None
                        self._fail("building the snapshot")
                if snapshot is not None:
                    self._deliver(snapshot)
                with self._done:
                    self._taken += 1
                    self._done.notify_all()
                # Hand the interpreter lock over between steps: a waiting training thread
                # waits for one step's work, not for the whole batch's.
                time.sleep(0)
            if self._stop and not queue:
                return

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
        deadline = time.monotonic() + timeout
        with self._done:
            while self._taken + self.dropped < target and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Export what is queued (within ``timeout``) and stop the thread."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("The privacy metrics publisher did not finish within %.1f s; %d "
                           "steps not exported", timeout, len(self._queue))
