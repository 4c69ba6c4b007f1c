"""InfluxDBExporter against real servers: VictoriaMetrics (v2 write), InfluxDB 1.6 (v1), outages."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
from opacus.accountants import RDPAccountant

from dp_models import DPModel
from privacy_callbacks import InfluxDBExporter, PrivacyMonitor, PrometheusExporter
from servers import (Server, influxdb1, influxdb1_query, victoria_metrics,
                     victoria_metrics_export, wait_for)

pytestmark = pytest.mark.servers

DELTA = 1e-5
ROOT = Path(__file__).resolve().parent.parent
# Fast retries so an outage of a few seconds is ridden out inside one write's retry budget.
QUICK = {"flush_interval": 0.1, "retry_interval": 0.2}


def fit(model: DPModel, monitor: PrivacyMonitor, *callbacks: pl.Callback, epochs: int = 2) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=epochs, callbacks=[monitor, *callbacks], logger=False,
                   enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False).fit(model)


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
    """{step: value} of ``privacy_training_<field>`` for ``session``, keyed by timestamp order."""
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
    stamps = sorted(steps)
    return [int(steps[t]) for t in stamps], [eps[t] for t in stamps]


def influx_points(server: Server, session: str) -> dict[int, float]:
    """{step: epsilon} stored in InfluxDB 1.x database ``privacy`` for ``session``."""
    series = influxdb1_query(server, "privacy", "SELECT step, epsilon FROM privacy_training "
                                                f"WHERE session_id = '{session}'")
    return {row[1]: row[2] for row in series[0]["values"]} if series else {}


def influxdb1_with_database() -> Server:
    server = influxdb1().start()
    influxdb1_query(server, "", 'CREATE DATABASE "privacy"')
    return server


class AtStep(pl.Callback):
    """Runs ``action`` once, after optimizer step ``step``."""

    def __init__(self, step: int, action) -> None:
        self.step, self.action, self.done = step, action, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.done and trainer.global_step == self.step:
            self.done = True
            self.action()


def test_victoria_metrics_gets_every_step_with_opacus_epsilon():
    server = victoria_metrics().start()
    try:
        exporter = InfluxDBExporter(server.url, org="ml", bucket="privacy", token="t0ken")
        monitor = PrivacyMonitor(delta=DELTA, target_epsilon=8.0, exporters=[exporter],
                                 session_id="vm", model_name="mlp")
        model = DPModel()
        fit(model, monitor)
        steps, eps = vm_points(server, "vm", 16)
        assert steps == list(range(1, 17))
        expected = opacus_epsilons(model, 16)
        # VictoriaMetrics keeps ~12 significant digits.
        assert eps == pytest.approx([expected[s] for s in steps], rel=1e-9)
        assert (exporter.written, exporter.dropped) == (16, 0)
        labels = victoria_metrics_export(server, '{__name__="privacy_training_step"}')[0]["metric"]
        assert labels == {"__name__": "privacy_training_step", "session_id": "vm",
                          "model_name": "mlp", "rank": "0", "accountant": "rdp"}
        remaining = vm_series(server, "budget_remaining", "vm")
        assert sorted(remaining.values())[0] == pytest.approx(8.0 - expected[16], rel=1e-9)
    finally:
        server.stop()


def test_influxdb_1x_with_api_v1_gets_every_step():
    server = influxdb1_with_database()
    try:
        exporter = InfluxDBExporter(server.url, api="v1", database="privacy")
        monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter], session_id="v1",
                                 model_name="mlp")
        model = DPModel()
        fit(model, monitor)
        series = influxdb1_query(
            server, "privacy",
            "SELECT step, epsilon, noise_multiplier FROM privacy_training "
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
        fit(model, monitor, epochs=1)
        assert exporter.dropped == 0
        assert exporter.written > 8, "no bound was replaced: nothing tested"
        final = model.privacy_engine.accountant.get_epsilon(DELTA)
        latest = latest_point(server, kind, "prv", exporter.written)
        assert len(latest) == 1, f"{len(latest)} points at the newest time: {latest}"
        [(step, eps, exact)] = latest
        assert (step, exact) == (8, 1)
        assert eps == pytest.approx(final, rel=1e-9)  # VictoriaMetrics: ~12 digits
    finally:
        server.stop()


def test_v2_client_against_influxdb_1x_is_one_clear_error(caplog):
    server = influxdb1().start()
    try:
        exporter = InfluxDBExporter(server.url, org="ml", bucket="privacy",
                                    token="s3cret-t0ken", **QUICK)
        monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter], session_id="wrong-api")
        caplog.set_level(logging.DEBUG)
        fit(DPModel(), monitor)
        ours = [r for r in caplog.records if r.name.startswith("privacy_callbacks.exporters")]
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
        monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter], session_id="no-db")
        fit(DPModel(), monitor)
        errors = [r.getMessage() for r in caplog.records
                  if r.name.startswith("privacy_callbacks") and r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert server.url in errors[0] and 'CREATE DATABASE "nope"' in errors[0]
        assert exporter.dropped == 16
    finally:
        server.stop()


def outage(server: Server, exporter: InfluxDBExporter, down_at: int, up_at: int):
    """Callbacks that stop ``server`` after step ``down_at`` (once some points arrived) and, once
    the exporter has seen the outage, restart it after step ``up_at``."""
    def down():
        wait_for(lambda: exporter.written >= 2, 60, what="points before the outage")
        server.stop()

    def up():
        wait_for(lambda: exporter.retried > 0 or exporter.dropped > 0, 60,
                 what="the exporter to notice the outage")
        server.start()
    return AtStep(down_at, down), AtStep(up_at, up)


# InfluxDB 1.x for outages: its WAL keeps every acknowledged write across a restart.
def test_outage_shorter_than_retry_budget_loses_nothing():
    server = influxdb1_with_database()
    try:
        exporter = InfluxDBExporter(server.url, api="v1", database="privacy", **QUICK)
        monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter], session_id="outage")
        model = DPModel(n=512, batch_size=32)
        fit(model, monitor, *outage(server, exporter, 4, 12))
        assert exporter.retried > 0
        assert (exporter.written, exporter.dropped) == (32, 0)
        points = influx_points(server, "outage")
        assert sorted(points) == list(range(1, 33))
        expected = opacus_epsilons(model, 32)
        assert points == expected
    finally:
        server.stop()


def test_outage_with_a_tiny_buffer_counts_every_drop():
    server = influxdb1_with_database()
    try:
        exporter = InfluxDBExporter(server.url, api="v1", database="privacy", buffer_size=3,
                                    batch_size=2, **QUICK)
        prometheus = PrometheusExporter(serve=False)
        monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter, prometheus],
                                 session_id="tiny")
        fit(DPModel(n=512, batch_size=32), monitor, *outage(server, exporter, 4, 16))
        assert exporter.dropped > 0
        assert exporter.written + exporter.dropped == 32
        # A write that failed as the server went down may still have reached it: the server
        # holds at least the written points, and the newest one.
        points = influx_points(server, "tiny")
        assert len(points) >= exporter.written and 32 in points
        assert prometheus.registry.get_sample_value(
            "privacy_export_dropped_total",
            {"session_id": "tiny", "model_name": "DPModel", "exporter": "influxdb"},
        ) == exporter.dropped
    finally:
        server.stop()


CHILD = textwrap.dedent("""
    import os, signal, socket, sys, time, warnings
    import lightning.pytorch as pl
    from dp_models import DPModel
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

    exporter = InfluxDBExporter(url, org="ml", bucket="privacy")  # the client's default retries
    monitor = PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="gone")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=2, callbacks=[monitor, KillServer()], logger=False,
                   enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False).fit(DPModel())
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
        # Bounded by close_timeout (10 s) plus interpreter shutdown; the client alone waits for
        # its retries (up to 180 s) and then up to 300 s in close().
        assert exited - float(lines["TRAIN_END"]) < 40, proc.stderr[-3000:]
        assert "not written to InfluxDB" in proc.stderr
    finally:
        server.stop()
