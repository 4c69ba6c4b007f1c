"""PrometheusExporter: every catalog metric on an HTTP ``/metrics`` endpoint."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .. import catalog
from .base import Exporter, RunInfo

if TYPE_CHECKING:
    from ..snapshot import PrivacySnapshot

logger = logging.getLogger(__name__)

__all__ = ["PrometheusExporter"]

_TYPES = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}


class _Bound:
    """One series fed from one snapshot attribute; the child is bound on its first value."""

    __slots__ = ("attr", "child", "family", "labels", "last")

    def __init__(self, attr: str, family: Any, labels: dict[str, str]) -> None:
        self.attr, self.family, self.labels = attr, family, labels
        self.child: Any = None
        self.last = 0.0


class PrometheusExporter(Exporter):
    """Serves every catalog metric for Prometheus to scrape.

    The endpoint runs on the global-rank-0 process from ``setup`` to ``teardown``. Each snapshot
    only sets label-bound children (one locked float each), on the publisher's thread.

    Args:
        port: TCP port of the ``/metrics`` endpoint; ``0`` picks a free one (see :attr:`url`).
        host: Address to listen on. Loopback by default: exposing metrics beyond this machine is
            a deliberate choice.
        registry: Registry to register the metrics in. By default the exporter owns a new one,
            never the global ``REGISTRY``, so building it twice (notebooks, tests) is safe.
        serve: ``False`` registers and updates the metrics without an HTTP endpoint (to serve
            ``registry`` yourself).

    Exported metrics: every entry of :data:`privacy_callbacks.catalog.METRICS`
    (the README's metrics table is generated from it).
    """

    name = "prometheus"

    def __init__(self, port: int = 9108, host: str = "127.0.0.1",
                 registry: CollectorRegistry | None = None, *, serve: bool = True) -> None:
        super().__init__()
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"Unexpected value for port: {port!r}; use 0-65535 (0 = any free port)")
        if not host:
            raise ValueError(f"Unexpected value for host: {host!r}; use e.g. '127.0.0.1'")
        self.port = port
        self.host = host
        self.serve = serve
        self.registry = registry if registry is not None else CollectorRegistry()
        self.families: dict[str, Any] = {}
        for metric in catalog.METRICS:
            cls = _TYPES[metric.kind]
            kwargs: dict[str, Any] = {"labelnames": metric.all_labels, "registry": self.registry}
            if metric.kind == "histogram":
                kwargs["buckets"] = metric.buckets
            self.families[metric.name] = cls(metric.name, metric.help, **kwargs)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._gauges: list[_Bound] = []
        self._counters: list[_Bound] = []
        self._health: list[tuple[Any, Any]] = []
        self._health_last: list[float] = []

    @property
    def url(self) -> str | None:
        """``http://host:port/metrics`` once started, else ``None``."""
        if self._server is None:
            return None
        return f"http://{self.host}:{self._server.server_port}/metrics"

    def start(self) -> None:
        if not self.serve or self._server is not None:
            return
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host,
                                                           registry=self.registry)
        except OSError as exc:
            raise OSError(
                f"PrometheusExporter cannot listen on {self.host}:{self.port} ({exc.strerror or exc})."
                f" Choose a free port, or port=0 to pick one (its address is in .url).") from exc
        logger.info("Privacy metrics at %s", self.url)

    def open(self, info: RunInfo) -> None:
        values = {"session_id": info.session_id, "model_name": info.model_name,
                  "accountant": info.accountant, "rank": str(info.rank)}
        self._gauges, self._counters = [], []
        for metric in catalog.METRICS:
            if metric.attr is None:
                continue
            labels = {name: values[name] for name in metric.all_labels}
            bound = _Bound(metric.attr, self.families[metric.name], labels)
            (self._counters if metric.kind == "counter" else self._gauges).append(bound)
        dropped = self.families["privacy_export_dropped_total"]
        base = {"session_id": info.session_id, "model_name": info.model_name}
        # Every exporter, the publisher included, reports its drops here (0 is worth seeing).
        self._health = [(source, dropped.labels(**base, exporter=source.name))
                        for source in info.exporters]
        self._health_last = [0.0] * len(self._health)

    def export(self, snapshot: "PrivacySnapshot") -> None:
        for bound in self._gauges:
            value = getattr(snapshot, bound.attr)
            if value is None:
                continue
            child = bound.child
            if child is None:
                child = bound.child = bound.family.labels(**bound.labels)
            child.set(value)
        for bound in self._counters:
            value = getattr(snapshot, bound.attr)
            if value is None or not value > bound.last:
                continue
            child = bound.child
            if child is None:
                child = bound.child = bound.family.labels(**bound.labels)
            child.inc(value - bound.last)
            bound.last = value
        for i, (source, child) in enumerate(self._health):
            value = source.dropped
            if value > self._health_last[i]:
                child.inc(value - self._health_last[i])
                self._health_last[i] = value

    def close(self, timeout: float = 10.0) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout)
