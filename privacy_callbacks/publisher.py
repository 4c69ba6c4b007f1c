"""Hands snapshots from the training thread to the exporters on a background thread."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Sequence

from .exporters.base import Exporter
from .snapshot import PrivacySnapshot

logger = logging.getLogger(__name__)

# A snapshot, or what to build one from on the publisher thread: (build, record).
_Build = Callable[[Any, bool], PrivacySnapshot]
_Item = PrivacySnapshot | tuple[_Build, Any]

__all__ = ["Publisher"]

_LOOK_BEHIND = 16  # queued items a build looks through for a newer one


class Publisher:
    """A bounded hand-off: :meth:`publish` is a deque append, nothing more.

    The publisher thread is not woken per snapshot: it drains the queue every ``interval``
    seconds, so the training thread never pays a thread switch (or GIL hand-over) per step.
    :meth:`publish_later` queues what a snapshot is built from, so the building (epsilon, the
    budget metrics) happens here too, in one warm batch, not in the training step. The build
    is told whether its record is the newest queued: what only the latest value of matters
    (forecasts) is computed for that one.

    When exporters fall behind by more than ``max_pending`` snapshots, the oldest are dropped and
    counted in :attr:`dropped` (exported as ``privacy_export_dropped_total{exporter="publisher"}``).
    Device-side statistics attached to a snapshot are resolved here, off the training thread.
    """

    name = "publisher"

    def __init__(self, exporters: Sequence[Exporter], max_pending: int = 10_000,
                 interval: float = 0.05) -> None:
        if max_pending < 1:
            raise ValueError(f"Unexpected value for max_pending: {max_pending}; use 1 or more")
        if not interval > 0:
            raise ValueError(f"Unexpected value for interval: {interval}; use seconds > 0")
        self.interval = interval
        self.exporters = tuple(exporters)
        self.dropped = 0
        self._queue: collections.deque[_Item] = collections.deque()
        self._max = max_pending
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._published = 0
        self._done = 0
        self._stop = False
        self._failed: set[str] = set()
        self._last_step = -1
        self._thread = threading.Thread(target=self._run, name="privacy-publisher", daemon=True)
        self._thread.start()

    def publish(self, snapshot: PrivacySnapshot) -> None:
        """Queue ``snapshot``; never blocks. Called on the training thread."""
        self._put(snapshot)

    def publish_later(self, build: _Build, record: Any) -> None:
        """Queue ``build(record, newest)``, called on the publisher thread, ``newest`` telling
        whether no later build was queued by then; never blocks."""
        queue = self._queue
        if len(queue) < self._max:  # the common case, inline: this runs every step
            queue.append((build, record))
            self._published += 1
        else:
            self._put((build, record))

    def _put(self, snapshot: _Item) -> None:
        queue = self._queue
        if len(queue) >= self._max:
            try:
                queue.popleft()
                self.dropped += 1
            except IndexError:  # the publisher thread just emptied it
                pass
        queue.append(snapshot)
        self._published += 1

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            while queue:
                try:
                    item = queue.popleft()
                except IndexError:
                    break
                snapshot: PrivacySnapshot | None
                if isinstance(item, tuple):
                    try:
                        snapshot = item[0](item[1], self._newest(queue))
                    except Exception:
                        snapshot = None
                        self._fail("building the snapshot")
                else:
                    snapshot = item
                if snapshot is not None:
                    self._deliver(snapshot)
                with self._idle:
                    self._done += 1
                    self._idle.notify_all()
                if queue:
                    # Hand the interpreter lock over between snapshots: a training thread
                    # waiting for it waits for one snapshot's work, not for the whole batch.
                    time.sleep(0)
            if self._stop and not queue:
                return

    @staticmethod
    def _newest(queue: collections.deque[_Item]) -> bool:
        """Whether no build is queued behind the one just taken (a snapshot queued from another
        thread, a background epsilon, is not one). Behind a longer queue: no, without looking
        (the build's own clock assesses at least every half second)."""
        if len(queue) > _LOOK_BEHIND:
            return False
        # tuple() copies the deque in one C call: no append can interleave.
        return not any(isinstance(item, tuple) for item in tuple(queue))

    def _deliver(self, snapshot: PrivacySnapshot) -> None:
        if snapshot.step < self._last_step:
            # A value for an earlier step, published from another thread (a background epsilon)
            # after a later step's: the later one already went out and stays the latest.
            return
        self._last_step = snapshot.step
        stats = snapshot.device_stats
        if stats is not None:
            try:
                stats.resolve()
            except Exception:
                self._fail("device statistics")
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
        """Whether the caller is the publisher thread."""
        return threading.current_thread() is self._thread

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every snapshot published so far was exported; False on timeout."""
        target = self._published
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._done + self.dropped < target and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Export what is queued (within ``timeout``) and stop the thread."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("Privacy metrics publisher did not finish within %.1f s; "
                           "%d snapshots not exported", timeout, len(self._queue))
