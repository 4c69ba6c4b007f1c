"""A privacy audit in one training run (Steinke, Nasr, Jagielski, NeurIPS 2023).

"Privacy Auditing with One (1) Training Run" turns one training run into a statistical test of
the run's own (epsilon, delta) claim. m *canaries* are each included in training by an
independent fair coin that only the auditor knows. After training, an attack scores each
canary, guesses "in" for the ``k+`` highest scores and "out" for the ``k-`` lowest (abstaining
on the rest), and counts its correct guesses. If the run is (epsilon, delta)-DP with respect to
each canary, the paper's Theorem 5.2 bounds the count: for all ``v``,

    P[correct >= v] <= P[Binomial(r, p) >= v]
                       + 2 m delta * max_{i=1..v} P[v > Binomial(r, p) >= v - i] / i,

with ``r = k+ + k-`` guesses and ``p = e^epsilon / (1 + e^epsilon)`` (the accuracy of
epsilon-DP randomised response). Every epsilon whose right-hand side is below ``1 - confidence``
at the observed count is rejected; the largest rejected epsilon is a lower bound on the run's
true epsilon at that confidence. A lower bound above the epsilon the accountant reports means
the reported guarantee is false (noise off, a wrong noise multiplier or sample rate, steps not
accounted): :class:`OneRunAudit` measures it and the ``PrivacyAttackDetected`` alert fires.

Canaries here are *gradient-space Dirac canaries*: canary ``i`` is a record whose per-sample
gradient is ``±C`` on one coordinate of the model's parameters (its norm is the clipping norm
``C``: the largest a clipped per-sample gradient can be). In every optimizer step each included
canary is drawn with the sample rate ``q`` the accountant charges, independently (Poisson
sampling), and its gradient is added to the clipped sum before Opacus scales it, exactly as a
sampled record's clipped gradient is. The run is therefore DP-SGD over the training set plus the
included canaries, at the accounted (sigma, q, steps):

* each real record's guarantee is unchanged: DP-SGD's analysis holds for any neighbouring
  datasets, and canaries are data-independent records that neither replace nor resample real
  ones (the sampler, the clipping and the noise of real records are untouched; Opacus normalises
  by the *expected* batch size, which canaries do not change);
* each canary gets the same guarantee as a record, which is what makes the test valid.

The coins, the coordinates, the signs and the per-step draws come from a generator seeded by the
operating system (``secrets``): no seed reset or resume can replay them. What is released is
post-processing of the model (scores) and of those secret, data-independent coins.

The canaries are scored ``-sign_i * (theta_i(now) - theta_i(start))``: a gradient step moves a
parameter against its gradient, so an included canary pushes its coordinate away from its sign.
The attack picks ``k+`` and ``k-`` among a fixed grid of fractions of m and pays for the choice
with a Bonferroni correction (the confidence is split over the grid), so the bound holds for the
best choice. Only the count of correct guesses leaves the audit.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from scipy.stats import binom

from . import probe

logger = logging.getLogger(__name__)

__all__ = ["AuditResult", "OneRunAudit", "audit", "epsilon_lower_bound", "p_value"]

# Fractions of m guessed "in" (top scores); "out" guesses are either none or as many.
_GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
_EPS_MAX = 50.0  # beyond this p rounds to 1 in double precision: "at least 50"


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Largest probability of ``>= v`` correct guesses out of ``r`` under (epsilon, delta)-DP.

    Theorem 5.2 of Steinke, Nasr, Jagielski (2023): the correct-guess count of any auditor is
    stochastically dominated by Binomial(r, e^epsilon / (1 + e^epsilon)), up to the delta term
    ``2 m delta max_i P[v > Binomial >= v - i] / i``.

    Args:
        m: Canaries, each included by an independent fair coin.
        r: Guesses made (abstentions excluded), ``0 <= r <= m``.
        v: Correct guesses, ``0 <= v <= r``.
        epsilon: Epsilon of the null hypothesis, ``>= 0``.
        delta: Delta of the null hypothesis, in [0, 1].
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"Unexpected counts m={m!r}, r={r!r}, v={v!r}: need 0 <= v <= r <= m")
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise ValueError(f"Unexpected null hypothesis epsilon={epsilon!r}, delta={delta!r}: "
                         "need epsilon >= 0 and delta in [0, 1]")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    if delta > 0 and v > 0:
        # P[v > B >= v - i] for i = 1..v, as cumulative sums of the pmf below v.
        below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, p))
        alpha = float(np.max(below / np.arange(1, v + 1)))
        beta += 2.0 * m * delta * alpha
    return min(1.0, beta)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, *,
                        confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct guesses out of ``r`` reject at ``confidence``.

    Bisection on :func:`p_value`, which grows with epsilon: the result ``e`` has
    ``p_value(e) < 1 - confidence`` (to 1e-6), so the run is not (e, delta)-DP at that confidence.
    0 when even epsilon = 0 is not rejected.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"Unexpected value for confidence: {confidence!r}; use e.g. 0.95")
    alpha = 1.0 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < alpha:
        low, high = high, 2 * high
        if high > _EPS_MAX:
            return _EPS_MAX
    while high - low > 1e-6:
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < alpha:
            low = mid
        else:
            high = mid
    return low


class AuditResult:
    """What one audit found.

    Attributes:
        epsilon_lower_bound: Epsilon the run provably exceeds at ``confidence`` (0: nothing shown).
        confidence: The confidence of the bound.
        delta: The delta the bound holds for.
        canaries: m, canaries audited.
        guesses: r, guesses made by the best grid point.
        correct: v, correct guesses among them.
        accuracy_bound: ``e^eps / (1 + e^eps)`` at the lower bound: the accuracy of the audit's
            guesses proven at ``confidence`` (0.5 = chance); exported as ``privacy_attack_score``.
    """

    __slots__ = ("epsilon_lower_bound", "confidence", "delta", "canaries", "guesses", "correct")

    def __init__(self, epsilon_lower_bound: float, confidence: float, delta: float,
                 canaries: int, guesses: int, correct: int) -> None:
        self.epsilon_lower_bound = epsilon_lower_bound
        self.confidence = confidence
        self.delta = delta
        self.canaries = canaries
        self.guesses = guesses
        self.correct = correct

    @property
    def accuracy_bound(self) -> float:
        return 1.0 / (1.0 + math.exp(-self.epsilon_lower_bound))

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return (f"AuditResult(epsilon_lower_bound={self.epsilon_lower_bound:.4g}, "
                f"correct={self.correct}/{self.guesses}, canaries={self.canaries})")


def audit(scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray,
          delta: float, *,
          confidence: float = 0.95) -> AuditResult:
    """The one-run bound from canary ``scores`` (higher: more likely included) and their coins.

    Guesses "in" for the ``k+`` highest scores and "out" for the ``k-`` lowest, for every ``k+``
    in a fixed grid of fractions of m and ``k-`` either 0 or ``k+``; the confidence is split over
    the grid (Bonferroni), so the best grid point's bound holds at ``confidence``.
    """
    s = np.asarray(scores, dtype=float)
    coins = np.asarray(included, dtype=bool)
    m = s.size
    if m == 0 or coins.shape != s.shape:
        raise ValueError(f"audit needs one coin per score: got {s.size} scores and "
                         f"{coins.size} coins")
    order = np.argsort(s, kind="stable")
    ranked = coins[order]  # ascending score
    grid = sorted({(k, k_out) for f in _GUESS_FRACTIONS for k in [max(1, int(f * m))]
                   for k_out in (0, k) if 2 * k <= m or k_out == 0})
    level = 1.0 - (1.0 - confidence) / len(grid)
    best = AuditResult(0.0, confidence, delta, m, 0, 0)
    for k_in, k_out in grid:
        correct = int(ranked[m - k_in:].sum()) + int((~ranked[:k_out]).sum())
        bound = epsilon_lower_bound(m, k_in + k_out, correct, delta, confidence=level)
        if bound > best.epsilon_lower_bound:
            best = AuditResult(bound, confidence, delta, m, k_in + k_out, correct)
    return best


class OneRunAudit(Callback):
    """Audits the run's privacy claim with canaries, in the same training run (opt-in).

    Adds ``canaries`` gradient-space canaries (see :mod:`privacy_callbacks.privacy_audit`), half
    of them (by secret coins) trained on, and scores them after training: the result is a lower
    bound on the run's true epsilon at ``confidence``, exported through the
    :class:`~privacy_callbacks.PrivacyMonitor` of the same trainer as
    ``privacy_audit_epsilon_lower_bound`` and ``privacy_attack_score{attack_type="one_run_audit"}``,
    written to its audit trail (event ``privacy_audit``) and compared with the reported epsilon:
    a bound above it is logged as an error (and ``PrivacyAttackDetected`` fires from the rules).

    Canaries do not change the guarantee of the real records (module docstring). They do take
    one coordinate each from the model's updates, with the size of one clipped record sampled at
    ``q``: use far fewer canaries than parameters and expect them to cost utility like as many
    extra, meaningless records.

    The bound is a *lower* bound: a correct run shows a bound far below its epsilon (how far, for
    a few settings, is in ``benchmarks/RESULTS.md``); a bound above it is proof at
    ``confidence`` that the mechanism is weaker than reported.

    Args:
        canaries: m, the number of canaries; more give a tighter bound (1000 is typical).
        confidence: Confidence of the lower bound.
        at_validation: Also audit at the end of every validation. Each look is its own test at
            ``confidence``: k looks raise the chance that a correct run's bound passes its
            epsilon somewhere to at most k times ``1 - confidence``. The bound at the end of
            training is the one written to the audit trail.

    Attributes:
        result: The latest :class:`AuditResult`, ``None`` before the first audit.
    """

    attack_type = "one_run_audit"

    def __init__(self, canaries: int = 1000, *, confidence: float = 0.95,
                 at_validation: bool = False) -> None:
        if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
            raise ValueError(f"Unexpected value for canaries: {canaries!r}; use an int >= 2, "
                             "e.g. 1000")
        if isinstance(confidence, bool) or not isinstance(confidence, float) or not (
                0.5 <= confidence < 1):
            raise ValueError(f"Unexpected value for confidence: {confidence!r}; use a "
                             "probability in [0.5, 1), e.g. 0.95")
        if not isinstance(at_validation, bool):
            raise ValueError(f"Unexpected value for at_validation: {at_validation!r}; use True "
                             "or False")
        self.canaries = canaries
        self.confidence = confidence
        self.at_validation = at_validation
        self.result: AuditResult | None = None
        self._monitor: Any = None
        self._optimizer: Any = None
        self._wrapper: Any = None
        self._previous: Any = None
        self._active = False
        self._coins: np.ndarray | None = None
        self._signs: np.ndarray | None = None
        self._params: list[torch.nn.Parameter] = []
        self._where: list[tuple[int, torch.Tensor]] = []  # (param index, flat coordinates)
        self._slots: list[tuple[int, torch.Tensor, torch.Tensor, slice]] = []
        self._start: list[torch.Tensor] = []
        self._generator: torch.Generator | None = None
        self._n_in = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(canaries=self.canaries, confidence=self.confidence)

    @property
    def score(self) -> float | None:
        """``privacy_attack_score``: the guess accuracy proven at ``confidence`` (0.5 = none)."""
        return None if self.result is None else self.result.accuracy_bound

    @property
    def epsilon_lower_bound(self) -> float | None:
        return None if self.result is None else self.result.epsilon_lower_bound

    # -- lifecycle ---------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from .metrics import PrivacyMetrics  # it imports this module's siblings
        from .monitor import PrivacyMonitor

        # Lightning's connectors set Trainer.callbacks; the class does not declare it.
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        self._monitor = next((cb for cb in callbacks
                              if isinstance(cb, (PrivacyMonitor, PrivacyMetrics))), None)
        if self._monitor is None:
            raise ValueError("OneRunAudit needs a PrivacyMonitor (or PrivacyMetrics) in the same "
                             "Trainer: it compares its bound with the monitor's epsilon and "
                             "exports through it. Add "
                             "PrivacyMonitor(delta=...) to callbacks.")
        accounting = self._monitor.accounting
        if trainer.global_step or accounting is None or accounting.steps:
            raise ValueError("OneRunAudit must see the whole training run: it cannot audit a "
                             "resumed fit (the canaries' coins of the earlier part are gone). "
                             "Start a new fit with it.")
        optimizers = probe.find_dp_optimizers(trainer)
        self._optimizer = optimizers[0]
        self._active = trainer.is_global_zero  # under DDP the canaries live on rank 0 only
        if not self._active:
            return
        self._plant(self._optimizer)
        self._install(self._optimizer)

    def _plant(self, optimizer: Any) -> None:
        """Pick coordinates, signs and coins from the operating system's randomness."""
        params = [p for p in optimizer.params if p.requires_grad]
        sizes = np.array([p.numel() for p in params])
        total = int(sizes.sum())
        m = self.canaries
        if m > total:
            raise ValueError(f"Unexpected value for canaries: {m}; the model has {total} "
                             f"trainable parameters and each canary needs its own: use at most "
                             f"{total} (far fewer keeps the model's utility)")
        rng = np.random.default_rng(secrets.randbits(128))
        flat = np.sort(rng.choice(total, size=m, replace=False))
        self._coins = rng.random(m) < 0.5
        self._signs = np.where(rng.random(m) < 0.5, -1.0, 1.0)
        owner = np.searchsorted(np.cumsum(sizes), flat, side="right")
        offset = flat - np.concatenate([[0], np.cumsum(sizes)[:-1]])[owner]
        device = params[0].device
        self._params = params
        self._where, self._slots, self._start = [], [], []
        included = np.flatnonzero(self._coins)
        start = 0
        for index in np.unique(owner):
            mine = np.flatnonzero(owner == index)
            coords = torch.as_tensor(offset[mine], dtype=torch.long, device=device)
            self._where.append((int(index), coords))
            self._start.append(params[index].detach().reshape(-1)[coords].clone())
            ins = np.intersect1d(mine, included)
            if ins.size:
                sl = slice(start, start + ins.size)
                start += ins.size
                self._slots.append((int(index),
                                    torch.as_tensor(offset[ins], dtype=torch.long, device=device),
                                    torch.as_tensor(self._signs[ins],
                                                    dtype=params[index].dtype, device=device),
                                    sl))
        self._n_in = start
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(secrets.randbits(63))

    def _install(self, optimizer: Any) -> None:
        original = optimizer.add_noise
        self._previous = optimizer.__dict__.get("add_noise")

        def add_noise(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            self._add_canaries(optimizer)
            return result

        self._wrapper = add_noise
        optimizer.add_noise = add_noise

    def _add_canaries(self, optimizer: Any) -> None:
        """Add each included canary drawn at rate q: ``sign * C`` on its coordinate of p.grad.

        Device-side only (no host synchronisation): the draw uses a device generator.
        """
        q = probe.accounted_sample_rate(optimizer)
        if q is None or not self._slots or self._generator is None:
            return
        c = float(optimizer.max_grad_norm)
        device = self._params[0].device
        drawn = torch.rand(self._n_in, generator=self._generator, device=device) < q
        for index, coords, signs, sl in self._slots:
            grad = self._params[index].grad
            if grad is None:
                continue
            grad.view(-1).index_add_(0, coords, signs * drawn[sl].to(signs.dtype) * c)

    def _uninstall(self) -> None:
        optimizer, wrapper = self._optimizer, self._wrapper
        if optimizer is None or wrapper is None:
            return
        if optimizer.__dict__.get("add_noise") is wrapper:
            if self._previous is not None:
                optimizer.add_noise = self._previous
            else:
                optimizer.__dict__.pop("add_noise", None)
        self._wrapper = self._previous = None

    def measure(self) -> AuditResult:
        """Score the canaries on the model as it is now and compute the bound."""
        if self._coins is None or self._signs is None or self._monitor is None:
            raise RuntimeError("OneRunAudit.measure() runs only during a fit, after training "
                               "started")
        scores = np.empty(self.canaries)
        position = 0
        with torch.no_grad():
            for (index, coords), start in zip(self._where, self._start):
                moved = self._params[index].detach().reshape(-1)[coords] - start
                n = coords.numel()
                scores[position:position + n] = moved.double().cpu().numpy()
                position += n
        scores = -self._signs * scores
        return audit(scores, self._coins, self._monitor.delta, confidence=self.confidence)

    def _report(self, trainer: pl.Trainer, final: bool) -> None:
        if not self._active or self._coins is None:
            return
        self.result = result = self.measure()
        monitor = self._monitor
        accounting = monitor.accounting
        if accounting is not None:
            accounting.settle(timeout=10.0)
        reported = accounting.epsilon if accounting is not None else None
        contradicted = reported is not None and result.epsilon_lower_bound > reported
        if final:
            monitor.audit_event("privacy_audit", **result.as_dict(), reported_epsilon=reported,
                                steps_accounted=accounting.steps if accounting else None,
                                contradicted=contradicted)
        if contradicted:
            logger.error(
                "Privacy audit: the run's epsilon is at least %.4g (%.0f%% confidence, %d/%d "
                "correct guesses on %d canaries), above the reported epsilon %.4g at delta=%g: "
                "the privacy mechanism is weaker than reported (noise, sample rate or accounting "
                "is wrong). Do not release this model.", result.epsilon_lower_bound,
                100 * result.confidence, result.correct, result.guesses, result.canaries,
                reported, result.delta)
        else:
            logger.info("Privacy audit: epsilon lower bound %.4g (reported %s)",
                        result.epsilon_lower_bound,
                        "unknown" if reported is None else f"{reported:.4g}")
        monitor.refresh()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_validation or trainer.sanity_checking:
            return
        self._report(trainer, final=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before on_fit_end, so the fit-end record and the final export carry the result.
        self._report(trainer, final=True)
        self._uninstall()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._uninstall()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._uninstall()
