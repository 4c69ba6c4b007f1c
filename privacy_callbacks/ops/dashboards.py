"""Grafana dashboards (JSON) for the catalog's metrics.

Three dashboards: Privacy Budget, Performance, Security & Compliance. The data source is the
template variable ``$datasource`` and the sessions shown are ``$session``. Every query names its
metrics through :func:`~privacy_callbacks.ops.rules.metric`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import catalog
from .rules import metric

__all__ = ["Panel", "dashboards", "panel_metrics", "panels"]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SESSION = 'session_id=~"$session"'

_METRIC_NAMES = re.compile(
    r"\b(" + "|".join(sorted((m.name for m in catalog.METRICS), key=len, reverse=True))
    + r")(?:_bucket|_sum|_count)?\b")


def panel_metrics(expr: str) -> list[str]:
    """Catalog metrics named in ``expr``, in order of appearance, without repeats."""
    return list(dict.fromkeys(_METRIC_NAMES.findall(expr)))


@dataclass(frozen=True)
class Panel:
    """One Grafana panel.

    Attributes:
        title: Panel title.
        type: Grafana panel type (``stat``, ``gauge``, ``timeseries``, ``table``).
        targets: ``(PromQL, legend)`` pairs; ``$session`` and ``$__rate_interval`` may appear.
        description: What the panel shows.
        unit: Grafana unit id.
        instant: Query only the latest value (tables, stats).
        max: Upper bound for gauges.
        opt_in: The setting without which the panel's metric is not published (a release that
            must be accounted or asked for), or ``""``.
    """

    title: str
    type: str
    targets: tuple[tuple[str, str], ...]
    description: str
    unit: str = "none"
    instant: bool = False
    max: float | None = None
    opt_in: str = ""

    def to_json(self, panel_id: int, x: int, y: int, w: int, h: int) -> dict:
        description = self.description
        if self.opt_in:
            description += f" Published only with {self.opt_in}."
        defaults: dict = {"unit": self.unit}
        if self.max is not None:
            defaults.update(min=0, max=self.max)
        panel = {
            "id": panel_id, "type": self.type, "title": self.title, "description": description,
            "datasource": DATASOURCE, "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                         "legendFormat": legend, "instant": self.instant,
                         "range": not self.instant, **({"format": "table"}
                                                        if self.type == "table" else {})}
                        for i, (expr, legend) in enumerate(self.targets)],
        }
        if self.opt_in:
            panel["opt_in"] = self.opt_in
        return panel


def _s(name: str, extra: str = "") -> str:
    """``name{session_id=~"$session"[,extra]}`` with the catalog's name."""
    return f"{metric(name)}{{{SESSION}{',' + extra if extra else ''}}}"


def _h(name: str, suffix: str) -> str:
    return f"{metric(name, suffix)}{{{SESSION}}}"


_RUN = "{{session_id}}"
_PER_SAMPLE = ("DifferentialPrivacy(statistics_noise_multiplier=...) (noised, accounted in ε) or "
               "PrivacyMonitor(raw_private_statistics=True) (outside ε)")
_RUN_KEYS = "job, instance, session_id, model_name"


def _budget() -> tuple[Panel, ...]:
    eps, target = _s("privacy_epsilon_consumed"), _s("privacy_epsilon_target")
    return (
        Panel("ε spent", "gauge", ((eps, _RUN),), "Privacy loss ε spent so far, per session.",
              instant=True),
        Panel("Budget used", "gauge", ((f"{eps} / {target}", _RUN),),
              "ε spent as a fraction of the target.", unit="percentunit", instant=True, max=1),
        Panel("δ", "stat", ((_s("privacy_delta_consumed"), _RUN),),
              "δ the reported ε holds for.", unit="sci", instant=True),
        Panel("Budget exhausted (guard)", "stat", ((_s("privacy_budget_exhausted"), _RUN),),
              "1 once the budget guard found that one more step would pass the target.",
              instant=True),
        Panel("ε over time", "timeseries",
              ((eps, "spent " + _RUN), (target, "target " + _RUN),
               (_s("privacy_epsilon_forecast"), "forecast " + _RUN)),
              "ε spent, the target and the forecast at the end of the planned training."),
        Panel("Steps to exhaustion", "timeseries",
              ((_s("privacy_budget_exhaustion_steps"), _RUN),),
              "Optimizer steps left before ε passes the target.", unit="short"),
        Panel("Time to exhaustion", "stat",
              ((f"{_s('privacy_budget_exhaustion_steps')} * on({_RUN_KEYS}) group_left() "
                f"max by ({_RUN_KEYS}) ({_s('training_step_seconds')})", _RUN),),
              "Steps left times the current step time.", unit="s", instant=True),
        Panel("Noise and sampling", "timeseries",
              ((_s("privacy_noise_multiplier"), "σ " + _RUN),
               (_s("gradient_clipping_norm"), "C " + _RUN),
               (_s("privacy_sample_rate"), "q " + _RUN)),
              "Noise multiplier σ, clipping norm C and sample rate q of the last step."),
        Panel("Sessions", "table",
              ((eps, ""), (target, ""), (_s("privacy_budget_remaining"), ""),
               (_s("training_steps_with_privacy_total"), "")),
              "Latest ε, target, budget left and accounted steps per session.", instant=True),
    )


def _performance() -> tuple[Panel, ...]:
    noise = ("histogram_quantile(0.5, sum by (le, session_id) "
             f"(rate({_h('privacy_noise_magnitude', '_bucket')}[$__rate_interval])))")
    grads = ("histogram_quantile(0.9, sum by (le, session_id) "
             f"(rate({_h('privacy_per_sample_grad_norm', '_bucket')}[$__rate_interval])))")
    return (
        Panel("Throughput", "timeseries", ((_s("training_throughput_private"),
                                            _RUN + " rank {{rank}}"),),
              "Training samples per second with differential privacy.", unit="short"),
        Panel("Step time", "timeseries", ((_s("training_step_seconds"), _RUN + " rank {{rank}}"),),
              "Wall-clock time of the last optimizer step.", unit="s"),
        Panel("Steps per second", "timeseries",
              ((f"rate({_s('training_steps_with_privacy_total')}[$__rate_interval])", _RUN),),
              "Optimizer steps accounted per second.", unit="short"),
        Panel("DP overhead by operation", "timeseries",
              ((_s("privacy_overhead_ratio"), _RUN + " {{operation}}"),),
              "Time of each DP step part relative to the same step without DP."),
        Panel("Clipped fraction", "timeseries", ((_s("privacy_clipped_fraction"), _RUN),),
              "Fraction of per-sample gradients clipped this step (from the noised histogram).",
              unit="percentunit", opt_in=_PER_SAMPLE),
        Panel("Noise norm (median)", "timeseries", ((noise, _RUN),),
              "Median L2 norm of the noise added per step."),
        Panel("Per-sample gradient norm (p90)", "timeseries", ((grads, _RUN),),
              "90th percentile of per-sample gradient norms before clipping (noised histogram).",
              opt_in=_PER_SAMPLE),
        Panel("Signal to noise", "timeseries",
              ((_s("privacy_signal_to_noise_ratio"), _RUN),),
              "Estimated norm of the clipped gradient sum over the expected noise norm."),
    )


def _security() -> tuple[Panel, ...]:
    errors = metric("privacy_accounting_errors_total")
    return (
        Panel("Membership-inference risk", "timeseries",
              ((_s("membership_inference_risk_score"), "bound " + _RUN),
               (_s("membership_inference_empirical_advantage"), "empirical " + _RUN)),
              "Largest attack advantage allowed by (ε, δ), and the one measured by a "
              "loss-threshold attack.", max=1),
        Panel("Privacy audit: ε lower bound vs reported ε", "timeseries",
              ((_s("privacy_audit_epsilon_lower_bound"), "audit lower bound " + _RUN),
               (f"max by (session_id) ({_s('privacy_epsilon_consumed')})", "reported " + _RUN)),
              "ε the one-run audit (OneRunAudit) proves at 95 % confidence, next to the ε the "
              "accountant reports. A bound above the reported ε means the mechanism is weaker "
              "than reported (PrivacyAttackDetected fires); a correct run stays well below."),
        Panel("Attack success", "timeseries",
              ((_s("privacy_attack_score"), _RUN + " {{attack_type}}"),),
              "Accuracy of each membership attack's guesses (0.5 = chance): the loss-threshold "
              "attack's best balanced accuracy, the accuracy the audit proves.", max=1),
        Panel("Refused /metrics requests", "timeseries",
              ((f"increase({_s('authentication_failures_total')}[$__rate_interval])", _RUN),),
              "Requests to the protected /metrics refused for missing or wrong credentials.",
              unit="short"),
        Panel("Membership-inference AUC", "stat",
              ((_s("membership_inference_empirical_auc"), _RUN),),
              "AUC of a loss-threshold attack (0.5 = no better than chance).", instant=True),
        Panel("Compliance violations", "table",
              ((f"sum by (session_id, policy, violation_type) "
                f"({_s('privacy_compliance_violations_total')})", ""),),
              "Violations of the configured DP policy, per policy and type.", instant=True),
        Panel("Exporter drops", "timeseries",
              ((f"increase({_s('privacy_export_dropped_total')}[$__rate_interval])",
                _RUN + " {{exporter}}"),),
              "Snapshots or points each exporter dropped (server outage, full buffer).",
              unit="short"),
        Panel("Accounting errors", "stat",
              ((f"sum by (session_id) ({errors}{{{SESSION}}}) or "
                f"sum by (session_id) ({_s('privacy_epsilon_consumed')}) * 0", _RUN),),
              "Failures while computing ε (0 when there were none).", instant=True),
        Panel("Seconds since last step", "stat",
              ((f"time() - timestamp({_s('training_steps_with_privacy_total')})", _RUN),),
              "Age of the latest accounted step: a growing value on a running job means it is "
              "stuck.", unit="s", instant=True),
    )


def panels() -> dict[str, tuple[str, tuple[Panel, ...]]]:
    """Dashboard uid -> (title, panels), built from the catalog on each call."""
    return {
        "privacy-budget": ("Privacy Budget", _budget()),
        "privacy-performance": ("Privacy Performance", _performance()),
        "privacy-security": ("Privacy Security & Compliance", _security()),
    }


def _dashboard(uid: str, title: str, panels: tuple[Panel, ...]) -> dict:
    width, height = 8, 8
    return {
        "uid": uid, "title": title, "tags": ["privacy", "differential-privacy"],
        "editable": True, "schemaVersion": 39, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            {"name": "session", "label": "Session", "type": "query", "datasource": DATASOURCE,
             "query": {"query": f"label_values({metric('privacy_epsilon_consumed')}, session_id)",
                       "refId": "session"},
             "definition": f"label_values({metric('privacy_epsilon_consumed')}, session_id)",
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": [p.to_json(i + 1, (i % 3) * width, (i // 3) * height, width, height)
                   for i, p in enumerate(panels)],
    }


def dashboards() -> dict[str, dict]:
    """Every dashboard as Grafana JSON, keyed by its uid (also a good file name)."""
    return {uid: _dashboard(uid, title, ps) for uid, (title, ps) in panels().items()}
