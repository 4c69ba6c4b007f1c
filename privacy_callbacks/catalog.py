"""The metric catalog, the one place a metric is named: exporters, alert rules, dashboards and
``docs/metrics.md`` come from :data:`METRICS`. No label changes per step."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["BASE_LABELS", "INFLUX_MEASUREMENT", "INFLUX_STEP_FIELD", "INFLUX_TAGS", "METRICS",
           "Metric", "by_name"]

BASE_LABELS: tuple[str, ...] = ("session_id", "model_name")
# The per-step InfluxDB point: one measurement, these tags, the metrics' fields and the step.
INFLUX_MEASUREMENT = "privacy_training"
INFLUX_TAGS: tuple[str, ...] = BASE_LABELS + ("rank", "accountant")
INFLUX_STEP_FIELD = "step"


@dataclass(frozen=True)
class Metric:
    """One metric: Prometheus ``name``, ``kind``, one-sentence ``help``, ``unit``, ``labels``
    beyond :data:`BASE_LABELS`, the snapshot attribute ``attr`` that holds it (a counter's is the
    running total), the InfluxDB ``field`` of the per-step point, a histogram's ``buckets``."""

    name: str
    kind: Literal["gauge", "counter", "histogram"]
    help: str
    unit: str = ""
    labels: tuple[str, ...] = ()
    attr: str | None = None
    field: str | None = None
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not re.match(r"^[a-z_][a-z0-9_]*$", self.name):
            raise ValueError(f"Invalid metric name {self.name!r}: use lower_snake_case")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"Counter {self.name!r} must end in '_total'")
        if self.kind == "histogram" and not self.buckets:
            raise ValueError(f"Histogram {self.name!r} needs buckets")

    @property
    def all_labels(self) -> tuple[str, ...]:
        return BASE_LABELS + self.labels


_ACC = ("accountant",)


def _decades(low: int, high: int) -> tuple[float, ...]:
    """Bucket bounds 1, 2, 5 per decade from ``10**low`` to ``10**high``."""
    bounds = [float(f"{m}e{e}") for e in range(low, high) for m in (1, 2, 5)]
    return (*bounds, float(f"1e{high}"))

METRICS: tuple[Metric, ...] = (
    Metric("privacy_epsilon_consumed", "gauge",
           "Privacy loss epsilon spent so far, from the privacy accountant's own history.",
           labels=_ACC, attr="epsilon", field="epsilon"),
    Metric("privacy_epsilon_step", "gauge",
           "Accounted optimizer step the reported epsilon belongs to.",
           unit="steps", labels=_ACC, attr="epsilon_step", field="epsilon_step"),
    Metric("privacy_epsilon_exact", "gauge",
           "1 if the reported epsilon is the accountant's exact value for its step, 0 if it is an "
           "upper bound (published until the exact value is computed).",
           labels=_ACC, attr="epsilon_exact", field="epsilon_exact"),
    Metric("privacy_delta_consumed", "gauge", "Delta the reported epsilon is computed for.",
           labels=_ACC, attr="delta", field="delta"),
    Metric("privacy_epsilon_target", "gauge", "Epsilon budget for this training run.",
           labels=_ACC, attr="target_epsilon", field="epsilon_target"),
    Metric("privacy_budget_remaining", "gauge",
           "Epsilon budget left: target minus epsilon spent (negative once the target is passed).",
           labels=_ACC, attr="budget_remaining", field="budget_remaining"),
    Metric("privacy_budget_consumed_total", "counter",
           "Epsilon consumed in this session, as a monotonic counter of exact values: an upper "
           "bound (privacy_epsilon_exact 0) never raises it, the exact epsilon of a later step "
           "does.", labels=_ACC, attr="session_epsilon"),
    Metric("privacy_epsilon_forecast", "gauge",
           "Epsilon at the end of the planned training if the current noise and sample rate hold.",
           labels=_ACC, attr="epsilon_forecast", field="epsilon_forecast"),
    Metric("privacy_budget_exhaustion_steps", "gauge",
           "Optimizer steps left before epsilon would pass the target.",
           unit="steps", labels=_ACC, attr="budget_exhaustion_steps",
           field="budget_exhaustion_steps"),
    Metric("privacy_noise_multiplier", "gauge",
           "Noise multiplier sigma of the Gaussian mechanism in the last step.",
           attr="noise_multiplier", field="noise_multiplier"),
    Metric("gradient_clipping_norm", "gauge", "Per-sample gradient clipping norm C.",
           attr="max_grad_norm", field="clipping_norm"),
    Metric("privacy_sample_rate", "gauge", "Sampling rate q the accountant used for the last step.",
           attr="sample_rate", field="sample_rate"),
    Metric("privacy_noise_std", "gauge",
           "Standard deviation of the noise on the averaged update: sigma_g*C/(B*k), B the global "
           "expected batch, k the batches accumulated into the step.",
           attr="noise_std", field="noise_std"),
    Metric("training_steps_with_privacy_total", "counter",
           "Optimizer steps the privacy accountant has accounted in this session.",
           unit="steps", attr="session_steps", field="steps_accounted"),
    Metric("training_throughput_private", "gauge",
           "Training throughput with differential privacy, in expected samples (the real Poisson "
           "batch size is private) unless raw private statistics are on.",
           unit="samples/s", labels=("rank",), attr="throughput", field="throughput"),
    Metric("privacy_accounting_errors_total", "counter",
           "Failures while computing epsilon; training continued.", attr="accounting_errors"),
    Metric("privacy_export_dropped_total", "counter",
           "Snapshots or points an exporter dropped (outage, full buffer).", labels=("exporter",)),
    Metric("training_step_seconds", "gauge",
           "Wall-clock time of the last optimizer step, data loading included.",
           unit="s", labels=("rank",), attr="step_seconds", field="step_seconds"),
    # Mechanism metrics, read from the device without blocking training: each is data-independent,
    # post-processing of the noised update, an accounted release, or raw on explicit opt-in.
    Metric("privacy_clipped_fraction", "gauge",
           "Fraction of per-sample gradients whose norm exceeded C this step: from the noised "
           "histogram's buckets above C over the expected batch (accounted), or exact "
           "(raw opt-in).", attr="clipped_fraction", field="clipped_fraction"),
    # A histogram, not quantile gauges: buckets add up across steps, ranks and runs, a quantile is
    # chosen at query time and training never sorts. The buckets span far around any usual C.
    Metric("privacy_per_sample_grad_norm", "histogram",
           "Per-sample gradient L2 norms before clipping: noised bucket counts, rounded and "
           "floored at 0 (accounted), or the norms themselves (raw opt-in).",
           attr="per_sample_grad_norms", buckets=_decades(-3, 3)),
    # One observation per step. The noise norm concentrates at sigma*C*sqrt(d) (d = parameters),
    # so the buckets reach 1e6 (sigma*C = 1 up to d = 1e12).
    Metric("privacy_noise_magnitude", "histogram",
           "L2 norm of the Gaussian noise added to the summed gradient this step: "
           "sigma_g*C*sqrt(d) once the realised norm was checked on the device (finite, within "
           "0.5-1.5x), else the realised norm (broken noise, or raw opt-in).",
           attr="noise_magnitude", field="noise_magnitude", buckets=_decades(-3, 6)),
    Metric("privacy_signal_magnitude", "gauge",
           "Norm of the summed clipped gradients, estimated from the noised update: "
           "sqrt(max(0, norm(g~)^2 - sigma_g^2*C^2*d)) (post-processing; noisy for small signals).",
           attr="signal_magnitude", field="signal_magnitude"),
    Metric("privacy_signal_to_noise_ratio", "gauge",
           "Estimated signal magnitude over the expected noise norm sigma_g*C*sqrt(d) this step.",
           attr="signal_to_noise_ratio", field="signal_to_noise_ratio"),
    # The snapshot attribute is a mapping {operation: ratio}; its keys are the label values.
    Metric("privacy_overhead_ratio", "gauge",
           "Time of a DP step part relative to the same step without DP "
           "(total: DP step / plain step).", labels=("operation",), attr="overhead"),
    # Budget guard.
    Metric("privacy_budget_exhausted", "gauge",
           "1 once the budget guard found that one more step would pass the target, else 0.",
           labels=_ACC, attr="budget_exhausted", field="budget_exhausted"),
    # Security and compliance.
    Metric("membership_inference_risk_score", "gauge",
           "Largest membership-inference advantage (TPR - FPR) any attack can have at the current "
           "(epsilon, delta).", attr="membership_inference_risk", field="mia_risk_score"),
    Metric("membership_inference_empirical_auc", "gauge",
           "AUC of a loss-threshold membership-inference attack on training vs held-out samples.",
           attr="membership_inference_auc", field="mia_empirical_auc"),
    Metric("membership_inference_empirical_advantage", "gauge",
           "Best TPR - FPR of the loss-threshold membership-inference attack.",
           attr="membership_inference_advantage", field="mia_empirical_advantage"),
    # Evidence, not a bound: what attacks measured (the mapping's keys are the attack types).
    Metric("privacy_attack_score", "gauge",
           "Accuracy of a membership attack's guesses (0.5 = chance): best balanced accuracy of "
           "the loss-threshold attack, or the accuracy the one-run audit proves at its confidence.",
           labels=("attack_type",), attr="attack_scores"),
    Metric("privacy_audit_epsilon_lower_bound", "gauge",
           "Epsilon the one-run privacy audit proves the run exceeds (95 % confidence); above "
           "the reported epsilon, the privacy mechanism is weaker than reported.",
           attr="audit_epsilon_lower_bound", field="audit_epsilon_lower_bound"),
    Metric("authentication_failures_total", "counter",
           "Requests to the protected /metrics endpoint refused for missing or wrong credentials."),
    Metric("privacy_compliance_violations_total", "counter",
           "Violations of the configured DP policy.",
           labels=("policy", "violation_type"), attr="compliance_violations"),
)

_BY_NAME = {m.name: m for m in METRICS}
_FIELDS = [INFLUX_STEP_FIELD] + [m.field for m in METRICS if m.field]
if len(_BY_NAME) != len(METRICS) or len(set(_FIELDS)) != len(_FIELDS):
    raise RuntimeError("Duplicate metric name or InfluxDB field in the catalog")


def by_name(name: str) -> Metric:
    """The metric called ``name``; a ``KeyError`` names an unknown one."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"Unknown metric {name!r}: see privacy_callbacks.catalog.METRICS") from None
