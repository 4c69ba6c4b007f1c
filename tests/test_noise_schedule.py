"""A noise scheduler (a new sigma every step) costs the training thread no RDP computation.

Opacus' ``ExponentialNoise(gamma=0.999)`` stepped every batch: each step is a new history
segment. Every published (epsilon, step) is at least Opacus' epsilon for the history of that
step, and the final one equals it once the background worker has caught up.
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
from privacy_callbacks import PrivacyMonitor
from privacy_callbacks.exporters.base import Exporter
from privacy_callbacks.security import advantage_from_rdp

STEPS = 40


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
    """Names of the threads that call Opacus' compute_rdp, in call order."""
    calls: list[str] = []
    original = rdp_analysis.compute_rdp

    def recording(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(rdp_analysis, "compute_rdp", recording)
    return calls


def _rdp_truth(history: list) -> tuple[dict[int, float], dict[int, float]]:
    """Opacus' RDP epsilon after each step (segments summed in Opacus' order), and the
    tightest membership-inference bound that RDP allows."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    total, truth, risk = 0, {}, {}
    for i, (sigma, q, steps) in enumerate(history, 1):
        total = total + rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                 orders=orders)
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=1e-5)
        truth[i] = float(eps)
        risk[i] = advantage_from_rdp(total, orders)
    return truth, risk


@functools.cache
def _one_step_rdp(sigma: float, q: float) -> np.ndarray:
    """Opacus' RDP of one step at (sigma, q), at its default orders."""
    return rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                    orders=RDPAccountant.DEFAULT_ALPHAS)


def _random_schedules(seed: int, steps: int, decay: float):
    """Six schedules at a random first sigma and q (falling by ``decay``, rising, mixed): after
    each step, (trial, step, accountant, its RdpAccounting after a full check of the next
    step, sigma, q, Opacus' RDP so far, the schedule's factor)."""
    from privacy_callbacks.accounting import RdpAccounting

    rng = np.random.default_rng(seed)
    for trial in range(6):
        accountant = RDPAccountant()
        accounting = RdpAccounting(accountant, 1e-5)
        sigma, q = float(rng.uniform(0.8, 3.0)), float(rng.choice([0.01, 0.05, 0.125]))
        rdp = np.zeros(len(RDPAccountant.DEFAULT_ALPHAS))
        try:
            for step in range(steps):
                factor = (decay, 1.01, float(rng.uniform(0.97, 1.03)))[trial % 3]
                sigma = max(0.5, sigma * factor)
                accountant.step(noise_multiplier=sigma, sample_rate=q)
                rdp = rdp + _one_step_rdp(sigma, q)
                accounting.epsilon_after(1, sigma, q)  # the full path picks the order
                yield trial, step, accountant, accounting, sigma, q, rdp, factor
        finally:
            accounting.close()


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_scheduler_epsilon_is_a_bound_every_step_and_exact_at_the_end(mechanism, rdp_threads):
    recorder = Recorder()
    monitor = PrivacyMonitor(delta=1e-5, exporters=[recorder], session_id="t", mechanism=False)
    steps = STEPS if mechanism == "rdp" else 8  # PRV: Opacus takes seconds per segment count
    model = ScheduledModel(n=8 * steps, batch_size=8, accountant=mechanism)
    fit(model, monitor, max_epochs=1)
    history = list(model.privacy_engine.accountant.history)
    assert len(history) == steps and all(n == 1 for _, _, n in history)  # a new sigma each step

    main = threading.main_thread().name
    on_training_thread = rdp_threads.count(main)
    assert on_training_thread <= 4, rdp_threads  # the first few (sigma, q) only: warm-up

    if mechanism == "rdp":
        truth, risk = _rdp_truth(history)
        scored = [(step, score) for _, step, _, score in recorder.seen if score is not None]
        # The membership-inference bound holds at every step it is computed for: the newest
        # step of each publisher batch, the last one included.
        assert scored and scored[-1][0] == steps
        for step, score in scored:
            assert score >= risk[step]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            truth = {}
            for step in sorted({s for _, s, _, _ in recorder.seen}):
                accountant = PRVAccountant()
                accountant.history = history[:step]
                truth[step] = accountant.get_epsilon(1e-5)
    for eps, step, exact, _ in recorder.seen:
        assert eps >= truth[step], f"published {eps} for step {step}, Opacus says {truth[step]}"
        if exact:
            assert eps == pytest.approx(truth[step], rel=1e-9)
    assert {s for _, s, _, _ in recorder.seen} == set(range(1, steps + 1))
    last_eps, last_step, last_exact, _ = recorder.seen[-1]
    assert (last_step, last_exact) == (steps, 1)
    assert last_eps == pytest.approx(truth[steps], rel=1e-9)
    assert monitor.last_snapshot.epsilon == pytest.approx(truth[steps], rel=1e-9)
    accounting = monitor.accounting
    assert accounting is None or len(accounting._rdp._vectors) <= 64


def test_bound_vectors_are_above_opacus_at_every_order():
    """The grid and closed-form vectors bound Opacus' own, as the published bound relies on."""
    from privacy_callbacks.accounting import _GRID, _RdpMath, _cell
    math_ = _RdpMath(1e-5)
    math_._sync_left = 0
    orders = math_.orders
    for q in (1e-3, 0.01, 0.125, 0.5):
        for sigma in (0.6, 1.0, 1.37, 4.2):
            truth = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
            closed, exact = math_.lookup(sigma, q)
            assert not exact and np.all(closed >= truth)
            grid_sigma = np.exp(_cell(sigma) * _GRID)
            assert grid_sigma <= sigma < grid_sigma * 1.01 + 1e-12
            grid = rdp_analysis.compute_rdp(q=q, noise_multiplier=grid_sigma, steps=1,
                                            orders=orders)
            assert np.all(grid >= truth)
    math_.close()


def test_one_order_quick_bound_is_never_below_opacus():
    """The guard clears a step from one RDP order's value (pure Python, Accounting.fits): it
    must never be below Opacus' epsilon for that step, for decaying, rising and mixed
    schedules, and fits() must say no whenever Opacus' epsilon is past the target."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = np.array(RDPAccountant.DEFAULT_ALPHAS)
    vector = _one_step_rdp

    checked = quick_used = 0
    for trial, step, accountant, accounting, sigma, q, rdp, _ in _random_schedules(7, 40, 0.99):
        for nxt in (sigma, sigma * 0.995, sigma * 1.02):
            exact = get_privacy_spent(orders=orders, rdp=rdp + vector(nxt, q),
                                      delta=1e-5)[0]
            quick = accounting._rdp.quick_bound(accountant.history, (nxt, q, 1))
            if quick is not None:
                quick_used += 1
                assert quick >= exact * (1 - 1e-12), (trial, step, nxt, quick, exact)
            for target in (exact * 0.999, exact * (1 - 1e-12), exact * 1.001, exact * 2):
                if exact > target:
                    assert not accounting.fits(target, nxt, q), (trial, step, target)
            checked += 1
    # How often the quick bound applies depends on how far the background grid got (timing);
    # a constant sigma's first step always has its exact vector.
    assert checked == 6 * 40 * 3 and quick_used > 0


def test_a_credit_never_admits_a_step_past_the_target():
    """The budget guard clears most steps from a credit (Accounting.credit): k further steps at
    any sigma >= a floor. Adversarially: k steps at the floor itself (the worst sigma the credit
    admits), for decaying, rising and mixed schedules and targets right at the edge, must keep
    Opacus' own epsilon within the target."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = np.array(RDPAccountant.DEFAULT_ALPHAS)
    vector = _one_step_rdp

    def opacus(rdp: np.ndarray) -> float:
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0])

    bounded = exact_counts = 0
    for trial, step, _, accounting, sigma, q, rdp, factor in _random_schedules(11, 30, 0.995):
        nxt = sigma * factor
        for m in (1, 3, 12):
            edge = opacus(rdp + m * vector(nxt, q))
            for target in (edge * (1 - 1e-9), edge, edge * 1.05):
                if step % 5 == 0 and m == 3:  # the metrics' count, when it is at hand
                    accounting.exhaustion_steps(target, nxt, q)
                credit = accounting.credit(target, nxt, q)
                if credit is None or credit[0] < 1:
                    continue
                k, floor, exact = credit
                assert floor <= nxt
                worst = opacus(rdp + k * vector(floor, q))
                assert worst <= target, (trial, step, m, target, credit, worst)
                if exact:
                    exact_counts += 1
                    assert k == accounting.exhaustion_steps(target, nxt, q)
                else:
                    bounded += 1
    assert bounded > 50 and exact_counts > 0, (bounded, exact_counts)


def test_guard_under_a_schedule_clears_steps_from_credit_and_stops_at_the_edge(monkeypatch):
    """A budget guard on a noise schedule (a new sigma every step) stops where Opacus' epsilon
    would pass the target, and clears most steps without computing anything."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    from privacy_callbacks.accounting import Accounting

    checks = []
    original = Accounting.fits

    def counted(self, *args):
        checks.append(args)
        return original(self, *args)

    monkeypatch.setattr(Accounting, "fits", counted)
    orders = RDPAccountant.DEFAULT_ALPHAS

    def opacus(history) -> float:
        rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders)
                  for s, q, n in history)
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0])

    steps = 120
    model = ScheduledModel(gamma=0.995, n=8 * steps, batch_size=8)
    q = 8 / (8 * steps)
    # The target: epsilon after 90 steps of this schedule.
    target = opacus([(1.0 * 0.995 ** i, q, 1) for i in range(90)])
    monitor = PrivacyMonitor(delta=1e-5, target_epsilon=target, mechanism=False,
                             progress_bar=False)
    trainer = fit(model, monitor, max_epochs=1)
    history = list(model.privacy_engine.accountant.history)
    assert monitor.guard.stopped
    assert opacus(history) <= target
    sigma = float(trainer.optimizers[0].noise_multiplier)
    assert opacus([*history, (sigma, q, 1)]) > target  # the next step would have passed it
    assert len(history) >= 85  # stopped at the edge, not early
    assert len(checks) <= len(history) // 3, len(checks)  # most steps cleared from credit
