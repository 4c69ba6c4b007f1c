"""/metrics behind TLS (mutual) and basic auth, scraped by a real Prometheus."""

from __future__ import annotations

import base64
import json
import logging
import ssl
import urllib.error
import urllib.request

import pytest

from privacy_callbacks import PrometheusExporter
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
        exporter.families["privacy_epsilon_consumed"].labels(
            session_id="tls", model_name="m", accountant="rdp").set(1.25)
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
