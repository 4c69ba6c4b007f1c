"""The way Lightning users run: several fits, reused and paired monitors, GANs, loggers, modules
wired by their authors the way Opacus' own Lightning example wires them."""

from __future__ import annotations

import csv
import logging
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dp_models import DPModel, fit, make_data
from privacy_callbacks import (DifferentialPrivacy, InfluxDBExporter, PrivacyMonitor,
                               PrometheusExporter)
from privacy_callbacks.dp import _unsupported_modules
from servers import http_get, influxdb1, influxdb1_query, pushgateway

DELTA = 1e-5
QUIET = dict(enable_progress_bar=False, logger=False, enable_checkpointing=False,
             enable_model_summary=False)


def trainer_for(*callbacks: pl.Callback, **kwargs) -> pl.Trainer:
    return pl.Trainer(callbacks=list(callbacks), **{**QUIET, "max_epochs": 1, **kwargs})


def quiet_fit(trainer: pl.Trainer, model: pl.LightningModule) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)


def rdp_epsilon(history) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(DELTA)


def counters(exporter: PrometheusExporter, session: str, model: str = "DPModel"):
    """(steps counter, epsilon counter) of ``session`` in the exporter's registry."""
    labels = {"session_id": session, "model_name": model}
    reg = exporter.registry
    return (reg.get_sample_value("training_steps_with_privacy_total", labels),
            reg.get_sample_value("privacy_budget_consumed_total", {**labels, "accountant": "rdp"}))


# -- 1. sessions and counters -----------------------------------------------------------------

def test_fit_twice_each_fit_is_a_session_whose_counters_equal_what_it_accounted():
    exporter = PrometheusExporter(port=0, serve=False)
    monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter])
    model = DPModel()
    trainer = trainer_for(monitor)
    quiet_fit(trainer, model)
    first = monitor.session_id
    eps_first = model.privacy_engine.accountant.get_epsilon(DELTA)
    assert counters(exporter, first) == (8, pytest.approx(eps_first, rel=1e-12))

    trainer.fit_loop.max_epochs = 2  # the notebook way to train on
    quiet_fit(trainer, model)
    second = monitor.session_id
    eps_total = model.privacy_engine.accountant.get_epsilon(DELTA)
    assert sum(s for _, _, s in model.privacy_engine.accountant.history) == 16
    assert second != first
    steps, consumed = counters(exporter, second)
    assert steps == 8
    assert consumed == pytest.approx(eps_total - eps_first, rel=1e-12)
    # The gauge is the privacy the model has spent, over both fits.
    assert exporter.registry.get_sample_value(
        "privacy_epsilon_consumed",
        {"session_id": second, "model_name": "DPModel", "accountant": "rdp"}) == eps_total
    # The finished session's series are not pushed on under the new one.
    assert counters(exporter, first) == (None, None)


def test_monitor_reused_in_a_second_trainer_starts_a_new_session():
    exporter = PrometheusExporter(port=0, serve=False)
    monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter])
    fit(DPModel(), monitor)
    first = monitor.session_id
    model = DPModel(noise_multiplier=2.0)
    fit(model, monitor, max_epochs=2)
    assert monitor.session_id != first
    assert counters(exporter, monitor.session_id) == (
        16, pytest.approx(model.privacy_engine.accountant.get_epsilon(DELTA), rel=1e-12))


def test_named_session_counts_every_fit_of_it():
    exporter = PrometheusExporter(port=0, serve=False)
    monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter], session_id="run-42")
    model = DPModel()
    trainer = trainer_for(monitor)
    quiet_fit(trainer, model)
    trainer.fit_loop.max_epochs = 2
    quiet_fit(trainer, model)
    assert monitor.session_id == "run-42"
    assert counters(exporter, "run-42") == (
        16, pytest.approx(model.privacy_engine.accountant.get_epsilon(DELTA), rel=1e-12))
    # A second model trained under the same name adds what its own accountant accounted.
    other = DPModel(noise_multiplier=2.0)
    fit(other, monitor)
    assert counters(exporter, "run-42") == (24, pytest.approx(
        model.privacy_engine.accountant.get_epsilon(DELTA)
        + other.privacy_engine.accountant.get_epsilon(DELTA), rel=1e-12))


def test_named_session_resumed_from_a_checkpoint_counts_on(tmp_path):
    first = PrometheusExporter(port=0, serve=False)
    model = DPModel()
    fit(model, PrivacyMonitor(delta=DELTA, exporters=[first], session_id="resumed"),
        max_steps=3, enable_checkpointing=True, default_root_dir=str(tmp_path))
    path = next(tmp_path.rglob("*.ckpt"))
    second = PrometheusExporter(port=0, serve=False)  # a new process: a new registry
    resumed = DPModel()
    fit(resumed, PrivacyMonitor(delta=DELTA, exporters=[second], session_id="resumed"),
        max_steps=6, max_epochs=5, ckpt_path=str(path))
    assert sum(s for _, _, s in resumed.privacy_engine.accountant.history) == 6
    assert counters(second, "resumed") == (6, pytest.approx(
        resumed.privacy_engine.accountant.get_epsilon(DELTA), rel=1e-12))


def test_prv_session_resumed_from_a_checkpoint_counts_exact_epsilon(tmp_path):
    monitor = PrivacyMonitor(delta=DELTA, session_id="resumed")
    saved = []

    class AtSave(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            saved.append(monitor.last_snapshot.epsilon_exact)

    fit(DPModel(accountant="prv"), monitor, AtSave(), max_steps=3, enable_checkpointing=True,
        default_root_dir=str(tmp_path))
    assert saved == [0], "the checkpoint came after the exact value: nothing tested"
    path = next(tmp_path.rglob("*.ckpt"))
    second = PrometheusExporter(port=0, serve=False)
    resumed = DPModel(accountant="prv")
    fit(resumed, PrivacyMonitor(delta=DELTA, exporters=[second], session_id="resumed"),
        max_steps=6, max_epochs=5, ckpt_path=str(path))
    labels = {"session_id": "resumed", "model_name": "DPModel", "accountant": "prv"}
    assert second.registry.get_sample_value("privacy_budget_consumed_total", labels) == \
        pytest.approx(resumed.privacy_engine.accountant.get_epsilon(DELTA), rel=1e-9)


def gateway_counters(text: str, session: str) -> tuple[float, float]:
    def value(name: str) -> float:
        found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith(name + "{") and f'session_id="{session}"' in line]
        assert len(found) == 1, (name, session, found)
        return found[0]
    return value("training_steps_with_privacy_total"), value("privacy_budget_consumed_total")


@pytest.mark.servers
def test_pushgateway_holds_one_group_per_fit_with_that_fits_counters():
    gateway = pushgateway().start()
    try:
        exporter = PrometheusExporter(pushgateway=f"127.0.0.1:{gateway.port}", push_interval=0.2)
        monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter])
        model = DPModel()
        trainer = trainer_for(monitor)
        quiet_fit(trainer, model)
        first = monitor.session_id
        history = list(model.privacy_engine.accountant.history)
        trainer.fit_loop.max_epochs = 2
        quiet_fit(trainer, model)
        second = monitor.session_id
        text = http_get(gateway.url + "/metrics")[1].decode()
        eps_first = rdp_epsilon(history)
        assert gateway_counters(text, first) == (8, pytest.approx(eps_first, rel=1e-9))
        assert gateway_counters(text, second) == (8, pytest.approx(
            model.privacy_engine.accountant.get_epsilon(DELTA) - eps_first, rel=1e-9))
        assert exporter.dropped == 0
    finally:
        gateway.stop()


@pytest.mark.servers
def test_influxdb_steps_accounted_per_fit_session():
    server = influxdb1().start()
    try:
        influxdb1_query(server, "", 'CREATE DATABASE "privacy"')
        exporter = InfluxDBExporter(server.url, api="v1", database="privacy",
                                    flush_interval=0.1)
        monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter])
        model = DPModel()
        trainer = trainer_for(monitor)
        quiet_fit(trainer, model)
        first = monitor.session_id
        trainer.fit_loop.max_epochs = 2
        quiet_fit(trainer, model)
        second = monitor.session_id
        series = influxdb1_query(server, "privacy",
                                 "SELECT step, steps_accounted FROM privacy_training "
                                 "GROUP BY session_id")
        rows = {s["tags"]["session_id"]: [(r[1], r[2]) for r in s["values"]] for s in series}
        assert rows == {first: [(k, k) for k in range(1, 9)],
                        second: [(8 + k, k) for k in range(1, 9)]}
    finally:
        server.stop()


# -- 2. two monitors in one Trainer ------------------------------------------------------------

def test_two_monitors_in_one_trainer(tmp_path):
    scraped = PrometheusExporter(port=0, serve=False)
    pushed = PrometheusExporter(port=0, serve=False)
    a = PrivacyMonitor(delta=DELTA, exporters=[scraped], session_id="a")
    b = PrivacyMonitor(delta=1e-6, exporters=[pushed], session_id="b")
    assert a.state_key != b.state_key
    model = DPModel()
    trainer = fit(model, a, b, max_epochs=2, enable_checkpointing=True,
                  default_root_dir=str(tmp_path))
    accountant = model.privacy_engine.accountant
    assert a.last_snapshot.epsilon == accountant.get_epsilon(DELTA)
    assert b.last_snapshot.epsilon == accountant.get_epsilon(1e-6)
    assert counters(scraped, "a")[0] == counters(pushed, "b")[0] == 16
    saved = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert {saved["callbacks"][m.state_key]["delta"] for m in (a, b)} == {DELTA, 1e-6}


# -- 3. GANs -------------------------------------------------------------------------------------

class GAN(pl.LightningModule):
    """A tiny GAN: only the discriminator sees the (private) training data."""

    def __init__(self, batchnorm: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        # BatchNorm is fine in the generator: it never sees private data.
        self.generator = nn.Sequential(nn.Linear(4, 8),
                                       nn.BatchNorm1d(8) if batchnorm else nn.Identity())
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.data = TensorDataset(make_data(256).tensors[0])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32)

    def configure_optimizers(self):
        return (torch.optim.SGD(self.generator.parameters(), lr=0.05),
                torch.optim.SGD(self.discriminator.parameters(), lr=0.05))

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(max(2, real.shape[0]), 4)
        opt_d.zero_grad()
        fake = self.generator(z).detach()[:real.shape[0]]
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)
        d_loss = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        self.manual_backward(d_loss)
        opt_d.step()
        opt_g.zero_grad()
        d_gen = self.discriminator(self.generator(z))
        self.manual_backward(F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen)))
        opt_g.step()


@pytest.mark.parametrize("private", [1, [1], lambda opt: opt.param_groups[0]["params"][0].shape
                                     == (16, 8)], ids=["index", "list", "predicate"])
def test_gan_with_only_the_discriminator_private(private):
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, optimizers=private)
    monitor = PrivacyMonitor(delta=DELTA)
    gan = GAN()
    trainer = fit(gan, dp, monitor, max_epochs=2)
    accountant = dp.privacy_engine.accountant
    assert sum(s for _, _, s in accountant.history) == 16
    assert trainer.global_step == 32  # two optimizer steps per batch, one of them accounted
    assert monitor.last_snapshot.epsilon == accountant.get_epsilon(DELTA)
    assert monitor.last_snapshot.epsilon_step == 16
    # Only the discriminator's parameters got per-sample gradient hooks.
    assert not any(hasattr(p, "grad_sample") for p in gan.generator.parameters())


@pytest.mark.parametrize("modules", [None, ["discriminator"]], ids=["all-hooked", "named"])
def test_gan_with_every_optimizer_private_names_the_callback_and_the_fix(modules):
    # Without the check Opacus fails inside the generator's step: "Per sample gradient is not
    # initialized. Not updated in backward pass?", naming neither the callback nor the fix.
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0,
                             **({} if modules is None else {"modules": modules}))
    with pytest.raises(ValueError, match=r"DifferentialPrivacy.*optimizer 0 \(SGD\).*"
                                         r"generator\.0\.weight.*optimizers="):
        fit(GAN(batchnorm=False), dp)


def test_gan_generator_with_batchnorm_is_named_with_the_way_out():
    with pytest.raises(ValueError, match=r"(?s)generator\.1 \(BatchNorm1d\).*"
                                         r"optimizers=\.\.\., modules=\.\.\."):
        fit(GAN(), DifferentialPrivacy(noise_multiplier=1.0))


def test_bad_optimizer_choice_names_the_value():
    with pytest.raises(ValueError, match="optimizers"):
        DifferentialPrivacy(noise_multiplier=1.0, optimizers="discriminator")
    with pytest.raises(ValueError, match=r"optimizers=\[2\].*2 optimizers"):
        fit(GAN(), DifferentialPrivacy(noise_multiplier=1.0, optimizers=[2]))


def test_gan_guard_message_says_which_steps_are_accounted(caplog):
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, optimizers=[1])
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=5.0)
    with caplog.at_level(logging.WARNING, logger="privacy_callbacks.guard"):
        trainer = fit(GAN(), dp, monitor, max_epochs=3)
    accounted = sum(s for _, _, s in dp.privacy_engine.accountant.history)
    assert 0 < accounted < 24 and trainer.global_step >= 2 * accounted
    stop = [r.getMessage() for r in caplog.records if "guard: stopping" in r.getMessage()]
    assert stop and f"({accounted} steps accounted)" in stop[0], stop


# -- 4. loggers ----------------------------------------------------------------------------------

class LogsEpsilon(DPModel):
    """A module logging its own ``epsilon``, as Opacus' Lightning example does."""

    def on_train_epoch_end(self) -> None:
        self.log("epsilon", 123.0, prog_bar=True)


def test_progress_bar_key_leaves_the_users_epsilon_alone():
    trainer = fit(LogsEpsilon(), PrivacyMonitor(delta=DELTA))
    assert trainer.callback_metrics["epsilon"] == 123.0
    assert trainer.progress_bar_metrics["epsilon"] == 123.0
    assert "privacy/epsilon" in trainer.progress_bar_metrics


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_final_values_reach_the_loggers_when_the_last_step_is_off_the_cadence(tmp_path):
    model = DPModel()
    logger = CSVLogger(tmp_path, name="run")
    fit(model, PrivacyMonitor(delta=DELTA, target_epsilon=50.0), max_epochs=5, logger=logger)
    rows = [r for r in read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("privacy/epsilon")]
    assert rows, "no privacy/* values were logged"
    assert int(rows[-1]["step"]) == 40
    assert float(rows[-1]["privacy/epsilon"]) == pytest.approx(
        model.privacy_engine.accountant.get_epsilon(DELTA), rel=1e-12)
    assert float(rows[-1]["privacy/budget_remaining"]) == pytest.approx(
        50.0 - model.privacy_engine.accountant.get_epsilon(DELTA), rel=1e-12)


class Scheduled(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 2)
        self.data = make_data(256)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=4)]


def test_learning_rate_monitor_shows_one_column_per_optimizer(tmp_path):
    logger = CSVLogger(tmp_path, name="lr")
    fit(Scheduled(), DifferentialPrivacy(noise_multiplier=1.0), LearningRateMonitor(),
        max_epochs=2, logger=logger, log_every_n_steps=1)
    columns = read_csv(Path(logger.log_dir) / "metrics.csv")[0].keys()
    assert [c for c in columns if c.startswith("lr-")] == ["lr-SGD"]


# -- 5. someone else's module --------------------------------------------------------------------

class OpacusExampleStyle(pl.LightningModule):
    """Wired by its author the way Opacus' Lightning example describes it.

    The engine lives on the module (default accountant: PRV); ``configure_optimizers`` calls
    ``make_private`` and keeps the returned ``GradSampleModule`` in a dict attribute (an
    attribute would register it as a submodule of the module it wraps), removing the previous
    fit's hooks first; the module logs its own ``epsilon`` at the end of every epoch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        self.privacy_engine = PrivacyEngine()
        self.data = make_data(256)
        self.wrapped: dict[str, nn.Module] = {}
        self.epsilons: list[float] = []

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
        if "module" in self.wrapped:
            self.wrapped["module"].remove_hooks()
        module, optimizer, _ = self.privacy_engine.make_private(
            module=self, optimizer=optimizer, data_loader=self.train_dataloader(),
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
        self.wrapped["module"] = module
        return optimizer

    def on_train_epoch_end(self) -> None:
        epsilon = self.privacy_engine.get_epsilon(DELTA)
        self.epsilons.append(epsilon)
        self.log("epsilon", epsilon)


def scraped_epsilon(url: str, session: str) -> float | None:
    text = http_get(url)[1].decode()
    pattern = re.compile(r'^privacy_epsilon_consumed\{[^}]*session_id="' + re.escape(session)
                         + r'"[^}]*\} (\S+)$', re.M)
    found = pattern.findall(text)
    return float(found[0]) if found else None


def test_someone_elses_module_wired_like_the_opacus_example():
    exporter = PrometheusExporter(port=0)
    monitor = PrivacyMonitor(delta=DELTA, exporters=[exporter])
    at_end = []

    class AtTrainEnd(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            monitor.flush()
            at_end.append(scraped_epsilon(exporter.url, monitor.session_id))

    model = OpacusExampleStyle()
    trainer = trainer_for(monitor, AtTrainEnd())
    quiet_fit(trainer, model)
    trainer.fit_loop.max_epochs = 2  # a second fit: the author's code unhooks and re-wraps
    quiet_fit(trainer, model)
    assert isinstance(model.privacy_engine.accountant, PRVAccountant)
    assert sum(s for _, _, s in model.privacy_engine.accountant.history) == 16
    assert at_end == model.epsilons == [model.epsilons[0], model.privacy_engine.get_epsilon(DELTA)]
    assert at_end[1] > at_end[0]


# -- 6. errors -----------------------------------------------------------------------------------

def test_unsupported_module_reason_is_printed_whole():
    class WithBatchNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(8)

    reasons = _unsupported_modules(WithBatchNorm())
    assert len(reasons) == 1
    assert reasons[0].startswith("norm (BatchNorm1d): ")
    from opacus.validators import ModuleValidator
    whole = str(ModuleValidator.validate(nn.BatchNorm1d(8), strict=False)[0])
    assert len(whole) > 160
    assert reasons[0].endswith(whole)
