"""InfluxDBExporter without a server: construction checks, secrets, logging configuration."""

from __future__ import annotations

import logging

import pytest

from privacy_callbacks import InfluxDBExporter
from privacy_callbacks.catalog import INFLUX_STEP_FIELD, METRICS
from servers import free_port

V2 = {"org": "ml", "bucket": "privacy"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"url": "http://localhost:8086", "org": "ml"}, "bucket"),
    ({"url": "http://localhost:8086", "bucket": "privacy"}, "org"),
    ({"url": "http://localhost:8086", "api": "v1"}, "database"),
    ({"url": "http://localhost:8086", "api": "v3", **V2}, "api"),
    ({"url": "localhost:8086", **V2}, "Malformed url"),
    ({"url": "http://localhost:80x6", **V2}, "Malformed url"),
    ({"url": "ftp://localhost:8086", **V2}, "Malformed url"),
    ({"url": "", **V2}, "url"),
    ({"url": "http://localhost:8086", "database": "privacy", **V2}, "api='v2'"),
    ({"url": "http://localhost:8086", "api": "v1", "database": "db", "bucket": "b"}, "api='v1'"),
    ({"url": "http://localhost:8086", "api": "v1", "database": "db", "username": "u"},
     "username and password"),
    ({"url": "http://localhost:8086", "buffer_size": 0, **V2}, "buffer_size"),
    ({"url": "http://localhost:8086", "batch_size": 1.5, **V2}, "batch_size"),
    ({"url": "http://localhost:8086", "close_timeout": float("inf"), **V2}, "close_timeout"),
    ({"url": "http://localhost:8086", "retry_interval": -1, **V2}, "retry_interval"),
])
def test_bad_input_fails_at_construction_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InfluxDBExporter(**kwargs)


def test_secrets_stay_out_of_errors_and_repr():
    with pytest.raises(ValueError) as excinfo:
        InfluxDBExporter("http://admin:hunter2@localhost:8086", **V2)
    assert "hunter2" not in str(excinfo.value)
    exporter = InfluxDBExporter("http://localhost:8086", token="tok-hunter2", **V2)
    v1 = InfluxDBExporter("http://localhost:8086", api="v1", database="privacy",
                          username="admin", password="pw-hunter2")
    assert "hunter2" not in repr(exporter) + repr(v1)


def test_fields_come_from_the_catalog():
    exporter = InfluxDBExporter("http://localhost:8086", **V2)
    fields = {field for _, field, _ in exporter._fields}
    assert fields == {m.field for m in METRICS if m.field and m.attr}
    assert INFLUX_STEP_FIELD not in fields
    types = {field: cast for _, field, cast in exporter._fields}
    assert types["epsilon"] is float and types["steps_accounted"] is int


def test_application_logging_configuration_is_left_alone():
    names = ("urllib3", "influxdb_client.client.write_api", "influxdb_client.client.http")
    before = {}
    for i, name in enumerate(names):
        logging.getLogger(name).setLevel((logging.DEBUG, logging.INFO, logging.NOTSET)[i])
        before[name] = logging.getLogger(name).level
    try:
        exporter = InfluxDBExporter(f"http://127.0.0.1:{free_port()}", **V2)
        exporter.start()
        exporter.close(timeout=1.0)
        assert {name: logging.getLogger(name).level for name in names} == before
        assert logging.getLogger("influxdb_client.client.influxdb_client").level == logging.NOTSET
    finally:
        for name in names:
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_a_newer_value_for_a_step_is_a_later_point():
    """The exact epsilon replacing a step's bound comes with the step's time; written at that
    time, a server keeping every sample would hold both and could return the bound."""
    import dataclasses

    from privacy_callbacks import PrivacySnapshot
    from privacy_callbacks.exporters.base import RunInfo

    def snapshot(step: int, epsilon: float, exact: int) -> PrivacySnapshot:
        return PrivacySnapshot(
            step=step, timestamp_ns=step * 10**9, accountant="prv", delta=1e-5,
            epsilon=epsilon, epsilon_step=step, epsilon_exact=exact, steps=step,
            noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, noise_std=0.1,
            throughput=None, step_seconds=None, accounting_errors=0)

    exporter = InfluxDBExporter(f"http://127.0.0.1:{free_port()}", flush_interval=60.0, **V2)
    exporter.start()
    try:
        exporter.open(RunInfo(session_id="s", model_name="m", accountant="prv"))
        bound = snapshot(1, 0.5, 0)
        for snap in (bound, dataclasses.replace(bound, epsilon=0.3, epsilon_exact=1),
                     dataclasses.replace(bound, epsilon=0.3, epsilon_exact=1),
                     snapshot(2, 0.6, 0)):
            exporter.export(snap)
        lines = [line.decode() for line in exporter._buffer]
    finally:
        exporter.close(timeout=0.0)
    stamps = [int(line.rsplit(" ", 1)[1]) for line in lines]
    assert stamps == [10**9, 10**9 + 10**6, 10**9 + 2 * 10**6, 2 * 10**9]
    assert "epsilon=0.3" in lines[1] and "epsilon_exact=1i" in lines[1]
