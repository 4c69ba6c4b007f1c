"""Off the training thread: epsilon per step on the publisher, Opacus' work in a child process
that stops with the fit, and what a fit pays once at its start and end."""

from __future__ import annotations

import os
import threading
import time

import lightning.pytorch as pl
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from dp_models import DPModel, ScheduledModel, fit
from privacy_callbacks import BudgetGuard, PrivacyMonitor, PrometheusExporter
from privacy_callbacks.accounting import Accounting, background, rdp
from privacy_callbacks.exporters.base import Exporter
from servers import http_get
from test_budget_guard import DELTA, opacus_epsilon


def children() -> set[int]:
    """This process's accounting children (from /proc)."""
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
        if ppid == os.getpid() and b"accounting/child.py" in args:
            found.add(int(entry))
    return found


class Recorder(Exporter):
    """Reads every step, as a time-series database does."""

    def export(self, snapshot) -> None:
        pass


def test_training_thread_computes_no_epsilon_per_step(monkeypatch):
    """Each step's epsilon is computed on the publisher thread (for an exporter that reads
    every step); the training thread computes it only at a fit's start and end (and at the
    progress bar's and loggers' cadence)."""
    calls: list[bool] = []
    original = Accounting.epsilon

    def spy(self, view=None):
        calls.append(threading.current_thread() is threading.main_thread())
        return original(self, view)

    monkeypatch.setattr(Accounting, "epsilon", spy)
    on_thread = []
    for steps in (16, 32):
        calls.clear()
        monitor = PrivacyMonitor(delta=DELTA, progress_bar=False, exporters=[Recorder()])
        fit(DPModel(), monitor, max_steps=steps, max_epochs=4)
        assert calls.count(False) >= steps  # one per step, off the training thread
        on_thread.append(calls.count(True))
        assert monitor.last_snapshot.epsilon == opacus_epsilon([(1.0, 0.125, steps)])
    assert on_thread[0] == on_thread[1]  # nothing per step


def test_a_constant_noise_fit_starts_no_worker_and_no_child():
    """One (sigma, q): its vector is computed once at the start; nothing runs in the
    background, so a fit costs no thread and no process."""
    model = DPModel(noise_multiplier=1.37)
    monitor = PrivacyMonitor(DELTA, target_epsilon=50.0, exporters=[PrometheusExporter(port=0)])
    started = []

    class Look(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            started.append(monitor.accounting._worker._thread)

    fit(model, monitor, Look())
    assert started and all(thread is None for thread in started)
    snap = monitor.last_snapshot
    assert snap.epsilon_exact and snap.epsilon == model.privacy_engine.accountant.get_epsilon(
        DELTA)


def test_exact_vectors_are_computed_once_per_process(monkeypatch):
    computed: list[float] = []
    original = rdp_analysis.compute_rdp

    def spy(**kwargs):
        computed.append(kwargs["noise_multiplier"])
        return original(**kwargs)

    accountant = RDPAccountant()
    accountant.history = [(1.2345, 0.0625, 17)]
    expected = accountant.get_epsilon(DELTA)
    monkeypatch.setattr(rdp_analysis, "compute_rdp", spy)
    for _ in range(2):
        ours = Accounting(accountant, DELTA)
        ours.prepare(1.2345, 0.0625)
        assert ours.epsilon().exact and ours.latest.value == expected
        ours.close()
    assert computed.count(1.2345) == 1
    vec = rdp.VECTORS.get(1.2345, 0.0625)
    with pytest.raises(ValueError):  # shared by every fit: nobody may change it in place
        vec += 1.0


def test_schedule_vectors_come_from_a_child_process_that_stops_with_the_fit():
    before, seen = children(), []

    class Watch(pl.Callback):
        def on_train_end(self, trainer, pl_module):  # after the monitor's exact final epsilon
            seen.append(children() - before)

    monitor = PrivacyMonitor(delta=DELTA, progress_bar=False)
    model = ScheduledModel(gamma=0.99)
    fit(model, monitor, Watch(), max_steps=12, max_epochs=2)
    history = model.privacy_engine.accountant.history
    assert len(history) > 5  # a new sigma every step
    assert any(seen), "no child process computed a vector"
    assert monitor.last_snapshot.epsilon_exact == 1
    assert monitor.last_snapshot.epsilon == opacus_epsilon(history)  # bit-identical vectors
    assert not children() - before  # the child stopped with the fit


def test_prv_epsilon_comes_from_a_child_process_that_stops_with_the_fit():
    before, seen = children(), []

    class Watch(pl.Callback):
        def on_train_end(self, trainer, pl_module):  # after the monitor's exact final epsilon
            seen.append(children() - before)

    monitor = PrivacyMonitor(delta=DELTA, progress_bar=False)
    model = DPModel(accountant="prv")
    fit(model, monitor, Watch(), max_steps=12, max_epochs=2)
    assert any(seen), "no child process ran during the fit"
    assert monitor.last_snapshot.epsilon_exact == 1
    assert monitor.last_snapshot.epsilon == model.privacy_engine.accountant.get_epsilon(DELTA)
    assert not children() - before


def test_a_child_that_cannot_start_falls_back_to_the_worker_thread(monkeypatch):
    monkeypatch.setattr(background.sys, "executable", "/nonexistent/python")
    for model in (ScheduledModel(gamma=0.99), DPModel(accountant="prv")):
        monitor = PrivacyMonitor(delta=DELTA, progress_bar=False)
        fit(model, monitor, max_steps=6)
        assert monitor.last_snapshot.epsilon_exact == 1
        assert monitor.last_snapshot.epsilon == model.privacy_engine.accountant.get_epsilon(
            DELTA)


def test_closing_drops_a_computation_in_flight_at_once():
    accountant = PRVAccountant()
    accountant.history = [(0.6, 0.3, 20_000), (0.7, 0.2, 30_000), (0.8, 0.25, 40_000)]
    ours = Accounting(accountant, DELTA)
    ours.epsilon()  # asks the worker for the accountant's own value: seconds of PRV in the child
    deadline = time.monotonic() + 60
    while not children() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    started = time.monotonic()
    ours.close()
    assert time.monotonic() - started < 3.0
    assert not children() and not ours._worker._thread.is_alive()


def test_guard_and_monitor_side_by_side():
    """A guard of its own beside a monitor without a target: each does its job."""
    guard = BudgetGuard(target_epsilon=4.0, delta=DELTA)
    monitor = PrivacyMonitor(delta=DELTA)
    model = DPModel()
    fit(model, monitor, guard, max_epochs=2)
    assert model.privacy_engine.accountant.history == [(1.0, 0.125, 9)]
    assert guard.stopped and monitor.last_snapshot.epsilon == opacus_epsilon([(1.0, 0.125, 9)])


def test_a_subclass_overriding_a_step_hook_is_called_and_the_guard_too():
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


def test_metrics_server_stops_at_close_and_frees_its_port():
    exporter = PrometheusExporter(port=0, basic_auth=("prom", "pw-123456"))
    exporter.start()
    url = exporter.url
    thread = next(t for t in threading.enumerate() if t.name == "privacy-metrics-http")
    assert url is not None and http_get(url)[0] == 401
    started = time.monotonic()
    exporter.close(timeout=10.0)
    assert time.monotonic() - started < 1.0
    assert not thread.is_alive() and exporter.url is None
    with pytest.raises(OSError):
        http_get(url, timeout=2)
