"""InfluxDBExporter against an in-process HTTP endpoint: what it sends, outages, bounds, logging.

Real servers (InfluxDB 1.6, VictoriaMetrics) are in test_influxdb_server.py.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.server
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Iterator

import pytest

from privacy_callbacks import PrivacySnapshot
from privacy_callbacks.catalog import INFLUX_MEASUREMENT, INFLUX_STEP_FIELD, METRICS
from privacy_callbacks.exporters.base import RunInfo
from privacy_callbacks.exporters.influxdb import InfluxDBExporter
from servers import free_port, wait_for

V2 = {"org": "ml", "bucket": "privacy"}
RUN = RunInfo(session_id="run-1", model_name="mlp", accountant="prv")
ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    lines: list[str]


class Endpoint:
    """An HTTP server on 127.0.0.1 recording each write; ``answer`` picks the status code."""

    def __init__(self, answer: Callable[[], int] = lambda: 204) -> None:
        self.answer, self.requests = answer, []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                status = endpoint.answer()
                if status < 300:
                    url = urllib.parse.urlsplit(self.path)
                    endpoint.requests.append(Request(
                        url.path, dict(urllib.parse.parse_qsl(url.query)),
                        dict(self.headers), body.split("\n")))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="privacy-test-http")

    @property
    def lines(self) -> list[str]:
        return [line for request in self.requests for line in request.lines]

    def __enter__(self) -> Endpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@contextlib.contextmanager
def running(exporter: InfluxDBExporter, timeout: float = 5.0) -> Iterator[InfluxDBExporter]:
    exporter.start()
    exporter.open(RUN)
    try:
        yield exporter
    finally:
        exporter.close(timeout)


def snapshot(step: int, epsilon: float = 0.5, exact: int = 1, **values: object) -> PrivacySnapshot:
    return PrivacySnapshot(step=step, timestamp_ns=step * 10**9, accountant="prv", delta=1e-5,
                           epsilon=epsilon, epsilon_step=step, epsilon_exact=exact,
                           session_steps=step, **values)  # type: ignore[arg-type]


def fields(line: str) -> dict[str, str]:
    """The field set of one line of line protocol (no spaces or commas in our values)."""
    return dict(item.split("=", 1) for item in line.split(" ")[1].split(","))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"url": "http://localhost:8086", "org": "ml"}, "bucket"),
    ({"url": "http://localhost:8086", "bucket": "privacy"}, "org"),
    ({"url": "http://localhost:8086", "api": "v1"}, "database"),
    ({"url": "http://localhost:8086", "api": "v3", **V2}, "api"),
    ({"url": "localhost:8086", **V2}, "Unexpected value for url: 'localhost:8086'"),
    ({"url": "http://localhost:80x6", **V2}, "Unexpected value for url"),
    ({"url": "ftp://localhost:8086", **V2}, "Unexpected value for url"),
    ({"url": "http://localhost:8086/?db=x", **V2}, "Unexpected value for url"),
    ({"url": "", **V2}, "url"),
    ({"url": None, **V2}, "url: None"),
    ({"url": "http://localhost:8086", "database": "privacy", **V2}, "api='v2'"),
    ({"url": "http://localhost:8086", "api": "v1", "database": "db", "bucket": "b"}, "api='v1'"),
    ({"url": "http://localhost:8086", "api": "v1", "database": "db", "username": "u"},
     "username and password"),
    ({"url": "http://localhost:8086", "buffer_size": 0, **V2}, "buffer_size: 0"),
    ({"url": "http://localhost:8086", "batch_size": 1.5, **V2}, "batch_size: 1.5"),
    ({"url": "http://localhost:8086", "close_timeout": float("inf"), **V2}, "close_timeout"),
    ({"url": "http://localhost:8086", "retry_interval": -1, **V2}, "retry_interval: -1"),
    ({"url": "http://localhost:8086", "max_retry_delay": 0, **V2}, "max_retry_delay: 0"),
    ({"url": "http://localhost:8086", "request_timeout": True, **V2}, "request_timeout: True"),
])
def test_bad_input_fails_at_construction_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        InfluxDBExporter(**kwargs)


def test_secrets_stay_out_of_errors_repr_and_logs(caplog):
    with pytest.raises(ValueError) as excinfo:
        InfluxDBExporter("http://admin:hunter2@localhost:8086", **V2)
    assert "hunter2" not in str(excinfo.value)
    with pytest.raises(ValueError) as excinfo:
        InfluxDBExporter("http://localhost:8086", api="v1", database="db", token="tok-hunter2")
    assert "hunter2" not in str(excinfo.value)
    caplog.set_level(logging.DEBUG)
    with Endpoint(lambda: 401) as endpoint:
        for exporter in (InfluxDBExporter(endpoint.url, token="tok-hunter2", **V2),
                         InfluxDBExporter(endpoint.url, api="v1", database="privacy",
                                          username="admin", password="pw-hunter2")):
            with running(exporter):
                exporter.export(snapshot(1))
            assert "hunter2" not in repr(exporter)
    assert "hunter2" not in caplog.text and "HTTP 401" in caplog.text


@pytest.mark.parametrize("api", ["v2", "v1"])
def test_each_write_names_its_target_and_credentials(api):
    where = (dict(token="t0ken", **V2) if api == "v2" else
             dict(api="v1", database="privacy", retention_policy="week", username="writer",
                  password="pw"))
    with Endpoint() as endpoint:
        with running(InfluxDBExporter(endpoint.url, flush_interval=0.05, **where)) as exporter:
            exporter.export(snapshot(1))
            wait_for(lambda: endpoint.requests, 10, what="a write")
        [request] = endpoint.requests
    if api == "v2":
        assert (request.path, request.query) == (
            "/api/v2/write", {"org": "ml", "bucket": "privacy", "precision": "ns"})
        assert request.headers["Authorization"] == "Token t0ken"
    else:
        assert (request.path, request.query) == (
            "/write", {"db": "privacy", "rp": "week", "precision": "ns"})
        assert request.headers["Authorization"] == "Basic " + base64.b64encode(
            b"writer:pw").decode()
    assert (exporter.written, exporter.dropped) == (1, 0)


def test_every_catalog_field_is_written_with_one_type():
    """A field keeps its first type in InfluxDB: an integer field must never get a float."""
    declared = {f.name for f in dataclasses.fields(PrivacySnapshot)}
    extra = {m.attr: 0.25 for m in METRICS if m.field and m.attr not in declared}
    full = snapshot(3, budget_remaining=1.5, target_epsilon=2, epsilon_forecast=1.0,
                    budget_exhaustion_steps=7, noise_multiplier=1.0, max_grad_norm=1.0,
                    sample_rate=0.01, noise_std=0.1, throughput=100.0, step_seconds=0.01,
                    budget_exhausted=0, membership_inference_risk=0.1, extra=extra)
    with Endpoint() as endpoint:
        with running(InfluxDBExporter(endpoint.url, **V2)) as exporter:
            exporter.export(full)
            exporter.export(snapshot(4, budget_exhaustion_steps=6.0))  # an int given as float
    first, second = endpoint.lines
    assert first.startswith(f"{INFLUX_MEASUREMENT},accountant=prv,model_name=mlp,rank=0,"
                            "session_id=run-1 ")
    assert first.endswith(f" {3 * 10**9}")
    written = fields(first)
    assert set(written) == {m.field for m in METRICS if m.field} | {INFLUX_STEP_FIELD}
    integers = {name for name, value in written.items() if value.endswith("i")}
    assert integers == {"epsilon_step", "epsilon_exact", "budget_exhaustion_steps",
                        "steps_accounted", "budget_exhausted", INFLUX_STEP_FIELD}
    assert written["epsilon_target"] == "2" and written["clipped_fraction"] == "0.25"
    assert fields(second)["budget_exhaustion_steps"] == "6i"
    assert "throughput" not in fields(second)  # no value: no field


def test_a_newer_value_for_a_step_is_a_later_point():
    """The exact epsilon replacing a step's bound comes with the step's time; written at that
    time, a server keeping every sample would hold both and could return the bound."""
    bound = snapshot(1, epsilon=0.5, exact=0)
    exact = dataclasses.replace(bound, epsilon=0.3, epsilon_exact=1)
    with Endpoint() as endpoint:
        with running(InfluxDBExporter(endpoint.url, **V2)) as exporter:
            for snap in (bound, exact, exact, snapshot(2, epsilon=0.6, exact=0)):
                exporter.export(snap)
    lines = endpoint.lines
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == [
        10**9, 10**9 + 10**6, 10**9 + 2 * 10**6, 2 * 10**9]
    assert fields(lines[1])["epsilon"] == "0.3" and fields(lines[1])["epsilon_exact"] == "1i"


def test_an_outage_keeps_the_newest_points_within_the_bound_and_counts_the_rest(caplog):
    up = threading.Event()
    with Endpoint(lambda: 204 if up.is_set() else 503) as endpoint:
        exporter = InfluxDBExporter(endpoint.url, buffer_size=5, batch_size=2, flush_interval=0.05,
                                    retry_interval=0.05, max_retry_delay=0.1, **V2)
        with running(exporter):
            for step in range(1, 13):
                exporter.export(snapshot(step))
            wait_for(lambda: exporter.retried >= 3, 10, what="retries")
            assert exporter.written == 0 and exporter.dropped == 7
            up.set()
            wait_for(lambda: exporter.written == 5, 10, what="the kept points")
        assert [int(fields(line)["step"][:-1]) for line in endpoint.lines] == [8, 9, 10, 11, 12]
    assert (exporter.written, exporter.dropped) == (5, 7)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("buffer full" in w for w in warnings) == 1
    assert sum("not taking writes" in w for w in warnings) == 1
    assert "privacy_export_dropped_total" in next(w for w in warnings if "buffer full" in w)


def test_close_keeps_its_bound_and_counts_every_point_when_the_server_is_down(caplog):
    exporter = InfluxDBExporter(f"http://127.0.0.1:{free_port()}", flush_interval=0.05,
                                retry_interval=0.05, **V2)
    with running(exporter, timeout=0.5):
        for step in range(1, 101):
            exporter.export(snapshot(step))
        wait_for(lambda: exporter.retried >= 2, 10, what="retries")
        began = time.monotonic()
    assert time.monotonic() - began < 1.5
    assert (exporter.written, exporter.dropped) == (0, 100)
    assert "100 privacy points were not written" in caplog.text
    exporter.export(snapshot(101))  # after close: counted, not kept
    assert exporter.dropped == 101


def test_export_never_blocks_and_close_keeps_its_bound_when_the_server_never_answers():
    """A server that takes the connection and never replies: the worst outage for a client."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # connections queue in the backlog; nobody reads them
    exporter = InfluxDBExporter(f"http://127.0.0.1:{hole.getsockname()[1]}", batch_size=10,
                                request_timeout=60, close_timeout=1.0, **V2)
    try:
        exporter.start()
        exporter.open(RUN)
        slowest = 0.0
        for step in range(1, 2001):
            began = time.perf_counter()
            exporter.export(snapshot(step))
            slowest = max(slowest, time.perf_counter() - began)
        began = time.monotonic()
        exporter.close(timeout=30.0)  # close_timeout bounds it
        closed_in = time.monotonic() - began
    finally:
        hole.close()  # resets the queued connections: the request under way ends
    assert slowest < 0.5
    assert closed_in < 2.0
    assert (exporter.written, exporter.dropped) == (0, 2000)


def test_a_refusal_is_one_error_and_drops_the_fit(caplog):
    with Endpoint(lambda: 403) as endpoint:
        with running(InfluxDBExporter(endpoint.url, flush_interval=0.05, token="t", **V2)) \
                as exporter:
            for step in range(1, 4):
                exporter.export(snapshot(step))
            wait_for(lambda: exporter.dropped == 3, 10, what="the refusal")
            exporter.export(snapshot(4))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert endpoint.url in errors[0] and "HTTP 403" in errors[0] and "check the token" in errors[0]
    assert (exporter.written, exporter.dropped) == (0, 4)


def test_a_second_fit_writes_again():
    with Endpoint() as endpoint:
        exporter = InfluxDBExporter(endpoint.url, **V2)
        for fit in range(2):
            with running(exporter):
                exporter.export(snapshot(fit + 1))
        assert len(endpoint.lines) == 2
    assert (exporter.written, exporter.dropped) == (2, 0)


def test_application_logging_configuration_is_left_alone():
    names = ("urllib3", "influxdb_client.client.write_api", "influxdb_client.client.http", "")
    levels = (logging.DEBUG, logging.INFO, logging.NOTSET, logging.ERROR)
    before = {name: logging.getLogger(name).level for name in names}
    try:
        for name, level in zip(names, levels):
            logging.getLogger(name).setLevel(level)
        exporter = InfluxDBExporter(f"http://127.0.0.1:{free_port()}", **V2)
        exporter.start()
        exporter.close(timeout=1.0)
        assert [logging.getLogger(name).level for name in names] == list(levels)
        assert logging.getLogger("influxdb_client.client.influxdb_client").level == logging.NOTSET
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def test_the_core_runs_without_the_extra_and_the_exporter_names_it():
    """influxdb-client is the ``influxdb`` extra: the monitor and Prometheus never load it, and
    without it the exporter's import error says what to install."""
    code = textwrap.dedent("""
        import sys
        sys.modules["influxdb_client"] = None  # not installed
        import privacy_callbacks.monitor, privacy_callbacks.exporters.prometheus
        try:
            from privacy_callbacks import InfluxDBExporter
        except ImportError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'privacy_callbacks[influxdb]'" in out.stdout
