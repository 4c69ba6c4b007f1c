"""Personal data out of logs and labels: a scrubbing log filter, a JSON formatter, label checks.

:class:`PIIFilter` replaces e-mail addresses, phone numbers, US social security numbers, payment
card numbers (Luhn-checked), IBANs (mod-97-checked) and IPv4/IPv6 addresses (but loopback) in log
records with ``[email]``, ``[phone]``, … It is attached to this library's own loggers and works on
any ``logging.Logger`` or ``Handler``. Checksums keep step counts and hashes from being scrubbed as
card numbers; only numbers written like phone numbers (a leading ``+`` or separators) count as
phones.

:func:`check_label` validates ``session_id`` and ``model_name`` before they become Prometheus
labels and InfluxDB tags: a value that looks like personal data is replaced by a keyed hash (HMAC
with a key from an environment variable, the same across runs) or refused.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import time
from typing import Any

__all__ = ["JsonFormatter", "PIIFilter", "check_label", "find_pii", "protect_loggers", "scrub"]

LABEL_KEY_ENV = "PRIVACY_LABEL_HMAC_KEY"
MAX_LABEL_LENGTH = 128
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$")

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_CARD = re.compile(r"(?<![\d.])\d(?:[ -]?\d){12,18}(?![\d.])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
# A phone number is written like one: international ("+" country code), an area code in
# parentheses, NANP groups joined by "-" or ".", or a national trunk "0" prefix. Bare digit runs
# and space-separated counts are not phones: too many step counts and sizes look like them.
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){1,5}"
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"
    r"|\d{3}([-.])\d{3}\1\d{4}"
    r"|0\d{1,4}[ -]\d{3,4}[ -]?\d{3,4}"
    r")(?![\w.-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _card(m: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", m.group())
    return "[card]" if 13 <= len(digits) <= 19 and _luhn(digits) else m.group()


def _ip(m: re.Match[str]) -> str:
    try:
        address = ipaddress.ip_address(m.group())
    except ValueError:
        return m.group()
    # Loopback and "any" name no one (and our own endpoint URLs are worth reading).
    return m.group() if address.is_loopback or address.is_unspecified else "[ip]"


def _phone(m: re.Match[str]) -> str:
    digits = sum(c.isdigit() for c in m.group())
    return "[phone]" if 7 <= digits <= 15 else m.group()


# Order matters: the checksummed and most specific patterns go first so that their digits are
# gone before the looser phone pattern looks.
_RULES: tuple[tuple[re.Pattern[str], Any], ...] = (
    (_EMAIL, "[email]"),
    (_IBAN, lambda m: "[iban]" if _iban_ok(m.group()) else m.group()),
    (_IPV4, _ip),
    (_IPV6, _ip),
    (_SSN, "[national-id]"),
    (_CARD, _card),
    (_PHONE, _phone),
)


def scrub(text: str) -> str:
    """``text`` with every personal datum found replaced by its kind, e.g. ``[email]``."""
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


def find_pii(text: str) -> str | None:
    """The kind of the first personal datum in ``text`` (``"email"``, ``"card"``, …), or None."""
    found = re.search(r"\[(email|iban|ip|national-id|card|phone)\]", scrub(text))
    return found.group(1) if found else None


class PIIFilter(logging.Filter):
    """A ``logging.Filter`` that scrubs personal data from records; it never drops a record.

    The message is rendered with its arguments, scrubbed and stored back (``args`` emptied), as is
    the text of an attached exception. Attach it to a logger for records logged there, or to a
    handler for everything the handler emits::

        handler.addFilter(PIIFilter())
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed format string is the caller's bug; keep the raw text
            message = str(record.msg)
        record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, for Loki/Promtail, Elasticsearch or any JSON log shipper.

    Keys: ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``message``, ``exc`` when there is an
    exception, and every ``extra=`` field. Strings are scrubbed with :func:`scrub` as well, so a
    handler with this formatter never writes personal data even from unfiltered loggers.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z", "level": record.levelname,
            "logger": record.name, "message": scrub(record.getMessage()),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = scrub(record.exc_text)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = scrub(value) if isinstance(value, str) else value
        return json.dumps(out, default=lambda v: scrub(str(v)), ensure_ascii=False)


def protect_loggers(prefix: str = "privacy_callbacks") -> None:
    """Attach one :class:`PIIFilter` to every existing logger named ``prefix`` or below it.

    Filters on a logger apply only to records created on that very logger (not to records
    propagating from children), so each module's logger gets its own.
    """
    manager = logging.Logger.manager
    for name in [prefix, *manager.loggerDict]:
        if name != prefix and not name.startswith(prefix + "."):
            continue
        lg = logging.getLogger(name)
        if not any(isinstance(f, PIIFilter) for f in lg.filters):
            lg.addFilter(PIIFilter())


def check_label(name: str, value: str, *, key_env: str = LABEL_KEY_ENV) -> str:
    """Validate a label value; return it, or its keyed hash if it looks like personal data.

    Args:
        name: The label's name, for the error message.
        value: The value to check.
        key_env: Environment variable holding the HMAC key for personal-looking values.

    Returns:
        ``value`` unchanged, or ``"h-"`` and 16 hex digits of HMAC-SHA256(key, value): the same
        value with the same key gives the same label in every run.

    Raises:
        ValueError: The value is empty, too long or has characters outside ``A-Z a-z 0-9 _ . : /
            -``; or it looks like personal data and ``key_env`` is not set. Personal data is not
            echoed in the message.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"Unexpected value for {name}: {value!r}; use a non-empty string")
    kind = find_pii(value)
    if kind is not None:
        key = os.environ.get(key_env)
        if not key:
            raise ValueError(
                f"{name} looks like personal data (a {kind}); it would be stored in every metric "
                f"series. Use an opaque id, or set the environment variable {key_env} to a secret "
                "key to have it replaced by a keyed hash")
        return "h-" + hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()[:16]
    if len(value) > MAX_LABEL_LENGTH:
        raise ValueError(f"Unexpected value for {name}: {value[:40]!r}… is {len(value)} characters;"
                         f" use at most {MAX_LABEL_LENGTH}")
    if not _LABEL.match(value):
        raise ValueError(f"Unexpected value for {name}: {value!r}; use letters, digits and "
                         "_ . : / - (starting with a letter or digit)")
    return value
