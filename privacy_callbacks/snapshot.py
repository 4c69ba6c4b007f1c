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
        epsilon_step: The accounted step count ``epsilon`` belongs to (``steps``; less only
            while computing epsilon fails).
        epsilon_exact: 1 when ``epsilon`` is the accountant's own value for ``epsilon_step``; 0
            when it is an upper bound of it (PRV and GDP, until the background computation for
            that history is done). Never below the accountant's value either way.
        steps: Optimizer steps the accountant has accounted so far.
        membership_inference_risk: Largest membership advantage any attack can have at this
            step's privacy loss (:class:`~privacy_callbacks.security.RiskBound`).
        membership_inference_auc: Latest AUC of the empirical attack
            (:class:`~privacy_callbacks.MembershipInferenceProbe`), if one runs.
        membership_inference_advantage: Latest advantage of that attack.
        attack_scores: ``{attack_type: score}`` of the attack callbacks that measured so far
            (``loss_threshold``, ``one_run_audit``), 0.5 = chance.
        audit_epsilon_lower_bound: Lower bound on the run's epsilon from
            :class:`~privacy_callbacks.privacy_audit.OneRunAudit`, once it audited.
        compliance_violations: ``((policy, violation_type, count), ...)`` so far.
        session_steps_offset: ``steps`` minus the steps this session accounted (what the
            accountant held when the session's current fit started, less what earlier fits of the
            session accounted); see :attr:`session_steps`.
        session_epsilon_offset: The same for ``epsilon``; see :attr:`session_epsilon` and
            :attr:`exact_session_epsilon`.
        session_errors_offset: The same for ``accounting_errors`` (each fit counts its own).
        budget_exhausted: 1 once the budget guard found that one more step would pass the
            target, else 0; ``None`` without a target.
        assessed: Whether ``epsilon_forecast``, ``budget_exhaustion_steps`` and
            ``membership_inference_risk`` were computed for this step. Only their latest value
            is read, so the publisher computes them for the newest step it has (and at least
            every half second); the snapshots of the steps it builds in the same batch hold
            ``None`` for them.
        device_stats: Handle on device-side statistics
            (:class:`~privacy_callbacks.device.DeviceStats`), resolved by the publisher. The
            mechanism properties below read it and are ``None`` until it is resolved.
    """

    step: int
    timestamp_ns: int
    accountant: str
    delta: float | None
    epsilon: float | None
    epsilon_step: int | None
    steps: int | None
    noise_multiplier: float | None
    max_grad_norm: float | None
    sample_rate: float | None
    noise_std: float | None
    throughput: float | None
    step_seconds: float | None
    accounting_errors: int | None
    epsilon_exact: int | None = None
    target_epsilon: float | None = None
    budget_remaining: float | None = None
    epsilon_forecast: float | None = None
    budget_exhaustion_steps: int | None = None
    budget_exhausted: int | None = None
    rank: int = 0
    membership_inference_risk: float | None = None
    membership_inference_auc: float | None = None
    membership_inference_advantage: float | None = None
    attack_scores: dict[str, float] | None = None
    audit_epsilon_lower_bound: float | None = None
    compliance_violations: tuple[tuple[str, str, int], ...] = ()
    session_steps_offset: int = 0
    session_epsilon_offset: float = 0.0
    session_errors_offset: int = 0
    assessed: bool = True
    device_stats: Any = field(default=None, compare=False, repr=False)

    @property
    def session_steps(self) -> int | None:
        """Optimizer steps accounted in this session (a fit, or every fit of a named one)."""
        return None if self.steps is None else self.steps - self.session_steps_offset

    @property
    def session_epsilon(self) -> float | None:
        """Epsilon this session added: the sum over its fits of epsilon at the fit's end minus
        epsilon when it started (equal to ``epsilon`` for a session that started from nothing)."""
        return None if self.epsilon is None else self.epsilon - self.session_epsilon_offset

    @property
    def exact_session_epsilon(self) -> float | None:
        """:attr:`session_epsilon` when ``epsilon`` is the accountant's exact value for its step
        (``epsilon_exact == 1``), else ``None``.

        What ``privacy_budget_consumed_total`` counts: a counter cannot go down, so an upper
        bound published before the exact value (PRV, GDP, a noise schedule) would stay in it,
        above the epsilon actually spent. Counting exact values only, it rises with each exact
        value for a later step and ends at the exact epsilon the session added.
        """
        return self.session_epsilon if self.epsilon_exact == 1 else None

    @property
    def session_accounting_errors(self) -> int | None:
        """Failures while computing epsilon in this session."""
        return (None if self.accounting_errors is None
                else self.accounting_errors - self.session_errors_offset)

    @property
    def clipped_fraction(self) -> float | None:
        """Fraction of this step's per-sample gradients whose norm exceeded C: from the noised
        histogram (an accounted release), or exact with ``raw_private_statistics``."""
        return None if self.device_stats is None else self.device_stats.clipped_fraction

    @property
    def per_sample_grad_norms(self) -> tuple[float, ...] | None:
        """Observations for the per-sample norm histogram: one per noised bucket count at the
        bucket's upper edge, or the raw norms with ``raw_private_statistics``."""
        return None if self.device_stats is None else self.device_stats.per_sample_grad_norms

    @property
    def noised_counts(self) -> tuple[float, ...] | None:
        """The noised per-sample norm histogram counts as released (bucket edges: the catalog's
        and C), before rounding."""
        return None if self.device_stats is None else self.device_stats.noised_counts

    @property
    def noise_magnitude(self) -> float | None:
        """L2 norm of the noise added to the summed clipped gradients this step."""
        return None if self.device_stats is None else self.device_stats.noise_magnitude

    @property
    def signal_energy(self) -> float | None:
        """Unbiased estimate of the squared norm of the summed clipped gradients, computed from
        the noised update alone: ``||g~||^2 - sigma_g^2 C^2 d``."""
        return None if self.device_stats is None else self.device_stats.signal_energy

    @property
    def signal_magnitude(self) -> float | None:
        """``sqrt(max(0, signal_energy))``: the signal's norm, estimated from the noised update."""
        return None if self.device_stats is None else self.device_stats.signal_magnitude

    @property
    def signal_to_noise_ratio(self) -> float | None:
        """``signal_magnitude`` over the expected noise norm ``sigma_g C sqrt(d)``."""
        return None if self.device_stats is None else self.device_stats.signal_to_noise_ratio

    @property
    def overhead(self) -> dict[str, float] | None:
        """Time of each DP part relative to the same step without DP, by operation."""
        return None if self.device_stats is None else self.device_stats.overhead
