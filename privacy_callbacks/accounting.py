"""Epsilon from an Opacus accountant, every step, without slowing the step down.

The accountant's history is a run-length list ``(noise_multiplier, sample_rate, steps)``.
For RDP, the privacy loss of a segment is ``steps`` times a per-(sigma, q) vector over the RDP
orders, so the vector is computed once per distinct (sigma, q) (with Opacus' own
``compute_rdp``), the finished segments are summed once, and each step costs one vector multiply,
one add and a ``nanargmin``. The summation order is Opacus' own, so the result is bit-identical to
``RDPAccountant.get_epsilon``.

PRV and GDP have no such shortcut: their epsilon is computed on a background thread from a copy of
the history and published with the accounted step it belongs to. For those accountants the
forecast of steps left and the budget guard use the RDP bound on the same history, which is never
below the true epsilon, so they err on the side of stopping early.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from typing import Any, Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as _rdp_analysis

logger = logging.getLogger(__name__)

__all__ = ["Accounting", "BackgroundAccounting", "RdpAccounting", "make_accounting"]

Segment = tuple[float, float, int]


class _RdpMath:
    """Exact RDP composition over a history, with a cached per-(sigma, q) vector."""

    def __init__(self, delta: float, alphas: Sequence[float] | None = None) -> None:
        self.orders = np.atleast_1d(np.asarray(
            RDPAccountant.DEFAULT_ALPHAS if alphas is None else list(alphas)))
        # Same expression and evaluation order as Opacus' get_privacy_spent.
        self._sub = (np.log(delta) + np.log(self.orders)) / (self.orders - 1)
        self._add = np.log((self.orders - 1) / self.orders)
        self._vectors: dict[tuple[float, float], np.ndarray] = {}
        # Sum of all history segments but the last one, kept between calls.
        self._hist: list | None = None
        self._n_prefix = 0
        self._prefix_last: Segment | None = None
        self._prefix: np.ndarray | int = 0
        self._prefix_steps = 0

    def vector(self, noise_multiplier: float, sample_rate: float) -> np.ndarray:
        key = (noise_multiplier, sample_rate)
        vec = self._vectors.get(key)
        if vec is None:
            vec = _rdp_analysis.compute_rdp(
                q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=self.orders)
            self._vectors[key] = vec
        return vec

    def _sync_prefix(self, history: list) -> None:
        n_prefix = len(history) - 1
        valid = (
            history is self._hist
            and self._n_prefix <= n_prefix
            and (self._n_prefix == 0 or history[self._n_prefix - 1] is self._prefix_last)
        )
        if not valid:
            self._hist, self._n_prefix, self._prefix, self._prefix_steps = history, 0, 0, 0
            self._prefix_last = None
        for i in range(self._n_prefix, n_prefix):
            sigma, q, steps = history[i]
            self._prefix = self._prefix + self.vector(sigma, q) * steps
            self._prefix_steps += steps
            self._prefix_last = history[i]
        self._n_prefix = n_prefix

    def total(self, history: list, extra: Segment | None = None) -> tuple[np.ndarray | int, int]:
        """RDP of ``history`` (plus ``extra`` steps, merged as Opacus would), and its step count."""
        if not history:
            if extra is None or extra[2] == 0:
                return 0, 0
            sigma, q, steps = extra
            return 0 + self.vector(sigma, q) * steps, steps
        self._sync_prefix(history)
        sigma, q, steps = history[-1]
        if extra is not None and extra[2] > 0:
            if (extra[0], extra[1]) == (sigma, q):
                steps = steps + extra[2]
            else:
                rdp = self._prefix + self.vector(sigma, q) * steps
                rdp = rdp + self.vector(extra[0], extra[1]) * extra[2]
                return rdp, self._prefix_steps + steps + extra[2]
        return self._prefix + self.vector(sigma, q) * steps, self._prefix_steps + steps

    def epsilon(self, rdp: np.ndarray | int) -> float:
        if isinstance(rdp, int):
            return 0.0
        eps = rdp - self._sub + self._add
        best = eps[eps.argmin()]
        if best == best:  # no NaN among the orders: argmin is nanargmin
            return float(best)
        if np.isnan(eps).all():
            return math.inf
        return float(eps[np.nanargmin(eps)])

    def steps_until(self, history: list, target: float, noise_multiplier: float,
                    sample_rate: float) -> int | None:
        """Most further steps at (sigma, q) that keep epsilon <= target; None if unbounded."""
        seg = (noise_multiplier, sample_rate)
        if self.epsilon(self.total(history, (*seg, 1))[0]) > target:
            return 0
        vec = self.vector(*seg)
        base, _ = self.total(history)
        base = np.zeros_like(vec) if isinstance(base, int) else base
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.floor((target - self._add + self._sub - base) / vec)
        k = k[np.isfinite(k)]
        if k.size == 0:
            return None
        guess = int(max(0.0, float(k.max())))
        if guess > 10**12:
            return None
        # The closed form can be off by one from floating-point rounding: settle it exactly.
        while guess > 0 and self.epsilon(self.total(history, (*seg, guess))[0]) > target:
            guess -= 1
        while self.epsilon(self.total(history, (*seg, guess + 1))[0]) <= target:
            guess += 1
        return guess


class Accounting:
    """Epsilon for one accountant and delta; :meth:`update` is called once per step.

    Attributes:
        mechanism: The accountant's name (``"rdp"``, ``"prv"``, ``"gdp"``).
        epsilon: Latest epsilon, or ``None`` before the first value is known.
        epsilon_step: The accounted step count ``epsilon`` belongs to.
        steps: Steps accounted so far.
        errors: Failures while computing epsilon.
    """

    mechanism: str

    def __init__(self, accountant: IAccountant, delta: float) -> None:
        self.accountant = accountant
        self.delta = delta
        self.epsilon: float | None = None
        self.epsilon_step = 0
        self.steps = 0
        self.errors = 0
        self._rdp = _RdpMath(delta)
        self._forecast_key: tuple | None = None
        self._forecast_value: float | None = None
        self._exhaustion: tuple | None = None

    def update(self) -> None:
        raise NotImplementedError

    @property
    def orders(self) -> np.ndarray:
        """The RDP orders of :meth:`rdp_after`."""
        return self._rdp.orders

    def rdp_after(self, extra_steps: int, noise_multiplier: float,
                  sample_rate: float) -> np.ndarray | int:
        """RDP over :attr:`orders` after ``extra_steps`` more steps at (sigma, q); 0 if none."""
        return self._rdp.total(self.accountant.history,
                               (noise_multiplier, sample_rate, extra_steps))[0]

    def epsilon_after(self, extra_steps: int, noise_multiplier: float, sample_rate: float) -> float:
        """Epsilon (RDP bound) after ``extra_steps`` more steps at (sigma, q)."""
        rdp, _ = self._rdp.total(self.accountant.history,
                                 (noise_multiplier, sample_rate, extra_steps))
        return self._rdp.epsilon(rdp)

    def steps_until(self, target: float, noise_multiplier: float,
                    sample_rate: float) -> int | None:
        """Further steps at (sigma, q) before epsilon (RDP bound) would pass ``target``."""
        return self._rdp.steps_until(self.accountant.history, target, noise_multiplier,
                                     sample_rate)

    def forecast(self, extra_steps: int, noise_multiplier: float, sample_rate: float) -> float | None:
        """Epsilon after ``extra_steps`` more steps at (sigma, q): the planned end of training."""
        key = (noise_multiplier, sample_rate, len(self.accountant.history), self.steps + extra_steps)
        if key != self._forecast_key:
            # Constant while the same (sigma, q) is accounted towards the same planned end.
            self._forecast_key = key
            self._forecast_value = self.epsilon_after(extra_steps, noise_multiplier, sample_rate)
        return self._forecast_value

    def exhaustion_steps(self, target: float, noise_multiplier: float,
                         sample_rate: float) -> int | None:
        """Cached :meth:`steps_until`: each step at the same (sigma, q) takes exactly one off."""
        key = (noise_multiplier, sample_rate, len(self.accountant.history), target)
        cached = self._exhaustion
        if cached is not None and cached[0] == key:
            left = cached[2]
            if left is None:
                return None
            left -= self.steps - cached[1]
            if left >= 0:
                return left
        left = self.steps_until(target, noise_multiplier, sample_rate)
        self._exhaustion = (key, self.steps, left)
        return left

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until :attr:`epsilon` belongs to the last accounted step."""
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop background work, if any."""


class RdpAccounting(Accounting):
    """Exact RDP epsilon on the calling thread in microseconds."""

    mechanism = "rdp"

    def update(self) -> None:
        history = self.accountant.history
        try:
            rdp, steps = self._rdp.total(history)
            self.epsilon = self._rdp.epsilon(rdp)
        except Exception:  # never raise into the training step
            self.errors += 1
            if self.errors == 1:
                logger.exception("Computing epsilon failed; training continues")
            return
        self.steps = self.epsilon_step = steps


class BackgroundAccounting(Accounting):
    """Epsilon from the accountant's own ``get_epsilon`` on a background thread.

    The training thread only hands over a copy of the history; the worker computes the newest
    one it has and publishes ``(epsilon, epsilon_step)`` together.
    """

    def __init__(self, accountant: IAccountant, delta: float, min_interval: float = 0.5) -> None:
        super().__init__(accountant, delta)
        self.mechanism = accountant.mechanism()
        self.min_interval = min_interval
        self._cv = threading.Condition()
        self._pending: tuple[list, int] | None = None
        self._stopping = False
        self._urgent = False
        self._attempted = 0
        self._forecast_request: tuple[int, float, float] | None = None
        self._forecast: float | None = None
        self._thread: threading.Thread | None = None

    def update(self) -> None:
        history = self.accountant.history
        steps = sum(s for _, _, s in history)
        self.steps = steps
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"privacy-accounting-{self.mechanism}", daemon=True)
                self._thread.start()
            self._pending = (list(history), steps)
            self._cv.notify()

    def forecast(self, extra_steps: int, noise_multiplier: float, sample_rate: float) -> float | None:
        self._forecast_request = (extra_steps, noise_multiplier, sample_rate)
        return self._forecast

    def _clone(self, history: list) -> IAccountant:
        clone = copy.copy(self.accountant)
        clone.history = history
        return clone

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                history, steps = self._pending
                self._pending = None
            try:
                self.epsilon = float(self._clone(history).get_epsilon(self.delta))
                self.epsilon_step = steps
                request = self._forecast_request
                if request is not None and history:
                    extra, sigma, q = request
                    planned = list(history)
                    s_last, q_last, n_last = planned[-1]
                    if extra <= 0:
                        pass
                    elif (s_last, q_last) == (sigma, q):
                        planned[-1] = (sigma, q, n_last + extra)
                    else:
                        planned.append((sigma, q, extra))
                    self._forecast = float(self._clone(planned).get_epsilon(self.delta))
            except Exception:
                self.errors += 1
                if self.errors == 1:
                    logger.exception("Computing %s epsilon failed; training continues",
                                     self.mechanism)
            with self._cv:
                self._attempted = steps
                self._cv.notify_all()
                if self._cv.wait_for(lambda: self._stopping or self._urgent,
                                     timeout=self.min_interval) and self._stopping:
                    return

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until epsilon belongs to the last accounted step."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._urgent = True
            self._cv.notify_all()
            try:
                while self._attempted < self.steps and self._thread is not None:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._thread.is_alive():
                        return False
                    self._cv.wait(left)
            finally:
                self._urgent = False
        return self.epsilon_step >= self.steps

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("The %s accounting thread did not stop within %.1f s",
                               self.mechanism, timeout)
            self._thread = None


_KNOWN = ("rdp", "prv", "gdp")


def make_accounting(accountant: Any, delta: float) -> Accounting:
    """Pick the accounting for ``accountant`` (an Opacus accountant or ``PrivacyEngine``)."""
    accountant = getattr(accountant, "accountant", accountant)
    if not isinstance(accountant, IAccountant):
        raise ValueError(
            f"Unexpected accountant {accountant!r}: pass an Opacus accountant "
            "(RDPAccountant, PRVAccountant, GaussianAccountant) or a PrivacyEngine")
    mechanism = accountant.mechanism()
    if mechanism == "rdp":
        return RdpAccounting(accountant, delta)
    if mechanism not in _KNOWN:
        logger.warning("Unknown accountant mechanism %r: epsilon comes from its get_epsilon on "
                       "a background thread", mechanism)
    return BackgroundAccounting(accountant, delta)
