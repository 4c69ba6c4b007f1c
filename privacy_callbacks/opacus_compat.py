"""The one place that knows Opacus: its optimizers, accountant, the rate a step is charged, skip.

Everything here reads host-side attributes only; nothing touches a device tensor.
"""

from __future__ import annotations

import logging
from typing import Any

from opacus import PrivacyEngine
from opacus.accountants.accountant import IAccountant
from opacus.optimizers import AdaClipDPOptimizer, DistributedDPOptimizer, DPOptimizer

logger = logging.getLogger(__name__)

__all__ = ["HOW_TO_WIRE", "ChargedRate", "as_accountant", "discard_skipped", "dp_optimizers",
           "find_accountant", "global_expected_batch_size", "gradient_noise_multiplier",
           "restore_history", "saved_states", "skip_step"]

HOW_TO_WIRE = (
    "Wire Opacus as its Lightning example does: create `self.privacy_engine = PrivacyEngine()` in "
    "your LightningModule and return the optimizer from `self.privacy_engine.make_private(...)` "
    "in `configure_optimizers`, or add the `DifferentialPrivacy` callback (in any order).")


def dp_optimizers(trainer: Any) -> list[DPOptimizer]:
    """The trainer's Opacus DP optimizers; a clear error when there is none."""
    optimizers = list(getattr(trainer, "optimizers", None) or [])
    found = [opt for opt in optimizers if isinstance(opt, DPOptimizer)]
    if not found:
        kinds = ", ".join(type(opt).__name__ for opt in optimizers) or "none"
        raise RuntimeError(f"The privacy callbacks found no Opacus DPOptimizer among the "
                           f"trainer's optimizers (found: {kinds}). {HOW_TO_WIRE}")
    return found


def as_accountant(obj: Any) -> IAccountant:
    """``obj`` (an accountant or a ``PrivacyEngine``) as an accountant, or a clear error."""
    accountant = obj.accountant if isinstance(obj, PrivacyEngine) else obj
    if not isinstance(accountant, IAccountant):
        raise ValueError(f"Unexpected value for accountant: {obj!r}; pass an Opacus accountant "
                         "(e.g. `engine.accountant`) or the `PrivacyEngine` itself")
    return accountant


def find_accountant(trainer: Any, pl_module: Any, explicit: Any = None) -> IAccountant:
    """The accountant given, else that of a ``PrivacyEngine`` on the module or a callback."""
    if explicit is not None:
        return as_accountant(explicit)
    candidates = [getattr(pl_module, "privacy_engine", None), *vars(pl_module).values(),
                  *(getattr(cb, "privacy_engine", None) for cb in trainer.callbacks)]
    for candidate in candidates:
        if isinstance(candidate, PrivacyEngine):
            return candidate.accountant
    raise RuntimeError(f"The privacy callbacks found no Opacus PrivacyEngine on "
                       f"{type(pl_module).__name__} or the trainer's callbacks. {HOW_TO_WIRE} Or "
                       "pass it: PrivacyMonitor(accountant=engine).")


def _hook_rate(hook: Any) -> float | None:
    # Opacus keeps the per-batch rate its accountant hook charges only in the hook's closure
    # (IAccountant.get_optimizer_hook_fn); no public attribute holds that exact float.
    names = getattr(getattr(hook, "__code__", None), "co_freevars", ())
    for name, cell in zip(names, getattr(hook, "__closure__", None) or ()):
        if name == "sample_rate" and isinstance(cell.cell_contents, (int, float)):
            return float(cell.cell_contents)
    return None


class ChargedRate:
    """The sample rate Opacus will charge an optimizer's next step, in a few attribute reads:
    its own hook's ``sample_rate * accumulated``, or what a hook's owner says through
    ``accounted_sample_rate(optimizer, accumulated)``; ``None`` for any other hook. Batches
    accumulated come from the first trained parameter's ``grad_sample`` (a list for several)."""

    __slots__ = ("optimizer", "_hook", "_rate", "_told", "_param")

    def __init__(self, optimizer: DPOptimizer) -> None:
        self.optimizer = optimizer
        self._hook: Any = None
        self._rate: float | None = None
        self._told: Any = None
        self._param: Any = None

    def __call__(self) -> float | None:
        """The rate of the step about to run (its backward passes done)."""
        if self.optimizer.step_hook is not self._hook or self._param is None:
            self._look()
        samples = getattr(self._param, "grad_sample", None)
        if samples is None:
            return None
        accumulated = len(samples) if type(samples) is list else 1
        rate = self._rate  # Opacus' own hook, inline: this runs before every step
        return rate * accumulated if rate is not None else self.at(accumulated)

    def at(self, accumulated: int) -> float | None:
        """The rate of a step that accumulates ``accumulated`` batches."""
        if self._hook is None:
            self._look()
        if self._told is not None:
            rate = self._told(self.optimizer, accumulated)
            return None if rate is None else float(rate)
        return None if self._rate is None else self._rate * accumulated

    def _look(self) -> None:
        optimizer = self.optimizer
        hook = self._hook = getattr(optimizer, "step_hook", None)
        self._told = getattr(getattr(hook, "__self__", None), "accounted_sample_rate", None)
        self._rate = None if self._told is not None or hook is None else _hook_rate(hook)
        self._param = next((p for group in optimizer.param_groups for p in group["params"]
                            if p.requires_grad), None)


def gradient_noise_multiplier(optimizer: DPOptimizer, sigma: float) -> float:
    """The gradient's share of an accounted ``sigma`` that also covers a statistics release
    (``statistics_noise_multiplier``, AdaClip's count): ``(sigma^-2 - sigma_s^-2)^-1/2``."""
    sigma_s = getattr(optimizer, "statistics_noise_multiplier", None)
    if isinstance(optimizer, AdaClipDPOptimizer):
        sigma_s = 2 * optimizer.unclipped_num_std
    if sigma_s is None or sigma <= 0:
        return sigma
    return (sigma ** -2 - sigma_s ** -2) ** -0.5


def global_expected_batch_size(optimizer: DPOptimizer) -> float | None:
    """The expected batch over every rank; Opacus keeps each rank's share on the optimizer."""
    size = getattr(optimizer, "expected_batch_size", None)
    if not size:
        return None
    return float(size) * (optimizer.world_size if isinstance(optimizer, DistributedDPOptimizer)
                          else 1)


def skip_step(optimizer: DPOptimizer) -> None:
    """The optimizer's next step adds no noise, updates nothing and is not accounted."""
    optimizer.signal_skip_step(do_skip=True)


def discard_skipped(optimizer: DPOptimizer) -> None:
    """Drop what a skipped step left: Opacus keeps its clipped sum, which the next step would
    release uncounted."""
    for p in optimizer.params:
        p.summed_grad = None
        p.grad_sample = None
        p.grad = None


_OWNERS = ("PrivacyMonitor", "BudgetGuard")  # the callbacks whose checkpoint state holds it


def saved_states(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The privacy states a Lightning checkpoint holds (any of this package's callbacks')."""
    return [state for key, state in (checkpoint.get("callbacks") or {}).items()
            if isinstance(key, str) and key.startswith(_OWNERS) and isinstance(state, dict)
            and "history" in state]


def restore_history(trainer: Any, accountant: IAccountant, states: list[dict[str, Any]],
                    delta: float, allow_privacy_reset: bool) -> None:
    """Put a checkpoint's history back, failing closed: a resume without privacy state, or with
    another delta or accountant, would under-report epsilon, so it raises unless opted in."""
    if not states and trainer.ckpt_path is None:
        return
    state = next((s for s in states if s.get("delta") == delta), states[0] if states else None)
    current = [tuple(seg) for seg in accountant.history]
    opt_in = "pass allow_privacy_reset=True to the privacy callback to accept it"
    if state is None:
        if current:
            logger.info("Resuming with the accountant's own history (%d steps)",
                        sum(s for _, _, s in current))
        elif not allow_privacy_reset:
            raise RuntimeError(
                f"The checkpoint {trainer.ckpt_path} holds no privacy accounting state, so "
                "epsilon would restart at 0 although the model may already have been trained on "
                "private data. Resume from a checkpoint saved with PrivacyMonitor or "
                "BudgetGuard, restore the accountant with PrivacyEngine.load_checkpoint, or "
                f"{opt_in} (epsilon then counts only the steps from here).")
        else:
            logger.warning("Resuming from %s without privacy state: epsilon restarts at 0 "
                           "(allow_privacy_reset=True)", trainer.ckpt_path)
        return
    saved = [(float(sigma), float(q), int(steps)) for sigma, q, steps in state["history"]]
    if current == saved:
        return  # restored already (by another of our callbacks)
    problems = []
    if state.get("delta") != delta:
        problems.append(f"delta {state.get('delta')!r} in the checkpoint, {delta!r} now")
    if state.get("accountant") not in (None, accountant.mechanism()):
        problems.append(f"accountant {state.get('accountant')!r} in the checkpoint, "
                        f"{accountant.mechanism()!r} now")
    if current:
        problems.append(f"the accountant already holds {sum(s for _, _, s in current)} steps "
                        f"that differ from the checkpoint's {sum(s for _, _, s in saved)}")
    if problems and not allow_privacy_reset:
        raise RuntimeError(f"Resuming from {trainer.ckpt_path}: the privacy state does not match "
                           f"({'; '.join(problems)}). Resume with the same delta and accountant, "
                           f"or {opt_in} (the saved history is carried over).")
    if problems:
        logger.warning("Resuming despite %s (allow_privacy_reset=True)", "; ".join(problems))
    if current:
        return  # opted in: keep what the accountant was given explicitly
    accountant.history = saved
    logger.info("Restored privacy accounting: %d steps from the checkpoint",
                sum(s for _, _, s in saved))
