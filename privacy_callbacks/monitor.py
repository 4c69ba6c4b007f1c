"""PrivacyMonitor: the privacy an Opacus run spends, every optimizer step, to the exporters."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from . import checks, opacus_compat
from .accounting import Accounting, Epsilon
from .exporters.base import Exporter, RunInfo
from .guard import BudgetGuard
from .publisher import Publisher
from .snapshot import Observer, PrivacySnapshot, Reporter, StepReporter, reported

logger = logging.getLogger(__name__)

__all__ = ["PrivacyMonitor"]


class PrivacyMonitor(Callback):
    """Publishes the privacy an Opacus DP-SGD run spends, after every optimizer step.

    The training thread notes each step (host-side values only); the publisher thread computes
    epsilon for the history as it was then -- the accountant's exact value, or a labelled upper
    bound until that is known -- and feeds the exporters, which hold the exact last epsilon before
    the fit returns. With ``target_epsilon`` a :class:`~privacy_callbacks.BudgetGuard` runs inside.
    The history is saved in checkpoints and restored on resume. Under DDP privacy values come
    from rank 0, throughput and step time from every rank.

    Args:
        delta: The delta epsilon is reported for, in (0, 1).
        target_epsilon: The budget: budget metrics, forecast and the guard.
        exporters: Where snapshots go, e.g. ``[PrometheusExporter(port=9108)]``.
        accountant: An Opacus accountant or ``PrivacyEngine``; by default the module's
            ``privacy_engine`` or a callback's.
        session_id: By default each ``fit`` is a session (a resume keeps its checkpoint's).
        model_name: By default the LightningModule's class name.
        progress_bar: Show epsilon in the progress bar.
        max_pending: Steps held while exporters lag; then the oldest are dropped.
        stop_at_target: Stop before a step past the target; ``False`` only reports.
        allow_privacy_reset: Accept a resume without privacy state or with another delta or
            accountant (epsilon would be under-reported).
    """

    def __init__(self, delta: float, target_epsilon: float | None = None, *,
                 exporters: Sequence[Exporter] = (), accountant: Any = None,
                 session_id: str | None = None, model_name: str | None = None,
                 progress_bar: bool = True, max_pending: int = 10_000,
                 stop_at_target: bool = True, allow_privacy_reset: bool = False) -> None:
        self.delta = checks.number("delta", delta, "a number in (0, 1), typically below "
                                   "1/(training set size), e.g. 1e-5", high=1.0)
        self.target_epsilon = checks.number("target_epsilon", target_epsilon, "a positive "
                                            "finite number, or None for no budget", none=True)
        self.exporters = tuple(exporters)
        for exporter in self.exporters:
            if not isinstance(exporter, Exporter):
                raise ValueError(f"Unexpected exporter {exporter!r}: use PrometheusExporter, "
                                 "InfluxDBExporter or a subclass of privacy_callbacks.Exporter")
        if accountant is not None:
            opacus_compat.as_accountant(accountant)
        self.accountant = accountant
        self._named = session_id is not None
        self.session_id = uuid.uuid4().hex[:12] if session_id is None else \
            checks.label("session_id", session_id)
        self.model_name = None if model_name is None else checks.label("model_name", model_name)
        self.progress_bar = checks.flag("progress_bar", progress_bar)
        self.max_pending = checks.number("max_pending", max_pending, "a number of steps >= 1",
                                         low=1, low_ok=True, integer=True)
        self.allow_privacy_reset = checks.flag("allow_privacy_reset", allow_privacy_reset)
        self.guard = None if self.target_epsilon is None else BudgetGuard(
            self.target_epsilon, self.delta, accountant=accountant,
            allow_privacy_reset=allow_privacy_reset,
            stop=checks.flag("stop_at_target", stop_at_target))
        self.accounting: Accounting | None = None
        self._publisher: Publisher | None = None
        self._last: PrivacySnapshot | None = None
        self._states: list[dict[str, Any]] = []
        self._fitted = self._started = self._exporting = self._stepped = self._bounded = False
        # The session's earlier fits (steps, exact epsilon, errors); and what the accountant held
        # at this fit's start, less those: snapshot values minus these are the session's.
        self._carry: tuple[int, float, int] = (0, 0.0, 0)
        self._offsets: tuple[int, float, int] = (0, 0.0, 0)
        self._optimizer: Any = None
        self._accountant: Any = None
        self._reporters: list[Any] = []
        self._step_reporters: list[Any] = []
        self._planned: int | None = None
        self._t_last: float | None = None
        self._every = True
        self._rank = self._step = self._batches = 0
        self._log_every, self._log_loggers, self._logged = 50, False, -1
        # Kept: Lightning reads state_key around every hook call (its profiler's action name).
        self._state_key = self._generate_state_key(
            delta=self.delta, target_epsilon=self.target_epsilon,
            session_id=self.session_id if self._named else None,
            exporters=[repr(e) if type(e).__repr__ is not object.__repr__ else type(e).__name__
                       for e in self.exporters])

    @property
    def state_key(self) -> str:
        return self._state_key

    @property
    def last_snapshot(self) -> PrivacySnapshot | None:
        """The last step's snapshot (after the fit: the exact final epsilon)."""
        if self._publisher is not None and not self._publisher.on_thread():
            self._publisher.flush(timeout=10.0)
        return self._last

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every step so far reached the exporters; False on timeout."""
        return True if self._publisher is None else self._publisher.flush(timeout)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        last = self._last
        if self._named and last is not None:  # the session goes on: count on from here
            self._carry = (last.session_steps or 0, self._exact_session_epsilon() or 0.0,
                           last.accounting_errors or 0)
        elif self._fitted and not self._named:
            self.session_id, self._carry = uuid.uuid4().hex[:12], (0, 0.0, 0)
        self._fitted = True
        self._rank, self._exporting = trainer.global_rank, trainer.is_global_zero
        started: list[Exporter] = []
        try:  # ports are bound now: a mistake surfaces before any training
            for exporter in self.exporters:
                exporter.rank, exporter.local_rank = trainer.global_rank, trainer.local_rank
                exporter.start()
                started.append(exporter)
        except BaseException:
            for exporter in started:
                exporter.close(timeout=1.0)
            raise
        self._started = True

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._states = opacus_compat.saved_states(checkpoint)
        states = checkpoint.get("callbacks") or {}
        mine = [s for k, s in states.items() if str(k).startswith(type(self).__qualname__)]
        if self.state_key not in states and len(mine) == 1:  # saved with other settings
            self.load_state_dict(mine[0])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restored the checkpoint and every callback wired Opacus before this hook.
        self._optimizer = opacus_compat.dp_optimizers(trainer)[0]
        accountant = self._accountant = opacus_compat.find_accountant(
            trainer, pl_module, self.accountant)
        opacus_compat.restore_history(trainer, accountant, self._states, self.delta,
                                      self.allow_privacy_reset)
        accounting = self.accounting = Accounting(accountant, self.delta)
        accounting.listener = self._on_epsilon
        if self.guard is not None:
            self.guard.accounting = accounting
            self.guard.on_train_start(trainer, pl_module)
        else:
            q = accountant.history[-1][1] if accountant.history else opacus_compat.ChargedRate(
                self._optimizer).at(max(1, int(trainer.accumulate_grad_batches or 1)))
            if q is not None:
                accounting.prepare(float(self._optimizer.noise_multiplier), q)
        steps, epsilon = sum(int(s) for _, _, s in accountant.history), 0.0
        if steps:  # exact, once a fit: RDP's own (bit-identical), else Opacus'
            value = accounting.epsilon()
            epsilon = value.value if value is not None and value.exact \
                else float(accountant.get_epsilon(self.delta))
        carry = self._carry
        self._offsets = (steps - carry[0], epsilon - carry[1], -carry[2])
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning
        self._reporters = [cb for cb in callbacks if isinstance(cb, Reporter)]
        self._step_reporters = [cb for cb in callbacks if isinstance(cb, StepReporter)]
        observers = [cb for cb in callbacks if isinstance(cb, Observer)]
        self._every = bool(observers) or any(e.every_step for e in self.exporters)
        self.model_name = self.model_name or type(pl_module).__name__
        planned = trainer.estimated_stepping_batches
        self._planned = int(planned) if math.isfinite(planned) else None
        self._log_every = max(1, trainer.log_every_n_steps)  # type: ignore[attr-defined]
        self._log_loggers, self._logged = bool(trainer.loggers) and self._exporting, -1
        self._t_last, self._batches, self._step = None, 0, trainer.global_step
        self._stepped = self._bounded = False
        self._publisher = Publisher(self.exporters, self._build, max_pending=self.max_pending,
                                    observers=observers if self._exporting else ())
        info = RunInfo(session_id=self.session_id, model_name=self.model_name,
                       accountant=accounting.mechanism, rank=trainer.global_rank,
                       world_size=trainer.world_size, delta=self.delta,
                       target_epsilon=self.target_epsilon,
                       exporters=(*self.exporters, self._publisher))
        for exporter in self.exporters:
            exporter.open(info)
        if self._exporting:  # each exporter says where its metrics go
            logger.info("Privacy monitor: session %s, %s accountant, delta=%g", self.session_id,
                        accounting.mechanism, self.delta)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_last, self._batches, self._step = None, 0, trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._t_last is None:
            self._t_last = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_last = None  # validation time is not training throughput

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        if self.guard is not None:
            self.guard.on_before_optimizer_step(trainer, pl_module, optimizer)
        # Counted here, not read from trainer.global_step (five objects deep, microseconds):
        # Lightning calls this hook once for every optimizer step it counts.
        self._step += 1
        self._stepped = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batches += 1
        guard = self.guard
        if guard is not None:
            guard.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._stepped or self._publisher is None:
            return  # no optimizer step in this batch (gradient accumulation)
        self._stepped = False
        step, history, now, t_last = self._step, self._accountant.history, time.perf_counter(), \
            self._t_last
        reads = [read for read in (r.privacy_step_values(step) for r in self._step_reporters)
                 if read is not None] if self._step_reporters else ()
        n, opt = len(history), self._optimizer  # Accounting.view(), inline: every step
        self._publisher.put((step, time.time_ns(), (history, n, history[n - 1] if n else None),
                             opt.noise_multiplier, opt.max_grad_norm, self._batches,
                             None if t_last is None else now - t_last, reads,
                             guard is not None and guard.exhausted))
        self._t_last, self._batches = now, 0
        every = self._log_every
        bar = self.progress_bar and (batch_idx == 0 or step % every == 0)
        loggers = self._log_loggers and step % every == 0
        last = self.progress_bar and (trainer.should_stop or 0 < trainer.max_steps <= step or (
            trainer.is_last_batch and trainer.current_epoch + 1 >= (trainer.max_epochs or 0) > 0))
        if (bar or loggers or last) and self.accounting is not None:
            if last:  # the bar's last value is the exact one
                self.accounting.settle(timeout=10.0)
            value = self.accounting.epsilon()  # for the history now: the release is this step's
            if value is not None:
                self._log(trainer, pl_module, step, value, bar or last, loggers)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
             value: Epsilon, bar: bool, loggers: bool) -> None:
        if bar:  # namespaced: a module's own self.log("epsilon") keeps its key
            pl_module.log("privacy/epsilon", value.value, prog_bar=True, logger=False,
                          on_step=True, on_epoch=False)
            if self._bounded or not value.exact:  # say which values are bounds, once there are
                self._bounded = True
                pl_module.log("privacy/epsilon_exact", float(value.exact), prog_bar=True,
                              logger=False, on_step=True, on_epoch=False)
        if loggers:
            metrics = {"privacy/epsilon": value.value,
                       "privacy/noise_multiplier": float(self._optimizer.noise_multiplier)}
            if self.target_epsilon is not None:
                metrics["privacy/budget_remaining"] = self.target_epsilon - value.value
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=step)
            self._logged = step

    def _build(self, record: tuple, newest: bool) -> PrivacySnapshot | None:
        """One step's snapshot (publisher thread); an older step of a batch only if someone reads
        every step or it carries measured values."""
        step, timestamp_ns, view, sigma, clip, batches, seconds, reads, exhausted = record
        if not (newest or reads or self._every):
            return None
        accounting, opt, target = self.accounting, self._optimizer, self.target_epsilon
        assert accounting is not None
        sigma, clip = float(sigma), float(clip)
        expected = opacus_compat.global_expected_batch_size(opt)
        # Under Poisson sampling the real batch size is private: count expected samples.
        throughput = expected * batches / seconds if expected and seconds else None
        base = dict(step=step, timestamp_ns=timestamp_ns, accountant=accounting.mechanism,
                    rank=self._rank, throughput=throughput, step_seconds=seconds)
        q = None if view[2] is None else float(view[2][1])
        # The noise on the update: the gradient's share of sigma, over the global expected
        # batch of every batch accumulated into the step.
        noise_std = opacus_compat.gradient_noise_multiplier(opt, sigma) * clip
        if getattr(opt, "loss_reduction", "mean") == "mean" and expected:
            noise_std /= expected * max(1, batches)
        epsilon = accounting.epsilon(view)
        extra: dict[str, Any] = {}
        for read in reads:
            extra.update(read())
        forecast = left = risk = None
        if newest and q is not None:
            if self._planned is not None:
                forecast = accounting.forecast(view, max(0, self._planned - step), sigma, q)
            if self.guard is not None:
                left = self.guard.steps_left(view, sigma, q)
            risk = accounting.risk(view, None if epsilon is None else epsilon.value)
            extra.update(reported(self._reporters))
        self._last = self._with_epsilon(PrivacySnapshot(
            **base, delta=self.delta, noise_multiplier=sigma, max_grad_norm=clip,
            sample_rate=q, noise_std=noise_std, target_epsilon=target, epsilon_forecast=forecast,
            budget_exhaustion_steps=left, assessed=newest,
            budget_exhausted=None if target is None else int(exhausted or left == 0),
            membership_inference_risk=risk, extra=extra), epsilon, view)
        # Every rank holds the same accountant: rank 0 publishes it.
        return self._last if self._exporting else PrivacySnapshot(**base)

    def _with_epsilon(self, snapshot: PrivacySnapshot, epsilon: Epsilon | None,
                      view: Any) -> PrivacySnapshot:
        steps = epsilon.step if epsilon is not None else sum(s for _, _, s in view[0][:view[1]])
        value = None if epsilon is None else epsilon.value
        exact = epsilon is not None and epsilon.exact
        assert self.accounting is not None
        return dataclasses.replace(
            snapshot, epsilon=value, epsilon_step=steps,
            epsilon_exact=None if epsilon is None else int(exact),
            budget_remaining=None if value is None or self.target_epsilon is None
            else self.target_epsilon - value, session_steps=steps - self._offsets[0],
            session_epsilon=value - self._offsets[1] if exact and value is not None else None,
            accounting_errors=self.accounting.errors - self._offsets[2])

    def _on_epsilon(self, value: Epsilon) -> None:
        """Worker thread: a better epsilon for the last step goes out now, not with the next."""
        last, publisher = self._last, self._publisher
        if last is not None and publisher is not None and self._exporting \
                and last.epsilon_step == value.step:
            publisher.offer(self._with_epsilon(dataclasses.replace(last, extra={}), value,
                                               None))

    def _publish_final(self, timeout: float = 10.0) -> None:
        """The last step's exact epsilon and the reporters' last values, out before the fit
        returns."""
        publisher, accounting = self._publisher, self.accounting
        if publisher is None or accounting is None or not self._exporting:
            return
        publisher.flush(timeout)
        last = self._last
        if last is None:
            return
        accounting.settle(timeout)
        epsilon = accounting.epsilon()
        if (epsilon is None or epsilon.step < (last.epsilon_step or 0)) and \
                last.epsilon is not None:  # never replace a value with one for fewer steps
            epsilon = Epsilon(last.epsilon, last.epsilon_step or 0, bool(last.epsilon_exact))
        exhausted = 1 if self.guard is not None and self.guard.exhausted else last.budget_exhausted
        final = self._with_epsilon(dataclasses.replace(
            last, throughput=None, step_seconds=None, extra=reported(self._reporters),
            budget_exhausted=exhausted), epsilon, accounting.view())
        fields = ("epsilon", "epsilon_exact", "epsilon_step", "accounting_errors",
                  "budget_exhausted")
        if any(getattr(final, f) != getattr(last, f) for f in fields) or any(
                last.extra.get(k) != v for k, v in final.extra.items()):
            publisher.put(final)
            publisher.flush(timeout)
        self._last = final

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish_final()  # what later callbacks read from here on is exact

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish_final()  # after every on_train_end: an attack's last result too
        last, accounting = self._last, self.accounting
        if last is None or not self._exporting or accounting is None:
            return
        latest = accounting.latest
        if self._log_loggers and self._logged != last.step and latest is not None \
                and latest.exact:
            self._log(trainer, pl_module, last.step, latest, bar=False, loggers=True)
        logger.info("Privacy spent: epsilon=%.4g at delta=%g after %d steps (%s%s)",
                    math.nan if last.epsilon is None else last.epsilon, self.delta,
                    last.epsilon_step or 0, accounting.mechanism, "" if last.epsilon_exact
                    else ", an upper bound: the exact value was not computed in time")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips teardown when a fit raises

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.guard is not None:
            self.guard.teardown(trainer, pl_module, stage)
        if self._publisher is not None:
            self._publish_final()
            self._publisher.close(timeout=10.0)
            self._publisher = None
        if self._started:
            self._started = False
            for exporter in self.exporters:
                try:
                    exporter.close(timeout=10.0)
                except Exception:
                    logger.exception("Closing %s failed", exporter.name)
        if self.accounting is not None:
            self.accounting.close()  # kept: epsilon and the last values stay readable

    def state_dict(self) -> dict[str, Any]:
        last, accounting = self.last_snapshot, self.accounting  # every step so far built
        accountant = None if accounting is None else accounting.accountant
        return {"session_id": self.session_id,
                "session_steps": None if last is None else last.session_steps,
                "session_epsilon": self._exact_session_epsilon(),
                "delta": self.delta, "target_epsilon": self.target_epsilon,
                "accountant": None if accountant is None else accountant.mechanism(),
                "history": [] if accountant is None else [list(s) for s in accountant.history]}

    def _exact_session_epsilon(self) -> float | None:
        """The session's exact epsilon now (a resumed session counts on from it, not a bound)."""
        last, accounting = self._last, self.accounting
        if last is None or last.epsilon_exact == 1 or accounting is None or sum(
                s for _, _, s in accounting.accountant.history) != last.epsilon_step:
            return None if last is None else last.session_epsilon
        return float(accounting.accountant.get_epsilon(self.delta)) - self._offsets[1]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("session_id")
        if not self._named and isinstance(saved, str) and saved:
            self.session_id = saved  # one series across restarts
        if saved == self.session_id and isinstance(state_dict.get("session_steps"), int):
            self._carry = (state_dict["session_steps"],
                           float(state_dict.get("session_epsilon") or 0.0), 0)
