"""BudgetGuard: stop training before a step would take epsilon past the target."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from . import probe
from .accounting import MISSING
from .ledger import _NOT_CHECKED, PrivacyLedger

logger = logging.getLogger(__name__)

__all__ = ["BudgetGuard", "check_target"]


def check_target(target_epsilon: Any, name: str = "target_epsilon") -> float | None:
    """``target_epsilon`` as a float, or a clear error naming the value."""
    if target_epsilon is None:
        return None
    if (isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float))
            or not 0 < target_epsilon < math.inf):
        raise ValueError(f"Unexpected value for {name}: {target_epsilon!r}; use a "
                         "positive finite number, or None for no budget")
    return float(target_epsilon)


def check_delta(delta: Any) -> float:
    """``delta`` as a float, or a clear error naming the value."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"Unexpected value for delta: {delta!r}; use a number in (0, 1), "
                         "typically below 1/(training set size), e.g. 1e-5")
    return float(delta)


class BudgetGuard(Callback):
    """Stops the fit before any optimizer step that would take epsilon past ``target_epsilon``.

    Modelled on Lightning's ``EarlyStopping``, with the accountant as the monitored quantity.
    Right before each optimizer step it checks the exact step Opacus is about to account (its
    noise multiplier and sample rate: a noise scheduler, a partial accumulation at an epoch's
    end or ``min_steps`` can change them) and skips that step -- its batch is dropped, never
    released -- if it would pass the target. After a step it sets ``trainer.should_stop`` if
    one more step at the noise multiplier now set would pass. A check grants a credit: how many
    further steps at that sample rate and at least a floor noise multiplier surely fit (the
    accountant's own count, or one RDP order's bound); the steps it covers are cleared by
    comparing sigma, q and the history's last segment, with nothing computed. Before a bound's
    "no" skips a step or stops the fit, the exact RDP value is computed (see
    :meth:`~privacy_callbacks.accounting.Accounting.fits`). Epsilon
    after the fit is at most the target. For PRV and GDP accountants the checks use the upper
    bounds of :mod:`privacy_callbacks.accounting`: it may stop a little early, never late.
    Under DDP every rank decides from the same inputs (checked once at the start), so every
    rank stops on the same step with no per-step collective.

    Args:
        target_epsilon: The epsilon budget.
        delta: The delta epsilon is computed for, in (0, 1).
        accountant: The Opacus accountant or ``PrivacyEngine``; found on the LightningModule or
            a callback by default.
        allow_privacy_reset: Accept resuming from a checkpoint without privacy state (see
            :class:`~privacy_callbacks.PrivacyMonitor`).
        stop: ``False`` only reports: the budget metrics show exhaustion, the fit goes on.

    Attributes:
        stopped: Whether the guard stopped (or is stopping) the fit.
    """

    def __init__(self, target_epsilon: float, delta: float, *, accountant: Any = None,
                 allow_privacy_reset: bool = False, stop: bool = True) -> None:
        target = check_target(target_epsilon)
        if target is None:
            raise ValueError("Unexpected value for target_epsilon: None; BudgetGuard needs a "
                             "positive finite budget")
        self.target_epsilon = target
        self.delta = check_delta(delta)
        if accountant is not None:
            probe.find_accountant(None, None, accountant)  # raises, naming the value
        for name, value in (("allow_privacy_reset", allow_privacy_reset), ("stop", stop)):
            if not isinstance(value, bool):
                raise ValueError(f"Unexpected value for {name}: {value!r}; use True or False")
        self.stop = stop
        self.accountant = accountant
        self.allow_privacy_reset = allow_privacy_reset
        self.stopped = False
        self.ledger: PrivacyLedger | None = None
        self._attached = False
        self._optimizers: list[Any] = []
        self._planned_steps: int | None = None
        self._accumulate = 1
        self._last_step = -1
        # Steps known to stay within the target without computing anything:
        # (count, sigma floor, q, segments, last segment) -- any `count` further steps at q and
        # a sigma >= floor fit, while the history is (segments, last segment) before the next.
        self._credit: tuple[Any, ...] | None = None
        self._exact_count = False  # the credit is the accountant's own count at one sigma
        self._recheck = False  # the after-step check is due (the credit ran out)
        self._rates: dict[int, probe.AccountedRate] = {}
        self._optimizer: Any = None
        self._rate: probe.AccountedRate | None = None
        self._accountant: Any = None
        # Optimizers whose last step the guard skipped: what it accumulated is dropped after it.
        self._skipped: list[Any] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target_epsilon=self.target_epsilon, delta=self.delta)

    # -- lifecycle ---------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ledger = PrivacyLedger.attach(trainer, pl_module, self.delta, self.accountant)
        self._attached = True
        self._optimizers = self.ledger.optimizers
        self._accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        planned = trainer.estimated_stepping_batches
        self._planned_steps = int(planned) if math.isfinite(planned) else None
        self._last_step = trainer.global_step
        self.stopped = False
        self._forget()
        self._rates = {id(opt): probe.AccountedRate(opt) for opt in self._optimizers}
        # The first (usually the only) DP optimizer, its rate and the accountant, at hand for
        # the check before every step.
        self._optimizer = self._optimizers[0] if self._optimizers else None
        self._rate = self._rates.get(id(self._optimizer))
        self._accountant = self.ledger.accounting.accountant
        self._skipped = []

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        PrivacyLedger.note_checkpoint(trainer, checkpoint)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.ledger is not None
        self.ledger.restore(trainer, self.allow_privacy_reset, self.target_epsilon)
        self._agree_across_ranks(trainer)
        self._last_step = trainer.global_step
        self._forget()  # a restored history is not the one any credit was counted from
        self._check_plan(trainer)

    def state_dict(self) -> dict[str, Any]:
        # The accountant history too: a fit resumed with this guard alone still counts it.
        state = self.ledger.state() if self.ledger is not None else {}
        return {**state, "target_epsilon": self.target_epsilon}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._drop_skipped()
        if self._attached and self.ledger is not None:
            self._attached = False
            self.ledger.release()  # kept: a checkpoint saved after the fit holds its history

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        # Lightning skips the teardown hook when a fit raises.
        self.teardown(trainer, pl_module, "fit")

    def _agree_across_ranks(self, trainer: pl.Trainer) -> None:
        """Check once, before any step, that every rank guards the same budget.

        The guard then decides on each rank from identical inputs (the same settings and,
        under Opacus' distributed optimizer, the same accountant history, sigma and q), so every
        rank stops on the same step without a collective -- and without the host-device
        synchronisation a per-step all-reduce would cost on GPUs.
        """
        ledger = self.ledger
        if trainer.world_size <= 1 or ledger is None:
            return
        accounting = ledger.accounting
        mine = (self.target_epsilon, self.delta, self.stop, accounting.steps,
                len(accounting.accountant.history))
        first = trainer.strategy.broadcast(mine, src=0)
        if not trainer.strategy.reduce_boolean_decision(mine == first, all=True):
            raise ValueError(
                f"The budget guard (BudgetGuard, PrivacyMonitor) differs across ranks: rank "
                f"{trainer.global_rank} has "
                f"(target_epsilon, delta, stop_at_target, steps accounted, history segments) = "
                f"{mine}, rank 0 has {first} (or another rank differs). Give every rank the same "
                "target_epsilon, delta and stop_at_target, and the same privacy state to resume "
                "from.")

    # -- the checks --------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._skipped:
            self._drop_skipped()
        if self.stop and not self._recheck:
            # The step just run was cleared with room for at least one more at its q and any
            # sigma above the credit's floor: nothing to stop, unless a scheduler has already
            # set a lower sigma. (No optimizer step in this batch: nothing to check either.)
            credit = self._credit
            if credit is None or self._optimizer.noise_multiplier >= credit[1]:
                return
        self._recheck = False
        ledger, step = self.ledger, trainer.global_step
        if ledger is None or step == self._last_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step = step
        history = ledger.accounting.accountant.history
        if not history:
            return
        sigma = float(self._optimizers[0].noise_multiplier)
        q = float(history[-1][1])
        # After a step: stop now if one more step at (sigma, q) would pass the target. The
        # count of steps left is cached (each step at the same (sigma, q) takes one off; the
        # metrics compute it off this thread when it is not); without it (a noise schedule),
        # one RDP order's bound usually answers in microseconds (Accounting.fits).
        accounting = ledger.accounting
        left = accounting.exhaustion_cached(self.target_epsilon, sigma, q)
        ledger.exhaustion = _NOT_CHECKED if left is MISSING else left
        if self.stopped:
            return
        if left is MISSING or left == 0:
            # A count of 0 may come from bounds; fits() decides a stop on the exact value.
            left = None if accounting.fits(self.target_epsilon, sigma, q) else 0
        if left == 0:
            if not self.stop:
                self.stopped = ledger.exhausted = True  # reported only
                return
            self._stop(trainer, step, sigma, q, skipped=False)
        else:
            # The next step at this (sigma, q) fits: a credit of one.
            self._grant(1 if left is None else left, sigma, q, history, exact=left is not None)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        # The check after the last step used the sigma and q of that moment; a noise scheduler,
        # a partial accumulation at the end of an epoch or a fit that must go on (min_epochs)
        # can change what this step accounts. Check the exact step Opacus is about to account
        # and skip it if it would pass. Most steps are cleared by the credit of an earlier
        # check (a comparison of sigma, q and the history's last segment, nothing computed).
        ledger = self.ledger
        if ledger is None or not self.stop:
            return
        rate = self._rate if optimizer is self._optimizer else self._rates.get(id(optimizer))
        if rate is None:
            return  # not a DP optimizer of this fit
        sigma = float(optimizer.noise_multiplier)
        q = rate()
        if q is None:
            # What this step will be charged cannot be known, so it cannot be checked.
            self._skip(trainer, optimizer, sigma, None)
            return
        history = self._accountant.history
        n = len(history)
        last = history[n - 1] if n else None
        credit = self._credit
        if (credit is not None and sigma >= credit[1] and q == credit[2] and n == credit[3]
                and last == credit[4]):
            count, floor = credit[0], credit[1]
        else:
            target, accounting = self.target_epsilon, ledger.accounting
            grant = accounting.credit(target, sigma, q)
            if grant is not None and grant[0] >= 1:
                self._exact_count = grant[2]
            elif accounting.fits(target, sigma, q):
                grant, self._exact_count = (1, sigma, False), False
            else:
                self._credit = None
                self._skip(trainer, optimizer, sigma, q)
                return
            count, floor = grant[0], grant[1]
        # Clear this step from the credit of `count` steps (at q and any sigma >= floor) and
        # keep the rest for the next. The accountant's own count of steps left holds for its
        # sigma only.
        left = count - 1
        ledger.exhaustion = left if self._exact_count and sigma == floor else _NOT_CHECKED
        if left <= 0:
            self._credit, self._recheck = None, True
        elif last is not None and last[0] == sigma and last[1] == q:
            # The history once Opacus accounted this step: its accountants merge a step into
            # the last segment when sigma and q are the same.
            self._credit = (left, floor, q, n, (last[0], last[1], last[2] + 1))
        else:
            self._credit = (left, floor, q, n + 1, (sigma, q, 1))

    def _grant(self, count: int, sigma: float, q: float, history: list, exact: bool) -> None:
        """A credit of ``count`` steps at (sigma, q) from the history as it is now."""
        n = len(history)
        self._credit = (count, sigma, q, n, history[n - 1] if n else None)
        self._exact_count = exact

    def _forget(self) -> None:
        self._credit, self._exact_count, self._recheck = None, False, False

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
        already = self.stopped
        trainer.should_stop = True
        self.stopped = True
        self._forget()
        ledger = self.ledger
        assert ledger is not None
        ledger.exhausted = True
        if already or not trainer.is_global_zero:
            return
        accounting = ledger.accounting
        accounting.update()  # steps accounted now (the metrics compute them off this thread)
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
        else:
            logger.warning(
                "Privacy budget guard: stopping training at trainer step %d (%d steps accounted)"
                "%s: epsilon=%.4g%s at delta=%g; one more step (noise_multiplier=%g, "
                "sample_rate=%g) would reach %.4g, past target_epsilon=%g.", step,
                accounting.steps, ", the step about to run was skipped" if skipped else "", eps,
                bound, self.delta, sigma, q, nxt, self.target_epsilon)
        ledger.audit("budget_guard_stop", step=step, epsilon=eps, next_epsilon=nxt,
                     target_epsilon=self.target_epsilon, skipped=skipped)

    def _check_plan(self, trainer: pl.Trainer) -> None:
        """Warn once if the planned training would pass the target."""
        ledger = self.ledger
        if ledger is None or self._planned_steps is None:
            return
        accounting, target = ledger.accounting, self.target_epsilon
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
        then = ("the budget guard will stop training there" if self.stop
                else "training will go on past the target (stop_at_target=False)")
        logger.warning(
            "The planned training (%d more optimizer steps at noise_multiplier=%g, "
            "sample_rate=%g) would reach epsilon=%.4g at delta=%g, past target_epsilon=%g: only "
            "%s more steps fit in the budget; %s.", left, sigma, q, forecast, self.delta, target,
            fit, then)
