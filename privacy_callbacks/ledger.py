"""PrivacyLedger: the privacy state that one Trainer's privacy callbacks share.

The metrics callback, the budget guard and the compliance callback each do one job; what they
all need -- the DP optimizers, the Opacus accountant, one :class:`~.accounting.Accounting` (so
epsilon is computed once per step, not once per callback), the accountant history restored from
a checkpoint, and a channel for audit events -- lives here, once per trainer and delta. Each
callback attaches in ``on_fit_start`` and releases in ``teardown``; the last release stops the
accounting's background work.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import lightning.pytorch as pl

from . import probe
from .accounting import Accounting, Epsilon, make_accounting
from .wiring import DifferentialPrivacy

logger = logging.getLogger(__name__)

__all__ = ["PrivacyLedger", "step_progress"]

# Where a trainer keeps its ledgers and the privacy state its checkpoint held.
_LEDGERS = "_privacy_ledgers"
_CHECKPOINT_STATES = "_privacy_checkpoint_states"
# Prefixes of the checkpoint keys that hold a privacy state (this package's callbacks).
_STATE_OWNERS = ("PrivacyMonitor", "PrivacyMetrics", "BudgetGuard")

AuditSink = Callable[..., None]
Observer = Callable[[Epsilon, int], None]


class _TrainerStep:
    __slots__ = ("trainer",)

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    @property
    def completed(self) -> int:
        return self.trainer.global_step


def step_progress(trainer: pl.Trainer) -> Any:
    """The object whose ``completed`` is ``trainer.global_step``, read in one attribute access.

    Lightning's ``global_step`` walks five objects per read (about 5 us a step on a training
    thread whose caches the step just evicted); its progress tracker is updated (and restored
    from a checkpoint) in place. Take it once the fit's state is restored (``on_train_start``).
    """
    try:
        loop = trainer.fit_loop.epoch_loop
        module = trainer.lightning_module
        if module is None or module.automatic_optimization:
            tracker = loop.automatic_optimization.optim_progress.optimizer.step.total
        else:
            tracker = loop.manual_optimization.optim_step_progress.total
        if tracker.completed == trainer.global_step:
            return tracker
    except (AttributeError, RuntimeError):
        pass
    return _TrainerStep(trainer)


class _NotChecked:
    def __repr__(self) -> str:
        return "NOT_CHECKED"


# PrivacyLedger.exhaustion before a budget guard checked the step.
_NOT_CHECKED: Any = _NotChecked()


class PrivacyLedger:
    """DP optimizers, accountant and epsilon of one fit, shared by its privacy callbacks.

    Use :meth:`attach` (never the constructor) from a callback's ``on_fit_start``, and
    :meth:`release` from its ``teardown``.

    Attributes:
        delta: The delta epsilon is computed for.
        optimizers: The fit's Opacus ``DPOptimizer`` objects.
        accounting: Epsilon for the accountant and delta (one per ledger).
        exhausted: Set by a budget guard once one more step would pass its target.
        exhaustion: The guard's steps left within the target after the last step (``None``:
            unbounded), for the metrics; unset without a guard.
        violations: ``((policy, violation_type, count), ...)`` recorded by the compliance
            callback, for the metrics.
        reporter: The metrics callback, whose session and model name audit records carry.
    """

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, delta: float,
                 accountant: Any = None) -> None:
        # Lightning's connectors set Trainer.callbacks; the class does not declare it.
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, DifferentialPrivacy):  # in whatever order they were given
                callback.make_private(trainer, pl_module)
        self.delta = delta
        self.optimizers: list[Any] = probe.find_dp_optimizers(trainer)
        found = probe.find_accountant(trainer, pl_module, accountant)
        if not any(getattr(opt, "step_hook", None) for opt in self.optimizers):
            logger.warning("No DPOptimizer has an accountant hook attached: Opacus will account "
                           "no steps and epsilon stays 0. Use PrivacyEngine.make_private.")
        self.accounting: Accounting = make_accounting(found, delta)
        self.exhausted = False
        self.exhaustion: Any = _NOT_CHECKED
        self._observers: list[Observer] = []
        self.violations: tuple[tuple[str, str, int], ...] = ()
        self.reporter: Any = None
        self._sinks: list[AuditSink] = []
        self._users = 0
        self._restored = False
        self._key: tuple[Any, ...] = ()
        self._trainer_ledgers: dict[tuple[Any, ...], PrivacyLedger] | None = None

    # -- sharing -----------------------------------------------------------------------------

    @classmethod
    def attach(cls, trainer: pl.Trainer, pl_module: pl.LightningModule, delta: float,
               accountant: Any = None) -> PrivacyLedger:
        """The trainer's ledger for ``delta`` (and ``accountant``, if given), made on first use."""
        ledgers: dict[tuple[Any, ...], PrivacyLedger] = trainer.__dict__.setdefault(_LEDGERS, {})
        key = (float(delta), None if accountant is None else id(accountant))
        ledger = ledgers.get(key)
        if ledger is None:
            ledger = ledgers[key] = cls(trainer, pl_module, float(delta), accountant)
            ledger._key = key
            ledger._trainer_ledgers = ledgers
        ledger._users += 1
        return ledger

    def release(self) -> None:
        """One callback is done with the ledger; the last one stops its background work."""
        self._users -= 1
        if self._users > 0:
            return
        ledgers = self._trainer_ledgers
        if ledgers is not None and ledgers.get(self._key) is self:
            del ledgers[self._key]
        self.accounting.close()

    @property
    def session_id(self) -> str | None:
        return getattr(self.reporter, "session_id", None)

    @property
    def model_name(self) -> str | None:
        return getattr(self.reporter, "model_name", None)

    # -- per step ----------------------------------------------------------------------------

    def watch(self, observer: Observer) -> None:
        """Receive each step's epsilon and trainer step as the metrics callback computes it
        (on its publisher thread); without a metrics callback nobody calls it."""
        self._observers.append(observer)

    def observe(self, epsilon: Epsilon, step: int) -> None:
        for observer in self._observers:
            observer(epsilon, step)

    # -- audit events ------------------------------------------------------------------------

    def subscribe(self, sink: AuditSink) -> None:
        """Receive :meth:`audit` events (the compliance callback's audit trail)."""
        self._sinks.append(sink)

    def audit(self, event: str, **data: Any) -> None:
        """Hand a rare event (the budget guard stopping training, say) to the audit trail."""
        for sink in self._sinks:
            sink(event, **data)

    # -- checkpoint state --------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to restore epsilon: delta, accountant and its history."""
        accountant = self.accounting.accountant
        return {"delta": self.delta, "accountant": accountant.mechanism(),
                "history": [list(seg) for seg in accountant.history]}

    @staticmethod
    def note_checkpoint(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
        """Keep the privacy states a checkpoint holds, for :meth:`restore` (``on_load_checkpoint``).

        Any of this package's callbacks saved one; a fit resumed with other callbacks or other
        settings (a new target, no session name) still finds it.
        """
        states = checkpoint.get("callbacks") or {}
        found = [state for key, state in states.items()
                 if isinstance(key, str) and key.startswith(_STATE_OWNERS)
                 and isinstance(state, dict) and "history" in state]
        trainer.__dict__[_CHECKPOINT_STATES] = found
        return found

    def restore(self, trainer: pl.Trainer, allow_privacy_reset: bool,
                target_epsilon: float | None = None) -> None:
        """Put the checkpoint's accountant history back into the Opacus accountant (once)."""
        if self._restored:
            return
        self._restored = True
        states: list[dict[str, Any]] = trainer.__dict__.pop(_CHECKPOINT_STATES, None) or []
        state = next((s for s in states if s.get("delta") == self.delta),
                     states[0] if states else None)
        accounting = self.accounting
        if state is None and trainer.ckpt_path is None:
            return
        accountant = accounting.accountant
        current = [tuple(seg) for seg in accountant.history]
        opt_in = "pass allow_privacy_reset=True to the privacy callback to accept it"
        if state is None:
            if current:
                logger.info("Resuming with the accountant's own history (%d steps), as restored "
                            "by PrivacyEngine.load_checkpoint", sum(s for _, _, s in current))
                return
            if not allow_privacy_reset:
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
        if problems and not allow_privacy_reset:
            raise RuntimeError(
                f"Resuming from {trainer.ckpt_path}: the privacy state does not match "
                f"({'; '.join(problems)}). Resume with the same delta and accountant, or "
                f"{opt_in} (the saved history is carried over).")
        if problems:
            logger.warning("Resuming despite %s (allow_privacy_reset=True)", "; ".join(problems))
        if current and current != saved:
            return  # opted in: keep what the accountant was given explicitly
        saved_target = state.get("target_epsilon")
        if (target_epsilon is not None and "target_epsilon" in state
                and saved_target != target_epsilon and trainer.is_global_zero):
            logger.warning("target_epsilon was %r in the checkpoint and is %r now", saved_target,
                           target_epsilon)
        accountant.history = saved
        accounting.update()
        if trainer.is_global_zero:
            logger.info("Restored privacy accounting: %d steps from the checkpoint, epsilon "
                        "continues from there", sum(s for _, _, s in saved))
