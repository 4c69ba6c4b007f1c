"""Our epsilon equals Opacus' own, step by step, for every accountant."""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from privacy_callbacks.accounting import (BackgroundAccounting, RdpAccounting,
                                          make_accounting)

sigmas = st.floats(min_value=0.3, max_value=10.0, allow_nan=False)
rates = st.floats(min_value=1e-4, max_value=1.0, exclude_min=False)
deltas = st.floats(min_value=1e-10, max_value=0.1)
segment = st.tuples(sigmas, rates, st.integers(min_value=1, max_value=20_000))


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(b), 1e-300)


def assert_never_below(ours: RdpAccounting, expected: float) -> None:
    """Exact values equal Opacus'; a bound (a new sigma before the worker computed it) is above."""
    if ours.latest.exact:
        assert _rel(ours.epsilon, expected) <= 1e-9
    else:
        assert ours.epsilon >= expected


@settings(max_examples=25, deadline=None)
@given(history=st.lists(segment, min_size=1, max_size=6), delta=deltas)
def test_rdp_epsilon_equals_opacus_for_any_history(history, delta):
    accountant = RDPAccountant()
    accountant.history = list(history)
    ours = RdpAccounting(accountant, delta)
    try:
        ours.update()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = accountant.get_epsilon(delta)
        assert ours.steps == sum(s for _, _, s in history)
        assert_never_below(ours, expected)
        assert ours.settle(timeout=120)  # many new (sigma, q) at once: exact from the worker
        assert ours.latest.exact and _rel(ours.epsilon, expected) <= 1e-9
    finally:
        ours.close()


@settings(max_examples=12, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([0.7, 1.0, 1.3]),
                                st.sampled_from([0.004, 0.01])), min_size=1, max_size=30),
       delta=deltas)
def test_rdp_epsilon_tracks_opacus_step_by_step(steps, delta):
    """Incremental updates (the per-step path) stay identical while segments come and go."""
    accountant = RDPAccountant()
    ours = RdpAccounting(accountant, delta)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for sigma, q in steps:
                accountant.step(noise_multiplier=sigma, sample_rate=q)
                ours.update()
                assert_never_below(ours, accountant.get_epsilon(delta))
                assert ours.epsilon_step == ours.steps == sum(n for _, _, n in accountant.history)
            assert ours.settle(timeout=120)
            assert _rel(ours.epsilon, accountant.get_epsilon(delta)) <= 1e-9
    finally:
        ours.close()


def test_rdp_survives_history_replaced():
    """load_state_dict swaps the history list: the cache must notice."""
    accountant = RDPAccountant()
    ours = RdpAccounting(accountant, 1e-5)
    for _ in range(5):
        accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    ours.update()
    accountant.load_state_dict({"history": [(2.0, 0.02, 7), (1.0, 0.01, 3)], "mechanism": "rdp"})
    ours.update()
    assert ours.epsilon == accountant.get_epsilon(1e-5)
    assert ours.steps == 10


def test_empty_history_is_zero_epsilon():
    ours = RdpAccounting(RDPAccountant(), 1e-5)
    ours.update()
    assert ours.epsilon == 0.0 and ours.steps == 0


def test_steps_until_is_exact():
    accountant = RDPAccountant()
    accountant.history = [(1.1, 0.01, 500)]
    ours = RdpAccounting(accountant, 1e-5)
    ours.update()
    target = 3.0
    k = ours.steps_until(target, 1.1, 0.01)
    assert k is not None and k > 0
    longer = RDPAccountant()
    longer.history = [(1.1, 0.01, 500 + k)]
    assert longer.get_epsilon(1e-5) <= target
    longer.history = [(1.1, 0.01, 500 + k + 1)]
    assert longer.get_epsilon(1e-5) > target


def test_exhaustion_steps_counts_down_with_each_step():
    accountant = RDPAccountant()
    ours = RdpAccounting(accountant, 1e-5)
    seen = []
    for _ in range(30):
        accountant.step(noise_multiplier=1.0, sample_rate=0.05)
        ours.update()
        seen.append(ours.exhaustion_steps(2.0, 1.0, 0.05))
        assert seen[-1] == ours.steps_until(2.0, 1.0, 0.05)
    assert seen[0] > seen[-1]


def test_forecast_equals_opacus_at_planned_end():
    accountant = RDPAccountant()
    accountant.history = [(1.0, 0.02, 40)]
    ours = RdpAccounting(accountant, 1e-5)
    ours.update()
    planned = RDPAccountant()
    planned.history = [(1.0, 0.02, 100)]
    assert ours.forecast(60, 1.0, 0.02) == planned.get_epsilon(1e-5)


@pytest.mark.parametrize("cls", [PRVAccountant, GaussianAccountant])
def test_background_epsilon_equals_opacus_and_names_its_step(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = cls()
    ours = make_accounting(accountant, 1e-5)
    assert isinstance(ours, BackgroundAccounting)
    try:
        for _ in range(25):
            accountant.step(noise_multiplier=1.0, sample_rate=0.02)
            ours.update()
        assert ours.settle(timeout=60)
        assert ours.epsilon_step == 25
        assert ours.epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
        assert ours.errors == 0
    finally:
        ours.close()


def test_background_failure_is_counted_not_raised(caplog):
    class Broken(PRVAccountant):
        def get_epsilon(self, delta, **kwargs):
            raise FloatingPointError("boom")

    accountant = Broken()
    ours = make_accounting(accountant, 1e-5)
    try:
        accountant.step(noise_multiplier=1.0, sample_rate=0.01)
        ours.update()  # must not raise
        assert not ours.settle(timeout=30)  # settled, but without an exact value for the step
        assert ours.errors >= 1
        # What stays published is the RDP bound, labelled as a bound for the step.
        assert ours.latest.step == 1 and not ours.latest.exact
        assert ours.epsilon == ours.epsilon_after(0, 1.0, 0.01)
        assert "failed" in caplog.text
    finally:
        ours.close()


def test_unknown_accountant_is_a_clear_error():
    with pytest.raises(ValueError, match="Unexpected accountant"):
        make_accounting(object(), 1e-5)


def test_zero_noise_is_infinite_epsilon():
    accountant = RDPAccountant()
    accountant.history = [(0.0, 0.01, 10)]
    ours = RdpAccounting(accountant, 1e-5)
    ours.update()
    assert math.isinf(ours.epsilon)
