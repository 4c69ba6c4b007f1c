"""A real Prometheus scrapes the exporter during a fit and reads Opacus' epsilon."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest

from dp_models import DPModel
from privacy_callbacks import PrivacyMonitor, PrometheusExporter
from servers import free_port, prometheus, prometheus_query, wait_for

pytestmark = pytest.mark.servers


def scrape_config(port: int) -> str:
    return f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: privacy
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def test_real_prometheus_reads_opacus_epsilon():
    port = free_port()
    server = prometheus(scrape_config(port)).start()
    try:
        exporter = PrometheusExporter(port=port)
        monitor = PrivacyMonitor(delta=1e-5, target_epsilon=8.0, exporters=[exporter],
                                 session_id="real", model_name="mlp")
        seen: dict[str, float] = {}

        class WaitForScrape(pl.Callback):
            """Keeps the fit alive (at its end) until Prometheus has the final value."""

            def on_train_end(self, trainer, pl_module):
                monitor.flush()
                expected = pl_module.privacy_engine.accountant.get_epsilon(1e-5)
                seen["expected"] = expected

                def scraped():
                    result = prometheus_query(
                        server, 'privacy_epsilon_consumed{session_id="real",model_name="mlp",'
                                'accountant="rdp"}')
                    return result and float(result[0]["value"][1]) == expected and result

                seen["result"] = wait_for(scraped, 60,
                                          what="Prometheus to scrape the final epsilon")

        model = DPModel()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(max_epochs=2, callbacks=[monitor, WaitForScrape()], logger=False,
                       enable_progress_bar=False, enable_checkpointing=False,
                       enable_model_summary=False).fit(model)
        value = float(seen["result"][0]["value"][1])
        assert value == model.privacy_engine.accountant.get_epsilon(1e-5)
        steps = prometheus_query(server, 'training_steps_with_privacy_total{session_id="real"}')
        assert float(steps[0]["value"][1]) == 16
        remaining = prometheus_query(server, 'privacy_budget_remaining{session_id="real"}')
        assert float(remaining[0]["value"][1]) == pytest.approx(8.0 - value)
    finally:
        server.stop()
