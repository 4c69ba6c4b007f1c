"""What is released is what epsilon covers: guard skips, sampling rates, randomness, policy."""

from __future__ import annotations

import logging
import math
import sys
import types

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import seed_everything
from torch import nn
from torch.utils.data import DataLoader

from dp_models import DPModel, fit, make_data
from privacy_callbacks import (ComplianceAudit, DifferentialPrivacy, DPPolicy, PrivacyMonitor,
                               PrometheusExporter)
from test_budget_guard import DELTA, opacus_epsilon

N, BATCH = 256, 32  # 8 batches an epoch: q = 1/8


def canary_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Every sample adds exactly 1 to the canary's per-sample gradient; nothing is clipped
    # (max_grad_norm is huge), so the canary's summed gradient counts the samples of a step.
    return nn.functional.cross_entropy(module.net(x), y) + module.canary(
        torch.ones(len(x), 1)).mean()


class CanaryPlain(pl.LightningModule):
    """No Opacus: made private by the DifferentialPrivacy callback."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        self.canary = nn.Linear(1, 1, bias=False)
        self.dataset = make_data(N)
        self.batches: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batches.append(x.detach().clone())
        return canary_loss(self, x, y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=BATCH)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class CanaryDP(DPModel):
    """Made private in configure_optimizers, as Opacus' Lightning example does."""

    def __init__(self, noise_multiplier: float) -> None:
        super().__init__(noise_multiplier=noise_multiplier, max_grad_norm=1e6, lr=0.0)
        self.canary = nn.Linear(1, 1, bias=False)
        self.batches: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batches.append(x.detach().clone())
        return canary_loss(self, x, y)


class Ledger(pl.Callback):
    """Per optimizer-step call: the samples of its batches, and what was released for it."""

    def __init__(self, per_batch_rate: float) -> None:
        self.rate = per_batch_rate
        self.window: list[int] = []
        self.stepped = False
        self.accounted = 0
        self.releases: list[tuple[int, float, float, float]] = []  # samples, canary, q, expected q
        self.calls = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.window.append(len(batch[0]))
        if not self.stepped:
            return
        self.stepped = False
        self.calls += 1
        history = self.accountant(trainer).history
        steps = sum(s for _, _, s in history)
        if steps != self.accounted:
            assert steps == self.accounted + 1
            self.accounted = steps
            summed = pl_module.canary.weight.summed_grad
            self.releases.append((sum(self.window), float(summed.sum()), history[-1][1],
                                  self.rate * len(self.window)))
        self.window = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.stepped = True

    @staticmethod
    def accountant(trainer):
        for cb in trainer.callbacks:
            if isinstance(cb, DifferentialPrivacy):
                return cb.privacy_engine.accountant
        return trainer.lightning_module.privacy_engine.accountant


class RaiseNoise(pl.Callback):
    """A noise schedule that raises sigma once the guard has skipped ``after`` steps."""

    def __init__(self, sigma: float, after: int) -> None:
        self.sigma, self.after, self.calls = sigma, after, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.should_stop:
            self.calls += 1

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.calls == self.after:
            trainer.optimizers[0].noise_multiplier = self.sigma


def guarded_fit(wiring: str, target: float, *extra: pl.Callback, sigma: float = 1.0,
                accumulate: int = 1, **trainer_kwargs):
    if wiring == "callback":
        model: pl.LightningModule = CanaryPlain()
        dp = DifferentialPrivacy(noise_multiplier=sigma, max_grad_norm=1e6)
        callbacks: list[pl.Callback] = [dp]
    else:
        model, dp, callbacks = CanaryDP(sigma), None, []
    ledger = Ledger(1 / 8)
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=target)
    trainer = fit(model, ledger, *callbacks, *extra, monitor, accumulate_grad_batches=accumulate,
                  **trainer_kwargs)
    accountant = Ledger.accountant(trainer)
    return trainer, ledger, accountant, model


def assert_sound(ledger: Ledger, accountant, target: float, accumulate: int = 1) -> None:
    # Every release holds exactly the samples of the batches its accounted step was charged for
    # (Lightning divides the loss by accumulate_grad_batches, so each sample adds 1/k).
    for samples, canary, q, expected_q in ledger.releases:
        assert canary * accumulate == pytest.approx(samples, abs=0.01)  # 1/n * n in float32
        assert q == pytest.approx(expected_q, rel=1e-12)
    assert len(ledger.releases) == sum(s for _, _, s in accountant.history)
    assert accountant.get_epsilon(DELTA) <= target


WIRINGS = ["callback", "make_private"]


@pytest.mark.parametrize("wiring", WIRINGS)
def test_target_below_one_step_releases_nothing(wiring, caplog):
    # One step at sigma=1, q=1/8 costs epsilon 2.34.
    with caplog.at_level(logging.WARNING, logger="privacy_callbacks.monitor"):
        trainer, ledger, accountant, model = guarded_fit(wiring, 1.0, max_epochs=1)
    assert accountant.history == []
    assert ledger.releases == [] and ledger.calls == 1
    assert model.canary.weight.summed_grad is None  # the skipped batch left nothing behind
    messages = [r.getMessage() for r in caplog.records]
    assert any("planned training" in m and "only 0 more steps fit" in m for m in messages)


class OwnHook(CanaryDP):
    """Accounts with a hook of its own: the rate it charges cannot be read before the step."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        accountant = self.privacy_engine.accountant
        optimizer.attach_step_hook(lambda opt: accountant.step(
            noise_multiplier=opt.noise_multiplier, sample_rate=opt.accumulated_iterations / 8))
        return optimizer


def test_unknown_sample_rate_is_skipped_not_released(caplog):
    model = OwnHook(1.0)
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=100.0)
    with caplog.at_level(logging.WARNING, logger="privacy_callbacks.guard"):
        fit(model, monitor, max_epochs=1)
    assert model.privacy_engine.accountant.history == []
    assert model.canary.weight.summed_grad is None
    assert any("the sample rate it would be charged cannot be read" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("wiring", WIRINGS)
def test_skipped_batches_never_reach_a_later_release(wiring, accumulate):
    # sigma=1: 9 steps fit into 4.0 at q=1/8 (5 at q=2/8). The guard stops, min_steps keeps the
    # fit going, and after two skipped steps a schedule raises sigma so that steps fit again.
    q = accumulate / 8
    fits = opacus_epsilon([(1.0, q, 9 if accumulate == 1 else 5)])
    target = opacus_epsilon([(1.0, q, 9 if accumulate == 1 else 5), (4.0, q, 1)]) + 1e-9
    assert fits < target
    trainer, ledger, accountant, model = guarded_fit(
        wiring, target, RaiseNoise(4.0, after=2), accumulate=accumulate,
        min_steps=16 // accumulate, max_epochs=2)
    assert_sound(ledger, accountant, target, accumulate)
    # One step at sigma=4 fits after the skips, a second one does not.
    assert accountant.history[-1] == (4.0, q, 1)


@pytest.mark.parametrize("wiring", WIRINGS)
def test_no_release_after_exhaustion_without_a_fresh_check(wiring):
    # After the stop, sigma goes up to 8 for good: every forced step is checked, the budget
    # between the edge and the target admits exactly two of them.
    q = 1 / 8
    target = opacus_epsilon([(1.0, q, 9), (8.0, q, 2)]) + 1e-9
    assert opacus_epsilon([(1.0, q, 9), (8.0, q, 3)]) > target
    trainer, ledger, accountant, model = guarded_fit(wiring, target, RaiseNoise(8.0, after=1),
                                                     min_steps=16, max_epochs=2)
    assert_sound(ledger, accountant, target)
    assert accountant.history[-1] == (8.0, q, 2)


def test_window_cut_short_is_released_at_the_charged_rate():
    # limit_train_batches=4 with k=3: one full window (q = 3/8) and one cut after 1 batch (1/8).
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    trainer = fit(CanaryPlain(), dp, accumulate_grad_batches=3, limit_train_batches=4)
    assert dp.privacy_engine.accountant.history == [(1.0, 3 / 8, 1), (1.0, 1 / 8, 1)]
    sampler = trainer.train_dataloader.batch_sampler
    draws = 4000
    hits = {(i, part): 0 for i in (0, N - 1) for part in ("full", "cut")}
    for _ in range(draws):
        batches = list(sampler)
        full, cut = set().union(*batches[:3]), set(batches[3])
        for i in (0, N - 1):
            hits[(i, "full")] += i in full
            hits[(i, "cut")] += i in cut
    for (i, part), count in hits.items():
        q = 3 / 8 if part == "full" else 1 / 8
        sd = math.sqrt(q * (1 - q) / draws)
        assert abs(count / draws - q) < 5 * sd, (i, part, count / draws, q)


class NoiseSpy(pl.Callback):
    """The Gaussian noise of each released step, read off the noised gradient."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        p = pl_module.net[0].weight
        if p.summed_grad is None or p.grad is None:
            return
        scale = opt.expected_batch_size * opt.accumulated_iterations
        pl_module.noise.append((p.grad * scale - p.summed_grad).detach().clone())


def run_dp(max_steps: int, *, seed: int | None = None, ckpt_path=None, save=None, **kwargs):
    model = CanaryPlain()
    model.noise = []
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, seed=seed)
    trainer = fit(model, dp, NoiseSpy(), max_steps=max_steps, ckpt_path=ckpt_path, **kwargs)
    if save is not None:
        trainer.save_checkpoint(save)
    return model


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[bool]:
    return [x.shape == y.shape and torch.allclose(x, y) for x, y in zip(a, b)]


@pytest.mark.parametrize("seed", [None, 7])
def test_resume_never_replays_masks_or_noise(tmp_path, seed):
    seed_everything(0)
    first = run_dp(3, seed=seed, save=tmp_path / "a.ckpt")
    seed_everything(0)
    resumed = run_dp(6, seed=seed, ckpt_path=str(tmp_path / "a.ckpt"), max_epochs=2)
    assert len(first.batches) == 3 and len(resumed.batches) == 3 and len(resumed.noise) == 3
    assert not any(same(first.batches, resumed.batches))
    assert not any(same(first.noise, resumed.noise))


def test_explicit_seed_reproduces_and_reloaded_epochs_differ():
    a = run_dp(16, seed=7, max_epochs=2, reload_dataloaders_every_n_epochs=1)
    b = run_dp(16, seed=7, max_epochs=2, reload_dataloaders_every_n_epochs=1)
    assert len(a.batches) == 16
    assert all(same(a.batches, b.batches)) and all(same(a.noise, b.noise))
    assert not any(same(a.batches[:8], a.batches[8:]))
    c = run_dp(16, max_epochs=2, reload_dataloaders_every_n_epochs=1)
    assert not any(same(c.batches[:8], c.batches[8:]))
    assert not any(same(a.batches, c.batches))


def violations(registry, policy: str) -> dict[str, float]:
    return {s.labels["violation_type"]: s.value for m in registry.collect()
            if m.name == "privacy_compliance_violations" for s in m.samples
            if s.name.endswith("_total") and s.labels["policy"] == policy}


def policy_fit(tmp_path, dp: DifferentialPrivacy, policy):
    exporter = PrometheusExporter(serve=False)
    monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter], session_id="pol",
                             progress_bar=False)
    audit = ComplianceAudit(DELTA, policy=policy, audit=tmp_path / "audit.jsonl")
    model = CanaryPlain()
    fit(model, dp, monitor, audit)
    return exporter.registry


def test_callback_poisson_sampling_is_recognised(tmp_path):
    registry = policy_fit(tmp_path, DifferentialPrivacy(noise_multiplier=1.0), "default")
    assert violations(registry, "default") == {}
    registry = policy_fit(tmp_path, DifferentialPrivacy(noise_multiplier=1.0,
                                                        poisson_sampling=False), "default")
    assert violations(registry, "default") == {"non_poisson_sampling": 1.0}


def test_secure_mode_needs_torchcsprng():
    if "torchcsprng" in sys.modules:
        pytest.skip("torchcsprng is installed")
    with pytest.raises(ValueError, match="secure_mode: True needs the torchcsprng package"):
        DifferentialPrivacy(noise_multiplier=1.0, secure_mode=True)
    with pytest.raises(ValueError, match="seed=3, secure_mode=True"):
        DifferentialPrivacy(noise_multiplier=1.0, secure_mode=True, seed=3)


def test_strict_policy_passes_with_secure_mode(tmp_path, monkeypatch):
    # torchcsprng has no build for this torch; a random-device generator stands in for its one
    # function Opacus calls, so the wiring and the policy check are what is tested.
    drawn = []

    def create_random_device_generator(path):
        assert path == "/dev/urandom"
        gen = torch.Generator().manual_seed(int.from_bytes(open(path, "rb").read(8), "big"))
        drawn.append(gen)
        return gen

    monkeypatch.setitem(sys.modules, "torchcsprng", types.SimpleNamespace(
        create_random_device_generator=create_random_device_generator))
    dp = DifferentialPrivacy(noise_multiplier=1.0, secure_mode=True)
    registry = policy_fit(tmp_path, dp, DPPolicy.preset("strict"))
    assert violations(registry, "strict") == {}
    assert len(drawn) == 1
    registry = policy_fit(tmp_path, DifferentialPrivacy(noise_multiplier=1.0),
                          DPPolicy.preset("strict"))
    assert violations(registry, "strict") == {"secure_mode_off": 1.0}
