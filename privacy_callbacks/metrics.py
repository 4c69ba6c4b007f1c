"""PrivacyMetrics: privacy metrics from an Opacus run, every optimizer step, to the exporters."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
import warnings
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from . import probe
from .accounting import Epsilon
from .exporters.base import Exporter, RunInfo
from .guard import check_delta, check_target
from .ledger import _NOT_CHECKED, PrivacyLedger, step_progress
from .pii import check_label, protect_loggers
from .publisher import Publisher
from .security import RiskBound, attack_results
from .snapshot import PrivacySnapshot

logger = logging.getLogger(__name__)

__all__ = ["PrivacyMetrics"]

#: Seconds between two snapshots with the forecast, steps left and risk bound computed, at most
#: (they are computed for the newest step queued whenever the publisher catches up).
_ASSESS_EVERY = 0.5


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


def check_exporters(exporters: Sequence[Exporter]) -> tuple[Exporter, ...]:
    found = tuple(exporters)
    for exporter in found:
        if not isinstance(exporter, Exporter):
            raise ValueError(f"Unexpected exporter {exporter!r}: use PrometheusExporter, "
                             "InfluxDBExporter or a subclass of privacy_callbacks.Exporter")
    return found


def load_saved_with_other_settings(callback: Any, checkpoint: dict[str, Any]) -> None:
    """Load ``callback``'s state saved under another ``state_key`` (``on_load_checkpoint``).

    The state_key comes from the settings; a run resumed with other settings (a new target,
    another exporter, no session name) must still find its session. Lightning loads the
    callback's own key after this hook; with no such key, a checkpoint holding a single state
    of the callback's class is its.
    """
    states = checkpoint.get("callbacks") or {}
    if callback.state_key in states or callback._legacy_state_key in states:
        return
    mine = [state for key, state in states.items()
            if isinstance(key, str) and key.startswith(type(callback).__qualname__)]
    if len(mine) == 1:
        callback.load_state_dict(mine[0])


class PrivacyMetrics(Callback):
    """Publishes the privacy spent by an Opacus DP-SGD run after every optimizer step.

    After each optimizer step the training thread only takes note of the step: the accountant
    history's length and last segment (a view of it as it is now), the DP optimizer's sigma and
    C, the time and the device statistics' handle -- host-side values only, no device
    synchronisation, no epsilon. The publisher thread then computes, for that exact view,
    epsilon from the trainer's shared :class:`~privacy_callbacks.ledger.PrivacyLedger` (for PRV
    and GDP a proven upper bound labelled as such until the background computation has the
    exact value, which is published when it arrives), the budget metrics and the
    :class:`PrivacySnapshot`, and feeds the exporters. Epsilon also goes to the progress bar and
    the trainer's loggers at the trainer's ``log_every_n_steps`` cadence (computed then, on the
    training thread, for the history then). Before the fit returns the exact final epsilon is
    published, logged and kept in :attr:`last_snapshot`.

    The accountant history is saved in Lightning checkpoints and put back into the Opacus
    accountant on ``trainer.fit(ckpt_path=...)``, so epsilon continues where it stopped.

    Args: see :class:`~privacy_callbacks.PrivacyMonitor` (the same names mean the same).
        ``target_epsilon`` here only feeds the budget metrics; a
        :class:`~privacy_callbacks.BudgetGuard` stops training.
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
        allow_privacy_reset: bool = False,
        mechanism: bool = True,
        overhead_every: int | None = 1000,
        raw_private_statistics: bool = False,
    ) -> None:
        self.delta = check_delta(delta)
        self.target_epsilon = check_target(target_epsilon)
        self.exporters = check_exporters(exporters)
        protect_loggers()
        if session_id is not None:
            session_id = check_label("session_id", session_id)
        if model_name is not None:
            model_name = check_label("model_name", model_name)
        if accountant is not None:
            probe.find_accountant(None, None, accountant)  # raises, naming the value
        for name, value in (("allow_privacy_reset", allow_privacy_reset),
                            ("raw_private_statistics", raw_private_statistics)):
            if not isinstance(value, bool):
                raise ValueError(f"Unexpected value for {name}: {value!r}; use True or False")
        if overhead_every is not None and (isinstance(overhead_every, bool) or not isinstance(
                overhead_every, int) or overhead_every < 1):
            raise ValueError(f"Unexpected value for overhead_every: {overhead_every!r}; use a "
                             "number of optimizer steps >= 1, or None for no overhead ratios")
        self.accountant = accountant
        self.session_id = session_id or uuid.uuid4().hex[:12]
        self.model_name = model_name
        self.progress_bar = progress_bar
        self.max_pending = max_pending
        self.allow_privacy_reset = allow_privacy_reset
        self.mechanism = mechanism
        self.overhead_every = overhead_every
        self.raw_private_statistics = raw_private_statistics
        if raw_private_statistics:
            warnings.warn(
                "raw_private_statistics=True publishes per-sample gradient norms, the exact "
                "clipped fraction and real batch sizes of the private data: they fall outside "
                "epsilon (a record with an unusual gradient is visible in them). Use it only on "
                "data that needs no protection.", UserWarning, stacklevel=2)
        self._session_id_given = session_id is not None
        self._fitted = False
        # What the session's earlier fits counted (steps, epsilon, accounting errors), and the
        # offsets that turn this fit's accountant values into the session's (PrivacySnapshot).
        self._session_carry: tuple[int, float, int] = (0, 0.0, 0)
        self._session_offsets: tuple[int, float, int] = (0, 0.0, 0)
        # Lightning reads state_key around every hook call: computed once.
        exporter_names = [type(e).__name__ if type(e).__repr__ is object.__repr__ else repr(e)
                          for e in self.exporters]
        self._state_key = self._generate_state_key(
            delta=self.delta, target_epsilon=self.target_epsilon,
            session_id=self.session_id if self._session_id_given else None,
            exporters=exporter_names)

        self.ledger: PrivacyLedger | None = None
        self._last_snapshot: PrivacySnapshot | None = None
        self._publisher: Publisher | None = None
        self._probe: probe.MechanismProbe | None = None
        self._risk: RiskBound | None = None
        self._mia: Any = None
        self._attacks: list[Any] = []
        self._optimizers: list[Any] = []
        self._planned_steps: int | None = None
        self._rank = 0
        self._exporting = False
        self._started = False
        self._last_step = -1
        self._progress: Any = None  # step_progress(trainer), from on_train_start
        self._samples = 0
        self._batches = 0
        self._t_last: float | None = None
        self._exhausted = False
        self._assessed_at = -math.inf
        self._logged_step: int | None = None
        self._attached = False
        self._log_every = 50
        self._log_loggers = False

    @property
    def state_key(self) -> str:
        return self._state_key

    @property
    def last_snapshot(self) -> PrivacySnapshot | None:
        """The snapshot of the last optimizer step (after the fit: with the exact final epsilon).

        Snapshots are built on the publisher thread; read from another thread during a fit,
        this first waits (bounded) until every step so far is built.
        """
        publisher = self._publisher
        if publisher is not None and not publisher.on_thread():
            publisher.flush(timeout=10.0)
        return self._last_snapshot

    @last_snapshot.setter
    def last_snapshot(self, snapshot: PrivacySnapshot | None) -> None:
        self._last_snapshot = snapshot

    @property
    def accounting(self) -> Any:
        """The shared :class:`~privacy_callbacks.accounting.Accounting`; ``None`` before a fit."""
        return None if self.ledger is None else self.ledger.accounting

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
        from .privacy_audit import OneRunAudit
        from .security import MembershipInferenceProbe

        ledger = self.ledger = PrivacyLedger.attach(trainer, pl_module, self.delta,
                                                    self.accountant)
        ledger.reporter = self
        self._attached = True
        accounting = ledger.accounting
        accounting.listener = self._on_epsilon
        self._optimizers = ledger.optimizers
        self._risk = RiskBound(accounting, self.delta)
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning
        self._mia = next((cb for cb in callbacks if isinstance(cb, MembershipInferenceProbe)),
                         None)
        self._attacks = [cb for cb in callbacks
                         if isinstance(cb, (MembershipInferenceProbe, OneRunAudit))]
        self.model_name = self.model_name or check_label("model_name", type(pl_module).__name__)
        planned = trainer.estimated_stepping_batches
        self._planned_steps = int(planned) if math.isfinite(planned) else None
        # Fixed for the fit (Lightning's connectors set them; the class does not declare them).
        self._log_every = max(1, trainer.log_every_n_steps)  # type: ignore[attr-defined]
        self._log_loggers = bool(trainer.loggers) and self._exporting
        self._last_step = trainer.global_step
        self._samples = 0
        self._t_last = None
        self._logged_step = None
        self._exhausted = False
        if self._exporting and self.mechanism:
            self._probe = probe.MechanismProbe(trainer, pl_module, self._optimizers[0],
                                               overhead_every=self.overhead_every,
                                               statistics=self._statistics())
        if self._started:
            self._publisher = Publisher(self.exporters, max_pending=self.max_pending)
            info = RunInfo(
                session_id=self.session_id, model_name=self.model_name,
                accountant=accounting.mechanism, rank=trainer.global_rank,
                world_size=trainer.world_size, delta=self.delta,
                target_epsilon=self.target_epsilon, exporters=(*self.exporters, self._publisher))
            for exporter in self.exporters:
                exporter.open(info)
        if self._exporting:
            urls = [u for u in (getattr(e, "url", None) for e in self.exporters) if u]
            logger.info("Privacy monitor: session %s, %s accountant, delta=%g%s", self.session_id,
                        accounting.mechanism, self.delta,
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
            "raw_private_statistics=True publishes them unprotected.")
        return None

    def _start_session(self) -> None:
        """A fit starts: a new session unless the user named one (or a checkpoint's resumes)."""
        last = self.last_snapshot
        if self._session_id_given:
            if last is not None and last.session_steps is not None:
                self._session_carry = (last.session_steps, self._exact_session_epsilon() or 0.0,
                                       last.session_accounting_errors or 0)
        elif self._fitted:
            self.session_id = uuid.uuid4().hex[:12]
            self._session_carry = (0, 0.0, 0)
        self._fitted = True

    def _session_baseline(self) -> None:
        """Offsets so that the snapshot's session values count what this session accounted."""
        assert self.ledger is not None
        accounting = self.ledger.accounting
        accountant = accounting.accountant
        accounted = sum(int(n) for _, _, n in accountant.history)
        # Exact, once per fit; 0 for an accountant that accounted nothing. RDP's own value
        # (bit-identical to Opacus, from cached vectors) when it is exact, else Opacus'.
        epsilon = 0.0
        if accountant.history:
            latest = accounting.update()
            epsilon = (latest.value if latest is not None and latest.exact
                       and latest.step == accounted
                       else float(accountant.get_epsilon(self.delta)))
        steps, eps, errors = self._session_carry
        self._session_offsets = (accounted - steps, epsilon - eps, -errors)

    @property
    def _legacy_state_key(self) -> Any:
        return type(self).__qualname__  # the key of checkpoints saved before state_key existed

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        PrivacyLedger.note_checkpoint(trainer, checkpoint)
        load_saved_with_other_settings(self, checkpoint)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores callback state before or after on_fit_start depending on the
        # strategy; by on_train_start it has always happened, and no step has run yet.
        assert self.ledger is not None
        self.ledger.restore(trainer, self.allow_privacy_reset, self.target_epsilon)
        self._session_baseline()
        self._last_step = trainer.global_step
        self._progress = step_progress(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_last = None
        self._samples = 0
        self._batches = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._t_last is None:
            self._t_last = time.perf_counter()
        probe = self._probe
        if probe is not None and self._last_step >= probe.due:  # else a step not measured
            probe.batch_start(batch, batch_idx, self._last_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_last = None  # validation time is not training throughput

    # -- per step ----------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # The training thread only takes note of the step (a few attribute reads, one deque
        # append); epsilon, the budget metrics and the snapshot are computed on the publisher
        # thread, for the history exactly as it was at this step.
        # Under Poisson sampling the real batch size is private: count the expected one, unless
        # raw statistics were asked for.
        self._batches += 1
        if self.raw_private_statistics:
            self._samples += _batch_len(batch)
        progress, ledger = self._progress, self.ledger
        step = trainer.global_step if progress is None else progress.completed
        if step == self._last_step or ledger is None:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step = step
        probe = self._probe
        stats = probe.step_end(step) if probe is not None and probe.slot is not None else None
        now = time.perf_counter()
        t_last = self._t_last
        seconds = now - t_last if t_last is not None and now > t_last else None
        opt = self._optimizers[0]
        record = (step, time.time_ns(), ledger.accounting.view(), float(opt.noise_multiplier),
                  float(opt.max_grad_norm), self._batches, self._samples, seconds, stats,
                  ledger.exhausted, ledger.exhaustion)
        self._t_last, self._samples, self._batches = now, 0, 0
        if self._publisher is not None:
            self._publisher.publish_later(self._build, record)
        else:
            self._build(record)
        every = self._log_every
        log_bar = self.progress_bar and (batch_idx == 0 or step % every == 0)
        log_loggers = self._log_loggers and step % every == 0
        if not (log_bar or log_loggers):
            return
        # The cadence's own value, computed now for the history now (a release labelled with
        # this step must be this step's epsilon, not an earlier one's).
        latest = ledger.accounting.update()
        if latest is None:
            return
        if log_bar:
            # Namespaced: a module's own self.log("epsilon", ...) keeps its key.
            pl_module.log("privacy/epsilon", torch.tensor(latest.value), prog_bar=True,
                          logger=False, on_step=True, on_epoch=False)
        if log_loggers:
            self._log_to_loggers(trainer, step, latest.value, record[3])

    def _build(self, record: tuple, newest: bool = True) -> PrivacySnapshot:
        """The snapshot of one step, from what the training thread noted (publisher thread).

        The forecast, the steps left and the risk bound are computed for the ``newest`` record
        queued (and at least every :data:`_ASSESS_EVERY` seconds): only their latest value is
        read (a gauge), and under a noise schedule they cost hundreds of microseconds a step.
        The other records' snapshots hold ``None`` for them (``assessed`` is False).
        """
        (step, timestamp_ns, view, sigma, clip, batches, samples, seconds, stats,
         guard_exhausted, guard_exhaustion) = record
        opt = self._optimizers[0]
        expected = opt.expected_batch_size
        if not self.raw_private_statistics:
            samples = expected * batches if expected else None
        throughput = None if samples is None or seconds is None else samples / seconds
        ledger = self.ledger
        assert ledger is not None
        accounting = ledger.accounting
        history, _, last = view
        q = float(last[1]) if last is not None else None
        # The noise on the update the model receives: the gradient's share of sigma, once over
        # the global expected batch of every batch accumulated into the step.
        noise_std = probe.gradient_noise_multiplier(opt, sigma) * clip
        size = probe.global_expected_batch_size(opt)
        if getattr(opt, "loss_reduction", "mean") == "mean" and size:
            noise_std /= size * max(1, batches)

        latest = accounting.update(view)  # one record: value, step and kind belong together
        eps = None if latest is None else latest.value
        if latest is not None:
            ledger.observe(latest, step)
        target = self.target_epsilon
        forecast = exhaustion = remaining = exhausted = risk = None
        now = time.monotonic()
        assessed = newest or now - self._assessed_at >= _ASSESS_EVERY
        if guard_exhaustion is not _NOT_CHECKED:
            exhaustion = guard_exhaustion  # the guard's count for this very step: free
        if assessed:
            self._assessed_at = now
        if assessed and q is not None:
            if self._planned_steps is not None:
                forecast = accounting.forecast(max(0, self._planned_steps - step), sigma, q,
                                               view)
            if target is not None and exhaustion is None:
                exhaustion = accounting.exhaustion_steps(target, sigma, q)
        if target is not None:
            accounting.keep_bound_current()  # for a budget guard's next check
            if eps is not None:
                remaining = target - eps
            # A guard's decision, or (reporting only) one more step would pass the target.
            self._exhausted = self._exhausted or guard_exhausted or exhaustion == 0
            exhausted = int(self._exhausted)
        assert self._risk is not None
        if assessed:
            risk = self._risk.score(eps, sigma, q, view, None if latest is None else latest.step)
        mia = self._mia
        scores, audit_bound = attack_results(self._attacks)
        snapshot = PrivacySnapshot(
            step=step, timestamp_ns=timestamp_ns, accountant=accounting.mechanism,
            delta=self.delta, epsilon=eps, epsilon_step=0 if latest is None else latest.step,
            epsilon_exact=None if latest is None else int(latest.exact),
            steps=accounting.steps if latest is None else latest.step,
            noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q,
            noise_std=noise_std, throughput=throughput, step_seconds=seconds,
            accounting_errors=accounting.errors,
            target_epsilon=target, budget_remaining=remaining, epsilon_forecast=forecast,
            budget_exhaustion_steps=exhaustion, budget_exhausted=exhausted, rank=self._rank,
            membership_inference_risk=risk, assessed=assessed,
            membership_inference_auc=None if mia is None else mia.auc,
            membership_inference_advantage=None if mia is None else mia.advantage,
            attack_scores=scores, audit_epsilon_lower_bound=audit_bound,
            compliance_violations=ledger.violations, device_stats=stats,
            session_steps_offset=self._session_offsets[0],
            session_epsilon_offset=self._session_offsets[1],
            session_errors_offset=self._session_offsets[2])
        self.last_snapshot = snapshot
        return snapshot if self._exporting else _rank_only(snapshot)

    # -- loggers -----------------------------------------------------------------------------

    def _log_to_loggers(self, trainer: pl.Trainer, step: int, epsilon: float | None,
                        noise_multiplier: float | None) -> None:
        metrics = {"privacy/epsilon": epsilon, "privacy/noise_multiplier": noise_multiplier}
        target = self.target_epsilon
        if target is not None and epsilon is not None:
            metrics["privacy/budget_remaining"] = target - epsilon
        present = {k: v for k, v in metrics.items() if v is not None}
        for lg in trainer.loggers:
            lg.log_metrics(present, step=step)
        self._logged_step = step

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
        self._log_to_loggers(trainer, snap.step, latest.value, snap.noise_multiplier)

    # -- end of the fit ----------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every snapshot so far reached the exporters; False on timeout."""
        return self._publisher.flush(timeout) if self._publisher is not None else True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training is over: what a module or callback reads from here on (its own epsilon, a
        # scrape) matches the accountant's exact value, not a background value for an earlier
        # step.
        if self._publisher is not None and self._exporting and self.accounting is not None:
            self._publish_final()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The exact final epsilon goes out before fit returns: to the exporters (and from there
        # to /metrics, served until teardown, and the last InfluxDB point), last_snapshot and
        # the log line.
        self._publish_final()
        self._log_final(trainer)
        snap = self.last_snapshot
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
        self._progress = None
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
        if self._attached and self.ledger is not None:
            self._attached = False
            self.ledger.release()  # kept: accounting and last values stay readable after the fit

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
        snap, publisher = self._last_snapshot, self._publisher  # no flush: the worker's thread
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
        if self._publisher is not None:
            self._publisher.flush(timeout)  # every step noted so far is built: last_snapshot
        accounting, last = self.accounting, self.last_snapshot
        if accounting is None or last is None or not self._exporting:
            return
        accounting.update()  # the history as it is now (the last step's, after training)
        accounting.settle(timeout=timeout)
        latest = accounting.latest
        mia = self._mia
        auc, advantage = (None, None) if mia is None else (mia.auc, mia.advantage)
        scores, audit_bound = attack_results(self._attacks)
        violations = self.ledger.violations if self.ledger is not None else ()
        exhausted = last.budget_exhausted
        if exhausted is not None and self.ledger is not None and self.ledger.exhausted:
            exhausted = 1  # a guard that runs after this callback stopped on the last step
        if latest is None or latest.step < (last.epsilon_step or 0):
            latest = None  # never replace a value with one for fewer steps
        if ((latest is None or (latest.value, latest.step, int(latest.exact))
             == (last.epsilon, last.epsilon_step, last.epsilon_exact))
                and accounting.errors == last.accounting_errors
                and auc == last.membership_inference_auc
                and advantage == last.membership_inference_advantage
                and scores == last.attack_scores
                and audit_bound == last.audit_epsilon_lower_bound
                and violations == last.compliance_violations
                and exhausted == last.budget_exhausted):
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
                                    compliance_violations=violations,
                                    budget_exhausted=exhausted, device_stats=None)
        self.last_snapshot = final
        if self._publisher is not None:
            self._publisher.publish(final)
            self._publisher.flush(timeout)

    # -- checkpoint state -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        ledger, last = self.ledger, self.last_snapshot
        accountant = ledger.accounting.accountant if ledger is not None else None
        return {
            "session_id": self.session_id,
            # What the session counted up to here, so that a resumed session counts on.
            "session_steps": last.session_steps if last is not None else None,
            "session_epsilon": self._exact_session_epsilon(),
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": accountant.mechanism() if accountant is not None else None,
            "history": [list(seg) for seg in accountant.history] if accountant is not None else [],
        }

    def _exact_session_epsilon(self) -> float | None:
        """The session's epsilon at the last step, exact even while a bound is published.

        A resumed session counts on from it (``privacy_budget_consumed_total`` counts exact
        values only), so a bound saved here would stay in the count for good. Computing it is
        the accountant's own ``get_epsilon``: once per checkpoint.
        """
        last, accounting = self.last_snapshot, self.accounting
        if (last is None or last.epsilon_exact == 1 or accounting is None
                or accounting.steps != last.steps or not accounting.accountant.history):
            return None if last is None else last.session_epsilon
        exact = float(accounting.accountant.get_epsilon(self.delta))
        return exact - last.session_epsilon_offset

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_id = state_dict.get("session_id")
        if not self._session_id_given and isinstance(saved_id, str) and saved_id:
            self.session_id = saved_id  # one series across restarts
        if saved_id == self.session_id and isinstance(state_dict.get("session_steps"), int):
            self._session_carry = (state_dict["session_steps"],
                                   float(state_dict.get("session_epsilon") or 0.0), 0)
