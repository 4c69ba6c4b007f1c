"""RDP composition from cached per-(sigma, q) vectors: Opacus' own numbers, in microseconds.

A one-step vector depends on (sigma, q) alone and takes Opacus 15-70 ms: it is computed once per
process (:data:`VECTORS`) and the finished segments are summed once (:class:`RdpSum`), in
Opacus' order, so epsilon is bit-identical to ``get_epsilon``. A (sigma, q) not cached yet is
bounded: the subsampled Gaussian's RDP falls with sigma at every order (Opacus' values, sigma
0.3-20, q 1e-3-0.9), so the cached vector of q at the largest sigma' <= sigma, and the
unsubsampled ``alpha / (2 sigma^2)``, both lie above it: their minimum bounds it.
"""

from __future__ import annotations

import bisect
import collections
import math
import threading
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as _analysis

__all__ = ["ORDERS", "VECTORS", "RdpSum", "bounding", "compute", "conversion", "epsilon"]

ORDERS = np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
Segment = tuple[float, float, int]


class Vectors:
    """Exact one-step RDP vectors by (sigma, q) for the process, least recently stored out first."""

    def __init__(self, size: int = 4096) -> None:  # 1.2 kB each
        self._size = size
        self._vectors: collections.OrderedDict[tuple[float, float], np.ndarray] = (
            collections.OrderedDict())
        self._sigmas: dict[float, list[float]] = {}  # q -> cached sigmas, sorted
        self._lock = threading.Lock()

    def get(self, sigma: float, q: float) -> np.ndarray | None:
        with self._lock:
            return self._vectors.get((sigma, q))

    def put(self, sigma: float, q: float, vec: np.ndarray) -> None:
        vec.flags.writeable = False
        with self._lock:
            if (sigma, q) not in self._vectors:
                bisect.insort(self._sigmas.setdefault(q, []), sigma)
            self._vectors[(sigma, q)] = vec
            self._vectors.move_to_end((sigma, q))
            if len(self._vectors) > self._size:
                (old_sigma, old_q), _ = self._vectors.popitem(last=False)
                self._sigmas[old_q].remove(old_sigma)

    def below(self, sigma: float, q: float) -> np.ndarray | None:
        """The vector of ``q`` at the largest cached sigma' <= sigma: above (sigma, q)'s."""
        with self._lock:
            sigmas = self._sigmas.get(q, [])
            i = bisect.bisect_right(sigmas, sigma)
            return self._vectors[(sigmas[i - 1], q)] if i else None

    def clear(self) -> None:
        with self._lock:
            self._vectors.clear()
            self._sigmas.clear()


VECTORS = Vectors()


def compute(sigma: float, q: float) -> np.ndarray:
    """Opacus' ``compute_rdp`` for one step at (sigma, q), cached for the process."""
    vec = VECTORS.get(sigma, q)
    if vec is None:
        vec = np.asarray(_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                               orders=ORDERS))
        VECTORS.put(sigma, q, vec)
    return vec


def bounding(sigma: float, q: float) -> tuple[np.ndarray, bool]:
    """The exact vector of (sigma, q) if cached, else one above it at every order; and which."""
    vec = VECTORS.get(sigma, q)
    if vec is not None:
        return vec, True
    if sigma <= 0 or q <= 0:  # no noise (infinite loss) or nothing sampled: cheap and exact
        return compute(sigma, q), True
    closed = ORDERS / (2.0 * sigma * sigma)
    below = VECTORS.below(sigma, q)
    return (closed if below is None else np.minimum(below, closed)), False


_CONVERSIONS: dict[float, tuple[np.ndarray, np.ndarray]] = {}


def conversion(delta: float) -> tuple[np.ndarray, np.ndarray]:
    """``(sub, add)`` with epsilon at each order ``rdp - sub + add``, as Opacus computes it."""
    found = _CONVERSIONS.get(delta)
    if found is None:
        found = _CONVERSIONS[delta] = ((np.log(delta) + np.log(ORDERS)) / (ORDERS - 1),
                                       np.log((ORDERS - 1) / ORDERS))
    return found


def epsilon(rdp: Any, delta: float) -> float:
    """Opacus' ``get_privacy_spent`` at ``delta``: the same expression and order of operations."""
    if isinstance(rdp, int):  # nothing accounted
        return 0.0
    sub, add = conversion(delta)
    eps = rdp - sub + add
    best = eps.min()
    if best == best:  # no NaN: the minimum is nanargmin's value
        return float(best)
    return math.inf if np.isnan(eps).all() else float(np.nanmin(eps))


class RdpSum:
    """The RDP of a history as it was at one step, for one thread. Opacus only appends or
    replaces the last segment, so finished segments are summed once: exactly (up to the first
    uncached vector) and as an upper bound (bounding vectors where needed)."""

    __slots__ = ("history", "upper_n", "prev", "upper", "upper_steps", "exact_n", "exact",
                 "exact_steps")

    def __init__(self) -> None:
        self.history: list | None = None
        self._reset(None)

    def _reset(self, history: list | None) -> None:
        self.history, self.prev = history, None
        self.upper_n = self.exact_n = self.upper_steps = self.exact_steps = 0
        self.upper: Any = 0
        self.exact: Any = 0

    def total(self, history: list, n: int, last: Segment | None,
              extra: Segment | None = None) -> tuple[Any, bool, int]:
        """RDP (0 for nothing), whether exact, and steps of the first ``n`` segments (the last
        one ``last``), plus ``extra`` merged as Opacus would."""
        done = n - 1 if last is not None else 0
        if (history is not self.history or done < self.upper_n
                or (self.upper_n and history[self.upper_n - 1] is not self.prev)):
            self._reset(history)
        while self.exact_n < done:
            sigma, q, steps = history[self.exact_n]
            vec, exact = bounding(sigma, q)
            if not exact:
                break
            self.exact, self.exact_steps = self.exact + vec * steps, self.exact_steps + steps
            self.exact_n += 1
        if self.exact_n >= self.upper_n:
            self.upper, self.upper_n, self.upper_steps = self.exact, self.exact_n, self.exact_steps
        for i in range(self.upper_n, done):
            sigma, q, steps = history[i]
            self.upper, self.upper_steps = (self.upper + bounding(sigma, q)[0] * steps,
                                            self.upper_steps + steps)
        self.upper_n, self.prev = done, history[done - 1] if done else None
        exact = self.exact_n == done
        rdp, steps = (self.exact, self.exact_steps) if exact else (self.upper, self.upper_steps)
        tail = [] if last is None else [last]
        if extra is not None and extra[2]:
            if tail and tail[0][:2] == extra[:2]:
                tail = [(extra[0], extra[1], tail[0][2] + extra[2])]
            else:
                tail.append(extra)
        for sigma, q, k in tail:
            vec, known = bounding(sigma, q)
            rdp, steps, exact = rdp + vec * k, steps + k, exact and known
        return rdp, exact, steps

    def missing(self, last: Segment | None, limit: int = 8) -> list[tuple[float, float]]:
        """Up to ``limit`` uncached (sigma, q) of the last :meth:`total`'s history and ``last``."""
        history = self.history or []
        keys = [seg[:2] for seg in history[self.exact_n:min(self.upper_n, self.exact_n + limit)]]
        keys += [] if last is None else [last[:2]]
        return [key for key in dict.fromkeys(keys) if VECTORS.get(*key) is None][:limit]
