"""A tamper-evident, append-only audit trail of privacy events (JSON lines).

Each line is one JSON object::

    {"seq": 3, "ts": "2025-01-01T12:00:00.000000Z", "event": "budget_threshold",
     "data": {...}, "prev": "<sha256 of line 2>", "hash": "<sha256 of this record>",
     "hmac": "<HMAC-SHA256 of this record>"}

``prev`` is the SHA-256 of the previous line's exact bytes (64 zeros for the first record), so
editing, deleting or reordering any record breaks the chain at that record. ``hash`` covers the
record itself (every key but ``hash`` and ``hmac``, canonical JSON), so an edit is pinned to the
record edited. Anyone can recompute plain hashes; with a secret key (``hmac``), a forger also needs
the key. Cutting records off the end leaves a valid shorter chain: keep the head hash that
``verify`` prints somewhere else when that matters.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)

__all__ = ["AuditTrail", "VerifyResult", "verify"]

DEFAULT_KEY_ENV = "PRIVACY_AUDIT_HMAC_KEY"
_GENESIS = "0" * 64


def _canonical(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k not in ("hash", "hmac")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False, default=str).encode()


def _key_from_env(env: str | None) -> bytes | None:
    if not env:
        return None
    value = os.environ.get(env)
    return value.encode() if value else None


def _jsonable(value: Any) -> Any:
    """Floats that JSON cannot hold (inf, nan) become strings; the rest is left as is."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class AuditTrail:
    """Appends hash-chained privacy events to a JSON-lines file with mode 0600.

    Events are rare (fit start and end, budget thresholds, guard stops, resumes, policy violations,
    the first accounting error), so each is written and flushed when it happens; nothing is
    written per step. An existing file is continued: its last record's hash and sequence number
    are read once when the trail opens.

    Args:
        path: The audit log file; created with mode 0600 if missing.
        key_env: Environment variable holding the HMAC key. When it is set, every record also
            carries an HMAC-SHA256; verify with the same variable set. The key never leaves the
            process (not in records, logs, errors or ``repr``).
        fsync: ``os.fsync`` after each record, so an event survives a crash right after it.
    """

    def __init__(self, path: str | os.PathLike[str], *, key_env: str | None = DEFAULT_KEY_ENV,
                 fsync: bool = True) -> None:
        if not str(path):
            raise ValueError(f"Unexpected value for path: {path!r}; use a file path")
        self.path = Path(path)
        self.key_env = key_env
        self.fsync = fsync
        self._key = _key_from_env(key_env)
        self._lock = threading.Lock()
        self._seq: int | None = None
        self._prev = _GENESIS

    def __repr__(self) -> str:
        return (f"AuditTrail(path={str(self.path)!r}, key_env={self.key_env!r}, "
                f"hmac={'on' if self._key else 'off'})")

    @property
    def hmac_enabled(self) -> bool:
        """Whether records carry an HMAC (the key variable was set when the trail was built)."""
        return self._key is not None

    def _resume(self) -> None:
        self._seq, self._prev = 0, _GENESIS
        if not self.path.exists():
            return
        last = b""
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    last = line.rstrip(b"\n")
        if last:
            try:
                self._seq = int(json.loads(last)["seq"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{self.path} does not end with an audit record; run "
                                 f"`python -m privacy_callbacks audit verify {self.path}` or "
                                 "start a new file") from None
            self._prev = hashlib.sha256(last).hexdigest()

    def record(self, event: str, **data: Any) -> dict[str, Any]:
        """Append one event; returns the record written.

        Args:
            event: Event name, e.g. ``"fit_start"``.
            **data: JSON-serialisable facts about the event.
        """
        with self._lock:
            if self._seq is None:
                self._resume()
            assert self._seq is not None
            ts = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            record: dict[str, Any] = {"seq": self._seq + 1, "ts": ts, "event": event,
                                      "data": _jsonable(data), "prev": self._prev}
            body = _canonical(record)
            record["hash"] = hashlib.sha256(body).hexdigest()
            if self._key is not None:
                record["hmac"] = hmac.new(self._key, body, hashlib.sha256).hexdigest()
            line = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str).encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.fchmod(fd, 0o600)  # also tightens a file that existed with looser bits
                os.write(fd, line + b"\n")
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._seq += 1
            self._prev = hashlib.sha256(line).hexdigest()
            return record


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    Attributes:
        ok: Every record is intact and in order.
        records: Records checked (all of them when ``ok``).
        line: 1-based line of the first bad record, or ``None``.
        seq: Sequence number that line should have carried, or ``None``.
        reason: What is wrong with it.
        head: SHA-256 of the last good line (anchor it elsewhere to detect truncation).
    """

    ok: bool
    records: int
    line: int | None = None
    seq: int | None = None
    reason: str = ""
    head: str = _GENESIS

    def __str__(self) -> str:
        if self.ok:
            return f"OK: {self.records} records, head {self.head}"
        return f"BROKEN at line {self.line} (record {self.seq}): {self.reason}"


def verify(path: str | os.PathLike[str], *, key_env: str | None = DEFAULT_KEY_ENV,
           require_hmac: bool = False) -> VerifyResult:
    """Check an audit log; the result names the first broken or altered record.

    Args:
        path: The audit log.
        key_env: Environment variable with the HMAC key; when set, every record's HMAC is checked.
        require_hmac: Fail if the key variable is not set.
    """
    key = _key_from_env(key_env)
    if require_hmac and key is None:
        raise ValueError(f"require_hmac is set but the environment variable {key_env!r} is empty:"
                         " export the audit HMAC key there")
    prev = _GENESIS
    count = 0
    with open(path, "rb") as f:
        lines: Iterable[bytes] = list(f)
    for number, raw in enumerate(lines, start=1):
        expected = count + 1
        line = raw.rstrip(b"\n")

        # Called only within this iteration, so the loop variables it reads are the current ones.
        def broken(reason: str) -> VerifyResult:
            return VerifyResult(False, count, number, expected, reason, prev)  # noqa: B023

        try:
            record = json.loads(line)
        except ValueError:
            return broken("not valid JSON")
        if not isinstance(record, dict):
            return broken("not a JSON object")
        seq = record.get("seq")
        if seq != expected:
            if isinstance(seq, int) and seq > expected:
                return broken(f"found record {seq}: record(s) {expected}..{seq - 1} deleted "
                              "or moved")
            return broken(f"found record {seq!r}: records reordered or duplicated")
        if record.get("prev") != prev:
            return broken("previous-record hash does not match line "
                          f"{number - 1}: a record before it was altered, inserted or removed")
        body = _canonical(record)
        if record.get("hash") != hashlib.sha256(body).hexdigest():
            return broken("record content altered (its hash does not match)")
        if key is not None:
            mac = record.get("hmac")
            if not isinstance(mac, str) or not hmac.compare_digest(
                    mac, hmac.new(key, body, hashlib.sha256).hexdigest()):
                return broken("HMAC missing or wrong: altered, or signed with another key")
        prev = hashlib.sha256(line).hexdigest()
        count += 1
    return VerifyResult(True, count, head=prev)
