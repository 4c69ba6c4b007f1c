"""A noise scheduler (a new sigma every step) costs the training thread no RDP computation.

Opacus' ``ExponentialNoise`` stepped every batch: each step is a new history segment. Every
published (epsilon, step) is at least Opacus' epsilon for the history of that step, the final
one equals it, and the guard never releases a step past the target.
"""

from __future__ import annotations

import functools
import threading
import warnings

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from dp_models import ScheduledModel, fit
from privacy_callbacks import BudgetGuard, PrivacyMonitor
from privacy_callbacks.accounting import Accounting, rdp
from privacy_callbacks.accounting.bounds import advantage_from_rdp
from privacy_callbacks.exporters.base import Exporter

STEPS = 40
ORDERS = RDPAccountant.DEFAULT_ALPHAS


class Recorder(Exporter):
    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, int, int, float | None]] = []

    def export(self, snapshot) -> None:
        if snapshot.epsilon is not None:
            self.seen.append((snapshot.epsilon, snapshot.epsilon_step, snapshot.epsilon_exact,
                              snapshot.membership_inference_risk))


@pytest.fixture
def rdp_threads(monkeypatch):
    """Names of the threads of this process that call Opacus' compute_rdp."""
    calls: list[str] = []
    original = rdp_analysis.compute_rdp

    def recording(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(rdp_analysis, "compute_rdp", recording)
    return calls


@functools.cache
def one_step(sigma: float, q: float) -> np.ndarray:
    return rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ORDERS)


def opacus(rdp_total: np.ndarray) -> float:
    return float(rdp_analysis.get_privacy_spent(orders=ORDERS, rdp=rdp_total, delta=1e-5)[0])


def truth(history: list) -> tuple[dict[int, float], dict[int, float]]:
    """Opacus' RDP epsilon after each step (summed in Opacus' order), and the tightest
    membership-inference bound that RDP allows."""
    total, eps, risk = 0, {}, {}
    for i, (sigma, q, steps) in enumerate(history, 1):
        total = total + rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                 orders=ORDERS)
        eps[i], risk[i] = opacus(total), advantage_from_rdp(total, np.asarray(ORDERS))
    return eps, risk


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_scheduler_epsilon_is_a_bound_every_step_and_exact_at_the_end(mechanism, rdp_threads):
    recorder = Recorder()
    monitor = PrivacyMonitor(delta=1e-5, exporters=[recorder], session_id="t")
    steps = STEPS if mechanism == "rdp" else 8  # PRV: Opacus takes seconds per segment count
    model = ScheduledModel(n=8 * steps, batch_size=8, accountant=mechanism)
    fit(model, monitor, max_epochs=1)
    history = list(model.privacy_engine.accountant.history)
    assert len(history) == steps and all(n == 1 for _, _, n in history)  # a new sigma each step
    # Only the fit's first vector is computed in this process; the rest in the child.
    assert rdp_threads.count(threading.main_thread().name) <= 1, rdp_threads
    if mechanism == "rdp":
        expected, risk = truth(history)
        scored = [(step, score) for _, step, _, score in recorder.seen if score is not None]
        assert scored and scored[-1][0] == steps  # the newest step of each batch is scored
        for step, score in scored:
            assert score >= risk[step]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = {}
            for step in sorted({s for _, s, _, _ in recorder.seen}):
                accountant = PRVAccountant()
                accountant.history = history[:step]
                expected[step] = accountant.get_epsilon(1e-5)
    for eps, step, exact, _ in recorder.seen:
        assert eps >= expected[step], f"published {eps} for step {step}, Opacus: {expected[step]}"
        if exact:
            assert eps == pytest.approx(expected[step], rel=1e-9)
    assert {s for _, s, _, _ in recorder.seen} == set(range(1, steps + 1))
    last_eps, last_step, last_exact, _ = recorder.seen[-1]
    assert (last_step, last_exact) == (steps, 1)
    assert last_eps == pytest.approx(expected[steps], rel=1e-9)
    assert monitor.last_snapshot.epsilon == pytest.approx(expected[steps], rel=1e-9)


def test_bounding_vectors_are_above_opacus_at_every_order():
    """A sigma without its vector yet is bounded by a cached one below it, else alpha/2sigma^2."""
    for q in (1e-3, 0.01, 0.125, 0.5):
        for sigma in (0.6, 1.0, 1.37, 4.2):
            exact = one_step(sigma, q)
            closed, known = rdp.bounding(sigma, q)
            assert not known and np.all(closed >= exact)
            rdp.VECTORS.put(0.97 * sigma, q, one_step(0.97 * sigma, q).copy())
            below, known = rdp.bounding(sigma, q)
            assert not known and np.all(below >= exact) and np.all(below <= closed)


def schedules(seed: int, steps: int):
    """Decaying, rising and mixed schedules at a random first sigma and q: after each step,
    (history so far, Opacus' RDP so far, the next step's sigma, q)."""
    rng = np.random.default_rng(seed)
    for trial in range(6):
        sigma, q = float(rng.uniform(0.8, 3.0)), float(rng.choice([0.01, 0.05, 0.125]))
        history, total = [], np.zeros(len(ORDERS))
        for _ in range(steps):
            factor = (0.99, 1.01, float(rng.uniform(0.97, 1.03)))[trial % 3]
            sigma = max(0.5, sigma * factor)
            history.append((sigma, q, 1))
            total = total + one_step(sigma, q)
            yield list(history), total, sigma * factor, q


def test_a_count_never_admits_a_step_past_the_target():
    """Adversarially: the guard's counts admit any further steps at a sigma >= the floor; k steps
    at the floor itself (the worst a count admits), targets right at the edge, must keep
    Opacus' own epsilon within the target -- bounds (vectors missing) and exact counts alike."""
    bounded = exact_counts = 0
    for history, total, nxt, q in schedules(11, 25):
        accountant = RDPAccountant()
        accountant.history = history
        ours = Accounting(accountant, 1e-5)
        try:
            for m in (1, 3, 12):
                edge = opacus(total + m * one_step(nxt, q))
                for target in (edge * (1 - 1e-9), edge, edge * 1.05):
                    for floor in (nxt, 0.9 * nxt):
                        limit, exact = ours.bound_count(floor, q, target)
                        k = limit - len(history)
                        assert opacus(total + k * one_step(floor, q)) <= target
                        if k >= 0 and exact:
                            assert opacus(total + (k + 1) * one_step(floor, q)) > target
                            exact_counts += 1
                        else:
                            bounded += 1
            if len(history) % 8 == 0:  # the accountant's own count, from the worker
                limit = ours.exact_count(nxt, q, edge).result(timeout=120)
                k = limit - len(history)
                assert opacus(total + k * one_step(nxt, q)) <= edge
                assert opacus(total + (k + 1) * one_step(nxt, q)) > edge
                exact_counts += 1
        finally:
            ours.close()
    assert bounded > 50 and exact_counts == 18, (bounded, exact_counts)


def test_guard_under_a_schedule_stops_at_the_edge_and_decides_few_steps(monkeypatch):
    """A guard on a noise schedule (a new sigma every step) stops where Opacus' epsilon would
    pass the target, having looked closer at few steps: the rest cost a comparison."""
    decided = []
    original = BudgetGuard._decide

    def counted(self, *args):
        decided.append(args[-2:])
        return original(self, *args)

    monkeypatch.setattr(BudgetGuard, "_decide", counted)

    def opacus_history(history) -> float:
        return opacus(sum(one_step(s, q) * n for s, q, n in history))

    steps = 120
    model = ScheduledModel(gamma=0.995, n=8 * steps, batch_size=8)
    q = 8 / (8 * steps)
    target = opacus_history([(1.0 * 0.995 ** i, q, 1) for i in range(90)])
    monitor = PrivacyMonitor(delta=1e-5, target_epsilon=target, progress_bar=False)
    trainer = fit(model, monitor, max_epochs=1)
    history = list(model.privacy_engine.accountant.history)
    assert monitor.guard.stopped
    assert opacus_history(history) <= target
    sigma = float(trainer.optimizers[0].noise_multiplier)
    assert opacus_history([*history, (sigma, q, 1)]) > target  # the next step would pass it
    assert len(history) == 90  # stopped at the edge, not early
    assert len(decided) <= len(history) // 3, len(decided)
