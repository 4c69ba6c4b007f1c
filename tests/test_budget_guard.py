"""The budget guard: a fit never takes one step past the target epsilon."""

from __future__ import annotations

import json
import logging
import os
import sys

import lightning.pytorch as pl
import pytest
import torch
from opacus.accountants import RDPAccountant

from dp_models import DPModel
from privacy_callbacks import PrivacyMonitor, PrometheusExporter
from servers import free_port, run_bounded
from test_monitor import fit

DELTA = 1e-5
HERE = os.path.dirname(os.path.abspath(__file__))


def opacus_epsilon(history) -> float:
    accountant = RDPAccountant()
    accountant.history = [tuple(seg) for seg in history]
    return accountant.get_epsilon(DELTA)


def one_more_step(history, sigma: float, q: float) -> list:
    """The history after one more step, merged as Opacus' accountant merges it."""
    history = [tuple(seg) for seg in history]
    if history and history[-1][:2] == (sigma, q):
        history[-1] = (sigma, q, history[-1][2] + 1)
    else:
        history.append((sigma, q, 1))
    return history


def assert_stopped_at_the_edge(history, target: float, sigma: float, q: float) -> None:
    assert opacus_epsilon(history) <= target
    assert opacus_epsilon(one_more_step(history, sigma, q)) > target


def test_stops_mid_epoch_one_step_before_the_target(caplog, tmp_path):
    exporter = PrometheusExporter(port=0)
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=4.0, exporters=[exporter],
                             session_id="t", audit=tmp_path / "audit.jsonl")
    model = DPModel()
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(monitor.last_snapshot.budget_exhausted)

    with caplog.at_level(logging.WARNING, logger="privacy_callbacks.monitor"):
        trainer = fit(model, monitor, Spy(), max_epochs=2)  # 16 steps planned
    history = model.privacy_engine.accountant.history
    assert history == [(1.0, 0.125, 9)]  # epsilon 3.92 after 9 steps; 4.05 after 10
    assert trainer.global_step == 9  # 8 steps an epoch: mid-epoch 2
    assert_stopped_at_the_edge(history, 4.0, 1.0, 0.125)
    assert seen == [0] * 8 + [1]
    monitor.flush()
    labels = {"session_id": "t", "model_name": "DPModel", "accountant": "rdp"}
    assert exporter.registry.get_sample_value("privacy_budget_exhausted", labels) == 1
    assert exporter.registry.get_sample_value("privacy_epsilon_consumed", labels) == \
        opacus_epsilon(history)
    messages = [r.getMessage() for r in caplog.records]
    assert any("planned training" in m and "only 9 more steps fit" in m for m in messages)
    assert any("budget guard: stopping training at trainer step 9 (9 steps accounted)" in m
               for m in messages)
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    stop = next(r["data"] for r in audit if r["event"] == "budget_guard_stop")
    assert stop["step"] == 9 and stop["epsilon"] == opacus_epsilon(history)
    assert stop["next_epsilon"] == opacus_epsilon(one_more_step(history, 1.0, 0.125)) > 4.0


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
    with caplog.at_level(logging.WARNING, logger="privacy_callbacks.monitor"):
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


def test_prv_guard_uses_the_rdp_bound():
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=4.0)
    model = DPModel(accountant="prv")
    fit(model, monitor, max_epochs=2)
    history = model.privacy_engine.accountant.history
    assert history == [(1.0, 0.125, 9)]  # where the RDP bound stops
    assert model.privacy_engine.accountant.get_epsilon(DELTA) <= opacus_epsilon(history) <= 4.0


def run_ddp(tmp_path, mode: str) -> tuple[int, str]:
    """The 2-process script; a hang fails the test instead of the suite."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")
    env.pop("LOCAL_RANK", None)
    return run_bounded([sys.executable, os.path.join(HERE, "ddp_guard_run.py"), str(tmp_path),
                        mode], 300, env=env, cwd=tmp_path)


def test_ddp_ranks_stop_together(tmp_path):
    returncode, log = run_ddp(tmp_path, "same")
    assert returncode == 0, log[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in results] == [6, 6]  # 4 steps an epoch: mid-epoch 2
    for r in results:
        assert r["history"] == [[1.0, 0.125, 6]]
        assert r["exhausted"] == 1
    assert_stopped_at_the_edge(results[1]["history"], 3.6, 1.0, 0.125)


def test_ddp_ranks_with_different_budgets_fail_before_any_step(tmp_path):
    # Each rank decides locally, so ranks guarding different budgets would drift apart and one
    # would wait forever in the next all-reduce: refuse at the start, on every rank.
    returncode, log = run_ddp(tmp_path, "mismatch")
    assert returncode != 0
    assert "differs across ranks" in log
    assert "(100.0, 1e-05, True, 0, 0)" in log and "(3.6, 1e-05, True, 0, 0)" in log
    assert not list(tmp_path.glob("rank*.json"))
