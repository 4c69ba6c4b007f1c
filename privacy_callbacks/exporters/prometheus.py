"""PrometheusExporter: every catalog metric on an HTTP ``/metrics`` endpoint or a Pushgateway."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import logging
import os
import socket
import ssl
import threading
import urllib.parse
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterable, Mapping
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (CollectorRegistry, Histogram, delete_from_gateway, make_wsgi_app,
                               push_to_gateway)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import catalog, checks
from ..snapshot import FIELDS, PrivacySnapshot
from .base import Exporter, RunInfo

logger = logging.getLogger(__name__)

__all__ = ["PrometheusExporter"]

# Gauges a later snapshot may lack though nothing changed (no step time in a fit's last one).
_KEPT = frozenset({"throughput", "step_seconds"})
# Gauges and counters fed from snapshots: (name, attribute, kind).
_FED = [(m.name, m.attr, m.kind) for m in catalog.METRICS if m.attr and m.kind != "histogram"]


class _Handler(WSGIRequestHandler):
    timeout = 10.0  # a client that stalls (or never finishes TLS) holds its thread this long

    def log_message(self, format: str, *args: Any) -> None:
        """No access line on stderr per scrape."""


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per connection: prometheus_client's own server stops answering while idle
    clients hold connections open (measured: tests/test_hardened_exporter.py)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self.address_family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
        super().__init__((str(address[0]), port), _Handler)
        if tls is not None:  # each handshake happens in its connection's thread, not in accept
            self.socket = tls.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("Metrics request from %s failed", client_address, exc_info=True)


class PrometheusExporter(Exporter):
    """Serves every catalog metric for Prometheus to scrape, or pushes it to a Pushgateway.

    A collector builds the families from each metric's latest value at scrape time; a step
    replaces values under one lock, so a scrape sees one step's record (docs/exporters.md).

    Args:
        port: TCP port of ``/metrics`` (plus the local rank under DDP); ``0`` picks a free one.
        host: Address to listen on; loopback by default.
        registry: Registry for the metrics; by default a new one (never the global ``REGISTRY``).
        serve: Serve ``/metrics``; by default only without ``pushgateway``.
        pushgateway: ``host:port`` of a Pushgateway, pushed to every ``push_interval`` s and at
            the end of the fit (each push bounded by ``push_timeout``), group ``job``/
            ``session_id``/``rank``; ``delete_on_close`` deletes the group after the last push.
        tls_certfile, tls_keyfile, tls_client_cafile: PEM certificate and key to serve HTTPS;
            a CA bundle that must have signed the scrapers' client certificates.
        basic_auth: ``(username, password)`` scrapers must send (only a hash is kept).
    """

    name = "prometheus"
    every_step = False  # gauges: the newest values; histograms: every measured step

    def __init__(self, port: int = 9108, host: str = "127.0.0.1",
                 registry: CollectorRegistry | None = None, *, serve: bool | None = None,
                 pushgateway: str | None = None, job: str = "privacy_callbacks",
                 push_interval: float = 10.0, push_timeout: float = 3.0,
                 delete_on_close: bool = False,
                 tls_certfile: str | os.PathLike[str] | None = None,
                 tls_keyfile: str | os.PathLike[str] | None = None,
                 tls_client_cafile: str | os.PathLike[str] | None = None,
                 basic_auth: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.port = checks.number("port", port, "0-65535 (0 = any free port)", high=65535,
                                  low_ok=True, high_ok=True, integer=True)
        if not isinstance(host, str) or not host:
            raise ValueError(f"Unexpected value for host: {host!r}; use e.g. '127.0.0.1'")
        if pushgateway is not None and (not isinstance(pushgateway, str) or not pushgateway):
            raise ValueError(f"Unexpected value for pushgateway: {pushgateway!r}; use 'host:port'")
        self.job = checks.label("job", job)
        self.push_interval = checks.number("push_interval", push_interval, "seconds > 0")
        self.push_timeout = checks.number("push_timeout", push_timeout, "seconds > 0")
        if (tls_certfile is None) != (tls_keyfile is None) or (
                tls_client_cafile is not None and tls_certfile is None):
            raise ValueError("Pass both tls_certfile and tls_keyfile (PEM files) to serve HTTPS "
                             "(tls_client_cafile needs them), or neither")
        for name, path in (("tls_certfile", tls_certfile), ("tls_keyfile", tls_keyfile),
                           ("tls_client_cafile", tls_client_cafile)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"Unexpected value for {name}: {os.fspath(path)!r} is not a file")
        if basic_auth is not None and (
                not isinstance(basic_auth, tuple) or len(basic_auth) != 2
                or not all(isinstance(v, str) and v for v in basic_auth) or ":" in basic_auth[0]):
            raise ValueError("Unexpected value for basic_auth: use a (username, password) "
                             "tuple of non-empty strings, without ':' in the username")
        self.basic_auth_user = basic_auth[0] if basic_auth else None
        token = base64.b64encode(":".join(basic_auth or ()).encode())  # as scrapers send it
        self._digest = hashlib.sha256(token).digest() if basic_auth else None
        self.host, self.pushgateway, self.delete_on_close = host, pushgateway, delete_on_close
        self.serve = pushgateway is None if serve is None else serve
        self.tls_certfile, self.tls_keyfile = tls_certfile, tls_keyfile
        self.tls_client_cafile = tls_client_cafile
        self.registry = CollectorRegistry() if registry is None else registry
        self.authentication_failures = 0
        self._lock = threading.Lock()
        self._run: dict[str, str] = {}  # the run's label values, once open
        self._values: dict[str, Any] = {}  # metric name: latest value (or {labels: value})
        self._sources: list[tuple[Any, int]] = []  # (exporter, its drops when the fit opened)
        self._carried: dict[str, float] = {}  # drops of earlier fits of the session, by name
        self._histograms = {m.name: Histogram(m.name, m.help, m.all_labels, registry=None,
                                              buckets=m.buckets)
                            for m in catalog.METRICS if m.kind == "histogram"}
        self._observers: list[tuple[str, Any]] = []  # (attribute, bound histogram child)
        self._server: _Server | None = None
        self._pusher: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._stop_push = threading.Event()
        self.registry.register(self)

    def __repr__(self) -> str:
        auth = f"({self.basic_auth_user!r}, '***')" if self.basic_auth_user else None
        return (f"PrometheusExporter(host={self.host!r}, port={self.port!r}, pushgateway="
                f"{self.pushgateway!r}, tls={self.tls_certfile is not None}, basic_auth={auth})")

    @property
    def url(self) -> str | None:
        """``http(s)://host:port/metrics`` while serving, else ``None``."""
        if self._server is None:
            return None
        scheme = "https" if self.tls_certfile is not None else "http"
        return f"{scheme}://{self.host}:{self._server.server_port}/metrics"

    def describe(self) -> Iterable[Metric]:
        """Every family, so a registry refuses a second exporter with the same names."""
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        families: list[Metric] = []
        with self._lock:
            values, run = dict(self._values), self._run
            if run:
                values["privacy_export_dropped_total"] = self._dropped()
                if self._digest is not None:
                    values["authentication_failures_total"] = self.authentication_failures
            for metric in catalog.METRICS:
                if metric.kind == "histogram":
                    families += self._histograms[metric.name].collect()
                    continue
                family = (GaugeMetricFamily if metric.kind == "gauge" else CounterMetricFamily)(
                    metric.name, metric.help, labels=metric.all_labels)
                fixed = [run[n] for n in metric.all_labels if n in run]
                value = values.get(metric.name)
                for key, number in value.items() if isinstance(value, Mapping) else [((), value)]:
                    keys = key if isinstance(key, tuple) else (key,)
                    if number is not None and len(fixed) + len(keys) == len(metric.all_labels):
                        family.add_metric(fixed + [str(k) for k in keys], float(number))
                families.append(family)
        return families

    def _dropped(self) -> dict[str, float]:
        """This session's drops by exporter name (earlier fits included), read now."""
        drops = dict(self._carried)
        for source, at_open in self._sources:
            drops[source.name] = drops.get(source.name, 0) + source.dropped - at_open
        return drops

    def start(self) -> None:
        if not self.serve or self._server is not None:
            return
        tls = None
        if self.tls_certfile is not None:
            try:
                tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # TLS 1.2 or later
                tls.load_cert_chain(self.tls_certfile, self.tls_keyfile)
                if self.tls_client_cafile is not None:
                    tls.load_verify_locations(self.tls_client_cafile)
                    tls.verify_mode = ssl.CERT_REQUIRED
            except ssl.SSLError as exc:
                raise ValueError(f"PrometheusExporter cannot use the TLS files "
                                 f"{str(self.tls_certfile)!r}, {str(self.tls_keyfile)!r}: "
                                 f"{exc.reason or exc}. Pass a PEM certificate and its key"
                                 ) from None
        port = self.port + self.local_rank if self.port else 0  # one endpoint per process
        try:
            self._server = server = _Server(self.host, port, tls)
        except OSError as exc:
            raise OSError(f"PrometheusExporter cannot listen on {self.host}:{port} "
                          f"({exc.strerror or exc}). Choose a free port, or port=0 to pick one "
                          "(its address is in .url).") from exc
        if self._digest is not None and tls is None \
                and not ipaddress.ip_address(str(server.server_address[0])).is_loopback:
            logger.warning("Basic auth without TLS on %s sends the credentials in clear text: "
                           "pass tls_certfile and tls_keyfile", self.host)
        self._app = make_wsgi_app(self.registry)
        server.set_app(self._app if self._digest is None else self._guarded)
        # Polls for close twice a second, as prometheus_client's own server: each poll takes the
        # interpreter lock from training (a step's mean cost over Opacus, bench_overhead.py
        # --hooks-only: +75 us polling twice a second, +93 us at twenty).
        threading.Thread(target=server.serve_forever, args=(0.5,), name="privacy-metrics-http",
                         daemon=True).start()
        logger.info("Privacy metrics at %s", self.url)

    def _guarded(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        """``/metrics`` behind HTTP basic auth; only a SHA-256 of the credentials is kept."""
        scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() == "basic" and hmac.compare_digest(
                hashlib.sha256(credentials.strip().encode()).digest(), self._digest or b""):
            return self._app(environ, start_response)
        with self._lock:
            self.authentication_failures += 1
        start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="metrics"'),
                                            ("Content-Type", "text/plain; charset=utf-8")])
        return [b"Unauthorized\n"]

    def open(self, info: RunInfo) -> None:
        with self._lock:
            if info.session_id != self._run.get("session_id"):  # the old session's series go
                self._values, self._sources, self._carried = {}, [], {}
                for histogram in self._histograms.values():
                    histogram.clear()
            # Drops before this fit were counted in the fit they happened in.
            self._carried = self._dropped()
            self._sources = [(source, source.dropped) for source in info.exporters]
            self._run = {"session_id": info.session_id, "model_name": info.model_name,
                         "accountant": info.accountant, "rank": str(info.rank)}
            for name, attr, kind in _FED if info.rank == 0 else ():
                if kind == "counter" and attr in FIELDS:  # rank 0's counters: series from the start
                    self._values.setdefault(name, 0)
            self._observers = [
                (m.attr, self._histograms[m.name].labels(*(self._run[n] for n in m.all_labels)))
                for m in catalog.METRICS if m.kind == "histogram" and m.attr is not None]
        if self.pushgateway is not None and self._pusher is None:
            self._stop_push.clear()
            self._pusher = threading.Thread(target=self._push_loop, name="privacy-pushgateway",
                                            daemon=True)
            self._pusher.start()

    def export(self, snapshot: PrivacySnapshot) -> None:
        """Gauges and counters take the newest *assessed* snapshot's fields (one scrape, one
        step's record) and the newest ``extra`` values; histograms count every observation."""
        with self._lock:
            values = self._values
            for name, attr, kind in _FED:
                if not (snapshot.assessed if attr in FIELDS else attr in snapshot.extra):
                    continue  # not computed for this step: the last value stays
                value = snapshot.get(attr)
                if value is None:
                    if kind == "gauge" and attr not in _KEPT:
                        values.pop(name, None)
                elif kind == "counter" and not isinstance(value, Mapping):
                    values[name] = max(value, values.get(name, 0))  # a counter never goes down
                else:
                    values[name] = value
            for attr, child in self._observers:
                value = snapshot.get(attr)
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    if item is not None:
                        child.observe(item)

    def _push_loop(self) -> None:
        while not self._stop_push.wait(self.push_interval):
            self._push(push_to_gateway, registry=self.registry)
        self._push(push_to_gateway, registry=self.registry)
        if self.delete_on_close:
            self._push(delete_from_gateway)

    def _push(self, push: Callable[..., None], **kwargs: Any) -> None:
        group = {"session_id": self._run["session_id"], "rank": self._run["rank"]}
        try:
            push(self.pushgateway, job=self.job, grouping_key=group, timeout=self.push_timeout,
                 handler=self._handler, **kwargs)
        except Exception as exc:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning("Pushing privacy metrics to %s failed (%s); training continues, "
                               "further failures are counted in privacy_export_dropped_total",
                               self.pushgateway, exc)

    def _handler(self, url: str, method: str, timeout: float | None, headers: list,
                 data: bytes) -> Callable[[], None]:
        """prometheus_client's push, on a connection :meth:`close` can cut: a gateway that
        accepts and never answers would otherwise hold the exit for the whole push timeout."""

        def handle() -> None:
            parts = urllib.parse.urlsplit(url)
            connection = (http.client.HTTPSConnection if parts.scheme == "https"
                          else http.client.HTTPConnection)
            self._conn = conn = connection(parts.netloc, timeout=timeout)
            try:
                if self._pusher is not threading.current_thread():  # close gave up on it
                    raise ConnectionAbortedError("the exporter is closing")
                conn.request(method, parts.path, body=data, headers=dict(headers))  # no query
                response = conn.getresponse()
                if response.status >= 400:
                    raise OSError(f"Pushgateway answered {response.status}: "
                                  f"{response.read()[:200]!r}")
            finally:
                self._conn = None
                conn.close()

        return handle

    def close(self, timeout: float = 10.0) -> None:
        pusher = self._pusher
        if pusher is not None:
            self._stop_push.set()
            pusher.join(timeout)
            self._pusher = None  # from now on no push starts (see _handler)
            conn = self._conn
            if pusher.is_alive() and conn is not None and conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)  # the request in flight fails now
                pusher.join(1.0)
                logger.warning("Pushgateway %s did not answer within %.1f s at close; the last "
                               "metrics were not pushed", self.pushgateway, timeout)
        if self._server is not None:
            self._server.shutdown()  # returns once serve_forever has returned: its thread ends
            self._server.server_close()
            self._server = None
