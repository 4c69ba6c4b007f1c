"""A privacy audit in one training run (Steinke, Nasr, Jagielski, NeurIPS 2023).

m *canaries*, each included by a fair coin only the auditor knows; an attack guesses "in" for
the k+ highest-scored, "out" for the k- lowest. Under (epsilon, delta)-DP, Theorem 5.2 bounds
the correct guesses v of r = k+ + k- (:func:`p_value`): the largest epsilon rejected at
``confidence`` is a lower bound on the true one, which above the reported epsilon proves the
guarantee false. Canary i is ``±C`` on one coordinate (a clipped record), drawn each step at the
charged rate and added after Opacus' noise, before its scaling, as a sampled record is (a
skipped step adds none); coins, coordinates, signs and draws come from the operating system. It
scores ``-sign_i * (theta_i(now) - theta_i(start))``; (k+, k-) come from a fixed grid (Bonferroni).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from scipy.optimize import brentq
from scipy.stats import binom

from .. import checks, opacus_compat

logger = logging.getLogger(__name__)

__all__ = ["AuditResult", "OneRunAudit", "audit", "epsilon_lower_bound", "p_value"]

# Fractions of m guessed "in" (top scores); "out" guesses are either none or as many.
_GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
_EPS_MAX = 50.0  # p rounds to 1 in double precision there: p_value is 1


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Largest P[>= v of r guesses right] on m canaries under (epsilon, delta)-DP (Theorem 5.2):
    ``P[B >= v] + 2 m delta max_{i=1..v} P[v > B >= v - i] / i``, B ~ Bin(r, e^eps/(1+e^eps))."""
    for name, value, most in (("r", r, m), ("v", v, r)):
        checks.number(name, value, f"a count in [0, {most}]", low_ok=True, high=most,
                      high_ok=True, integer=True)
    checks.number("epsilon", epsilon, "a number >= 0", low_ok=True)
    checks.number("delta", delta, "a probability", low_ok=True, high=1, high_ok=True)
    p = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    if delta > 0 and v > 0:  # P[v > B >= v - i] for i = 1..v: cumulative sums below v
        below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, p))
        beta += 2.0 * m * delta * float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, beta)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, *,
                        confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct of ``r`` guesses reject at ``confidence`` (0 when
    even 0 is not): just below the root of :func:`p_value` (it grows with epsilon) at
    ``1 - confidence``, so that ``p_value(result) < 1 - confidence``."""
    alpha = 1.0 - checks.number("confidence", confidence, "a probability in (0, 1), e.g. 0.95",
                                high=1)
    if r == 0 or p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    root = brentq(lambda eps: p_value(m, r, v, eps, delta) - alpha, 0.0, _EPS_MAX, xtol=1e-7)
    return max(0.0, root - 1e-6)  # brentq's root is within xtol of the true one


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Epsilon the run provably exceeds at ``confidence`` and ``delta`` (0: nothing shown),
    from ``correct`` of ``guesses`` guesses on ``canaries`` (v, r, m)."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    guesses: int
    correct: int

    @property
    def accuracy_bound(self) -> float:
        """The guess accuracy proven, ``e^eps / (1 + e^eps)`` (0.5 = chance)."""
        return 1.0 / (1.0 + math.exp(-self.epsilon_lower_bound))


def audit(scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray,
          delta: float, *, confidence: float = 0.95) -> AuditResult:
    """The one-run bound from canary ``scores`` (higher: more likely included) and their coins,
    at the best ``(k+, k-)`` of the grid (the confidence is split over it: Bonferroni)."""
    s, coins = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = s.size
    if m == 0 or coins.shape != s.shape:
        raise ValueError(f"audit needs one coin per score: got {s.size} scores and "
                         f"{coins.size} coins")
    ranked = coins[np.argsort(s, kind="stable")]  # ascending score
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

    Scores ``canaries`` canaries (module docstring) at the end of training: ``result``, an
    :class:`AuditResult`, published by a :class:`~privacy_callbacks.PrivacyMonitor` in the
    Trainer as ``privacy_audit_epsilon_lower_bound`` and ``privacy_attack_score{attack_type=
    "one_run_audit"}``, logged as an error above the accountant's epsilon (a correct run's is far
    below: ``benchmarks/bench_audit.py``). A canary costs utility like a record: use far fewer
    than parameters. Under DDP they live on rank 0; a resumed fit is refused.

    Args:
        delta: The bound's delta: the monitor's. ``confidence``: the bound's confidence.
        canaries: m; more give a tighter bound (1000 is typical).
        at_validation: Also audit at the end of every validation; k looks raise a correct run's
            chance of a bound above its epsilon k-fold.
    """

    attack_type = "one_run_audit"

    def __init__(self, delta: float, canaries: int = 1000, *, confidence: float = 0.95,
                 at_validation: bool = False) -> None:
        self.delta = checks.number("delta", delta, "a number in (0, 1): the monitor's", high=1)
        self.canaries = checks.number("canaries", canaries, "an int >= 2, e.g. 1000", low=2,
                                      low_ok=True, integer=True)
        self.confidence = checks.number("confidence", confidence, "a probability in [0.5, 1), "
                                        "e.g. 0.95", low=0.5, low_ok=True, high=1)
        self.at_validation = checks.flag("at_validation", at_validation)
        self.result: AuditResult | None = None
        self._accountant: Any = None
        # The optimizer, our add_noise on it (None: canaries out), another part's put first.
        self._optimizer: Any = None
        self._wrapper: Any = None
        self._previous: Any = None
        self._coins = self._signs = np.empty(0)  # per canary, in the order of _where
        # Per parameter with canaries: it, their coordinates, start values and sign * coin.
        self._where: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def score(self) -> float | None:
        """``privacy_attack_score``: the guess accuracy proven (0.5 = none); ``None`` before."""
        return None if self.result is None else self.result.accuracy_bound

    @property
    def epsilon_lower_bound(self) -> float | None:
        return None if self.result is None else self.result.epsilon_lower_bound

    def privacy_values(self) -> Mapping[str, Any]:
        r = self.result  # read once: the publisher thread sees one result
        return {} if r is None else {"attack_scores": {self.attack_type: r.accuracy_bound},
                                     "audit_epsilon_lower_bound": r.epsilon_lower_bound}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._accountant = opacus_compat.find_accountant(trainer, pl_module)
        except RuntimeError:  # given to the monitor only: no epsilon to compare with
            self._accountant = None
        if trainer.global_step or trainer.ckpt_path is not None or (
                self._accountant is not None and self._accountant.history):
            raise ValueError("OneRunAudit must see the whole training run: a resumed fit's earlier "
                             "part saw no canaries. Start a new fit with it.")
        self.result = None
        if trainer.is_global_zero:
            self._plant(opacus_compat.dp_optimizers(trainer)[0])

    def _plant(self, optimizer: Any) -> None:
        """Coordinates, signs and coins from the operating system; then wrap ``add_noise``."""
        params = [p for p in optimizer.params if p.requires_grad]
        sizes = np.array([p.numel() for p in params])
        total, m = int(sizes.sum()), self.canaries
        if m > total:
            raise ValueError(f"Unexpected value for canaries: {m}; use at most the model's {total} "
                             "trainable parameters (one each; far fewer keeps its utility)")
        rng = np.random.default_rng(secrets.randbits(128))
        flat = np.sort(rng.choice(total, size=m, replace=False))
        self._coins = rng.random(m) < 0.5
        self._signs = np.where(rng.random(m) < 0.5, -1.0, 1.0)
        ends, device = np.cumsum(sizes), params[0].device
        self._where = []  # flat is sorted: each parameter's canaries are consecutive
        for p, end, mine in zip(params, ends, np.split(np.arange(m), np.searchsorted(flat, ends))):
            if mine.size:
                coords = torch.as_tensor(flat[mine] - (end - p.numel()), device=device)
                self._where.append((p, coords, p.detach().reshape(-1)[coords].clone(),
                                    torch.as_tensor(self._signs[mine] * self._coins[mine],
                                                    dtype=p.dtype, device=device)))
        generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        rate = opacus_compat.ChargedRate(optimizer)
        # Opacus has no hook between its noise and its scaling: wrap add_noise on the instance.
        original, self._optimizer = optimizer.add_noise, optimizer
        self._previous = vars(optimizer).get("add_noise")

        def add_noise(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if self._wrapper is add_noise:  # a wrapper put over ours outlives it: inert then
                self._add_canaries(float(optimizer.max_grad_norm), rate(), generator)
            return result

        optimizer.add_noise = self._wrapper = add_noise

    def _add_canaries(self, c: float, q: float | None, generator: torch.Generator) -> None:
        """Each included canary, drawn at the charged rate ``q``, adds ``sign * C`` to its
        coordinate of the noised sum, on the device (no host synchronisation)."""
        if q is None:
            return  # a rate no one charges: a canary drawn at a guess of it would be unaccounted
        for p, coords, _, weight in self._where:  # an excluded canary's weight is 0
            if p.grad is not None:
                drawn = torch.rand(coords.numel(), generator=generator, device=p.device) < q
                p.grad.view(-1).index_add_(0, coords, weight * drawn * c)

    def _uninstall(self) -> None:
        optimizer, wrapper, self._wrapper = self._optimizer, self._wrapper, None
        if optimizer is not None and vars(optimizer).get("add_noise") is wrapper:
            del optimizer.add_noise  # the class's method again, or what was there before ours
            if self._previous is not None:
                optimizer.add_noise = self._previous
        self._optimizer = self._previous = None

    def measure(self) -> AuditResult:
        """Score the canaries on the model as it is now and compute the bound."""
        if not self._where:
            raise RuntimeError("OneRunAudit.measure() runs on global rank 0 once training began")
        with torch.no_grad():
            moved = np.concatenate([(p.detach().reshape(-1)[coords] - start).double().cpu().numpy()
                                    for p, coords, start, _ in self._where])
        return audit(-self._signs * moved, self._coins, self.delta, confidence=self.confidence)

    def _report(self) -> None:
        if self._wrapper is None:
            return
        self.result = r = self.measure()
        try:  # no accountant, or it failed (the monitor counts that): the audit stands
            reported = f"{float(self._accountant.get_epsilon(self.delta)):.4g}"
        except Exception:
            reported = "unknown"
        broken = reported != "unknown" and r.epsilon_lower_bound > float(reported)
        logger.log(logging.ERROR if broken else logging.INFO, "Privacy audit: epsilon >= %.4g "
                   "(%.0f%% confidence, %d/%d correct guesses on %d canaries; reported epsilon "
                   "%s at delta=%g)%s", r.epsilon_lower_bound, 100 * r.confidence, r.correct,
                   r.guesses, r.canaries, reported, r.delta, ": the mechanism is weaker than "
                   "reported (noise, rate or accounting wrong). Do not release this model."
                   if broken else "")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_validation and not trainer.sanity_checking:
            self._report()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report()  # the monitor reads reporters once more at on_fit_end, after this
        self._uninstall()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._uninstall()
