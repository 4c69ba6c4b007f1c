"""DifferentialPrivacy makes an unmodified LightningModule private (one process)."""

from __future__ import annotations


import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader

from dp_models import DPModel, PlainModel, fit, make_data
from privacy_callbacks import DifferentialPrivacy, PrivacyMonitor


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float = 1e-5) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("order", ["dp_first", "monitor_first"])
def test_unmodified_module_becomes_private(order):
    dp = DifferentialPrivacy(noise_multiplier=1.1, max_grad_norm=1.0)
    monitor = PrivacyMonitor(delta=1e-5)  # finds dp.privacy_engine by itself
    callbacks = [dp, monitor] if order == "dp_first" else [monitor, dp]
    model = PlainModel()
    trainer = fit(model, *callbacks, max_epochs=2)
    assert dp.privacy_engine.accountant.history == [(1.1, 1 / 8, 16)]
    assert monitor.last_snapshot.epsilon == opacus_epsilon(1.1, 1 / 8, 16)
    assert monitor.last_snapshot.noise_std == pytest.approx(1.1 / 32)
    assert type(trainer.optimizers[0]).__name__ == "DPOptimizer"
    # Poisson sampling: batch sizes vary around 32 instead of being 32 every time.
    assert len(model.batch_sizes) == 16 and len(set(model.batch_sizes)) > 1
    # Per-sample hooks are gone after the fit: the module is plain again.
    assert not any(m._forward_hooks for m in model.net)


def test_lr_scheduler_drives_the_dp_optimizer():
    trainer = fit(PlainModel(scheduler=True), DifferentialPrivacy(noise_multiplier=1.0),
                  max_epochs=3)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == \
        [trainer.optimizers[0].param_groups[0]["lr"]]


def test_target_epsilon_calibrates_sigma_for_the_planned_epochs():
    dp = DifferentialPrivacy(target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    fit(PlainModel(), dp, max_epochs=3)
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=1 / 8,
                                 steps=24, accountant="rdp", epsilon_tolerance=0.01)
    assert dp.noise_multiplier == sigma
    assert dp.privacy_engine.accountant.history == [(sigma, 1 / 8, 24)]
    assert 3.0 - 0.01 <= dp.privacy_engine.get_epsilon(1e-5) <= 3.0


def test_gradient_accumulation_accounts_the_logical_batch():
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    monitor = PrivacyMonitor(delta=1e-5)
    model = PlainModel()
    fit(model, dp, monitor, accumulate_grad_batches=2, max_epochs=2)
    # Opacus' hook: rate of one physical batch times the batches accumulated, once per step.
    assert dp.privacy_engine.accountant.history == [(1.0, 2 / 8, 8)]
    assert len(model.batch_sizes) == 16
    assert monitor.last_snapshot.noise_std == pytest.approx(1.0 / (32 * 2))


def test_dataloader_passed_to_fit_is_replaced():
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    model = PlainModel()
    loader = DataLoader(make_data(256), batch_size=64)
    fit(model, dp, fit_kwargs={"train_dataloaders": loader})
    assert dp.sample_rate == 1 / 4
    assert dp.privacy_engine.accountant.history == [(1.0, 1 / 4, 4)]
    assert len(set(model.batch_sizes)) > 1


def test_unsupported_module_is_named_with_the_fix():
    with pytest.raises(ValueError, match=r"(?s)bn \(BatchNorm1d\).*ModuleValidator\.fix"):
        fit(PlainModel(norm=nn.BatchNorm1d(8)), DifferentialPrivacy(noise_multiplier=1.0))


def test_module_wired_with_opacus_already_is_a_clear_error():
    with pytest.raises(ValueError, match="already returns an Opacus DPOptimizer"):
        fit(DPModel(), DifferentialPrivacy(noise_multiplier=1.0))


def test_checkpoint_state_keeps_the_privacy_spent():
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    fit(PlainModel(), dp)
    resumed = DifferentialPrivacy(noise_multiplier=1.0)
    resumed.load_state_dict(dp.state_dict())
    fit(PlainModel(), resumed)
    assert resumed.privacy_engine.accountant.history == [(1.0, 1 / 8, 16)]
    assert resumed.privacy_engine.get_epsilon(1e-5) == pytest.approx(opacus_epsilon(1.0, 1 / 8, 16))


@pytest.mark.parametrize("kwargs, match", [
    ({}, "pass exactly one"),
    ({"noise_multiplier": 1.0, "target_epsilon": 3.0, "delta": 1e-5}, "pass exactly one"),
    ({"noise_multiplier": -1.0}, "noise_multiplier: -1.0"),
    ({"noise_multiplier": 1.0, "max_grad_norm": 0}, "max_grad_norm: 0"),
    ({"target_epsilon": 3.0}, "delta: None"),
    ({"target_epsilon": 3.0, "delta": 2.0}, "delta: 2.0"),
    ({"noise_multiplier": 1.0, "accountant": "moments"}, "accountant: 'moments'"),
    ({"noise_multiplier": 1.0, "epochs": 0}, "epochs: 0"),
    ({"noise_multiplier": 1.0, "seed": "x"}, "seed: 'x'"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DifferentialPrivacy(**kwargs)
