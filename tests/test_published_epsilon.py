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

from dp_models import DPModel, fit
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
            self.seen.append((snapshot.epsilon, snapshot.epsilon_step, snapshot.epsilon_exact))


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
    assert spy.scraped["privacy_epsilon_consumed"] == pytest.approx(final, rel=1e-9)
    assert spy.scraped["privacy_epsilon_exact"] == 1.0
    assert spy.scraped["privacy_epsilon_step"] == 8.0
    assert spy.snapshot.epsilon == pytest.approx(final, rel=1e-9)
    assert spy.snapshot.epsilon_exact == 1
    assert f"Privacy spent: epsilon={final:.4g} at delta=1e-05 after 8 steps ({mechanism})" \
        in caplog.text
