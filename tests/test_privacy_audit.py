"""The one-run privacy audit: the bound of Steinke, Nasr, Jagielski (2023) and its callback."""

from __future__ import annotations

import json
import logging
import math

import lightning.pytorch as pl
import numpy as np
import opacus.optimizers.optimizer as opacus_optimizer
import pytest
import torch
from scipy.stats import binom
from torch import nn
from torch.utils.data import DataLoader

from dp_models import DPModel, fit
from privacy_callbacks import (ComplianceAudit, MembershipInferenceProbe, OneRunAudit,
                               PrivacyMonitor, PrometheusExporter)
from privacy_callbacks.attacks.one_run import audit, epsilon_lower_bound, p_value

DELTA = 1e-5
# The decisive setting: sigma=3 over one epoch of 8 steps at q=1/8 reports epsilon ~0.58.
SIGMA = 3.0
LABELS = {"session_id": "audit", "model_name": "WideModel"}


def no_noise(std, reference, generator=None, secure_mode=False):
    """A broken mechanism: Opacus' noise generator returning zeros, the accountant unaware."""
    return torch.zeros_like(reference)


class WideModel(DPModel):
    """DPModel with 5k parameters: room for 1000 canaries, one coordinate each."""

    def __init__(self, noise_multiplier: float = SIGMA) -> None:
        super().__init__(noise_multiplier=noise_multiplier)
        self.net = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 2))


def audited_fit(model, *callbacks, canaries=1000, **monitor_kwargs):
    exporter = PrometheusExporter(serve=False)
    monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter], session_id="audit",
                             progress_bar=False, **monitor_kwargs)
    auditor = OneRunAudit(DELTA, canaries=canaries)
    fit(model, monitor, auditor, *callbacks)
    return monitor, auditor, exporter


def test_all_guesses_right_gives_the_closed_form_bound():
    # delta = 0: P[Binomial(r, p) >= r] = p^r = 0.05 at the bound.
    p = 0.05 ** (1 / 1000)
    assert epsilon_lower_bound(1000, 1000, 1000, 0.0) == pytest.approx(
        math.log(p / (1 - p)), abs=1e-5)
    # delta > 0 only makes the bound smaller; chance-level guessing shows nothing.
    assert epsilon_lower_bound(1000, 1000, 1000, 1e-5) < epsilon_lower_bound(1000, 1000, 1000, 0)
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0


def test_the_bound_is_rejected_and_just_above_it_is_not():
    m, r, v = 1000, 300, 200
    bound = epsilon_lower_bound(m, r, v, DELTA)
    assert p_value(m, r, v, bound, DELTA) < 0.05 <= p_value(m, r, v, bound + 2e-6, DELTA)


def test_p_value_is_the_theorem_of_the_paper():
    m, r, v, eps, delta = 500, 100, 70, 0.5, 1e-4
    q = 1 / (1 + math.exp(-eps))
    tail = sum(binom.pmf(k, r, q) for k in range(v, r + 1))
    alpha = max(sum(binom.pmf(k, r, q) for k in range(v - i, v)) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(tail + 2 * m * delta * alpha, rel=1e-9)
    with pytest.raises(ValueError, match="Unexpected value for v: 101"):
        p_value(m, r, 101, eps, delta)


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


def test_broken_noise_is_caught_and_a_correct_mechanism_is_not(monkeypatch, tmp_path, caplog):
    trail = tmp_path / "audit.jsonl"
    monitor, auditor, exporter = audited_fit(WideModel(), ComplianceAudit(DELTA, audit=trail))
    final = monitor.last_snapshot
    reported = final.epsilon
    assert final.epsilon_exact == 1 and 0.4 < reported < 0.8
    correct = auditor.result
    assert correct.epsilon_lower_bound < reported

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", no_noise)
    with caplog.at_level(logging.ERROR, logger="privacy_callbacks"):
        broken_monitor, broken, broken_exporter = audited_fit(WideModel())
    assert broken_monitor.last_snapshot.epsilon == reported  # the accountant cannot tell
    assert broken.result.epsilon_lower_bound > 2 * reported
    alarm, = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "weaker than reported" in alarm and f"{reported:.4g}" in alarm

    # Published by the monitor, which the audit never looked up.
    for exp, result in ((exporter, correct), (broken_exporter, broken.result)):
        assert exp.registry.get_sample_value("privacy_audit_epsilon_lower_bound",
                                             LABELS) == result.epsilon_lower_bound
        assert exp.registry.get_sample_value(
            "privacy_attack_score", {**LABELS, "attack_type": "one_run_audit"}
        ) == pytest.approx(1 / (1 + math.exp(-result.epsilon_lower_bound)))

    # The trail's fit_end holds the bound next to the exact epsilon it is compared with.
    end, = [r["data"] for r in map(json.loads, trail.read_text().splitlines())
            if r["event"] == "fit_end"]
    assert end["epsilon"] == reported
    assert end["reported"]["audit_epsilon_lower_bound"] == correct.epsilon_lower_bound
    assert end["reported"]["attack_scores"] == {"one_run_audit": correct.accuracy_bound}


class ValidatedWideModel(WideModel):
    def validation_step(self, batch, batch_idx):
        return None

    def val_dataloader(self):
        return DataLoader(self.dataset, batch_size=64)


def test_two_attacks_publish_side_by_side():
    model = ValidatedWideModel()
    probe = MembershipInferenceProbe(model.dataset, model.dataset, samples=16)
    _, auditor, exporter = audited_fit(model, probe)
    scores = {kind: exporter.registry.get_sample_value(
        "privacy_attack_score", {**LABELS, "model_name": "ValidatedWideModel",
                                 "attack_type": kind})
        for kind in ("loss_threshold", "one_run_audit")}
    assert scores == {"loss_threshold": probe.score, "one_run_audit": auditor.score}


def test_canaries_leave_the_accounting_and_the_optimizer_as_they_were():
    plain_monitor = PrivacyMonitor(delta=DELTA, progress_bar=False)
    fit(WideModel(), plain_monitor)
    monitor, _, _ = audited_fit(WideModel())
    # Same history, same epsilon: canaries are extra records, not extra steps or a new rate.
    assert (monitor.accounting.accountant.history
            == plain_monitor.accounting.accountant.history)
    assert monitor.last_snapshot.epsilon == plain_monitor.last_snapshot.epsilon


def test_canaries_touch_only_their_own_coordinates_by_one_clipped_record():
    # Same seed, same real data and noise; one step with canaries and one without.
    runs = []
    for canaries in (None, 300):
        torch.manual_seed(0)
        model = WideModel()
        callbacks = [PrivacyMonitor(delta=DELTA, progress_bar=False)]
        if canaries:
            callbacks.append(OneRunAudit(DELTA, canaries=canaries))
        fit(model, *callbacks, max_steps=1)
        runs.append((model, callbacks[-1]))
    (plain, _), (model, auditor) = runs
    params = list(model.parameters())
    diff = torch.cat([(p - q).detach().reshape(-1)
                      for p, q in zip(params, plain.parameters())]).numpy()
    offsets = dict(zip(map(id, params), np.cumsum([0] + [p.numel() for p in params])))
    flat = np.concatenate([offsets[id(p)] + c.numpy() for p, c, _, _ in auditor._where])
    included, excluded = flat[auditor._coins], flat[~auditor._coins]
    # One clipped record moves a coordinate by lr * C / B = 0.1 * 1 / 32, against its sign.
    moved = np.flatnonzero(np.abs(diff) > 1e-7)
    assert set(moved) <= set(included)
    assert np.allclose(np.abs(diff[moved]), 0.1 / 32, rtol=1e-4)
    signs = dict(zip(flat, auditor._signs))
    assert all(np.sign(diff[i]) == -signs[i] for i in moved)
    assert not np.any(diff[excluded])
    # Each included canary is drawn at q = 1/8: about 19 of ~150, not 0 and not all.
    assert 0 < moved.size < included.size


def test_a_step_the_guard_skips_releases_no_canary():
    # Target 3: the guard skips the 4th step (epsilon 3.16) and stops.
    model = WideModel(noise_multiplier=1.0)
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=3.0, progress_bar=False)
    auditor = OneRunAudit(DELTA, canaries=200)
    released = []

    class Count(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            draw = auditor._add_canaries
            auditor._add_canaries = lambda *args: (released.append(args), draw(*args))

    fit(model, monitor, auditor, Count())
    accounted = sum(n for _, _, n in model.privacy_engine.accountant.history)
    assert monitor.guard.stopped and accounted == 3
    assert len(released) == accounted


def test_the_wrapper_goes_at_the_end_and_when_the_fit_fails():
    model = WideModel()
    fit(model, PrivacyMonitor(delta=DELTA, progress_bar=False), OneRunAudit(DELTA, canaries=50))
    optimizer = model.trainer.optimizers[0]
    assert "add_noise" not in vars(optimizer)

    class Fail(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 2:
                raise RuntimeError("boom")

    seen = []

    class Another(pl.Callback):
        """Another part's add_noise on the instance, put there first: it stays."""

        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            original = opt.add_noise
            opt.add_noise = lambda: (seen.append(1), original())[1]
            seen.append(opt.add_noise)

    model = WideModel()
    auditor = OneRunAudit(DELTA, canaries=50)
    with pytest.raises(RuntimeError, match="boom"):
        fit(model, Another(), auditor, Fail())
    optimizer = model.trainer.optimizers[0]
    assert vars(optimizer)["add_noise"] is seen[0] and seen.count(1) == 2
    assert auditor._wrapper is None


def test_coins_come_from_the_operating_system_not_the_seed():
    coins = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        auditor = OneRunAudit(DELTA, canaries=200)
        fit(WideModel(), auditor, max_steps=1)
        coins.append(auditor._coins.copy())
    assert not np.array_equal(coins[0], coins[1])


def test_without_a_monitor_the_audit_still_measures():
    auditor = OneRunAudit(DELTA, canaries=100)
    fit(WideModel(), auditor)
    assert auditor.result.canaries == 100 and auditor.epsilon_lower_bound is not None
    assert auditor.privacy_values()["audit_epsilon_lower_bound"] == auditor.epsilon_lower_bound


def test_bad_arguments_and_a_resumed_run_are_clear():
    with pytest.raises(ValueError, match="canaries: 1;"):
        OneRunAudit(DELTA, canaries=1)
    with pytest.raises(ValueError, match="confidence: 1.5"):
        OneRunAudit(DELTA, confidence=1.5)
    with pytest.raises(ValueError, match="delta: 2"):
        OneRunAudit(2, canaries=10)
    with pytest.raises(ValueError, match="canaries: 9999"):
        fit(DPModel(), PrivacyMonitor(delta=DELTA, progress_bar=False),
            OneRunAudit(DELTA, canaries=9999))
    model = WideModel()
    fit(model, max_steps=1)  # the accountant already holds a step: not the whole run
    with pytest.raises(ValueError, match="whole training run"):
        fit(model, OneRunAudit(DELTA, canaries=10))
