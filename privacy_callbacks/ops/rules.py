"""Prometheus alert rules, their ``promtool test rules`` file and a scrape config.

Every metric name in an expression comes from :func:`privacy_callbacks.catalog.by_name`, so a
renamed metric changes the rules and a removed one makes generation fail with a ``KeyError``.
Each alert carries example series that make it fire and that keep it quiet; :func:`rule_tests`
turns them into a ``promtool test rules`` file, so every alert is proven both ways. The expected
annotations of a firing case are the rule's own templates rendered (:mod:`.template`) for the
case's labels and value, so each alert's text is written once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import yaml

from .. import catalog
from .template import render, selector_query

__all__ = ["ALERTS", "CATEGORIES", "Alert", "Case", "RuleOptions", "prometheus_config",
           "rule_file", "rule_tests"]

CATEGORIES: tuple[str, ...] = ("privacy_violation", "regulatory", "security", "performance")
SEVERITIES: tuple[str, ...] = ("critical", "warning")

# The Pushgateway's own per-group metric (not one of ours): Unix time of the group's last push.
PUSH_TIME_SECONDS = "push_time_seconds"

RULE_GROUP = "privacy_callbacks"


def metric(name: str, suffix: str = "") -> str:
    """The catalog's name for ``name`` (``KeyError`` if unknown), with a histogram ``suffix``."""
    m = catalog.by_name(name)
    if suffix and (m.kind != "histogram" or suffix not in ("_bucket", "_sum", "_count")):
        raise ValueError(f"Suffix {suffix!r} does not apply to {m.kind} {m.name!r}")
    return m.name + suffix


def _increased(name: str, window: str) -> str:
    """Counter ``name`` went up within ``window``, including a series that first appeared there.

    ``increase`` alone misses the first increment of a series that starts at its first event
    (our counters do), so a series that is new since ``window`` ago and above 0 counts too.
    """
    m = metric(name)
    return f"(increase({m}[{window}]) > 0) or ({m} > 0 unless ({m} offset {window}))"


@dataclass(frozen=True)
class RuleOptions:
    """Thresholds of the generated rules.

    Args:
        budget_low_ratio: ``PrivacyBudgetLow`` fires once ε / target reaches this (0 < r < 1).
        attack_score_threshold: ``PrivacyAttackDetected`` fires when an attack's measured
            success (``privacy_attack_score``, guess accuracy, 0.5 = chance) exceeds this. It
            also fires, whatever this is, when the one-run audit proves ε above the reported ε.
        attack_risk_threshold: ``MembershipRiskBoundHigh`` (a warning) fires when the proven
            bound on any attack's advantage (``membership_inference_risk_score``, 0..1) exceeds
            this policy limit. The bound follows from ε alone (it passes 0.5 near ε = 1.1), so
            it is no evidence of an attack and never pages.
        auth_failure_burst: ``MetricsAuthenticationFailures`` fires when more than this many
            requests to the protected ``/metrics`` are refused within ``auth_failure_window``.
        auth_failure_window: The window of that count (Prometheus duration).
        overhead_ratio_threshold: ``HighPrivacyOverhead`` fires when a DP step takes more than
            this many times a plain step, for ``overhead_for``.
        overhead_for: How long the overhead must stay high (Prometheus duration).
        stall_minutes: ``PrivacyExporterStalled`` fires when a served run made no step for this
            long.
        push_stale_minutes: ``PrivacyMetricsStale`` fires when a pushed group is older than this.
        violation_window: How far back a new compliance violation or accounting error counts.
        runbook_url: Base URL of your runbook; ``#<alertname>`` is appended in ``runbook_url``.
    """

    budget_low_ratio: float = 0.8
    attack_score_threshold: float = 0.7
    attack_risk_threshold: float = 0.9
    auth_failure_burst: int = 10
    auth_failure_window: str = "5m"
    overhead_ratio_threshold: float = 3.0
    overhead_for: str = "5m"
    stall_minutes: int = 10
    push_stale_minutes: int = 10
    violation_window: str = "10m"
    runbook_url: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.budget_low_ratio < 1.0:
            raise ValueError(f"Unexpected value for budget_low_ratio: {self.budget_low_ratio!r}; "
                             "use a fraction of the target between 0 and 1, e.g. 0.8")
        if not 0.5 <= self.attack_score_threshold < 1.0:
            raise ValueError(f"Unexpected value for attack_score_threshold: "
                             f"{self.attack_score_threshold!r}; use a guess accuracy in "
                             "[0.5, 1), e.g. 0.7")
        if (isinstance(self.auth_failure_burst, bool)
                or not isinstance(self.auth_failure_burst, int) or self.auth_failure_burst < 0):
            raise ValueError(f"Unexpected value for auth_failure_burst: "
                             f"{self.auth_failure_burst!r}; use a number of requests >= 0")
        if not 0.0 <= self.attack_risk_threshold < 1.0:
            raise ValueError(f"Unexpected value for attack_risk_threshold: "
                             f"{self.attack_risk_threshold!r}; use an advantage in [0, 1)")
        if not (math.isfinite(self.overhead_ratio_threshold) and self.overhead_ratio_threshold > 1):
            raise ValueError(f"Unexpected value for overhead_ratio_threshold: "
                             f"{self.overhead_ratio_threshold!r}; use a ratio above 1, e.g. 3.0")
        for name in ("stall_minutes", "push_stale_minutes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Unexpected value for {name}: {value!r}; use whole minutes >= 1")
        for name in ("overhead_for", "violation_window", "auth_failure_window"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value[:-1].isdigit() and value[-1] in "smh"):
                raise ValueError(f"Unexpected value for {name}: {value!r}; "
                                 "use a duration like '5m'")


@dataclass(frozen=True)
class Case:
    """Input series for ``promtool test rules`` and what the alert must do at ``eval_time``.

    Attributes:
        name: What the case shows.
        series: ``(series selector, promtool values)`` pairs, one sample per minute.
        fires: Expected alerts as ``(labels of the firing series, its value)``; the value is
            ``$value`` in the annotations, ``None`` where they do not read it. Empty: stays quiet.
        eval_time: When the rule is checked (whole minutes, e.g. ``"10m"``).
    """

    name: str
    series: tuple[tuple[str, str], ...]
    fires: tuple[tuple[dict[str, str], float | None], ...] = ()
    eval_time: str = "10m"


@dataclass(frozen=True)
class Alert:
    """One alerting rule with the cases that prove it."""

    name: str
    severity: str
    category: str
    expr: str
    summary: str
    description: str
    runbook: str
    cases: tuple[Case, ...] = ()
    for_: str = "0s"
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES or self.category not in CATEGORIES:
            raise ValueError(f"{self.name}: severity {self.severity!r} / category "
                             f"{self.category!r} not in {SEVERITIES} / {CATEGORIES}")

    def rule(self, runbook_url: str | None) -> dict:
        annotations = {"summary": self.summary, "description": self.description,
                       "runbook": self.runbook}
        if runbook_url:
            annotations["runbook_url"] = f"{runbook_url}#{self.name.lower()}"
        return {"alert": self.name, "expr": self.expr, "for": self.for_,
                "labels": {"severity": self.severity, "category": self.category, **self.labels},
                "annotations": annotations}


_RUN = 'session_id="s1",model_name="m1",job="privacy",instance="127.0.0.1:9108"'
_RUN_LABELS = {"session_id": "s1", "model_name": "m1", "job": "privacy",
               "instance": "127.0.0.1:9108"}
_ACC = {**_RUN_LABELS, "accountant": "rdp"}


def _sel(name: str, labels: str = _RUN) -> str:
    """A series selector for a name already resolved with :func:`metric`."""
    return f"{name}{{{labels}}}"


def _alerts(o: RuleOptions) -> tuple[Alert, ...]:
    eps, target = metric("privacy_epsilon_consumed"), metric("privacy_epsilon_target")
    exhausted = metric("privacy_budget_exhausted")
    risk = metric("membership_inference_risk_score")
    score = metric("privacy_attack_score")
    audit_bound = metric("privacy_audit_epsilon_lower_bound")
    auth = metric("authentication_failures_total")
    run_keys = "job, instance, session_id, model_name"
    # Case values on either side of the configured thresholds.
    score_hi, score_lo = (1 + o.attack_score_threshold) / 2, 0.5
    risk_hi, risk_lo = (1 + o.attack_risk_threshold) / 2, o.attack_risk_threshold / 2
    sigma = metric("privacy_noise_multiplier")
    noise_sum = metric("privacy_noise_magnitude", "_sum")
    noise_count = metric("privacy_noise_magnitude", "_count")
    overhead = metric("privacy_overhead_ratio")
    steps = metric("training_steps_with_privacy_total")
    violations = metric("privacy_compliance_violations_total")
    errors = metric("privacy_accounting_errors_total")
    acc = _RUN + ',accountant="rdp"'
    who = "session {{ $labels.session_id }} (model {{ $labels.model_name }})"
    target_of = ('{{ with printf `' + target + '{session_id=%q,model_name=%q,accountant=%q}` '
                 '$labels.session_id $labels.model_name $labels.accountant | query }}'
                 '{{ . | first | value | printf \"%.2f\" }}{{ end }}')
    stall = f"{o.stall_minutes}m"
    low_pct = f"{o.budget_low_ratio:.0%}"
    return (
        Alert(
            "PrivacyBudgetExhausted", "critical", "privacy_violation",
            f"({eps} >= {target}) or ({eps} and ({exhausted} == 1))",
            "Privacy budget exhausted: " + who,
            "ε spent is {{ $value | printf \"%.2f\" }} ("
            "{{ $labels.accountant }} accountant) for a "
            "target of " + target_of + ", or the budget guard allows no further step. Every "
            "further step weakens the privacy guarantee.",
            "Stop the run now (or confirm the budget guard stopped it). Do not release the model "
            "or checkpoints saved after the target was passed; retrain with a larger noise "
            "multiplier, fewer epochs or an approved larger target.",
            cases=(
                Case("epsilon past target",
                     ((_sel(eps, acc), "1+1x10"), (_sel(target, acc), "8x10")),
                     fires=((_ACC, 11.0),)),
                Case("guard stopped before target",
                     ((_sel(eps, acc), "7.5x10"), (_sel(target, acc), "8x10"),
                      (_sel(exhausted, acc), "0x8 1 1")),
                     fires=((_ACC, 7.5),)),
                Case("epsilon below target", ((_sel(eps, acc), "7.9x10"),
                                              (_sel(target, acc), "8x10"),
                                              (_sel(exhausted, acc), "0x10"))),
            )),
        Alert(
            "PrivacyBudgetLow", "warning", "privacy_violation",
            f"({eps} / {target} >= {o.budget_low_ratio!r}) and ({eps} < {target})",
            "Privacy budget nearly spent: " + who,
            "{{ $value | humanizePercentage }} of the ε budget is spent (" + f"alert at {low_pct}"
            "; target " + target_of + ").",
            "Check the forecast (privacy_epsilon_forecast) and the steps left "
            "(privacy_budget_exhaustion_steps); shorten training or raise the noise multiplier "
            "before the target is reached.",
            cases=(
                Case("most of the budget spent", ((_sel(eps, acc), "6.8x10"),
                                                  (_sel(target, acc), "8x10")),
                     fires=((_ACC, 6.8 / 8),)),
                Case("half the budget spent", ((_sel(eps, acc), "4x10"),
                                               (_sel(target, acc), "8x10"))),
                Case("target passed: the critical alert speaks",
                     ((_sel(eps, acc), "9x10"), (_sel(target, acc), "8x10"))),
            )),
        Alert(
            "PrivacyAttackDetected", "critical", "security",
            # The audit's contradiction first: where it holds, it is what the alert says.
            f"({audit_bound} > on({run_keys}) group_left() max by ({run_keys}) ({eps})) "
            f"or on({run_keys}) ({score} > {o.attack_score_threshold!r})",
            "Privacy attack evidence: " + who,
            "{{ if $labels.attack_type }}The {{ $labels.attack_type }} membership attack guesses "
            "with accuracy {{ $value | printf \"%.2f\" }} (threshold "
            f"{o.attack_score_threshold!r}, chance 0.5)."
            "{{ else }}The one-run privacy audit proves ε ≥ {{ $value | printf \"%.2f\" }} (95 % "
            "confidence), above the reported ε: the privacy mechanism is weaker than "
            "reported.{{ end }}",
            "Treat the model as leaking its training data: do not release it or its checkpoints, "
            "restrict access to its outputs, and check the mechanism (noise multiplier, sample "
            "rate, accountant wiring) before retraining; the audit trail holds the audit record.",
            cases=(
                Case("attack succeeds", ((_sel(score, _RUN + ',attack_type="loss_threshold"'),
                                          f"{score_hi!r}x10"),),
                     fires=(({**_RUN_LABELS, "attack_type": "loss_threshold"}, score_hi),)),
                Case("audit bound above the reported epsilon",
                     ((_sel(audit_bound), "1.8x10"), (_sel(eps, acc), "0.58x10"),
                      (_sel(score, _RUN + ',attack_type="one_run_audit"'), f"{score_hi!r}x10")),
                     fires=((_RUN_LABELS, 1.8),)),
                Case("audit bound below the reported epsilon, chance-level attack",
                     ((_sel(audit_bound), "0.06x10"), (_sel(eps, acc), "0.58x10"),
                      (_sel(score, _RUN + ',attack_type="one_run_audit"'), f"{score_lo!r}x10"),
                      (_sel(score, _RUN + ',attack_type="loss_threshold"'), f"{score_lo!r}x10"))),
                Case("high theoretical bound is no attack",
                     ((_sel(risk), "0.99x10"), (_sel(eps, acc), "8x10"))),
            )),
        Alert(
            "MembershipRiskBoundHigh", "warning", "privacy_violation",
            f"{risk} > {o.attack_risk_threshold!r}",
            "Membership-inference bound above the policy limit: " + who,
            "At the ε spent, the proven bound lets a membership attack reach an advantage of "
            "{{ $value | printf \"%.2f\" }} (policy limit " + f"{o.attack_risk_threshold!r}). "
            "This is what ε allows, not a measured attack.",
            "Review ε against the data owners' requirements; to measure what an attack "
            "achieves, add MembershipInferenceProbe or OneRunAudit to the run.",
            cases=(
                Case("bound above the limit", ((_sel(risk), f"{risk_hi!r}x10"),),
                     fires=((_RUN_LABELS, risk_hi),)),
                Case("bound below the limit", ((_sel(risk), f"{risk_lo!r}x10"),)),
            )),
        Alert(
            "MetricsAuthenticationFailures", "warning", "security",
            f"increase({auth}[{o.auth_failure_window}]) > {o.auth_failure_burst!r}",
            "Refused requests to protected /metrics: " + who,
            "{{ $value | printf \"%.0f\" }} requests to /metrics were refused for missing or "
            f"wrong credentials within {o.auth_failure_window} (alert above "
            f"{o.auth_failure_burst!r}).",
            "Find who is scraping with wrong credentials (a misconfigured scraper after a "
            "password rotation, or someone guessing): check the network logs of the exporter's "
            "host; rotate the credentials if guessing is likely.",
            cases=(
                Case("burst of wrong passwords", ((_sel(auth), "0x8 25"),),
                     eval_time="9m",
                     fires=((_RUN_LABELS, 25.0),)),
                Case("one mistyped password", ((_sel(auth), "0 0 1 1 1 1 1 1 1 1"),),
                     eval_time="9m"),
            )),
        Alert(
            "PrivacyComplianceViolation", "critical", "regulatory",
            _increased("privacy_compliance_violations_total", o.violation_window),
            "Privacy policy violated: " + who,
            "Policy {{ $labels.policy }} was violated ({{ $labels.violation_type }}) within the "
            f"last {o.violation_window}.",
            "Record the violation in the audit trail, pause releases of this model and inform "
            "the compliance owner of the policy.",
            cases=(
                Case("new violation", ((_sel(violations,
                                             _RUN + ',policy="gdpr",violation_type="epsilon"'),
                                        "_x8 1 1"),),
                     fires=(({**_RUN_LABELS, "policy": "gdpr", "violation_type": "epsilon"},
                             None),)),
                Case("old violation only", ((_sel(violations,
                                                  _RUN + ',policy="gdpr",violation_type="epsilon"'),
                                             "2x30"),), eval_time="30m"),
            )),
        Alert(
            "NoiseGenerationFailure", "critical", "privacy_violation",
            f"({sigma} == 0) or ({noise_sum} != {noise_sum}) or "
            f"((increase({noise_count}[5m]) > 0) and (increase({noise_sum}[5m]) == 0))",
            "No privacy noise: " + who,
            "The noise added to the gradients is zero or not a number (noise multiplier 0, or "
            "noise norms of 0 / NaN): the updates of this run are not private.",
            "Stop the run. Check the privacy engine's noise_multiplier (and any scheduler "
            "changing it) and the optimizer wiring; discard checkpoints trained without noise.",
            cases=(
                Case("sigma is zero", ((_sel(sigma), "0x10"),),
                     fires=((_RUN_LABELS, None),)),
                Case("noise norms are NaN", ((_sel(sigma), "1x10"),
                                             (_sel(noise_sum), "1 2 3 NaN NaN NaN NaN NaN NaN NaN"),
                                             (_sel(noise_count), "1+1x10")),
                     eval_time="9m",
                     fires=((_RUN_LABELS, None),)),
                Case("noise norms are zero", ((_sel(sigma), "1x10"), (_sel(noise_sum), "0x10"),
                                              (_sel(noise_count), "1+1x10")),
                     fires=((_RUN_LABELS, None),)),
                Case("noise present", ((_sel(sigma), "1x10"), (_sel(noise_sum), "0+2x10"),
                                       (_sel(noise_count), "1+1x10"))),
            )),
        Alert(
            "HighPrivacyOverhead", "warning", "performance",
            f'{overhead}{{operation="total"}} > {o.overhead_ratio_threshold!r}',
            "High DP overhead: " + who,
            "A private step takes {{ $value | printf \"%.1f\" }} times a plain step (threshold "
            f"{o.overhead_ratio_threshold!r}, for {o.overhead_for}).",
            "Look at privacy_overhead_ratio by operation: per-sample gradients dominate with "
            "large models (try ghost clipping or a smaller batch per device); noise generation "
            "dominates when it runs on the CPU.",
            for_=o.overhead_for,
            cases=(
                Case("slow for long", ((_sel(overhead, _RUN + ',operation="total"'), "4x20"),),
                     eval_time="15m",
                     fires=(({**_RUN_LABELS, "operation": "total"}, 4.0),)),
                Case("modest overhead", ((_sel(overhead, _RUN + ',operation="total"'), "1.5x20"),),
                     eval_time="15m"),
            )),
        Alert(
            "PrivacyAccountingErrors", "warning", "privacy_violation",
            _increased("privacy_accounting_errors_total", o.violation_window),
            "Privacy accounting failed: " + who,
            f"ε could not be computed {{{{ $value | printf \"%.0f\" }}}} time(s) within the last "
            f"{o.violation_window}; the reported ε may be stale.",
            "Read the training log for the accountant's exception; until ε is computed again, "
            "treat the budget as unknown and do not extend training.",
            cases=(
                Case("first error", ((_sel(errors), "_x8 1 1"),),
                     fires=((_RUN_LABELS, 1.0),)),
                Case("no errors", ((_sel(errors), "0x10"),)),
            )),
        Alert(
            "PrivacyExporterStalled", "warning", "performance",
            f"increase({steps}[{stall}]) == 0",
            "No training step for " + stall + ": " + who,
            f"The run still serves its metrics but accounted no optimizer step in {stall}: "
            "training or the metrics publisher is stuck.",
            "Check the training process (stack dump, GPU utilisation) and the exporter's "
            "privacy_export_dropped_total; a stuck publisher never blocks training, a stuck "
            "trainer does.",
            cases=(
                Case("steps stopped", ((_sel(steps), "16x20"),), eval_time="15m",
                     fires=((_RUN_LABELS, None),)),
                Case("steps advance", ((_sel(steps), "0+8x20"),), eval_time="15m"),
            )),
        Alert(
            "PrivacyMetricsStale", "warning", "performance",
            f"((time() - {PUSH_TIME_SECONDS}) > {o.push_stale_minutes * 60}) "
            f"and on(job, instance) group by (job, instance) ({steps})",
            "Pushed privacy metrics are stale: job {{ $labels.job }}",
            "The Pushgateway group of job {{ $labels.job }} was last pushed "
            "{{ $value | humanizeDuration }} ago " + f"(limit {o.push_stale_minutes}m).",
            "If the run ended, delete its group from the Pushgateway; if it runs, check that "
            "it can reach the Pushgateway (privacy_export_dropped_total counts failed pushes).",
            cases=(
                Case("last push long ago",
                     ((f'{PUSH_TIME_SECONDS}{{job="train",instance=""}}', "0x20"),
                      (f'{steps}{{job="train",instance="",session_id="s1",model_name="m1"}}',
                       "16x20")),
                     eval_time="20m",
                     fires=(({"job": "train"}, 20 * 60.0),)),
                Case("recent push",
                     ((f'{PUSH_TIME_SECONDS}{{job="train",instance=""}}', "0+60x20"),
                      (f'{steps}{{job="train",instance="",session_id="s1",model_name="m1"}}',
                       "0+8x20")),
                     eval_time="20m"),
            )),
    )


def alerts(options: RuleOptions | None = None) -> tuple[Alert, ...]:
    """The alerts, with ``options`` (defaults if ``None``)."""
    return _alerts(options or RuleOptions())


ALERTS: tuple[Alert, ...] = alerts()


def _dump(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def rule_file(options: RuleOptions | None = None) -> str:
    """The Prometheus rule file (YAML) with every alert."""
    options = options or RuleOptions()
    return _dump({"groups": [{"name": RULE_GROUP,
                              "rules": [a.rule(options.runbook_url) for a in alerts(options)]}]})


def rule_tests(rule_file_name: str, options: RuleOptions | None = None) -> str:
    """A ``promtool test rules`` file: every case of every alert, against ``rule_file_name``."""
    options = options or RuleOptions()
    tests = []
    for alert in alerts(options):
        templates = alert.rule(options.runbook_url)["annotations"]
        for case in alert.cases:
            minute = _minutes(case.eval_time)
            query = selector_query({s: _value_at(v, minute) for s, v in case.series})
            expected = []
            for labels, value in case.fires:
                try:
                    annotations = {key: render(text, labels=labels, value=value, query=query)
                                   for key, text in templates.items()}
                except ValueError as e:
                    raise ValueError(f"{alert.name}: {case.name}: {e}") from None
                expected.append({"exp_labels": {**labels, "severity": alert.severity,
                                                "category": alert.category, **alert.labels},
                                 "exp_annotations": annotations})
            tests.append({
                "name": f"{alert.name}: {case.name}",
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in case.series],
                "alert_rule_test": [{"eval_time": case.eval_time, "alertname": alert.name,
                                     "exp_alerts": expected}],
            })
    return _dump({"rule_files": [rule_file_name], "evaluation_interval": "1m", "tests": tests})


def _minutes(duration: str) -> int:
    if not (duration[:-1].isdigit() and duration.endswith("m")):
        raise ValueError(f"Unexpected eval_time {duration!r}: use whole minutes, e.g. '10m'")
    return int(duration[:-1])


_EXPANDING = re.compile(r"(?P<start>_|[^_+\-x]+)(?:(?P<op>[+-])(?P<step>[^x]+))?(?:x(?P<n>\d+))?")


def _value_at(values: str, minute: int) -> float | None:
    """The instant value at ``minute`` of promtool ``values`` (one sample per minute).

    Promtool's expanding notation (``a+bxn``, ``axn``, ``_``, ``_xn``) with Prometheus' 5-minute
    lookback; ``None`` where no sample is in reach.
    """
    samples: list[float | None] = []
    for item in values.split():
        m = _EXPANDING.fullmatch(item)
        if not m or item == "stale":
            raise ValueError(f"Unexpected promtool values item {item!r} in {values!r}")
        n = int(m["n"] or 0)
        if m["start"] == "_":
            samples += [None] * max(n, 1)
            continue
        start = float(m["start"])
        step = float(m["step"] or 0) * (-1 if m["op"] == "-" else 1)
        samples += [start + i * step for i in range(n + 1)]
    recent = [v for v in samples[max(0, minute - 4):minute + 1] if v is not None]
    return recent[-1] if recent else None


def prometheus_config(targets: list[str], *, rule_files: tuple[str, ...] = (),
                      alertmanager: str | None = None, pushgateway: str | None = None,
                      remote_write: str | None = None, interval: str = "15s") -> str:
    """A Prometheus config that scrapes the monitors' ``/metrics`` endpoints.

    Args:
        targets: ``host:port`` of each :class:`~privacy_callbacks.PrometheusExporter`.
        rule_files: Rule files to load (paths relative to the config's folder work).
        alertmanager: ``host:port`` of the Alertmanager that receives the alerts.
        pushgateway: ``host:port`` of a Pushgateway to scrape (pushed labels kept).
        remote_write: URL to copy every sample to (e.g. VictoriaMetrics' ``/api/v1/write``).
        interval: Scrape and rule evaluation interval.
    """
    if not targets and not pushgateway:
        raise ValueError("No scrape target: pass the exporters' host:port (e.g. 127.0.0.1:9108) "
                         "or a Pushgateway")
    for target in [*targets, *filter(None, (alertmanager, pushgateway))]:
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit() or "/" in target:
            raise ValueError(f"Unexpected target {target!r}: use host:port, e.g. 127.0.0.1:9108")
    config: dict = {"global": {"scrape_interval": interval, "evaluation_interval": interval}}
    if rule_files:
        config["rule_files"] = list(rule_files)
    if alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    scrape: list[dict] = []
    if targets:
        scrape.append({"job_name": "privacy", "static_configs": [{"targets": list(targets)}]})
    if pushgateway:
        scrape.append({"job_name": "pushgateway", "honor_labels": True,
                       "static_configs": [{"targets": [pushgateway]}]})
    config["scrape_configs"] = scrape
    if remote_write:
        config["remote_write"] = [{"url": remote_write}]
    return _dump(config)
