"""PrometheusExporter: every catalog metric on an HTTP ``/metrics`` endpoint."""

from __future__ import annotations

import base64
import bisect
import hashlib
import hmac
import http.client
import ipaddress
import logging
import math
import os
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (CollectorRegistry, Counter, delete_from_gateway, make_wsgi_app,
                               push_to_gateway)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .. import catalog
from .base import Exporter, RunInfo

if TYPE_CHECKING:
    from ..snapshot import PrivacySnapshot

logger = logging.getLogger(__name__)

__all__ = ["PrometheusExporter"]


# Gauges whose values a later snapshot may lack although nothing changed: the step time (none on
# the first step after a validation, nor in the final snapshot) and the device statistics (none
# in snapshots that only bring a newer epsilon). They come from the newest snapshot that has them.
_TIMED = frozenset({"throughput", "step_seconds"})
_MEASURED = frozenset({"clipped_fraction", "signal_magnitude", "signal_to_noise_ratio",
                       "overhead"})


class _Gauge:
    """How one gauge is read at scrape time: its label values and which snapshot holds it."""

    __slots__ = ("attr", "values", "free", "source")

    def __init__(self, metric: catalog.Metric, values: dict[str, str]) -> None:
        assert metric.attr is not None  # only metrics fed from a snapshot attribute are read
        self.attr = metric.attr
        names = metric.all_labels
        free = [i for i, name in enumerate(names) if name not in values]
        self.free = free[0] if free else None
        self.values = [values[name] for name in names if name in values]
        self.source = 1 if self.attr in _TIMED else 2 if self.attr in _MEASURED else 0

    def add(self, family: GaugeMetricFamily, value: Any) -> None:
        if isinstance(value, Mapping):
            i = self.free
            for key, item in value.items():
                if item is not None:
                    family.add_metric(self.values[:i] + [key] + self.values[i:], float(item))
        else:
            family.add_metric(self.values, float(value))


class _Observations:
    """One histogram series, counted in plain Python (the collector's lock guards it).

    A noised norm histogram brings dozens of observations per step; prometheus_client's
    ``observe`` takes two locks for each. Same buckets, same sum, same exposition.
    """

    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # the catalog's, then +Inf
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.sum += value
        if value == value:  # a NaN lands in no bucket, as with prometheus_client
            self.counts[bisect.bisect_left(self.bounds, value)] += 1.0


class _Histogram:
    """The series of one catalog histogram, with the part of ``Histogram``'s API the exporter
    uses (``labels``, ``clear``) and the families a collector yields."""

    def __init__(self, metric: catalog.Metric) -> None:
        self.metric = metric
        self.bounds = (*metric.buckets, math.inf)
        self.series: dict[tuple[str, ...], _Observations] = {}

    def labels(self, **values: str) -> _Observations:
        key = tuple(values[name] for name in self.metric.all_labels)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Observations(self.bounds)
        return series

    def clear(self) -> None:
        self.series = {}

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.metric.name, self.metric.help,
                                      labels=self.metric.all_labels)]

    def collect(self) -> list[Metric]:
        name, names = self.metric.name, self.metric.all_labels
        family = HistogramMetricFamily(name, self.metric.help, labels=names)
        edges = [floatToGoString(bound) for bound in self.bounds]
        for key, series in self.series.items():
            total, buckets = 0.0, []
            for edge, count in zip(edges, series.counts):
                total += count
                buckets.append((edge, total))
            family.add_metric(list(key), buckets, series.sum)
            family.add_sample(f"{name}_created", dict(zip(names, key)), series.created)
        return [family]


class _Collector:
    """Every catalog metric, in catalog order, built when the registry is collected.

    Gauges are read at scrape time from :attr:`state`, replaced whole for each snapshot, so a
    step costs them nothing. Counters and histograms are fed per snapshot, so every observation
    is counted and counters never go down. The exporter holds :attr:`lock` while it feeds one
    snapshot, and a scrape while it reads: one scrape is one snapshot's record, counters and
    gauges alike.
    """

    def __init__(self, families: dict[str, Any]) -> None:
        self.families = families  # counters and histograms
        self.lock = threading.Lock()
        # (gauges by name, newest snapshot, newest with a step time, newest with device stats)
        self.state: tuple[dict[str, _Gauge], Any, Any, Any] = ({}, None, None, None)

    def publish(self, snapshot: PrivacySnapshot) -> None:
        gauges, _, timed, measured = self.state
        self.state = (gauges, snapshot,
                      snapshot if snapshot.step_seconds is not None else timed,
                      snapshot if snapshot.device_stats is not None else measured)

    def publish_measured(self, snapshot: PrivacySnapshot) -> None:
        """``snapshot``'s device statistics only: the newest measured step."""
        gauges, newest, timed, _ = self.state
        self.state = (gauges, newest, timed, snapshot)

    def describe(self) -> Iterable[Metric]:
        for metric in catalog.METRICS:
            if metric.kind == "gauge":
                yield GaugeMetricFamily(metric.name, metric.help, labels=metric.all_labels)
            else:
                yield from self.families[metric.name].describe()

    def collect(self) -> Iterable[Metric]:
        families: list[Metric] = []
        with self.lock:
            gauges, *snapshots = self.state
            for metric in catalog.METRICS:
                if metric.kind != "gauge":
                    families += self.families[metric.name].collect()
                    continue
                family = GaugeMetricFamily(metric.name, metric.help, labels=metric.all_labels)
                gauge = gauges.get(metric.name)
                snapshot = None if gauge is None else snapshots[gauge.source]
                if gauge is not None and snapshot is not None:
                    value = getattr(snapshot, gauge.attr)
                    if value is not None:
                        gauge.add(family, value)
                families.append(family)
        return families


class _Bound:
    """A counter or histogram fed from one snapshot attribute; label children are bound on
    first use.

    The attribute holds a number, ``None`` (nothing to report), or, for a metric with one label
    the run does not fix, a mapping from that label's value to the number. A histogram's
    attribute may also hold a sequence: each element is one observation.

    A counter's attribute holds the session's running total (``None`` while it is not known
    exactly: the counter keeps what it counted); ``counted`` (shared by every fit of the
    exporter) holds what each counter child has counted so far, so a session's second fit adds
    only what it accounted.
    """

    __slots__ = ("attr", "family", "kind", "labels", "free", "child", "children", "counted")

    def __init__(self, metric: catalog.Metric, family: Any, values: dict[str, str],
                 counted: dict[Any, float]) -> None:
        assert metric.attr is not None  # only metrics fed from a snapshot attribute are bound
        self.attr, self.family, self.kind = metric.attr, family, metric.kind
        self.counted = counted
        self.labels = {name: values[name] for name in metric.all_labels if name in values}
        free = [name for name in metric.all_labels if name not in values]
        self.free = free[0] if free else None
        self.child: Any = None
        self.children: dict[str, Any] = {}

    def bind(self, key: str | None) -> Any:
        if key is None:
            if self.child is None:
                self.child = self.family.labels(**self.labels)
            return self.child
        child = self.children.get(key)
        if child is None:
            assert self.free is not None  # a keyed value is for the one label the run leaves free
            child = self.children[key] = self.family.labels(**self.labels, **{self.free: key})
        return child

    def touch(self) -> None:
        """Bind a counter the snapshot has no value for now, at what it counted so far.

        The epsilon counter counts exact values only, and the first snapshots of a PRV run may
        all hold upper bounds: its series still exists from the first snapshot, so increase()
        and absent() see a real series. Keyed counters and histograms get their children with
        their values.
        """
        if self.kind == "counter" and self.free is None:
            self.bind(None)

    def update(self, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                if item is not None:
                    self._one(key, item)
        elif self.kind == "histogram" and not isinstance(value, (int, float)):
            child = self.bind(None)
            for item in value:
                child.observe(item)
        else:
            self._one(None, value)

    def _one(self, key: str | None, value: float) -> None:
        if self.kind == "histogram":
            self.bind(key).observe(value)
        else:
            # Bound at 0 too: a counter exists from the first snapshot, so increase() and
            # absent() see a real series (an error counter that never rose reads 0, not nothing).
            child = self.bind(key)
            last = self.counted.get(child, 0.0)
            if value > last:
                child.inc(value - last)
                self.counted[child] = value


class _Handler(WSGIRequestHandler):
    timeout = 10.0  # a client that stalls (or never finishes TLS) cannot hold a thread for long

    def log_message(self, format: str, *args: Any) -> None:
        """Access lines would go to stderr on every scrape."""


class _Server(ThreadingMixIn, WSGIServer):
    """A threaded WSGI server whose accept loop sleeps until a client or :meth:`shutdown` comes.

    ``socketserver``'s loop wakes every ``poll_interval`` (0.5 s) to see whether it should stop,
    so its ``shutdown`` waits up to that long -- at the end of every fit. Here the loop also
    waits on one end of a socket pair; ``shutdown`` writes to the other, and the loop ends at
    once. No timer wakes the process while nobody scrapes.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: int) -> None:
        self.address_family = family
        # Before binding: a failed bind calls server_close, which closes the pair too.
        self._wake_in, self._wake_out = socket.socketpair()
        self._stopping = False
        self._stopped = threading.Event()
        super().__init__(address, _Handler)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Handle requests until :meth:`shutdown`; ``poll_interval`` is ignored (no polling)."""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_in, selectors.EVENT_READ)
                while not self._stopping:
                    for key, _ in selector.select():
                        if key.fileobj is self and not self._stopping:
                            # What socketserver's own loop calls once the socket is readable.
                            self._handle_request_noblock()  # type: ignore[attr-defined]
                    self.service_actions()
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the loop now and wait (at most ``timeout`` seconds) until it has ended."""
        self._stopping = True
        try:
            self._wake_out.send(b"\0")
        except OSError:  # closed already: the loop is not waiting on it
            pass
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        super().server_close()
        self._wake_in.close()
        self._wake_out.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Failed handshakes and dropped connections are the client's problem; no tracebacks.
        logger.debug("Metrics request from %s failed", client_address, exc_info=True)


def _address(host: str, port: int) -> tuple[int, str]:
    """The address family and numeric address to bind ``host`` with (IPv4 or IPv6)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
    return family, str(sockaddr[0])


def _guarded(app: Callable[..., Iterable[bytes]], digest: bytes,
             refused: Callable[[], None]) -> Callable[..., Iterable[bytes]]:
    """``app`` behind HTTP basic auth; only a SHA-256 of the expected credentials is kept.

    ``refused()`` is called for every request turned away (counted, never with who sent it).
    """

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        given = hashlib.sha256(credentials.strip().encode()).digest()
        if scheme.lower() == "basic" and hmac.compare_digest(given, digest):
            return app(environ, start_response)
        refused()
        start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="metrics"'),
                                            ("Content-Type", "text/plain; charset=utf-8")])
        return [b"Unauthorized\n"]

    return guarded


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Pusher:
    """Pushes a registry to a Pushgateway from its own thread; every request can be aborted.

    ``push_to_gateway`` blocks its caller for its whole timeout when the gateway does not answer,
    so it never runs on the training thread, and :meth:`close` shuts the socket of a request in
    flight once its time is up: a silent gateway cannot hold the process at exit.
    """

    def __init__(self, exporter: PrometheusExporter, grouping_key: dict[str, str]) -> None:
        self.exporter = exporter
        self.grouping_key = grouping_key
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._aborted = False
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="privacy-pushgateway", daemon=True)
        self._thread.start()

    def _handler(self, url: str, method: str, timeout: float | None, headers: list,
                 data: bytes) -> Callable[[], None]:
        def handle() -> None:
            parts = urllib.parse.urlsplit(url)
            cls = (http.client.HTTPSConnection if parts.scheme == "https"
                   else http.client.HTTPConnection)
            conn = cls(parts.netloc, timeout=timeout)
            with self._lock:
                if self._aborted:
                    raise ConnectionAbortedError("push aborted at close")
                self._conn = conn
            try:
                path = parts.path + (f"?{parts.query}" if parts.query else "")
                conn.request(method, path, body=data, headers=dict(headers))
                resp = conn.getresponse()
                body = resp.read()
                if resp.status >= 400:
                    raise OSError(f"Pushgateway answered {resp.status}: {body[:200]!r}")
            finally:
                with self._lock:
                    self._conn = None
                conn.close()
        return handle

    def _call(self, fn: Callable[..., None], timeout: float, **kwargs: Any) -> None:
        exporter = self.exporter
        try:
            fn(exporter.pushgateway, job=exporter.job, grouping_key=self.grouping_key,
               timeout=timeout, handler=self._handler, **kwargs)
        except Exception as exc:
            exporter.dropped += 1
            if not self._warned:
                self._warned = True
                logger.warning("Pushing privacy metrics to %s failed (%s); training continues, "
                               "further failures are counted in privacy_export_dropped_total",
                               exporter.pushgateway, exc)

    def _run(self) -> None:
        exporter = self.exporter
        while not self._stop.wait(exporter.push_interval):
            self._call(push_to_gateway, exporter.push_timeout, registry=exporter.registry)
        self._call(push_to_gateway, exporter.push_timeout, registry=exporter.registry)
        if exporter.delete_on_close:
            self._call(delete_from_gateway, exporter.push_timeout)

    def close(self, timeout: float) -> None:
        """Final push (and delete, if asked) within ``timeout`` seconds, then stop."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                self._aborted = True
                conn = self._conn
            if conn is not None and conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._thread.join(1.0)
            logger.warning("Pushgateway %s did not answer within %.1f s at close; last metrics "
                           "not pushed", self.exporter.pushgateway, timeout)


class PrometheusExporter(Exporter):
    """Serves every catalog metric for Prometheus to scrape, or pushes it to a Pushgateway.

    The endpoint runs from ``setup`` to ``teardown``. Under DDP each rank serves on ``port`` plus
    its local rank (rank 0 has the privacy metrics; every rank its throughput and step time).
    Gauges are built from the newest snapshot when ``/metrics`` is scraped (or the registry
    collected), so every gauge in one scrape comes from the same snapshot and a step costs them
    nothing; on the publisher's thread a snapshot only replaces that reference and feeds the
    counters and histograms (every observation counted).

    For batch jobs, ``pushgateway="host:9091"`` pushes the registry from a background thread
    every ``push_interval`` seconds and once more at the end of the fit, each request bounded by
    ``push_timeout``, to the group ``job``/``session_id``/``rank``. A gateway that does not
    answer costs the training thread nothing and the exit at most the close timeout; failed
    pushes are counted in ``privacy_export_dropped_total{exporter="prometheus"}``.

    Args:
        port: TCP port of the ``/metrics`` endpoint; ``0`` picks a free one (see :attr:`url`).
        host: Address to listen on. Loopback by default: exposing metrics beyond this machine is
            a deliberate choice.
        registry: Registry to register the metrics in. By default the exporter owns a new one,
            never the global ``REGISTRY``, so building it twice (notebooks, tests) is safe.
        serve: Serve ``/metrics``. By default only without ``pushgateway``; ``False`` registers
            and updates the metrics without an endpoint (to serve ``registry`` yourself).
        pushgateway: ``host:port`` (or URL) of a Prometheus Pushgateway to push to.
        job: The Pushgateway ``job`` label.
        push_interval: Seconds between pushes.
        push_timeout: Seconds one push may take.
        delete_on_close: Delete this run's group from the gateway at the end of the fit (after the
            final push), so finished runs do not linger.
        tls_certfile: PEM certificate (chain) to serve ``/metrics`` over HTTPS.
        tls_keyfile: PEM private key of ``tls_certfile``.
        tls_client_cafile: PEM CA bundle; when given, a scraper must present a client
            certificate signed by it (mutual TLS).
        basic_auth: ``(username, password)`` a scraper must send (HTTP basic auth); other
            requests get 401 and are counted in ``authentication_failures_total`` (no client
            address: a label per address would let anyone grow the series without bound). Only
            a SHA-256 of the credentials is kept: the password is never stored, logged or shown
            in ``repr`` or errors. Use it with TLS off loopback.

    Exported metrics: every entry of :data:`privacy_callbacks.catalog.METRICS`
    (the README's metrics table is generated from it).
    """

    name = "prometheus"

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
        self._auth_digest: bytes | None = None
        self.basic_auth_user: str | None = None
        if basic_auth is not None:
            if (not isinstance(basic_auth, tuple) or len(basic_auth) != 2
                    or not all(isinstance(v, str) and v for v in basic_auth)
                    or ":" in basic_auth[0]):
                # The value itself holds a password: describe it, never echo it.
                raise ValueError("Unexpected value for basic_auth: use a (username, password) "
                                 "tuple of non-empty strings, without ':' in the username")
            token = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()
            self._auth_digest = hashlib.sha256(token.encode()).digest()
            self.basic_auth_user = basic_auth[0]
        self.tls_certfile = tls_certfile
        self.tls_keyfile = tls_keyfile
        self.tls_client_cafile = tls_client_cafile
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"Unexpected value for port: {port!r}; "
                             "use 0-65535 (0 = any free port)")
        if not host:
            raise ValueError(f"Unexpected value for host: {host!r}; use e.g. '127.0.0.1'")
        if pushgateway is not None and (not isinstance(pushgateway, str) or not pushgateway):
            raise ValueError(f"Unexpected value for pushgateway: {pushgateway!r}; use "
                             "'host:port', e.g. '127.0.0.1:9091'")
        if not isinstance(job, str) or not job:
            raise ValueError(f"Unexpected value for job: {job!r}; use a non-empty string")
        for name, value in (("push_interval", push_interval), ("push_timeout", push_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Unexpected value for {name}: {value!r}; use seconds > 0")
        self.port = port
        self.host = host
        self.serve = pushgateway is None if serve is None else serve
        self.pushgateway = pushgateway
        self.job = job
        self.push_interval = float(push_interval)
        self.push_timeout = float(push_timeout)
        self.delete_on_close = delete_on_close
        self._pusher: _Pusher | None = None
        self.registry = registry if registry is not None else CollectorRegistry()
        # Counters and histograms; the collector serves them with the gauges, in catalog order.
        self.families: dict[str, Any] = {
            metric.name: _Histogram(metric) if metric.kind == "histogram" else Counter(
                metric.name, metric.help, labelnames=metric.all_labels, registry=None)
            for metric in catalog.METRICS if metric.kind != "gauge"}
        self._collector = _Collector(self.families)
        self.registry.register(self._collector)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._bound: list[_Bound] = []
        self._histograms: list[_Bound] = []
        self._health: list[tuple[Any, Any]] = []
        self._health_last: list[float] = []
        self._counted: dict[Any, float] = {}
        self._session: str | None = None
        self._base: dict[str, str] = {}
        self._violations: tuple[tuple[str, str, int], ...] = ()
        self._violation_children: dict[tuple[str, str], tuple[Any, list[int]]] = {}
        # Refused requests: counted before open() too (a scraper may knock before the fit starts)
        # and added to the run's series once its labels are known.
        self._auth_lock = threading.Lock()
        self._auth_refused = 0
        self._auth_child: Any = None

    def __repr__(self) -> str:
        auth = f"({self.basic_auth_user!r}, '***')" if self.basic_auth_user else None
        return (f"PrometheusExporter(host={self.host!r}, port={self.port!r}, "
                f"pushgateway={self.pushgateway!r}, tls={self.tls_certfile is not None}, "
                f"basic_auth={auth})")

    @property
    def url(self) -> str | None:
        """``http(s)://host:port/metrics`` once started, else ``None``."""
        if self._server is None:
            return None
        scheme = "https" if self.tls_certfile is not None else "http"
        return f"{scheme}://{self.host}:{self._server.server_port}/metrics"

    def _serve(self, port: int) -> tuple[Any, threading.Thread]:
        """``/metrics`` (behind TLS and/or basic auth if asked) on a small threaded WSGI server."""
        family, address = _address(self.host, port)
        server = _Server((address, port), family)
        app = make_wsgi_app(self.registry)
        server.set_app(_guarded(app, self._auth_digest, self._refused) if self._auth_digest
                       else app)
        if self.tls_certfile is not None:
            try:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                context.load_cert_chain(self.tls_certfile, self.tls_keyfile)
                if self.tls_client_cafile is not None:
                    context.load_verify_locations(self.tls_client_cafile)
                    context.verify_mode = ssl.CERT_REQUIRED
                # The handshake happens in the request's thread, not in the accept loop.
                server.socket = context.wrap_socket(server.socket, server_side=True,
                                                    do_handshake_on_connect=False)
            except BaseException:
                server.server_close()
                raise
        thread = threading.Thread(target=server.serve_forever, name="privacy-metrics-http",
                                  daemon=True)
        thread.start()
        return server, thread

    @property
    def authentication_failures(self) -> int:
        """Requests refused for missing or wrong basic-auth credentials since construction."""
        return self._auth_refused

    def _refused(self) -> None:
        with self._auth_lock:
            self._auth_refused += 1
            if self._auth_child is not None:
                self._auth_child.inc()

    def start(self) -> None:
        if not self.serve or self._server is not None:
            return
        if self._auth_digest is not None and self.tls_certfile is None and not _is_loopback(
                self.host):
            logger.warning("Basic auth without TLS on %s sends the credentials in clear text: "
                           "pass tls_certfile and tls_keyfile", self.host)
        # One endpoint per process under DDP: the port plus the local rank.
        port = self.port + self.local_rank if self.port else 0
        try:
            self._server, self._thread = self._serve(port)
        except ssl.SSLError as exc:
            files = ", ".join(repr(os.fspath(f)) for f in (self.tls_certfile, self.tls_keyfile)
                              if f is not None)
            raise ValueError(f"PrometheusExporter cannot use the TLS files ({files}): "
                             f"{exc.reason or exc}. Pass a PEM certificate and its key") from None
        except OSError as exc:
            raise OSError(
                f"PrometheusExporter cannot listen on {self.host}:{port} ({exc.strerror or exc})."
                f" Choose a free port, or port=0 to pick one (its address is in .url).") from exc
        logger.info("Privacy metrics at %s", self.url)

    def open(self, info: RunInfo) -> None:
        snapshots = self._collector.state[1:]
        if info.session_id != self._session:
            # A new session: the finished one's series are neither served nor pushed on (its
            # Pushgateway group keeps its last push), and its counters start from zero.
            if self._session is not None:
                for family in self.families.values():
                    family.clear()
            snapshots = (None, None, None)
            self._counted.clear()
            self._violation_children = {}
            self._session = info.session_id
        values = {"session_id": info.session_id, "model_name": info.model_name,
                  "accountant": info.accountant, "rank": str(info.rank)}
        # Snapshot-fed metrics: every run label known but at most one (its values come from
        # the snapshot's mapping).
        fed = [metric for metric in catalog.METRICS if metric.attr is not None
               and sum(name not in values for name in metric.all_labels) <= 1]
        self._collector.state = ({m.name: _Gauge(m, values) for m in fed if m.kind == "gauge"},
                                 *snapshots)
        self._bound = [_Bound(metric, self.families[metric.name], values, self._counted)
                       for metric in fed if metric.kind != "gauge"]
        self._histograms = [bound for bound in self._bound if bound.kind == "histogram"]
        dropped = self.families["privacy_export_dropped_total"]
        base = {"session_id": info.session_id, "model_name": info.model_name}
        # Every exporter, the publisher included, reports its drops here (0 is worth seeing).
        self._health = [(source, dropped.labels(**base, exporter=source.name))
                        for source in info.exporters]
        # Drops before this fit were counted in the session they happened in.
        self._health_last = [float(source.dropped) for source, _ in self._health]
        if self.pushgateway is not None and self._pusher is None:
            self._pusher = _Pusher(self, {"session_id": info.session_id, "rank": str(info.rank)})
        self._base = base
        if self._auth_digest is not None:
            with self._auth_lock:
                if self._auth_child is None:
                    self._auth_child = self.families["authentication_failures_total"].labels(
                        **base)
                    self._auth_child.inc(self._auth_refused)
        self._violations = ()

    def export(self, snapshot: PrivacySnapshot) -> None:
        collector = self._collector
        if not snapshot.assessed:
            # A newer step follows in the same publisher batch: only histograms need every
            # step; gauges and counters (running totals) are served from the newest assessed
            # snapshot, so every scrape still reads one snapshot's record -- but for the
            # mechanism gauges, which come from the newest snapshot with device statistics (on
            # a CPU only every k-th step has them).
            with collector.lock:
                if snapshot.device_stats is not None:
                    collector.publish_measured(snapshot)
                for bound in self._histograms:
                    value = getattr(snapshot, bound.attr)
                    if value is not None:
                        bound.update(value)
            return
        with collector.lock:
            collector.publish(snapshot)
            # Ranks other than 0 export no privacy values (steps is None there).
            private = snapshot.steps is not None
            for bound in self._bound:
                value = getattr(snapshot, bound.attr)
                if value is not None:
                    bound.update(value)
                elif private:
                    bound.touch()
            if snapshot.compliance_violations is not self._violations:
                self._count_violations(snapshot.compliance_violations)
        for i, (source, child) in enumerate(self._health):
            value = source.dropped
            if value > self._health_last[i]:
                child.inc(value - self._health_last[i])
                self._health_last[i] = value

    def _count_violations(self, violations: tuple[tuple[str, str, int], ...]) -> None:
        """Rare: the monitor replaces the tuple only when a policy violation is counted."""
        self._violations = violations
        family = self.families["privacy_compliance_violations_total"]
        for policy, kind, count in violations:
            entry = self._violation_children.get((policy, kind))
            if entry is None:
                entry = (family.labels(**self._base, policy=policy, violation_type=kind), [0])
                self._violation_children[(policy, kind)] = entry
            child, last = entry
            if count > last[0]:
                child.inc(count - last[0])
                last[0] = count

    def close(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        pusher, self._pusher = self._pusher, None
        if pusher is not None:
            pusher.close(timeout)
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown(max(0.0, deadline - time.monotonic()))
            server.server_close()
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
