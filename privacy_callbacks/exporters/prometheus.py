"""PrometheusExporter: every catalog metric on an HTTP ``/metrics`` endpoint or a Pushgateway."""

from __future__ import annotations

import base64
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
from collections.abc import Mapping
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (CollectorRegistry, Histogram, delete_from_gateway, make_wsgi_app,
                               push_to_gateway)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import catalog, checks
from ..snapshot import FIELDS, PrivacySnapshot
from .base import Exporter, RunInfo

logger = logging.getLogger(__name__)

__all__ = ["PrometheusExporter"]

_RUN_LABELS = ("session_id", "model_name", "accountant", "rank")
# Gauges a later snapshot may lack though nothing changed: no step time in a fit's final
# snapshot. The values of optional parts (the snapshot's ``extra``: mechanism statistics on a
# CPU only every k-th step) also stay until a snapshot brings new ones.
_KEPT = frozenset({"throughput", "step_seconds"})
# Gauges and counters fed from snapshots: (name, attribute, kind, a single series per run).
_FED = [(m.name, m.attr, m.kind, all(n in _RUN_LABELS for n in m.labels))
        for m in catalog.METRICS if m.attr is not None and m.kind != "histogram"]


class _Handler(WSGIRequestHandler):
    timeout = 10.0  # a client that stalls (or never finishes TLS) holds its thread this long

    def log_message(self, format: str, *args: Any) -> None:
        """No access line on stderr per scrape."""


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per connection. prometheus_client's own server answers one client at a time,
    and stops answering while idle clients hold connections open."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: int) -> None:
        self.address_family = family
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("Metrics request from %s failed", client_address, exc_info=True)


def _guarded(app: Callable[..., Iterable[bytes]], digest: bytes,
             refused: Callable[[], None]) -> Callable[..., Iterable[bytes]]:
    """``app`` behind HTTP basic auth; only a SHA-256 of the credentials is kept."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() == "basic" and hmac.compare_digest(
                hashlib.sha256(credentials.strip().encode()).digest(), digest):
            return app(environ, start_response)
        refused()
        start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="metrics"'),
                                            ("Content-Type", "text/plain; charset=utf-8")])
        return [b"Unauthorized\n"]

    return guarded


class PrometheusExporter(Exporter):
    """Serves every catalog metric for Prometheus to scrape, or pushes it to a Pushgateway.

    A custom collector builds the families from the latest value of each metric when
    ``/metrics`` is scraped (or the registry collected): a step only replaces values, under one
    lock, so a scrape sees one step's record. Counters are the session's running totals;
    histograms are prometheus_client's own, fed every observation. The endpoint runs from
    ``setup`` to ``teardown``; under DDP each rank serves on ``port`` plus its local rank. At a
    new session the finished session's series go (its Pushgateway group keeps its last push).

    Args:
        port: TCP port of ``/metrics``; ``0`` picks a free one (see :attr:`url`).
        host: Address to listen on; loopback by default.
        registry: Registry for the metrics; by default a new one (never the global ``REGISTRY``,
            so building the exporter twice is safe).
        serve: Serve ``/metrics``; by default only without ``pushgateway``.
        pushgateway: ``host:port`` of a Pushgateway: the registry is pushed from a background
            thread every ``push_interval`` s and at the end of the fit, each push bounded by
            ``push_timeout``, to the group ``job``/``session_id``/``rank``; failures are counted
            in ``privacy_export_dropped_total{exporter="prometheus"}``.
        delete_on_close: Delete the run's group from the gateway after the final push.
        tls_certfile, tls_keyfile: PEM certificate and key to serve HTTPS.
        tls_client_cafile: PEM CA bundle: scrapers must show a client certificate it signed.
        basic_auth: ``(username, password)`` scrapers must send; refusals are counted in
            ``authentication_failures_total``. Only a hash is kept, never the password.
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
            raise ValueError(f"Unexpected value for pushgateway: {pushgateway!r}; use "
                             "'host:port', e.g. '127.0.0.1:9091'")
        if not isinstance(job, str) or not job:
            raise ValueError(f"Unexpected value for job: {job!r}; use a non-empty string")
        self.push_interval = checks.number("push_interval", push_interval, "seconds > 0")
        self.push_timeout = checks.number("push_timeout", push_timeout, "seconds > 0")
        if (tls_certfile is None) != (tls_keyfile is None):
            raise ValueError("Pass both tls_certfile and tls_keyfile (PEM files) to serve HTTPS, "
                             "or neither")
        if tls_client_cafile is not None and tls_certfile is None:
            raise ValueError("tls_client_cafile needs tls_certfile and tls_keyfile: client "
                             "certificates are checked during the TLS handshake")
        for name, path in (("tls_certfile", tls_certfile), ("tls_keyfile", tls_keyfile),
                           ("tls_client_cafile", tls_client_cafile)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"Unexpected value for {name}: {os.fspath(path)!r} is not a file")
        self._digest: bytes | None = None
        self.basic_auth_user: str | None = None
        if basic_auth is not None:
            if (not isinstance(basic_auth, tuple) or len(basic_auth) != 2
                    or not all(isinstance(v, str) and v for v in basic_auth)
                    or ":" in basic_auth[0]):
                raise ValueError("Unexpected value for basic_auth: use a (username, password) "
                                 "tuple of non-empty strings, without ':' in the username")
            token = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode())
            self._digest, self.basic_auth_user = hashlib.sha256(token).digest(), basic_auth[0]
        self.host, self.pushgateway, self.job = host, pushgateway, job
        self.serve = pushgateway is None if serve is None else serve
        self.delete_on_close = delete_on_close
        self.tls_certfile, self.tls_keyfile = tls_certfile, tls_keyfile
        self.tls_client_cafile = tls_client_cafile
        self.registry = CollectorRegistry() if registry is None else registry
        self.authentication_failures = 0
        self._lock = threading.Lock()
        self._run: dict[str, str] = {}
        self._session: str | None = None
        self._values: dict[str, Any] = {}
        self._drops: dict[str, float] = {}
        self._sources: list[tuple[Any, list[float]]] = []
        self._histograms = {m.name: Histogram(m.name, m.help, m.all_labels, registry=None,
                                              buckets=m.buckets)
                            for m in catalog.METRICS if m.kind == "histogram"}
        self._observers: list[tuple[str, Any]] = []
        self.registry.register(self)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._pusher: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._stop_push = threading.Event()

    def __repr__(self) -> str:
        auth = f"({self.basic_auth_user!r}, '***')" if self.basic_auth_user else None
        return (f"PrometheusExporter(host={self.host!r}, port={self.port!r}, "
                f"pushgateway={self.pushgateway!r}, tls={self.tls_certfile is not None}, "
                f"basic_auth={auth})")

    @property
    def url(self) -> str | None:
        """``http(s)://host:port/metrics`` while serving, else ``None``."""
        if self._server is None:
            return None
        scheme = "https" if self.tls_certfile is not None else "http"
        return f"{scheme}://{self.host}:{self._server.server_port}/metrics"

    # -- the registry's view -----------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """Every family's name, so a registry refuses a second exporter with the same ones."""
        for metric in catalog.METRICS:
            family = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}.get(metric.kind)
            if family is None:
                yield from self._histograms[metric.name].describe()
            else:
                yield family(metric.name, metric.help, labels=metric.all_labels)

    def collect(self) -> Iterable[Metric]:
        families: list[Metric] = []
        with self._lock:
            values, run = dict(self._values), self._run
            values["privacy_export_dropped_total"] = dict(self._drops) if run else None
            values["authentication_failures_total"] = (
                self.authentication_failures if run and self._digest else None)
            for metric in catalog.METRICS:
                if metric.kind == "histogram":
                    families += self._histograms[metric.name].collect()
                    continue
                family_type = GaugeMetricFamily if metric.kind == "gauge" else \
                    CounterMetricFamily
                family = family_type(metric.name, metric.help, labels=metric.all_labels)
                value = values.get(metric.name)
                if value is not None:
                    free = [n for n in metric.all_labels if n not in run]
                    fixed = [run[n] for n in metric.all_labels if n in run]
                    items = value.items() if isinstance(value, Mapping) else [((), value)]
                    for key, number in items:
                        keys = list(key) if isinstance(key, tuple) else [key]
                        if number is not None and len(keys) == len(free):
                            family.add_metric(fixed + [str(k) for k in keys], float(number))
                families.append(family)
        return families

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if not self.serve or self._server is not None:
            return
        if self._digest is not None and self.tls_certfile is None:
            try:
                loopback = ipaddress.ip_address(self.host).is_loopback
            except ValueError:
                loopback = self.host == "localhost"
            if not loopback:
                logger.warning("Basic auth without TLS on %s sends the credentials in clear "
                               "text: pass tls_certfile and tls_keyfile", self.host)
        port = self.port + self.local_rank if self.port else 0  # one endpoint per process
        try:
            family, _, _, _, address = socket.getaddrinfo(self.host, port,
                                                          type=socket.SOCK_STREAM)[0]
            server = _Server((str(address[0]), port), family)
        except OSError as exc:
            raise OSError(f"PrometheusExporter cannot listen on {self.host}:{port} "
                          f"({exc.strerror or exc}). Choose a free port, or port=0 to pick one "
                          "(its address is in .url).") from exc
        app = make_wsgi_app(self.registry)
        server.set_app(app if self._digest is None else _guarded(app, self._digest,
                                                                 self._refused))
        if self.tls_certfile is not None:
            try:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                context.load_cert_chain(self.tls_certfile, self.tls_keyfile)
                if self.tls_client_cafile is not None:
                    context.load_verify_locations(self.tls_client_cafile)
                    context.verify_mode = ssl.CERT_REQUIRED
            except ssl.SSLError as exc:
                server.server_close()
                files = ", ".join(repr(os.fspath(f)) for f in (self.tls_certfile,
                                                               self.tls_keyfile) if f)
                raise ValueError(f"PrometheusExporter cannot use the TLS files ({files}): "
                                 f"{exc.reason or exc}. Pass a PEM certificate and its key"
                                 ) from None
            # The handshake happens in the connection's thread, not in the accept loop.
            server.socket = context.wrap_socket(server.socket, server_side=True,
                                                do_handshake_on_connect=False)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                                        name="privacy-metrics-http", daemon=True)
        self._thread.start()
        logger.info("Privacy metrics at %s", self.url)

    def _refused(self) -> None:
        with self._lock:
            self.authentication_failures += 1

    def open(self, info: RunInfo) -> None:
        with self._lock:
            if info.session_id != self._session:  # a new session: the old one's series go
                self._session, self._values, self._drops = info.session_id, {}, {}
                for histogram in self._histograms.values():
                    histogram.clear()
            self._run = {"session_id": info.session_id, "model_name": info.model_name,
                         "accountant": info.accountant, "rank": str(info.rank)}
            if info.rank == 0:  # the privacy counters exist from the start, at what they count
                for name, _, kind, single in _FED:
                    if kind == "counter" and single:
                        self._values.setdefault(name, 0)
            # Drops before this fit were counted in the fit they happened in.
            self._sources = [(source, [float(source.dropped)]) for source in info.exporters]
            for source, _ in self._sources:
                self._drops.setdefault(source.name, 0.0)
            self._observers = [
                (m.attr, self._histograms[m.name].labels(
                    **{n: self._run[n] for n in m.all_labels}))
                for m in catalog.METRICS if m.kind == "histogram" and m.attr is not None]
        if self.pushgateway is not None and self._pusher is None:
            self._stop_push.clear()
            self._pusher = threading.Thread(target=self._push_loop, name="privacy-pushgateway",
                                            args=({"session_id": info.session_id,
                                                   "rank": str(info.rank)},), daemon=True)
            self._pusher.start()

    def export(self, snapshot: PrivacySnapshot) -> None:
        """Gauges and counters take the newest *assessed* snapshot's values, so one scrape is
        one step's record (a step with a newer one in the same publisher batch brings only its
        optional parts' values); histograms count every step's observations."""
        private = snapshot.epsilon_step is not None  # rank 0's privacy values, not a rank's
        extra = snapshot.extra
        with self._lock:
            values = self._values
            for name, attr, kind, single in _FED:
                if attr in FIELDS:
                    if not snapshot.assessed:
                        continue
                    value = getattr(snapshot, attr)
                elif attr in extra:
                    value = extra[attr]
                else:
                    continue
                if kind == "counter":
                    if value is not None:
                        values[name] = value if isinstance(value, Mapping) \
                            else max(value, values.get(name) or 0)
                    elif private and single:
                        values.setdefault(name, 0)  # a series from the first step on
                elif value is not None:
                    values[name] = value
                elif attr not in _KEPT:
                    values.pop(name, None)
            for attr, child in self._observers:
                value = snapshot.get(attr)
                if value is not None:
                    for item in value if isinstance(value, (list, tuple)) else (value,):
                        child.observe(item)
            for source, seen in self._sources:
                now = float(source.dropped)
                if now > seen[0]:
                    self._drops[source.name] += now - seen[0]
                    seen[0] = now

    def _push_loop(self, grouping_key: dict[str, str]) -> None:
        while not self._stop_push.wait(self.push_interval):
            self._push(push_to_gateway, grouping_key, registry=self.registry)
        self._push(push_to_gateway, grouping_key, registry=self.registry)
        if self.delete_on_close:
            self._push(delete_from_gateway, grouping_key)

    def _push(self, push: Callable[..., None], grouping_key: dict[str, str],
              **kwargs: Any) -> None:
        try:
            push(self.pushgateway, job=self.job, grouping_key=grouping_key,
                 timeout=self.push_timeout, handler=self._handler, **kwargs)
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
            https = parts.scheme == "https"
            conn = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(
                parts.netloc, timeout=timeout)
            self._conn = conn
            try:
                if self._stop_push.is_set() and self._pusher is None:
                    raise ConnectionAbortedError("the exporter is closing")
                conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                             body=data, headers=dict(headers))
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
            self._pusher = None
            conn = self._conn
            if pusher.is_alive() and conn is not None and conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)  # the request in flight fails now
                except OSError:
                    pass
                pusher.join(1.0)
                logger.warning("Pushgateway %s did not answer within %.1f s at close; the last "
                               "metrics were not pushed", self.pushgateway, timeout)
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout)
