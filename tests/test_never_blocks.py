"""Exporters never hold up training: a stuck exporter, a hanging server, a long outage.

Each test proves it by counting, not by timing: the fit reaches its last step while the exporter
has delivered (almost) nothing, and every point is accounted for afterwards.
"""

from __future__ import annotations

import socket
import threading
import time

import lightning.pytorch as pl
import pytest

from dp_models import DPModel, fit
from privacy_callbacks import Exporter, InfluxDBExporter, PrivacyMonitor

DELTA = 1e-5


class StuckExporter(Exporter):
    """Blocks inside ``export`` until released: a server that stopped answering."""

    name = "stuck"

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.exported = 0

    def export(self, snapshot) -> None:
        self.entered.set()
        self.gate.wait(60)
        self.exported += 1


class AtTrainEnd(pl.Callback):
    def __init__(self, action) -> None:
        self.action = action

    def on_train_end(self, trainer, pl_module):
        self.action(trainer)


def test_training_never_waits_for_a_stuck_exporter():
    exporter = StuckExporter()
    monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter], session_id="stuck")
    seen = {}

    def at_end(trainer):
        assert exporter.entered.wait(30), "the publisher never reached the exporter"
        seen.update(step=trainer.global_step, exported=exporter.exported)
        exporter.gate.set()  # the server answers again: teardown can drain

    fit(DPModel(), monitor, AtTrainEnd(at_end), max_epochs=2)
    assert seen == {"step": 16, "exported": 0}  # all 16 steps ran while it was stuck
    assert (exporter.exported, exporter.dropped) == (16, 0)  # and nothing was lost


@pytest.mark.servers
def test_training_runs_on_while_influxdb_accepts_but_never_answers():
    """A server that takes the connection and never replies: the worst outage for a client."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # connections queue in the backlog; nobody reads them
    url = f"http://127.0.0.1:{hole.getsockname()[1]}"
    exporter = InfluxDBExporter(url, api="v1", database="privacy", flush_interval=0.1,
                                request_timeout=60, close_timeout=1.0)
    monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter], session_id="hole")
    seen = {}

    def at_end(trainer):
        seen.update(step=trainer.global_step, written=exporter.written)

    try:
        fit(DPModel(), monitor, AtTrainEnd(at_end), max_epochs=2)
    finally:
        hole.close()  # resets the queued connections: the client's request ends
    assert seen == {"step": 16, "written": 0}
    assert (exporter.written, exporter.dropped) == (0, 16)  # every point counted, none silently


def test_the_publisher_tells_each_build_whether_a_newer_step_is_queued():
    # Forecasts and the risk bound are computed for the newest step only: a publisher that
    # fell behind by five steps computes them once, not five times.
    from privacy_callbacks.publisher import Publisher

    built: list[tuple[int, bool]] = []
    publisher = Publisher([], lambda record, newest: built.append((record, newest)),
                          interval=60.0)  # drains only when flushed
    try:
        for step in range(5):
            publisher.put(step)
        assert publisher.flush(timeout=10.0)
    finally:
        publisher.close(timeout=10.0)
    assert built == [(0, False), (1, False), (2, False), (3, False), (4, True)]


def test_a_full_publisher_drops_the_oldest_steps_and_counts_each():
    from privacy_callbacks.publisher import Publisher

    built: list[int] = []
    publisher = Publisher([], lambda record, newest: built.append(record), max_pending=3,
                          interval=60.0)  # drains only when flushed
    try:
        for step in range(5):
            publisher.put(step)
        assert publisher.flush(timeout=10.0)
        publisher.put(5)
        assert publisher.flush(timeout=10.0)
    finally:
        publisher.close(timeout=10.0)
    assert built == [2, 3, 4, 5] and publisher.dropped == 2


def test_every_step_is_built_or_counted_while_the_publisher_drains_and_others_offer():
    # The training thread's put takes no lock: what the deque lets go while the thread drains it
    # is still counted, never twice, and snapshots offered from another thread go out too.
    from privacy_callbacks import PrivacySnapshot
    from privacy_callbacks.publisher import Publisher

    built: list[int] = []
    delivered: list[int] = []

    class Sink(Exporter):
        def export(self, snapshot):
            delivered.append(snapshot.step)

    publisher = Publisher([Sink()], lambda record, newest: built.append(record) or None,
                          max_pending=50, interval=0.001)
    offering = threading.Thread(target=lambda: [publisher.offer(PrivacySnapshot(
        step=10 ** 6, timestamp_ns=0, accountant="rdp")) for _ in range(200)])
    try:
        offering.start()
        for step in range(20_000):
            publisher.put(step)
            if step % 100 == 0:
                time.sleep(0.0002)  # the publisher drains meanwhile
        offering.join()
        assert publisher.flush(timeout=10.0)
    finally:
        publisher.close(timeout=10.0)
    assert len(built) + publisher.dropped == 20_000 and built == sorted(built)
    assert delivered == [10 ** 6] * 200


def test_a_newer_snapshot_queued_behind_a_build_leaves_it_the_newest_build():
    # An exact epsilon published from the accounting thread after the last step's record must
    # not cost that step its forecast and risk bound (nothing newer will compute them).
    from privacy_callbacks import PrivacySnapshot
    from privacy_callbacks.publisher import Publisher

    built: list[tuple[int, bool]] = []
    publisher = Publisher([], lambda record, newest: built.append((record, newest)),
                          interval=60.0)
    try:
        publisher.put(1)
        publisher.put(PrivacySnapshot(step=1, timestamp_ns=0, accountant="rdp"))  # as it is
        assert publisher.flush(timeout=10.0)
    finally:
        publisher.close(timeout=10.0)
    assert built == [(1, True)]
