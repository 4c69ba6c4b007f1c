"""The hash-chained audit trail: what a fit writes, and `audit verify` naming the broken record."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dp_models import DPModel, fit
from privacy_callbacks import AuditTrail, ComplianceAudit, PrivacyMonitor
from privacy_callbacks.__main__ import main
from privacy_callbacks.compliance.audit import _canonical, verify

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


def records(path: Path) -> list[dict]:
    return [json.loads(r) for r in lines(path)]


def test_a_fit_writes_config_thresholds_and_end_and_a_second_fit_continues_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"

    def run(target: float, stop_at_target: bool = True) -> PrivacyMonitor:
        monitor = PrivacyMonitor(delta=1e-5, target_epsilon=target, session_id="audited",
                                 progress_bar=False, stop_at_target=stop_at_target)
        fit(DPModel(), monitor, ComplianceAudit(1e-5, target, audit=path), max_epochs=2)
        return monitor

    monitor = run(target=8.0)
    trail = records(path)
    final_eps = monitor.last_snapshot.epsilon
    # epsilon after 16 steps is ~4.7 of 8: the 50 % threshold only.
    assert [r["event"] for r in trail] == ["fit_start", "budget_threshold", "fit_end"]
    assert {r["data"]["session_id"] for r in trail} == {"audited"}
    start = trail[0]["data"]
    assert start["dp"]["noise_multiplier"] == 1.0 and start["dp"]["max_grad_norm"] == 1.0
    assert start["dataset_size"] == 256 and start["accountant"] == "rdp"
    assert start["delta"] == 1e-5 and start["target_epsilon"] == 8.0
    assert start["poisson_sampling"] is False and start["planned_steps"] == 16
    assert all(start["versions"][p] for p in ("torch", "opacus", "lightning", "python"))
    threshold = trail[1]["data"]
    assert threshold["fraction"] == 0.5 and threshold["epsilon"] >= 4.0
    end = trail[2]["data"]
    assert end["epsilon"] == final_eps and end["epsilon_exact"] and end["steps_accounted"] == 16
    # The series for a report: every step the monitor published, the last the exact final one.
    assert [p[0] for p in end["series"]] == list(range(1, 17))
    assert end["series"][-1] == [16, final_eps, 1]
    assert all(a[1] <= b[1] for a, b in zip(end["series"], end["series"][1:]))
    assert end["changes"] == [[1, 1.0, 32 / 256]]

    run(target=2.0, stop_at_target=False)  # report only: crosses 50 %, 80 % and 100 %
    trail = records(path)
    assert [r["event"] for r in trail[3:]] == [
        "fit_start", "budget_threshold", "budget_threshold", "budget_threshold", "fit_end"]
    assert [r["data"]["fraction"] for r in trail[4:7]] == [0.5, 0.8, 1.0]
    assert [r["seq"] for r in trail] == list(range(1, 9))
    assert verify(path, key_env=None).ok


def test_long_series_are_thinned_evenly_and_a_noise_schedule_is_recorded(tmp_path, monkeypatch):
    from dp_models import ScheduledModel
    from privacy_callbacks.compliance import callback
    monkeypatch.setattr(callback, "MAX_POINTS", 8)
    path = tmp_path / "audit.jsonl"
    monitor = PrivacyMonitor(delta=1e-5, progress_bar=False)
    fit(ScheduledModel(gamma=0.99, batch_size=8), monitor, ComplianceAudit(1e-5, audit=path))
    end = records(path)[-1]["data"]  # 32 steps
    steps = [p[0] for p in end["series"]]
    assert len(steps) <= 8 and steps[0] == 1 and steps[-1] == 32
    gaps = {b - a for a, b in zip(steps[:-1], steps[1:-1])}
    assert len(gaps) == 1, steps  # evenly spaced (the final point aside)
    assert end["series"][-1][1] == monitor.last_snapshot.epsilon
    sigmas = [c[1] for c in end["changes"]]
    assert 4 <= len(sigmas) <= 8 and sigmas[0] == 1.0 and sigmas == sorted(sigmas, reverse=True)


def test_guard_stop_and_resume_are_recorded(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    path = tmp_path / "audit.jsonl"
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(DPModel(), PrivacyMonitor(1e-5, progress_bar=False), ComplianceAudit(1e-5, audit=path),
        ckpt, enable_checkpointing=True)
    monitor = PrivacyMonitor(1e-5, target_epsilon=5.0, progress_bar=False)
    fit(DPModel(), monitor, ComplianceAudit(1e-5, 5.0, audit=path), max_epochs=3,
        ckpt_path=str(tmp_path / "last.ckpt"))
    trail = records(path)
    events = [r["event"] for r in trail]
    assert events[:4] == ["fit_start", "fit_end", "fit_start", "resume"]
    assert trail[3]["data"]["global_step"] == 8 and trail[3]["data"]["steps_accounted"] == 8
    stop = next(r["data"] for r in trail if r["event"] == "budget_guard_stop")
    assert stop == {**monitor.guard.stop_record, "session_id": monitor.session_id}
    end = trail[-1]["data"]
    assert end["epsilon"] <= 5.0 and end["steps_accounted"] == stop["step"]
    assert end["series"][0][0] == 9  # the resumed fit's own steps


def test_without_a_monitor_start_and_end_are_still_recorded_and_checked(tmp_path):
    from privacy_callbacks import DPPolicy
    path = tmp_path / "audit.jsonl"
    model = DPModel()
    audit = ComplianceAudit(1e-5, audit=path, policy=DPPolicy(
        max_epsilon=2.0, require_poisson_sampling=False))
    fit(model, audit)
    trail = records(path)
    assert [r["event"] for r in trail] == ["fit_start", "policy_violation", "fit_end"]
    assert trail[1]["data"]["violation_type"] == "epsilon_above_policy_max"
    end = trail[-1]["data"]
    assert end["epsilon"] == model.privacy_engine.accountant.get_epsilon(1e-5) > 2.0
    assert end["series"] == [[8, end["epsilon"], 1]] and end["session_id"] is None
    assert audit.privacy_values() == {
        "compliance_violations": {("default", "epsilon_above_policy_max"): 1}}


def test_an_unwritable_trail_is_logged_once_and_the_fit_goes_on(tmp_path, caplog):
    monitor = PrivacyMonitor(delta=1e-5, target_epsilon=2.0, stop_at_target=False,
                             progress_bar=False)
    fit(DPModel(), monitor, ComplianceAudit(1e-5, 2.0, audit=tmp_path / "gone" / "audit.jsonl"))
    failures = [r for r in caplog.records if "audit trail" in r.getMessage()]
    assert len(failures) == 1
    assert monitor.last_snapshot.epsilon_step == 8


def test_mismatched_delta_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="delta: 0.001; use the PrivacyMonitor's, 1e-05"):
        fit(DPModel(), PrivacyMonitor(1e-5, progress_bar=False), ComplianceAudit(1e-3))
    with pytest.raises(ValueError, match="audit_thresholds: 0"):
        ComplianceAudit(1e-5, 8.0, audit_thresholds=(0, 0.5))
    with pytest.raises(ValueError, match="policy: 3"):
        ComplianceAudit(1e-5, policy=3)


def test_verify_needs_neither_torch_nor_lightning():
    code = ("import sys, privacy_callbacks.compliance.audit; "
            "print(sorted({'torch', 'lightning', 'opacus'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"


def test_bad_tail_is_a_clear_error(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="does not end with an audit record"):
        AuditTrail(path).record("x")
