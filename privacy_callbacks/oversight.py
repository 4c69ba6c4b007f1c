"""The monitor's side consumers of epsilon: audit events and DP policy checks.

:class:`Oversight` keeps the per-step cost to one float comparison (``epsilon >= watch``); every
event it reacts to (a budget threshold, a policy violation, the first accounting error) is rare,
so its audit record is written when it happens, and never raises into training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
from typing import Any, Sequence

from .audit import AuditTrail
from .compliance import DPPolicy, Violation

logger = logging.getLogger(__name__)

__all__ = ["Oversight"]

DEFAULT_THRESHOLDS = (0.5, 0.8, 1.0)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("privacy_callbacks", "torch", "opacus", "lightning", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out


class Oversight:
    """Audit trail and policy checks for one :class:`~privacy_callbacks.PrivacyMonitor`.

    Args:
        audit: Where events go, or ``None``.
        policy: The DP policy to check, or ``None``.
        thresholds: Fractions of the target epsilon whose crossing is an audit event.
        target_epsilon: The run's budget, if any.
    """

    def __init__(self, audit: AuditTrail | None, policy: DPPolicy | None,
                 thresholds: Sequence[float], target_epsilon: float | None) -> None:
        self.audit = audit
        self.policy = policy
        self.target_epsilon = target_epsilon
        self.thresholds = tuple(sorted(thresholds)) if target_epsilon is not None else ()
        self.counts: dict[tuple[str, str], int] = {}
        #: ``((policy, violation_type, count), ...)``: replaced (never mutated) on each violation,
        #: so exporters notice a change by identity.
        self.violations: tuple[tuple[str, str, int], ...] = ()
        self.watch = math.inf
        self._next = 0
        self._past_target = False
        self._past_max = False
        self.errors_seen = 0
        self._audit_failed = False
        self._rewatch()

    @property
    def active(self) -> bool:
        return self.audit is not None or self.policy is not None

    def event(self, event: str, **data: Any) -> None:
        """Append an audit record; a failure is logged once and never raised."""
        if self.audit is None:
            return
        try:
            self.audit.record(event, **data)
        except Exception:
            if not self._audit_failed:
                self._audit_failed = True
                logger.exception("Writing the privacy audit trail %s failed; training continues",
                                 self.audit.path)

    def violation(self, violation: Violation, **data: Any) -> None:
        """Count, log and audit one broken policy rule."""
        assert self.policy is not None
        key = (self.policy.name, violation.type)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.violations = tuple((p, t, n) for (p, t), n in sorted(self.counts.items()))
        logger.warning("DP policy %r violated (%s): %s", self.policy.name, violation.type,
                       violation.detail)
        self.event("policy_violation", policy=self.policy.name, violation_type=violation.type,
                   detail=violation.detail, **data)

    def fit_start(self, facts: dict[str, Any], violations: list[Violation]) -> None:
        """Record the run's full configuration, then the policy's start-time violations."""
        policy = dataclasses.asdict(self.policy) if self.policy is not None else None
        self.event("fit_start", **facts, thresholds=list(self.thresholds), policy=policy,
                   versions=_versions())
        for violation in violations:
            self.violation(violation)

    def _rewatch(self) -> None:
        target = self.target_epsilon
        candidates = [math.inf]
        # Thresholds are empty without a target.
        if target is not None and self._next < len(self.thresholds):
            candidates.append(self.thresholds[self._next] * target)
        policy = self.policy
        if policy is not None:
            # Violations are for epsilon strictly above a limit: watch the next float up.
            if policy.stop_at_target and target is not None and not self._past_target:
                candidates.append(math.nextafter(target, math.inf))
            if policy.max_epsilon is not None and not self._past_max:
                candidates.append(math.nextafter(policy.max_epsilon, math.inf))
        self.watch = min(candidates)

    def crossed(self, epsilon: float, step: int) -> None:
        """Epsilon reached :attr:`watch` at ``step``: record what that means."""
        target = self.target_epsilon
        while (target is not None and self._next < len(self.thresholds)
               and epsilon >= self.thresholds[self._next] * target):
            fraction = self.thresholds[self._next]
            self._next += 1
            logger.info("Privacy budget %.0f%% reached at step %d: epsilon=%.4g of %.4g",
                        fraction * 100, step, epsilon, target)
            self.event("budget_threshold", fraction=fraction, epsilon=epsilon,
                       target_epsilon=target, step=step)
        policy = self.policy
        if policy is not None:
            if (policy.stop_at_target and target is not None and not self._past_target
                    and epsilon > target):
                self._past_target = True
                self.violation(Violation("training_past_target",
                                         f"training went on past the target: epsilon={epsilon:.4g}"
                                         f" > {target:g} at step {step}"), step=step,
                               epsilon=epsilon)
            if (policy.max_epsilon is not None and not self._past_max
                    and epsilon > policy.max_epsilon):
                self._past_max = True
                self.violation(Violation("epsilon_above_policy_max",
                                         f"epsilon={epsilon:.4g} is above the policy's maximum "
                                         f"{policy.max_epsilon:g} at step {step}"), step=step,
                               epsilon=epsilon)
        self._rewatch()

    def accounting_errors(self, errors: int, step: int) -> None:
        """The accountant failed (again): audit the first failure; the total goes in fit_end."""
        if self.errors_seen == 0:
            self.event("accounting_error", step=step, errors=errors)
        self.errors_seen = errors
