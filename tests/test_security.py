"""Membership-inference risk: the proven bound per step and the empirical loss-threshold attack."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.gdp import compute_mu_poisson
from opacus.accountants.analysis.rdp import compute_rdp
from scipy.stats import norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_models import DPModel, make_data
from privacy_callbacks import MembershipInferenceProbe, PrivacyMonitor, PrometheusExporter
from privacy_callbacks.accounting.bounds import (advantage_from_epsilon, advantage_from_mu,
                                                 advantage_from_rdp)
from privacy_callbacks.attacks.membership import attack_metrics

ORDERS = np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=float)


def fit(model, *callbacks, **kwargs):
    options = dict(max_epochs=1, enable_progress_bar=False, logger=False,
                   enable_checkpointing=False, enable_model_summary=False,
                   num_sanity_val_steps=0)
    options.update(kwargs)
    trainer = pl.Trainer(callbacks=list(callbacks), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    return trainer


def brute_force_advantage(epsilon: float, delta: float) -> float:
    """max TPR - FPR over the (epsilon, delta)-DP region, on a fine FPR grid."""
    fpr = np.linspace(0, 1, 2_000_001)
    tpr = np.minimum.reduce([np.ones_like(fpr), math.exp(epsilon) * fpr + delta,
                             1 - math.exp(-epsilon) * (1 - fpr - delta)])
    return float(np.max(tpr - fpr))


@pytest.mark.parametrize("epsilon,delta", [(0.1, 0.0), (1.0, 1e-5), (3.0, 1e-3), (8.0, 1e-5)])
def test_epsilon_delta_bound_is_the_corner_of_the_dp_region(epsilon, delta):
    assert advantage_from_epsilon(epsilon, delta) == pytest.approx(
        brute_force_advantage(epsilon, delta), abs=1e-6)
    if delta == 0.0:
        assert advantage_from_epsilon(epsilon, 0.0) == pytest.approx(math.tanh(epsilon / 2))


@pytest.mark.parametrize("mu", [0.1, 0.5, 1.0, 3.0])
def test_gdp_bound_is_the_total_variation_of_two_unit_gaussians(mu):
    assert advantage_from_mu(mu) == pytest.approx(2 * norm.cdf(mu / 2) - 1, rel=1e-12)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0, 5.0])
def test_rdp_bound_holds_for_the_gaussian_mechanism_and_beats_one_epsilon(sigma):
    # One full-batch step is the Gaussian mechanism: its exact advantage is 2 Phi(1/(2 sigma)) - 1.
    rdp = compute_rdp(q=1.0, noise_multiplier=sigma, steps=1, orders=ORDERS)
    bound = advantage_from_rdp(rdp, ORDERS)
    exact = 2 * norm.cdf(1 / (2 * sigma)) - 1
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, 1)]
    kairouz = advantage_from_epsilon(accountant.get_epsilon(1e-5), 1e-5)
    assert exact <= bound < kairouz


def test_rdp_bound_is_far_tighter_than_the_reported_epsilon_for_sgd():
    rdp = compute_rdp(q=1 / 8, noise_multiplier=1.0, steps=16, orders=ORDERS)
    accountant = RDPAccountant()
    accountant.history = [(1.0, 1 / 8, 16)]
    assert advantage_from_epsilon(accountant.get_epsilon(1e-5), 1e-5) > 0.98
    assert advantage_from_rdp(rdp, ORDERS) < 0.40


def test_risk_score_every_step_is_a_valid_bound_and_exported():
    exporter = PrometheusExporter(serve=False)
    monitor = PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="mia")
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            history = list(pl_module.privacy_engine.accountant.history)
            seen.append((monitor.last_snapshot, history))

    fit(DPModel(), monitor, Spy(), max_epochs=2)
    for snap, history in seen:
        (sigma, q, steps), = history
        exact_rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
        # Never below the tightest bound for this very step, never above the (eps, delta) one.
        assert advantage_from_rdp(exact_rdp, ORDERS) <= snap.membership_inference_risk
        assert snap.membership_inference_risk <= advantage_from_epsilon(snap.epsilon, 1e-5)
    monitor.flush()
    value = exporter.registry.get_sample_value(
        "membership_inference_risk_score", {"session_id": "mia", "model_name": "DPModel"})
    assert value == seen[-1][0].membership_inference_risk


def test_risk_score_with_the_gaussian_accountant_uses_its_mu():
    monitor = PrivacyMonitor(delta=1e-5, session_id="gdp")
    risks = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            (sigma, q, steps), = pl_module.privacy_engine.accountant.history
            mu = compute_mu_poisson(steps=steps, noise_multiplier=sigma, sample_rate=q)
            risks.append((monitor.last_snapshot.membership_inference_risk,
                          2 * norm.cdf(mu / 2) - 1))

    fit(DPModel(accountant="gdp"), monitor, Spy())
    assert len(risks) == 8
    for ours, closed_form in risks:
        assert ours == pytest.approx(closed_form, rel=1e-12)


def test_attack_metrics_on_known_scores():
    # Members' losses all below non-members': a perfect attack.
    assert attack_metrics([0.1, 0.2], [0.3, 0.4]) == (1.0, 1.0)
    # Identical distributions: AUC 0.5 (ties count half), no advantage.
    assert attack_metrics([1.0, 1.0], [1.0, 1.0]) == (0.5, 0.0)
    # 3 of 4 (member, non-member) pairs ordered right; best threshold 0.2 gives 1/2 - 0.
    auc, adv = attack_metrics([0.1, 0.5], [0.3, 0.6])
    assert auc == 0.75 and adv == 0.5


class Memorizer(DPModel):
    """Random labels over 10 classes: only memorising gets the training set right."""

    def __init__(self, private: bool, noise_multiplier: float = 1.0) -> None:
        super().__init__(noise_multiplier=noise_multiplier, n=64, batch_size=64, lr=0.5)
        self.private = private
        self.net = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 10))
        gen = torch.Generator().manual_seed(7)
        x = make_data(128, seed=3).tensors[0]
        y = torch.randint(0, 10, (128,), generator=gen)
        self.dataset = TensorDataset(x[:64], y[:64])
        self.holdout = TensorDataset(x[64:], y[64:])

    def configure_optimizers(self):
        if self.private:
            return super().configure_optimizers()
        return torch.optim.Adam(self.parameters(), lr=0.02)

    def validation_step(self, batch, batch_idx):
        return None

    def val_dataloader(self):
        return DataLoader(self.holdout, batch_size=64)


def test_probe_separates_an_overfit_model_from_a_private_one():
    epochs = 100
    # Seeded: the outcome must not depend on the random state earlier tests leave behind.
    pl.seed_everything(7, verbose=False)
    plain = Memorizer(private=False)
    plain_probe = MembershipInferenceProbe(plain.dataset, plain.holdout, samples=64)
    fit(plain, plain_probe, max_epochs=epochs, check_val_every_n_epoch=epochs)
    assert plain_probe.auc > 0.9 and plain_probe.advantage > 0.6

    # sigma=40 over 100 full-batch steps: mu = 10/40, so no attack's advantage exceeds ~0.1.
    pl.seed_everything(7, verbose=False)
    private = Memorizer(private=True, noise_multiplier=40.0)
    private_probe = MembershipInferenceProbe(private.dataset, private.holdout, samples=64)
    exporter = PrometheusExporter(serve=False)
    monitor = PrivacyMonitor(delta=1e-3, exporters=[exporter], session_id="probe")
    fit(private, monitor, private_probe, max_epochs=epochs, check_val_every_n_epoch=epochs)
    # The published bound is the RDP one for this very step, far below the (eps, delta) one.
    (sigma, q, steps), = private.privacy_engine.accountant.history
    final = monitor.last_snapshot
    now = advantage_from_rdp(compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                         orders=ORDERS), ORDERS)
    assert final.membership_inference_risk == pytest.approx(now, rel=1e-12)
    assert now < 0.16 < advantage_from_epsilon(final.epsilon, 1e-3)
    # What is left is the sampling noise of 64 vs 64 examples.
    assert abs(private_probe.auc - 0.5) < 0.15 and private_probe.advantage < 0.35

    # The last validation ran after the last step: the final snapshot carries it.
    labels = {"session_id": "probe", "model_name": "Memorizer"}
    assert exporter.registry.get_sample_value("membership_inference_empirical_auc",
                                              labels) == private_probe.auc
    assert exporter.registry.get_sample_value("membership_inference_empirical_advantage",
                                              labels) == private_probe.advantage
    # The evidence PrivacyAttackDetected reads: the attack's best balanced accuracy.
    assert exporter.registry.get_sample_value(
        "privacy_attack_score", {**labels, "attack_type": "loss_threshold"}
    ) == pytest.approx(0.5 + private_probe.advantage / 2)
    assert plain_probe.score > 0.7 > private_probe.score


def test_probe_rejects_bad_arguments():
    data = make_data(8)
    with pytest.raises(ValueError, match="samples: 1;"):
        MembershipInferenceProbe(data, data, samples=1)
    with pytest.raises(ValueError, match="batch_size: 0;"):
        MembershipInferenceProbe(data, data, batch_size=0)
    with pytest.raises(ValueError, match="nonmembers"):
        MembershipInferenceProbe(data, object())
    with pytest.raises(ValueError, match="members: TensorDataset"):
        MembershipInferenceProbe(make_data(0), data)


def test_the_loss_probe_warns_that_its_results_fall_outside_epsilon():
    import warnings as _warnings

    from dp_models import make_data
    from privacy_callbacks import MembershipInferenceProbe

    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        MembershipInferenceProbe(make_data(64), make_data(64, seed=1), samples=8)
    assert any("outside the reported epsilon" in str(w.message) for w in caught)
