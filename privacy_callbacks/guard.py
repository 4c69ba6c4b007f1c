"""BudgetGuard: no optimizer step that takes epsilon past the target is ever released."""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future, wait
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from . import checks, opacus_compat
from .accounting import Accounting, View

logger = logging.getLogger(__name__)

__all__ = ["BudgetGuard"]

_FLOOR = 0.9  # a falling sigma is counted at this fraction of it: one count, many steps
_WAIT = 60.0  # seconds to wait for the accountant's own "no" (under DDP: as long as it takes)


def _grown(base: View, now: View, q: float, floor: float) -> bool:
    """Whether the history of ``now`` is ``base``'s plus steps at ``q`` and sigma >= floor."""
    (h0, n0, last0), (h, n, last) = base, now
    if n < n0 or (n0 > 1 and h[n0 - 2] is not h0[n0 - 2]):
        return False
    for i, (sigma, rate, steps) in enumerate([*h[max(n0 - 1, 0):n - 1], last] if last else []):
        if i == 0 and last0 is not None:
            if (sigma, rate) != last0[:2] or steps < last0[2]:
                return False
            if steps == last0[2]:
                continue
        if rate != q or sigma < floor:
            return False
    return True


def _succeeded(future: Future[Any]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


class BudgetGuard(Callback):
    """Skips, and stops the fit before, any optimizer step that would take epsilon past
    ``target_epsilon`` by the run's own accountant (RDP, PRV or GDP).

    Before each step it checks the step Opacus is about to account, at its own sigma and sample
    rate; a step that does not fit is skipped (its batch is dropped, never released) and the fit
    stops. Most steps cost one comparison against a count of the steps that fit at the sample
    rate and any sigma above a floor: a sound bound's at once, the accountant's own
    ``get_epsilon`` search from the worker soon after. Only the accountant's answer says "no"
    (waiting up to a minute for it; under DDP as long as it takes, so ranks decide alike).

    Args:
        target_epsilon: The epsilon budget.
        delta: The delta epsilon is computed for, in (0, 1).
        accountant: An Opacus accountant or ``PrivacyEngine``; found on the module by default.
        allow_privacy_reset: Accept resuming from a checkpoint without privacy state.
        stop: ``False`` only reports: ``exhausted`` is set, the fit goes on past the target.

    Attributes:
        stopped: Whether the guard stopped (or is stopping) the fit.
        exhausted: Whether one more step would pass the target (also with ``stop=False``).
        stop_record: ``{step, epsilon, next_epsilon, target_epsilon, skipped}`` of the stop.
    """

    def __init__(self, target_epsilon: float, delta: float, *, accountant: Any = None,
                 allow_privacy_reset: bool = False, stop: bool = True) -> None:
        self.target_epsilon = checks.number("target_epsilon", target_epsilon,
                                            "a positive finite number")
        self.delta = checks.number("delta", delta, "a number in (0, 1), e.g. 1e-5", high=1.0)
        if accountant is not None:
            opacus_compat.as_accountant(accountant)
        self.accountant = accountant
        self.allow_privacy_reset = checks.flag("allow_privacy_reset", allow_privacy_reset)
        self.stop = checks.flag("stop", stop)
        # Kept: Lightning reads state_key around every hook call (its profiler's action name).
        self._state_key = self._generate_state_key(target_epsilon=self.target_epsilon,
                                                   delta=self.delta)
        self.stopped = self.exhausted = False
        self.stop_record: dict[str, Any] | None = None
        self.accounting: Accounting | None = None
        self._own = False  # the accounting is this guard's (not a monitor's)
        self._states: list[dict[str, Any]] = []
        self._rates: dict[int, opacus_compat.ChargedRate] = {}
        # (q, sigma floor, most accounted steps in total, exact): any step at q and a sigma
        # >= floor fits while the steps accounted stay within the count.
        self._credit: tuple[float, float, int | None, bool] | None = None
        self._total = 0  # steps accounted, counted by the guard between two looks
        # The accountant's counts asked of the worker: (floor, q) -> (history then, answer).
        self._asked: dict[tuple[float, float], tuple[View, Future[int | None]]] = {}
        self._top = 0.0  # sigma when the fit started: a falling sigma's floors are below it
        self._skipped: list[Any] = []
        self._stop_after = False
        self._ranks = 1
        self._optimizer: Any = None
        self._rate: opacus_compat.ChargedRate | None = None

    @property
    def state_key(self) -> str:
        return self._state_key

    def state_dict(self) -> dict[str, Any]:
        accountant = None if self.accounting is None else self.accounting.accountant
        return {"delta": self.delta, "target_epsilon": self.target_epsilon,
                "accountant": None if accountant is None else accountant.mechanism(),
                "history": [] if accountant is None else [list(s) for s in accountant.history]}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._states = opacus_compat.saved_states(checkpoint)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = opacus_compat.dp_optimizers(trainer)
        if self.accounting is None or self._own:  # a monitor hands over its own before this
            accountant = opacus_compat.find_accountant(trainer, pl_module, self.accountant)
            opacus_compat.restore_history(trainer, accountant, self._states, self.delta,
                                          self.allow_privacy_reset)
            self.accounting, self._own = Accounting(accountant, self.delta), True
        self._rates = {id(opt): opacus_compat.ChargedRate(opt) for opt in optimizers}
        self._optimizer, self._rate = optimizers[0], self._rates[id(optimizers[0])]
        self._ranks = trainer.world_size
        self.stopped = self.exhausted = self._stop_after = False
        self._credit = self.stop_record = None
        self._asked = {}
        self._agree_across_ranks(trainer)
        q = self._rate.at(max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1)))
        if q is not None:
            self._plan(trainer, float(optimizers[0].noise_multiplier), q)

    def _plan(self, trainer: pl.Trainer, sigma: float, q: float) -> None:
        """Ask for the accountant's count now; warn once, in its numbers, if the plan passes
        the target."""
        accounting = self.accounting
        assert accounting is not None
        accounting.prepare(sigma, q)
        view = accounting.view()
        self._top = sigma
        done = sum(s for _, _, s in view[0][:view[1]])
        fit, exact = accounting.bound_count(sigma, q, self.target_epsilon, view)
        count = None if exact or fit is None else self._ask(view, sigma, q)
        planned = trainer.estimated_stepping_batches
        if not trainer.is_global_zero or not math.isfinite(planned):
            return
        left = max(0, int(planned) - trainer.global_step)

        def warn(value: float | None) -> None:
            if value is None or value <= self.target_epsilon:
                return
            limit = fit if count is None else count.result() if _succeeded(count) else None
            logger.warning(
                "The planned training (%d more optimizer steps at noise_multiplier=%g, "
                "sample_rate=%g) would reach epsilon=%.4g at delta=%g (%s accountant), past "
                "target_epsilon=%g%s; %s.", left, sigma, q, value, self.delta,
                accounting.mechanism, self.target_epsilon,
                "" if limit is None else f": only {limit - done} more steps fit",
                "the budget guard will stop training there" if self.stop
                else "training will go on past the target (stop=False)")

        if exact:
            warn(accounting.forecast(view, left, sigma, q))
        else:
            accounting.epsilon_after(left, sigma, q).add_done_callback(
                lambda f: warn(f.result() if _succeeded(f) else None))

    def _agree_across_ranks(self, trainer: pl.Trainer) -> None:
        """Every rank decides from the same inputs, so they must guard the same budget."""
        if trainer.world_size <= 1 or self.accounting is None:
            return
        history = self.accounting.accountant.history
        mine = (self.target_epsilon, self.delta, self.stop, sum(s for _, _, s in history),
                len(history))
        first = trainer.strategy.broadcast(mine, src=0)
        if not trainer.strategy.reduce_boolean_decision(mine == first, all=True):
            raise ValueError(
                f"The budget guard differs across ranks: rank {trainer.global_rank} has "
                f"(target_epsilon, delta, stop, steps accounted, history segments) = {mine}, "
                f"rank 0 has {first}. Give every rank the same target_epsilon, delta and stop, "
                "and the same privacy state to resume from.")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        rate = self._rate if optimizer is self._optimizer else self._rates.get(id(optimizer))
        if rate is None or (self.exhausted and not self.stop):
            return  # not a DP optimizer of this fit, or reporting only and reported
        sigma, q = optimizer.noise_multiplier, rate()
        credit = self._credit
        if (credit is not None and q == credit[0] and sigma >= credit[1]
                and (credit[2] is None or self._total < credit[2])):
            self._total += 1
            if self._total == credit[2]:
                self._last_of(credit, sigma)
            return
        self._decide(trainer, optimizer, float(sigma), q)

    def _last_of(self, credit: tuple[float, float, int | None, bool], sigma: float) -> None:
        """This step uses up its count: stop after it if the accountant's own count (waited
        for, so every rank agrees) says one more does not fit."""
        q, floor = credit[0], credit[1]
        if floor != sigma:
            return
        if not credit[3]:
            assert self.accounting is not None
            limit, exact = self._count(self.accounting.view(), self._total, floor, q, wait=True)
            self._credit = (q, floor, limit, exact)
            if limit is None or self._total < limit:
                return
        self._stop_after = True

    def _decide(self, trainer: pl.Trainer, optimizer: Any, sigma: float,
                q: float | None) -> None:
        accounting = self.accounting
        assert accounting is not None
        if q is None:  # what the step will be charged cannot be known, so it cannot be checked
            self._refuse(trainer, optimizer, sigma, None)
            return
        view = accounting.view()
        total = sum(s for _, _, s in view[0][:view[1]])
        floors = [sigma]
        credit = self._credit
        if credit is not None and q == credit[0] and sigma < credit[1] and self._top:
            # A falling sigma (a schedule): a count at a floor on a fixed grid below it covers
            # many steps, and the next floor down is asked for ahead of need.
            k = max(0, math.ceil(math.log(sigma / self._top) / math.log(_FLOOR)))
            while k and self._top * _FLOOR ** (k - 1) <= sigma:
                k -= 1
            while self._top * _FLOOR ** k > sigma:
                k += 1
            floors.insert(0, self._top * _FLOOR ** k)
            self._ask(view, floors[0] * _FLOOR, q)
        for floor in floors:
            limit, exact = self._count(view, total, floor, q, wait=floor == sigma)
            if limit is None or total < limit:
                break
        else:
            self._refuse(trainer, optimizer, sigma, q)
            return
        self._credit, self._total = (q, floor, limit, exact), total + 1
        if limit == total + 1:
            self._last_of(self._credit, sigma)

    def _ask(self, view: View, floor: float, q: float) -> Future[int | None]:
        """The accountant's count at (floor, q): asked already and still valid, or asked now."""
        asked = self._asked.get((floor, q))
        if asked is not None and _grown(asked[0], view, q, floor):
            return asked[1]
        assert self.accounting is not None
        future = self.accounting.exact_count(floor, q, self.target_epsilon, view)
        self._asked[(floor, q)] = (view, future)
        while len(self._asked) > 4:  # the oldest question nobody will read the answer of
            self._asked.pop(next(iter(self._asked)))[1].cancel()
        return future

    def _count(self, view: View, total: int, floor: float, q: float,
               wait: bool = False) -> tuple[int | None, bool]:
        """Most steps in total that fit at q and sigma >= floor, and whether that is the
        accountant's own count; a bound's meanwhile, waited past (``wait``) when it says no."""
        accounting = self.accounting
        assert accounting is not None
        asked = self._asked.get((floor, q))
        if asked is not None and _grown(asked[0], view, q, floor) and _succeeded(asked[1]):
            return asked[1].result(), True
        limit, exact = accounting.bound_count(floor, q, self.target_epsilon, view)
        if exact or limit is None:  # a bound's "no limit": the accountant's is none either
            return limit, exact
        future = self._ask(view, floor, q)
        if limit is None or total < limit or not wait:
            return limit, False
        try:  # the bound says no: only the accountant's own answer may
            return future.result(None if self._ranks > 1 else _WAIT), True
        except Exception:
            logger.warning("The %s accountant's own count was not known in time; an upper bound "
                           "decides this step (it may stop training early)",
                           accounting.mechanism)
            return limit, False

    def steps_left(self, view: View, sigma: float, q: float) -> int | None:
        """Further steps at (sigma, q) that fit after ``view`` (publisher thread)."""
        accounting = self.accounting
        assert accounting is not None
        total = sum(s for _, _, s in view[0][:view[1]])
        limit: int | None = None
        credit, asked = self._credit, self._asked.get((sigma, q))
        if credit is not None and credit[3] and credit[:2] == (q, sigma):
            limit = credit[2]
        elif asked is not None and _succeeded(asked[1]) and _grown(asked[0], view, q, sigma):
            limit = asked[1].result()
        else:
            limit = accounting.bound_count(sigma, q, self.target_epsilon, view,
                                           publisher=True)[0]
        return None if limit is None else max(0, limit - total)

    def _refuse(self, trainer: pl.Trainer, optimizer: Any, sigma: float,
                q: float | None) -> None:
        self.exhausted = True
        if not self.stop:
            logger.warning("The next optimizer step passes target_epsilon=%g (stop=False: "
                           "training goes on)", self.target_epsilon)
            return
        opacus_compat.skip_step(optimizer)
        if optimizer not in self._skipped:
            self._skipped.append(optimizer)
        self._halt(trainer, sigma, q, skipped=True)

    def _halt(self, trainer: pl.Trainer, sigma: float, q: float | None, skipped: bool) -> None:
        trainer.should_stop = self.stopped = self.exhausted = True
        self._credit = None
        if self.stop_record is not None:
            return
        accounting = self.accounting
        assert accounting is not None
        step = trainer.global_step
        record: dict[str, Any] = {"step": step, "epsilon": None, "next_epsilon": None,
                                  "target_epsilon": self.target_epsilon, "skipped": skipped}
        self.stop_record = record
        if not trainer.is_global_zero:
            return
        if q is None:
            logger.warning("Privacy budget guard: stopping training at step %d, the step about "
                           "to run was skipped: the sample rate it would be charged cannot be "
                           "read, so it cannot be checked against target_epsilon=%g. %s", step,
                           self.target_epsilon, opacus_compat.HOW_TO_WIRE)
            return
        now, after = accounting.epsilon_after(0, sigma, q), accounting.epsilon_after(1, sigma, q)
        wait([now, after], _WAIT)
        record["epsilon"] = now.result() if _succeeded(now) else math.nan
        record["next_epsilon"] = after.result() if _succeeded(after) else math.nan
        logger.warning(
            "Privacy budget guard: stopping training at step %d (%d steps accounted)%s: "
            "epsilon=%.4g at delta=%g (%s accountant); one more step (noise_multiplier=%g, "
            "sample_rate=%g) would reach %.4g, past target_epsilon=%g.", step,
            sum(s for _, _, s in accounting.accountant.history),
            ", the step about to run was skipped" if skipped else "", record["epsilon"],
            self.delta, accounting.mechanism, sigma, q, record["next_epsilon"],
            self.target_epsilon)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._skipped:
            self._drop_skipped()
        credit = self._credit
        if self._stop_after:
            self._stop_after = False
            if credit is not None and self.stop:
                self._halt(trainer, credit[1], credit[0], skipped=False)
            else:
                self.exhausted = True
        elif credit is not None and self._optimizer.noise_multiplier < credit[1]:
            # A scheduler lowered sigma after the step: if a step at it does not fit, stop
            # now rather than skip the next batch.
            sigma = float(self._optimizer.noise_multiplier)
            assert self.accounting is not None
            limit, exact = self._count(self.accounting.view(), self._total, sigma, credit[0],
                                       wait=True)
            if limit is None or self._total < limit:
                self._credit = (credit[0], sigma, limit, exact)
            elif self.stop:
                self._halt(trainer, sigma, credit[0], skipped=False)
            else:
                self.exhausted = True

    def _drop_skipped(self) -> None:
        # Right after the skipped step, before a later batch accumulates onto what it left.
        skipped, self._skipped = self._skipped, []
        for optimizer in skipped:
            opacus_compat.discard_skipped(optimizer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips teardown when a fit raises

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._drop_skipped()
        for _, future in self._asked.values():
            future.cancel()
        self._asked = {}
        if self._own and self.accounting is not None:
            self.accounting.close()  # kept: a checkpoint saved after the fit holds its history
