"""Personal data stays out of logs and metric labels."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from privacy_callbacks import PIIFilter, PrivacyMonitor
from privacy_callbacks.pii import JsonFormatter, check_label, scrub

ROOT = Path(__file__).resolve().parent.parent


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


def test_filter_scrubs_records_of_any_logger_and_our_own(caplog):
    user = logging.getLogger("user.training")
    user.addFilter(PIIFilter())
    with caplog.at_level(logging.INFO):
        user.info("sample from %s, card %s", "bob@example.org", "4111-1111-1111-1111")
        logging.getLogger("privacy_callbacks.monitor").warning("label %s", "eve@example.com")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["sample from [email], card [card]", "label [email]"]


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


def test_labels_are_checked():
    assert check_label("model_name", "bert-base/v1.2:ft") == "bert-base/v1.2:ft"
    with pytest.raises(ValueError, match="model_name.*letters, digits"):
        check_label("model_name", "my model")
    with pytest.raises(ValueError, match="at most 128"):
        check_label("session_id", "x" * 129)
    with pytest.raises(ValueError, match="personal data \\(a email\\)") as err:
        check_label("session_id", "alice@example.com", key_env="PRIVACY_TEST_NO_SUCH_KEY")
    assert "alice" not in str(err.value)


def test_personal_label_is_hashed_the_same_way_in_every_run(monkeypatch):
    monkeypatch.setenv("PRIVACY_LABEL_HMAC_KEY", "label-secret")
    code = ("from privacy_callbacks.pii import check_label; "
            "print(check_label('session_id', 'alice@example.com'))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           timeout=300, check=True).stdout.strip() for _ in range(2)}
    here = check_label("session_id", "alice@example.com")
    assert runs == {here} and here.startswith("h-") and len(here) == 18
    monkeypatch.setenv("PRIVACY_LABEL_HMAC_KEY", "another-key")
    assert check_label("session_id", "alice@example.com") != here


def test_monitor_validates_labels(monkeypatch):
    monkeypatch.delenv("PRIVACY_LABEL_HMAC_KEY", raising=False)
    with pytest.raises(ValueError, match="session_id looks like personal data"):
        PrivacyMonitor(delta=1e-5, session_id="+1 555 123 4567")
    with pytest.raises(ValueError, match="model_name"):
        PrivacyMonitor(delta=1e-5, model_name="a,b=c")
    monkeypatch.setenv("PRIVACY_LABEL_HMAC_KEY", "k")
    assert PrivacyMonitor(delta=1e-5, session_id="bob@example.org").session_id.startswith("h-")
