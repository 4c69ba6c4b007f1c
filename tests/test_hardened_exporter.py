"""/metrics behind TLS (mutual) and basic auth, scraped by a real Prometheus."""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import time
import urllib.error
import urllib.request

import lightning.pytorch as pl
import pytest

from dp_models import DPModel, fit
from privacy_callbacks import PrivacyMonitor, PrivacySnapshot, PrometheusExporter
from privacy_callbacks.exporters.base import RunInfo
from servers import free_port, http_get, new_workdir, prometheus, prometheus_query, tls_files, \
    wait_for

pytestmark = pytest.mark.servers

PASSWORD = "s3cret-scrape-pw"


def scrape_config(port: int, files: dict) -> str:
    tls = (f"tls_config: {{ca_file: {files['ca.pem']}, cert_file: {files['client.pem']}, "
           f"key_file: {files['client.key']}}}")
    return f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: secure
    scheme: https
    basic_auth: {{username: prom, password: {PASSWORD}}}
    {tls}
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
  - job_name: anonymous
    scheme: https
    {tls}
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
"""


def get(url: str, context: ssl.SSLContext, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_prometheus_scrapes_over_mutual_tls_with_basic_auth(caplog):
    files = tls_files(new_workdir("tls"))
    port = free_port()
    exporter = PrometheusExporter(port=port, tls_certfile=files["server.pem"],
                                  tls_keyfile=files["server.key"],
                                  tls_client_cafile=files["ca.pem"],
                                  basic_auth=("prom", PASSWORD))
    server = prometheus(scrape_config(port, files))
    with caplog.at_level(logging.DEBUG):
        exporter.start()
    try:
        assert exporter.url == f"https://127.0.0.1:{port}/metrics"
        exporter.open(RunInfo(session_id="tls", model_name="m", accountant="rdp"))
        exporter.export(PrivacySnapshot(
            step=1, timestamp_ns=0, accountant="rdp", delta=1e-5, epsilon=1.25, epsilon_step=1,
            noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, noise_std=0.1,
            throughput=None, step_seconds=None, accounting_errors=0))
        server.start()

        def scraped():
            result = prometheus_query(server, 'privacy_epsilon_consumed{job="secure"}')
            return result and float(result[0]["value"][1]) == 1.25

        wait_for(scraped, 60, what="Prometheus to scrape over TLS with basic auth")

        def refused():
            status, body = http_get(f"{server.url}/api/v1/targets")
            targets = json.loads(body)["data"]["activeTargets"]
            anonymous = [t for t in targets if t["labels"]["job"] == "anonymous"]
            return anonymous and anonymous[0]["health"] == "down" and anonymous[0]["lastError"]

        assert "401" in wait_for(refused, 60, what="the anonymous scrape to be refused")

        client = ssl.create_default_context(cafile=str(files["ca.pem"]))
        client.load_cert_chain(str(files["client.pem"]), str(files["client.key"]))
        assert get(exporter.url, client) == 401
        assert get(exporter.url, client, auth="prom:wrong") == 401
        assert get(exporter.url, client, auth=f"prom:{PASSWORD}") == 200
        no_client_cert = ssl.create_default_context(cafile=str(files["ca.pem"]))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            get(exporter.url, no_client_cert, auth=f"prom:{PASSWORD}")
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP, TLS port
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        server.stop()
        exporter.close()
    assert PASSWORD not in repr(exporter) and "prom" in repr(exporter)
    assert not [r for r in caplog.records if PASSWORD in r.getMessage()]


def test_basic_auth_without_tls_on_loopback():
    exporter = PrometheusExporter(port=0, basic_auth=("u", "pw-plain"))
    exporter.start()
    try:
        assert exporter.url.startswith("http://127.0.0.1:")
        assert http_get(exporter.url)[0] == 401
        request = urllib.request.Request(exporter.url, headers={
            "Authorization": "Basic " + base64.b64encode(b"u:pw-plain").decode()})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200 and b"privacy_epsilon_consumed" in resp.read()
        # Refused before the run's labels are known, then after: all land in its series.
        exporter.open(RunInfo(session_id="s", model_name="m", accountant="rdp"))
        assert get(exporter.url, ssl.create_default_context(), auth="u:wrong") == 401
        value = exporter.registry.get_sample_value("authentication_failures_total",
                                                   {"session_id": "s", "model_name": "m"})
        assert value == exporter.authentication_failures == 2
    finally:
        exporter.close()


# The start of a TLS 1.2 ClientHello record that never gets its body: the server waits for it.
PARTIAL_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def test_scrape_answered_while_idle_and_half_open_clients_hold_connections():
    """Idle TCP clients and stalled TLS handshakes hold connections open during a fit; a scrape
    with the right credentials still gets its answer (prometheus_client's own TLS server stops
    answering in this situation)."""
    files = tls_files(new_workdir("tls-idle"))
    exporter = PrometheusExporter(port=0, tls_certfile=files["server.pem"],
                                  tls_keyfile=files["server.key"], basic_auth=("prom", PASSWORD))
    monitor = PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="idle",
                             model_name="mlp")
    client = ssl.create_default_context(cafile=str(files["ca.pem"]))
    auth = "Basic " + base64.b64encode(f"prom:{PASSWORD}".encode()).decode()
    held: list[socket.socket] = []
    scraped: list[bytes] = []

    class HoldConnections(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step != 3:
                return
            monitor._publisher.flush()
            port = int(exporter.url.rsplit(":", 1)[1].split("/")[0])
            for i in range(45):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                held.append(sock)
                if i >= 40:
                    sock.sendall(PARTIAL_CLIENT_HELLO)
            request = urllib.request.Request(exporter.url, headers={"Authorization": auth})
            started = time.monotonic()
            # A server that stopped answering fails here (timeout), or at the bound below.
            with urllib.request.urlopen(request, context=client, timeout=10) as resp:
                assert resp.status == 200
                scraped.append(resp.read())
            assert time.monotonic() - started < 10, "the scrape hung behind idle clients"

    try:
        fit(DPModel(), monitor, HoldConnections())
    finally:
        for sock in held:
            sock.close()
    assert len(held) == 45
    line = (b'privacy_epsilon_step{accountant="rdp",model_name="mlp",session_id="idle"} 3.0')
    assert scraped and line in scraped[0].splitlines()


@pytest.mark.parametrize("kwargs,match", [
    ({"tls_certfile": "/nonexistent/cert.pem"}, "both tls_certfile and tls_keyfile"),
    ({"tls_certfile": "/nonexistent/c.pem", "tls_keyfile": "/nonexistent/k.pem"},
     "tls_certfile: '/nonexistent/c.pem' is not a file"),
    ({"basic_auth": ("user", "")}, "basic_auth"),
    ({"basic_auth": ("us:er", "hunter2-pw")}, "basic_auth"),
])
def test_bad_hardening_arguments_are_clear_and_never_echo_the_password(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        PrometheusExporter(port=0, **kwargs)
    assert "hunter2" not in str(err.value)


def test_unusable_certificate_is_a_clear_error(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    exporter = PrometheusExporter(port=0, tls_certfile=cert, tls_keyfile=key)
    with pytest.raises(ValueError, match="cannot use the TLS files"):
        exporter.start()
    exporter.close()
