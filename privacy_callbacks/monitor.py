"""PrivacyMonitor: privacy metrics from an Opacus run, every optimizer step."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import uuid
import warnings
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from . import probe
from .accounting import Accounting, Epsilon, make_accounting
from .audit import AuditTrail
from .compliance import DPPolicy, check_start
from .device import DeviceStats
from .exporters.base import Exporter, RunInfo
from .oversight import DEFAULT_THRESHOLDS, Oversight
from .pii import check_label, protect_loggers
from .publisher import Publisher
from .privacy_audit import OneRunAudit
from .security import MembershipInferenceProbe, RiskBound, attack_results
from .snapshot import PrivacySnapshot
from .wiring import DifferentialPrivacy

logger = logging.getLogger(__name__)

__all__ = ["PrivacyMonitor"]


def _batch_len(batch: Any) -> int:
    """Samples in a batch, from host-side shape metadata only."""
    while True:
        if isinstance(batch, torch.Tensor):
            return int(batch.shape[0]) if batch.dim() else 1
        if isinstance(batch, (list, tuple)) and batch:
            batch = batch[0]
        elif isinstance(batch, dict) and batch:
            batch = next(iter(batch.values()))
        else:
            return 0


def _rank_only(snapshot: PrivacySnapshot) -> PrivacySnapshot:
    """What a rank other than 0 exports: its own throughput and step time, no privacy values."""
    return PrivacySnapshot(
        step=snapshot.step, timestamp_ns=snapshot.timestamp_ns, accountant=snapshot.accountant,
        delta=None, epsilon=None, epsilon_step=None, steps=None,
        noise_multiplier=None, max_grad_norm=None, sample_rate=None, noise_std=None,
        throughput=snapshot.throughput, step_seconds=snapshot.step_seconds,
        accounting_errors=None, rank=snapshot.rank)


class PrivacyMonitor(Callback):
    """Reports the privacy spent by an Opacus DP-SGD run on every optimizer step.

    After each optimizer step it reads the accountant's history and the DP optimizer's settings
    (host-side values only: no device synchronisation), computes epsilon (microseconds for RDP;
    on a background thread for PRV and GDP, with a proven upper bound labelled as such until the
    exact value for the step is known), builds a :class:`PrivacySnapshot` and hands it to a
    background publisher that feeds the exporters. Epsilon also goes to the progress bar and the
    trainer's loggers at the trainer's ``log_every_n_steps`` cadence.

    Budget guard: with ``target_epsilon`` set, after each optimizer step the monitor computes
    epsilon for one more step at the noise multiplier and sample rate Opacus will account next,
    and stops the fit (on every rank together) if that step would pass the target. Epsilon after
    the fit is at most the target. For PRV and GDP accountants the guard uses the upper bounds of
    :mod:`privacy_callbacks.accounting`, never below their epsilon: it may stop a little early,
    never late.

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
            (see the README's "Mechanism metrics"); ``False`` leaves the optimizer untouched.
            Every default mechanism metric is data-independent, post-processing of the noised
            update, or -- with ``DifferentialPrivacy(statistics_noise_multiplier=...)`` -- a
            noised histogram accounted in epsilon.
        raw_private_statistics: Also publish each step's per-sample gradient norms, the exact
            clipped fraction and the real batch sizes (throughput), computed from the private
            batch without noise. They fall outside epsilon: a record with an unusual gradient
            is visible in them. For debugging on data that needs no protection.
        overhead_every: Time one plain forward/backward pass (per-sample hooks off, nothing
            kept) every this many optimizer steps to compute ``privacy_overhead_ratio``;
            ``None`` turns the overhead ratios off.

    ``session_id`` and ``model_name`` become metric labels: they are checked (at most 128 of
    ``A-Z a-z 0-9 _ . : / -``), and a value that looks like personal data (an e-mail address, a
    phone number, …) is refused, or replaced by a keyed hash when ``PRIVACY_LABEL_HMAC_KEY`` is
    set (see :func:`privacy_callbacks.pii.check_label`).

    Under DDP every rank runs the exporters: privacy metrics come from global rank 0 only (every
    rank holds the same accountant); throughput and step time come from every rank with its
    ``rank`` label. A ``PrometheusExporter`` serves on its port plus the local rank.

    Exported metrics: see :mod:`privacy_callbacks.catalog` and the README's metrics table.
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
        overhead_every: int | None = 200,
        raw_private_statistics: bool = False,
    ) -> None:
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"Unexpected value for delta: {delta!r}; use a number in (0, 1), "
                             "typically below 1/(training set size), e.g. 1e-5")
        if target_epsilon is not None and (
                isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float))
                or not 0 < target_epsilon < math.inf):
            raise ValueError(f"Unexpected value for target_epsilon: {target_epsilon!r}; use a "
                             "positive finite number, or None for no budget")
        exporters = tuple(exporters)
        for exporter in exporters:
            if not isinstance(exporter, Exporter):
                raise ValueError(f"Unexpected exporter {exporter!r}: use PrometheusExporter, "
                                 "InfluxDBExporter or a subclass of privacy_callbacks.Exporter")
        protect_loggers()
        if session_id is not None:
            session_id = check_label("session_id", session_id)
        if model_name is not None:
            model_name = check_label("model_name", model_name)
        thresholds = tuple(audit_thresholds)
        if any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 10
               for t in thresholds):
            raise ValueError(f"Unexpected value for audit_thresholds: {audit_thresholds!r}; use "
                             "fractions of the target such as (0.5, 0.8, 1.0)")
        if audit is not None and not isinstance(audit, AuditTrail):
            audit = AuditTrail(audit)
        if isinstance(policy, (str, os.PathLike)):
            policy = (DPPolicy.preset(policy) if policy in ("default", "strict")
                      else DPPolicy.from_file(policy))
        elif policy is not None and not isinstance(policy, DPPolicy):
            raise ValueError(f"Unexpected value for policy: {policy!r}; use a DPPolicy, a preset "
                             "name ('default', 'strict') or a JSON/TOML policy file")
        if accountant is not None:
            probe.find_accountant(None, None, accountant)  # raises, naming the value
        for name, value in (("stop_at_target", stop_at_target),
                            ("allow_privacy_reset", allow_privacy_reset),
                            ("raw_private_statistics", raw_private_statistics)):
            if not isinstance(value, bool):
                raise ValueError(f"Unexpected value for {name}: {value!r}; use True or False")
        if overhead_every is not None and (isinstance(overhead_every, bool) or not isinstance(
                overhead_every, int) or overhead_every < 1):
            raise ValueError(f"Unexpected value for overhead_every: {overhead_every!r}; use a "
                             "number of optimizer steps >= 1, or None for no overhead ratios")
        self.delta = float(delta)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.exporters = exporters
        self.accountant = accountant
        self.session_id = session_id or uuid.uuid4().hex[:12]
        self.model_name = model_name
        self.progress_bar = progress_bar
        self.max_pending = max_pending
        self.audit = audit
        self.policy = policy
        self._oversight = Oversight(audit, policy, thresholds, self.target_epsilon)
        self._risk: RiskBound | None = None
        self._mia: MembershipInferenceProbe | None = None
        self._attacks: list[Any] = []
        self.stop_at_target = stop_at_target
        self.allow_privacy_reset = allow_privacy_reset
        self._session_id_given = session_id is not None
        self._fitted = False
        # What the session's earlier fits counted (steps, epsilon, accounting errors), and the
        # offsets that turn this fit's accountant values into the session's (PrivacySnapshot).
        self._session_carry: tuple[int, float, int] = (0, 0.0, 0)
        self._session_offsets: tuple[int, float, int] = (0, 0.0, 0)
        self.mechanism = mechanism
        self.overhead_every = overhead_every
        self.raw_private_statistics = raw_private_statistics
        if raw_private_statistics:
            warnings.warn(
                "PrivacyMonitor(raw_private_statistics=True) publishes per-sample gradient norms, "
                "the exact clipped fraction and real batch sizes of the private data: they fall "
                "outside epsilon (a record with an unusual gradient is visible in them). Use it "
                "only on data that needs no protection.", UserWarning, stacklevel=2)

        self.accounting: Accounting | None = None
        self.last_snapshot: PrivacySnapshot | None = None
        self._publisher: Publisher | None = None
        self._probe: probe.MechanismProbe | None = None
        self._optimizers: list[Any] = []
        self._accumulate = 1
        self._planned_steps: int | None = None
        self._rank = 0
        self._exporting = False
        self._started = False
        self._last_step = -1
        self._samples = 0
        self._batches = 0
        self._t_last: float | None = None
        self._loaded_state: dict[str, Any] | None = None
        self._exhausted = False
        self._logged_step: int | None = None
        # (sigma, q, accountant state) for which one more step is known to stay within the target.
        self._cleared: tuple[Any, ...] | None = None
        # Optimizers whose last step the guard skipped: what it accumulated is dropped after it.
        self._skipped: list[Any] = []

    @property
    def state_key(self) -> str:
        # Two monitors (two exporter configurations, two deltas) can sit in one Trainer.
        exporters = [type(e).__name__ if type(e).__repr__ is object.__repr__ else repr(e)
                     for e in self.exporters]
        return self._generate_state_key(
            delta=self.delta, target_epsilon=self.target_epsilon,
            session_id=self.session_id if self._session_id_given else None, exporters=exporters)

    @property
    def _legacy_state_key(self) -> Any:
        return type(self).__qualname__  # the key of checkpoints saved before state_key existed

    # -- lifecycle ---------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._start_session()
        self._rank = trainer.global_rank
        self._exporting = trainer.is_global_zero
        started: list[Exporter] = []
        try:
            for exporter in self.exporters:
                exporter.rank, exporter.local_rank = trainer.global_rank, trainer.local_rank
                exporter.start()
                started.append(exporter)
        except BaseException:
            for exporter in started:
                exporter.close(timeout=1.0)
            raise
        self._started = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's connectors set Trainer.callbacks and .log_every_n_steps; the class does not
        # declare them, hence the attr-defined ignores.
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, DifferentialPrivacy):  # in whatever order they were given
                callback.make_private(trainer, pl_module)
        self._optimizers = probe.find_dp_optimizers(trainer)
        accountant = probe.find_accountant(trainer, pl_module, self.accountant)
        if not any(getattr(opt, "step_hook", None) for opt in self._optimizers):
            logger.warning("No DPOptimizer has an accountant hook attached: Opacus will account "
                           "no steps and epsilon stays 0. Use PrivacyEngine.make_private.")
        self.accounting = make_accounting(accountant, self.delta)
        self.accounting.listener = self._on_epsilon
        self._risk = RiskBound(self.accounting, self.delta)
        self._mia = next((cb for cb in trainer.callbacks  # type: ignore[attr-defined]
                          if isinstance(cb, MembershipInferenceProbe)), None)
        self._attacks = [cb for cb in trainer.callbacks  # type: ignore[attr-defined]
                         if isinstance(cb, (MembershipInferenceProbe, OneRunAudit))]
        self.model_name = self.model_name or check_label("model_name", type(pl_module).__name__)
        self._accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        planned = trainer.estimated_stepping_batches
        self._planned_steps = int(planned) if math.isfinite(planned) else None
        self._last_step = trainer.global_step
        self._samples = 0
        self._t_last = None
        self._logged_step = None
        self._exhausted = False
        self._cleared = None
        self._skipped = []
        if self._exporting and self.mechanism:
            self._probe = probe.MechanismProbe(trainer, pl_module, self._optimizers[0],
                                               overhead_every=self.overhead_every,
                                               statistics=self._statistics())
        if self._started:
            self._publisher = Publisher(self.exporters, max_pending=self.max_pending)
            info = RunInfo(
                session_id=self.session_id, model_name=self.model_name,
                accountant=self.accounting.mechanism, rank=trainer.global_rank,
                world_size=trainer.world_size, delta=self.delta,
                target_epsilon=self.target_epsilon, exporters=(*self.exporters, self._publisher))
            for exporter in self.exporters:
                exporter.open(info)
        if self._exporting:
            urls = [u for u in (getattr(e, "url", None) for e in self.exporters) if u]
            logger.info("Privacy monitor: session %s, %s accountant, delta=%g%s", self.session_id,
                        self.accounting.mechanism, self.delta,
                        f", metrics at {', '.join(urls)}" if urls else "")

    def _statistics(self) -> str | None:
        """Which per-sample statistics the probe may release; logs once why none, if so."""
        if self.raw_private_statistics:
            return "raw"
        if isinstance(self._optimizers[0], probe.SplitNoise):  # its sigma covers the release
            return "dp"
        logger.info(
            "privacy_per_sample_grad_norm and privacy_clipped_fraction are off: computed from the "
            "private batch they need noise accounted in epsilon, which only the "
            "DifferentialPrivacy callback can add (DifferentialPrivacy(statistics_noise_"
            "multiplier=...)); an optimizer from make_private is accounted by its own hook. "
            "PrivacyMonitor(raw_private_statistics=True) publishes them unprotected.")
        return None

    def _start_session(self) -> None:
        """A fit starts: a new session unless the user named one (or a checkpoint's resumes)."""
        last = self.last_snapshot
        if self._session_id_given:
            if last is not None and last.session_steps is not None:
                self._session_carry = (last.session_steps, last.session_epsilon or 0.0,
                                       last.session_accounting_errors or 0)
        elif self._fitted:
            self.session_id = uuid.uuid4().hex[:12]
            self._session_carry = (0, 0.0, 0)
        self._fitted = True

    def _session_baseline(self) -> None:
        """Offsets so that the snapshot's session values count what this session accounted."""
        accounting = self.accounting
        assert accounting is not None
        accountant = accounting.accountant
        # Exact, once per fit (PRV: milliseconds); 0 for an accountant that accounted nothing.
        epsilon = float(accountant.get_epsilon(self.delta)) if accountant.history else 0.0
        accounted = sum(int(n) for _, _, n in accountant.history)
        steps, eps, errors = self._session_carry
        self._session_offsets = (accounted - steps, epsilon - eps, -errors)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores callback state before or after on_fit_start depending on the
        # strategy; by on_train_start it has always happened, and no step has run yet.
        resumed = self._loaded_state
        self._restore_privacy(trainer)
        self._session_baseline()
        self._agree_across_ranks(trainer)
        self._last_step = trainer.global_step
        self._check_plan(trainer)
        self._audit_fit_start(trainer, resumed)

    def _agree_across_ranks(self, trainer: pl.Trainer) -> None:
        """Check once, before any step, that every rank guards the same budget.

        The budget guard then decides on each rank from identical inputs (the same settings and,
        under Opacus' distributed optimizer, the same accountant history, sigma and q), so every
        rank stops on the same step without a collective -- and without the host-device
        synchronisation a per-step all-reduce would cost on GPUs.
        """
        if trainer.world_size <= 1 or self.accounting is None:
            return
        mine = (self.target_epsilon, self.delta, self.stop_at_target, self.accounting.steps,
                len(self.accounting.accountant.history))
        first = trainer.strategy.broadcast(mine, src=0)
        if not trainer.strategy.reduce_boolean_decision(mine == first, all=True):
            raise ValueError(
                f"PrivacyMonitor differs across ranks: rank {trainer.global_rank} has "
                f"(target_epsilon, delta, stop_at_target, steps accounted, history segments) = "
                f"{mine}, rank 0 has {first} (or another rank differs). Give every rank the same "
                "target_epsilon, delta and stop_at_target, and the same privacy state to resume "
                "from.")

    def _audit_fit_start(self, trainer: pl.Trainer, resumed: dict[str, Any] | None) -> None:
        oversight = self._oversight
        if not oversight.active or not self._exporting or self.accounting is None:
            return
        size, poisson = probe.training_data_facts(trainer)
        secure = probe.secure_mode(self._optimizers)
        violations = [] if self.policy is None else check_start(
            self.policy, delta=self.delta, dataset_size=size, poisson=poisson,
            secure_mode=secure, target_epsilon=self.target_epsilon)
        oversight.fit_start({
            "session_id": self.session_id, "model_name": self.model_name,
            "accountant": self.accounting.mechanism, "delta": self.delta,
            "target_epsilon": self.target_epsilon, "dataset_size": size,
            "poisson_sampling": poisson, "dp": probe.dp_config(self._optimizers),
            "planned_steps": self._planned_steps, "world_size": trainer.world_size,
            "global_step": trainer.global_step, "steps_accounted": self.accounting.steps,
        }, violations)
        if resumed is not None:
            self.audit_event("resume", global_step=trainer.global_step,
                             steps_accounted=self.accounting.steps,
                             session_id=resumed.get("session_id"))

    def audit_event(self, event: str, **data: Any) -> None:
        """Append ``event`` to the audit trail (if any) from the exporting rank; never raises.

        For rare events only (the budget guard stopping training, say): it writes to disk now.
        """
        if self._exporting:
            self._oversight.event(event, session_id=self.session_id, **data)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_last = None
        self._samples = 0
        self._batches = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._t_last is None:
            self._t_last = time.perf_counter()
        if self._probe is not None:
            self._probe.batch_start(batch, batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_last = None  # validation time is not training throughput

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._drop_skipped()
        # Under Poisson sampling the real batch size is private: count the expected one, unless
        # raw statistics were asked for.
        self._batches += 1
        if self.raw_private_statistics:
            self._samples += _batch_len(batch)
        step = trainer.global_step
        if step == self._last_step or self.accounting is None:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step = step
        stats = self._probe.step_end() if self._probe is not None else None
        snapshot = self._snapshot(trainer, step, stats)
        self.last_snapshot = snapshot
        if self._publisher is not None:
            self._publisher.publish(snapshot if self._exporting else _rank_only(snapshot))
        every = max(1, trainer.log_every_n_steps)  # type: ignore[attr-defined]  # see on_fit_start
        if self.progress_bar and snapshot.epsilon is not None and (
                batch_idx == 0 or step % every == 0):
            # Namespaced: a module's own self.log("epsilon", ...) keeps its key.
            pl_module.log("privacy/epsilon", torch.tensor(snapshot.epsilon), prog_bar=True,
                          logger=False, on_step=True, on_epoch=False)
        if trainer.loggers and self._exporting and step % every == 0:
            self._log_to_loggers(trainer, snapshot)

    def _snapshot(self, trainer: pl.Trainer, step: int,
                  stats: DeviceStats | None = None) -> PrivacySnapshot:
        opt = self._optimizers[0]
        # Batches in this step's window: fewer than accumulate_grad_batches at an epoch's end.
        batches, expected = self._batches, opt.expected_batch_size
        samples = self._samples if self.raw_private_statistics else (
            expected * batches if expected else None)
        now = time.perf_counter()
        throughput = seconds = None
        if self._t_last is not None and now > self._t_last:
            seconds = now - self._t_last
            throughput = None if samples is None else samples / seconds
        self._t_last, self._samples, self._batches = now, 0, 0

        accounting = self.accounting
        assert accounting is not None
        t_accounting = time.perf_counter()
        accounting.update()
        if stats is not None:
            stats.accounting_seconds = time.perf_counter() - t_accounting
        sigma = float(opt.noise_multiplier)
        clip = float(opt.max_grad_norm)
        history = accounting.accountant.history
        q = float(history[-1][1]) if history else None
        # The noise on the update the model receives: the gradient's share of sigma, once over
        # the global expected batch of every batch accumulated into the step.
        noise_std = probe.gradient_noise_multiplier(opt) * clip
        size = probe.global_expected_batch_size(opt)
        if getattr(opt, "loss_reduction", "mean") == "mean" and size:
            noise_std /= size * max(1, batches)

        latest = accounting.latest  # one record: value, step and kind belong together
        eps = None if latest is None else latest.value
        target = self.target_epsilon
        forecast = exhaustion = remaining = exhausted = None
        if q is not None:
            if self._planned_steps is not None:
                forecast = accounting.forecast(max(0, self._planned_steps - step), sigma, q)
            if target is not None:
                exhaustion = accounting.exhaustion_steps(target, sigma, q)
        if target is not None:
            if eps is not None:
                remaining = target - eps
            exhausted = int(self._guard(trainer, step, exhaustion == 0, sigma, q))
        oversight = self._oversight
        if eps is not None and eps >= oversight.watch and self._exporting:
            oversight.crossed(eps, step)
        if accounting.errors and accounting.errors != oversight.errors_seen and self._exporting:
            oversight.accounting_errors(accounting.errors, step)
        assert self._risk is not None
        mia = self._mia
        scores, audit_bound = attack_results(self._attacks)
        return PrivacySnapshot(
            step=step, timestamp_ns=time.time_ns(), accountant=accounting.mechanism,
            delta=self.delta, epsilon=eps, epsilon_step=0 if latest is None else latest.step,
            epsilon_exact=None if latest is None else int(latest.exact), steps=accounting.steps,
            noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q,
            noise_std=noise_std, throughput=throughput, step_seconds=seconds,
            accounting_errors=accounting.errors,
            target_epsilon=target, budget_remaining=remaining, epsilon_forecast=forecast,
            budget_exhaustion_steps=exhaustion, budget_exhausted=exhausted, rank=self._rank,
            membership_inference_risk=self._risk.score(eps, sigma, q),
            membership_inference_auc=None if mia is None else mia.auc,
            membership_inference_advantage=None if mia is None else mia.advantage,
            attack_scores=scores, audit_epsilon_lower_bound=audit_bound,
            compliance_violations=oversight.violations, device_stats=stats,
            session_steps_offset=self._session_offsets[0],
            session_epsilon_offset=self._session_offsets[1],
            session_errors_offset=self._session_offsets[2])

    # -- budget guard -------------------------------------------------------------------------

    def _guard(self, trainer: pl.Trainer, step: int, would_pass: bool, sigma: float,
               q: float | None) -> bool:
        """After a step: stop now if one more step at (sigma, q) would pass the target."""
        if not self.stop_at_target:
            self._exhausted = self._exhausted or would_pass
            return self._exhausted
        if self._exhausted:
            return True
        # No collective: every rank holds the same history, sigma, q and settings (checked once
        # in _agree_across_ranks), so every rank reaches the same decision on the same step.
        if would_pass:
            self._stop(trainer, step, sigma, q, skipped=False)
        elif q is not None:
            self._cleared = self._cleared_key(sigma, q)
        return self._exhausted

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        # The check after the last step used the sigma and q of that moment; a noise scheduler,
        # a partial accumulation at the end of an epoch or a fit that must go on (min_epochs)
        # can change what this step accounts. Re-check the exact step Opacus is about to account
        # (microseconds, and only when sigma or q differ) and skip it if it would pass.
        target = self.target_epsilon
        if (target is None or not self.stop_at_target or self.accounting is None
                or optimizer not in self._optimizers):
            return
        sigma = float(optimizer.noise_multiplier)
        q = probe.accounted_sample_rate(optimizer)
        if q is None:
            # What this step will be charged cannot be known, so it cannot be checked.
            self._skip(trainer, optimizer, sigma, None)
            return
        key = self._cleared_key(sigma, q)
        if key == self._cleared:
            return
        if self.accounting.epsilon_after(1, sigma, q) <= target:
            self._cleared = key
            return
        self._skip(trainer, optimizer, sigma, q)

    def _cleared_key(self, sigma: float, q: float) -> tuple[Any, ...]:
        """What a cleared check holds for: the step's (sigma, q) after exactly this history."""
        assert self.accounting is not None
        history = self.accounting.accountant.history
        return sigma, q, len(history), tuple(history[-1]) if history else None

    def _skip(self, trainer: pl.Trainer, optimizer: Any, sigma: float, q: float | None) -> None:
        probe.skip_next_step(optimizer)
        if optimizer not in self._skipped:
            self._skipped.append(optimizer)
        self._stop(trainer, trainer.global_step, sigma, q, skipped=True)

    def _drop_skipped(self) -> None:
        # Right after the skipped step, before any later batch accumulates: Opacus keeps the
        # skipped batch's clipped sum for the next step, which would release it uncounted.
        skipped, self._skipped = self._skipped, []
        for optimizer in skipped:
            probe.discard_skipped_step(optimizer)

    def _stop(self, trainer: pl.Trainer, step: int, sigma: float, q: float | None,
              *, skipped: bool) -> None:
        already = self._exhausted
        trainer.should_stop = True
        self._exhausted = True
        self._cleared = None
        if already or not trainer.is_global_zero:
            return
        accounting = self.accounting
        assert accounting is not None
        eps = accounting.epsilon_after(0, sigma, q) if q is not None else accounting.epsilon
        nxt = accounting.epsilon_after(1, sigma, q) if q is not None else math.inf
        bound = "" if accounting.mechanism == "rdp" else " (RDP bound)"
        if q is None:
            logger.warning(
                "Privacy budget guard: stopping training at trainer step %d (%d steps accounted), "
                "the step about to run was skipped: the sample rate it would be accounted at "
                "cannot be read from the DP optimizer's accountant hook, so it cannot be checked "
                "against target_epsilon=%g. %s", step, accounting.steps, self.target_epsilon,
                probe.HOW_TO_WIRE)
            self.audit_event("budget_guard_stop", step=step, epsilon=eps, next_epsilon=nxt,
                             target_epsilon=self.target_epsilon, skipped=skipped)
            return
        logger.warning(
            "Privacy budget guard: stopping training at trainer step %d (%d steps accounted)%s: "
            "epsilon=%.4g%s at delta=%g; one more step (noise_multiplier=%g, sample_rate=%g) "
            "would reach %.4g, past target_epsilon=%g.", step, accounting.steps,
            ", the step about to run was skipped" if skipped else "", eps, bound, self.delta,
            sigma, q if q is not None else float("nan"), nxt, self.target_epsilon)
        self.audit_event("budget_guard_stop", step=step, epsilon=eps, next_epsilon=nxt,
                         target_epsilon=self.target_epsilon, skipped=skipped)

    def _check_plan(self, trainer: pl.Trainer) -> None:
        """Warn once if the planned training would pass the target."""
        target, accounting = self.target_epsilon, self.accounting
        if target is None or accounting is None or self._planned_steps is None:
            return
        opt = self._optimizers[0]
        history = accounting.accountant.history
        q = float(history[-1][1]) if history else probe.accounted_sample_rate(
            opt, self._accumulate)
        if q is None:
            return
        sigma = float(opt.noise_multiplier)
        left = max(0, self._planned_steps - trainer.global_step)
        forecast = accounting.epsilon_after(left, sigma, q)
        if forecast <= target or not trainer.is_global_zero:
            return
        fit = accounting.steps_until(target, sigma, q)
        then = ("the budget guard will stop training there" if self.stop_at_target
                else "training will go on past the target (stop_at_target=False)")
        logger.warning(
            "The planned training (%d more optimizer steps at noise_multiplier=%g, "
            "sample_rate=%g) would reach epsilon=%.4g at delta=%g, past target_epsilon=%g: only "
            "%s more steps fit in the budget; %s.", left, sigma, q, forecast, self.delta, target,
            fit, then)

    def _log_to_loggers(self, trainer: pl.Trainer, snapshot: PrivacySnapshot) -> None:
        metrics = {"privacy/epsilon": snapshot.epsilon,
                   "privacy/noise_multiplier": snapshot.noise_multiplier}
        if snapshot.budget_remaining is not None:
            metrics["privacy/budget_remaining"] = snapshot.budget_remaining
        present = {k: v for k, v in metrics.items() if v is not None}
        for lg in trainer.loggers:
            lg.log_metrics(present, step=snapshot.step)
        self._logged_step = snapshot.step

    def _log_final(self, trainer: pl.Trainer) -> None:
        """The values after the last step, unless the log cadence already logged them."""
        snap, accounting = self.last_snapshot, self.accounting
        if (not trainer.loggers or not self._exporting or snap is None or accounting is None
                or self._logged_step == snap.step):
            return
        accounting.settle(timeout=10.0)
        latest = accounting.latest
        if latest is None or not latest.exact or latest.step != accounting.steps:
            return  # no exact epsilon for the last step: log nothing rather than a bound
        eps = latest.value
        target = self.target_epsilon
        remaining = None if target is None or eps is None else target - eps
        self._log_to_loggers(trainer, dataclasses.replace(snap, epsilon=eps,
                                                          budget_remaining=remaining))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every snapshot so far reached the exporters; False on timeout."""
        return self._publisher.flush(timeout) if self._publisher is not None else True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training is over: what a module or callback reads from here on (its own epsilon, a
        # scrape) matches the accountant's exact value, not a background value for an earlier
        # step.
        if (self._publisher is not None and self._exporting and self.accounting is not None
                and self.last_snapshot is not None):
            self.accounting.settle(timeout=10.0)
            self._publish_final()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The exact final epsilon goes out before fit returns: to the exporters (and from there
        # to /metrics, served until teardown, and the last InfluxDB point), last_snapshot, the
        # audit trail and the log line.
        self._publish_final()
        self._log_final(trainer)
        snap = self.last_snapshot
        if snap is not None and self._exporting and self._oversight.active:
            accounting = self.accounting
            self.audit_event(
                "fit_end", epsilon=snap.epsilon, epsilon_exact=bool(snap.epsilon_exact),
                delta=snap.delta, steps_accounted=accounting.steps if accounting else snap.steps,
                global_step=trainer.global_step, accountant=snap.accountant,
                accounting_errors=accounting.errors if accounting else snap.accounting_errors,
                membership_inference_risk=snap.membership_inference_risk,
                audit_epsilon_lower_bound=attack_results(self._attacks)[1],
                violations=[list(v) for v in self._oversight.violations])
        if snap is not None and self._exporting:
            logger.info("Privacy spent: epsilon=%.4g at delta=%g after %d steps (%s%s)",
                        snap.epsilon if snap.epsilon is not None else float("nan"), snap.delta,
                        snap.steps, snap.accountant,
                        "" if snap.epsilon_exact else ", an upper bound: the exact value was not "
                        "computed in time")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        # Lightning skips the teardown hook when a fit raises: release threads and ports here.
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._drop_skipped()
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if self._publisher is not None:
            self._publish_final()
            self._publisher.close(timeout=10.0)
            self._publisher = None
        if self._started:
            for exporter in self.exporters:
                try:
                    exporter.close(timeout=10.0)
                except Exception:
                    logger.exception("Closing %s failed", exporter.name)
            self._started = False
        if self.accounting is not None:
            self.accounting.close()

    def refresh(self) -> None:
        """Export now what arrived since the last step (an attack's or an audit's result).

        For callbacks that measure outside the training step (:class:`OneRunAudit` at the end
        of training); a no-op before the first step and on ranks that do not export.
        """
        if (self._publisher is not None and self._exporting and self.accounting is not None
                and self.last_snapshot is not None):
            self._publish_final()

    def _on_epsilon(self, value: Epsilon) -> None:
        """Worker thread: a better epsilon for the last step goes out now, not with the next one."""
        snap, publisher = self.last_snapshot, self._publisher
        if snap is None or publisher is None or not self._exporting or snap.steps != value.step:
            return  # the training thread's next snapshot carries it
        publisher.publish(self._with_epsilon(snap, value))

    def _with_epsilon(self, snap: PrivacySnapshot, value: Epsilon) -> PrivacySnapshot:
        """``snap`` with another epsilon for the same step (device statistics already exported)."""
        target = self.target_epsilon
        return dataclasses.replace(
            snap, epsilon=value.value, epsilon_step=value.step, epsilon_exact=int(value.exact),
            budget_remaining=None if target is None else target - value.value, device_stats=None)

    def _publish_final(self, timeout: float = 10.0) -> None:
        """Export the exact final epsilon, and what arrived after the last step (an attack AUC)."""
        accounting, last = self.accounting, self.last_snapshot
        if accounting is None or last is None or not self._exporting:
            return
        accounting.settle(timeout=timeout)
        latest = accounting.latest
        mia = self._mia
        auc, advantage = (None, None) if mia is None else (mia.auc, mia.advantage)
        scores, audit_bound = attack_results(self._attacks)
        if latest is None or latest.step < (last.epsilon_step or 0):
            latest = None  # never replace a value with one for fewer steps
        if ((latest is None or (latest.value, latest.step, int(latest.exact))
             == (last.epsilon, last.epsilon_step, last.epsilon_exact))
                and accounting.errors == last.accounting_errors
                and auc == last.membership_inference_auc
                and advantage == last.membership_inference_advantage
                and scores == last.attack_scores
                and audit_bound == last.audit_epsilon_lower_bound):
            # Nothing new since the last step (a validation may have run after it); what was
            # published may still be queued.
            if self._publisher is not None:
                self._publisher.flush(timeout)
            return
        final = last if latest is None else self._with_epsilon(last, latest)
        final = dataclasses.replace(final, accounting_errors=accounting.errors, throughput=None,
                                    step_seconds=None, membership_inference_auc=auc,
                                    membership_inference_advantage=advantage,
                                    attack_scores=scores, audit_epsilon_lower_bound=audit_bound,
                                    device_stats=None)
        self.last_snapshot = final
        if self._publisher is not None:
            self._publisher.publish(final)
            self._publisher.flush(timeout)

    # -- checkpoint state -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        accountant = self.accounting.accountant if self.accounting is not None else None
        last = self.last_snapshot
        return {
            "session_id": self.session_id,
            # What the session counted up to here, so that a resumed session counts on.
            "session_steps": last.session_steps if last is not None else None,
            "session_epsilon": last.session_epsilon if last is not None else None,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": accountant.mechanism() if accountant is not None else None,
            "history": [list(seg) for seg in accountant.history] if accountant is not None else [],
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # The state_key comes from the settings; a run resumed with other settings (a new
        # target, another exporter, no session name) must still find the privacy spent. Lightning
        # loads our own key after this hook; with no such key, a checkpoint holding a single
        # monitor's state is ours.
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or self._legacy_state_key in states:
            return
        mine = [state for key, state in states.items()
                if isinstance(key, str) and key.startswith(type(self).__qualname__)]
        if len(mine) == 1:
            self.load_state_dict(mine[0])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict)
        saved_id = state_dict.get("session_id")
        if not self._session_id_given and isinstance(saved_id, str) and saved_id:
            self.session_id = saved_id  # one series across restarts
        if saved_id == self.session_id and isinstance(state_dict.get("session_steps"), int):
            self._session_carry = (state_dict["session_steps"],
                                   float(state_dict.get("session_epsilon") or 0.0), 0)

    def _restore_privacy(self, trainer: pl.Trainer) -> None:
        """Put the checkpoint's accountant history back into the Opacus accountant."""
        state, self._loaded_state = self._loaded_state, None
        accounting = self.accounting
        if accounting is None or (state is None and trainer.ckpt_path is None):
            return
        accountant = accounting.accountant
        current = [tuple(seg) for seg in accountant.history]
        opt_in = "pass PrivacyMonitor(..., allow_privacy_reset=True) to accept it"
        if state is None:
            if current:
                logger.info("Resuming with the accountant's own history (%d steps), as restored "
                            "by PrivacyEngine.load_checkpoint", sum(s for _, _, s in current))
                return
            if not self.allow_privacy_reset:
                raise RuntimeError(
                    f"The checkpoint {trainer.ckpt_path} holds no privacy accounting state, so "
                    "epsilon would restart at 0 although the model may already have been trained "
                    "on private data. Resume from a checkpoint saved with PrivacyMonitor, restore "
                    f"the accountant with PrivacyEngine.load_checkpoint, or {opt_in} "
                    "(epsilon then counts only the steps from here).")
            logger.warning("Resuming from %s without privacy state: epsilon restarts at 0 "
                           "(allow_privacy_reset=True)", trainer.ckpt_path)
            return
        saved = [(float(sigma), float(q), int(steps)) for sigma, q, steps in state["history"]]
        problems = []
        if state.get("delta") != self.delta:
            problems.append(f"delta {state.get('delta')!r} in the checkpoint, {self.delta!r} now")
        mechanism = state.get("accountant")
        if mechanism is not None and mechanism != accounting.mechanism:
            problems.append(f"accountant {mechanism!r} in the checkpoint, "
                            f"{accounting.mechanism!r} now")
        if current and current != saved:
            held, saved_steps = sum(s for _, _, s in current), sum(s for _, _, s in saved)
            problems.append(f"the accountant already holds {held} "
                            f"steps that differ from the checkpoint's {saved_steps}")
        if problems and not self.allow_privacy_reset:
            raise RuntimeError(
                f"Resuming from {trainer.ckpt_path}: the privacy state does not match "
                f"({'; '.join(problems)}). Resume with the same delta and accountant, or "
                f"{opt_in} (the saved history is carried over).")
        if problems:
            logger.warning("Resuming despite %s (allow_privacy_reset=True)", "; ".join(problems))
        if current and current != saved:
            return  # opted in: keep what the accountant was given explicitly
        target = state.get("target_epsilon")
        if target != self.target_epsilon and trainer.is_global_zero:
            logger.warning("target_epsilon was %r in the checkpoint and is %r now", target,
                           self.target_epsilon)
        accountant.history = saved
        accounting.update()
        if trainer.is_global_zero:
            logger.info("Restored privacy accounting: %d steps from the checkpoint, epsilon "
                        "continues from there", sum(s for _, _, s in saved))
