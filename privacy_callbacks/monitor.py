"""PrivacyMonitor: the one-line default -- metrics, budget guard and audit for an Opacus run."""

from __future__ import annotations

import os
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from . import probe
from .audit import AuditTrail
from .compliance import DPPolicy
from .compliance_audit import ComplianceAudit, check_policy, check_thresholds
from .exporters.base import Exporter
from .guard import BudgetGuard, check_delta, check_target
from .metrics import PrivacyMetrics, check_exporters, load_saved_with_other_settings
from .oversight import DEFAULT_THRESHOLDS
from .snapshot import PrivacySnapshot

__all__ = ["PrivacyMonitor"]

_STEP_HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
_HOOKS = ("setup", "on_fit_start", "on_train_start", "on_train_epoch_start",
          "on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end",
          "on_validation_end", "on_train_end", "on_fit_end", "on_exception", "teardown")


class PrivacyMonitor(Callback):
    """Reports the privacy spent by an Opacus DP-SGD run on every optimizer step.

    After each optimizer step it reads the accountant's history and the DP optimizer's settings
    (host-side values only: no device synchronisation), computes epsilon (microseconds for RDP;
    on a background thread for PRV and GDP, with a proven upper bound labelled as such until the
    exact value for the step is known), builds a :class:`PrivacySnapshot` and hands it to a
    background publisher that feeds the exporters. Epsilon also goes to the progress bar and the
    trainer's loggers at the trainer's ``log_every_n_steps`` cadence.

    Budget guard: with ``target_epsilon`` set, before each optimizer step the monitor checks the
    step Opacus is about to account and skips it if it would pass the target, and after a step
    it stops the fit (on every rank together) if one more would (see :class:`BudgetGuard`).
    Epsilon after the fit is at most the target. For PRV and GDP accountants the guard uses the
    upper bounds of :mod:`privacy_callbacks.accounting`, never below their epsilon: it may stop
    a little early, never late.

    Resume: the accountant's history is saved in Lightning checkpoints and put back into the
    Opacus accountant on ``trainer.fit(ckpt_path=...)``, so epsilon continues where it stopped.

    Args:
        delta: The delta to report epsilon for, in (0, 1).
        target_epsilon: The epsilon budget; enables the budget metrics.
        exporters: Where snapshots go, e.g. ``[PrometheusExporter(port=9108)]``.
        accountant: The Opacus accountant or ``PrivacyEngine``. By default the monitor finds the
            ``PrivacyEngine`` stored on the LightningModule (``self.privacy_engine``, as in Opacus'
            Lightning example) or on a callback.
        session_id: Label naming the session. By default each ``trainer.fit`` is a session of its
            own with a random id (a resumed fit keeps its checkpoint's); a named session spans
            every fit of this monitor and every restart. Counters count what their session
            accounted (see the README's "Sessions").
        model_name: Label naming the model; the LightningModule's class name by default.
        progress_bar: Show epsilon in the progress bar.
        max_pending: Snapshots the publisher holds while exporters lag before dropping the oldest.
        audit: An :class:`~privacy_callbacks.audit.AuditTrail` (or a file path for one) that
            receives fit start (full DP configuration), budget thresholds, policy violations,
            resume, the first accounting error and fit end.
        audit_thresholds: Fractions of ``target_epsilon`` whose crossing is audited.
        policy: A :class:`~privacy_callbacks.compliance.DPPolicy`, a preset name
            (``"default"``, ``"strict"``) or a JSON/TOML policy file; violations are counted in
            ``privacy_compliance_violations_total``, logged and audited.
        stop_at_target: With ``target_epsilon`` set, stop training before any step that would
            take epsilon past it. ``False`` only reports (the budget goes negative).
        allow_privacy_reset: Accept resuming from a checkpoint that has no privacy state (epsilon
            restarts from what the accountant holds, 0 for a fresh one) or whose delta or
            accountant differ (the saved history is carried over). Off by default: silently
            restarting epsilon would under-report the privacy spent.
        mechanism: Measure clipping, noise, signal and DP overhead on the device each step
            (on a CPU, without per-sample statistics, every k-th step, k set by their cost to
            1 % of the step; see the README's "Mechanism metrics"); ``False`` leaves the
            optimizer untouched.
            Every default mechanism metric is data-independent, post-processing of the noised
            update, or -- with ``DifferentialPrivacy(statistics_noise_multiplier=...)`` -- a
            noised histogram accounted in epsilon.
        raw_private_statistics: Also publish each step's per-sample gradient norms, the exact
            clipped fraction and the real batch sizes (throughput), computed from the private
            batch without noise. They fall outside epsilon: a record with an unusual gradient
            is visible in them. For debugging on data that needs no protection.
        overhead_every: Time one plain forward/backward pass (per-sample hooks off, nothing
            kept) every this many optimizer steps (1000 by default, and at the third step) to
            compute ``privacy_overhead_ratio``; ``None`` turns the overhead ratios off.

    ``session_id`` and ``model_name`` become metric labels: they are checked (at most 128 of
    ``A-Z a-z 0-9 _ . : / -``), and a value that looks like personal data (an e-mail address, a
    phone number, …) is refused, or replaced by a keyed hash when ``PRIVACY_LABEL_HMAC_KEY`` is
    set (see :func:`privacy_callbacks.pii.check_label`).

    Under DDP every rank runs the exporters: privacy metrics come from global rank 0 only (every
    rank holds the same accountant); throughput and step time come from every rank with its
    ``rank`` label. A ``PrometheusExporter`` serves on its port plus the local rank.

    Exported metrics: see :mod:`privacy_callbacks.catalog` and the README's metrics table.

    The monitor is the default composition of three callbacks that each do one job and share
    the trainer's :class:`~privacy_callbacks.ledger.PrivacyLedger` (optimizers, accountant,
    epsilon): :class:`~privacy_callbacks.BudgetGuard` (with ``target_epsilon``),
    :class:`~privacy_callbacks.ComplianceAudit` and :class:`~privacy_callbacks.PrivacyMetrics`,
    in that order on every hook. Use them directly for another composition.
    """



    def __init__(
        self,
        delta: float,
        target_epsilon: float | None = None,
        *,
        exporters: Sequence[Exporter] = (),
        accountant: Any = None,
        session_id: str | None = None,
        model_name: str | None = None,
        progress_bar: bool = True,
        max_pending: int = 10_000,
        audit: AuditTrail | str | os.PathLike[str] | None = None,
        audit_thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        policy: DPPolicy | str | os.PathLike[str] | None = None,
        stop_at_target: bool = True,
        allow_privacy_reset: bool = False,
        mechanism: bool = True,
        overhead_every: int | None = 1000,
        raw_private_statistics: bool = False,
    ) -> None:
        # Every argument is checked here, before any part is built, so a mistake names the
        # value whatever part would have used it.
        delta = check_delta(delta)
        target = check_target(target_epsilon)
        check_exporters(exporters)
        check_thresholds(audit_thresholds)
        check_policy(policy)
        if accountant is not None:
            probe.find_accountant(None, None, accountant)  # raises, naming the value
        if not isinstance(stop_at_target, bool):
            raise ValueError(f"Unexpected value for stop_at_target: {stop_at_target!r}; use "
                             "True or False")
        self.delta = delta
        self.target_epsilon = target
        self.stop_at_target = stop_at_target
        self.guard = None if target is None else BudgetGuard(
            target, delta, accountant=accountant, allow_privacy_reset=allow_privacy_reset,
            stop=stop_at_target)
        self.compliance = ComplianceAudit(
            delta, target, audit=audit, audit_thresholds=audit_thresholds, policy=policy,
            accountant=accountant, allow_privacy_reset=allow_privacy_reset)
        self.metrics = PrivacyMetrics(
            delta, target, exporters=exporters, accountant=accountant, session_id=session_id,
            model_name=model_name, progress_bar=progress_bar, max_pending=max_pending,
            allow_privacy_reset=allow_privacy_reset, mechanism=mechanism,
            overhead_every=overhead_every, raw_private_statistics=raw_private_statistics)
        # The guard first: a step's snapshot carries the guard's decision on it.
        self.parts: tuple[Callback, ...] = tuple(
            p for p in (self.guard, self.compliance, self.metrics) if p is not None)
        # Per hook, only the parts that implement it: a hook costs a loop over what does work.
        self._has: dict[str, tuple[Callback, ...]] = {
            hook: tuple(p for p in self.parts
                        if getattr(type(p), hook) is not getattr(Callback, hook))
            for hook in _HOOKS}
        self._bind_step_hooks()
        exporter_names = [type(e).__name__ if type(e).__repr__ is object.__repr__ else repr(e)
                          for e in self.metrics.exporters]
        # Lightning reads state_key around every hook call: computed once.
        self._state_key = self._generate_state_key(
            delta=self.delta, target_epsilon=self.target_epsilon,
            session_id=session_id and self.metrics.session_id, exporters=exporter_names)

    # -- what the parts hold -------------------------------------------------------------------

    @property
    def exporters(self) -> tuple[Exporter, ...]:
        return self.metrics.exporters

    @property
    def audit(self) -> AuditTrail | None:
        return self.compliance.audit

    @property
    def policy(self) -> DPPolicy | None:
        return self.compliance.policy

    @property
    def session_id(self) -> str:
        return self.metrics.session_id

    @property
    def model_name(self) -> str | None:
        return self.metrics.model_name

    @property
    def accounting(self) -> Any:
        """The shared :class:`~privacy_callbacks.accounting.Accounting`; ``None`` before a fit."""
        return self.metrics.accounting

    @property
    def last_snapshot(self) -> PrivacySnapshot | None:
        return self.metrics.last_snapshot

    @property
    def _publisher(self) -> Any:
        return self.metrics._publisher

    @property
    def _exporting(self) -> bool:
        return self.metrics._exporting

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every snapshot so far reached the exporters; False on timeout."""
        return self.metrics.flush(timeout)

    def refresh(self) -> None:
        """Export now what arrived since the last step (see :meth:`PrivacyMetrics.refresh`)."""
        self.metrics.refresh()

    def audit_event(self, event: str, **data: Any) -> None:
        """Append ``event`` to the audit trail (if any) from the exporting rank; never raises.

        For rare events only (the budget guard stopping training, say): it writes to disk now.
        """
        self.compliance.event(event, **data)

    # -- checkpoint state ------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._state_key

    @property
    def _legacy_state_key(self) -> Any:
        return type(self).__qualname__  # the key of checkpoints saved before state_key existed

    def state_dict(self) -> dict[str, Any]:
        return self.metrics.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.metrics.load_state_dict(state_dict)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        for part in self.parts:
            part.on_load_checkpoint(trainer, pl_module, checkpoint)
        load_saved_with_other_settings(self, checkpoint)

    # -- every hook goes to the parts that have it, in order ----------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for part in self._has["setup"]:
            part.setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for part in self._has["on_fit_start"]:
            part.on_fit_start(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for part in self._has["on_train_start"]:
            part.on_train_start(trainer, pl_module)

    def _bind_step_hooks(self) -> None:
        """The per-step hooks, bound once to the parts with work per step.

        The compliance part has none: the metrics part, the trainer's reporter from
        ``on_fit_start`` on, hands it each step's epsilon. A hook with one such part is that
        part's own method, set on the instance, so Lightning calls it with no loop in between
        (unless a subclass overrides the hook).
        """
        self._step_hooks = {
            hook: tuple(getattr(p, hook) for p in self._has[hook] if p is not self.compliance)
            for hook in _STEP_HOOKS}
        for hook, bound in self._step_hooks.items():
            if len(bound) == 1 and getattr(type(self), hook) is getattr(PrivacyMonitor, hook):
                setattr(self, hook, bound[0])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for part in self._has["on_train_epoch_start"]:
            part.on_train_epoch_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        for hook in self._step_hooks["on_train_batch_start"]:
            hook(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        for hook in self._step_hooks["on_before_optimizer_step"]:
            hook(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        for hook in self._step_hooks["on_train_batch_end"]:
            hook(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for part in self._has["on_validation_end"]:
            part.on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for part in self._has["on_train_end"]:
            part.on_train_end(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for part in self._has["on_fit_end"]:
            part.on_fit_end(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        for part in self._has["on_exception"]:
            part.on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for part in self._has["teardown"]:
            part.teardown(trainer, pl_module, stage)
