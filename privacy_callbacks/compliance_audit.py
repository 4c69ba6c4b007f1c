"""ComplianceAudit: the audit trail and DP policy checks of a fit, as a callback."""

from __future__ import annotations

import os
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from . import probe
from .accounting import Epsilon
from .audit import AuditTrail
from .compliance import DPPolicy, check_start
from .guard import check_delta, check_target
from .ledger import PrivacyLedger
from .oversight import DEFAULT_THRESHOLDS, Oversight
from .security import RiskBound, attack_results

__all__ = ["ComplianceAudit"]


def check_policy(policy: Any) -> DPPolicy | None:
    """A :class:`DPPolicy` from a policy, a preset name or a policy file; a clear error else."""
    if isinstance(policy, (str, os.PathLike)):
        return (DPPolicy.preset(policy) if policy in ("default", "strict")
                else DPPolicy.from_file(policy))
    if policy is not None and not isinstance(policy, DPPolicy):
        raise ValueError(f"Unexpected value for policy: {policy!r}; use a DPPolicy, a preset "
                         "name ('default', 'strict') or a JSON/TOML policy file")
    return policy


def check_thresholds(audit_thresholds: Sequence[float]) -> tuple[float, ...]:
    thresholds = tuple(audit_thresholds)
    if any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 10
           for t in thresholds):
        raise ValueError(f"Unexpected value for audit_thresholds: {audit_thresholds!r}; use "
                         "fractions of the target such as (0.5, 0.8, 1.0)")
    return thresholds


class ComplianceAudit(Callback):
    """Writes a fit's audit trail and checks it against a DP policy.

    Records (from global rank 0): fit start (the full DP configuration and package versions),
    resume, budget thresholds crossed, policy violations, the first accounting error, a budget
    guard's stop and fit end (the exact final epsilon). Violations are counted, logged and
    exported by the metrics callback as ``privacy_compliance_violations_total``. Per step it
    costs one float comparison.

    Args:
        delta: The delta epsilon is computed for, in (0, 1).
        target_epsilon: The budget whose fractions ``audit_thresholds`` are audited.
        audit: An :class:`~privacy_callbacks.audit.AuditTrail` or a file path for one.
        audit_thresholds: Fractions of ``target_epsilon`` whose crossing is audited.
        policy: A :class:`~privacy_callbacks.compliance.DPPolicy`, a preset name (``"default"``,
            ``"strict"``) or a JSON/TOML policy file.
        accountant: The Opacus accountant or ``PrivacyEngine``; found by default.
        allow_privacy_reset: See :class:`~privacy_callbacks.PrivacyMonitor`.
    """

    def __init__(self, delta: float, target_epsilon: float | None = None, *,
                 audit: AuditTrail | str | os.PathLike[str] | None = None,
                 audit_thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 policy: DPPolicy | str | os.PathLike[str] | None = None,
                 accountant: Any = None, allow_privacy_reset: bool = False) -> None:
        self.delta = check_delta(delta)
        self.target_epsilon = check_target(target_epsilon)
        thresholds = check_thresholds(audit_thresholds)
        if audit is not None and not isinstance(audit, AuditTrail):
            audit = AuditTrail(audit)
        self.audit = audit
        self.policy = check_policy(policy)
        self.accountant = accountant
        self.allow_privacy_reset = allow_privacy_reset
        self.oversight = Oversight(audit, self.policy, thresholds, self.target_epsilon)
        self.ledger: PrivacyLedger | None = None
        self._exporting = False
        self._resumed: dict[str, Any] | None = None
        self._last_step = -1
        self._start_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(delta=self.delta, target_epsilon=self.target_epsilon)

    def event(self, event: str, **data: Any) -> None:
        """Append ``event`` to the audit trail from the exporting rank; never raises."""
        if self._exporting:
            session = self.ledger.session_id if self.ledger is not None else None
            self.oversight.event(event, session_id=session, **data)

    # -- lifecycle ---------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ledger = PrivacyLedger.attach(trainer, pl_module, self.delta, self.accountant)
        self.ledger.subscribe(self.event)
        self.ledger.watch(self._observe)
        self._exporting = trainer.is_global_zero
        self._last_step = self._start_step = trainer.global_step

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = PrivacyLedger.note_checkpoint(trainer, checkpoint)
        self._resumed = states[0] if states else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ledger = self.ledger
        assert ledger is not None
        ledger.restore(trainer, self.allow_privacy_reset, self.target_epsilon)
        self._last_step = self._start_step = trainer.global_step
        resumed, self._resumed = self._resumed, None
        oversight = self.oversight
        if not oversight.active or not self._exporting:
            return
        accounting = ledger.accounting
        size, poisson = probe.training_data_facts(trainer)
        secure = probe.secure_mode(ledger.optimizers)
        violations = [] if self.policy is None else check_start(
            self.policy, delta=self.delta, dataset_size=size, poisson=poisson,
            secure_mode=secure, target_epsilon=self.target_epsilon)
        planned = trainer.estimated_stepping_batches
        oversight.fit_start({
            "session_id": ledger.session_id,
            "model_name": ledger.model_name or type(pl_module).__name__,
            "accountant": accounting.mechanism, "delta": self.delta,
            "target_epsilon": self.target_epsilon, "dataset_size": size,
            "poisson_sampling": poisson, "dp": probe.dp_config(ledger.optimizers),
            "planned_steps": int(planned) if planned != float("inf") else None,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step, "steps_accounted": accounting.steps,
        }, violations)
        ledger.violations = oversight.violations
        if resumed is not None:
            self.event("resume", global_step=trainer.global_step,
                       steps_accounted=accounting.steps, session_id=resumed.get("session_id"))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        ledger = self.ledger
        if ledger is None or ledger.reporter is not None or not self._exporting:
            return  # a metrics callback computes each step's epsilon, and calls _observe
        step = trainer.global_step
        if step == self._last_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step = step
        # No metrics callback computes each step's epsilon: compute it here.
        latest = ledger.accounting.update()
        if latest is not None:
            self._observe(latest, step)

    def _observe(self, latest: Epsilon, step: int) -> None:
        """One step's epsilon: audit the thresholds and policy limits it crosses."""
        ledger = self.ledger
        if ledger is None or not self._exporting:
            return
        accounting, oversight = ledger.accounting, self.oversight
        if latest.value >= oversight.watch:
            oversight.crossed(latest.value, step)
            ledger.violations = oversight.violations
        if accounting.errors and accounting.errors != oversight.errors_seen:
            oversight.accounting_errors(accounting.errors, step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ledger = self.ledger
        if ledger is None or not self._exporting or not self.oversight.active:
            return
        accounting = ledger.accounting
        if trainer.global_step == self._start_step:
            return  # no step in this fit
        accounting.settle(timeout=10.0)
        latest = accounting.latest
        history = accounting.accountant.history
        eps = None if latest is None else latest.value
        risk = None
        if history:
            risk = RiskBound(accounting, self.delta).score(
                eps, float(ledger.optimizers[0].noise_multiplier), float(history[-1][1]))
        attacks = [cb for cb in trainer.callbacks  # type: ignore[attr-defined]
                   if hasattr(cb, "attack_type")]
        self.event(
            "fit_end", epsilon=eps, epsilon_exact=bool(latest is not None and latest.exact),
            delta=self.delta, steps_accounted=accounting.steps, global_step=trainer.global_step,
            accountant=accounting.mechanism, accounting_errors=accounting.errors,
            membership_inference_risk=risk,
            audit_epsilon_lower_bound=attack_results(attacks)[1],
            violations=[list(v) for v in self.oversight.violations])

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.ledger is not None:
            ledger, self.ledger = self.ledger, None
            ledger.release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")
