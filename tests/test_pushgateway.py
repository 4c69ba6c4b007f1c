"""PrometheusExporter pushing to a real Pushgateway, scraped by a real Prometheus."""

from __future__ import annotations

import socket
import threading
import time

import lightning.pytorch as pl
import pytest

from dp_models import DPModel, fit
from privacy_callbacks import PrivacyMonitor, PrometheusExporter
from servers import (http_get, prometheus, prometheus_query, pushgateway,
                     pushgateway_scrape_config, wait_for)

pytestmark = pytest.mark.servers


def gateway_has(gateway, session_id: str) -> bool:
    return f'session_id="{session_id}"' in http_get(gateway.url + "/metrics")[1].decode()


def test_prometheus_reads_epsilon_pushed_by_a_batch_job():
    gateway = pushgateway().start()
    prom = prometheus(pushgateway_scrape_config(gateway.port)).start()
    try:
        exporter = PrometheusExporter(pushgateway=f"127.0.0.1:{gateway.port}", job="dp_training",
                                      push_interval=0.2)
        assert exporter.url is None  # a batch job needs no endpoint of its own
        model = DPModel()
        fit(model, PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="batch",
                                  model_name="mlp"))
        expected = model.privacy_engine.accountant.get_epsilon(1e-5)

        def final_epsilon():
            result = prometheus_query(
                prom, 'privacy_epsilon_consumed{job="dp_training",session_id="batch"}')
            return result and float(result[0]["value"][1]) == expected and result

        result = wait_for(final_epsilon, 60, what="Prometheus to read the pushed epsilon")
        assert result[0]["metric"]["rank"] == "0"
        assert result[0]["metric"]["model_name"] == "mlp"
        steps = prometheus_query(prom, 'training_steps_with_privacy_total{session_id="batch"}')
        assert float(steps[0]["value"][1]) == 8
        assert exporter.dropped == 0
    finally:
        prom.stop()
        gateway.stop()


def test_group_deleted_at_fit_end_when_asked():
    gateway = pushgateway().start()
    try:
        exporter = PrometheusExporter(pushgateway=f"127.0.0.1:{gateway.port}", push_interval=0.1,
                                      delete_on_close=True)
        seen = []

        class WaitForPush(pl.Callback):
            def on_train_end(self, trainer, pl_module):
                seen.append(wait_for(lambda: gateway_has(gateway, "gone"), 60,
                                     what="a periodic push to reach the gateway"))

        fit(DPModel(), PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="gone"),
            WaitForPush())
        assert seen == [True]
        # The gateway applies a DELETE asynchronously (202 Accepted).
        wait_for(lambda: not gateway_has(gateway, "gone"), 60, what="the group to be deleted")
        assert exporter.dropped == 0
    finally:
        gateway.stop()


class SilentGateway:
    """Accepts connections and never answers; records whether the client hung up."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connections: list[dict] = []
        self._stop = False
        self._threads = [threading.Thread(target=self._accept, name="privacy-test-silent")]
        self._threads[0].start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            state = {"conn": conn, "closed": False}
            self.connections.append(state)
            reader = threading.Thread(target=self._read, args=(state,),
                                      name="privacy-test-silent-read")
            self._threads.append(reader)
            reader.start()

    def _read(self, state: dict) -> None:
        conn = state["conn"]
        conn.settimeout(0.2)
        while not self._stop:
            try:
                if conn.recv(65536) == b"":
                    state["closed"] = True
                    return
            except TimeoutError:
                continue
            except OSError:
                state["closed"] = True
                return

    def close(self) -> None:
        self._stop = True
        for thread in list(self._threads):
            thread.join(5)
        for state in self.connections:
            state["conn"].close()
        self.sock.close()


def test_silent_gateway_blocks_neither_training_nor_exit():
    silent = SilentGateway()
    try:
        # A push that blocked the training thread would hold it for push_timeout (60 s).
        exporter = PrometheusExporter(pushgateway=f"127.0.0.1:{silent.port}", push_interval=0.1,
                                      push_timeout=60.0)
        observed = []
        ended = []

        class Observe(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx == 1:
                    wait_for(lambda: silent.connections, 60, what="a push to connect")
                    # The push is in flight, unanswered, while training goes on.
                    observed.append(not silent.connections[0]["closed"])

            def on_train_end(self, trainer, pl_module):
                ended.append(time.monotonic())

        fit(DPModel(), PrivacyMonitor(delta=1e-5, exporters=[exporter], session_id="silent"),
            Observe())
        exit_seconds = time.monotonic() - ended[0]
        assert observed == [True]
        # The monitor closes exporters with a 10 s bound; push_timeout (60 s) must not apply.
        assert exit_seconds < 40, exit_seconds
        assert exporter.dropped >= 1
    finally:
        silent.close()


@pytest.mark.parametrize("kwargs, match", [
    ({"pushgateway": ""}, "pushgateway: ''"),
    ({"pushgateway": "127.0.0.1:9091", "job": ""}, "job: ''"),
    ({"pushgateway": "127.0.0.1:9091", "push_interval": 0}, "push_interval: 0"),
    ({"pushgateway": "127.0.0.1:9091", "push_timeout": -1}, "push_timeout: -1"),
])
def test_bad_pushgateway_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrometheusExporter(**kwargs)
