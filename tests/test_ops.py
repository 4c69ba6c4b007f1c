"""Generated rules, routing and dashboards, checked by the real promtool and amtool."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from privacy_callbacks import catalog
from privacy_callbacks.__main__ import main
from privacy_callbacks.ops import ALERTS, RECEIVERS, RuleOptions, alertmanager_config
from privacy_callbacks.ops.dashboards import DATASOURCE, dashboards, panel_metrics
from privacy_callbacks.ops.rules import rule_file
from promtool_cases import cases, render, rule_tests
from servers import require_binary

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def generated(tmp_path: Path) -> Path:
    assert main(["generate", str(tmp_path), "--target", "127.0.0.1:9108",
                 "--pushgateway", "127.0.0.1:9091"]) == 0
    return tmp_path


def test_generate_writes_every_file(generated: Path):
    names = sorted(str(p.relative_to(generated)) for p in generated.rglob("*") if p.is_file())
    assert names == ["alertmanager.yml", "dashboards/privacy-budget.json",
                     "dashboards/privacy-performance.json", "dashboards/privacy-security.json",
                     "privacy-rules.yml", "prometheus.yml"]
    assert (generated / "alertmanager.yml").stat().st_mode & 0o077 == 0


def test_promtool_checks_rules_and_config(generated: Path):
    promtool = require_binary("promtool", "prometheus")
    rules = run([promtool, "check", "rules", "privacy-rules.yml"], generated)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in rules.stdout
    config = run([promtool, "check", "config", "prometheus.yml"], generated)
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_unit_tests_every_alert_both_ways(generated: Path):
    promtool = require_binary("promtool", "prometheus")
    (generated / "privacy-rules.test.yml").write_text(rule_tests("privacy-rules.yml"))
    result = run([promtool, "test", "rules", "privacy-rules.test.yml"], generated)
    assert result.returncode == 0, result.stdout + result.stderr
    by_alert = cases(RuleOptions())
    assert set(by_alert) == {alert.name for alert in ALERTS}
    for alert in ALERTS:
        assert any(case.fires for case in by_alert[alert.name]), f"{alert.name} never fires"
        assert any(not case.fires for case in by_alert[alert.name]), f"{alert.name} never quiet"


CHANGED = [
    ({"budget_low_ratio": 0.9}, "PrivacyBudgetLow: most of the budget spent"),
    ({"attack_score_threshold": 0.9}, "PrivacyAttackDetected: attack succeeds"),
    ({"attack_risk_threshold": 0.97}, "MembershipRiskBoundHigh: bound above the limit"),
    ({"auth_failure_burst": 30}, "MetricsAuthenticationFailures: burst of wrong passwords"),
    ({"overhead_ratio_threshold": 5.0}, "HighPrivacyOverhead: slow for long"),
]


@pytest.mark.parametrize("changed,case", CHANGED, ids=[c[1].split(":")[0] for c in CHANGED])
def test_promtool_unit_tests_catch_a_changed_threshold(tmp_path: Path, changed: dict, case: str):
    """Rules deployed with another threshold than their tests were written for fail those tests."""
    promtool = require_binary("promtool", "prometheus")
    (tmp_path / "rules.yml").write_text(rule_file(RuleOptions(**changed)))
    (tmp_path / "tests.yml").write_text(rule_tests("rules.yml"))
    result = run([promtool, "test", "rules", "tests.yml"], tmp_path)
    assert result.returncode != 0
    assert case in result.stdout + result.stderr


def test_promtool_unit_tests_compare_the_alert_text(tmp_path: Path):
    """The expected annotations come from the rules' own templates, yet an edited text fails."""
    promtool = require_binary("promtool", "prometheus")
    rules = rule_file()
    assert rules.count("ε spent is") == 1
    (tmp_path / "rules.yml").write_text(rules.replace("ε spent is", "epsilon spent is"))
    (tmp_path / "tests.yml").write_text(rule_tests("rules.yml"))
    result = run([promtool, "test", "rules", "tests.yml"], tmp_path)
    assert result.returncode != 0
    assert "PrivacyBudgetExhausted: epsilon past target" in result.stdout + result.stderr
    assert "ε spent is 11.00 (rdp accountant) for a target of 8.00" in result.stderr
    assert "epsilon spent is 11.00 (rdp accountant)" in result.stderr


def test_expected_annotations_are_the_rules_templates_rendered():
    tests = yaml.safe_load(rule_tests("rules.yml"))["tests"]
    by_name = {t["name"]: t["alert_rule_test"][0]["exp_alerts"] for t in tests}
    low = by_name["PrivacyBudgetLow: most of the budget spent"][0]["exp_annotations"]
    assert low["description"] == "85% of the ε budget is spent (alert at 80%; target 8.00)."
    stale = by_name["PrivacyMetricsStale: last push long ago"][0]["exp_annotations"]
    assert stale["summary"] == "Pushed privacy metrics are stale: job train"
    assert "last pushed 20m 0s ago" in stale["description"]
    audit = by_name["PrivacyAttackDetected: audit bound above the reported epsilon"][0]
    assert audit["exp_annotations"]["description"].startswith(
        "The one-run privacy audit proves ε ≥ 1.80 (95 % confidence)")
    for expected in by_name.values():
        assert "{{" not in str(expected)


def test_an_annotation_the_tests_cannot_expand_fails_their_generation(monkeypatch):
    from privacy_callbacks.ops import rules

    made = rules.alerts

    def humanized(options=None):
        return tuple(replace(a, description="{{ $value | humanize }} refused")
                     if a.name == "MetricsAuthenticationFailures" else a for a in made(options))

    monkeypatch.setattr("promtool_cases.alerts", humanized)
    with pytest.raises(ValueError, match="MetricsAuthenticationFailures: burst of wrong "
                                         "passwords: .*humanize"):
        rule_tests("rules.yml")


@pytest.mark.parametrize("text", [
    "{{ $value | humanize }}", "{{ $value }}", "{{- $labels.job }}", "{{ range . }}{{ end }}",
    "{{ if $labels.job }}open", "{{ $x := 1 }}", "{{ $value | printf \"%d\" }}",
    "{{ with query `up` }}{{ . | first | value | printf \"%.2f\" }}{{ end }}",
])
def test_renderer_refuses_what_it_does_not_implement(text: str):
    with pytest.raises(ValueError, match="not supported"):
        render(text, {"job": "j"}, 1.0, 8.0)


def test_renderer_needs_the_values_the_text_reads():
    with pytest.raises(ValueError, match="reads \\$value"):
        render("{{ $value | printf \"%.2f\" }}", {}, None)
    exhausted = next(a for a in ALERTS if a.name == "PrivacyBudgetExhausted")
    with pytest.raises(ValueError, match="reads the target"):
        render(exhausted.description, {"accountant": "rdp"}, 9.0)
    assert render(exhausted.description, {"accountant": "rdp"}, 9.0, 8.0).startswith(
        "ε spent is 9.00 (rdp accountant) for a target of 8.00, or the budget guard")


def test_renderer_expands_the_constructs_of_the_rules():
    text = ('{{ if $labels.attack_type }}{{ $labels.attack_type }}{{ else }}none{{ end }} '
            '{{ $value | printf "%.2f" }} {{ $value | humanizeDuration }}')
    assert render(text, {"session_id": "s1"}, 3725.0) == "none 3725.00 1h 2m 5s"
    assert render(text, {"attack_type": "lira"}, 59.0) == "lira 59.00 59s"
    assert render("{{ $value | humanizePercentage }}", {}, 0.85) == "85%"


def test_configurable_budget_low_ratio_is_proven_too(tmp_path: Path):
    promtool = require_binary("promtool", "prometheus")
    options = RuleOptions(budget_low_ratio=0.85, runbook_url="https://runbooks.example/privacy")
    (tmp_path / "rules.yml").write_text(rule_file(options))
    (tmp_path / "tests.yml").write_text(rule_tests("rules.yml", options))
    result = run([promtool, "test", "rules", "tests.yml"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_have_the_labels_and_annotations_routing_needs():
    names = [a.name for a in ALERTS]
    assert names == ["PrivacyBudgetExhausted", "PrivacyBudgetLow", "PrivacyAttackDetected",
                     "MembershipRiskBoundHigh", "MetricsAuthenticationFailures",
                     "PrivacyComplianceViolation", "NoiseGenerationFailure",
                     "HighPrivacyOverhead", "PrivacyAccountingErrors", "PrivacyExporterStalled",
                     "PrivacyMetricsStale"]
    severities = {a.name: a.severity for a in ALERTS}
    assert {n for n, s in severities.items() if s == "critical"} == {
        "PrivacyBudgetExhausted", "PrivacyAttackDetected", "PrivacyComplianceViolation",
        "NoiseGenerationFailure"}
    # The categories the routing knows.
    assert {a.category for a in ALERTS} == {"privacy_violation", "regulatory", "security",
                                            "performance"}
    assert {a.severity for a in ALERTS} == {"critical", "warning"}
    for alert in ALERTS:
        rule = alert.rule(None)
        assert "$labels" in rule["annotations"]["summary"], alert.name


def test_rules_and_dashboards_name_metrics_only_through_the_catalog(monkeypatch):
    monkeypatch.delitem(catalog._BY_NAME, "privacy_epsilon_target")
    with pytest.raises(KeyError, match="privacy_epsilon_target"):
        rule_file()
    with pytest.raises(KeyError, match="privacy_epsilon_target"):
        dashboards()


def test_attack_alert_pages_on_evidence_not_on_the_theoretical_bound():
    attack = next(a for a in ALERTS if a.name == "PrivacyAttackDetected")
    assert "membership_inference_risk_score" not in attack.expr
    assert {"privacy_attack_score", "privacy_audit_epsilon_lower_bound"} <= set(
        panel_metrics(attack.expr))
    bound = next(a for a in ALERTS if a.name == "MembershipRiskBoundHigh")
    assert bound.severity == "warning" and "membership_inference_risk_score" in bound.expr
    assert RuleOptions().attack_score_threshold == 0.7


def test_changed_attack_thresholds_are_proven_too(tmp_path: Path):
    promtool = require_binary("promtool", "prometheus")
    options = RuleOptions(attack_score_threshold=0.6, attack_risk_threshold=0.5,
                          auth_failure_burst=20)
    (tmp_path / "rules.yml").write_text(rule_file(options))
    (tmp_path / "tests.yml").write_text(rule_tests("rules.yml", options))
    result = run([promtool, "test", "rules", "tests.yml"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "> 0.6" in rule_file(options) and "[5m]) > 20" in rule_file(options)


def test_every_panel_queries_a_catalog_metric():
    for board in dashboards().values():
        for panel in board["panels"]:
            used = [m for t in panel["targets"] for m in panel_metrics(t["expr"])]
            assert used, f"panel {panel['title']!r} names no catalog metric"


def test_dashboards_take_the_datasource_as_a_variable(generated: Path):
    for uid in ("privacy-budget", "privacy-performance", "privacy-security"):
        board = json.loads((generated / "dashboards" / f"{uid}.json").read_text())
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert board["panels"], uid
        for panel in board["panels"]:
            assert panel["datasource"] == DATASOURCE
            assert all(t["datasource"] == DATASOURCE for t in panel["targets"])


def test_amtool_checks_the_alertmanager_config(generated: Path):
    amtool = require_binary("amtool", "prometheus-alertmanager")
    check = run([amtool, "check-config", "alertmanager.yml"], generated)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(RECEIVERS)} receivers" in check.stdout


ROUTES = [
    ({"alertname": "PrivacyBudgetExhausted", "severity": "critical",
      "category": "privacy_violation"}, "privacy-pager,privacy-chat"),
    ({"alertname": "NoiseGenerationFailure", "severity": "critical",
      "category": "privacy_violation"}, "privacy-pager,privacy-chat"),
    ({"alertname": "PrivacyComplianceViolation", "severity": "critical",
      "category": "regulatory"}, "compliance"),
    ({"alertname": "PrivacyAttackDetected", "severity": "critical", "category": "security"},
     "soc"),
    ({"alertname": "MetricsAuthenticationFailures", "severity": "warning",
      "category": "security"}, "soc"),
    ({"alertname": "PrivacyBudgetLow", "severity": "warning", "category": "privacy_violation"},
     "warnings-business-hours,warnings-after-hours"),
    ({"alertname": "HighPrivacyOverhead", "severity": "warning", "category": "performance"},
     "warnings-business-hours,warnings-after-hours"),
    ({"alertname": "SomethingElse"}, "privacy-chat"),
]


@pytest.mark.parametrize("labels,receivers", ROUTES, ids=[r[0]["alertname"] for r in ROUTES])
def test_amtool_proves_each_route(generated: Path, labels: dict[str, str], receivers: str):
    amtool = require_binary("amtool", "prometheus-alertmanager")
    result = run([amtool, "config", "routes", "test", "--config.file=alertmanager.yml",
                  f"--verify.receivers={receivers}", *(f"{k}={v}" for k, v in labels.items())],
                 generated)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receivers


def test_every_alert_routes_as_its_labels_say():
    by_label = {(r[0].get("severity"), r[0].get("category")): r[1] for r in ROUTES}
    for alert in ALERTS:
        assert (alert.severity, alert.category) in by_label, alert.name


def test_receivers_from_env_keep_secrets_out_of_errors(monkeypatch):
    monkeypatch.setenv("PRIVACY_ALERTS_PAGER", "pagerduty:SECRET-KEY")
    monkeypatch.setenv("PRIVACY_ALERTS_CHAT", "slack:https://hooks.slack.com/services/SECRET")
    config = alertmanager_config()
    assert "routing_key: SECRET-KEY" in config
    assert "api_url: https://hooks.slack.com/services/SECRET" in config
    soc = yaml.safe_load(alertmanager_config({"soc": "https://soc.example/hook"}))["receivers"]
    assert [r["name"] for r in soc if len(r) > 1] == ["soc"]  # the others send nowhere
    with pytest.raises(ValueError, match="'compliance'") as info:
        alertmanager_config({"compliance": "ftp://SECRET"})
    assert "SECRET" not in str(info.value)
    with pytest.raises(ValueError, match="Unknown receiver 'pager'"):
        alertmanager_config({"pager": "https://x.example"})


def test_cli_rule_flags_reach_the_rules(tmp_path: Path, capsys):
    assert main(["generate", str(tmp_path), "--stall-minutes", "20", "--auth-failure-burst",
                 "3", "--runbook-url", "https://runbooks.example/privacy"]) == 0
    rules = (tmp_path / "privacy-rules.yml").read_text()
    assert "[20m]) == 0" in rules and "[5m]) > 3" in rules
    assert "runbook_url: https://runbooks.example/privacy#privacyexporterstalled" in rules
    assert "receivers sending nowhere" in capsys.readouterr().err


def test_bad_rule_options_name_the_value():
    with pytest.raises(ValueError, match="budget_low_ratio: 1.2"):
        RuleOptions(budget_low_ratio=1.2)
    with pytest.raises(ValueError, match="stall_minutes: 0"):
        RuleOptions(stall_minutes=0)
    with pytest.raises(ValueError, match="attack_score_threshold: 0.3"):
        RuleOptions(attack_score_threshold=0.3)
    with pytest.raises(ValueError, match="auth_failure_burst: 2.5"):
        RuleOptions(auth_failure_burst=2.5)


def test_stack_names_the_debian_packages_of_missing_binaries(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "privacy_callbacks", "stack", "--dir", str(tmp_path / "s")],
        cwd=ROOT, env={"PATH": str(tmp_path), "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    for package in ("prometheus", "prometheus-alertmanager", "prometheus-pushgateway",
                    "victoria-metrics"):
        assert f"install the Debian package `{package}`" in result.stderr


def test_stack_refuses_a_taken_port_naming_it(tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "privacy_callbacks", "stack", "--dir", str(tmp_path / "s"),
             "--prometheus-port", str(port), "--alertmanager-port", "0",
             "--pushgateway-port", "0", "--victoria-metrics-port", "0"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"prometheus port {port} already in use" in result.stderr
    assert "--prometheus-port 0" in result.stderr
    assert not (tmp_path / "s" / "prometheus.log").exists()  # nothing was started


def test_stack_readiness_is_the_servers_own_ready_answer():
    """A foreign web server on the port (404, or 200 with other text) is not ready."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from privacy_callbacks.ops.stack import SERVICES, _ready

    answers = {"/missing": (404, b"not found"), "/-/ready": (200, b"<html>welcome</html>"),
               "/ours": (200, b"Prometheus Server is Ready.\n")}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            code, body = answers[self.path]
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="privacy-test-http")
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        body = SERVICES["prometheus"].ready_body
        assert not _ready(base + "/missing", body)
        assert not _ready(base + "/-/ready", body)
        assert _ready(base + "/ours", body)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_stack_quotes_a_failing_servers_error_whole():
    from privacy_callbacks.ops.stack import error_lines

    cause = ("ts=2026-12-02T01:00:00Z caller=main.go:1 level=error msg=\"Error loading config\" "
             + "err=\"parsing YAML file prometheus.yml: yaml: line 3: " + "x" * 1500 + "\"")
    log = "\n".join(["level=info msg=starting"] * 50 + [cause, "level=info msg=bye"])
    assert error_lines(log) == cause
