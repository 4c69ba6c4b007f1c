"""Personal data stays out of logs and metric labels."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from privacy_callbacks import PrivacyMonitor
from privacy_callbacks.compliance import JsonFormatter, PIIFilter, scrub


@pytest.mark.parametrize("text,expected", [
    ("mail alice.smith+dp@example.co.uk", "mail [email]"),
    ("call +1 555 123 4567 or (555) 123-4567 or 555.123.4567",
     "call [phone] or [phone] or [phone]"),
    ("uk +44 20 7946 0958, national 020 7946 0958", "uk [phone], national [phone]"),
    ("ssn 123-45-6789", "ssn [national-id]"),
    ("card 4111 1111 1111 1111 and 5500-0000-0000-0004", "card [card] and [card]"),
    ("iban GB82 WEST 1234 5698 7654 32 / DE89370400440532013000", "iban [iban] / [iban]"),
    ("from 203.0.113.7 and 2001:db8::1", "from [ip] and [ip]"),
])
def test_personal_data_is_scrubbed(text, expected):
    assert scrub(text) == expected


@pytest.mark.parametrize("text", [
    "Privacy spent: epsilon=4.697 at delta=1e-05 after 16 steps (rdp)",
    "card-like but no Luhn: 4111111111111112",                 # checksum fails
    "iban-like but bad mod-97: GB82WEST12345698765433",
    "metrics at http://127.0.0.1:9108/metrics, 2025-01-01 12:30:45, torch 2.13.0",
    "steps 1000 2000 3000; ssn-like 000-12-3456",
])
def test_ordinary_numbers_are_kept(text):
    assert scrub(text) == text


def test_filter_scrubs_records_of_a_logger_or_of_everything_a_handler_emits(caplog):
    user = logging.getLogger("user.training")
    user.addFilter(PIIFilter())
    with caplog.at_level(logging.INFO):
        user.info("sample from %s, card %s", "bob@example.org", "4111-1111-1111-1111")
    assert [r.getMessage() for r in caplog.records] == ["sample from [email], card [card]"]
    # Opt-in: our own loggers carry no filter; a handler's filter covers every logger below it.
    ours = logging.getLogger("privacy_callbacks.monitor")
    assert not ours.filters
    caplog.clear()
    caplog.handler.addFilter(PIIFilter())
    try:
        ours.warning("label %s", "eve@example.com")
    finally:
        caplog.handler.removeFilter(caplog.handler.filters[-1])
    assert [r.getMessage() for r in caplog.records] == ["label [email]"]


def test_json_formatter_writes_one_scrubbed_object_per_record():
    record = logging.LogRecord("privacy_callbacks.x", logging.WARNING, __file__, 1,
                               "user %s at %s", ("a@b.io", "198.51.100.2"), None)
    record.session_id = "run-1"
    try:
        raise RuntimeError("failed for carol@example.net")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(record))
    assert out["message"] == "user [email] at [ip]"
    assert out["level"] == "WARNING" and out["logger"] == "privacy_callbacks.x"
    assert out["session_id"] == "run-1" and out["ts"].endswith("Z")
    assert "[email]" in out["exc"] and "carol" not in out["exc"]


def test_monitor_refuses_labels_that_look_like_personal_data():
    for value in ("alice@example.com", "+1 555 123 4567", "Alice Smith"):
        with pytest.raises(ValueError, match="session_id"):
            PrivacyMonitor(delta=1e-5, session_id=value)
    with pytest.raises(ValueError, match="model_name"):
        PrivacyMonitor(delta=1e-5, model_name="a,b=c")
