"""Grafana dashboards (JSON): Privacy Budget, Performance, Security & Compliance; data source
``$datasource``, sessions ``$session``, metrics named through :func:`~.rules.metric`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import catalog
from .rules import RUN_KEYS, metric

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_METRIC_NAMES = re.compile(
    r"\b(" + "|".join(sorted((m.name for m in catalog.METRICS), key=len, reverse=True))
    + r")(?:_bucket|_sum|_count)?\b")


def panel_metrics(expr: str) -> list[str]:
    """Catalog metrics named in ``expr``, in order of appearance, without repeats."""
    return list(dict.fromkeys(_METRIC_NAMES.findall(expr)))


@dataclass(frozen=True)
class Panel:
    """``targets``: a PromQL query (legend: the run) or ``(PromQL, legend)`` pairs; the
    description defaults to the first metric's catalog help; ``opt_in`` names the setting
    without which its metric is not published."""

    title: str
    type: str
    targets: str | tuple[tuple[str, str], ...]
    description: str = ""
    unit: str = "none"  # "percentunit": a fraction, shown from 0 to 1
    opt_in: str = ""

    def to_json(self, panel_id: int, x: int, y: int) -> dict:
        instant = self.type != "timeseries"
        targets = ((self.targets, _R),) if isinstance(self.targets, str) else self.targets
        text = self.description or catalog.by_name(panel_metrics(targets[0][0])[0]).help
        return {
            "id": panel_id, "type": self.type, "title": self.title,
            "description": text + (f" Published only with {self.opt_in}." if self.opt_in else ""),
            "datasource": DATASOURCE, "gridPos": {"x": x, "y": y, "w": 8, "h": 8},
            "fieldConfig": {"defaults": {"unit": self.unit, **(
                {"min": 0, "max": 1} if self.unit == "percentunit" else {})}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                         "legendFormat": legend, "instant": instant, "range": not instant,
                         **({"format": "table"} if self.type == "table" else {})}
                        for i, (expr, legend) in enumerate(targets)],
        }


def _s(name: str, suffix: str = "") -> str:
    """``name{session_id=~"$session"}`` with the catalog's name (and a histogram suffix)."""
    return f'{metric(name, suffix)}{{session_id=~"$session"}}'


def _quantile(q: float, name: str) -> str:
    return (f"histogram_quantile({q}, sum by (le, session_id) "
            f"(rate({_s(name, '_bucket')}[$__rate_interval])))")


_R = "{{session_id}}"  # the legend: the run
_PER_SAMPLE = ("MechanismMetrics and DifferentialPrivacy(statistics_noise_multiplier=...) "
               "(noised, in ε) or MechanismMetrics(raw_private_statistics=True) (outside ε)")


def panels() -> dict[str, tuple[str, tuple[Panel, ...]]]:
    """Dashboard uid -> (title, panels), built from the catalog on each call."""
    eps, target, steps = (_s("privacy_epsilon_consumed"), _s("privacy_epsilon_target"),
                          _s("training_steps_with_privacy_total"))
    left, ranked = _s("privacy_budget_exhaustion_steps"), _R + " rank {{rank}}"
    budget = (
        Panel("ε spent", "gauge", eps),
        Panel("Budget used", "gauge", f"{eps} / {target}", "ε spent as a fraction of the target.",
              unit="percentunit"),
        Panel("Budget exhausted (guard)", "stat", _s("privacy_budget_exhausted")),
        Panel("ε over time", "timeseries", ((eps, "spent " + _R), (target, "target " + _R), (
            _s("privacy_epsilon_forecast"), "forecast " + _R)),
              "ε spent, the target and the forecast at the end of the planned training."),
        Panel("Steps to exhaustion", "timeseries", left, unit="short"),
        Panel("Time to exhaustion", "stat", f"{left} * on({RUN_KEYS}) group_left() max by "
              f"({RUN_KEYS}) ({_s('training_step_seconds')})", "Steps left times the step time.",
              unit="s"),
        Panel("Noise and sampling", "timeseries", (
            (_s("privacy_noise_multiplier"), "σ " + _R), (_s("gradient_clipping_norm"), "C " + _R),
            (_s("privacy_sample_rate"), "q " + _R)), "σ, clipping norm C and sample rate q."),
        Panel("Sessions", "table", ((eps, ""), (target, ""), (_s("privacy_budget_remaining"), ""),
                                    (steps, "")), "Latest ε, target, budget left and steps."))
    performance = (
        Panel("Throughput", "timeseries", ((_s("training_throughput_private"), ranked),),
              unit="short"),
        Panel("Step time", "timeseries", ((_s("training_step_seconds"), ranked),), unit="s"),
        Panel("DP overhead by operation", "timeseries",
              ((_s("privacy_overhead_ratio"), _R + " {{operation}}"),)),
        Panel("Clipped fraction", "timeseries", _s("privacy_clipped_fraction"),
              unit="percentunit", opt_in=_PER_SAMPLE),
        Panel("Noise norm (median)", "timeseries", _quantile(0.5, "privacy_noise_magnitude")),
        Panel("Per-sample gradient norm (p90)", "timeseries",
              _quantile(0.9, "privacy_per_sample_grad_norm"), opt_in=_PER_SAMPLE),
        Panel("Signal to noise", "timeseries", _s("privacy_signal_to_noise_ratio")))
    security = (
        Panel("Membership-inference risk", "timeseries", (
            (_s("membership_inference_risk_score"), "bound " + _R),
            (_s("membership_inference_empirical_advantage"), "empirical " + _R)),
              unit="percentunit"),
        Panel("Privacy audit: ε lower bound vs reported ε", "timeseries", (
            (_s("privacy_audit_epsilon_lower_bound"), "audit lower bound " + _R),
            (f"max by (session_id) ({eps})", "reported " + _R))),
        Panel("Attack success", "timeseries",
              ((_s("privacy_attack_score"), _R + " {{attack_type}}"),), unit="percentunit"),
        Panel("Refused /metrics requests", "timeseries",
              f"increase({_s('authentication_failures_total')}[$__rate_interval])", unit="short"),
        Panel("Membership-inference AUC", "stat", _s("membership_inference_empirical_auc")),
        Panel("Compliance violations", "table", ((
            f"sum by (session_id, policy, violation_type) "
            f"({_s('privacy_compliance_violations_total')})", ""),)),
        Panel("Exporter drops", "timeseries", ((f"increase({_s('privacy_export_dropped_total')}"
                                                "[$__rate_interval])", _R + " {{exporter}}"),),
              unit="short"),
        Panel("Accounting errors", "stat", f"sum by (session_id) "
              f"({_s('privacy_accounting_errors_total')}) or sum by (session_id) ({eps}) * 0",
              "Failures while computing ε (0: none)."),
        Panel("Seconds since last step", "stat", f"time() - timestamp({steps})",
              "Age of the latest step: growing on a running job, it is stuck.", unit="s"))
    return {"privacy-budget": ("Privacy Budget", budget),
            "privacy-performance": ("Privacy Performance", performance),
            "privacy-security": ("Privacy Security & Compliance", security)}


def dashboards() -> dict[str, dict]:
    """Every dashboard as Grafana JSON, keyed by its uid (also a good file name)."""
    sessions = f"label_values({metric('privacy_epsilon_consumed')}, session_id)"
    return {uid: {
        "uid": uid, "title": title, "tags": ["privacy", "differential-privacy"],
        "editable": True, "schemaVersion": 39, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus"},
            {"name": "session", "label": "Session", "type": "query", "datasource": DATASOURCE,
             "query": {"query": sessions, "refId": "session"}, "definition": sessions,
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {"text": "All", "value": "$__all"}}]},
        "panels": [p.to_json(i + 1, i % 3 * 8, i // 3 * 8) for i, p in enumerate(ps)],
    } for uid, (title, ps) in panels().items()}
