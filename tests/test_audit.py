"""The hash-chained audit trail: what a fit writes, and `audit verify` naming the broken record."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest

from dp_models import DPModel
from privacy_callbacks import AuditTrail, PrivacyMonitor
from privacy_callbacks.__main__ import main
from privacy_callbacks.audit import verify

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "PRIVACY_AUDIT_HMAC_KEY"


def cli(path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`privacy-callbacks audit verify`, in-process (importing torch per call is slow)."""
    saved = os.environ.pop(KEY_ENV, None)
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["audit", "verify", str(path), *args])
    finally:
        os.environ.pop(KEY_ENV, None)
        if saved is not None:
            os.environ[KEY_ENV] = saved
    return subprocess.CompletedProcess([], code, out.getvalue(), err.getvalue())


def write_trail(path: Path, n: int = 5) -> None:
    trail = AuditTrail(path, key_env=None, fsync=False)
    for i in range(1, n + 1):
        trail.record("event", i=i)


def write_signed_trail(path: Path, n: int = 3) -> AuditTrail:
    """A trail HMAC'd with the auditor's key, the key gone from the environment afterwards."""
    os.environ[KEY_ENV] = "k3y-only-the-auditor-has"
    try:
        trail = AuditTrail(path, fsync=False)
        for i in range(n):
            trail.record("event", i=i)
    finally:
        del os.environ[KEY_ENV]
    return trail


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_intact_trail_verifies_and_file_is_private(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_trail(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    result = subprocess.run([sys.executable, "-m", "privacy_callbacks", "audit", "verify",
                             str(path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "OK: 5 records" in result.stdout


def test_edited_record_is_named(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_trail(path)
    rows = lines(path)
    rows[2] = rows[2].replace('"i":3', '"i":4')
    path.write_text("".join(rows))
    result = cli(path)
    assert result.returncode == 1
    assert "BROKEN at line 3 (record 3): record content altered" in result.stderr


def test_edited_and_rehashed_record_breaks_the_next_link(tmp_path):
    # Without a key a forger can recompute the record's own hash; the next record's link still
    # names the record that changed.
    path = tmp_path / "audit.jsonl"
    write_trail(path)
    rows = lines(path)
    record = json.loads(rows[1])
    record["data"]["i"] = 99
    import hashlib
    from privacy_callbacks.audit import _canonical
    record["hash"] = hashlib.sha256(_canonical(record)).hexdigest()
    rows[1] = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    path.write_text("".join(rows))
    result = verify(path, key_env=None)
    assert (result.ok, result.line, result.seq) == (False, 3, 3)
    assert "does not match line 2" in result.reason


def test_deleted_record_is_named(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_trail(path)
    rows = lines(path)
    del rows[3]
    path.write_text("".join(rows))
    result = cli(path)
    assert result.returncode == 1
    assert "BROKEN at line 4 (record 4): found record 5: record(s) 4..4 deleted" in result.stderr


def test_reordered_records_are_named(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_trail(path)
    rows = lines(path)
    rows[1], rows[2] = rows[2], rows[1]
    path.write_text("".join(rows))
    result = cli(path)
    assert result.returncode == 1
    assert "BROKEN at line 2 (record 2)" in result.stderr


def test_hmac_catches_a_forger_without_the_key(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = write_signed_trail(path)
    assert trail.hmac_enabled and "k3y" not in repr(trail)
    # A forger rewrites record 2 and recomputes every plain hash after it.
    import hashlib
    from privacy_callbacks.audit import _canonical
    rows = [json.loads(r) for r in lines(path)]
    rows[1]["data"]["i"] = 42
    prev = hashlib.sha256(json.dumps(rows[0], sort_keys=True, separators=(",", ":")).encode())
    for row in rows[1:]:
        row["prev"] = prev.hexdigest()
        row["hash"] = hashlib.sha256(_canonical(row)).hexdigest()
        prev = hashlib.sha256(json.dumps(row, sort_keys=True, separators=(",", ":")).encode())
    path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n"
                            for r in rows))
    assert cli(path).returncode == 0  # the plain chain is consistent again
    result = cli(path, env={KEY_ENV: "k3y-only-the-auditor-has"})
    assert result.returncode == 1
    assert "BROKEN at line 2 (record 2): HMAC missing or wrong" in result.stderr
    assert "k3y" not in result.stderr + result.stdout
    assert cli(path, "--require-hmac").returncode == 2


@pytest.mark.parametrize("forged", ["dropped", "garbage"])
def test_hmac_check_refuses_a_record_whose_hmac_was_removed_or_replaced(tmp_path, forged):
    """A forger without the key cannot just strip (or invent) the HMACs of a rewritten tail."""
    import hashlib
    from privacy_callbacks.audit import _canonical
    path = tmp_path / "audit.jsonl"
    write_signed_trail(path)
    rows = [json.loads(r) for r in lines(path)]
    rows[2]["data"]["i"] = 42
    if forged == "dropped":
        del rows[2]["hmac"]
    else:
        rows[2]["hmac"] = hashlib.sha256(b"guess").hexdigest()
    rows[2]["hash"] = hashlib.sha256(_canonical(rows[2])).hexdigest()
    path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n"
                            for r in rows))
    assert cli(path).returncode == 0  # without the key only the plain chain is checked
    result = cli(path, env={KEY_ENV: "k3y-only-the-auditor-has"})
    assert result.returncode == 1
    assert "BROKEN at line 3 (record 3): HMAC missing or wrong" in result.stderr


def test_a_fit_writes_config_thresholds_and_end_and_a_second_fit_continues_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"

    def run(target: float, stop_at_target: bool = True) -> PrivacyMonitor:
        monitor = PrivacyMonitor(delta=1e-5, target_epsilon=target, audit=path,
                                 session_id="audited", progress_bar=False,
                                 stop_at_target=stop_at_target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_progress_bar=False,
                       enable_checkpointing=False, enable_model_summary=False).fit(DPModel())
        return monitor

    monitor = run(target=8.0)
    records = [json.loads(r) for r in lines(path)]
    events = [r["event"] for r in records]
    final_eps = monitor.last_snapshot.epsilon
    # epsilon after 16 steps is ~4.7 of 8: the 50 % threshold only.
    assert events == ["fit_start", "budget_threshold", "fit_end"]
    start = records[0]["data"]
    assert start["dp"]["noise_multiplier"] == 1.0 and start["dp"]["max_grad_norm"] == 1.0
    assert start["dataset_size"] == 256 and start["accountant"] == "rdp"
    assert start["delta"] == 1e-5 and start["target_epsilon"] == 8.0
    assert {"torch", "opacus", "lightning", "python"} <= set(start["versions"])
    threshold = records[1]["data"]
    assert threshold["fraction"] == 0.5 and threshold["epsilon"] >= 4.0
    end = records[2]["data"]
    assert end["epsilon"] == final_eps and end["steps_accounted"] == 16

    run(target=2.0, stop_at_target=False)  # report only: crosses 50 %, 80 % and 100 %
    records = [json.loads(r) for r in lines(path)]
    assert [r["event"] for r in records[3:]] == [
        "fit_start", "budget_threshold", "budget_threshold", "budget_threshold", "fit_end"]
    assert [r["data"]["fraction"] for r in records[4:7]] == [0.5, 0.8, 1.0]
    assert [r["seq"] for r in records] == list(range(1, 9))
    assert verify(path, key_env=None).ok


def test_custom_event_hook_and_unwritable_trail_never_raise(tmp_path, caplog):
    missing_dir = tmp_path / "gone" / "audit.jsonl"
    monitor = PrivacyMonitor(delta=1e-5, audit=missing_dir, session_id="x")
    monitor.compliance._exporting = True  # as on global rank 0 during a fit
    monitor.audit_event("guard_stop", step=3)
    monitor.audit_event("guard_stop", step=4)
    failures = [r for r in caplog.records if "audit trail" in r.getMessage()]
    assert len(failures) == 1


def test_bad_tail_is_a_clear_error(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="does not end with an audit record"):
        AuditTrail(path).record("x")
