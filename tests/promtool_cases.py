"""``promtool test rules`` for the generated alert rules: for every alert, series that make it
fire and series that keep it quiet, with the annotations Prometheus must then render.

The expected annotations are the rules' own templates rendered by :func:`render`, which knows
exactly the template constructs the rules use: anything else raises ``ValueError``, so a new
construct fails here instead of passing unchecked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from privacy_callbacks.ops.rules import PUSH_TIME_SECONDS, RuleOptions, alerts, metric


@dataclass(frozen=True)
class Case:
    """Input series (one sample a minute) and the alerts due at ``eval_time``: ``fires`` lists
    ``(labels of the firing series, its $value or None)``, empty when the alert stays quiet;
    ``target`` is the run's ε target where the annotations show it."""

    name: str
    series: tuple[tuple[str, str], ...]
    fires: tuple[tuple[dict[str, str], float | None], ...] = ()
    eval_time: str = "10m"
    target: float | None = None


RUN = {"session_id": "s1", "model_name": "m1", "job": "privacy", "instance": "127.0.0.1:9108"}
ACC = {**RUN, "accountant": "rdp"}


def sel(name: str, suffix: str = "", **labels: str) -> str:
    """A series selector of the test run's metric ``name`` (+ ``suffix``) with extra ``labels``."""
    pairs = ",".join(f'{k}="{v}"' for k, v in {**RUN, **labels}.items())
    return f"{metric(name, suffix)}{{{pairs}}}"


def cases(o: RuleOptions) -> dict[str, tuple[Case, ...]]:
    """Alert name -> its cases, with values on either side of ``o``'s thresholds."""
    eps, target = sel("privacy_epsilon_consumed", accountant="rdp"), \
        sel("privacy_epsilon_target", accountant="rdp")
    exhausted = sel("privacy_budget_exhausted", accountant="rdp")
    bound, risk = sel("privacy_audit_epsilon_lower_bound"), sel("membership_inference_risk_score")
    score_hi = (1 + o.attack_score_threshold) / 2
    risk_hi, risk_lo = (1 + o.attack_risk_threshold) / 2, o.attack_risk_threshold / 2
    violation = {"policy": "gdpr", "violation_type": "epsilon"}
    sigma = sel("privacy_noise_multiplier")
    noise_sum = sel("privacy_noise_magnitude", "_sum")
    noise_count = sel("privacy_noise_magnitude", "_count")
    total = sel("privacy_overhead_ratio", operation="total")
    steps = sel("training_steps_with_privacy_total")
    push = f'{PUSH_TIME_SECONDS}{{job="train",instance=""}}'
    pushed_steps = metric("training_steps_with_privacy_total") + \
        '{job="train",instance="",session_id="s1",model_name="m1"}'
    return {
        "PrivacyBudgetExhausted": (
            Case("epsilon past target", ((eps, "1+1x10"), (target, "8x10")), ((ACC, 11.0),),
                 target=8.0),
            Case("guard stopped before target",
                 ((eps, "7.5x10"), (target, "8x10"), (exhausted, "0x8 1 1")), ((ACC, 7.5),),
                 target=8.0),
            Case("epsilon below target", ((eps, "7.9x10"), (target, "8x10"),
                                          (exhausted, "0x10")))),
        "PrivacyBudgetLow": (
            Case("most of the budget spent", ((eps, "6.8x10"), (target, "8x10")),
                 ((ACC, 6.8 / 8),), target=8.0),
            Case("half the budget spent", ((eps, "4x10"), (target, "8x10"))),
            Case("target passed: the critical alert speaks", ((eps, "9x10"), (target, "8x10")))),
        "PrivacyAttackDetected": (
            Case("attack succeeds", ((sel("privacy_attack_score", attack_type="loss_threshold"),
                                      f"{score_hi!r}x10"),),
                 (({**RUN, "attack_type": "loss_threshold"}, score_hi),)),
            Case("audit bound above the reported epsilon",
                 ((bound, "1.8x10"), (eps, "0.58x10"),
                  (sel("privacy_attack_score", attack_type="one_run_audit"), f"{score_hi!r}x10")),
                 ((RUN, 1.8),)),
            Case("audit bound below the reported epsilon, chance-level attack",
                 ((bound, "0.06x10"), (eps, "0.58x10"),
                  (sel("privacy_attack_score", attack_type="one_run_audit"), "0.5x10"),
                  (sel("privacy_attack_score", attack_type="loss_threshold"), "0.5x10"))),
            Case("high theoretical bound is no attack", ((risk, "0.99x10"), (eps, "8x10")))),
        "MembershipRiskBoundHigh": (
            Case("bound above the limit", ((risk, f"{risk_hi!r}x10"),), ((RUN, risk_hi),)),
            Case("bound below the limit", ((risk, f"{risk_lo!r}x10"),))),
        "MetricsAuthenticationFailures": (
            Case("burst of wrong passwords", ((sel("authentication_failures_total"), "0x8 25"),),
                 ((RUN, 25.0),), eval_time="9m"),
            Case("one mistyped password", ((sel("authentication_failures_total"),
                                            "0 0 1 1 1 1 1 1 1 1"),), eval_time="9m")),
        "PrivacyComplianceViolation": (
            Case("new violation", ((sel("privacy_compliance_violations_total", **violation),
                                    "_x8 1 1"),), (({**RUN, **violation}, None),)),
            Case("old violation only", ((sel("privacy_compliance_violations_total", **violation),
                                         "2x30"),), eval_time="30m")),
        "NoiseGenerationFailure": (
            Case("sigma is zero", ((sigma, "0x10"),), ((RUN, None),)),
            Case("noise norms are NaN", ((sigma, "1x10"),
                                         (noise_sum, "1 2 3 NaN NaN NaN NaN NaN NaN NaN"),
                                         (noise_count, "1+1x10")), ((RUN, None),),
                 eval_time="9m"),
            Case("noise norms are zero", ((sigma, "1x10"), (noise_sum, "0x10"),
                                          (noise_count, "1+1x10")), ((RUN, None),)),
            Case("noise present", ((sigma, "1x10"), (noise_sum, "0+2x10"),
                                   (noise_count, "1+1x10")))),
        "HighPrivacyOverhead": (
            Case("slow for long", ((total, "4x20"),), (({**RUN, "operation": "total"}, 4.0),),
                 eval_time="15m"),
            Case("modest overhead", ((total, "1.5x20"),), eval_time="15m")),
        "PrivacyAccountingErrors": (
            Case("first error", ((sel("privacy_accounting_errors_total"), "_x8 1 1"),),
                 ((RUN, 1.0),)),
            Case("no errors", ((sel("privacy_accounting_errors_total"), "0x10"),))),
        "PrivacyExporterStalled": (
            Case("steps stopped", ((steps, "16x20"),), ((RUN, None),), eval_time="15m"),
            Case("steps advance", ((steps, "0+8x20"),), eval_time="15m")),
        "PrivacyMetricsStale": (
            Case("last push long ago", ((push, "0x20"), (pushed_steps, "16x20")),
                 (({"job": "train"}, 20 * 60.0),), eval_time="20m"),
            Case("recent push", ((push, "0+60x20"), (pushed_steps, "0+8x20")),
                 eval_time="20m")),
    }


_IF = re.compile(r"{{ if \$labels\.(\w+) }}(.*?){{ else }}(.*?){{ end }}", re.S)
_LABEL = re.compile(r"{{ \$labels\.(\w+) }}")
_VALUE = re.compile(r'{{ \$value \| (?:printf "(%\.\d+f)"|(humanizePercentage|humanizeDuration))'
                    r" }}")


def _target_query() -> re.Pattern[str]:
    """The rules' look-up of the run's target (its exact text, with the catalog's name)."""
    return re.compile(re.escape(
        "{{ with printf `" + metric("privacy_epsilon_target") + "{session_id=%q,model_name=%q,"
        "accountant=%q}` $labels.session_id $labels.model_name $labels.accountant | query }}"
        "{{ . | first | value | printf ") + r'"(%\.\d+f)" }}{{ end }}')


def _duration(v: float) -> str:
    """Go's humanizeDuration for v >= 1: whole units from the largest non-zero one."""
    s = int(v)
    units = [(s // 86400, "d"), (s // 3600 % 24, "h"), (s // 60 % 60, "m")]
    while units and not units[0][0]:
        units.pop(0)
    return " ".join(f"{n}{u}" for n, u in units) + (f" {s % 60}s" if units else f"{v:.4g}s")


def _need(value: float | None, what: str) -> float:
    if value is None:
        raise ValueError(f"the text reads {what} but the case gives none")
    return value


def render(text: str, labels: dict[str, str], value: float | None,
           target: float | None = None) -> str:
    """``text`` as Prometheus expands it for a series with ``labels`` and ``value``."""
    text = _IF.sub(lambda m: m[2] if labels.get(m[1]) else m[3], text)
    text = _target_query().sub(lambda m: m[1] % _need(target, "the target"), text)
    text = _LABEL.sub(lambda m: labels.get(m[1], ""), text)

    def formatted(m: re.Match[str]) -> str:
        v = _need(value, "$value")
        if m[1]:
            return m[1] % v
        return f"{v * 100:.4g}%" if m[2] == "humanizePercentage" else _duration(v)

    text = _VALUE.sub(formatted, text)
    if "{{" in text:
        raise ValueError(f"template construct not supported: {text[text.index('{{'):][:60]!r}")
    return text


def rule_tests(rule_file_name: str, options: RuleOptions | None = None) -> str:
    """A ``promtool test rules`` file: every case of every alert, against ``rule_file_name``."""
    options = options or RuleOptions()
    by_alert, tests = cases(options), []
    for alert in alerts(options):
        annotations = alert.rule(options.runbook_url)["annotations"]
        for case in by_alert[alert.name]:
            try:
                expected = [{"exp_labels": {**labels, "severity": alert.severity,
                                            "category": alert.category},
                             "exp_annotations": {k: render(t, labels, value, case.target)
                                                 for k, t in annotations.items()}}
                            for labels, value in case.fires]
            except ValueError as e:
                raise ValueError(f"{alert.name}: {case.name}: {e}") from None
            tests.append({"name": f"{alert.name}: {case.name}", "interval": "1m",
                          "input_series": [{"series": s, "values": v} for s, v in case.series],
                          "alert_rule_test": [{"eval_time": case.eval_time,
                                               "alertname": alert.name, "exp_alerts": expected}]})
    return yaml.safe_dump({"rule_files": [rule_file_name], "evaluation_interval": "1m",
                           "tests": tests}, sort_keys=False, allow_unicode=True, width=100)
