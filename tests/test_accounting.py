"""Our epsilon equals Opacus' own, step by step, for every accountant; counts are exact."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from privacy_callbacks.accounting import Accounting
from privacy_callbacks.accounting.child import extended

sigmas = st.floats(min_value=0.3, max_value=10.0, allow_nan=False)
rates = st.floats(min_value=1e-4, max_value=1.0, exclude_min=False)
deltas = st.floats(min_value=1e-10, max_value=0.1)
segment = st.tuples(sigmas, rates, st.integers(min_value=1, max_value=20_000))


def opacus_epsilon(cls: type, history: list, delta: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = cls()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def accounting(cls: type, history: list | None = None, delta: float = 1e-5) -> Accounting:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = cls()
    accountant.history = list(history or [])
    return Accounting(accountant, delta)


@settings(max_examples=25, deadline=None)
@given(history=st.lists(segment, min_size=1, max_size=6), delta=deltas)
def test_rdp_epsilon_equals_opacus_for_any_history(history, delta):
    ours = accounting(RDPAccountant, history, delta)
    try:
        expected = opacus_epsilon(RDPAccountant, history, delta)
        value = ours.epsilon()
        assert value.step == sum(s for _, _, s in history)
        # Exact values are Opacus' own, bit for bit; a (sigma, q) not computed yet is a bound.
        assert value.value == expected if value.exact else value.value >= expected
        assert ours.settle(timeout=120)
        assert ours.latest.exact and ours.latest.value == expected
    finally:
        ours.close()


@settings(max_examples=12, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([0.7, 1.0, 1.3]),
                                st.sampled_from([0.004, 0.01])), min_size=1, max_size=30),
       delta=deltas)
def test_rdp_epsilon_tracks_opacus_step_by_step(steps, delta):
    """Views of earlier steps (the publisher's path) stay identical while segments come."""
    ours = accounting(RDPAccountant, delta=delta)
    accountant, views = ours.accountant, []
    try:
        for sigma, q in steps:
            accountant.step(noise_multiplier=sigma, sample_rate=q)
            views.append((ours.view(), [tuple(s) for s in accountant.history]))
        for view, history in views:
            value = ours.epsilon(view)
            expected = opacus_epsilon(RDPAccountant, history, delta)
            assert value.step == sum(n for _, _, n in history)
            assert value.value == expected if value.exact else value.value >= expected
        assert ours.settle(timeout=120)
        assert ours.latest.value == opacus_epsilon(RDPAccountant, accountant.history, delta)
    finally:
        ours.close()


def test_rdp_survives_history_replaced():
    """load_state_dict swaps the history list: the running sum must notice."""
    ours = accounting(RDPAccountant)
    for _ in range(5):
        ours.accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    ours.epsilon()
    ours.accountant.load_state_dict({"history": [(2.0, 0.02, 7), (1.0, 0.01, 3)],
                                     "mechanism": "rdp"})
    assert ours.settle(timeout=60)
    assert ours.latest.value == ours.accountant.get_epsilon(1e-5) and ours.latest.step == 10
    ours.close()


def test_empty_history_is_zero_epsilon():
    ours = accounting(RDPAccountant)
    assert ours.epsilon() == ours.latest and ours.latest.value == 0.0 and ours.latest.step == 0
    ours.close()


def test_zero_noise_is_infinite_epsilon():
    ours = accounting(RDPAccountant, [(0.0, 0.01, 10)])
    assert math.isinf(ours.epsilon().value)
    ours.close()


@pytest.mark.parametrize("cls", [RDPAccountant, PRVAccountant, GaussianAccountant])
@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_exact_count_is_the_last_step_the_accountant_allows(cls, target):
    ours = accounting(cls)
    try:
        ours.prepare(1.0, 1 / 16)
        limit = ours.exact_count(1.0, 1 / 16, target).result(timeout=120)
        bound, exact = ours.bound_count(1.0, 1 / 16, target)
        if limit:
            assert opacus_epsilon(cls, [(1.0, 1 / 16, limit)], 1e-5) <= target
        assert opacus_epsilon(cls, [(1.0, 1 / 16, limit + 1)], 1e-5) > target
        # The bound never allows more; RDP's is its own count (every vector cached).
        assert bound <= limit and exact == (cls is RDPAccountant)
        assert (bound == limit) if exact else True
    finally:
        ours.close()


def test_count_at_a_new_sigma_and_rate_merges_as_opacus_does():
    history = [(1.2, 0.01, 500)]
    ours = accounting(RDPAccountant, history)
    try:
        for sigma, q in ((1.2, 0.01), (0.9, 0.02)):
            limit = ours.exact_count(sigma, q, 3.0).result(timeout=120)
            assert opacus_epsilon(RDPAccountant, extended(history, sigma, q, limit - 500),
                                  1e-5) <= 3.0
            assert opacus_epsilon(RDPAccountant, extended(history, sigma, q, limit - 499),
                                  1e-5) > 3.0
    finally:
        ours.close()


@pytest.mark.parametrize("cls", [RDPAccountant, PRVAccountant])
def test_forecast_equals_opacus_at_planned_end(cls):
    ours = accounting(cls, [(1.0, 0.02, 40)])
    try:
        ours.prepare(1.0, 0.02)
        expected = opacus_epsilon(cls, [(1.0, 0.02, 100)], 1e-5)
        assert ours.epsilon_after(60, 1.0, 0.02).result(timeout=120) == expected
        view = ours.view()
        if cls is RDPAccountant:
            assert ours.forecast(view, 60, 1.0, 0.02) == expected
    finally:
        ours.close()


@pytest.mark.parametrize("cls", [PRVAccountant, GaussianAccountant])
def test_background_epsilon_equals_opacus_and_names_its_step(cls):
    ours = accounting(cls)
    published = []
    ours.listener = published.append
    try:
        for _ in range(25):
            ours.accountant.step(noise_multiplier=1.0, sample_rate=0.02)
            value = ours.epsilon()
            assert value.value >= opacus_epsilon(cls, ours.accountant.history, 1e-5) \
                or value.exact
        assert ours.settle(timeout=60)
        assert ours.latest.step == 25 and ours.latest.exact
        assert ours.latest.value == opacus_epsilon(cls, ours.accountant.history, 1e-5)
        assert ours.errors == 0
        assert all(v.value >= opacus_epsilon(cls, [(1.0, 0.02, v.step)], 1e-5) or v.exact
                   for v in published)
    finally:
        ours.close()


class Broken(PRVAccountant):
    def get_epsilon(self, delta, **kwargs):
        raise FloatingPointError("boom")


def test_background_failure_is_counted_not_raised(caplog):
    ours = accounting(Broken)
    try:
        ours.accountant.step(noise_multiplier=1.0, sample_rate=0.01)
        value = ours.epsilon()  # must not raise
        assert not ours.settle(timeout=30)  # settled, but without an exact value
        assert ours.errors >= 1
        # What stays published is the RDP bound, labelled as a bound for the step.
        assert ours.latest.step == 1 and not ours.latest.exact
        # (it may tighten once the RDP vector is computed, never below PRV's value).
        assert value.value >= ours.latest.value >= opacus_epsilon(PRVAccountant,
                                                                  [(1.0, 0.01, 1)], 1e-5)
        assert "failed" in caplog.text
    finally:
        ours.close()


def test_the_child_process_stops_with_the_accounting():
    ours = accounting(PRVAccountant, [(1.0, 0.02, 10)])
    ours.settle(timeout=60)
    proc = ours._worker.child._proc
    assert proc is not None and proc.poll() is None  # it ran the computation
    ours.close()
    assert proc.poll() is not None


UNGUARDED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from opacus.accountants import PRVAccountant
    from privacy_callbacks.accounting import Accounting
    print("training started", flush=True)  # a script without an `if __name__` guard
    accountant = PRVAccountant()
    accountant.history = [(1.0, 0.02, 10)]
    ours = Accounting(accountant, 1e-5)
    assert ours.settle(timeout=120)
    ours.close()
""")


def test_an_unguarded_training_script_runs_once(tmp_path):
    """Why the child is a plain script, not a multiprocessing pool: spawn and forkserver
    children import the parent's main file, which would start the training again."""
    script = tmp_path / "train.py"
    script.write_text(UNGUARDED.format(tests=str(tmp_path)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("training started") == 1


def test_cached_vectors_are_bounded_and_bound_from_below():
    from privacy_callbacks.accounting.rdp import Vectors

    cache = Vectors(size=4)
    for i in range(10):
        cache.put(1.0 + i / 10, 0.01, np.full(3, float(i)))
    assert len(cache._vectors) == 4 and cache.get(1.0, 0.01) is None
    assert cache.below(1.75, 0.01)[0] == 7.0 and cache.below(1.5, 0.01) is None
