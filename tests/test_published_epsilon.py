"""Every epsilon the monitor publishes is at least the accountant's own for its step.

PRV (Opacus' default) and GDP compute epsilon in the background: until the exact value for a
step is known the monitor publishes an upper bound, labelled as one, and the exact final value
reaches every output before ``fit`` returns.
"""

from __future__ import annotations

import logging
import urllib.request
import warnings

import lightning.pytorch as pl
import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from dp_models import DPModel, ScheduledModel, fit
from privacy_callbacks import PrivacyMonitor, PrometheusExporter
from privacy_callbacks.exporters.base import Exporter

CLASSES = {"prv": PRVAccountant, "gdp": GaussianAccountant, "rdp": RDPAccountant}


class Recorder(Exporter):
    """Keeps every (epsilon, step, exact) an exporter received, in order."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, int, int]] = []

    def export(self, snapshot) -> None:
        if snapshot.epsilon is not None:
            self.seen.append((snapshot.epsilon, snapshot.epsilon_step,
                              getattr(snapshot, "epsilon_exact", None)))


class AtTeardown(pl.Callback):
    """Reads /metrics and the monitor in ``teardown``: after every ``on_fit_end``, while served.

    Listed before the monitor, so its teardown runs before the monitor closes the endpoint.
    """

    def __init__(self) -> None:
        self.monitor: PrivacyMonitor | None = None
        self.exporter: PrometheusExporter | None = None
        self.scraped: dict[str, float] = {}
        self.snapshot = None

    def teardown(self, trainer, pl_module, stage) -> None:
        with urllib.request.urlopen(self.exporter.url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("privacy_epsilon_"):
                    name, value = line.split("{")[0], line.rsplit(" ", 1)[1]
                    self.scraped[name] = float(value)
        self.snapshot = self.monitor.last_snapshot


def _opacus_epsilon(mechanism: str, history: list) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = CLASSES[mechanism]()
    accountant.history = list(history)
    return accountant.get_epsilon(1e-5)


@pytest.mark.parametrize("mechanism", ["prv", "gdp"])
def test_every_published_epsilon_is_at_least_opacus_and_the_final_is_exact(mechanism, caplog):
    recorder, exporter, spy = Recorder(), PrometheusExporter(port=0), AtTeardown()
    monitor = PrivacyMonitor(delta=1e-5, exporters=[recorder, exporter], session_id="t")
    spy.monitor, spy.exporter = monitor, exporter
    model = DPModel(accountant=mechanism)
    with caplog.at_level(logging.INFO, logger="privacy_callbacks"):
        fit(model, spy, monitor, max_epochs=1)
    [(sigma, q, steps)] = model.privacy_engine.accountant.history
    assert steps == 8
    final = _opacus_epsilon(mechanism, [(sigma, q, steps)])

    truth: dict[int, float] = {}
    for eps, step, exact in recorder.seen:
        if step not in truth:
            truth[step] = _opacus_epsilon(mechanism, [(sigma, q, step)])
        assert eps >= truth[step], f"published {eps} for step {step}, Opacus says {truth[step]}"
        if exact:
            assert eps == pytest.approx(truth[step], rel=1e-9)
    assert {step for _, step, _ in recorder.seen} == set(range(1, 9))  # one label per step
    last_eps, last_step, last_exact = recorder.seen[-1]
    assert (last_step, last_exact) == (8, 1)
    assert last_eps == pytest.approx(final, rel=1e-9)

    # Before the fit returned: /metrics (still served), last_snapshot, the log line.
    assert spy.scraped["privacy_epsilon_consumed"] == pytest.approx(final, rel=1e-9), spy.scraped
    assert spy.scraped["privacy_epsilon_exact"] == 1.0
    assert spy.scraped["privacy_epsilon_step"] == 8.0
    assert spy.snapshot.epsilon == pytest.approx(final, rel=1e-9)
    assert spy.snapshot.epsilon_exact == 1
    assert f"Privacy spent: epsilon={final:.4g} at delta=1e-05 after 8 steps ({mechanism})" \
        in caplog.text


class CounterSpy(Exporter):
    """Listed after a PrometheusExporter (exporters run in order): the epsilon each snapshot
    published and what ``privacy_budget_consumed_total`` held right after it."""

    name = "counter-spy"

    def __init__(self, prometheus: PrometheusExporter, labels: dict[str, str]) -> None:
        super().__init__()
        self.prometheus, self.labels = prometheus, labels
        self.seen: list[tuple[float, int, int, float | None]] = []

    def export(self, snapshot) -> None:
        if snapshot.epsilon is not None:
            counted = self.prometheus.registry.get_sample_value(
                "privacy_budget_consumed_total", self.labels)
            self.seen.append((snapshot.epsilon, snapshot.epsilon_step, snapshot.epsilon_exact,
                              counted))


@pytest.mark.parametrize("mechanism", ["prv", "gdp"])
def test_consumed_counter_holds_exact_epsilon_only_and_ends_at_the_exact_final(mechanism):
    """The counter cannot go down: a bound that reached it would stay above the exact value."""
    exporter = PrometheusExporter(port=0, serve=False)
    labels = {"session_id": "t", "model_name": "DPModel", "accountant": mechanism}
    spy = CounterSpy(exporter, labels)
    monitor = PrivacyMonitor(delta=1e-5, exporters=[exporter, spy], session_id="t")
    model = DPModel(accountant=mechanism)
    fit(model, monitor, max_epochs=1)
    assert any(exact == 0 for _, _, exact, _ in spy.seen), "no bound published: nothing tested"
    exact_so_far = 0.0  # the session started from nothing: its epsilon is the accountant's
    for eps, step, exact, counted in spy.seen:
        if exact:
            exact_so_far = max(exact_so_far, eps)
        assert counted == pytest.approx(exact_so_far, rel=1e-12), (
            f"counter {counted} after epsilon {eps} for step {step} (exact={exact})")
    final = model.privacy_engine.accountant.get_epsilon(1e-5)
    assert exporter.registry.get_sample_value("privacy_budget_consumed_total", labels) == \
        pytest.approx(final, rel=1e-9)
    assert monitor.last_snapshot.epsilon_exact == 1


def test_noise_schedule_epsilon_equals_opacus():
    recorder = Recorder()
    monitor = PrivacyMonitor(delta=1e-5, exporters=[recorder], session_id="t")
    model = ScheduledModel(gamma=0.99, n=800, batch_size=8)
    fit(model, monitor, max_epochs=1)
    history = model.privacy_engine.accountant.history
    assert len(history) == 100  # a new sigma every step
    final = _opacus_epsilon("rdp", history)
    assert monitor.last_snapshot.epsilon == final
    assert recorder.seen[-1] == (final, 100, 1)


def test_gdp_refuses_a_changing_sigma_and_nothing_published_drops():
    """Opacus' GaussianAccountant raises on a new sigma (and drops its history while at it)."""
    recorder = Recorder()
    monitor = PrivacyMonitor(delta=1e-5, exporters=[recorder], session_id="t")
    model = ScheduledModel(gamma=0.99, accountant="gdp")
    with pytest.raises(ValueError, match="constant in GaussianAccountant"):
        fit(model, monitor, max_epochs=1)
    assert recorder.seen
    steps = recorder.seen[-1][1]
    assert steps == 1
    truth = _opacus_epsilon("gdp", [(1.0, 1 / 8, steps)])
    assert all(eps >= truth for eps, step, _ in recorder.seen if step == steps)
    assert recorder.seen[-1][0] == pytest.approx(truth, rel=1e-9)
