"""A tamper-evident audit trail: JSON lines ``{seq, ts, event, data, prev, hash[, hmac]}``.
``prev`` (SHA-256 of the line before) pins deletions and reordering, ``hash`` an edit, ``hmac`` a
forger without the key. A cut-off end is a valid shorter chain: keep :func:`verify`'s head apart.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_KEY_ENV", "AuditTrail", "VerifyResult", "verify"]

DEFAULT_KEY_ENV = "PRIVACY_AUDIT_HMAC_KEY"
_GENESIS = "0" * 64


def _canonical(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k not in ("hash", "hmac")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _key(env: str | None) -> bytes | None:
    value = os.environ.get(env) if env else None
    return value.encode() if value else None


def _jsonable(value: Any) -> Any:
    """Strict JSON: inf and nan become their ``repr``, keys strings, other objects ``str``."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value if value is None or isinstance(value, (str, int, float)) else str(value)


class AuditTrail:
    """Appends hash-chained events to ``path`` (mode 0600, continuing its chain); an HMAC-SHA256
    too when ``key_env`` holds a key (never in records, logs or ``repr``); ``fsync`` each record."""

    def __init__(self, path: str | os.PathLike[str], *, key_env: str | None = DEFAULT_KEY_ENV,
                 fsync: bool = True) -> None:
        if not str(path):
            raise ValueError("Unexpected value for path: ''; use a file path, e.g. 'audit.jsonl'")
        self.path, self.key_env, self.fsync = Path(path), key_env, fsync
        self._key, self._lock = _key(key_env), threading.Lock()
        self._seq: int | None = None  # with ``_prev``, from the file at the first record

    @property
    def hmac_enabled(self) -> bool:
        return self._key is not None

    def record(self, event: str, **data: Any) -> dict[str, Any]:
        """Append one event with ``data``, its facts; returns the record written."""
        with self._lock:
            if self._seq is None:  # continue the file's chain from its last line
                last = self.path.read_bytes().rstrip().rpartition(b"\n")[2] \
                    if self.path.exists() else b""
                try:
                    self._seq = int(json.loads(last)["seq"]) if last else 0
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{self.path} does not end with an audit record; run "
                                     f"`python -m privacy_callbacks audit verify {self.path}` "
                                     "or start a new file") from None
                self._prev = hashlib.sha256(last).hexdigest() if last else _GENESIS
            ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            record = {"seq": self._seq + 1, "ts": ts, "event": event, "data": _jsonable(data),
                      "prev": self._prev}
            body = _canonical(record)
            record["hash"] = hashlib.sha256(body).hexdigest()
            if self._key is not None:
                record["hmac"] = hmac.new(self._key, body, hashlib.sha256).hexdigest()
            line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            with open(os.open(self.path, flags, 0o600), "ab", buffering=0) as out:
                os.fchmod(out.fileno(), 0o600)  # tightens an existing file too
                out.write(line + b"\n")
                if self.fsync:
                    os.fsync(out.fileno())
            self._seq, self._prev = self._seq + 1, hashlib.sha256(line).hexdigest()
            return record


@dataclass(frozen=True)
class VerifyResult:
    """:func:`verify`'s finding: ``records`` intact, the first bad ``line`` (1-based), the ``seq``
    it should hold and why (``reason``); ``head``, the SHA-256 of the last good line."""

    ok: bool
    records: int
    line: int | None = None
    seq: int | None = None
    reason: str = ""
    head: str = _GENESIS

    def __str__(self) -> str:
        return f"OK: {self.records} records, head {self.head}" if self.ok else \
            f"BROKEN at line {self.line} (record {self.seq}): {self.reason}"


def _fault(record: Any, seq: int, prev: str, key: bytes | None) -> str | None:
    """Why ``record`` is not the intact record ``seq`` after ``prev``; ``None`` if it is."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if (found := record.get("seq")) != seq:
        return f"found record {found}: record(s) {seq}..{found - 1} deleted or moved" \
            if isinstance(found, int) and found > seq \
            else f"found record {found!r}: records reordered or duplicated"
    if record.get("prev") != prev:
        return (f"previous-record hash does not match line {seq - 1}: a record before it was "
                "altered, inserted or removed")
    body, mac = _canonical(record), record.get("hmac")
    if record.get("hash") != hashlib.sha256(body).hexdigest():
        return "record content altered (its hash does not match)"
    if key is not None and not (isinstance(mac, str) and hmac.compare_digest(
            mac, hmac.new(key, body, hashlib.sha256).hexdigest())):
        return "HMAC missing or wrong: altered, or signed with another key"
    return None


def verify(path: str | os.PathLike[str], *, key_env: str | None = DEFAULT_KEY_ENV,
           require_hmac: bool = False) -> VerifyResult:
    """The first broken or altered record of the audit file at ``path``; HMACs too where
    ``key_env`` holds a key (``require_hmac``: it must, else ``ValueError``)."""
    key = _key(key_env)
    if require_hmac and key is None:
        raise ValueError(f"require_hmac is set but the environment variable {key_env!r} is "
                         "empty: export the audit HMAC key there")
    prev, number = _GENESIS, 0  # line ``number`` holds record ``number``
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        try:
            fault = _fault(json.loads(line), number, prev, key)
        except ValueError:
            fault = "not valid JSON"
        if fault is not None:
            return VerifyResult(False, number - 1, number, number, fault, prev)
        prev = hashlib.sha256(line).hexdigest()
    return VerifyResult(True, number, head=prev)
