"""InfluxDBExporter: one point per optimizer step, batched to InfluxDB 2.x/3.x or 1.x."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import typing
import urllib.parse
from typing import Any, Callable

from .. import catalog, checks
from ..snapshot import PrivacySnapshot
from .base import Exporter, RunInfo

try:
    from influxdb_client import InfluxDBClient, Point
except ImportError as exc:  # an extra: the core never needs it
    raise ImportError("InfluxDBExporter needs influxdb-client: "
                      "pip install 'privacy_callbacks[influxdb]'") from exc

logger = logging.getLogger(__name__)

__all__ = ["InfluxDBExporter"]

_LATER_NS = 1_000_000  # a step's newer value lands 1 ms after its last point (VictoriaMetrics: ms)
_NAMES = {"v2": ("org", "bucket", "token"),
          "v1": ("database", "retention_policy", "username", "password")}
_REQUIRED = {"v2": ("org", "bucket"), "v1": ("database",)}
# The fix a refusal's error names, by (api, status); 403 reads as 401.
_FIXES: dict[tuple[str, Any], str] = {
    ("v2", 401): "check the token and its write permission on the bucket",
    ("v1", 401): "check username and password",
    ("v2", 404): "InfluxDB 1.x has no /api/v2/write: use api='v1'; on InfluxDB 2.x/3.x check "
                 "org {org!r} and bucket {bucket!r}",
    ("v1", 404): "create the database (CREATE DATABASE \"{database}\"), or use api='v2' for "
                 "InfluxDB 2.x/3.x"}
_FULL = ("InfluxDB exporter buffer full (%d points, server at %s not keeping up): dropping the "
         "oldest; see privacy_export_dropped_total{exporter=\"influxdb\"}")


def _levels() -> dict[logging.Logger, int]:
    known = [logging.getLogger(), *list(logging.Logger.manager.loggerDict.values())]
    return {lg: lg.level for lg in known if isinstance(lg, logging.Logger)}


def _check_url(url: object) -> str:
    parts = urllib.parse.urlsplit(url if isinstance(url, str) else "")
    if parts.username is not None or parts.password is not None:  # not echoed: it holds a secret
        raise ValueError("url must not contain credentials: pass token= or username=/password=")
    with contextlib.suppress(ValueError):  # from .port: a malformed port
        if parts.scheme in ("http", "https") and parts.hostname and parts.port != 0 \
                and not (parts.query or parts.fragment):
            return str(url).rstrip("/")
    raise ValueError(f"Unexpected value for url: {url!r}; use scheme://host:port, e.g. "
                     "'http://localhost:8086'")


# (attribute, field, type) per catalog field. A field keeps its first type (a float to an integer
# field fails the batch): the snapshot's declaration decides; ``snapshot.extra`` holds floats.
_HINTS = typing.get_type_hints(PrivacySnapshot)
_FIELDS: tuple[tuple[str, str, Callable[[Any], Any]], ...] = tuple(
    (m.attr, m.field, int if int in typing.get_args(_HINTS.get(m.attr)) else float)
    for m in catalog.METRICS if m.attr is not None and m.field is not None)


class InfluxDBExporter(Exporter):
    """Writes one point per optimizer step to InfluxDB, never stalling training.

    ``api="v2"`` writes to ``/api/v2/write`` with ``org``, ``bucket``, ``token`` (InfluxDB 2.x,
    3.x and compatible), ``api="v1"`` to ``/write?db=`` with ``database``, ``retention_policy``,
    ``username``/``password`` (InfluxDB 1.x). A point (measurement ``privacy_training``, tags from
    ``catalog.INFLUX_TAGS``, a field per catalog metric with one, and ``step``) is stamped at the
    step's end; a newer value for a step 1 ms later. Points wait in our bounded buffer (the
    client's queues without bound in an outage and waits 300 s at close; the default holds 10
    minutes at 100 steps/s) for a sender thread that writes ``batch_size`` at a time and retries
    with backoff. What a full buffer drops (its oldest) or :meth:`close` cannot write within
    ``close_timeout`` s is counted in :attr:`dropped` and warned about once. A refusal (401/403,
    404) is one error naming the URL, the API and the fix, and drops the rest of the fit.
    Credentials are never logged.
    """

    name = "influxdb"

    def __init__(self, url: str, *, org: str | None = None, bucket: str | None = None,
                 token: str | None = None, api: str = "v2", database: str | None = None,
                 retention_policy: str | None = None, username: str | None = None,
                 password: str | None = None, buffer_size: int = 60_000, batch_size: int = 1_000,
                 flush_interval: float = 1.0, retry_interval: float = 5.0,
                 max_retry_delay: float = 30.0, request_timeout: float = 10.0,
                 close_timeout: float = 10.0) -> None:
        super().__init__()
        if api not in _NAMES:
            raise ValueError(f"Unexpected value for api: {api!r}; use 'v2' (InfluxDB 2.x/3.x, "
                             "/api/v2/write) or 'v1' (InfluxDB 1.x, /write?db=)")
        self.url = _check_url(url)
        names = {"org": org, "bucket": bucket, "token": token, "database": database,
                 "retention_policy": retention_policy, "username": username, "password": password}
        for key, value in names.items():
            if key in _REQUIRED[api] and (not isinstance(value, str) or not value):
                raise ValueError(f"Unexpected value for {key}: {value!r}; use a non-empty "
                                 f"string (api={api!r} needs a {key})")
            if key not in _NAMES[api] and value is not None:  # not echoed: it may be a secret
                raise ValueError(f"{key} is not used with api={api!r}: InfluxDB 2.x/3.x "
                                 "(api='v2') takes org, bucket and token, InfluxDB 1.x "
                                 "(api='v1') database, username and password")
        if (username is None) != (password is None):
            raise ValueError("username and password go together: pass both, or neither")
        count, seconds = "an integer > 0", "a finite number > 0"
        self.buffer_size = checks.number("buffer_size", buffer_size, count, integer=True)
        self.batch_size = min(checks.number("batch_size", batch_size, count, integer=True),
                              buffer_size)
        self.flush_interval = checks.number("flush_interval", flush_interval, seconds)
        self.retry_interval = checks.number("retry_interval", retry_interval, seconds)
        self.max_retry_delay = checks.number("max_retry_delay", max_retry_delay, seconds)
        self.request_timeout = checks.number("request_timeout", request_timeout, seconds)
        self.close_timeout = checks.number("close_timeout", close_timeout, "a finite number >= 0",
                                           low_ok=True)
        self.api, self.org, self.bucket, self.database = api, org, bucket, database
        self._path = "/api/v2/write" if api == "v2" else "/write"
        # What each write sends, decided once; the secrets live only in the client's auth header.
        rp = [("rp", retention_policy)] if retention_policy else []
        self._query = ([("org", org), ("bucket", bucket)] if api == "v2"
                       else [("db", database), *rp]) + [("precision", "ns")]
        self._auth: dict[str, Any] = {"token": token} if api == "v2" else {
            "token": f"{username}:{password}", "auth_basic": True} if username else {}
        self.written = self.retried = 0
        self._lock = threading.Condition()
        self._buffer: collections.deque[bytes] = collections.deque(maxlen=self.buffer_size)
        self._in_flight = 0  # points of the write under way, out of the buffer
        self._draining = self._refused = False
        self._warned: set[str] = set()
        self._sender: threading.Thread | None = None  # None: not started, or closed

    def start(self) -> None:
        if self._sender is not None:
            return
        before = _levels()  # building a client sets its loggers, and the root, to WARNING
        client = InfluxDBClient(self.url, timeout=int(self.request_timeout * 1000), **self._auth)
        for lg in _levels():
            lg.setLevel(before.get(lg, logging.NOTSET))
        with self._lock:  # close() left the buffer empty
            self._draining = self._refused = False
            self._sender = threading.Thread(target=self._send, args=(client,),
                                            name="privacy-influxdb", daemon=True)
            self._sender.start()

    def open(self, info: RunInfo) -> None:
        self._tags = {tag: str(getattr(info, tag)) for tag in catalog.INFLUX_TAGS}
        self._last_ns, self._last_step = 0, -1  # of the last point built (publisher thread)

    def export(self, snapshot: PrivacySnapshot) -> None:
        values = {field: kind(value) for attr, field, kind in _FIELDS
                  if (value := snapshot.get(attr)) is not None}
        # A step published again (a better value) 1 ms later: at one time, either could be read.
        stamp = snapshot.timestamp_ns
        if stamp <= self._last_ns:
            stamp = self._last_ns + (_LATER_NS if snapshot.step == self._last_step else 1)
        self._last_ns, self._last_step = stamp, snapshot.step
        line = Point.from_dict({
            "measurement": catalog.INFLUX_MEASUREMENT, "tags": self._tags, "time": stamp,
            "fields": {**values, catalog.INFLUX_STEP_FIELD: snapshot.step}},
        ).to_line_protocol().encode()  # the default precision, ns
        with self._lock:
            if self._refused or self._sender is None:
                self.dropped += 1
                return
            full = len(self._buffer) == self.buffer_size  # the deque drops its oldest
            self.dropped += full
            self._buffer.append(line)
            # The sender wakes each flush_interval: early only for a full batch (a thread switch).
            if len(self._buffer) >= self.batch_size:
                self._lock.notify_all()
        if full:
            self._warn_once("full", logging.WARNING, _FULL, self.buffer_size, self.url)

    def close(self, timeout: float = 10.0) -> None:
        sender = self._sender
        if sender is None:
            return
        budget = max(0.0, min(timeout, self.close_timeout))
        with self._lock:  # the sender writes what is left, then stops
            self._draining = True
            self._lock.notify_all()
        sender.join(budget)
        with self._lock:  # a write still under way ends within request_timeout, unheard: counted
            lost, self._in_flight, self._sender = len(self._buffer) + self._in_flight, 0, None
            self.dropped += lost
            self._buffer.clear()
            self._lock.notify_all()  # a sender still waiting stops now
        if lost:
            logger.warning("%d privacy points were not written to InfluxDB at %s within %.1f s "
                           "and are counted as dropped", lost, self.url, budget)

    def _send(self, client: InfluxDBClient) -> None:
        me, delay = threading.current_thread(), 0.0
        with contextlib.closing(client):
            while (batch := self._next(me, delay)) is not None:
                if not batch:
                    continue
                error: Exception | None = None
                try:  # WriteApi posts only to /api/v2/write (not in InfluxDB 1.x before 1.8);
                    # the public call it makes posts to either (it adds headers: a fresh dict).
                    client.api_client.call_api(self._path, "POST", query_params=self._query,
                                               body=b"\n".join(batch), auth_settings=[],
                                               header_params={"Content-Type": "text/plain"})
                except Exception as exc:  # the server's answer, or none: both handled below
                    error = exc
                delay = self._settle(me, batch, error, delay)

    def _next(self, me: threading.Thread, delay: float) -> list[bytes] | None:
        """The next batch (``None``: stop) after ``delay`` (cut short by the close: one more try)
        and then a full batch, ``flush_interval`` or the close."""
        def stop() -> bool:  # closed, refused, or all written at the close
            return self._sender is not me or self._refused or self._draining and not self._buffer
        with self._lock:
            was = self._draining
            self._lock.wait_for(lambda: stop() or self._draining != was, delay)
            self._lock.wait_for(lambda: stop() or self._draining
                                or len(self._buffer) >= self.batch_size, self.flush_interval)
            if stop():
                return None
            self._in_flight = min(self.batch_size, len(self._buffer))
            return [self._buffer.popleft() for _ in range(self._in_flight)]

    def _settle(self, me: threading.Thread, batch: list[bytes], error: Exception | None,
                delay: float) -> float:
        """Count a write's points; the wait before the next write."""
        status = getattr(error, "status", None) or None
        rejected = status is not None and status < 429  # else an outage: keep the newest
        with self._lock:
            if self._sender is not me:  # closed meanwhile: these points are counted
                return 0.0
            self._in_flight = 0
            if error is None:
                self.written += len(batch)
                return 0.0
            kept = [] if rejected else batch[max(0, len(batch) - self.buffer_size
                                                 + len(self._buffer)):]
            self._buffer.extendleft(reversed(kept))
            self.retried += not rejected
            self._refused = status in (401, 403, 404)
            self.dropped += len(batch) - len(kept) + (len(self._buffer) if self._refused else 0)
            if self._refused:
                self._buffer.clear()
        if rejected:  # one error naming the fix
            said = getattr(error, "message", None) or ""
            said = " ".join(str(said.decode("utf-8", "replace") if isinstance(said, bytes)
                                else said).split())[:200]
            fix = _FIXES.get((self.api, 401 if status == 403 else status), "batch dropped").format(
                org=self.org, bucket=self.bucket, database=self.database)
            self._warn_once(f"status-{status}", logging.ERROR, "InfluxDB at %s (API %s) answered "
                            "HTTP %d to %s%s: %s.%s", self.url, self.api, status, self._path,
                            f" ({said})" if said else "", fix,
                            " The exporter stops writing for this fit; points are counted as "
                            "dropped." if self._refused else "")
            return 0.0
        if len(kept) < len(batch):
            self._warn_once("full", logging.WARNING, _FULL, self.buffer_size, self.url)
        self._warn_once("unreachable", logging.WARNING, "InfluxDB at %s is not taking writes "
                        "(%s); points are kept (up to %d) and retried", self.url,
                        type(error).__name__, self.buffer_size)
        return min(2 * delay, self.max_retry_delay) if delay else self.retry_interval

    def _warn_once(self, key: str, level: int, msg: str, *args: object) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.log(level, msg, *args)
