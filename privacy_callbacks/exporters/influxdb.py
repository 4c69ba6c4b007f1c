"""InfluxDBExporter: one point per optimizer step, batched to InfluxDB 2.x/3.x or 1.x."""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
import typing
import urllib.parse
from typing import Any, Callable, Iterator

from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import WriteApi, WriteOptions, WriteType
from reactivex.scheduler import EventLoopScheduler

from .. import catalog
from ..snapshot import PrivacySnapshot
from .base import Exporter, RunInfo

logger = logging.getLogger(__name__)

__all__ = ["InfluxDBExporter"]

_SENDER = "privacy-influxdb"
_WRITER = "privacy-influxdb-write"
# How much later than the step's last point a newer value for that step is written: servers that
# keep milliseconds (VictoriaMetrics) must see a later time, not the same one.
_LATER_NS = 1_000_000


@contextlib.contextmanager
def _logging_untouched() -> Iterator[None]:
    """Undo the logger levels the client sets while it is built (it forces WARNING)."""
    loggers = logging.Logger.manager.loggerDict
    before = {name: lg.level for name, lg in loggers.items() if isinstance(lg, logging.Logger)}
    try:
        yield
    finally:
        for name, lg in list(loggers.items()):
            level = before.get(name, logging.NOTSET)
            if isinstance(lg, logging.Logger) and lg.level != level:
                lg.setLevel(level)


class _V1WriteApi(WriteApi):
    """The client's batching ``WriteApi`` (batches, retries, callbacks), posting the same line
    protocol to InfluxDB 1.x's ``/write?db=`` instead of ``/api/v2/write``."""

    def __init__(self, influxdb_client: InfluxDBClient, write_options: WriteOptions, *,
                 database: str, retention_policy: str | None, **kwargs: Any) -> None:
        self._v1_query = [("db", database)]
        if retention_policy:
            self._v1_query.append(("rp", retention_policy))
        super().__init__(influxdb_client, write_options, **kwargs)

    def _post_write(self, _async_req: bool, bucket: str, org: str, body: bytes, precision: Any,
                    **kwargs: Any) -> Any:
        # Points carry ns timestamps, 1.x's default precision: no precision parameter needed.
        return self._influxdb_client.api_client.call_api(
            "/write", "POST", query_params=list(self._v1_query),
            header_params={"Content-Type": "text/plain; charset=utf-8"}, body=body,
            auth_settings=[], response_type=None, _return_http_data_only=True,
            urlopen_kw=kwargs.get("urlopen_kw"))


class _Closed(RuntimeError):
    """Stops the client's retries of a write once the exporter is closed."""


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a failed write, ``None`` when the server gave no answer."""
    status = getattr(exc, "status", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status", None)
    return status or None


def _server_message(exc: BaseException) -> str:
    body = getattr(exc, "body", None) or getattr(exc, "message", None) or ""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return " ".join(str(body).split())[:200]


def _check_number(name: str, value: object, *, integer: bool = False, zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0 (>= 0 with ``zero``)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or not (value >= 0 if zero else value > 0):
        what = "an integer" if integer else "a finite number"
        raise ValueError(f"Unexpected value for {name}: {value!r}; use {what} "
                         f"{'>= 0' if zero else '> 0'}")


class InfluxDBExporter(Exporter):
    """Writes one point per optimizer step to InfluxDB, never stalling training.

    Each point is measurement ``privacy_training`` with tags ``session_id``, ``model_name``,
    ``rank``, ``accountant``; one field per catalog metric that has a per-step value (its
    ``field`` name, e.g. ``epsilon``, ``noise_multiplier``), an integer field ``step``, and the
    step's end as timestamp (ns). A newer value for a step already written (the exact epsilon
    replacing its upper bound, results that arrived after the last step) is one more point for
    that step, 1 ms after its last one (see :meth:`_stamp`), so the newest point of a fit holds
    the exact final epsilon on every server.

    Points are built on the publisher's thread and go into a bounded buffer; a sender thread feeds
    them, at most one batch at a time, to influxdb-client's batching ``WriteApi``, which writes and
    retries with backoff. During an outage points stay in the buffer; when it is full the oldest
    are dropped, counted in :attr:`dropped` (``privacy_export_dropped_total{exporter="influxdb"}``
    when a :class:`PrometheusExporter` runs too) and warned about once. A write that failed after
    all retries goes back to the front of the buffer, so an outage loses points only beyond
    ``buffer_size``. :meth:`close` writes what is left within ``close_timeout`` and then gives up:
    the process never waits on a server that is gone.

    A server that refuses the writes (HTTP 401/403: credentials, 404: wrong API version, org,
    bucket or database) is reported once, as an error naming the URL and the API version; the
    exporter then stops writing for this fit and counts every point as dropped.

    Args:
        url: Base URL of the server, e.g. ``http://localhost:8086``.
        org: Organization (``api="v2"``).
        bucket: Bucket (``api="v2"``).
        token: API token (``api="v2"``); never logged.
        api: ``"v2"`` for ``/api/v2/write`` (InfluxDB 2.x, 3.x and compatible servers), ``"v1"``
            for ``/write?db=`` (InfluxDB 1.x).
        database: Database (``api="v1"``).
        retention_policy: Retention policy (``api="v1"``); the database's default if ``None``.
        username: User name (``api="v1"``, HTTP basic authentication).
        password: Password (``api="v1"``); never logged.
        buffer_size: Points held while the server is slow or away; the default (60 000) covers
            10 minutes at 100 steps/s.
        batch_size: Points per write request.
        flush_interval: Seconds a partial batch waits before it is written.
        retry_interval: Seconds before the first retry of a failed write; later retries back off
            exponentially.
        max_retries: Retries of one write before its points go back to the buffer.
        max_retry_time: Seconds one write may spend retrying.
        request_timeout: Seconds one HTTP request may take.
        close_timeout: Upper bound, in seconds, on the wait for the last points at the end of a
            fit (the monitor's own bound, 10 s, applies too).

    Exported fields: the ``InfluxDB field`` column of the README's metrics table, generated from
    :data:`privacy_callbacks.catalog.METRICS`, plus ``step``.
    """

    name = "influxdb"

    def __init__(
        self,
        url: str,
        *,
        org: str | None = None,
        bucket: str | None = None,
        token: str | None = None,
        api: str = "v2",
        database: str | None = None,
        retention_policy: str | None = None,
        username: str | None = None,
        password: str | None = None,
        buffer_size: int = 60_000,
        batch_size: int = 1_000,
        flush_interval: float = 1.0,
        retry_interval: float = 5.0,
        max_retries: int = 5,
        max_retry_time: float = 180.0,
        request_timeout: float = 10.0,
        close_timeout: float = 10.0,
    ) -> None:
        super().__init__()
        if api not in ("v1", "v2"):
            raise ValueError(f"Unexpected value for api: {api!r}; use 'v2' (InfluxDB 2.x/3.x, "
                             "/api/v2/write) or 'v1' (InfluxDB 1.x, /write?db=)")
        self.url = self._check_url(url)
        if api == "v2":
            self._check_names(api, required=(("bucket", bucket), ("org", org)),
                              other=(("database", database), ("retention_policy", retention_policy),
                                     ("username", username), ("password", password)))
        else:
            self._check_names(api, required=(("database", database),),
                              other=(("bucket", bucket), ("org", org), ("token", token)))
            if (username is None) != (password is None):
                raise ValueError("username and password go together: pass both, or neither for "
                                 "a server without authentication")
        for key, value in (("buffer_size", buffer_size), ("batch_size", batch_size)):
            _check_number(key, value, integer=True)
        _check_number("max_retries", max_retries, integer=True, zero=True)
        for key, seconds in (("flush_interval", flush_interval),
                             ("retry_interval", retry_interval),
                             ("request_timeout", request_timeout)):
            _check_number(key, seconds)
        for key, seconds in (("max_retry_time", max_retry_time), ("close_timeout", close_timeout)):
            _check_number(key, seconds, zero=True)
        self.api = api
        self.org, self.bucket = org, bucket
        self.database, self.retention_policy, self.username = database, retention_policy, username
        self.buffer_size = buffer_size
        self.batch_size = min(batch_size, buffer_size)
        self.flush_interval = float(flush_interval)
        self.retry_interval = float(retry_interval)
        self.max_retries = max_retries
        self.max_retry_time = float(max_retry_time)
        self.request_timeout = float(request_timeout)
        self.close_timeout = float(close_timeout)
        self.written = 0
        self.retried = 0
        self._token = token
        self._password = password
        self._lock = threading.Condition()
        self._buffer: collections.deque[bytes] = collections.deque()
        self._in_flight = 0
        self._running = False
        self._draining = False
        self._refused = False
        self._warned: set[str] = set()
        self._client: InfluxDBClient | None = None
        self._write_api: WriteApi | None = None
        self._options: WriteOptions | None = None
        self._scheduler: EventLoopScheduler | None = None
        self._sender: threading.Thread | None = None
        self._tags: tuple[tuple[str, str], ...] = ()
        self._fields = self._field_plan()
        # Time and step of the last point built (publisher thread only).
        self._last_ns = 0
        self._last_step: int | None = None

    def __repr__(self) -> str:
        target = (f"org={self.org!r}, bucket={self.bucket!r}" if self.api == "v2"
                  else f"database={self.database!r}")
        return f"InfluxDBExporter(url={self.url!r}, api={self.api!r}, {target})"

    @staticmethod
    def _check_url(url: object) -> str:
        if not isinstance(url, str) or not url:
            raise ValueError(f"Unexpected value for url: {url!r}; use e.g. 'http://localhost:8086'")
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 -- raises on a malformed port
        except ValueError:
            raise ValueError(f"Malformed url {url!r}: use e.g. 'http://localhost:8086'") from None
        if parts.username is not None or parts.password is not None:
            # Not echoed: the URL holds a secret.
            raise ValueError("url must not contain credentials: pass token= (api='v2') or "
                             "username=/password= (api='v1')")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
                or parts.fragment:
            raise ValueError(f"Malformed url {url!r}: use scheme://host:port, e.g. "
                             "'http://localhost:8086'")
        return url.rstrip("/")

    @staticmethod
    def _check_names(api: str, required: tuple[tuple[str, object], ...],
                     other: tuple[tuple[str, object], ...]) -> None:
        for key, value in required:
            if not isinstance(value, str) or not value:
                raise ValueError(f"Unexpected value for {key}: {value!r}; api={api!r} needs a "
                                 f"non-empty {key}")
        for key, value in other:
            if value is not None:
                raise ValueError(f"{key} is not used with api={api!r}: "
                                 + ("InfluxDB 2.x/3.x take org, bucket and token" if api == "v2"
                                    else "InfluxDB 1.x takes database, username and password"))

    @staticmethod
    def _field_plan() -> tuple[tuple[str, str, Callable[[Any], Any]], ...]:
        """(snapshot attribute, field, type) for every per-step catalog metric.

        A field keeps one type in InfluxDB forever (a float written to an integer field fails the
        whole batch), so the type comes from the snapshot's declaration, not from each value.
        """
        hints = typing.get_type_hints(PrivacySnapshot)
        plan = []
        for metric in catalog.METRICS:
            if metric.field is None or metric.attr is None:
                continue
            hint = hints.get(metric.attr)
            if hint is None:  # a property reading the device statistics
                hint = typing.get_type_hints(getattr(PrivacySnapshot, metric.attr).fget)["return"]
            plan.append((metric.attr, metric.field,
                         int if int in (typing.get_args(hint) or (hint,)) else float))
        return tuple(plan)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._running:
            return
        with _logging_untouched():
            if self.api == "v2":
                # influxdb-client annotates token and org `str = None`: None is what it expects
                # when there is no token (org is set: __init__ requires it with api="v2").
                client = InfluxDBClient(url=self.url, token=self._token,  # type: ignore[arg-type]
                                        org=self.org,  # type: ignore[arg-type]
                                        timeout=int(self.request_timeout * 1000))
            elif self.username is not None:
                client = InfluxDBClient(url=self.url, token=f"{self.username}:{self._password}",
                                        auth_basic=True, org="-",
                                        timeout=int(self.request_timeout * 1000))
            else:
                client = InfluxDBClient(url=self.url, org="-",
                                        timeout=int(self.request_timeout * 1000))
        # One daemon thread of our own for the HTTP writes: the client's default is a pool shared
        # by every WriteApi in the process, whose threads the interpreter waits for at exit.
        self._scheduler = EventLoopScheduler(thread_factory=lambda target: threading.Thread(
            target=target, name=_WRITER, daemon=True))
        self._options = WriteOptions(
            write_type=WriteType.batching, batch_size=self.batch_size,
            flush_interval=int(self.flush_interval * 1000),
            retry_interval=int(self.retry_interval * 1000), max_retries=self.max_retries,
            max_retry_time=int(self.max_retry_time * 1000),
            max_close_wait=int(self.close_timeout * 1000), write_scheduler=self._scheduler)
        callbacks: dict[str, Any] = {"success_callback": self._on_success,
                                     "error_callback": self._on_error,
                                     "retry_callback": self._on_retry}
        if self.api == "v2":
            self._write_api = WriteApi(client, self._options, **callbacks)
        else:
            assert self.database is not None  # __init__ requires it with api="v1"
            self._write_api = _V1WriteApi(client, self._options, database=self.database,
                                          retention_policy=self.retention_policy, **callbacks)
        self._client = client
        with self._lock:
            self._buffer.clear()
            self._in_flight = 0
            self._refused = False
            self._draining = False
            self._running = True
        self._sender = threading.Thread(target=self._send, name=_SENDER, daemon=True)
        self._sender.start()

    def open(self, info: RunInfo) -> None:
        self._tags = tuple((tag, str(getattr(info, tag))) for tag in catalog.INFLUX_TAGS)
        self._last_ns, self._last_step = 0, None

    def _stamp(self, snapshot: PrivacySnapshot) -> int:
        """The point's time: the step's end, or 1 ms after the step's last point for a newer
        value of the step just written.

        The monitor publishes a step again, with the step's time, when a better value arrives:
        the exact epsilon replacing the upper bound published first, an attack's result after
        the last step. InfluxDB would merge it into the step's point, but a server that keeps
        every sample (VictoriaMetrics, at millisecond resolution) holds both values at one time
        and returns either -- the bound together with ``epsilon_exact`` 1, say. One ms later the
        newest value is the latest point everywhere, and the bound stays what it was: the
        value published at the step's end. Times never go back, so the newest point is the
        last one published (the publisher never sends an earlier step after a later one).
        """
        stamp = snapshot.timestamp_ns
        if stamp <= self._last_ns:
            stamp = self._last_ns + (_LATER_NS if snapshot.step == self._last_step else 1)
        self._last_ns, self._last_step = stamp, snapshot.step
        return stamp

    def export(self, snapshot: PrivacySnapshot) -> None:
        if self._refused or not self._running:
            with self._lock:
                self.dropped += 1
            return
        point = Point(catalog.INFLUX_MEASUREMENT)
        for key, value in self._tags:
            point.tag(key, value)
        for attr, field, cast in self._fields:
            value = getattr(snapshot, attr)
            if value is not None:
                point.field(field, cast(value))
        point.field(catalog.INFLUX_STEP_FIELD, snapshot.step)
        point.time(self._stamp(snapshot), WritePrecision.NS)
        line = point.to_line_protocol().encode()
        with self._lock:
            buffer = self._buffer
            buffer.append(line)
            full = self._trim()
            # The sender wakes once per flush_interval anyway: wake it early only for a full
            # batch, so a step does not cost a thread switch.
            if len(buffer) >= self.batch_size:
                self._lock.notify_all()
        if full:
            self._warn_full()

    def close(self, timeout: float = 10.0) -> None:
        write_api, sender = self._write_api, self._sender
        if write_api is None or sender is None:
            return
        budget = max(0.0, min(timeout, self.close_timeout))
        deadline = time.monotonic() + budget
        with self._lock:
            self._draining = True
            self._lock.notify_all()
            while self._buffer and not self._refused:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            self._running = False
            self._lock.notify_all()
        sender.join(max(0.0, deadline - time.monotonic()))
        # Completing the client's stream writes its last partial batch now; it waits for the
        # write at most max_close_wait (300 s by default in the client: ours is what is left).
        assert self._options is not None and self._scheduler is not None
        self._options.max_close_wait = max(0, int((deadline - time.monotonic()) * 1000))
        write_api.close()
        self._scheduler.dispose()
        if self._client is not None:
            self._client.close()
        with self._lock:
            lost = len(self._buffer) + self._in_flight
            self.dropped += lost
            self._buffer.clear()
            self._in_flight = 0
            # A write still retrying reports back later: its points are already counted above.
            self._write_api = None
        self._sender = self._client = self._scheduler = self._options = None
        if lost:
            logger.warning("%d privacy points were not written to InfluxDB at %s within %.1f s "
                           "and are counted as dropped", lost, self.url, budget)

    # -- background --------------------------------------------------------------------------

    def _send(self) -> None:
        """Feed the client at most one batch at a time, so its own queue never grows."""
        while True:
            with self._lock:
                self._lock.wait_for(self._batch_ready, timeout=self.flush_interval)
                if not self._running:
                    return
                count = min(len(self._buffer), self.batch_size - self._in_flight)
                if count <= 0:
                    continue
                lines = [self._buffer.popleft() for _ in range(count)]
                self._in_flight += count
                self._lock.notify_all()
            write_api = self._write_api
            if write_api is not None:
                # influxdb-client annotates org `str = None` and write_precision as its
                # WritePrecision class, whose members (WritePrecision.NS) are plain strings.
                write_api.write(self.bucket or "", self.org, lines,  # type: ignore[arg-type]
                                write_precision=WritePrecision.NS)  # type: ignore[arg-type]

    def _batch_ready(self) -> bool:
        if not self._running:
            return True
        room = self.batch_size - self._in_flight
        return room > 0 and bool(self._buffer) and (
            self._draining or len(self._buffer) >= room)

    def _on_success(self, _key: tuple, data: bytes) -> None:
        count = data.count(b"\n") + 1
        with self._lock:
            if self._write_api is None:
                return
            self._in_flight = max(0, self._in_flight - count)
            self.written += count
            self._lock.notify_all()

    def _on_retry(self, _key: tuple, _data: bytes, exc: BaseException) -> None:
        with self._lock:
            closed = self._write_api is None
            if not closed:
                self.retried += 1
        if closed:
            # Raised inside the client's retry loop, it ends the write: a closed exporter leaves
            # no thread retrying (with backoff, up to max_retry_time) behind it.
            raise _Closed(f"InfluxDBExporter for {self.url} is closed; its points are counted "
                          "as dropped")
        self._warn_once("unreachable", logging.WARNING,
                        "InfluxDB at %s is not taking writes (%s); points are kept (up to %d) "
                        "and retried", self.url, type(exc).__name__, self.buffer_size)

    def _on_error(self, _key: tuple, data: bytes, exc: BaseException) -> None:
        lines = data.split(b"\n")
        status = _status(exc)
        with self._lock:
            if self._write_api is None:
                return
            self._in_flight = max(0, self._in_flight - len(lines))
            if status is None or status >= 429:
                # Retries exhausted on an outage: the points wait in the buffer for the next try.
                self._buffer.extendleft(reversed(lines))
                full = self._trim()
            else:
                self.dropped += len(lines)
                full = False
                if status in (401, 403, 404):
                    self._refused = True
                    self.dropped += len(self._buffer)
                    self._buffer.clear()
            self._lock.notify_all()
        if full:
            self._warn_full()
        if status is not None and status < 429:
            self._refusal(status, exc)

    def _refusal(self, status: int, exc: BaseException) -> None:
        endpoint = "/api/v2/write" if self.api == "v2" else f"/write?db={self.database}"
        said = _server_message(exc)
        if status in (401, 403):
            fix = ("check the token and its write permission on the bucket" if self.api == "v2"
                   else "check username and password")
        elif status == 404 and self.api == "v2":
            fix = (f"InfluxDB 1.x has no /api/v2/write: use api='v1'; on InfluxDB 2.x/3.x check "
                   f"org {self.org!r} and bucket {self.bucket!r}")
        elif status == 404:
            fix = (f"create the database (CREATE DATABASE \"{self.database}\"), or use api='v2' "
                   "for InfluxDB 2.x/3.x")
        else:
            fix = "the points of this batch are dropped"
        off = (" The InfluxDB exporter stops writing for this fit; points are counted as dropped."
               if self._refused else "")
        self._warn_once(f"status-{status}", logging.ERROR,
                        "InfluxDB at %s (API %s) answered HTTP %d to %s%s: %s.%s", self.url,
                        self.api, status, endpoint, f" ({said})" if said else "", fix, off)

    def _trim(self) -> bool:
        """Drop the oldest points beyond the bound; call with the lock held."""
        over = len(self._buffer) - self.buffer_size
        for _ in range(over):
            self._buffer.popleft()
        if over > 0:
            self.dropped += over
        return over > 0

    def _warn_full(self) -> None:
        self._warn_once("full", logging.WARNING,
                        "InfluxDB exporter buffer full (%d points, server at %s not keeping up): "
                        "dropping the oldest; see privacy_export_dropped_total"
                        "{exporter=\"influxdb\"}", self.buffer_size, self.url)

    def _warn_once(self, key: str, level: int, msg: str, *args: object) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        logger.log(level, msg, *args)
