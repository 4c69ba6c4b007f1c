"""The monitor's parts on their own: metrics, budget guard and compliance audit, one job each."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import lightning.pytorch as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families

import privacy_callbacks
from dp_models import DPModel, ScheduledModel
from privacy_callbacks import (BudgetGuard, ComplianceAudit, PrivacyMetrics, PrivacyMonitor,
                               PrometheusExporter)
from privacy_callbacks import accounting as accounting_module
from test_budget_guard import DELTA, assert_stopped_at_the_edge, opacus_epsilon
from test_monitor import fit


def scrape_value(url: str, name: str) -> float | None:
    """The value of the one sample of ``name`` that /metrics serves at ``url``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = [sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples if sample.name == name]
    return values[0] if len(values) == 1 else None


def test_every_part_is_public_from_the_package_root():
    for name in ("BudgetGuard", "ComplianceAudit", "PrivacyMetrics", "PrivacyLedger",
                 "PrivacyMonitor", "RunInfo", "Exporter"):
        assert name in privacy_callbacks.__all__
        assert getattr(privacy_callbacks, name).__name__ == name


def test_budget_guard_alone_stops_one_step_before_the_target():
    model = DPModel()
    guard = BudgetGuard(target_epsilon=4.0, delta=DELTA)
    trainer = fit(model, guard, max_epochs=2)
    history = model.privacy_engine.accountant.history
    assert history == [(1.0, 0.125, 9)] and trainer.global_step == 9
    assert guard.stopped
    assert_stopped_at_the_edge(history, 4.0, 1.0, 0.125)


def test_budget_guard_alone_resumes_with_the_steps_before_the_restart(tmp_path):
    model = DPModel()
    trainer = fit(model, BudgetGuard(target_epsilon=4.0, delta=DELTA), max_steps=3)
    path = tmp_path / "guard.ckpt"
    trainer.save_checkpoint(path)
    model = DPModel()
    trainer = fit(model, BudgetGuard(target_epsilon=4.0, delta=DELTA), max_epochs=2,
                  ckpt_path=str(path))
    history = model.privacy_engine.accountant.history
    assert history == [(1.0, 0.125, 9)]  # as without the restart: 3 restored + 6
    assert_stopped_at_the_edge(history, 4.0, 1.0, 0.125)


def test_guard_and_metrics_side_by_side_share_one_accounting():
    exporter = PrometheusExporter(port=0)
    guard = BudgetGuard(target_epsilon=4.0, delta=DELTA)
    metrics = PrivacyMetrics(delta=DELTA, target_epsilon=4.0, exporters=[exporter])
    model = DPModel()
    seen = []

    class Spy(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            seen.append(scrape_value(exporter.url, "privacy_epsilon_consumed"))
            seen.append(scrape_value(exporter.url, "privacy_budget_exhausted"))

    fit(model, metrics, guard, Spy(), max_epochs=2)  # metrics first: either order works
    history = model.privacy_engine.accountant.history
    assert history == [(1.0, 0.125, 9)]
    assert metrics.accounting is guard.ledger.accounting  # one accounting for both
    assert metrics.last_snapshot.epsilon == opacus_epsilon(history)
    assert metrics.last_snapshot.budget_exhausted == 1
    assert seen == [opacus_epsilon(history), 1.0]


def test_compliance_audit_alone_writes_the_trail(tmp_path):
    path = tmp_path / "audit.jsonl"
    model = DPModel()
    fit(model, ComplianceAudit(delta=DELTA, target_epsilon=4.0, audit=path,
                               audit_thresholds=(0.5,)), max_steps=8)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events[0] == "fit_start" and events[-1] == "fit_end"
    assert "budget_threshold" in events  # 0.5 x 4.0 is crossed within 8 steps
    end = records[-1]["data"]
    assert end["epsilon"] == opacus_epsilon(model.privacy_engine.accountant.history)
    assert end["epsilon_exact"] is True


def test_monitor_is_the_three_parts_in_order():
    monitor = PrivacyMonitor(delta=DELTA, target_epsilon=4.0)
    assert [type(p) for p in monitor.parts] == [BudgetGuard, ComplianceAudit, PrivacyMetrics]
    assert [type(p) for p in PrivacyMonitor(delta=DELTA).parts] == [ComplianceAudit,
                                                                    PrivacyMetrics]


def test_training_thread_computes_no_epsilon_per_step(monkeypatch):
    """Epsilon of each step is computed on the publisher thread; the training thread only
    notes the step (the progress bar and the loggers compute theirs at their cadence)."""
    calls: list[tuple[bool, bool]] = []
    original = accounting_module.RdpAccounting.update

    def spy(self, view=None):
        calls.append((threading.current_thread() is threading.main_thread(), view is None))
        return original(self, view)

    monkeypatch.setattr(accounting_module.RdpAccounting, "update", spy)
    monitor = PrivacyMonitor(delta=DELTA, progress_bar=False)
    model = DPModel()
    fit(model, monitor, max_steps=16, max_epochs=2)
    on_training_thread = [c for c in calls if c[0]]
    off_thread = [c for c in calls if not c[0]]
    assert len(off_thread) >= 16 and all(not live for _, live in off_thread)  # one per step
    # Training thread: the session baseline and the final value; nothing per step.
    assert len(on_training_thread) <= 3
    assert monitor.last_snapshot.epsilon == opacus_epsilon([(1.0, 0.125, 16)])


def _children(marker: bytes = b"_privacy_rdp") -> set[int]:
    """This process's children whose command line holds ``marker`` (from /proc): by default
    the RDP vector children."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read()
        except OSError:
            continue
        if ppid == os.getpid() and marker in args:
            found.add(int(entry))
    return found


def test_schedule_vectors_come_from_a_child_process_that_stops_with_the_fit():
    before = _children()
    started = []
    original = accounting_module._VectorProcess.compute

    def spy(self, sigma, q, orders):
        vec = original(self, sigma, q, orders)
        if self._proc is not None and not started:
            assert self._proc.pid in _children()  # what the check after the fit looks for
            started.append(self._proc.pid)
        return vec

    accounting_module._VectorProcess.compute = spy
    try:
        monitor = PrivacyMonitor(delta=DELTA, progress_bar=False)
        model = ScheduledModel(gamma=0.99)
        fit(model, monitor, max_steps=12, max_epochs=2)
    finally:
        accounting_module._VectorProcess.compute = original
    history = model.privacy_engine.accountant.history
    assert len(history) > 5  # a new sigma every step
    assert started, "no vector was computed in the child process"
    assert monitor.last_snapshot.epsilon_exact == 1
    assert monitor.last_snapshot.epsilon == opacus_epsilon(history)  # bit-identical vectors
    assert set(started) and not _children() - before  # the child stopped with the fit


def test_a_child_that_cannot_start_falls_back_to_the_thread(monkeypatch):
    monkeypatch.setattr(accounting_module.sys, "executable", "/nonexistent/python")
    monitor = PrivacyMonitor(delta=DELTA, progress_bar=False)
    model = ScheduledModel(gamma=0.99)
    fit(model, monitor, max_steps=8)
    history = model.privacy_engine.accountant.history
    assert monitor.last_snapshot.epsilon_exact == 1
    assert monitor.last_snapshot.epsilon == opacus_epsilon(history)


@pytest.mark.parametrize("part", [lambda: BudgetGuard(target_epsilon=0, delta=DELTA),
                                  lambda: BudgetGuard(target_epsilon=None, delta=DELTA),
                                  lambda: PrivacyMetrics(delta=2.0),
                                  lambda: ComplianceAudit(delta=DELTA, policy=3)])
def test_bad_settings_name_the_value(part):
    with pytest.raises(ValueError, match="Unexpected value"):
        part()


def test_closing_drops_a_vector_in_flight_at_once():
    import numpy as np

    process = accounting_module._VectorProcess()
    small = process.compute(1.0, 0.01, np.array([2.0, 4.0]))
    assert small is not None and small.shape == (2,)
    child = process._proc
    assert child is not None and child.pid in _children()
    result: list[object] = []
    # About 10 s of compute_rdp in the child; close must not wait for it.
    heavy = threading.Thread(target=lambda: result.append(
        process.compute(0.7, 0.3, np.linspace(1.5, 900.0, 6000))))
    heavy.start()
    threading.Event().wait(0.3)
    process.close()
    heavy.join(5.0)
    assert not heavy.is_alive() and result == [None]
    assert child.pid not in _children()
    assert process.compute(1.0, 0.01, np.array([2.0])) is None  # closed for good


def test_prv_epsilon_comes_from_a_child_process_that_stops_with_the_fit(monkeypatch):
    answered: list[float] = []
    original = accounting_module._Child.request

    def spy(self, message):
        answer = original(self, message)
        if isinstance(message, tuple) and len(message) == 2 and isinstance(answer, float):
            answered.append(answer)
        return answer

    monkeypatch.setattr(accounting_module._Child, "request", spy)
    children: list[set[int]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            children.append(_accountant_children())
            if trainer.global_step == 5:  # a longer run: give the child time to start
                deadline = time.monotonic() + 60
                while not answered and time.monotonic() < deadline:
                    time.sleep(0.05)

    monitor = PrivacyMonitor(delta=DELTA, progress_bar=False)
    model = DPModel(accountant="prv")
    fit(model, monitor, Watch(), max_steps=40, max_epochs=20)
    exact = model.privacy_engine.accountant.get_epsilon(DELTA)
    assert any(children), "no accountant child process ran during the fit"
    assert answered, "no epsilon came from the child process"
    assert monitor.last_snapshot.epsilon_exact == 1
    assert monitor.last_snapshot.epsilon == pytest.approx(exact, rel=1e-9)
    assert not _accountant_children()  # stopped with the fit


def _accountant_children() -> set[int]:
    return _children(b"import opacus.accountants")


def test_a_subclass_overriding_a_step_hook_is_still_called_and_the_parts_too():
    # The monitor binds a per-step hook with one part to that part's method on the instance;
    # a subclass's own hook must not be shadowed by it.
    calls = []

    class Mine(PrivacyMonitor):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            calls.append(trainer.global_step)
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    model = DPModel(n=64)
    monitor = Mine(1e-5, target_epsilon=1e-3, session_id="sub")  # the guard stops at once
    fit(model, monitor)
    assert calls == [0]  # called; and the guard it forwards to skipped that step
    assert monitor.guard.stopped and model.privacy_engine.accountant.history == []
