"""PrivacyMonitor in real Lightning fits on CPU."""

from __future__ import annotations

import socket

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from prometheus_client import REGISTRY

from dp_models import DPModel, fit
from privacy_callbacks import PrivacyMonitor, PrometheusExporter


LABELS = {"session_id": "t", "model_name": "DPModel", "accountant": "rdp"}


def test_epsilon_on_every_step_equals_opacus():
    exporter = PrometheusExporter(port=0)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snap = monitor.last_snapshot
            seen.append((snap.step, snap.epsilon,
                         pl_module.privacy_engine.accountant.get_epsilon(1e-5)))

    monitor = PrivacyMonitor(delta=1e-5, target_epsilon=8.0, exporters=[exporter], session_id="t")
    model = DPModel()
    fit(model, monitor, Spy(), max_epochs=2)
    assert [s for s, _, _ in seen] == list(range(1, 17))
    assert all(ours == theirs for _, ours, theirs in seen)
    final = model.privacy_engine.accountant.get_epsilon(1e-5)
    reg = exporter.registry
    assert reg.get_sample_value("privacy_epsilon_consumed", LABELS) == final
    assert reg.get_sample_value("privacy_budget_remaining", LABELS) == pytest.approx(8.0 - final)
    assert reg.get_sample_value("privacy_budget_consumed_total", LABELS) == pytest.approx(final)
    base = {"session_id": "t", "model_name": "DPModel"}
    assert reg.get_sample_value("training_steps_with_privacy_total", base) == 16
    assert reg.get_sample_value("privacy_noise_multiplier", base) == 1.0
    assert reg.get_sample_value("gradient_clipping_norm", base) == 1.0
    assert reg.get_sample_value("privacy_sample_rate", base) == pytest.approx(1 / 8)
    assert reg.get_sample_value("privacy_noise_std", base) == pytest.approx(1.0 * 1.0 / 32)
    assert reg.get_sample_value("training_throughput_private", {**base, "rank": "0"}) > 0
    assert reg.get_sample_value("privacy_export_dropped_total",
                                {**base, "exporter": "publisher"}) == 0
    assert reg.get_sample_value("privacy_accounting_errors_total", base) == 0


def test_forecast_and_exhaustion_steps_match_opacus():
    from opacus.accountants import RDPAccountant
    monitor = PrivacyMonitor(delta=1e-5, target_epsilon=20.0, exporters=[], session_id="t")
    fit(DPModel(), monitor, max_epochs=3)
    snap = monitor.last_snapshot
    planned = RDPAccountant()
    planned.history = [(1.0, 1 / 8, 24)]
    assert snap.epsilon_forecast == planned.get_epsilon(1e-5)  # the plan was completed
    k = snap.budget_exhaustion_steps
    planned.history = [(1.0, 1 / 8, 24 + k)]
    assert planned.get_epsilon(1e-5) <= 20.0
    planned.history = [(1.0, 1 / 8, 24 + k + 1)]
    assert planned.get_epsilon(1e-5) > 20.0


def test_gradient_accumulation_counts_optimizer_steps():
    monitor = PrivacyMonitor(delta=1e-5)
    model = DPModel()
    fit(model, monitor, accumulate_grad_batches=2)
    snap = monitor.last_snapshot
    assert snap.step == 4
    assert snap.epsilon == model.privacy_engine.accountant.get_epsilon(1e-5)
    assert snap.noise_std == pytest.approx(1.0 * 1.0 / (32 * 2))


def test_prv_epsilon_arrives_from_background():
    exporter = PrometheusExporter(port=0)
    monitor = PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="t")
    model = DPModel(accountant="prv")
    fit(model, monitor)
    snap = monitor.last_snapshot
    assert snap.accountant == "prv"
    assert snap.epsilon_step == 8
    expected = model.privacy_engine.accountant.get_epsilon(1e-5)
    assert snap.epsilon == pytest.approx(expected, rel=1e-12)
    labels = {**LABELS, "accountant": "prv"}
    assert exporter.registry.get_sample_value("privacy_epsilon_consumed", labels) == \
        pytest.approx(expected, rel=1e-12)


def test_epsilon_in_progress_bar_and_loggers(tmp_path):
    monitor = PrivacyMonitor(delta=1e-5, target_epsilon=8.0)
    model = DPModel()
    trainer = fit(model, monitor, logger=CSVLogger(tmp_path), log_every_n_steps=2)
    assert trainer.progress_bar_metrics["privacy/epsilon"] == pytest.approx(
        model.privacy_engine.accountant.get_epsilon(1e-5))
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "privacy/epsilon" in metrics.splitlines()[0]
    assert len(metrics.splitlines()) == 1 + 4  # steps 2, 4, 6, 8


def test_progress_bar_false_keeps_epsilon_off_the_bar_but_in_the_loggers(tmp_path):
    monitor = PrivacyMonitor(delta=1e-5, progress_bar=False)
    trainer = fit(DPModel(), monitor, logger=CSVLogger(tmp_path), log_every_n_steps=2)
    assert not any(k.startswith("privacy/") for k in trainer.progress_bar_metrics)
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert len(metrics.splitlines()) == 1 + 4 and "privacy/epsilon" in metrics


def test_explicit_accountant_argument():
    model = DPModel()
    monitor = PrivacyMonitor(delta=1e-5, accountant=model.privacy_engine)
    fit(model, monitor)
    assert monitor.last_snapshot.epsilon == model.privacy_engine.accountant.get_epsilon(1e-5)


class PlainModel(DPModel):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_non_dp_optimizer_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no Opacus DPOptimizer.*make_private"):
        fit(PlainModel(), PrivacyMonitor(delta=1e-5))


def test_missing_privacy_engine_is_a_clear_error():
    model = DPModel()

    class Hidden(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            del pl_module.privacy_engine

    # Hidden runs first, so the monitor sees a DP optimizer but no engine.
    with pytest.raises(RuntimeError, match="no Opacus PrivacyEngine"):
        fit(model, Hidden(), PrivacyMonitor(delta=1e-5))


@pytest.mark.parametrize("kwargs, match", [
    ({"delta": 0}, "delta: 0"),
    ({"delta": 1.5}, "delta: 1.5"),
    ({"delta": 1e-5, "target_epsilon": 0}, "target_epsilon: 0"),
    ({"delta": 1e-5, "target_epsilon": -1.0}, "target_epsilon: -1.0"),
    ({"delta": 1e-5, "exporters": ["prometheus"]}, "Unexpected exporter 'prometheus'"),
    ({"delta": 1e-5, "accountant": "rdp"}, "Unexpected value for accountant: 'rdp'"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrivacyMonitor(**kwargs)


def test_port_in_use_names_the_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            fit(DPModel(), PrivacyMonitor(delta=1e-5, exporters=[PrometheusExporter(port=port)]))


@pytest.mark.parametrize("port", [-1, 70000, "9108", True])
def test_bad_port(port):
    with pytest.raises(ValueError, match="port"):
        PrometheusExporter(port=port)


def test_exporter_never_touches_the_global_registry():
    before = set(REGISTRY._names_to_collectors)
    PrometheusExporter(port=0)
    PrometheusExporter(port=0)  # twice: no DuplicateTimeseries
    assert set(REGISTRY._names_to_collectors) == before


def test_endpoint_serves_metrics_during_fit_and_stops_after():
    from servers import http_get
    exporter = PrometheusExporter(port=0)
    bodies = []

    class Scrape(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            monitor.flush()
            bodies.append(http_get(exporter.url)[1].decode())

    monitor = PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="t")
    fit(DPModel(), monitor, Scrape())
    assert 'privacy_epsilon_consumed{accountant="rdp",model_name="DPModel",session_id="t"}' \
        in bodies[0]
    assert exporter.url is None  # stopped at teardown


def test_state_dict_is_plain_and_holds_the_history():
    model = DPModel()
    monitor = PrivacyMonitor(delta=1e-5, session_id="keep")
    fit(model, monitor)
    state = monitor.state_dict()
    assert state["session_id"] == "keep"
    assert state["accountant"] == "rdp"
    assert state["history"] == [[1.0, 0.125, 8]]
    torch.save(state, "/dev/null")


def test_a_fit_that_raises_releases_threads_and_the_port():
    """The zombie-thread fixture fails this test if the publisher or endpoint survives."""
    from servers import http_get
    exporter = PrometheusExporter(port=0)
    urls = []

    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            urls.append(exporter.url)
            if batch_idx == 2:
                raise RuntimeError("user code failed")

    with pytest.raises(RuntimeError, match="user code failed"):
        fit(DPModel(), PrivacyMonitor(delta=1e-5, exporters=[exporter]), Boom())
    assert exporter.url is None
    with pytest.raises(OSError):
        http_get(urls[0], timeout=2)
