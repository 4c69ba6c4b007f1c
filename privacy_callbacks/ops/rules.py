"""Prometheus alert rules and a scrape config, naming every metric through :func:`metric`."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from .. import catalog
from ..checks import number

RUN_KEYS = "job, instance, session_id, model_name"  # the labels naming a run's series
PUSH_TIME_SECONDS = "push_time_seconds"  # the Pushgateway's own: Unix time of a group's last push


def metric(name: str, suffix: str = "") -> str:
    """The catalog's name (``KeyError`` if unknown: generation fails), + a histogram suffix."""
    m = catalog.by_name(name)
    if suffix and m.kind != "histogram":
        raise ValueError(f"Suffix {suffix!r} does not apply to {m.kind} {m.name!r}")
    return m.name + suffix


@dataclass(frozen=True)
class RuleOptions:
    """Thresholds of the rules (docs/operations.md; the windows are fixed): a guess accuracy
    (0.5 = chance) for attacks, the advantage bound ε allows for the risk warning."""

    budget_low_ratio: float = 0.8
    attack_score_threshold: float = 0.7
    attack_risk_threshold: float = 0.9
    auth_failure_burst: int = 10
    overhead_ratio_threshold: float = 3.0
    stall_minutes: int = 10
    runbook_url: str | None = None

    def __post_init__(self) -> None:
        number("budget_low_ratio", self.budget_low_ratio, "a fraction between 0 and 1", high=1)
        number("attack_score_threshold", self.attack_score_threshold,
               "a guess accuracy in [0.5, 1)", low=0.5, low_ok=True, high=1)
        number("attack_risk_threshold", self.attack_risk_threshold, "an advantage in [0, 1)",
               low_ok=True, high=1)
        number("overhead_ratio_threshold", self.overhead_ratio_threshold, "a ratio above 1", low=1)
        number("auth_failure_burst", self.auth_failure_burst, "a count >= 0", low_ok=True,
               integer=True)
        number("stall_minutes", self.stall_minutes, "whole minutes >= 1", low=1, low_ok=True,
               integer=True)


@dataclass(frozen=True)
class Alert:
    """One alerting rule; ``summary`` and ``description`` are Prometheus templates."""

    name: str
    severity: str
    category: str
    expr: str
    summary: str
    description: str
    runbook: str
    for_: str = "0s"

    def rule(self, runbook_url: str | None) -> dict:
        url = {"runbook_url": f"{runbook_url}#{self.name.lower()}"} if runbook_url else {}
        return {"alert": self.name, "expr": self.expr, "for": self.for_,
                "labels": {"severity": self.severity, "category": self.category},
                "annotations": {"summary": self.summary, "description": self.description,
                                "runbook": self.runbook, **url}}


def _increased(name: str) -> str:
    """Counter ``name`` went up within 10 min, or first appeared there above 0 (``increase``
    misses the first increment of a series that starts at its first event, as ours do)."""
    m = metric(name)
    return f"(increase({m}[10m]) > 0) or ({m} > 0 unless ({m} offset 10m))"


def alerts(options: RuleOptions | None = None) -> tuple[Alert, ...]:
    """The alerts with ``options`` (defaults if ``None``)."""
    o = options or RuleOptions()
    eps, target = metric("privacy_epsilon_consumed"), metric("privacy_epsilon_target")
    steps = metric("training_steps_with_privacy_total")
    noise_sum = metric("privacy_noise_magnitude", "_sum")
    noise_count = metric("privacy_noise_magnitude", "_count")
    who = "session {{ $labels.session_id }} (model {{ $labels.model_name }})"
    target_of = ("{{ with printf `" + target + "{session_id=%q,model_name=%q,accountant=%q}` "
                 "$labels.session_id $labels.model_name $labels.accountant | query }}"
                 '{{ . | first | value | printf "%.2f" }}{{ end }}')
    stall = f"{o.stall_minutes}m"
    return (
        Alert("PrivacyBudgetExhausted", "critical", "privacy_violation",
              f"({eps} >= {target}) or ({eps} and ({metric('privacy_budget_exhausted')} == 1))",
              "Privacy budget exhausted: " + who,
              'ε spent is {{ $value | printf "%.2f" }} ({{ $labels.accountant }} accountant) '
              f"for a target of {target_of}, or the budget guard allows no further step.",
              "Stop the run; release no checkpoint past the target; retrain with more noise."),
        Alert("PrivacyBudgetLow", "warning", "privacy_violation",
              f"({eps} / {target} >= {o.budget_low_ratio!r}) and ({eps} < {target})",
              "Privacy budget nearly spent: " + who,
              "{{ $value | humanizePercentage }} of the ε budget is spent (alert at "
              f"{o.budget_low_ratio:.0%}; target {target_of}).",
              "See privacy_epsilon_forecast; shorten training or raise the noise in time."),
        Alert("PrivacyAttackDetected", "critical", "security",
              # The audit's contradiction first: where it holds, it is what the alert says.
              f"({metric('privacy_audit_epsilon_lower_bound')} > on({RUN_KEYS}) group_left() "
              f"max by ({RUN_KEYS}) ({eps})) or on({RUN_KEYS}) "
              f"({metric('privacy_attack_score')} > {o.attack_score_threshold!r})",
              "Privacy attack evidence: " + who,
              "{{ if $labels.attack_type }}The {{ $labels.attack_type }} membership attack "
              'guesses with accuracy {{ $value | printf "%.2f" }} (threshold '
              f"{o.attack_score_threshold!r}, chance 0.5).{{{{ else }}}}The one-run privacy "
              'audit proves ε ≥ {{ $value | printf "%.2f" }} (95 % confidence), above the '
              "reported ε: the privacy mechanism is weaker than reported.{{ end }}",
              "Treat the model as leaking: release nothing, check the mechanism's wiring."),
        Alert("MembershipRiskBoundHigh", "warning", "privacy_violation",
              f"{metric('membership_inference_risk_score')} > {o.attack_risk_threshold!r}",
              "Membership-inference bound above the policy limit: " + who,
              'At the ε spent, an attack may reach an advantage of {{ $value | printf "%.2f" }} '
              f"(limit {o.attack_risk_threshold!r}): what ε allows, not a measured attack.",
              "Review ε with the data owners; OneRunAudit measures what an attack achieves."),
        Alert("MetricsAuthenticationFailures", "warning", "security",
              f"increase({metric('authentication_failures_total')}[5m]) > {o.auth_failure_burst!r}",
              "Refused requests to protected /metrics: " + who,
              '{{ $value | printf "%.0f" }} requests to /metrics were refused for missing or '
              f"wrong credentials within 5m (alert above {o.auth_failure_burst!r}).",
              "Find the scraper with wrong credentials; rotate them if someone is guessing."),
        Alert("PrivacyComplianceViolation", "critical", "regulatory",
              _increased("privacy_compliance_violations_total"),
              "Privacy policy violated: " + who,
              "Policy {{ $labels.policy }} was violated ({{ $labels.violation_type }}) within "
              "the last 10m.",
              "Record it in the audit trail, pause releases, inform the policy's owner."),
        Alert("NoiseGenerationFailure", "critical", "privacy_violation",
              f"({metric('privacy_noise_multiplier')} == 0) or ({noise_sum} != {noise_sum}) or "
              f"((increase({noise_count}[5m]) > 0) and (increase({noise_sum}[5m]) == 0))",
              "No privacy noise: " + who,
              "The noise added to the gradients is zero or not a number (noise multiplier 0, or "
              "noise norms of 0 / NaN): the updates of this run are not private.",
              "Stop the run, check the noise multiplier and discard the checkpoints."),
        Alert("HighPrivacyOverhead", "warning", "performance",
              f'{metric("privacy_overhead_ratio")}{{operation="total"}} '
              f"> {o.overhead_ratio_threshold!r}",
              "High DP overhead: " + who,
              'A private step takes {{ $value | printf "%.1f" }} times a plain step (threshold '
              f"{o.overhead_ratio_threshold!r}, for 5m).",
              "See privacy_overhead_ratio by operation (try ghost clipping).", for_="5m"),
        Alert("PrivacyAccountingErrors", "warning", "privacy_violation",
              _increased("privacy_accounting_errors_total"),
              "Privacy accounting failed: " + who,
              'ε could not be computed {{ $value | printf "%.0f" }} time(s) within the last '
              "10m; the reported ε may be stale.",
              "Read the accountant's exception in the log; until then the budget is unknown."),
        Alert("PrivacyExporterStalled", "warning", "performance",
              f"increase({steps}[{stall}]) == 0",
              f"No training step for {stall}: " + who,
              f"The run serves its metrics but accounted no step in {stall}: training or the "
              "metrics publisher is stuck.",
              "Check the training process and privacy_export_dropped_total."),
        Alert("PrivacyMetricsStale", "warning", "performance",
              f"((time() - {PUSH_TIME_SECONDS}) > 600) "
              f"and on(job, instance) group by (job, instance) ({steps})",
              "Pushed privacy metrics are stale: job {{ $labels.job }}",
              "The Pushgateway group of job {{ $labels.job }} was last pushed "
              "{{ $value | humanizeDuration }} ago (limit 10m).",
              "Ended: delete its group; running: check privacy_export_dropped_total."),
    )


ALERTS: tuple[Alert, ...] = alerts()


def _dump(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def rule_file(options: RuleOptions | None = None) -> str:
    """The Prometheus rule file (YAML) with every alert."""
    options = options or RuleOptions()
    return _dump({"groups": [{"name": "privacy_callbacks", "rules": [
        a.rule(options.runbook_url) for a in alerts(options)]}]})


def prometheus_config(targets: list[str], *, rule_files: tuple[str, ...] = (),
                      alertmanager: str | None = None, pushgateway: str | None = None,
                      remote_write: str | None = None, interval: str = "15s") -> str:
    """A Prometheus config scraping ``targets`` and a ``pushgateway`` (``host:port``), alerting
    ``alertmanager``, copying every sample to ``remote_write`` (a ``/api/v1/write`` URL)."""
    for target in [*targets, *filter(None, (alertmanager, pushgateway))]:
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit() or "/" in target:
            raise ValueError(f"Unexpected target {target!r}: use host:port, e.g. 127.0.0.1:9108")
    scrape: list[dict] = [{"job_name": "privacy", "static_configs": [{"targets": list(targets)}]}]
    scrape = scrape if targets else []
    if pushgateway:
        scrape.append({"job_name": "pushgateway", "honor_labels": True,
                       "static_configs": [{"targets": [pushgateway]}]})
    if not scrape:
        raise ValueError("No scrape target: pass the exporters' host:port or a Pushgateway")
    return _dump({key: value for key, value in {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": list(rule_files), "scrape_configs": scrape,
        "alerting": alertmanager and {"alertmanagers": [{"static_configs": [
            {"targets": [alertmanager]}]}]},
        "remote_write": remote_write and [{"url": remote_write}]}.items() if value})
