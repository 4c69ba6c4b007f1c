"""Alerts, dashboards and the local stack against real servers and a real DP fit."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning.pytorch as pl
import pytest

from torch.utils.data import DataLoader

from dp_models import DPModel, make_data
from privacy_callbacks import (ComplianceAudit, MechanismMetrics, MembershipInferenceProbe,
                               OneRunAudit, PrivacyMonitor, PrometheusExporter)
from privacy_callbacks.ops import ALERTS, alertmanager_config, prometheus_config, rule_file
from privacy_callbacks.ops.dashboards import dashboards
from servers import alertmanager, free_port, http_get, prometheus, prometheus_query, wait_for

pytestmark = pytest.mark.servers

ROOT = Path(__file__).resolve().parents[1]


def fit(monitor: PrivacyMonitor, at_end, extra: tuple[pl.Callback, ...] = (),
        model: DPModel | None = None, **trainer_kwargs) -> DPModel:
    """A one-epoch real DP fit; ``at_end(trainer, model)`` runs while the exporter serves, once
    every callback published its last values (the monitor reads them at ``on_fit_end``)."""

    class AtEnd(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            monitor.flush()
            at_end(trainer, pl_module)

    model = model if model is not None else DPModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=1, callbacks=[monitor, *extra, AtEnd()], logger=False,
                   enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False, **trainer_kwargs).fit(model)
    return model


class ValidatedDPModel(DPModel):
    """DPModel with a held-out set, for the membership-inference probe."""

    holdout = make_data(64, seed=1)

    def validation_step(self, batch, batch_idx):
        return None

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.holdout, batch_size=64)


def substitute(expr: str, session: str) -> str:
    """What Grafana sends for the dashboards' template variables."""
    return expr.replace("$session", session).replace("$__rate_interval", "1m")


def with_basic_auth(config: str, user: str, password: str) -> str:
    """``config`` with the privacy job scraping with basic auth."""
    out = config.replace("- job_name: privacy\n", "- job_name: privacy\n  basic_auth: "
                         f"{{username: {user}, password: {password}}}\n")
    assert out != config
    return out


def test_every_dashboard_query_returns_data_from_a_real_fit():
    port = free_port()
    # Basic auth, so the refused-requests panel has its series.
    server = prometheus(with_basic_auth(prometheus_config([f"127.0.0.1:{port}"], interval="1s"),
                                        "prom", "dash-pw")).start()
    results: dict[str, list] = {}
    try:
        monitor = PrivacyMonitor(delta=1e-5, target_epsilon=50.0,
                                 exporters=[PrometheusExporter(port=port,
                                                               basic_auth=("prom", "dash-pw"))],
                                 session_id="dash", model_name="mlp")
        # The default policy flags DPModel's non-Poisson loader: the violations panel has a row.
        compliance = ComplianceAudit(1e-5, 50.0, policy="default")
        model = ValidatedDPModel()
        probe = MembershipInferenceProbe(model.dataset, model.holdout, samples=32)
        auditor = OneRunAudit(1e-5, canaries=50)

        def query_panels(trainer, model):
            steps = 'training_steps_with_privacy_total{session_id="dash"}'
            wait_for(lambda: [r for r in prometheus_query(server, steps)
                              if float(r["value"][1]) == trainer.global_step],
                     60, what="Prometheus to scrape the last step")
            # Rate panels need two scrapes in their window; a fast fit may end within one.
            wait_for(lambda: [r for r in prometheus_query(server, f"count_over_time({steps}[1m])")
                              if float(r["value"][1]) >= 2],
                     60, what="a second scrape of the run")
            wait_for(lambda: prometheus_query(
                server, 'privacy_audit_epsilon_lower_bound{session_id="dash"}'),
                60, what="Prometheus to scrape the audit's bound")
            sessions = json.loads(http_get(
                f"{server.url}/api/v1/label/session_id/values?"
                + urllib.parse.urlencode({"match[]": "privacy_epsilon_consumed"}))[1])["data"]
            results["session variable"] = sessions
            for board in dashboards().values():
                for panel in board["panels"]:
                    for target in panel["targets"]:
                        key = f"{board['title']} / {panel['title']} / {target['refId']}"
                        # A panel of an opt-in release has no data in a default fit.
                        results[key] = ("Published only with" in panel["description"],
                                        prometheus_query(server,
                                                         substitute(target["expr"], "dash")))

        # Validation mid-epoch, so later steps carry the probe's values.
        fit(monitor, query_panels, (probe, auditor, compliance, MechanismMetrics()), model,
            val_check_interval=4,
            num_sanity_val_steps=0)
    finally:
        server.stop()
    assert "dash" in results.pop("session variable")
    empty = [key for key, (opt_in, rows) in results.items() if not opt_in and not rows]
    assert not empty, f"panels without data: {empty}"
    marked = sorted(key for key, (opt_in, _) in results.items() if opt_in)
    assert len(marked) < len(results) / 2, marked
    by_title = {key: rows for key, (_, rows) in results.items()}
    used = float(by_title["Privacy Budget / Budget used / A"][0]["value"][1])
    eps = float(by_title["Privacy Budget / ε spent / A"][0]["value"][1])
    assert used == pytest.approx(eps / 50.0)
    assert float(by_title["Privacy Security & Compliance / Accounting errors / A"][0]
                 ["value"][1]) == 0


class Webhook:
    """An HTTP server on 127.0.0.1 collecting Alertmanager's webhook payloads."""

    def __init__(self) -> None:
        self.payloads: list[tuple[float, dict]] = []
        payloads = self.payloads

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payloads.append((time.monotonic(), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       name="privacy-test-webhook")
        self.thread.start()

    def alerts(self, name: str) -> list[tuple[float, str, dict]]:
        return [(t, p["receiver"], a) for t, p in list(self.payloads) for a in p["alerts"]
                if a["labels"].get("alertname") == name and a["status"] == "firing"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_budget_exhausted_alert_reaches_the_webhook_with_the_session():
    port = free_port()
    hook = Webhook()
    am = prom = None
    try:
        am = alertmanager(alertmanager_config(
            {"privacy-pager": hook.url + "/pager", "privacy-chat": hook.url + "/chat"},
            group_wait="1s", group_interval="1s")).start()
        prom = prometheus(prometheus_config(
            [f"127.0.0.1:{port}"], rule_files=("privacy-rules.yml",),
            alertmanager=f"127.0.0.1:{am.port}", interval="1s"),
            {"privacy-rules.yml": rule_file()}).start()
        target = 0.5
        # Report only: this run must actually pass the target (the guard would stop before).
        monitor = PrivacyMonitor(delta=1e-5, target_epsilon=target, stop_at_target=False,
                                 exporters=[PrometheusExporter(port=port)],
                                 session_id="e2e-tiny-budget", model_name="mlp")
        times: dict[str, float] = {}

        class FirstPass(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                snap = monitor.last_snapshot
                if "passed" not in times and snap is not None and snap.epsilon >= target:
                    times["passed"] = time.monotonic()

        def wait_for_alert(trainer, model):
            wait_for(lambda: {r for _, r, _ in hook.alerts("PrivacyBudgetExhausted")}
                     >= {"privacy-pager", "privacy-chat"},
                     120, what="PrivacyBudgetExhausted at the pager and chat webhooks")

        fit(monitor, wait_for_alert, extra=(FirstPass(),))
    finally:
        for server in (prom, am):
            if server is not None:
                server.stop()
        hook.close()
    received, receiver, alert = hook.alerts("PrivacyBudgetExhausted")[0]
    assert alert["labels"]["session_id"] == "e2e-tiny-budget"
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["category"] == "privacy_violation"
    assert "session e2e-tiny-budget" in alert["annotations"]["summary"]
    assert "for a target of 0.50" in alert["annotations"]["description"]
    print(f"ε passed the target -> webhook: {received - times['passed']:.1f} s")


def test_broken_noise_audit_alert_reaches_the_webhook_and_a_correct_run_stays_quiet(
        monkeypatch):
    from opacus.optimizers import optimizer as opacus_optimizer
    from test_privacy_audit import WideModel, no_noise

    ports = {"audit-ok": free_port(), "audit-broken": free_port()}
    hook = Webhook()
    am = prom = None
    bounds: dict[str, tuple[float, float]] = {}
    try:
        am = alertmanager(alertmanager_config({"soc": hook.url + "/soc"}, group_wait="1s",
                                              group_interval="1s")).start()
        prom = prometheus(prometheus_config(
            [f"127.0.0.1:{port}" for port in ports.values()], rule_files=("privacy-rules.yml",),
            alertmanager=f"127.0.0.1:{am.port}", interval="1s"),
            {"privacy-rules.yml": rule_file()}).start()
        attack = next(a for a in ALERTS if a.name == "PrivacyAttackDetected")

        def audited(session: str, at_end) -> None:
            monitor = PrivacyMonitor(delta=1e-5, exporters=[PrometheusExporter(
                port=ports[session])], session_id=session, model_name="wide")
            auditor = OneRunAudit(1e-5, canaries=1000)

            def checked(trainer, model):
                bounds[session] = (auditor.result.epsilon_lower_bound,
                                   monitor.last_snapshot.epsilon)
                wait_for(lambda: prometheus_query(
                    prom, f'privacy_audit_epsilon_lower_bound{{session_id="{session}"}}'),
                    60, what=f"Prometheus to scrape the audit of {session}")
                at_end(session)

            fit(monitor, checked, (auditor,), WideModel())

        def quiet(session: str) -> None:
            # The rule's own expression, on what Prometheus scraped: nothing for this run.
            assert not [r for r in prometheus_query(prom, attack.expr)
                        if r["metric"].get("session_id") == session]

        def alerted(session: str) -> None:
            wait_for(lambda: [a for _, r, a in hook.alerts("PrivacyAttackDetected")
                              if r == "soc" and a["labels"]["session_id"] == session],
                     120, what="PrivacyAttackDetected at the soc webhook")

        audited("audit-ok", quiet)
        monkeypatch.setattr(opacus_optimizer, "_generate_noise", no_noise)
        audited("audit-broken", alerted)
    finally:
        for server in (prom, am):
            if server is not None:
                server.stop()
        hook.close()
    (bound_ok, eps_ok), (bound_broken, eps_broken) = bounds["audit-ok"], bounds["audit-broken"]
    assert bound_ok < eps_ok == eps_broken < bound_broken
    fired = [a for _, _, a in hook.alerts("PrivacyAttackDetected")]
    assert {a["labels"]["session_id"] for a in fired} == {"audit-broken"}
    assert fired[0]["labels"]["severity"] == "critical"
    assert "one-run privacy audit proves ε ≥" in fired[0]["annotations"]["description"]
    print(f"audit: correct run {bound_ok:.3f} < ε {eps_ok:.3f} < broken run {bound_broken:.3f}")


def test_wrong_passwords_raise_the_authentication_failure_alert():
    from privacy_callbacks.exporters.base import RunInfo

    port = free_port()
    exporter = PrometheusExporter(port=port, basic_auth=("prom", "right-pw"))
    config = with_basic_auth(prometheus_config(
        [f"127.0.0.1:{port}"], rule_files=("privacy-rules.yml",), interval="1s"),
        "prom", "right-pw")
    prom = prometheus(config, {"privacy-rules.yml": rule_file()})
    exporter.start()
    try:
        exporter.open(RunInfo(session_id="auth", model_name="m", accountant="rdp"))
        prom.start()
        series = 'authentication_failures_total{session_id="auth"}'
        wait_for(lambda: prometheus_query(prom, series), 60, what="a first authenticated scrape")
        for _ in range(25):
            request = urllib.request.Request(exporter.url, headers={
                "Authorization": "Basic " + base64.b64encode(b"prom:guess").decode()})
            try:
                urllib.request.urlopen(request, timeout=10)
            except urllib.error.HTTPError as exc:
                assert exc.code == 401
        assert exporter.authentication_failures == 25

        def firing():
            alerts = json.loads(http_get(f"{prom.url}/api/v1/alerts")[1])["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"]
                    == "MetricsAuthenticationFailures" and a["state"] == "firing"]

        alert = wait_for(firing, 60, what="MetricsAuthenticationFailures to fire")[0]
        scraped = prometheus_query(prom, series)
    finally:
        prom.stop()
        exporter.close()
    assert float(scraped[0]["value"][1]) == 25
    # No client address (nor anything else per requester) in the labels.
    assert set(scraped[0]["metric"]) == {"__name__", "session_id", "model_name", "job",
                                         "instance"}
    assert alert["labels"]["session_id"] == "auth" and alert["labels"]["category"] == "security"


def test_stack_serves_and_stops_every_server_on_sigint(tmp_path: Path):
    out = tmp_path / "stack.out"
    with open(out, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "privacy_callbacks", "stack", "--dir", str(tmp_path / "s"),
             "--interval", "1s", "--prometheus-port", "0", "--alertmanager-port", "0",
             "--pushgateway-port", "0", "--victoria-metrics-port", "0"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    pids: dict[str, int] = {}
    try:
        text = wait_for(lambda: proc.poll() is None and "Ctrl-C stops" in out.read_text()
                        and out.read_text(), 120, what="the stack to print its URLs")
        urls = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[2] == "pid":
                urls[parts[0]], pids[parts[0]] = parts[1], int(parts[3])
        assert set(urls) == {"prometheus", "alertmanager", "pushgateway", "victoria-metrics"}
        for name, url in urls.items():
            path = "/health" if name == "victoria-metrics" else "/-/ready"
            assert http_get(url + path)[0] == 200, name
        rules = json.loads(http_get(urls["prometheus"] + "/api/v1/rules")[1])
        assert len(rules["data"]["groups"][0]["rules"]) == len(ALERTS)
        wait_for(lambda: json.loads(http_get(urls["prometheus"] + "/api/v1/alertmanagers")[1])
                 ["data"]["activeAlertmanagers"], 60, what="Prometheus to find the Alertmanager")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    alive = []
    for name, pid in pids.items():
        try:
            os.kill(pid, 0)
            alive.append(name)
        except ProcessLookupError:
            pass
    assert not alive, f"still running after the stack exited: {alive}"
    assert "stack stopped" in out.read_text()


def test_stack_reports_a_failing_servers_cause_whole_and_stops_the_rest(tmp_path: Path):
    workdir = tmp_path / "s"
    workdir.mkdir()
    (workdir / "victoria-metrics").write_text("a file where its data folder belongs")
    result = subprocess.run(
        [sys.executable, "-m", "privacy_callbacks", "stack", "--dir", str(workdir),
         "--prometheus-port", "0", "--alertmanager-port", "0", "--pushgateway-port", "0",
         "--victoria-metrics-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    error = result.stderr.split("error: ", 1)[1]
    assert error.startswith("victoria-metrics exited with")
    cause = error.splitlines()[1]
    assert "not a directory" in cause and str(workdir / "victoria-metrics") in cause, error
    assert not (workdir / "prometheus.log").exists()  # nothing after it was started
