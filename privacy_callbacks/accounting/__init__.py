"""Epsilon of one Opacus accountant at one delta, every step, never below the accountant's own.

* RDP: exact from cached vectors in microseconds (:mod:`.rdp`); a (sigma, q) not cached yet is
  bounded until the worker has its vector.
* PRV, GDP: ``get_epsilon`` takes ms to s, so the worker computes it for the step training will
  have reached by then (epsilon grows with the steps), which bounds every earlier step of the
  stretch and is exact once training gets there; before that, :mod:`.bounds`.

The guard asks :meth:`Accounting.bound_count` (sound, cached, training thread) and
:meth:`Accounting.exact_count` (the accountant's own, worker) how many steps fit a target.
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
import math
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import rdp
from .background import ChildUnavailable, Worker
from .bounds import PRV_DELTA, PRV_MARGIN, advantage_from_epsilon, advantage_from_mu, \
    advantage_from_rdp, gdp_bound, gdp_mu
from .child import count, extended, last_fitting

logger = logging.getLogger(__name__)

__all__ = ["Accounting", "Epsilon", "View"]

Segment = tuple[float, float, int]
View = tuple[list, int, "Segment | None"]  # a history as it was: (list, segments then, last)


@dataclass(frozen=True, slots=True)
class Epsilon:
    """An epsilon, the accounted step count it is for, and whether it is exact (else a bound)."""

    value: float
    step: int
    exact: bool


def _key(history: list, n: int) -> tuple[int, Any]:
    """What identifies a view's finished segments: Opacus only appends or replaces the last."""
    return n, history[n - 2] if n > 1 else None


class Accounting:
    """Epsilon for one accountant and delta; a lock keeps the publisher, training and worker
    threads apart.

    Attributes:
        latest: The newest :class:`Epsilon` (replaced whole, never changed).
        listener: Called from the worker with a better :class:`Epsilon` for ``latest``'s step.
        errors: Failures computing epsilon (counted, logged once, never raised).
    """

    def __init__(self, accountant: Any, delta: float) -> None:
        self.accountant = accountant
        self.delta = delta
        self.mechanism: str = accountant.mechanism()
        self.errors = 0
        self.latest: Epsilon | None = None
        self.listener: Callable[[Epsilon], None] | None = None
        self._rdp = self.mechanism == "rdp"
        self._gdp = self.mechanism == "gdp"
        self._rdp_delta = delta * PRV_DELTA if self.mechanism == "prv" else delta
        self._margin = PRV_MARGIN if self.mechanism == "prv" else 0.0
        self._bounded = self._rdp or self.mechanism == "prv"  # an RDP sum bounds epsilon
        self._worker = Worker(f"privacy-accounting-{self.mechanism}")
        self._lock = threading.RLock()
        # One running sum per user: publisher, guard, worker jobs, the latest view.
        self._sum, self._guard_sum, self._job_sum, self._latest_sum = (
            rdp.RdpSum(), rdp.RdpSum(), rdp.RdpSum(), rdp.RdpSum())
        self._view: View | None = None  # latest's
        self._known: collections.deque[tuple] = collections.deque(maxlen=8)  # get_epsilon's
        # PRV, GDP: steps a second, seconds a get_epsilon, (when, steps) of the last look.
        self._rate = self._cost = 0.0
        self._mark: tuple[float, int] | None = None
        self._forecast: tuple[tuple, float] | None = None

    def view(self) -> View:
        """The history as it is now, for :meth:`epsilon` later (microseconds)."""
        history = self.accountant.history
        n = len(history)
        return history, n, history[n - 1] if n else None

    def prepare(self, sigma: float, q: float) -> None:
        """Compute the vectors a fit starts with now (~0.1 s each, once per process)."""
        if not self._bounded:
            return
        history = self.accountant.history
        keys = list(dict.fromkeys([(sigma, q), *(seg[:2] for seg in history[-4:])]))
        for key in keys:
            rdp.compute(*key)
        rest = [seg[:2] for seg in history if rdp.VECTORS.get(*seg[:2]) is None]
        if rest:
            self._worker.submit("vectors", 5, lambda: self._vectors(list(dict.fromkeys(rest))))

    def epsilon(self, view: View | None = None) -> Epsilon | None:
        """Epsilon of ``view`` (the history now by default); ``None`` if computing failed."""
        history, n, last = view = self.view() if view is None else view
        try:
            with self._lock:
                value = self._value(view, self._sum)
                latest = self.latest
                if (latest is not None and latest.exact and not value.exact
                        and latest.step == value.step and self._view is not None
                        and self._view[0] is history):
                    value = latest  # the worker's exact value for this very step
                elif (latest is None or value.step >= latest.step
                        or self._view is None or self._view[0] is not history):
                    self.latest, self._view = value, view
        except Exception:
            self._failed("Computing epsilon")
            return None
        if not value.exact:
            self._request(view)
        return value

    def _value(self, view: View, sums: rdp.RdpSum) -> Epsilon:
        history, n, last = view
        if last is None:
            return Epsilon(0.0, 0, True)
        if self._gdp:  # one segment: Opacus' GDP refuses a changing sigma or q
            steps = sum(s for _, _, s in history[:n - 1]) + last[2]
            best = gdp_bound(last[0], last[1], steps, self.delta)
        else:
            total, exact, steps = sums.total(history, n, last)
            best = rdp.epsilon(total, self._rdp_delta) + self._margin if self._bounded \
                else math.inf
            if self._rdp:
                return Epsilon(best, steps, exact)
        key = _key(history, n)
        for k_key, sigma, q, k, value in self._known:
            if k_key[0] == key[0] and k_key[1] is key[1] and (sigma, q) == last[:2] \
                    and k >= last[2]:
                if k == last[2]:
                    return Epsilon(value, steps, True)
                best = min(best, value)
        return Epsilon(best, steps, False)

    def _request(self, view: View) -> None:
        """Ask the worker for what makes ``view``'s value exact."""
        history, n, last = view
        if self._bounded:
            with self._lock:
                self._sum.total(history, n, last)
                missing = self._sum.missing(last)
            if missing:
                self._worker.submit("vectors", 5, lambda: self._vectors(missing))
        if not self._rdp and last is not None:
            now, mark = time.monotonic(), self._mark
            if mark is None or last[2] < mark[1]:
                self._mark = (now, last[2])
            elif now - mark[0] >= 0.2:
                rate = (last[2] - mark[1]) / (now - mark[0])
                self._rate, self._mark = 0.7 * self._rate + 0.3 * rate, (now, last[2])
            ahead = 1 + math.ceil(2 * self._rate * self._cost)
            self._worker.submit("ahead", 3, lambda: self._compute(view, ahead))

    def _vectors(self, keys: list[tuple[float, float]]) -> None:
        for sigma, q in keys:
            if rdp.VECTORS.get(sigma, q) is None:
                vec = self._call(functools.partial(rdp.compute, sigma, q), "rdp", sigma, q,
                                 rdp.ORDERS)
                rdp.VECTORS.put(sigma, q, np.asarray(vec))
                self._refresh()  # summed as it comes, before the cache can forget it
        self._refresh()

    def _compute(self, view: View, ahead: int) -> None:
        """The accountant's ``get_epsilon`` for ``view``'s history ``ahead - 1`` steps on."""
        history, n, last = view
        assert last is not None
        k = last[2] + ahead - 1
        started = time.monotonic()
        try:
            value = self._get_epsilon([*history[:n - 1], (last[0], last[1], k)])
        except CancelledError:
            raise
        except Exception:
            self._failed(f"Computing {self.mechanism} epsilon")
            raise
        cost = time.monotonic() - started
        self._cost = cost if not self._cost else 0.7 * self._cost + 0.3 * cost
        with self._lock:
            self._known.append((_key(history, n), last[0], last[1], k, value))
        self._refresh()

    def _refresh(self) -> None:
        """Publish a better value for the latest step, if the worker's work gives one."""
        with self._lock:
            latest, view = self.latest, self._view
            if latest is None or view is None:
                return
            better = self._value(view, self._latest_sum)
            if not (better.value < latest.value or (better.exact and not latest.exact)):
                return
            self.latest = better
        listener = self.listener
        if listener is not None:
            try:
                listener(better)
            except Exception:
                logger.exception("Publishing a background epsilon failed")

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait (at most ``timeout`` s) until epsilon is exact for the history now (or the
        latest value's, if the accountant dropped steps since)."""
        view = history, n, last = self.view()
        latest, latest_view = self.latest, self._view
        if latest is not None and latest_view is not None and latest.step > sum(
                s for _, _, s in history[:n]):
            view = history, n, last = latest_view
        current = self.epsilon(view)
        if last is None or current is None or current.exact:
            return current is not None
        if self._rdp:
            keys = list(dict.fromkeys(seg[:2] for seg in [*history[:n - 1], last]))
            job = self._worker.submit("now", 0, lambda: self._vectors(keys))
        else:
            job = self._worker.submit("now", 0, lambda: self._compute(view, 1))
        self._wait(job, timeout)
        value = self.epsilon(view)
        return value is not None and value.exact and value.step == current.step

    def bound_count(self, floor: float, q: float, target: float, view: View | None = None,
                    publisher: bool = False) -> tuple[int | None, bool]:
        """Most steps in total for which ``view``'s history plus steps at ``q`` and sigma
        ``>= floor`` keeps epsilon <= ``target``, by a sound bound from the cache (``None``: no
        limit), and whether it is the accountant's own count. The publisher has its own sum."""
        history, n, last = self.view() if view is None else view
        with self._lock:
            return self._count(history, n, last, floor, q, target,
                               self._sum if publisher else self._guard_sum)

    def _count(self, history: list, n: int, last: Segment | None, floor: float, q: float,
               target: float, sums: rdp.RdpSum) -> tuple[int | None, bool]:
        if self._gdp:
            steps = sum(s for _, _, s in history[:n])
            more = last_fitting(lambda k: gdp_bound(floor, q, steps + k, self.delta), target)
            return (None if more is None else steps + more), False
        if not self._bounded:  # an accountant with no known bound: only its own answer counts
            return sum(s for _, _, s in history[:n]), False
        total, exact, steps = sums.total(history, n, last)
        vec, known = rdp.bounding(floor, q)
        exact = exact and known and self._rdp
        limit = target - self._margin

        def fits(k: int) -> bool:
            rdp_k = sums.total(history, n, last, (floor, q, k))[0]
            return rdp.epsilon(rdp_k, self._rdp_delta) <= limit

        costly = vec > 0
        if not costly.any():  # nothing sampled: no step adds privacy loss
            return (None if fits(1) else steps), exact
        # The closed form per order (epsilon is their minimum), then settled exactly: merging
        # steps into the last segment rounds differently by at most one step.
        sub, add = rdp.conversion(self._rdp_delta)
        base = total if not isinstance(total, int) else np.zeros_like(vec)
        with np.errstate(invalid="ignore"):
            per_order = np.floor((limit - add + sub - base)[costly] / vec[costly])
        finite = per_order[np.isfinite(per_order)]
        k = int(max(0.0, float(finite.max()))) if finite.size else 0
        if k > 10 ** 12:
            return None, exact
        while k > 0 and not fits(k):
            k -= 1
        while fits(k + 1):
            k += 1
        return steps + k, exact

    def exact_count(self, floor: float, q: float, target: float,
                    view: View | None = None) -> Future[int | None]:
        """:meth:`bound_count`'s question answered by the accountant itself, on the worker."""
        view = self.view() if view is None else view
        history, n, last = view
        key = ("count", _key(history, n), last, floor, q, target)
        return self._worker.submit(key, 1, lambda: self._exact_count(view, floor, q, target))

    def _exact_count(self, view: View, floor: float, q: float, target: float) -> int | None:
        history, n, last = view
        segments = [*history[:n - 1], last] if last is not None else []
        if self._rdp:
            self._vectors(list(dict.fromkeys([*(s[:2] for s in segments), (floor, q)])))
            with self._lock:
                limit, exact = self._count(history, n, last, floor, q, target, self._job_sum)
            assert exact
            return limit
        steps = sum(s for _, _, s in segments)
        with self._lock:  # the bound's count fits for the accountant too: search from there
            start = self._count(history, n, last, floor, q, target, self._job_sum)[0]
        start = 0 if start is None else start - steps
        clone = copy.copy(self.accountant)
        try:
            k = self._worker.child.call("count", clone, segments, floor, q, target, self.delta,
                                        start)
        except ChildUnavailable:
            if self._worker.closed:
                raise CancelledError from None
            k = count(clone, segments, floor, q, target, self.delta, start)
        return None if k is None else steps + k

    def epsilon_after(self, steps: int, sigma: float, q: float) -> Future[float]:
        """The accountant's own epsilon after ``steps`` more steps at (sigma, q), by the worker."""
        view = self.view()
        return self._worker.submit(("after", steps, sigma, q, _key(view[0], view[1]), view[2]),
                                   2, lambda: self._after(view, steps, sigma, q))

    def _after(self, view: View, steps: int, sigma: float, q: float) -> float:
        history, n, last = view
        planned = extended([*history[:n - 1], last] if last else [], sigma, q, steps)
        if not self._rdp:
            return self._get_epsilon(planned)
        self._vectors(list(dict.fromkeys(seg[:2] for seg in planned)))
        with self._lock:
            return rdp.epsilon(self._job_sum.total(history, n, last, (sigma, q, steps))[0],
                               self.delta)

    def forecast(self, view: View, steps: int, sigma: float, q: float) -> float | None:
        """Epsilon after ``steps`` more at (sigma, q): at once for RDP, else the worker's latest."""
        history, n, last = view
        if self._rdp:
            with self._lock:
                return rdp.epsilon(self._sum.total(history, n, last, (sigma, q, steps))[0],
                                   self.delta)
        key = (_key(history, n), sigma, q, (last[2] if last else 0) + steps)
        known = self._forecast
        if not self._worker.pending("forecast") and (known is None or known[0] != key):
            planned = extended([*history[:n - 1], last] if last else [], sigma, q, steps)

            def job() -> None:
                self._forecast = (key, self._get_epsilon(planned))
                time.sleep(0.5)  # at most two a second: the values that matter go first

            self._worker.submit("forecast", 4, job)
        return None if known is None else known[1]

    def risk(self, view: View, epsilon: float | None) -> float | None:
        """The largest membership advantage any attack can have at ``view``'s privacy loss."""
        history, n, last = view
        if epsilon is None or last is None:
            return None if epsilon is None else 0.0
        if self._gdp:
            return advantage_from_mu(gdp_mu(last[0], last[1], last[2]))
        bound = advantage_from_epsilon(epsilon, self.delta)
        with self._lock:
            total = self._sum.total(history, n, last)[0]
        return min(bound, advantage_from_rdp(total, rdp.ORDERS))

    def _get_epsilon(self, history: list[Segment]) -> float:
        clone = copy.copy(self.accountant)
        clone.history = list(history)
        return float(self._call(lambda: clone.get_epsilon(self.delta), "epsilon", clone,
                                self.delta))

    def _call(self, here: Callable[[], Any], *request: Any) -> Any:
        """``request`` in the child process, or ``here()`` in this one when it cannot run."""
        try:
            return self._worker.child.call(*request)
        except ChildUnavailable:
            if self._worker.closed:
                raise CancelledError from None
            return here()

    @staticmethod
    def _wait(future: Future[Any], timeout: float | None) -> Any:
        try:
            return future.result(timeout)
        except Exception:  # timed out, cancelled by close(), or failed (counted by the job)
            return None

    def _failed(self, what: str) -> None:
        self.errors += 1
        if self.errors == 1:
            logger.exception("%s failed (%s accountant); training continues", what,
                             self.mechanism)

    def close(self) -> None:
        """Stop the worker and its child process."""
        self._worker.close()

