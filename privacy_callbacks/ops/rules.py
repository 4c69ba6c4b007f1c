"""Prometheus alert rules and a scrape config, naming every metric through :func:`metric`."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from .. import catalog
from ..checks import number

__all__ = ["ALERTS", "CATEGORIES", "Alert", "RuleOptions", "alerts", "metric",
           "prometheus_config", "rule_file"]

CATEGORIES = ("privacy_violation", "regulatory", "security", "performance")  # the routing's
PUSH_TIME_SECONDS = "push_time_seconds"  # the Pushgateway's own: Unix time of a group's last push


def metric(name: str, suffix: str = "") -> str:
    """The catalog's name for ``name`` (``KeyError`` if unknown: generation fails), with a
    histogram ``suffix``."""
    m = catalog.by_name(name)
    if suffix and (m.kind != "histogram" or suffix not in ("_bucket", "_sum", "_count")):
        raise ValueError(f"Suffix {suffix!r} does not apply to {m.kind} {m.name!r}")
    return m.name + suffix


@dataclass(frozen=True)
class RuleOptions:
    """Thresholds of the rules (the windows are fixed: see docs/operations.md).

    ``attack_score_threshold`` is a guess accuracy (0.5 = chance), ``attack_risk_threshold`` the
    advantage bound that ε allows (it warns, never pages); ``runbook_url`` gets ``#<alertname>``.
    """

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
        annotations = {"summary": self.summary, "description": self.description,
                       "runbook": self.runbook}
        if runbook_url:
            annotations["runbook_url"] = f"{runbook_url}#{self.name.lower()}"
        return {"alert": self.name, "expr": self.expr, "for": self.for_,
                "labels": {"severity": self.severity, "category": self.category},
                "annotations": annotations}


def _increased(name: str, window: str) -> str:
    """Counter ``name`` went up within ``window``, or first appeared there above 0 (``increase``
    misses the first increment of a series that starts at its first event, as ours do)."""
    m = metric(name)
    return f"(increase({m}[{window}]) > 0) or ({m} > 0 unless ({m} offset {window}))"


def alerts(options: RuleOptions | None = None) -> tuple[Alert, ...]:
    """The alerts with ``options`` (defaults if ``None``)."""
    o = options or RuleOptions()
    recent = "10m"  # how far back a new violation or accounting error counts
    eps, target = metric("privacy_epsilon_consumed"), metric("privacy_epsilon_target")
    steps = metric("training_steps_with_privacy_total")
    noise_sum = metric("privacy_noise_magnitude", "_sum")
    noise_count = metric("privacy_noise_magnitude", "_count")
    run_keys = "job, instance, session_id, model_name"
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
              f"for a target of {target_of}, or the budget guard allows no further step. Every "
              "further step weakens the privacy guarantee.",
              "Stop the run now (or confirm the budget guard stopped it). Do not release the "
              "model or checkpoints saved after the target was passed; retrain with a larger "
              "noise multiplier, fewer epochs or an approved larger target."),
        Alert("PrivacyBudgetLow", "warning", "privacy_violation",
              f"({eps} / {target} >= {o.budget_low_ratio!r}) and ({eps} < {target})",
              "Privacy budget nearly spent: " + who,
              "{{ $value | humanizePercentage }} of the ε budget is spent (alert at "
              f"{o.budget_low_ratio:.0%}; target {target_of}).",
              "Check the forecast (privacy_epsilon_forecast) and the steps left "
              "(privacy_budget_exhaustion_steps); shorten training or raise the noise "
              "multiplier before the target is reached."),
        Alert("PrivacyAttackDetected", "critical", "security",
              # The audit's contradiction first: where it holds, it is what the alert says.
              f"({metric('privacy_audit_epsilon_lower_bound')} > on({run_keys}) group_left() "
              f"max by ({run_keys}) ({eps})) or on({run_keys}) "
              f"({metric('privacy_attack_score')} > {o.attack_score_threshold!r})",
              "Privacy attack evidence: " + who,
              "{{ if $labels.attack_type }}The {{ $labels.attack_type }} membership attack "
              'guesses with accuracy {{ $value | printf "%.2f" }} (threshold '
              f"{o.attack_score_threshold!r}, chance 0.5).{{{{ else }}}}The one-run privacy "
              'audit proves ε ≥ {{ $value | printf "%.2f" }} (95 % confidence), above the '
              "reported ε: the privacy mechanism is weaker than reported.{{ end }}",
              "Treat the model as leaking its training data: do not release it or its "
              "checkpoints, restrict access to its outputs, and check the mechanism (noise "
              "multiplier, sample rate, accountant wiring) before retraining; the audit trail "
              "holds the audit record."),
        Alert("MembershipRiskBoundHigh", "warning", "privacy_violation",
              f"{metric('membership_inference_risk_score')} > {o.attack_risk_threshold!r}",
              "Membership-inference bound above the policy limit: " + who,
              "At the ε spent, the proven bound lets a membership attack reach an advantage of "
              '{{ $value | printf "%.2f" }} ' f"(policy limit {o.attack_risk_threshold!r}). "
              "This is what ε allows, not a measured attack.",
              "Review ε against the data owners' requirements; to measure what an attack "
              "achieves, add MembershipInferenceProbe or OneRunAudit to the run."),
        Alert("MetricsAuthenticationFailures", "warning", "security",
              f"increase({metric('authentication_failures_total')}[5m]) > {o.auth_failure_burst!r}",
              "Refused requests to protected /metrics: " + who,
              '{{ $value | printf "%.0f" }} requests to /metrics were refused for missing or '
              f"wrong credentials within 5m (alert above {o.auth_failure_burst!r}).",
              "Find who is scraping with wrong credentials (a misconfigured scraper after a "
              "password rotation, or someone guessing): check the network logs of the "
              "exporter's host; rotate the credentials if guessing is likely."),
        Alert("PrivacyComplianceViolation", "critical", "regulatory",
              _increased("privacy_compliance_violations_total", recent),
              "Privacy policy violated: " + who,
              "Policy {{ $labels.policy }} was violated ({{ $labels.violation_type }}) within "
              f"the last {recent}.",
              "Record the violation in the audit trail, pause releases of this model and inform "
              "the compliance owner of the policy."),
        Alert("NoiseGenerationFailure", "critical", "privacy_violation",
              f"({metric('privacy_noise_multiplier')} == 0) or ({noise_sum} != {noise_sum}) or "
              f"((increase({noise_count}[5m]) > 0) and (increase({noise_sum}[5m]) == 0))",
              "No privacy noise: " + who,
              "The noise added to the gradients is zero or not a number (noise multiplier 0, or "
              "noise norms of 0 / NaN): the updates of this run are not private.",
              "Stop the run. Check the privacy engine's noise_multiplier (and any scheduler "
              "changing it) and the optimizer wiring; discard checkpoints trained without noise."),
        Alert("HighPrivacyOverhead", "warning", "performance",
              f'{metric("privacy_overhead_ratio")}{{operation="total"}} '
              f"> {o.overhead_ratio_threshold!r}",
              "High DP overhead: " + who,
              'A private step takes {{ $value | printf "%.1f" }} times a plain step (threshold '
              f"{o.overhead_ratio_threshold!r}, for 5m).",
              "Look at privacy_overhead_ratio by operation: per-sample gradients dominate with "
              "large models (try ghost clipping or a smaller batch per device); noise "
              "generation dominates when it runs on the CPU.", for_="5m"),
        Alert("PrivacyAccountingErrors", "warning", "privacy_violation",
              _increased("privacy_accounting_errors_total", recent),
              "Privacy accounting failed: " + who,
              'ε could not be computed {{ $value | printf "%.0f" }} time(s) within the last '
              f"{recent}; the reported ε may be stale.",
              "Read the training log for the accountant's exception; until ε is computed again, "
              "treat the budget as unknown and do not extend training."),
        Alert("PrivacyExporterStalled", "warning", "performance",
              f"increase({steps}[{stall}]) == 0",
              f"No training step for {stall}: " + who,
              f"The run still serves its metrics but accounted no optimizer step in {stall}: "
              "training or the metrics publisher is stuck.",
              "Check the training process (stack dump, GPU utilisation) and the exporter's "
              "privacy_export_dropped_total; a stuck publisher never blocks training, a stuck "
              "trainer does."),
        Alert("PrivacyMetricsStale", "warning", "performance",
              f"((time() - {PUSH_TIME_SECONDS}) > 600) "
              f"and on(job, instance) group by (job, instance) ({steps})",
              "Pushed privacy metrics are stale: job {{ $labels.job }}",
              "The Pushgateway group of job {{ $labels.job }} was last pushed "
              "{{ $value | humanizeDuration }} ago (limit 10m).",
              "If the run ended, delete its group from the Pushgateway; if it runs, check that "
              "it can reach the Pushgateway (privacy_export_dropped_total counts failed pushes)."),
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
    """A Prometheus config scraping the exporters at ``targets`` (``host:port``) and a
    ``pushgateway`` (pushed labels kept), loading ``rule_files`` (relative to the config's
    folder), alerting ``alertmanager`` and copying every sample to ``remote_write`` (e.g.
    VictoriaMetrics' ``/api/v1/write``)."""
    if not targets and not pushgateway:
        raise ValueError("No scrape target: pass the exporters' host:port (e.g. 127.0.0.1:9108) "
                         "or a Pushgateway")
    for target in [*targets, *filter(None, (alertmanager, pushgateway))]:
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit() or "/" in target:
            raise ValueError(f"Unexpected target {target!r}: use host:port, e.g. 127.0.0.1:9108")
    jobs: tuple[tuple[str, list, dict], ...] = (
        ("privacy", list(targets), {}), ("pushgateway", [pushgateway], {"honor_labels": True}))
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": list(rule_files),
        "alerting": alertmanager and {"alertmanagers": [{"static_configs": [
            {"targets": [alertmanager]}]}]},
        "scrape_configs": [{"job_name": job, **extra, "static_configs": [{"targets": hosts}]}
                           for job, hosts, extra in jobs if hosts and hosts[0]],
        "remote_write": remote_write and [{"url": remote_write}],
    }
    return _dump({key: value for key, value in config.items() if value})
