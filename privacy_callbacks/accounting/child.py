"""The accounting's child process, and the search for the last step that fits a budget.

As a script (``python child.py RDP_ANALYSIS_FILE``) it answers pickled requests on stdin with
pickled ``(ok, value)``. ``compute_rdp`` (15-70 ms of pure Python) and PRV's ``get_epsilon``
(0.1-1 s) would hold the interpreter lock in a thread, stalling training; in a child they cost a
core. The RDP analysis is loaded from its file, so a vectors-only child never imports torch.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any, Callable

Segment = tuple[float, float, int]


def extended(history: list[Segment], sigma: float, q: float, steps: int) -> list[Segment]:
    """``history`` plus ``steps`` at (sigma, q), merged as Opacus' accountants merge them."""
    if not steps:
        return list(history)
    if history and history[-1][:2] == (sigma, q):
        return [*history[:-1], (sigma, q, history[-1][2] + steps)]
    return [*history, (sigma, q, steps)]


def last_fitting(epsilon_after: Callable[[int], float], target: float, start: int = 0,
                 cap: int = 1 << 40) -> int | None:
    """The largest ``k >= start`` (known to fit) with ``epsilon_after(k) <= target``, epsilon
    growing with k; ``None`` when ``cap`` fits. A failed computation does not fit."""

    def fits(k: int) -> bool:
        try:
            return epsilon_after(k) <= target
        except Exception:  # e.g. PRV's domain for a huge k
            return False

    low = start
    if low == 0 and not fits(1):
        return 0
    high = max(2 * low, 2)
    while fits(high):
        low, high = high, 2 * high
        if high > cap:
            return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def count(accountant: Any, history: list[Segment], sigma: float, q: float, target: float,
          delta: float, start: int) -> int | None:
    """:func:`last_fitting` with the accountant's own ``get_epsilon`` (changes its history)."""

    def after(k: int) -> float:
        accountant.history = extended(history, sigma, q, k)
        return float(accountant.get_epsilon(delta))

    return last_fitting(after, target, start)


def _serve(rdp_file: str) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_opacus_rdp", rdp_file)
    assert spec is not None and spec.loader is not None
    rdp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rdp)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            kind, *args = pickle.load(requests)
        except EOFError:
            return
        try:
            if kind == "rdp":
                sigma, q, orders = args
                value = rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
            elif kind == "epsilon":
                accountant, delta = args
                value = float(accountant.get_epsilon(delta))
            else:
                value = count(*args)
            answer: tuple[bool, Any] = (True, value)
        except Exception as exc:
            answer = (False, f"{type(exc).__name__}: {exc}")
        pickle.dump(answer, answers)
        answers.flush()


if __name__ == "__main__":
    sys.path.pop(0)  # this folder holds modules named like others' (rdp, bounds)
    _serve(sys.argv[1])
