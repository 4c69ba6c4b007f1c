"""The privacy report: one self-contained HTML page per fit, rendered in a real browser."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys

import pytest

from dp_models import DPModel, ScheduledModel, fit
from privacy_callbacks import ComplianceAudit, PrivacyMonitor
from servers import require_binary


def report_fit(tmp_path, mechanism: str = "rdp", target: float = 4.0, model=None):
    monitor = PrivacyMonitor(delta=1e-5, target_epsilon=target, session_id="rep")
    audit = ComplianceAudit(1e-5, target, audit=tmp_path / "trail.jsonl",
                            report=tmp_path / "report.html")
    model = model or DPModel(accountant=mechanism)
    fit(model, monitor, audit, max_epochs=3)
    return model, (tmp_path / "report.html").read_text()


def page_text(html: str) -> str:
    """What a reader sees, roughly: the page without its tags and inline SVG."""
    html = re.sub(r"<svg.*?</svg>", "", html, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", html)
    return " ".join(text.replace("&epsilon;", "ε").replace("&delta;", "δ").split())


def screenshot(html_path, png_path) -> None:
    """Headless Chromium, as a reader's browser: no network, a fresh profile."""
    chromium = shutil.which("chromium") or require_binary("chromium", "chromium")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={png_path.parent / 'profile'}",
                    f"--screenshot={png_path}", "--window-size=1000,1600",
                    f"file://{html_path}"], check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_report_holds_the_accountants_epsilon_and_renders_in_a_browser(tmp_path, mechanism):
    model, html = report_fit(tmp_path, mechanism)
    final = model.privacy_engine.accountant.get_epsilon(1e-5)
    text = page_text(html)
    assert f"ε = {final:.4f}" in text and "of a target of 4 at δ = 1e-05" in text
    assert "Audit trail verified" in text and "Stopped training at step" in text
    assert f"Accountant {mechanism}" in text
    # Self-contained: nothing to load (namespace URIs in the SVG are names, not loads).
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|url\((?!#)", html)
    png = tmp_path / "shot.png"
    screenshot(tmp_path / "report.html", png)
    from PIL import Image

    image = Image.open(png).convert("L")
    dark = sum(1 for value in image.getdata() if value < 128)
    assert image.size == (1000, 1600) and dark > 5000  # text and the chart, not a blank page


def test_cli_renders_the_same_numbers_and_a_tampered_trail_fails(tmp_path):
    model, html = report_fit(tmp_path)
    out = tmp_path / "again.html"
    run = subprocess.run([sys.executable, "-m", "privacy_callbacks", "report",
                          str(tmp_path / "trail.jsonl"), "-o", str(out)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    again = page_text(out.read_text())
    final = model.privacy_engine.accountant.get_epsilon(1e-5)
    assert f"ε = {final:.4f}" in again and "Audit trail verified" in again
    tamper(tmp_path / "trail.jsonl")
    run = subprocess.run([sys.executable, "-m", "privacy_callbacks", "report",
                          str(tmp_path / "trail.jsonl"), "-o", str(out)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1
    tampered = page_text(out.read_text())
    assert "Audit trail verification failed" in tampered and "ε = 0.5000" in tampered


def tamper(trail) -> None:
    """Claims a smaller final epsilon after the fact, in the trail's last record."""
    lines = trail.read_text().splitlines()
    record = json.loads(lines[-1])
    record["data"]["epsilon"] = 0.5
    trail.write_text("\n".join([*lines[:-1], json.dumps(record)]) + "\n")


def test_a_tampered_trail_renders_with_a_visible_verification_failure(tmp_path):
    from privacy_callbacks.report import render_trail

    report_fit(tmp_path)
    tamper(tmp_path / "trail.jsonl")
    html, ok = render_trail(tmp_path / "trail.jsonl")
    text = page_text(html)
    assert not ok and "Audit trail verification failed: BROKEN at line" in text
    assert "record content altered" in text and "ε = 0.5000" in text
    # The next fit's own report says so too, and the fit is not affected.
    monitor = PrivacyMonitor(delta=1e-5, session_id="rep")
    audit = ComplianceAudit(1e-5, audit=tmp_path / "trail.jsonl", report=tmp_path / "next.html")
    trainer = fit(DPModel(), monitor, audit)
    assert trainer.global_step == 8 and monitor.last_snapshot.epsilon_exact == 1
    assert "Audit trail verification failed" in page_text((tmp_path / "next.html").read_text())


def test_a_trail_signed_with_its_own_key_verifies_in_its_report(tmp_path, monkeypatch):
    from privacy_callbacks import AuditTrail

    monkeypatch.setenv("PRIVACY_AUDIT_HMAC_KEY", "the default variable, another key")
    monkeypatch.setenv("TEAM_AUDIT_KEY", "this trail's key")
    trail = AuditTrail(tmp_path / "trail.jsonl", key_env="TEAM_AUDIT_KEY")
    audit = ComplianceAudit(1e-5, 4.0, audit=trail, report=tmp_path / "report.html")
    fit(DPModel(), PrivacyMonitor(delta=1e-5, target_epsilon=4.0), audit)
    text = page_text((tmp_path / "report.html").read_text())
    assert "verification failed" not in text and "Audit trail verified" in text


def test_schedule_and_resume_are_marked(tmp_path):
    model = ScheduledModel(gamma=0.99)
    monitor = PrivacyMonitor(delta=1e-5, session_id="sched")
    audit = ComplianceAudit(1e-5, report=tmp_path / "report.html")
    trainer = fit(model, monitor, audit, max_steps=4)
    trainer.save_checkpoint(tmp_path / "four.ckpt")
    fit(model, PrivacyMonitor(delta=1e-5, session_id="sched"), audit, max_steps=8,
        max_epochs=2, ckpt_path=str(tmp_path / "four.ckpt"))
    text = page_text((tmp_path / "report.html").read_text())
    assert "2 fits" in text and "resumed from a checkpoint (at steps 4)" in text
    assert "These records come from no audit trail" in text
    final = model.privacy_engine.accountant.get_epsilon(1e-5)
    assert f"ε = {final:.4f}" in text and "no target set" in text


def test_an_unwritable_report_costs_one_warning_not_the_fit(tmp_path, caplog):
    monitor = PrivacyMonitor(delta=1e-5)
    audit = ComplianceAudit(1e-5, report=tmp_path / "missing" / "report.html")
    model = DPModel()
    with caplog.at_level(logging.WARNING):
        trainer = fit(model, monitor, audit)
    assert trainer.global_step == 8 and monitor.last_snapshot.epsilon_exact == 1
    warnings = [r for r in caplog.records if "privacy report could not be written" in
                r.getMessage()]
    assert len(warnings) == 1 and "missing" in warnings[0].getMessage()


def test_a_report_path_per_session(tmp_path):
    audit = ComplianceAudit(1e-5, report=lambda session: tmp_path / f"{session}.html")
    fit(DPModel(), PrivacyMonitor(delta=1e-5, session_id="one"), audit)
    assert (tmp_path / "one.html").is_file()
    with pytest.raises(ValueError, match="report: 3"):
        ComplianceAudit(1e-5, report=3)


def test_figures_from_training_records_without_noise_stay_off_the_page():
    from privacy_callbacks.report import render

    reported = {"membership_inference_auc": 0.7311, "membership_inference_advantage": 0.4622,
                "attack_scores": {"loss_threshold": 0.7311, "one_run_audit": 0.5525},
                "audit_epsilon_lower_bound": 0.2107}
    records = [{"event": "fit_start", "ts": "2026-01-01T00:00:00Z",
                "data": {"session_id": "s", "target_epsilon": 4.0, "delta": 1e-5}},
               {"event": "fit_end", "ts": "2026-01-01T00:01:00Z",
                "data": {"session_id": "s", "epsilon": 3.5, "epsilon_exact": True,
                         "delta": 1e-5, "reported": reported, "series": [[1, 3.5, 1]]}}]
    text = page_text(render(records))
    assert "0.7311" not in text and "0.4622" not in text and "are not shown here" in text
    assert "ε proven at least 0.2107" in text and "0.5525" in text  # canaries: post-processing
