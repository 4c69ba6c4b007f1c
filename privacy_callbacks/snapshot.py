"""PrivacySnapshot: one frozen record per optimizer step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class PrivacySnapshot:
    """What the monitor knows after one optimizer step.

    Built on the training thread from host-side values only (no device reads); exporters get it
    on the publisher's thread. ``None`` means "not known for this run" (no target set, say) and is
    not exported; under DDP, ranks other than 0 export only ``throughput`` and ``step_seconds``.

    Attributes:
        step: The trainer's global step after this optimizer step.
        timestamp_ns: Wall-clock end of the step, in ns since the epoch.
        epsilon: Epsilon spent, for ``delta``.
        epsilon_step: The accounted step count ``epsilon`` belongs to. Equal to ``steps`` for RDP;
            may trail it for accountants computed in the background (PRV, GDP).
        steps: Optimizer steps the accountant has accounted so far.
        membership_inference_risk: Largest membership advantage any attack can have at this
            step's privacy loss (:class:`~privacy_callbacks.security.RiskBound`).
        membership_inference_auc: Latest AUC of the empirical attack
            (:class:`~privacy_callbacks.MembershipInferenceProbe`), if one runs.
        membership_inference_advantage: Latest advantage of that attack.
        compliance_violations: ``((policy, violation_type, count), ...)`` so far.
        budget_exhausted: 1 once the budget guard found that one more step would pass the
            target, else 0; ``None`` without a target.
        device_stats: Handle on device-side statistics, resolved by the publisher.
    """

    step: int
    timestamp_ns: int
    accountant: str
    delta: float | None
    epsilon: float | None
    epsilon_step: int
    steps: int | None
    noise_multiplier: float | None
    max_grad_norm: float | None
    sample_rate: float | None
    noise_std: float | None
    throughput: float | None
    step_seconds: float | None
    accounting_errors: int | None
    target_epsilon: float | None = None
    budget_remaining: float | None = None
    epsilon_forecast: float | None = None
    budget_exhaustion_steps: int | None = None
    budget_exhausted: int | None = None
    rank: int = 0
    membership_inference_risk: float | None = None
    membership_inference_auc: float | None = None
    membership_inference_advantage: float | None = None
    compliance_violations: tuple[tuple[str, str, int], ...] = ()
    device_stats: Any = field(default=None, compare=False, repr=False)
