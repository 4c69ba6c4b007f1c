"""Personal data out of logs: an opt-in scrubbing log filter and JSON formatter. :func:`scrub`
replaces e-mails, phones (written as such), US SSNs, cards (Luhn), IBANs (mod-97) and IPs but
loopback with ``[email]``, ``[phone]``, ...: checksums keep counts and hashes readable."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from typing import Any, Callable

__all__ = ["JsonFormatter", "PIIFilter", "scrub"]


def _iban(text: str) -> bool:
    s = text.replace(" ", "")
    return 15 <= len(s) <= 34 and int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def _card(text: str) -> bool:
    digits = [int(c) for c in reversed(re.sub(r"\D", "", text))]
    luhn = sum(d * 2 - 9 if i % 2 and d > 4 else d * (1 + i % 2) for i, d in enumerate(digits))
    return 13 <= len(digits) <= 19 and luhn % 10 == 0


def _public_ip(text: str) -> bool:
    try:  # loopback and "any" name no one (and our own endpoint URLs are worth reading)
        return not ((a := ipaddress.ip_address(text)).is_loopback or a.is_unspecified)
    except ValueError:
        return False


def _when(kind: str, check: Callable[[str], bool]) -> Callable[[re.Match[str]], str]:
    return lambda m: f"[{kind}]" if check(m.group()) else m.group()


# The checksummed and most specific patterns first: their digits are gone before phone looks.
_RULES: tuple[tuple[re.Pattern[str], Any], ...] = tuple((re.compile(p), r) for p, r in (
    (r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b", "[email]"),
    (r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b", _when("iban", _iban)),
    (r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])", _when("ip", _public_ip)),
    (r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])", _when("ip", _public_ip)),
    (r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])", "[national-id]"),
    (r"(?<![\d.])\d(?:[ -]?\d){12,18}(?![\d.])", _when("card", _card)),
    # A phone is written like one: "+" country code, "(area)", NANP groups joined by "-" or ".",
    # or a trunk "0" prefix; bare digit runs and spaced counts are not (step counts look so).
    (r"(?<![\w+.-])(?:\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){1,5}|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"
     r"|\d{3}([-.])\d{3}\1\d{4}|0\d{1,4}[ -]\d{3,4}[ -]?\d{3,4})(?![\w.-])",
     _when("phone", lambda s: 7 <= sum(c.isdigit() for c in s) <= 15)),
))


def scrub(text: str) -> str:
    """``text`` with every personal datum found replaced by its kind, e.g. ``[email]``."""
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


def _exc_text(record: logging.LogRecord) -> str | None:  # formatted once, as Formatter does
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    record.exc_text = scrub(record.exc_text) if record.exc_text else record.exc_text
    return record.exc_text


class PIIFilter(logging.Filter):
    """Scrubs a record's message, arguments and exception text; never drops one. A logger's filter
    misses its children's records: ``handler.addFilter(PIIFilter())`` covers all it emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed format string is the caller's bug; keep the raw text
            message = str(record.msg)
        record.msg, record.args = scrub(message), None
        _exc_text(record)
        return True


_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (Loki, Elasticsearch, ...): ``ts`` (RFC 3339, UTC), ``level``,
    ``logger``, ``message``, ``exc`` and each ``extra=`` field, strings scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {"ts": f"{ts}.{int(record.msecs):03d}Z", "level": record.levelname,
                               "logger": record.name, "message": scrub(record.getMessage())}
        if _exc_text(record):
            out["exc"] = record.exc_text
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = scrub(value) if isinstance(value, str) else value
        return json.dumps(out, default=lambda v: scrub(str(v)), ensure_ascii=False)
