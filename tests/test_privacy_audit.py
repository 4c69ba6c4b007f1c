"""The one-run privacy audit: the bound of Steinke, Nasr, Jagielski (2023) and its callback."""

from __future__ import annotations

import json
import math

import numpy as np
import opacus.optimizers.optimizer as opacus_optimizer
import pytest
import torch
from scipy.stats import binom
from torch import nn

from dp_models import DPModel, fit
from privacy_callbacks import PrivacyMonitor, PrometheusExporter
from privacy_callbacks.privacy_audit import OneRunAudit, audit, epsilon_lower_bound, p_value

DELTA = 1e-5
# The decisive setting: sigma=3 over one epoch of 8 steps at q=1/8 reports epsilon ~0.58.
SIGMA = 3.0


def no_noise(std, reference, generator=None, secure_mode=False):
    """A broken mechanism: Opacus' noise generator returning zeros, the accountant unaware."""
    return torch.zeros_like(reference)


class WideModel(DPModel):
    """DPModel with 5k parameters: room for 1000 canaries, one coordinate each."""

    def __init__(self, noise_multiplier: float = SIGMA) -> None:
        super().__init__(noise_multiplier=noise_multiplier)
        self.net = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 2))


def audited_fit(model, canaries=1000, **monitor_kwargs):
    exporter = PrometheusExporter(serve=False)
    monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter], session_id="audit",
                             progress_bar=False, **monitor_kwargs)
    auditor = OneRunAudit(canaries=canaries)
    fit(model, monitor, auditor)
    return monitor, auditor, exporter


def test_all_guesses_right_gives_the_closed_form_bound():
    # delta = 0: P[Binomial(r, p) >= r] = p^r = 0.05 at the bound.
    p = 0.05 ** (1 / 1000)
    assert epsilon_lower_bound(1000, 1000, 1000, 0.0) == pytest.approx(
        math.log(p / (1 - p)), abs=1e-5)
    # delta > 0 only makes the bound smaller; chance-level guessing shows nothing.
    assert epsilon_lower_bound(1000, 1000, 1000, 1e-5) < epsilon_lower_bound(1000, 1000, 1000, 0)
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0


def test_p_value_is_the_theorem_of_the_paper():
    m, r, v, eps, delta = 500, 100, 70, 0.5, 1e-4
    q = 1 / (1 + math.exp(-eps))
    tail = sum(binom.pmf(k, r, q) for k in range(v, r + 1))
    alpha = max(sum(binom.pmf(k, r, q) for k in range(v - i, v)) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(tail + 2 * m * delta * alpha, rel=1e-9)


def test_bound_holds_at_95_percent_for_a_mechanism_that_is_exactly_eps_dp():
    # Randomised response at epsilon = 1 is the worst case the theorem allows: the bound may
    # pass 1 in at most 5 % of runs.
    rng = np.random.default_rng(0)
    eps, m, r, trials = 1.0, 1000, 300, 400
    correct = rng.binomial(r, 1 / (1 + math.exp(-eps)), size=trials)
    above = sum(epsilon_lower_bound(m, r, int(v), 0.0) > eps for v in correct)
    assert above / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert above > 0  # and the test has teeth: it is tight, not vacuous


def test_audit_separates_perfect_scores_from_random_ones():
    rng = np.random.default_rng(1)
    coins = rng.random(1000) < 0.5
    assert audit(coins.astype(float), coins, DELTA).epsilon_lower_bound > 3
    result = audit(rng.random(1000), coins, DELTA)
    assert result.epsilon_lower_bound < 0.5 and result.canaries == 1000


def test_broken_noise_is_caught_and_a_correct_mechanism_is_not(monkeypatch, tmp_path):
    trail = tmp_path / "audit.jsonl"
    monitor, auditor, exporter = audited_fit(WideModel(), audit=str(trail))
    reported = monitor.accounting.epsilon
    assert 0.4 < reported < 0.8
    correct = auditor.result
    assert correct.epsilon_lower_bound < reported

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", no_noise)
    broken_monitor, broken, broken_exporter = audited_fit(WideModel())
    assert broken_monitor.accounting.epsilon == reported  # the accountant cannot tell
    assert broken.result.epsilon_lower_bound > 2 * reported

    labels = {"session_id": "audit", "model_name": "WideModel"}
    for exp, result in ((exporter, correct), (broken_exporter, broken.result)):
        assert exp.registry.get_sample_value("privacy_audit_epsilon_lower_bound",
                                             labels) == result.epsilon_lower_bound
        assert exp.registry.get_sample_value(
            "privacy_attack_score", {**labels, "attack_type": "one_run_audit"}
        ) == pytest.approx(1 / (1 + math.exp(-result.epsilon_lower_bound)))

    records = [json.loads(line) for line in trail.read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events.index("privacy_audit") < events.index("fit_end")
    record = next(r["data"] for r in records if r["event"] == "privacy_audit")
    assert record["epsilon_lower_bound"] == correct.epsilon_lower_bound
    assert record["reported_epsilon"] == reported and record["contradicted"] is False
    assert record["canaries"] == 1000 and record["confidence"] == 0.95
    assert next(r["data"] for r in records if r["event"] == "fit_end")[
        "audit_epsilon_lower_bound"] == correct.epsilon_lower_bound


def test_canaries_leave_the_accounting_and_the_optimizer_as_they_were():
    plain_monitor = PrivacyMonitor(delta=DELTA, progress_bar=False)
    plain = WideModel()
    fit(plain, plain_monitor)
    monitor, _, _ = audited_fit(WideModel())
    # Same history, same epsilon: canaries are extra records, not extra steps or a new rate.
    assert (monitor.accounting.accountant.history
            == plain_monitor.accounting.accountant.history)
    assert monitor.accounting.epsilon == plain_monitor.accounting.epsilon


def test_canaries_touch_only_their_own_coordinates_by_one_clipped_record():
    # Same seed, same real data and noise; one step with canaries and one without.
    runs = []
    for canaries in (None, 300):
        torch.manual_seed(0)
        model = WideModel()
        callbacks = [PrivacyMonitor(delta=DELTA, progress_bar=False)]
        if canaries:
            callbacks.append(OneRunAudit(canaries=canaries))
        fit(model, *callbacks, max_steps=1)
        runs.append((torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                     callbacks[-1]))
    (plain, _), (audited, auditor) = runs
    diff = (audited - plain).numpy()
    offsets = np.cumsum([0] + [p.numel() for p in auditor._params])
    flat = np.concatenate([offsets[i] + c.numpy() for i, c in auditor._where])
    included = flat[auditor._coins]
    excluded = flat[~auditor._coins]
    # One clipped record moves a coordinate by lr * C / B = 0.1 * 1 / 32, against its sign.
    moved = np.flatnonzero(np.abs(diff) > 1e-7)
    assert set(moved) <= set(included)
    assert np.allclose(np.abs(diff[moved]), 0.1 / 32, rtol=1e-4)
    assert not np.any(diff[excluded])
    # Each included canary is drawn at q = 1/8: about 19 of ~150, not 0 and not all.
    assert 0 < moved.size < included.size


def test_coins_come_from_the_operating_system_not_the_seed():
    coins = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        model = WideModel()
        monitor = PrivacyMonitor(delta=DELTA, progress_bar=False)
        auditor = OneRunAudit(canaries=200)
        fit(model, monitor, auditor)
        coins.append(auditor._coins.copy())
    assert not np.array_equal(coins[0], coins[1])


def test_bad_arguments_and_missing_monitor_are_clear():
    with pytest.raises(ValueError, match="canaries: 1"):
        OneRunAudit(canaries=1)
    with pytest.raises(ValueError, match="confidence: 1.5"):
        OneRunAudit(confidence=1.5)
    with pytest.raises(ValueError, match="needs a PrivacyMonitor"):
        fit(WideModel(), OneRunAudit(canaries=10))
    with pytest.raises(ValueError, match="canaries: 9999"):
        fit(DPModel(), PrivacyMonitor(delta=DELTA, progress_bar=False),
            OneRunAudit(canaries=9999))
