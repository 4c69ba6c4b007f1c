"""The budget guard: a fit never takes one step past the target epsilon."""

from __future__ import annotations

import json
import logging
import os
import sys

import lightning.pytorch as pl
import pytest
import torch
import warnings

from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from dp_models import DPModel, ScheduledModel
from privacy_callbacks import BudgetGuard, PrivacyMonitor, PrometheusExporter
from servers import free_port, run_bounded
from test_monitor import fit

DELTA = 1e-5
HERE = os.path.dirname(os.path.abspath(__file__))


CLASSES = {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant}


def opacus_epsilon(history, mechanism: str = "rdp") -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = CLASSES[mechanism]()
    accountant.history = [tuple(seg) for seg in history]
    return accountant.get_epsilon(DELTA) if accountant.history else 0.0


def one_more_step(history, sigma: float, q: float) -> list:
    """The history after one more step, merged as Opacus' accountant merges it."""
    history = [tuple(seg) for seg in history]
    if history and history[-1][:2] == (sigma, q):
        history[-1] = (sigma, q, history[-1][2] + 1)
    else:
        history.append((sigma, q, 1))
    return history


def assert_stopped_at_the_edge(history, target: float, sigma: float, q: float,
                               mechanism: str = "rdp") -> None:
    """The accountant's own epsilon is within the target, and one more step passes it."""
    assert opacus_epsilon(history, mechanism) <= target
    assert opacus_epsilon(one_more_step(history, sigma, q), mechanism) > target


def last_allowed(mechanism: str, sigma: float, q: float, target: float) -> int:
    """Steps at (sigma, q) the accountant allows within the target, by plain search."""
    k = 0
    while opacus_epsilon([(sigma, q, k + 1)], mechanism) <= target:
        k += 1
    return k


def test_stops_mid_epoch_one_step_before_the_target(caplog):
    exporter = PrometheusExporter(port=0)
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=4.0, exporters=[exporter],
                             session_id="t")
    model = DPModel()
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(monitor.last_snapshot.budget_exhausted)

    with caplog.at_level(logging.WARNING, logger="privacy_callbacks.guard"):
        trainer = fit(model, monitor, Spy(), max_epochs=2)  # 16 steps planned
    history = model.privacy_engine.accountant.history
    assert history == [(1.0, 0.125, 9)]  # epsilon 3.92 after 9 steps; 4.05 after 10
    assert trainer.global_step == 9  # 8 steps an epoch: mid-epoch 2, no step skipped
    assert_stopped_at_the_edge(history, 4.0, 1.0, 0.125)
    assert seen == [0] * 8 + [1]
    monitor.flush()
    labels = {"session_id": "t", "model_name": "DPModel", "accountant": "rdp"}
    assert exporter.registry.get_sample_value("privacy_budget_exhausted", labels) == 1
    assert exporter.registry.get_sample_value("privacy_epsilon_consumed", labels) == \
        opacus_epsilon(history)
    messages = [r.getMessage() for r in caplog.records]
    assert any("planned training" in m and "only 9 more steps fit" in m for m in messages)
    stopping = "budget guard: stopping training at step 9 (9 steps accounted):"
    assert any(stopping in m for m in messages)
    stop = monitor.guard.stop_record
    assert stop["step"] == 9 and stop["epsilon"] == opacus_epsilon(history)
    assert stop["next_epsilon"] == opacus_epsilon(one_more_step(history, 1.0, 0.125)) > 4.0
    assert not stop["skipped"]


def test_report_only_goes_past_the_target():
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=4.0, stop_at_target=False)
    model = DPModel()
    trainer = fit(model, monitor, max_epochs=2)
    assert trainer.global_step == 16
    snap = monitor.last_snapshot
    assert snap.epsilon == opacus_epsilon([(1.0, 0.125, 16)])
    assert snap.budget_remaining < 0
    assert snap.budget_exhausted == 1


def test_no_target_no_guard():
    monitor = PrivacyMonitor(delta=DELTA)
    trainer = fit(DPModel(), monitor, max_epochs=2)
    assert trainer.global_step == 16
    assert monitor.last_snapshot.budget_exhausted is None


class LowerNoise(pl.Callback):
    """A noise schedule: sigma drops from 1.0 to 0.5 after step 4."""

    def __init__(self) -> None:
        self.weights_at_4: list[torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == 4 and self.weights_at_4 is None:
            trainer.optimizers[0].noise_multiplier = 0.5
            self.weights_at_4 = [p.detach().clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_stops_where_a_lower_sigma_would_pass_the_target(scheduler_first, caplog):
    # Epsilon is 3.17 after 4 steps at sigma=1.0; one more at sigma=0.5 would make it 7.89.
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=5.0)
    schedule = LowerNoise()
    model = DPModel()
    callbacks = [schedule, monitor] if scheduler_first else [monitor, schedule]
    with caplog.at_level(logging.WARNING, logger="privacy_callbacks.guard"):
        fit(model, *callbacks, max_epochs=2)
    history = model.privacy_engine.accountant.history
    assert history == [(1.0, 0.125, 4)]
    assert_stopped_at_the_edge(history, 5.0, 0.5, 0.125)
    # When the schedule ran after the monitor's check, the step about to pass the target was
    # skipped before Opacus added noise: the weights are those after step 4.
    for before, after in zip(schedule.weights_at_4, model.parameters()):
        assert torch.equal(before, after)
    skipped = any("was skipped" in r.getMessage() for r in caplog.records)
    assert skipped is not scheduler_first


def test_gradient_accumulation_uses_the_accounted_sample_rate():
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=5.5)
    model = DPModel()
    trainer = fit(model, monitor, max_epochs=3, accumulate_grad_batches=2)  # 4 steps an epoch
    history = model.privacy_engine.accountant.history
    assert history == [(1.0, 0.25, 5)]  # q = 2 batches of 1/8
    assert trainer.global_step == 5
    assert_stopped_at_the_edge(history, 5.5, 1.0, 0.25)


def test_target_below_the_first_step_trains_nothing():
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=1.0)  # one step costs 2.34
    model = DPModel()
    before = [p.detach().clone() for p in model.parameters()]
    fit(model, monitor, max_epochs=1)
    assert model.privacy_engine.accountant.history == []
    for b, a in zip(before, model.parameters()):
        assert torch.equal(b, a)


@pytest.mark.parametrize("mechanism", ["rdp", "prv", "gdp"])
@pytest.mark.parametrize("edge", ["just above", "at", "just below"])
def test_stops_at_the_last_step_its_own_accountant_allows(mechanism, edge):
    """Targets placed at a step's epsilon, a hair above and a hair below it: the guard releases
    exactly the steps the run's own accountant allows -- PRV and GDP included, whose bounds
    would stop far earlier -- and never one more."""
    at = opacus_epsilon([(1.0, 0.125, 6)], mechanism)
    target = {"just above": at * (1 + 1e-12), "at": at, "just below": at * (1 - 1e-12)}[edge]
    model = DPModel(accountant=mechanism)
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=target, session_id="t")
    fit(model, monitor, max_epochs=2)
    history = model.privacy_engine.accountant.history
    assert history == [(1.0, 0.125, 5 if edge == "just below" else 6)]
    assert_stopped_at_the_edge(history, target, 1.0, 0.125, mechanism)
    snap = monitor.last_snapshot
    assert snap.epsilon_exact == 1 and snap.epsilon == opacus_epsilon(history, mechanism)


@pytest.mark.parametrize("mechanism", ["prv", "gdp"])
def test_report_only_marks_exhaustion_where_its_accountant_does(mechanism):
    target = opacus_epsilon([(1.0, 0.125, 6)], mechanism) * (1 + 1e-12)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(monitor.guard.exhausted)

    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=target, stop_at_target=False)
    trainer = fit(DPModel(accountant=mechanism), monitor, Spy(), max_epochs=1)
    assert trainer.global_step == 8
    assert seen == [False] * 5 + [True] * 3  # after step 6, one more would pass the target


def test_prv_target_below_one_rdp_step_still_trains():
    """RDP says one step at sigma 1, q 1/16 costs 1.76; PRV says 1.24, and 1.52 for three: a PRV
    run with a 1.6 budget must get the steps PRV allows, not stop before its first."""
    model = DPModel(accountant="prv", n=512)
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=1.6)
    fit(model, monitor, max_epochs=2)
    history = model.privacy_engine.accountant.history
    assert history == [(1.0, 1 / 16, last_allowed("prv", 1.0, 1 / 16, 1.6))]
    assert history[0][2] == 3
    assert_stopped_at_the_edge(history, 1.6, 1.0, 1 / 16, "prv")


class LowerNoiseAt(pl.Callback):
    """Lowers sigma to ``to`` after step ``at``."""

    def __init__(self, at: int, to: float) -> None:
        self.at, self.to = at, to

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.at:
            trainer.optimizers[0].noise_multiplier = self.to


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_a_sigma_change_one_step_before_the_target(mechanism):
    """Sigma drops from 1.0 to 0.8 one step before the edge at 1.0: the guard's count for the
    old sigma no longer holds, and the step at the new sigma is checked on its own."""
    history5 = [(1.0, 0.125, 5)]
    target = opacus_epsilon([(1.0, 0.125, 6)], mechanism)  # one more step at 1.0 would fit
    model = DPModel(accountant=mechanism)
    fit(model, LowerNoiseAt(5, 0.8), PrivacyMonitor(delta=DELTA, target_epsilon=target),
        max_epochs=2)
    history = model.privacy_engine.accountant.history
    assert history[0] == history5[0]
    assert_stopped_at_the_edge(history, target, 0.8, 0.125, mechanism)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_resumed_one_step_before_the_target_takes_exactly_one_step(mechanism, tmp_path):
    target = opacus_epsilon([(1.0, 0.125, 6)], mechanism) * (1 + 1e-12)
    first = DPModel(accountant=mechanism)
    trainer = fit(first, PrivacyMonitor(delta=DELTA, target_epsilon=target), max_steps=5)
    path = tmp_path / "five.ckpt"
    trainer.save_checkpoint(path)
    model = DPModel(accountant=mechanism)
    trainer = fit(model, BudgetGuard(target, DELTA), max_epochs=3, ckpt_path=str(path))
    assert model.privacy_engine.accountant.history == [(1.0, 0.125, 6)]
    assert trainer.global_step == 6


def test_guard_alone_stops_at_the_edge_and_names_its_accountant(caplog):
    guard = BudgetGuard(target_epsilon=4.0, delta=DELTA)
    model = DPModel()
    with caplog.at_level(logging.WARNING, logger="privacy_callbacks.guard"):
        fit(model, guard, max_epochs=2)
    assert model.privacy_engine.accountant.history == [(1.0, 0.125, 9)]
    assert guard.stopped and guard.stop_record["step"] == 9
    assert "(rdp accountant)" in caplog.text


def test_scheduler_under_prv_never_passes_the_target():
    """A new sigma every step under PRV: every release within the target by PRV itself."""
    model = ScheduledModel(gamma=0.98, accountant="prv")
    target = opacus_epsilon([(1.0 * 0.98 ** i, 0.125, 1) for i in range(6)], "prv")
    fit(model, PrivacyMonitor(delta=DELTA, target_epsilon=target), max_epochs=2)
    history = model.privacy_engine.accountant.history
    assert 4 <= len(history) <= 6
    assert opacus_epsilon(history, "prv") <= target


@pytest.mark.parametrize("kwargs, match", [
    ({"target_epsilon": 0, "delta": DELTA}, "target_epsilon: 0"),
    ({"target_epsilon": 1.0, "delta": 1.5}, "delta: 1.5"),
    ({"target_epsilon": 1.0, "delta": DELTA, "stop": "yes"}, "stop: 'yes'"),
    ({"target_epsilon": 1.0, "delta": DELTA, "accountant": "rdp"}, "accountant: 'rdp'"),
])
def test_bad_settings_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetGuard(**kwargs)


def run_ddp(tmp_path, mode: str, *args: str) -> tuple[int, str]:
    """The 2-process script; a hang fails the test instead of the suite."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")
    env.pop("LOCAL_RANK", None)
    return run_bounded([sys.executable, os.path.join(HERE, "ddp_guard_run.py"), str(tmp_path),
                        mode, *args], 300, env=env, cwd=tmp_path)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_ddp_ranks_stop_together(tmp_path, mechanism):
    """Each rank decides alone (no collective per step) and every rank stops on the same step:
    the last one its accountant allows, whichever rank's worker answered first."""
    target = 3.6 if mechanism == "rdp" else opacus_epsilon([(1.0, 0.125, 6)], "prv") * 1.001
    returncode, log = run_ddp(tmp_path, "same", mechanism, repr(float(target)))
    assert returncode == 0, log[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in results] == [6, 6]  # 4 steps an epoch: mid-epoch 2
    for r in results:
        assert r["history"] == [[1.0, 0.125, 6]]
        assert r["exhausted"] == 1
    assert_stopped_at_the_edge(results[1]["history"], target, 1.0, 0.125, mechanism)


def test_ddp_ranks_with_different_budgets_fail_before_any_step(tmp_path):
    # Each rank decides locally, so ranks guarding different budgets would drift apart and one
    # would wait forever in the next all-reduce: refuse at the start, on every rank.
    returncode, log = run_ddp(tmp_path, "mismatch")
    assert returncode != 0
    assert "differs across ranks" in log
    assert "(100.0, 1e-05, True, 0, 0)" in log and "(3.6, 1e-05, True, 0, 0)" in log
    assert not list(tmp_path.glob("rank*.json"))
