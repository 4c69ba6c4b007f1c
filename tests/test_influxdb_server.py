"""InfluxDBExporter against real servers: VictoriaMetrics (v2 write API), InfluxDB 1.6 (v1).

The exporter-level tests drive the exporter with snapshots, as the monitor's publisher does; the
fit-level ones run a real fit with ``PrivacyMonitor`` and compare with Opacus' own epsilon.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from opacus.accountants import RDPAccountant

from dp_models import DPModel, fit
from privacy_callbacks import InfluxDBExporter, PrivacyMonitor, PrivacySnapshot, PrometheusExporter
from privacy_callbacks.exporters.base import RunInfo
from servers import (Server, influxdb1, influxdb1_query, victoria_metrics,
                     victoria_metrics_export, wait_for)

pytestmark = pytest.mark.servers

DELTA = 1e-5
ROOT = Path(__file__).resolve().parent.parent
# Fast retries so an outage of a few seconds is ridden out quickly.
QUICK = {"flush_interval": 0.1, "retry_interval": 0.2, "max_retry_delay": 0.5}
# An hour ago: a retention policy drops older points, and reads end at the present.
START_NS = (time.time_ns() // 10**9 - 3600) * 10**9


def snapshot(step: int, epsilon: float | None = None, exact: int = 1) -> PrivacySnapshot:
    return PrivacySnapshot(step=step, timestamp_ns=START_NS + step * 10**9,
                           accountant="rdp", delta=DELTA,
                           epsilon=0.01 * step if epsilon is None else epsilon,
                           epsilon_step=step, epsilon_exact=exact, noise_multiplier=1.0,
                           session_steps=step, extra={"clipped_fraction": 0.25})


def export(exporter: InfluxDBExporter, snapshots, session: str, *, close: bool = True) -> None:
    exporter.start()
    exporter.open(RunInfo(session_id=session, model_name="mlp", accountant="rdp"))
    for snap in snapshots:
        exporter.export(snap)
    if close:
        exporter.close(timeout=10.0)


def opacus_epsilons(model: DPModel, steps: int) -> dict[int, float]:
    """Epsilon after each step, from Opacus' own accountant fed the same history."""
    sigma, q, _ = model.privacy_engine.accountant.history[0]
    out = {}
    for k in range(1, steps + 1):
        accountant = RDPAccountant()
        accountant.history = [(sigma, q, k)]
        out[k] = accountant.get_epsilon(DELTA)
    return out


def vm_series(server: Server, field: str, session: str) -> dict[int, float]:
    """{timestamp: value} of ``privacy_training_<field>`` for ``session``."""
    rows = victoria_metrics_export(
        server, f'{{__name__="privacy_training_{field}",session_id="{session}"}}')
    if not rows:
        return {}
    assert len(rows) == 1, rows
    return dict(zip(rows[0]["timestamps"], rows[0]["values"]))


def vm_points(server: Server, session: str, count: int) -> tuple[list[int], list[float]]:
    """Steps and epsilons stored for ``session`` once ``count`` points are there."""
    def arrived():
        steps = vm_series(server, "step", session)
        return len(steps) >= count and steps
    steps = wait_for(arrived, 60, what=f"{count} points in VictoriaMetrics")
    eps = vm_series(server, "epsilon", session)
    return [int(steps[t]) for t in sorted(steps)], [eps[t] for t in sorted(steps)]


def influx_points(server: Server, session: str) -> dict[int, float]:
    """{step: epsilon} stored in InfluxDB 1.x database ``privacy`` for ``session``."""
    series = influxdb1_query(server, "privacy", "SELECT step, epsilon FROM privacy_training "
                                                f"WHERE session_id = '{session}'")
    return {row[1]: row[2] for row in series[0]["values"]} if series else {}


def influxdb1_with_database() -> Server:
    server = influxdb1().start()
    influxdb1_query(server, "", 'CREATE DATABASE "privacy"')
    return server


def latest_point(server: Server, kind: str, session: str,
                 count: int) -> list[tuple[int, float, int]]:
    """Every (step, epsilon, epsilon_exact) stored at the newest time of ``session``, once the
    ``count`` points written are there."""
    if kind == "v1":
        series = influxdb1_query(server, "privacy",
                                 "SELECT step, epsilon, epsilon_exact FROM privacy_training "
                                 f"WHERE session_id = '{session}' ORDER BY time DESC LIMIT 1")
        return [(row[1], row[2], row[3]) for row in series[0]["values"]]
    # VictoriaMetrics keeps every sample it gets, one series per field, and returns them all;
    # acknowledged samples become visible a little later.
    def arrived():
        rows = {field: victoria_metrics_export(
            server, f'{{__name__="privacy_training_{field}",session_id="{session}"}}')
            for field in ("step", "epsilon", "epsilon_exact")}
        complete = all(len(r) == 1 and len(r[0]["timestamps"]) == count for r in rows.values())
        return complete and rows
    rows = wait_for(arrived, 60, what=f"{count} points in VictoriaMetrics")
    samples = {}
    for field, [row] in rows.items():
        newest = max(row["timestamps"])
        samples[field] = [v for t, v in zip(row["timestamps"], row["values"]) if t == newest]
    return [(int(step), eps, int(exact)) for step, eps, exact in
            zip(samples["step"], samples["epsilon"], samples["epsilon_exact"], strict=True)]


# -- the exporter alone ---------------------------------------------------------------------------

def test_points_reach_victoria_metrics_over_the_v2_write_api():
    server = victoria_metrics().start()
    try:
        exporter = InfluxDBExporter(server.url, org="ml", bucket="privacy", token="t0ken")
        export(exporter, [snapshot(k) for k in range(1, 21)], "vm")
        assert (exporter.written, exporter.dropped) == (20, 0)
        steps, eps = vm_points(server, "vm", 20)
        assert steps == list(range(1, 21))
        assert eps == pytest.approx([0.01 * k for k in steps], rel=1e-9)  # ~12 digits kept
        labels = victoria_metrics_export(server, '{__name__="privacy_training_step"}')[0]["metric"]
        assert labels == {"__name__": "privacy_training_step", "session_id": "vm",
                          "model_name": "mlp", "rank": "0", "accountant": "rdp"}
        assert set(vm_series(server, "clipped_fraction", "vm").values()) == {0.25}
    finally:
        server.stop()


def test_points_reach_influxdb_1x_over_the_v1_write_api_with_a_retention_policy():
    server = influxdb1_with_database()
    try:
        influxdb1_query(server, "privacy",
                        'CREATE RETENTION POLICY "week" ON "privacy" DURATION 7d REPLICATION 1')
        exporter = InfluxDBExporter(server.url, api="v1", database="privacy",
                                    retention_policy="week")
        export(exporter, [snapshot(k) for k in range(1, 21)], "v1")
        assert (exporter.written, exporter.dropped) == (20, 0)
        series = influxdb1_query(
            server, "privacy", 'SELECT step, epsilon, steps_accounted, clipped_fraction '
            'FROM "privacy"."week"."privacy_training" WHERE session_id = \'v1\' '
            "AND accountant = 'rdp' AND \"rank\" = '0'")
        rows = series[0]["values"]
        assert [row[1:] for row in rows] == [[k, 0.01 * k, k, 0.25] for k in range(1, 21)]
        assert influxdb1_query(server, "privacy", "SELECT * FROM privacy_training") == []
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["v1", "vm"])
def test_the_newest_point_of_a_step_holds_its_newest_value(kind):
    """An upper bound first, the exact value for the same step later: reading the newest point
    must give one point, the exact one, on a server that merges points (InfluxDB) and on one
    that keeps every sample (VictoriaMetrics)."""
    server = influxdb1_with_database() if kind == "v1" else victoria_metrics().start()
    try:
        exporter = (InfluxDBExporter(server.url, api="v1", database="privacy") if kind == "v1"
                    else InfluxDBExporter(server.url, org="ml", bucket="privacy"))
        bounds = [snapshot(k, epsilon=0.02 * k, exact=0) for k in range(1, 9)]
        export(exporter, [*bounds, dataclasses.replace(bounds[-1], epsilon=0.1, epsilon_exact=1)],
               "newest")
        assert (exporter.written, exporter.dropped) == (9, 0)
        assert latest_point(server, kind, "newest", 9) == [(8, 0.1, 1)]
    finally:
        server.stop()


def test_v2_exporter_against_influxdb_1x_is_one_clear_error(caplog):
    server = influxdb1().start()
    try:
        exporter = InfluxDBExporter(server.url, org="ml", bucket="privacy",
                                    token="s3cret-t0ken", **QUICK)
        caplog.set_level(logging.DEBUG)
        export(exporter, [snapshot(k) for k in range(1, 17)], "wrong-api")
        ours = [r for r in caplog.records if r.name.startswith("privacy_callbacks")]
        errors = [r.getMessage() for r in ours if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert server.url in errors[0] and "API v2" in errors[0] and "use api='v1'" in errors[0]
        assert (exporter.written, exporter.dropped) == (0, 16)
        assert "s3cret-t0ken" not in caplog.text
    finally:
        server.stop()


def test_v1_missing_database_is_one_clear_error(caplog):
    server = influxdb1().start()
    try:
        exporter = InfluxDBExporter(server.url, api="v1", database="nope", **QUICK)
        export(exporter, [snapshot(k) for k in range(1, 17)], "no-db")
        errors = [r.getMessage() for r in caplog.records
                  if r.name.startswith("privacy_callbacks") and r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert server.url in errors[0] and 'CREATE DATABASE "nope"' in errors[0]
        assert (exporter.written, exporter.dropped) == (0, 16)
    finally:
        server.stop()


# InfluxDB 1.x for outages: its WAL keeps every acknowledged write across a restart.
def test_an_outage_within_the_buffer_loses_nothing():
    server = influxdb1_with_database()
    exporter = InfluxDBExporter(server.url, api="v1", database="privacy", **QUICK)
    try:
        export(exporter, [snapshot(k) for k in range(1, 5)], "outage", close=False)
        wait_for(lambda: exporter.written == 4, 30, what="points before the outage")
        server.stop()
        for k in range(5, 25):
            exporter.export(snapshot(k))
        wait_for(lambda: exporter.retried >= 2, 30, what="the exporter to notice the outage")
        server.start()
        for k in range(25, 33):
            exporter.export(snapshot(k))
        wait_for(lambda: exporter.written == 32, 30, what="the points kept through the outage")
        exporter.close(timeout=10.0)
        assert (exporter.written, exporter.dropped) == (32, 0)
        assert influx_points(server, "outage") == {k: 0.01 * k for k in range(1, 33)}
    finally:
        exporter.close(timeout=0.0)
        server.stop()


def test_an_outage_with_a_tiny_buffer_counts_every_drop_and_keeps_the_newest():
    server = influxdb1_with_database()
    exporter = InfluxDBExporter(server.url, api="v1", database="privacy", buffer_size=3,
                                batch_size=2, **QUICK)
    try:
        export(exporter, [snapshot(k) for k in range(1, 4)], "tiny", close=False)
        wait_for(lambda: exporter.written == 3, 30, what="points before the outage")
        server.stop()
        for k in range(4, 33):
            exporter.export(snapshot(k))
        wait_for(lambda: exporter.retried >= 2, 30, what="the exporter to notice the outage")
        server.start()
        exporter.close(timeout=10.0)
        assert exporter.dropped > 0 and exporter.written + exporter.dropped == 32
        # A write that failed as the server went down may still have reached it: the server
        # holds at least the written points, and the newest one.
        points = influx_points(server, "tiny")
        assert len(points) >= exporter.written and {30, 31, 32} <= set(points)
    finally:
        exporter.close(timeout=0.0)
        server.stop()


# -- a real fit ---------------------------------------------------------------------------------

def test_a_fit_writes_every_step_with_opacus_epsilon_to_victoria_metrics():
    server = victoria_metrics().start()
    try:
        exporter = InfluxDBExporter(server.url, org="ml", bucket="privacy", token="t0ken")
        monitor = PrivacyMonitor(delta=DELTA, target_epsilon=8.0, exporters=[exporter],
                                 session_id="vm", model_name="mlp")
        model = DPModel()
        fit(model, monitor, max_epochs=2)
        steps, eps = vm_points(server, "vm", 16)
        assert steps == list(range(1, 17))
        expected = opacus_epsilons(model, 16)
        assert eps == pytest.approx([expected[s] for s in steps], rel=1e-9)
        assert (exporter.written, exporter.dropped) == (16, 0)
        remaining = vm_series(server, "budget_remaining", "vm")
        assert min(remaining.values()) == pytest.approx(8.0 - expected[16], rel=1e-9)
    finally:
        server.stop()


def test_a_fit_writes_every_step_with_opacus_epsilon_to_influxdb_1x():
    server = influxdb1_with_database()
    try:
        exporter = InfluxDBExporter(server.url, api="v1", database="privacy")
        monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter], session_id="v1",
                                 model_name="mlp")
        model = DPModel()
        fit(model, monitor, max_epochs=2)
        series = influxdb1_query(
            server, "privacy", "SELECT step, epsilon, noise_multiplier FROM privacy_training "
            "WHERE session_id = 'v1' AND accountant = 'rdp' AND \"rank\" = '0'")
        rows = series[0]["values"]
        assert [row[1] for row in rows] == list(range(1, 17))
        expected = opacus_epsilons(model, 16)
        assert [row[2] for row in rows] == [expected[s] for s in range(1, 17)]
        assert {row[3] for row in rows} == {1.0}
        assert rows[-1][2] == model.privacy_engine.accountant.get_epsilon(DELTA)
        assert exporter.dropped == 0
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["v1", "vm"])
def test_latest_point_of_a_prv_fit_holds_the_exact_final_epsilon(kind):
    """PRV publishes upper bounds until the exact epsilon is known; the exact value for the last
    step comes later: the newest point must be one point, holding it, labelled exact."""
    server = influxdb1_with_database() if kind == "v1" else victoria_metrics().start()
    try:
        exporter = (InfluxDBExporter(server.url, api="v1", database="privacy", **QUICK)
                    if kind == "v1" else
                    InfluxDBExporter(server.url, org="ml", bucket="privacy", token="t0ken",
                                     **QUICK))
        monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter], session_id="prv")
        model = DPModel(accountant="prv")
        fit(model, monitor)
        assert exporter.dropped == 0
        assert exporter.written > 8, "no bound was replaced: nothing tested"
        final = model.privacy_engine.accountant.get_epsilon(DELTA)
        [(step, eps, exact)] = latest_point(server, kind, "prv", exporter.written)
        assert (step, exact) == (8, 1)
        assert eps == pytest.approx(final, rel=1e-9)  # VictoriaMetrics: ~12 digits
    finally:
        server.stop()


class AtStep(pl.Callback):
    """Runs ``action`` once, after optimizer step ``step``."""

    def __init__(self, step: int, action) -> None:
        self.step, self.action, self.done = step, action, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.done and trainer.global_step == self.step:
            self.done = True
            self.action()


def test_drops_of_a_fit_reach_prometheus():
    server = influxdb1_with_database()
    try:
        exporter = InfluxDBExporter(server.url, api="v1", database="privacy", buffer_size=3,
                                    batch_size=2, **QUICK)
        prometheus = PrometheusExporter(serve=False)
        monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter, prometheus],
                                 session_id="tiny")

        def down():
            wait_for(lambda: exporter.written >= 2, 60, what="points before the outage")
            server.stop()

        def up():
            wait_for(lambda: exporter.retried > 0, 60, what="the exporter to notice the outage")
            server.start()
        fit(DPModel(n=512, batch_size=32), monitor, AtStep(4, down), AtStep(16, up),
            max_epochs=2)
        assert exporter.dropped > 0 and exporter.written + exporter.dropped == 32
        assert prometheus.registry.get_sample_value(
            "privacy_export_dropped_total",
            {"session_id": "tiny", "model_name": "DPModel", "exporter": "influxdb"},
        ) == exporter.dropped
    finally:
        server.stop()


CHILD = textwrap.dedent("""
    import os, signal, socket, sys, time, warnings
    import lightning.pytorch as pl
    from dp_models import DPModel, fit
    from privacy_callbacks import InfluxDBExporter, PrivacyMonitor

    url, pid, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def refused():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return False
        except OSError:
            return True

    class KillServer(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                os.kill(pid, signal.SIGTERM)
                while not refused():
                    time.sleep(0.1)

        def on_train_end(self, trainer, pl_module):
            print("TRAIN_END", time.time(), flush=True)

    exporter = InfluxDBExporter(url, org="ml", bucket="privacy")  # the default retries
    monitor = PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="gone")
    fit(DPModel(), monitor, KillServer(), max_epochs=2)
    print("COUNTS", exporter.written, exporter.dropped, flush=True)
""")


def test_process_exits_within_the_bound_when_the_server_never_comes_back(tmp_path):
    server = victoria_metrics().start()
    try:
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        proc = subprocess.run([sys.executable, str(script), server.url, str(server.proc.pid),
                               str(server.port)], env=env, capture_output=True, text=True,
                              timeout=280)
        exited = time.time()
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
        written, dropped = map(int, lines["COUNTS"].split())
        assert dropped > 0 and written + dropped == 16
        # Bounded by close_timeout (10 s) plus interpreter shutdown; the client's own batching
        # writer waits for its retries (up to 180 s) and then up to 300 s in close().
        assert exited - float(lines["TRAIN_END"]) < 40, proc.stderr[-3000:]
        assert "not written to InfluxDB" in proc.stderr
    finally:
        server.stop()
