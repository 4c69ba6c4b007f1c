"""Real servers from Debian packages, started on free loopback ports in temp dirs.

A missing binary fails the test with the Debian package to install: CI installs them all, so a
skip would hide a broken set-up.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"`{binary}` not found: install the Debian package `{package}` "
                    f"(apt-get install -y {package}); .ci/run does this", pytrace=False)
    return path


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2,
             what: str = "condition") -> object:
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # server not up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"Timed out after {timeout:.0f} s waiting for {what}"
                         + (f" (last error: {last_exc})" if last_exc else ""))


@dataclass
class Server:
    """A server process on 127.0.0.1:``port`` with its own temp dir."""

    name: str
    argv: list[str]
    port: int
    workdir: Path
    ready_path: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        log = open(self.workdir / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, stdout=log, stderr=log,
                                     env={**os.environ, **self.env}, start_new_session=True)
        log.close()

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log()}")
            return http_get(self.url + self.ready_path, timeout=1.0)[0] < 500

        try:
            wait_for(ready, timeout, what=f"{self.name} on port {self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        path = self.workdir / f"{self.name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def new_workdir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"pc-{name}-"))


def prometheus(config: str, rule_files: dict[str, str] | None = None, *,
               extra_args: tuple[str, ...] = ()) -> Server:
    """A Prometheus with ``config`` (YAML text); rule files are written beside it."""
    binary = require_binary("prometheus", "prometheus")
    workdir = new_workdir("prometheus")
    for name, text in (rule_files or {}).items():
        (workdir / name).write_text(text)
    (workdir / "prometheus.yml").write_text(config)
    port = free_port()
    argv = [binary, f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle", *extra_args]
    return Server("prometheus", argv, port, workdir, ready_path="/-/ready")


def prometheus_query(server: Server, expr: str) -> list[dict]:
    """Instant query; the result vector (``[]`` when nothing matches)."""
    import json
    import urllib.parse
    status, body = http_get(f"{server.url}/api/v1/query?"
                            + urllib.parse.urlencode({"query": expr}))
    data = json.loads(body)
    if status != 200 or data.get("status") != "success":
        raise AssertionError(f"Query {expr!r} failed: {status} {body[:300]!r}")
    return data["data"]["result"]


def alertmanager(config: str) -> Server:
    """An Alertmanager with ``config`` (YAML text), alone (no cluster port)."""
    from privacy_callbacks.ops.stack import argv

    binary = require_binary("prometheus-alertmanager", "prometheus-alertmanager")
    workdir = new_workdir("alertmanager")
    (workdir / "alertmanager.yml").write_text(config)
    port = free_port()
    return Server("alertmanager", argv("alertmanager", binary, workdir, port), port, workdir,
                  ready_path="/-/ready")


def pushgateway() -> Server:
    """A Prometheus Pushgateway persisting to a file in its temp dir."""
    binary = require_binary("prometheus-pushgateway", "prometheus-pushgateway")
    workdir = new_workdir("pushgateway")
    port = free_port()
    argv = [binary, f"--web.listen-address=127.0.0.1:{port}",
            f"--persistence.file={workdir / 'metrics.store'}"]
    return Server("pushgateway", argv, port, workdir, ready_path="/-/ready")


def victoria_metrics() -> Server:
    """A VictoriaMetrics single node; it accepts InfluxDB line protocol at ``/api/v2/write``."""
    binary = require_binary("victoria-metrics", "victoria-metrics")
    workdir = new_workdir("victoria-metrics")
    port = free_port()
    argv = [binary, f"-httpListenAddr=127.0.0.1:{port}",
            f"-storageDataPath={workdir / 'data'}", "-retentionPeriod=100y"]
    return Server("victoria-metrics", argv, port, workdir, ready_path="/health")


def victoria_metrics_export(server: Server, match: str) -> list[dict]:
    """Every raw sample of the series matching ``match``, as ``/api/v1/export`` lines."""
    import json
    import urllib.parse
    status, body = http_get(f"{server.url}/internal/force_flush")
    if status != 200:
        raise AssertionError(f"force_flush failed: {status} {body[:300]!r}")
    status, body = http_get(f"{server.url}/api/v1/export?"
                            + urllib.parse.urlencode({"match[]": match}))
    if status != 200:
        raise AssertionError(f"export {match!r} failed: {status} {body[:300]!r}")
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def influxdb1() -> Server:
    """An InfluxDB 1.x (``influxd``): only the 1.x API (``/write``, ``/query``), no ``/api/v2``."""
    binary = require_binary("influxd", "influxdb")
    workdir = new_workdir("influxdb")
    port, rpc_port = free_port(), free_port()
    # Every listener but HTTP off, the RPC port on loopback, no usage reporting.
    (workdir / "influxdb.conf").write_text(f"""
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{workdir / 'meta'}"

[data]
  dir = "{workdir / 'data'}"
  wal-dir = "{workdir / 'wal'}"
  query-log-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
  pprof-enabled = false

[ifql]
  enabled = false

[continuous_queries]
  enabled = false
""")
    argv = [binary, "-config", str(workdir / "influxdb.conf")]
    return Server("influxd", argv, port, workdir, ready_path="/ping")


def influxdb1_query(server: Server, database: str, query: str) -> list[dict]:
    """Run an InfluxQL query (POST: ``CREATE DATABASE`` too); its first result's ``series``."""
    import json
    import urllib.parse
    form = urllib.parse.urlencode({"db": database, "q": query}).encode()
    request = urllib.request.Request(f"{server.url}/query", data=form, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    data = json.loads(body)
    if status != 200 or "error" in data["results"][0]:
        raise AssertionError(f"Query {query!r} failed: {status} {body[:300]!r}")
    return data["results"][0].get("series", [])


def tls_files(workdir: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    openssl = require_binary("openssl", "openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=workdir, check=True, capture_output=True, timeout=120)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (workdir / f"{name}.ext").write_text(ext + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return {name: workdir / name for name in
            ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def pushgateway_scrape_config(port: int) -> str:
    """Prometheus scraping a Pushgateway every second, keeping the pushed labels."""
    return f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: pushgateway
    honor_labels: true
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def run_bounded(argv: list[str], timeout: float, **popen_kwargs) -> tuple[int, str]:
    """Run ``argv`` in its own session; on a hang kill it with every process it started (the
    ranks of a DDP run, say) and fail the test. Returns (exit code, combined output)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen_kwargs)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(map(str, argv[:2]))} did not finish in {timeout:.0f} s "
                    f"(a rank hung?):\n{out[-3000:]}")
    return proc.returncode, out
