"""Epsilon from an Opacus accountant, every step, without slowing the step down.

The accountant's history is a run-length list ``(noise_multiplier, sample_rate, steps)``.
For RDP, the privacy loss of a segment is ``steps`` times a per-(sigma, q) vector over the RDP
orders, so the vector is computed once per (sigma, q) (with Opacus' own ``compute_rdp``; bounded
LRU caches, one per accounting and one shared by every fit of the process), the finished
segments are summed once, and each step costs one vector multiply, one add and a ``nanargmin``.
The summation order is Opacus' own, so the result is bit-identical to
``RDPAccountant.get_epsilon``. A noise scheduler brings a new sigma every step, whose vector
takes Opacus 15-70 ms: the training thread then uses a cached vector that bounds it (a 1 % grid
of sigma computed ahead in the background, see :class:`_RdpMath`), publishes that bound labelled
``exact=False``, and the background worker computes the exact vectors and hands over the exact
value when it has caught up.

PRV and GDP have no such shortcut (milliseconds to seconds per value). Every value published is
an :class:`Epsilon` record -- value, accounted step, exact or bound -- and never below the
accountant's own ``get_epsilon`` for that step:

* exact: the background worker computed this very history;
* else the smallest valid upper bound known now, from two sources:

  - values computed ahead: the worker computes, for the current (sigma, q), the step training
    will have reached when it is done (twice the measured computation time ahead). Epsilon
    grows with the step count -- Opacus' PRV and GDP values included: no decrease in steps
    1-300 and 1000-1100 at four (sigma, q) each -- so it bounds every earlier step of the same
    stretch and is exact when training reaches it;
  - closed-form bounds, microseconds on the training thread:
    PRV: RDP at ``delta (1 - 2e-3)`` plus ``0.02``. Opacus returns
    ``eps_upper = eps_hat(delta - delta_err) + eps_err`` (``delta_err = delta/1000``,
    ``eps_err = 0.01``) and the discretised estimate is within ``eps_err`` of the true curve
    at ``delta_err`` (Gopi et al. 2021), so ``eps_upper <= eps_true(delta - 2 delta_err)
    + 2 eps_err``, which RDP at that delta bounds. Plain RDP at ``delta`` was above PRV in all
    190 finite cases of a grid (sigma 0.5-10, q 1e-3-0.5, 1-1000 steps, delta 1e-5/1e-8) but
    has no such argument at tiny epsilon, where Opacus' ``+ eps_err`` dominates.
    GDP: ``mu^2/2 + mu sqrt(2 ln(1/delta))`` with Opacus' ``mu`` (see
    :meth:`BackgroundAccounting._gdp_bound`); at least 1.027 times Opacus' value over 482
    cases. RDP is *not* a bound of GDP: Opacus' GDP (a CLT approximation) exceeded RDP in 19 of
    192 cases (small sigma, large q) -- and fell below it, the under-estimate Opacus warns
    about, in the rest. The monitor reports the accountant the user chose, GDP included,
    labelled ``accountant="gdp"``; it does not mix in another accountant's value.

:meth:`Accounting.epsilon_after` and :meth:`Accounting.steps_until` (the budget guard and the
forecast) use the same bounds (for GDP the larger of RDP and the GDP bound), so a guard that
uses them stops early, never late. Opacus' GDP accountant refuses a changing sigma or q: it
raises from the optimizer step (after dropping its history), the fit ends with that error, and
what was published stays (the monitor never replaces a value with one for fewer steps).
"""

from __future__ import annotations

import collections
import copy
import logging
import math
import pickle
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as _rdp_analysis

logger = logging.getLogger(__name__)

__all__ = ["Accounting", "BackgroundAccounting", "Epsilon", "RdpAccounting", "make_accounting"]

Segment = tuple[float, float, int]
# What Accounting.exhaustion_cached returns when nothing cached holds.
MISSING: Any = object()
# A history as it was at one step: (the history list, its segments then, its last segment then).
View = tuple[list, int, "Segment | None"]

# Exact RDP vectors kept per accounting (151 orders: 1.2 kB each).
_VECTORS = 64
# Exact RDP vectors kept for the whole process: a vector depends only on (sigma, q) and the
# orders, and Opacus takes 15-70 ms to compute one, which every fit would pay again.
_SHARED_VECTORS = 256
# Bounding vectors on a geometric grid of sigma: point k is at sigma = exp(k * _GRID) (1 %).
_GRID = math.log(1.01)
_GRID_VECTORS = 128
# Grid points computed ahead, in the direction sigma last moved.
_AHEAD = 4
# Vectors computed on the calling thread when nothing cached bounds a new (sigma, q): the first
# few of a run (a constant sigma is exact from its first step, and a sigma raised once, as a
# budget guard's check of it, exact at once); after that the worker does it.
_SYNC = 4
# A falling sigma with nothing cached below it: one vector computed at this fraction of it
# bounds every step until sigma falls below it (about 100 steps of a 0.999 decay), by when
# the worker's grid has come.
_FLOOR = 0.9
# Exact vectors a guard computes before it skips a step on a bound's word; with more missing
# (a long schedule without the exact worker), the bound's answer stands: it stops early.
_EXACT_MISSING = 64
# A background exact prefix is taken over only when at most this many segments follow it.
_REBASE = 4
# Orders per piece of a background vector computation (about 1 ms each).
_PIECE = 8


class _SharedVectors:
    """Exact RDP vectors by (orders, sigma, q), shared by every accounting of the process.

    Each is Opacus' ``compute_rdp`` for one step, a pure function of its key, stored read-only
    so that no holder can change it for the others. Least recently used first, bounded.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._vectors: collections.OrderedDict[tuple[bytes, float, float], np.ndarray] = (
            collections.OrderedDict())
        self._lock = threading.Lock()

    def get(self, key: tuple[bytes, float, float]) -> np.ndarray | None:
        with self._lock:
            vec = self._vectors.get(key)
            if vec is not None:
                self._vectors.move_to_end(key)
            return vec

    def of_rate(self, orders_key: bytes, q: float) -> list[tuple[float, np.ndarray]]:
        """Every (sigma, vector) kept for these orders and sample rate ``q``."""
        with self._lock:
            return [(key[1], vec) for key, vec in self._vectors.items()
                    if key[2] == q and key[0] == orders_key]

    def clear(self) -> None:
        """Forget every vector (what a new process starts with)."""
        with self._lock:
            self._vectors.clear()

    def put(self, key: tuple[bytes, float, float], vec: np.ndarray) -> np.ndarray:
        """Keep ``vec`` (made read-only) and return the vector kept for ``key``."""
        vec.flags.writeable = False
        with self._lock:
            vec = self._vectors.setdefault(key, vec)
            self._vectors.move_to_end(key)
            if len(self._vectors) > self._size:
                self._vectors.popitem(last=False)
            return vec


_SHARED = _SharedVectors(_SHARED_VECTORS)

# The child of :class:`_VectorProcess`: Opacus' RDP analysis module, loaded from its file (it
# needs only math, NumPy and SciPy: no torch, so the child starts in a fraction of a second),
# answering (sigma, q, orders) with compute_rdp's vector, one request at a time.
# The children of :class:`_Child`: each writes a first pickle when it is ready, then answers
# one pickled request at a time; an error comes back as its repr (a str).
# Opacus' RDP analysis module, loaded from its file (it needs only math, NumPy and SciPy: no
# torch, so the child starts in a fraction of a second); requests are (sigma, q, orders).
_VECTOR_CHILD = """
import importlib.util, pickle, sys
spec = importlib.util.spec_from_file_location("_privacy_rdp", sys.argv[1])
rdp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rdp)
inp, out = sys.stdin.buffer, sys.stdout.buffer
pickle.dump("ready", out)
out.flush()
while True:
    try:
        sigma, q, orders = pickle.load(inp)
    except EOFError:
        break
    try:
        answer = rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
    except Exception as exc:
        answer = repr(exc)
    pickle.dump(answer, out)
    out.flush()
"""
# Opacus' accountants (imported once: torch too, a few seconds); requests are (accountant with
# its history, delta), answered with the accountant's own get_epsilon(delta).
_ACCOUNTANT_CHILD = """
import pickle, sys
import opacus.accountants
inp, out = sys.stdin.buffer, sys.stdout.buffer
pickle.dump("ready", out)
out.flush()
while True:
    try:
        accountant, delta = pickle.load(inp)
    except EOFError:
        break
    try:
        answer = float(accountant.get_epsilon(delta))
    except Exception as exc:
        answer = repr(exc)
    pickle.dump(answer, out)
    out.flush()
"""


class _Interrupted(Exception):
    """A background computation given up for a more urgent one."""


class _Child:
    """A computation in a child process, for a background worker thread.

    Opacus' ``compute_rdp`` (15-70 ms a vector, pure Python) and PRV's ``get_epsilon`` (0.1-1 s
    of NumPy and SciPy with Python between the calls) hold the interpreter lock in a thread, and
    every time the training thread comes back from a torch operation it waits for it: under a
    noise schedule a 1.3 ms CPU step took 4-16 ms, with PRV steps took up to 4 times as long.
    In a child process the computation costs the training thread nothing but a core. Same code,
    same NumPy: the results are bit-identical. :meth:`request` returns ``None`` when the child
    cannot start, died or was closed; the caller then computes in-thread.
    """

    def __init__(self, code: str, *args: str) -> None:
        self._argv = [sys.executable, "-c", code, *args]
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self.failed = False
        self._lock = threading.Lock()  # starting and closing: never a child after close

    def start(self) -> subprocess.Popen[bytes] | None:
        """Start the child if it is not running (returns at once; it gets ready meanwhile)."""
        with self._lock:
            if self.failed:
                return None
            proc = self._proc
            if proc is None or proc.poll() is not None:
                try:
                    proc = self._proc = subprocess.Popen(
                        self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, close_fds=True)
                except (OSError, ValueError, TypeError):  # no usable interpreter to start
                    self.failed = True
                    return None
                self._ready = False
            return proc

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether the child is ready for a request, waiting at most ``timeout`` seconds."""
        if self._ready:
            return True
        proc = self.start()
        if proc is None or proc.stdout is None:
            return False
        try:
            readable, _, _ = select.select([proc.stdout], [], [], timeout)
            if readable and pickle.load(proc.stdout) == "ready":
                self._ready = True
        except (OSError, EOFError, ValueError, pickle.PickleError):
            self._fail()
        return self._ready

    def request(self, message: Any) -> Any:
        """The child's answer to ``message`` (waiting for it to be ready), or ``None``."""
        if not self.ready(timeout=60.0):
            self._fail()
            return None
        data = pickle.dumps(message)  # an unpicklable message raises here, child untouched
        proc = self._proc
        try:
            assert proc is not None and proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(data)
            proc.stdin.flush()
            return pickle.load(proc.stdout)  # blocks in a read: the GIL is free meanwhile
        except (OSError, EOFError, ValueError, AssertionError, pickle.PickleError):
            self._fail()
            return None

    def _fail(self) -> None:
        if not self.failed:
            logger.debug("A background computation process failed; computing in-thread")
        self.close()

    def close(self) -> None:
        """Stop the child now; a computation in flight is dropped (its caller gets ``None``)."""
        with self._lock:
            self.failed = True
            proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


class _VectorProcess(_Child):
    """Opacus' ``compute_rdp`` in a child process (see :class:`_Child`)."""

    def __init__(self) -> None:
        super().__init__(_VECTOR_CHILD, _rdp_analysis.__file__)

    def compute(self, sigma: float, q: float, orders: np.ndarray) -> np.ndarray | None:
        """The vector, or ``None`` (no child, or :meth:`close` came first). One caller."""
        if self.failed:
            return None
        vec = self.request((float(sigma), float(q), orders))
        if isinstance(vec, str):  # compute_rdp raised in the child: raise it here
            raise ValueError(f"compute_rdp(sigma={sigma}, q={q}) failed: {vec}")
        return vec


def _cell(sigma: float) -> int:
    """The grid point at or below ``sigma``: ``exp(k * _GRID) <= sigma``."""
    k = math.floor(math.log(sigma) / _GRID)
    while math.exp(k * _GRID) > sigma:
        k -= 1
    while math.exp((k + 1) * _GRID) <= sigma:
        k += 1
    return k


class _Prefix:
    """The running sum of a history's finished segments, for one caller (:meth:`_RdpMath.total`)."""

    __slots__ = ("hist", "n", "last", "rdp", "steps", "exact", "rebased")

    def __init__(self) -> None:
        self.hist: list | None = None
        self.n = 0
        self.last: Segment | None = None
        self.rdp: np.ndarray | int = 0
        self.steps = 0
        self.exact = True
        self.rebased: tuple | None = None


class _RdpMath:
    """RDP composition over a history from per-(sigma, q) vectors, exact or bounding.

    A vector is exact (Opacus' own ``compute_rdp``) when cached, or computed on the calling
    thread for the first few (sigma, q) of a run. A noise scheduler brings a new sigma every
    step; then the calling thread (the training thread) takes, in a dict lookup, a vector that
    bounds it: Opacus' subsampled-Gaussian RDP decreases in sigma and increases in q at every
    order (checked over sigma 0.3-20, q 1e-3-0.9), so the vector at the grid point
    ``sigma_g <= sigma`` (same q) is an upper bound within one 1 % cell; with no grid point yet,
    the unamplified Gaussian's ``alpha / (2 sigma^2)`` (Opacus' own value at q = 1) is. Once a
    second (sigma, q) shows sigma moving, a background worker computes grid points ahead in the
    direction it moves (a constant sigma starts no worker) and, with
    ``track_exact``, the exact vectors of the history's segments with an exact prefix sum,
    which the calling thread takes over, and the exact epsilon of the newest history, handed
    to ``on_exact``. Memory: the two bounded caches and one prefix vector per side.
    """

    def __init__(self, delta: float, alphas: Sequence[float] | None = None,
                 track_exact: bool = False) -> None:
        self.orders = np.atleast_1d(np.asarray(
            RDPAccountant.DEFAULT_ALPHAS if alphas is None else list(alphas)))
        self._orders_key = self.orders.tobytes()
        # Same expression and evaluation order as Opacus' get_privacy_spent.
        self._sub = (np.log(delta) + np.log(self.orders)) / (self.orders - 1)
        self._add = np.log((self.orders - 1) / self.orders)
        self._half_orders = self.orders / 2.0
        # Least recently used first; bounded, since a noise scheduler brings a new sigma every
        # step and finished segments live on in the prefix sum.
        self._vectors: collections.OrderedDict[tuple[float, float], np.ndarray] = (
            collections.OrderedDict())
        self._grid: collections.OrderedDict[tuple[int, float], np.ndarray] = (
            collections.OrderedDict())
        self._cache_lock = threading.Lock()
        self._sync_left = _SYNC
        # Of those, computed exactly: a constant sigma and one change of it (a resumed or
        # replaced history, a sigma lowered once) are exact at once.
        self._exact_sync = 2
        # The first (sigma, q) looked up: until another one comes, sigma is not moving and the
        # worker has nothing to compute ahead.
        self._first: tuple[float, float] | None = None
        self.fallbacks = 0  # closed-form vectors used: no grid point bounded the step yet
        self.exact = True  # whether the last total() used exact vectors only
        # Sum of all history segments but the last one, kept between calls: one for the live
        # history, one for views of earlier steps (published from the publisher thread), so
        # neither undoes the other's sum.
        self._live = _Prefix()
        self._views = _Prefix()
        # quick_bound: the order it reads, and its running sum (at every order) over the live
        # history's finished segments, (history, segments summed, the last of them, sum).
        self._sub_list: list[float] = self._sub.tolist()
        self._add_list: list[float] = self._add.tolist()
        self._order: int | None = None
        self._quick: tuple | None = None
        # Background worker.
        self.track_exact = track_exact
        self.on_exact: Callable[[tuple, float], None] | None = None
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._process = _VectorProcess()
        self._want: tuple[float, float] | None = None
        self._down = True
        self._job: tuple | None = None  # (history, n, last segment, steps)
        self._job_done: tuple | None = None
        self.urgent = False
        self._idle = False
        # The worker's exact prefix: (history, n, history[n - 1], sum of segments [0, n)).
        self._pub: tuple | None = None
        self._w_hist: list | None = None
        self._w_n = 0
        self._w_last: Segment | None = None
        self._w_prefix: np.ndarray | int = 0
        self._w_steps = 0

    # -- vectors -------------------------------------------------------------------------------

    def _compute(self, sigma: float, q: float) -> np.ndarray:
        return _rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=self.orders)

    def _compute_yielding(self, sigma: float, q: float) -> np.ndarray | None:
        """:meth:`_compute` in pieces of a few orders, handing the GIL over between them.

        ``compute_rdp`` is pure Python for 15-70 ms; a thread waiting for the GIL would get it
        only after the interpreter's switch interval (5 ms). Each order is computed on its own
        by Opacus, so the pieces concatenate to the identical vector. ``None`` when
        :meth:`close` came first: a closing fit waits for one piece, not for a whole vector.
        """
        orders, pieces = self.orders, []
        for start in range(0, len(orders), _PIECE):
            if self._stopping:
                return None
            pieces.append(_rdp_analysis.compute_rdp(
                q=q, noise_multiplier=sigma, steps=1, orders=orders[start:start + _PIECE]))
            time.sleep(0)  # let a waiting training thread run now
        return np.concatenate(pieces)

    def _compute_background(self, sigma: float, q: float) -> np.ndarray | None:
        """The worker's vectors: in the child process, else in-thread in pieces."""
        vec = self._process.compute(sigma, q, self.orders)
        if vec is None and not self._stopping:
            vec = self._compute_yielding(sigma, q)
        return vec

    def _store(self, key: tuple[float, float], vec: np.ndarray) -> None:
        vec = _SHARED.put((self._orders_key, *key), vec)
        with self._cache_lock:
            self._vectors[key] = vec
            if len(self._vectors) > _VECTORS:
                self._vectors.popitem(last=False)

    def _cached(self, key: tuple[float, float]) -> np.ndarray | None:
        with self._cache_lock:
            vec = self._vectors.get(key)
            if vec is not None:
                if len(self._vectors) > 1:
                    self._vectors.move_to_end(key)
                return vec
        vec = _SHARED.get((self._orders_key, *key))  # computed by an earlier fit
        if vec is not None:
            with self._cache_lock:
                self._vectors[key] = vec
                if len(self._vectors) > _VECTORS:
                    self._vectors.popitem(last=False)
        return vec

    def lookup(self, noise_multiplier: float, sample_rate: float) -> tuple[np.ndarray, bool]:
        """The vector of (sigma, q), or one above it at every order; and whether it is exact."""
        key = (noise_multiplier, sample_rate)
        if self._first is None:
            self._first = key
        vec = self._cached(key)
        if vec is not None:
            return vec, True
        if noise_multiplier > 0 and sample_rate > 0:
            vec = self._grid_bound(noise_multiplier, sample_rate)
            moving = key != self._first
            if moving or self._sync_left <= 0:
                # sigma (or q) moves: compute grid points ahead of it. One (sigma, q) alone is
                # computed exactly right here; the grid would only cost the training thread.
                self._request(noise_multiplier, sample_rate)
            if vec is not None:
                return vec, False
            if moving and self._exact_sync <= 0:
                # sigma keeps moving (a schedule). Until the grid comes: a cached vector a
                # little below sigma bounds it, else one computed here at _FLOOR * sigma,
                # which bounds the next steps too.
                below = self._below(noise_multiplier, sample_rate, _FLOOR * noise_multiplier)
                if below is not None:
                    return below[1], False
                if self._sync_left > 0:
                    self._sync_left -= 1
                    floor = _FLOOR * noise_multiplier
                    vec = self._compute(floor, sample_rate)
                    self._store((floor, sample_rate), vec)
                    return vec, False
                below = self._below(noise_multiplier, sample_rate, 0.0)
                if below is not None:  # further below: looser, still far tighter than none
                    return below[1], False
        if self._sync_left > 0 or noise_multiplier <= 0 or sample_rate <= 0:
            self._sync_left -= noise_multiplier > 0 and sample_rate > 0
            self._exact_sync -= 1
            vec = self._compute(noise_multiplier, sample_rate)
            self._store(key, vec)
            return vec, True
        self.fallbacks += 1
        return self._half_orders / (noise_multiplier * noise_multiplier), False

    def vector(self, noise_multiplier: float, sample_rate: float) -> np.ndarray:
        return self.lookup(noise_multiplier, sample_rate)[0]

    # -- composition ---------------------------------------------------------------------------

    def _sync_prefix(self, history: list, n_prefix: int, st: _Prefix) -> None:
        valid = (
            history is st.hist
            and st.n <= n_prefix
            and (st.n == 0 or history[st.n - 1] is st.last)
        )
        if not valid:
            st.hist, st.n, st.rdp, st.steps, st.last, st.exact = history, 0, 0, 0, None, True
        pub = self._pub
        if (pub is not None and pub is not st.rebased and not st.exact
                and pub[0] is history
                and st.n >= pub[1] > 0 and n_prefix - pub[1] <= _REBASE
                and history[pub[1] - 1] is pub[2]):
            # The worker's exact sum of the first segments replaces their bounds.
            st.n, st.last, st.rdp, st.steps, st.exact, st.rebased = (
                pub[1], pub[2], pub[3], pub[4], True, pub)
        for i in range(st.n, n_prefix):
            sigma, q, steps = history[i]
            vec, exact = self.lookup(sigma, q)
            st.rdp = st.rdp + vec * steps
            st.steps += steps
            st.exact = st.exact and exact
            st.last = history[i]
        st.n = n_prefix

    def exact_total(self, history: list, extra: Segment) -> np.ndarray | int | None:
        """RDP of ``history`` plus ``extra`` from exact vectors only: the worker's exact prefix
        where it matches, cached vectors, else computed here (Opacus' ``compute_rdp``, 6-70 ms
        each; ``None`` rather than more than ``_EXACT_MISSING`` of them). For the one decision
        a bound must not make: skipping a step."""
        start, rdp = 0, 0
        pub = self._pub
        n = len(history)
        if pub is not None and pub[0] is history and 0 < pub[1] < n and (
                history[pub[1] - 1] is pub[2]):
            start, rdp = pub[1], pub[3]
        segments = list(history[start:])
        sigma_e, q_e, steps_e = extra
        if segments and segments[-1][:2] == (sigma_e, q_e):
            segments[-1] = (sigma_e, q_e, segments[-1][2] + steps_e)
        elif steps_e:
            segments.append(extra)
        missing = [seg[:2] for seg in segments if self._cached(seg[:2]) is None]
        if len(set(missing)) > _EXACT_MISSING:
            return None
        for sigma, q, steps in segments:
            vec = self._cached((sigma, q))
            if vec is None:
                vec = self._compute(sigma, q)
                self._store((sigma, q), vec)
            rdp = rdp + vec * steps
        return rdp

    def total(self, history: list, extra: Segment | None = None,
              view: tuple[int, Segment | None] | None = None) -> tuple[np.ndarray | int, int]:
        """RDP of ``history`` (plus ``extra`` steps, merged as Opacus would), and its step count.

        ``view`` is ``(n, last)``: the history as it was when it had ``n`` segments, the last
        one ``last`` (Opacus only appends segments or replaces the last one, so the first
        ``n - 1`` are unchanged). Never below the exact value at any order; :attr:`exact`
        says whether it is exact.
        """
        if view is None:
            n, st = len(history), self._live
            last = history[-1] if n else None
        else:
            (n, last), st = view, self._views
        if not n or last is None:
            if extra is None or extra[2] == 0:
                self.exact = True
                return 0, 0
            sigma, q, steps = extra
            vec, self.exact = self.lookup(sigma, q)
            return 0 + vec * steps, steps
        self._sync_prefix(history, n - 1, st)
        sigma, q, steps = last
        if n > 1 and history[n - 2][0] != sigma:
            self._down = sigma < history[n - 2][0]  # where the schedule moves sigma
        if extra is not None and extra[2] > 0:
            if (extra[0], extra[1]) == (sigma, q):
                steps = steps + extra[2]
            else:
                vec, exact = self.lookup(sigma, q)
                rdp = st.rdp + vec * steps
                vec2, exact2 = self.lookup(extra[0], extra[1])
                rdp = rdp + vec2 * extra[2]
                self.exact = st.exact and exact and exact2
                return rdp, st.steps + steps + extra[2]
        vec, exact = self.lookup(sigma, q)
        self.exact = st.exact and exact
        return st.rdp + vec * steps, st.steps + steps

    def epsilon(self, rdp: np.ndarray | int) -> float:
        if isinstance(rdp, int):
            return 0.0
        eps = rdp - self._sub + self._add
        # min, not argmin: NumPy's argmin releases the GIL whatever the size, and a background
        # thread that takes it over keeps it for up to the switch interval (5 ms); a ufunc
        # reduction of 151 values keeps it. min is NaN if any order is, else nanargmin's value.
        best = eps.min()
        if best == best:
            if self._order is None or eps[self._order] != best:
                values = eps.tolist()
                self._order = values.index(min(values))  # quick_bound's order from now on
            return float(best)
        if np.isnan(eps).all():
            return math.inf
        return float(eps[np.nanargmin(eps)])

    def _grid_bound(self, sigma: float, q: float) -> np.ndarray | None:
        """The cached grid vector nearest below sigma (same q), which lies above (sigma, q)'s."""
        k = _cell(sigma)
        with self._cache_lock:
            for cell in (k, k - 1, k - 2):
                vec = self._grid.get((cell, q))
                if vec is not None:
                    return vec
        return None

    def _vector_at(self, sigma: float, q: float) -> np.ndarray | None:
        """A cached vector at or above (sigma, q)'s at every order, without computing one."""
        vec = self._cached((sigma, q))
        if vec is None and sigma > 0 and q > 0:
            vec = self._grid_bound(sigma, q)
            if vec is None:
                below = self._below(sigma, q, 0.0)
                vec = None if below is None else below[1]
            self._request(sigma, q)  # keep the grid ahead, as lookup() does
        return vec

    def _bound_at(self, sigma: float, q: float, i: int) -> float | None:
        """Order ``i`` of :meth:`_vector_at`."""
        vec = self._vector_at(sigma, q)
        return None if vec is None else float(vec[i])

    def _below(self, sigma: float, q: float, lowest: float,
               highest: bool = True) -> tuple[float, np.ndarray] | None:
        """A cached vector of q (exact or the grid's) at a sigma in [lowest, sigma], with that
        sigma: the highest such (the tightest bound) or, ``highest=False``, the lowest (the
        bound that holds the longest while sigma falls). RDP decreases in sigma, so it bounds
        (sigma, q) at every order."""
        best: tuple[float, np.ndarray] | None = None
        with self._cache_lock:
            points = [(math.exp(cell * _GRID), vec) for (cell, rate), vec in self._grid.items()
                      if rate == q]
            points += [(at, vec) for (at, rate), vec in self._vectors.items() if rate == q]
        points += _SHARED.of_rate(self._orders_key, q)  # computed by an earlier fit
        for at, vec in points:
            if lowest <= at <= sigma and (best is None or (at > best[0]) == highest):
                best = at, vec
        return best

    def quick_bound(self, history: list, extra: Segment) -> float | None:
        """An upper bound of the epsilon after ``history`` plus ``extra``, in pure Python.

        Epsilon is a minimum over the RDP orders, so the value at any one order bounds it; this
        reads the order that was best at the last full computation, from cached vectors (exact,
        or the grid's, which lie above) and a running sum over the history's finished segments:
        a few dictionary look-ups a step, no array work. ``None`` when a segment has no cached
        vector yet or no order was picked yet. Float rounding is left to the caller's margin.
        """
        i = self._order
        if i is None:
            return None
        n = len(history)
        # The running sum is kept at every order (one small array add a segment): epsilon's best
        # order moves as the history grows, and a sum kept for one order only would start again
        # from the first segment each time it does.
        quick = self._quick
        if (quick is not None and quick[0] is history and quick[1] <= n - 1
                and (quick[1] == 0 or history[quick[1] - 1] is quick[2])):
            start, vector, last = quick[1], quick[3], quick[2]
        else:  # another history: its sum starts again
            start, vector, last = 0, None, None
        for j in range(start, n - 1):
            sigma, q, steps = history[j]
            vec = self._vector_at(sigma, q)
            if vec is None:
                return None
            vector = vec * steps if vector is None else vector + vec * steps
            last = history[j]
        self._quick = (history, max(start, n - 1), last, vector)
        total = 0.0 if vector is None else float(vector[i])
        sigma_e, q_e, steps_e = extra
        if n:
            sigma, q, steps = history[n - 1]
            if (sigma, q) == (sigma_e, q_e):
                steps, steps_e = steps + steps_e, 0
            value = self._bound_at(sigma, q, i)
            if value is None:
                return None
            total += value * steps
        if steps_e:
            value = self._bound_at(sigma_e, q_e, i)
            if value is None:
                return None
            total += value * steps_e
        return total - self._sub_list[i] + self._add_list[i]

    def allowance(self, history: list, limit: float, sigma: float,
                  q: float) -> tuple[int, float] | None:
        """Steps that surely keep :meth:`quick_bound` at most ``limit``, and the sigma floor they
        hold for: ``(k, floor)`` such that any ``k`` further steps, each at sample rate ``q`` and
        a noise multiplier ``>= floor``, keep it there.

        The per-step increment is the cached vector at ``floor`` -- the lowest one kept within
        ``_FLOOR`` below ``sigma`` (a falling sigma stays above it for many steps), else the
        highest below -- read at the quick bound's order: Opacus' subsampled-Gaussian RDP
        decreases in sigma at every order, so each such step adds at most that much. Pure
        Python, no vector computed; ``None`` when nothing cached bounds (sigma, q) yet.
        """
        i = self._order
        if i is None or not (sigma > 0 and q > 0):
            return None
        now = self.quick_bound(history, (sigma, q, 0))
        if now is None:
            return None
        below = (self._below(sigma, q, _FLOOR * sigma, highest=False)
                 or self._below(sigma, q, 0.0))
        if below is None:
            return None
        floor, vec = below
        step = float(vec[i])
        room = limit - now
        if not (step > 0 and room > 0):
            return (0, floor) if step > 0 else None
        # A relative 1e-9 off the count covers the float rounding of the running sum.
        return max(0, math.floor(room / step * (1 - 1e-9))), floor

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

    # -- background worker ---------------------------------------------------------------------

    def _request(self, sigma: float, q: float) -> None:
        """Ask the worker for grid points around (sigma, q), ahead of where sigma moves."""
        self._want = (sigma, q)
        self._wake()

    def submit(self, history: list, steps: int, n: int, last: Segment) -> None:
        """Ask the worker for the exact epsilon of the history's first ``n`` segments, the
        last one ``last`` (``track_exact`` only)."""
        self._job = (history, n, last, steps)
        self._wake()

    def _wake(self) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            with self._cv:
                if self._stopping:
                    return
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._work, daemon=True,
                                                    name="privacy-accounting-rdp-vectors")
                    self._thread.start()
                    return
        if self._idle:
            with self._cv:
                self._cv.notify()

    def _grid_task(self) -> tuple[int, float] | None:
        want = self._want
        if want is None:
            return None
        sigma, q = want
        k = _cell(sigma)
        cells = range(k, k - _AHEAD - 1, -1) if self._down else range(k, k + 2)
        with self._cache_lock:
            for cell in cells:
                if (cell, q) not in self._grid:
                    return cell, q
        return None

    def _work(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cv:
                if self._stopping:
                    return
            task = None if self.urgent else self._grid_task()
            if task is not None:
                cell, q = task
                vec = self._compute_background(math.exp(cell * _GRID), q)
                if vec is None:
                    return  # closing
                with self._cache_lock:
                    self._grid[task] = vec
                    if len(self._grid) > _GRID_VECTORS:
                        self._grid.popitem(last=False)
                idle_since = time.monotonic()
                continue
            job = self._job
            if self.track_exact and job is not None and job is not self._job_done:
                self._exact_step(job)
                idle_since = time.monotonic()
                continue
            if self.urgent and self._grid_task() is not None:
                self.urgent = False
                continue
            with self._cv:
                self._cv.notify_all()  # settle() waits on the same condition
                if self._stopping or time.monotonic() - idle_since > 1.0:
                    # Nothing to do for a while: end; the next request starts a new worker.
                    self._thread = None
                    return
                self._idle = True
                self._cv.wait(0.05)  # also covers a wake-up that raced with going idle
                self._idle = False

    def _exact_step(self, job: tuple) -> None:
        """Advance the exact prefix by at most one new vector; finish ``job`` when caught up."""
        history, n, last, _ = job
        history_list: list = history
        valid = (history_list is self._w_hist and self._w_n <= n - 1
                 and (self._w_n == 0 or history_list[self._w_n - 1] is self._w_last))
        if not valid:
            self._w_hist, self._w_n, self._w_last, self._w_prefix = history_list, 0, None, 0
            self._w_steps = 0
        while self._w_n < n - 1:
            segment = history[self._w_n]
            key = (segment[0], segment[1])
            vec = self._cached(key)
            if vec is None:
                vec = self._compute_background(*key)
                if vec is None:
                    return  # closing
                self._store(key, vec)
                computed = True
            else:
                computed = False
            # Opacus' order: 0 + v1 * s1 + v2 * s2 + ...
            self._w_prefix = self._w_prefix + vec * segment[2]
            self._w_steps += segment[2]
            self._w_n += 1
            self._w_last = segment
            self._pub = (history, self._w_n, segment, self._w_prefix, self._w_steps)
            if computed:
                return
        key = (last[0], last[1])
        vec = self._cached(key)
        if vec is None:
            vec = self._compute_background(*key)
            if vec is None:
                return  # closing
            self._store(key, vec)
        value = self.epsilon(self._w_prefix + vec * last[2])
        self._job_done = job
        callback = self.on_exact
        if callback is not None:
            callback(job, value)

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        self._process.close()  # a vector in flight is dropped: closing waits for none
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


@dataclass(frozen=True, slots=True)
class Epsilon:
    """One epsilon and what it is, replaced as a whole so no thread sees half of it.

    Attributes:
        value: Epsilon at the accounting's delta.
        step: The accounted step count (steps in the accountant's history) it belongs to.
        exact: ``True`` when ``value`` is the accountant's own ``get_epsilon`` for that history;
            ``False`` when it is an upper bound of it, published until the exact value is known.
    """

    value: float
    step: int
    exact: bool


class Accounting:
    """Epsilon for one accountant and delta; :meth:`update` is called once per step.

    Attributes:
        mechanism: The accountant's name (``"rdp"``, ``"prv"``, ``"gdp"``).
        latest: The latest :class:`Epsilon` (value, accounted step, exact or bound), or ``None``
            before the first update. Read it once and use its fields: it is replaced, never
            changed, so value, step and kind always belong together.
        listener: Called with the new :class:`Epsilon` when a background computation improves
            the value of the last accounted step (from the worker thread); ``None`` for none.
        steps: Steps accounted so far.
        errors: Failures while computing epsilon.
    """

    mechanism: str

    def __init__(self, accountant: IAccountant, delta: float) -> None:
        self.accountant = accountant
        self.delta = delta
        self.latest: Epsilon | None = None
        self.listener: Callable[[Epsilon], None] | None = None
        self.steps = 0
        self.errors = 0
        self._rdp = _RdpMath(delta)
        # Added to every RDP-derived epsilon so that it bounds this accountant's own value.
        self._margin = 0.0
        self._forecast_key: tuple | None = None
        self._forecast_value: float | None = None
        self._exhaustion: tuple | None = None
        # One computation at a time: the training thread (budget guard, progress bar) and the
        # publisher thread (each step's snapshot) share the RDP sums and caches.
        self._calc = threading.RLock()
        # GDP's own bound is not RDP's: fits() always computes it in full there.
        self._quick_off = False

    def view(self) -> View:
        """The accountant's history as it is now, for :meth:`update` later (microseconds)."""
        history = self.accountant.history
        n = len(history)
        return history, n, history[n - 1] if n else None

    @property
    def epsilon(self) -> float | None:
        """``latest.value``, or ``None`` before the first update."""
        latest = self.latest
        return None if latest is None else latest.value

    @property
    def epsilon_step(self) -> int:
        """``latest.step``: the accounted step count :attr:`epsilon` belongs to."""
        latest = self.latest
        return 0 if latest is None else latest.step

    def update(self, view: View | None = None) -> Epsilon | None:
        """Epsilon for ``view`` (a :meth:`view` taken earlier) or for the history now.

        The value is never below the accountant's own for that history. :attr:`latest` (and
        :attr:`steps`) move to it unless a later step is already there. ``None`` if computing
        failed (counted in :attr:`errors`, never raised).
        """
        raise NotImplementedError

    @property
    def orders(self) -> np.ndarray:
        """The RDP orders of :meth:`rdp_after`."""
        return self._rdp.orders

    def rdp_after(self, extra_steps: int, noise_multiplier: float,
                  sample_rate: float, view: View | None = None) -> np.ndarray | int:
        """RDP over :attr:`orders` after ``extra_steps`` more steps at (sigma, q); 0 if none.

        From the history now, or as it was in ``view`` (see :meth:`view`).
        """
        with self._calc:
            return self._total(view, (noise_multiplier, sample_rate, extra_steps))[0]

    def _total(self, view: View | None,
               extra: Segment | None = None) -> tuple[np.ndarray | int, int]:
        if view is None:
            return self._rdp.total(self.accountant.history, extra)
        history, n, last = view
        return self._rdp.total(history, extra, view=(n, last))

    def epsilon_after(self, extra_steps: int, noise_multiplier: float, sample_rate: float,
                      view: View | None = None) -> float:
        """Epsilon after ``extra_steps`` more steps at (sigma, q): exact for RDP, else a bound.

        From the history now, or as it was in ``view``. For PRV and GDP this is the RDP bound
        described in the module docstring, never below the accountant's own value, so a guard
        using it stops early, never late.
        """
        with self._calc:
            rdp, _ = self._total(view, (noise_multiplier, sample_rate, extra_steps))
            return self._rdp.epsilon(rdp) + self._margin

    def fits(self, target: float, noise_multiplier: float, sample_rate: float) -> bool:
        """Whether one more step at (sigma, q) keeps epsilon at most ``target``: the answer of
        :meth:`epsilon_after` ``(1, ...) <= target``, in microseconds when an upper bound at one
        RDP order already shows it (:meth:`_RdpMath.quick_bound`), else computed in full. A
        "no" from bounding vectors (a schedule's sigma not on the grid yet) is checked with
        exact ones first, when at most ``_EXACT_MISSING`` of them are missing."""
        with self._calc:
            quick = None if self._quick_off else self._rdp.quick_bound(
                self.accountant.history, (noise_multiplier, sample_rate, 1))
            # The margin covers float rounding (relative 1e-15 per operation) many times over.
            if quick is not None and (quick + self._margin) * (1 + 1e-9) + 1e-12 <= target:
                return True
            if self.epsilon_after(1, noise_multiplier, sample_rate) <= target:
                return True
            if self._rdp.exact or self._quick_off:  # GDP: its own bound, not RDP's
                return False
            # A bound (a noise schedule's sigma not on the grid yet) says no: the exact value
            # decides, or a guard would stop a fit that still has budget.
            rdp = self._rdp.exact_total(self.accountant.history,
                                        (noise_multiplier, sample_rate, 1))
            return rdp is not None and self._rdp.epsilon(rdp) + self._margin <= target

    def credit(self, target: float, noise_multiplier: float,
               sample_rate: float) -> tuple[int, float, bool] | None:
        """Further steps that surely keep :meth:`epsilon_after` at most ``target``, without
        computing anything: ``(k, floor, exact)``, such that any ``k`` further steps, each at
        this sample rate and a noise multiplier ``>= floor``, keep it there; ``exact`` when
        ``k`` is :meth:`exhaustion_steps` itself.

        The cached count of :meth:`exhaustion_steps` when it holds (floor: sigma itself),
        else one RDP order's bound with the lowest cached vector at or below sigma
        (:meth:`_RdpMath.allowance`; a noise schedule's sigma stays above it for many steps).
        ``None`` when neither is at hand: ask :meth:`fits`.
        """
        left = self.exhaustion_cached(target, noise_multiplier, sample_rate)
        if left is None:
            return 1 << 62, noise_multiplier, False  # unbounded
        if left is not MISSING:
            return left, noise_multiplier, True
        if self._quick_off:
            return None
        with self._calc:
            # The same margins as fits(): (bound + margin) * (1 + 1e-9) + 1e-12 <= target.
            limit = (target - 1e-12) / (1 + 1e-9) - self._margin
            bound = self._rdp.allowance(self.accountant.history, limit, noise_multiplier,
                                        sample_rate)
        return None if bound is None else (*bound, False)

    def keep_bound_current(self) -> None:
        """Bring the running sum of :meth:`credit` and :meth:`fits` up to the history's
        finished segments (off the training thread, a few microseconds a new segment): under
        a noise schedule a guard's next check then sums a few segments, not a hundred."""
        if self._quick_off or self._rdp._order is None:
            return
        history = self.accountant.history
        n = len(history)
        if n:
            last = history[n - 1]
            with self._calc:
                self._rdp.quick_bound(history, (last[0], last[1], 0))

    def steps_until(self, target: float, noise_multiplier: float,
                    sample_rate: float) -> int | None:
        """Further steps at (sigma, q) before :meth:`epsilon_after` would pass ``target``."""
        with self._calc:
            return self._rdp.steps_until(self.accountant.history, target - self._margin,
                                         noise_multiplier, sample_rate)

    def forecast(self, extra_steps: int, noise_multiplier: float,
                 sample_rate: float, view: View | None = None) -> float | None:
        """Epsilon after ``extra_steps`` more steps at (sigma, q): the planned end of training
        (from the history now, or as it was in ``view``)."""
        history, n, last = self.view() if view is None else view
        steps = 0 if last is None else last[2]
        key = (noise_multiplier, sample_rate, n, steps + extra_steps)
        if key != self._forecast_key:
            # Constant while the same (sigma, q) is accounted towards the same planned end.
            self._forecast_value = self.epsilon_after(extra_steps, noise_multiplier, sample_rate,
                                                      (history, n, last))
            self._forecast_key = key
        return self._forecast_value

    def exhaustion_cached(self, target: float, noise_multiplier: float,
                          sample_rate: float) -> Any:
        """:meth:`exhaustion_steps` if its cached count still holds (nothing computed), else
        :data:`MISSING`."""
        history = self.accountant.history
        n = len(history)
        last = history[n - 1] if n else (0.0, 0.0, 0)
        cached = self._exhaustion
        if cached is None or cached[0] != (noise_multiplier, sample_rate, n, last[0], last[1],
                                           target):
            return MISSING
        left = cached[2]
        if left is None:
            return None
        left -= last[2] - cached[1]
        return left if left >= 0 else MISSING

    def exhaustion_steps(self, target: float, noise_multiplier: float,
                         sample_rate: float) -> int | None:
        """Cached :meth:`steps_until`: each step at the same (sigma, q) takes exactly one off.

        Reads the live history only (no epsilon computed): a step at the last segment's
        (sigma, q) adds one to its count, anything else starts a new segment.
        """
        history = self.accountant.history
        n = len(history)
        last = history[n - 1] if n else (0.0, 0.0, 0)
        key = (noise_multiplier, sample_rate, n, last[0], last[1], target)
        cached = self._exhaustion
        if cached is not None and cached[0] == key:
            left = cached[2]
            if left is None:
                return None
            left -= last[2] - cached[1]
            if left >= 0:
                return left
        left = self.steps_until(target, noise_multiplier, sample_rate)
        self._exhaustion = (key, last[2], left)
        return left

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until :attr:`latest` is exact for the last accounted step."""
        return True

    def _settled(self) -> bool:
        """Whether :attr:`latest` is exact for the last accounted step (or none was accounted)."""
        latest = self.latest
        return latest is None or (latest.exact and latest.step == self.steps)

    def close(self, timeout: float = 5.0) -> None:
        """Stop background work, if any."""


class RdpAccounting(Accounting):
    """RDP epsilon on the calling thread in microseconds: exact, or a bound until exact.

    With a constant (or rarely changing) sigma every value is exact at once. Under a noise
    scheduler (a new sigma every step) the value for a new sigma is the grid bound of
    :class:`_RdpMath` (labelled ``exact=False``) and the background worker hands the exact one
    to :attr:`listener` when it has computed the new vectors; :meth:`settle` waits for it.
    """

    mechanism = "rdp"

    def __init__(self, accountant: IAccountant, delta: float) -> None:
        super().__init__(accountant, delta)
        self._rdp = _RdpMath(delta, track_exact=True)
        self._rdp.on_exact = self._exact_arrived
        self._lock = threading.Lock()
        self._seen: tuple | None = None

    def update(self, view: View | None = None) -> Epsilon | None:
        history, n, last = self.view() if view is None else view
        try:
            with self._calc:
                rdp, steps = self._rdp.total(history, view=(n, last))
                eps = self._rdp.epsilon(rdp)
                exact = self._rdp.exact
        except Exception:  # never raise into the training step
            self.errors += 1
            if self.errors == 1:
                logger.exception("Computing epsilon failed; training continues")
            return None
        value = Epsilon(eps, steps, exact)
        with self._lock:
            seen = self._seen
            if seen is not None and seen[0] is history and seen[3] > steps:
                return value  # a later step is already the latest
            self.steps = steps
            self._seen = (history, n, last, steps)
            self.latest = value
        if not exact and last is not None:
            self._rdp.submit(history, steps, n, last)
        return value

    def _exact_arrived(self, job: tuple, value: float) -> None:
        listener, exact = None, None
        with self._lock:
            latest, seen = self.latest, self._seen
            if (latest is not None and not latest.exact and seen is not None
                    and seen[0] is job[0] and seen[1:] == job[1:] and latest.step == job[3]):
                self.latest = exact = Epsilon(value, job[3], True)
                listener = self.listener
        if listener is not None and exact is not None:
            try:
                listener(exact)
            except Exception:
                logger.exception("Publishing a background epsilon failed")

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until :attr:`latest` is exact for the last accounted step."""
        if self._settled():
            return True
        deadline = time.monotonic() + timeout
        rdp = self._rdp
        rdp.urgent = True
        try:
            while True:
                if self._settled():
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or rdp._stopping:
                    return False
                rdp._wake()
                with rdp._cv:
                    rdp._cv.wait(min(left, 0.05))
        finally:
            rdp.urgent = False

    def close(self, timeout: float = 5.0) -> None:
        self._rdp.close(timeout)


# Opacus' PRVAccountant.get_epsilon defaults: eps_error, and delta_error as a fraction of delta.
_PRV_EPS_ERROR = 0.01
_PRV_DELTA_ERROR = 1e-3
# Results of the background computation kept for reuse (the current and a few later steps).
_KEEP = 8


def _prefix_key(history: Sequence[Segment]) -> tuple[int, Segment | None]:
    """Identifies everything but the last segment: Opacus only appends or extends the last one."""
    return len(history), (history[-2] if len(history) > 1 else None)


class BackgroundAccounting(Accounting):
    """The accountant's own ``get_epsilon``, on a background thread, computed ahead.

    Each step the training thread publishes the best value it holds for the step just accounted
    (microseconds): the exact value when the worker has computed this very history, else the
    smallest known upper bound -- the accountant's value for a later step at the same (sigma, q)
    (epsilon grows with steps), or the RDP bound of the module docstring (PRV only). The worker
    runs one Opacus computation at a time, always on the newest history, for the step training
    will have reached when it finishes (from the measured step rate and computation time), so
    the result is a tight bound when it arrives and exact once training gets there; it is
    handed to :attr:`listener` at once.
    """

    def __init__(self, accountant: IAccountant, delta: float, min_interval: float = 0.5) -> None:
        super().__init__(accountant, delta)
        self.mechanism = accountant.mechanism()
        self.min_interval = min_interval
        self._bounded = self.mechanism == "prv"
        self._gdp = self.mechanism == "gdp"
        self._quick_off = self._gdp or not self._bounded
        self._gdp_scale = math.sqrt(2.0 * math.log(1.0 / delta))
        if self._bounded:
            self._rdp = _RdpMath(delta * (1 - 2 * _PRV_DELTA_ERROR))
            self._margin = 2 * _PRV_EPS_ERROR
        self._lock = threading.Lock()
        self._cv = threading.Condition()
        self._job: tuple[tuple[Segment, ...], int, float] | None = None
        self._seen: tuple | None = None
        self._seen_history: list | None = None
        self._known: collections.deque[tuple] = collections.deque(maxlen=_KEEP)
        self._stopping = False
        self._urgent = False
        self._idle = False
        self._attempted = 0
        self._done: tuple | None = None
        self._rate: float | None = None
        self._cost: float | None = None
        self._forecast_request: tuple[int, float, float] | None = None
        self._forecast: float | None = None
        self._thread: threading.Thread | None = None
        # get_epsilon runs in a child process (see _Child): PRV's takes 0.1-1 s, GDP's a few
        # ms but again for every step, and either way in a thread it holds the GIL.
        self._child: _Child | None = _Child(_ACCOUNTANT_CHILD)
        self._started = 0.0

    def update(self, view: View | None = None) -> Epsilon | None:
        history, n, last = self.view() if view is None else view
        try:
            if self._bounded:
                with self._calc:
                    rdp, steps = self._rdp.total(history, view=(n, last))
                    bound = self._rdp.epsilon(rdp) + self._margin
            else:
                steps, bound = sum(s for _, _, s in history[:n - 1]), math.inf
                if last is not None:
                    steps += last[2]
                    if self._gdp:
                        bound = self._gdp_bound(*last)
        except Exception:  # never raise into the training step
            self.errors += 1
            if self.errors == 1:
                logger.exception("Computing the %s epsilon bound failed; training continues",
                                 self.mechanism)
            return None
        with self._lock:
            newest = not (self._seen_history is history and self.steps > steps)
            if newest:
                self.steps, self._seen_history = steps, history
        if last is None:
            value = Epsilon(0.0, 0, True)
            if newest:
                self.latest = value
            return value
        sigma, q, k = last
        seen = ((n, history[n - 2] if n > 1 else None), sigma, q, k, steps, bound)
        with self._lock:
            value = self._best(seen)
            if not newest:
                return value  # a later step is already the latest
            self._seen = seen
            self.latest = value
        self._job = (tuple(history[:n - 1]) + (last,), steps, time.monotonic())
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"privacy-accounting-{self.mechanism}", daemon=True)
            self._thread.start()
        elif self._idle:
            with self._cv:
                self._cv.notify()
        return value

    def _gdp_bound(self, sigma: float, q: float, steps: int) -> float:
        """An upper bound of Opacus' GDP epsilon: ``mu^2/2 + mu sqrt(2 ln(1/delta))``.

        ``mu`` is Opacus' ``compute_mu_poisson``; for mu-GDP, delta(eps) <= Phi(mu/2 - eps/mu)
        <= exp(-(eps/mu - mu/2)^2 / 2), which is delta at this eps, so the root Opacus finds lies
        below it.
        """
        if sigma <= 0:
            return math.inf
        mu = math.sqrt(math.expm1(sigma ** -2)) * math.sqrt(steps) * q
        return mu * mu / 2.0 + mu * self._gdp_scale

    def epsilon_after(self, extra_steps: int, noise_multiplier: float, sample_rate: float,
                      view: View | None = None) -> float:
        eps = super().epsilon_after(extra_steps, noise_multiplier, sample_rate, view)
        if not self._gdp:
            return eps
        # GDP's value can exceed the RDP bound (small sigma, large q): bound both.
        history, n, last = self.view() if view is None else view
        steps = sum(s for _, _, s in history[:n - 1]) + (last[2] if last else 0) + extra_steps
        return max(eps, self._gdp_bound(noise_multiplier, sample_rate, steps))

    def steps_until(self, target: float, noise_multiplier: float,
                    sample_rate: float) -> int | None:
        left = super().steps_until(target, noise_multiplier, sample_rate)
        if not self._gdp or noise_multiplier <= 0 or sample_rate <= 0:
            return left
        # Largest total n with mu^2/2 + mu s <= target, mu = c sqrt(n); then settle rounding.
        c = math.sqrt(math.expm1(noise_multiplier ** -2)) * sample_rate
        s = self._gdp_scale
        mu = -s + math.sqrt(s * s + 2.0 * target)
        done = sum(n for _, _, n in self.accountant.history)
        k = max(0, int((mu / c) ** 2) - done) if c > 0 else None
        if k is None:
            return left
        while k > 0 and self._gdp_bound(noise_multiplier, sample_rate, done + k) > target:
            k -= 1
        while self._gdp_bound(noise_multiplier, sample_rate, done + k + 1) <= target:
            k += 1
        return k if left is None else min(left, k)

    def _best(self, seen: tuple) -> Epsilon:
        """The exact value for ``seen`` if known, else the smallest valid bound (under the lock)."""
        key, sigma, q, k, steps, value = seen
        for kkey, ksigma, kq, kk, kvalue in self._known:
            if (kk >= k and ksigma == sigma and kq == q and kkey[0] == key[0]
                    and kkey[1] is key[1]):
                if kk == k:
                    return Epsilon(kvalue, steps, True)
                value = min(value, kvalue)
        return Epsilon(value, steps, False)

    def forecast(self, extra_steps: int, noise_multiplier: float,
                 sample_rate: float, view: View | None = None) -> float | None:
        self._forecast_request = (extra_steps, noise_multiplier, sample_rate)
        return self._forecast

    def _clone(self, history: Sequence[Segment]) -> IAccountant:
        clone = copy.copy(self.accountant)
        clone.history = list(history)
        return clone

    def _ahead(self) -> int:
        """Steps training will have taken by the time the next computation is done."""
        if self._rate is None or self._cost is None:
            return 1
        return 1 + math.ceil(2.0 * self._rate * self._cost)

    def _run(self) -> None:
        done: tuple | None = None
        last_pick: tuple[int, float] | None = None
        next_forecast = 0.0
        while True:
            with self._cv:
                while not self._stopping and (self._job is None or self._job is done):
                    self._idle = True
                    self._cv.wait(0.05)  # also covers a wake-up that raced with going idle
                self._idle = False
                if self._stopping:
                    return
                job, urgent = self._job, self._urgent
            assert job is not None  # the wait above ends only with a job
            history, steps, submitted = job
            if last_pick is not None and steps > last_pick[0] and submitted > last_pick[1]:
                rate = (steps - last_pick[0]) / (submitted - last_pick[1])
                self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
            last_pick = (steps, submitted)
            sigma, q, k = history[-1]
            target = k + (0 if urgent else self._ahead())
            planned = history[:-1] + ((sigma, q, target),)
            self._started = time.monotonic()
            try:
                value = self._epsilon_of(planned, urgent)
            except _Interrupted:
                continue  # settle() or close() came: the next round takes its job
            except Exception:
                value = None
                self.errors += 1
                if self.errors == 1:
                    logger.exception("Computing %s epsilon failed; training continues",
                                     self.mechanism)
            cost = time.monotonic() - self._started  # the computation, not the child's start
            self._cost = cost if self._cost is None else 0.7 * self._cost + 0.3 * cost
            if value is not None:
                self._learn((_prefix_key(history), sigma, q, target, value))
            done = job
            request = self._forecast_request
            if request is not None and not urgent and time.monotonic() >= next_forecast:
                next_forecast = time.monotonic() + self.min_interval
                self._compute_forecast(history, request)
            with self._cv:
                self._attempted = steps
                self._done = job
                self._cv.notify_all()

    def _learn(self, known: tuple) -> None:
        """Keep a computed value; publish it at once if it improves the last step's value."""
        listener = None
        with self._lock:
            self._known.append(known)
            seen, latest = self._seen, self.latest
            if seen is not None:
                better = self._best(seen)
                if latest is None or better.value < latest.value or (
                        better.exact and not latest.exact):
                    self.latest = latest = better
                    listener = self.listener
        if listener is not None:
            assert latest is not None  # a listener is picked only with a better value
            try:
                listener(latest)
            except Exception:
                logger.exception("Publishing a background epsilon failed")

    def _compute_forecast(self, history: tuple[Segment, ...],
                          request: tuple[int, float, float]) -> None:
        extra, sigma, q = request
        planned = list(history)
        s_last, q_last, n_last = planned[-1]
        if extra > 0:
            if (s_last, q_last) == (sigma, q):
                planned[-1] = (sigma, q, n_last + extra)
            else:
                planned.append((sigma, q, extra))
        try:
            self._forecast = self._epsilon_of(tuple(planned), False)
        except Exception:
            pass  # a forecast is an estimate; epsilon itself is counted when it fails

    def _epsilon_of(self, history: Sequence[Segment], urgent: bool) -> float:
        """The accountant's own ``get_epsilon`` for ``history``: in the child process when it
        is ready (it starts with the first computation), else here -- at once when
        :meth:`settle` waits for it (training is over: nothing left to slow down)."""
        clone = self._clone(history)
        child = self._child
        if child is not None and not child.failed:
            child.start()
            while not urgent and not child.ready(timeout=0.05):
                if self._stopping or self._urgent:
                    raise _Interrupted  # settle() wants the exact value now, or close()
                if child.failed:
                    break
            if child.ready():
                self._started = time.monotonic()
                try:
                    answer = child.request((clone, self.delta))
                except (pickle.PicklingError, TypeError, AttributeError):
                    answer = None  # an accountant that cannot be sent: computed here
                if isinstance(answer, float):
                    return answer
                if isinstance(answer, str):
                    raise ValueError(f"{self.mechanism} get_epsilon failed: {answer}")
        return float(clone.get_epsilon(self.delta))

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until :attr:`latest` is exact for the last accounted step."""
        if self._settled():
            return True
        deadline = time.monotonic() + timeout
        with self._cv:
            self._urgent = True
            job = self._job
            if job is not None:
                self._job = (job[0], job[1], job[2])  # a new job object: computed again, exact
            self._cv.notify_all()
            try:
                while True:
                    if self._settled():
                        return True
                    left = deadline - time.monotonic()
                    if (left <= 0 or self._thread is None or not self._thread.is_alive()
                            or self._done is self._job):
                        return False
                    self._cv.wait(min(left, 0.05))
            finally:
                self._urgent = False

    def close(self, timeout: float = 5.0) -> None:
        self._rdp.close(timeout)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._child is not None:
            self._child.close()  # a computation in flight is dropped
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
