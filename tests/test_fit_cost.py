"""What a fit pays once, at start and end, for the monitor: no polling, no wasted work.

Behaviour only (benchmarks/bench_fit_cost.py measures the time): the metrics server's loop is
woken by close() instead of polling, a constant (sigma, q) starts no background worker, a
closing worker stops between pieces of a vector, and an exact RDP vector is computed once per
process.
"""

from __future__ import annotations

import selectors
import threading

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from dp_models import DPModel, fit
from privacy_callbacks import PrivacyMonitor, PrometheusExporter, accounting
from servers import http_get


class _SpySelector(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
    timeouts: list[float | None] = []

    def select(self, timeout: float | None = None):  # type: ignore[override]
        type(self).timeouts.append(timeout)
        return super().select(timeout)


@pytest.mark.parametrize("hardened", [False, True])
def test_metrics_server_blocks_until_closed_instead_of_polling(monkeypatch, hardened):
    timeouts: list[float | None] = []
    monkeypatch.setattr(_SpySelector, "timeouts", timeouts)
    monkeypatch.setattr(selectors, "DefaultSelector", _SpySelector)
    exporter = PrometheusExporter(port=0, basic_auth=("prom", "pw-123456") if hardened else None)
    exporter.start()
    url = exporter.url
    assert url is not None
    status, _ = http_get(url)
    assert status == (401 if hardened else 200)
    thread = exporter._thread
    assert thread is not None
    exporter.close(timeout=10.0)
    assert not thread.is_alive() and exporter.url is None
    with pytest.raises(OSError):
        http_get(url, timeout=2)
    # Every wait of the accept loop is open-ended: only a connection or close() wakes it.
    assert timeouts and all(t is None for t in timeouts), timeouts


def test_a_constant_noise_fit_starts_no_accounting_worker(monkeypatch):
    """The grid of bounding vectors serves noise schedules; one (sigma, q) never needs it."""
    runs: list[str] = []
    work = accounting._RdpMath._work

    def spy(self):
        runs.append(threading.current_thread().name)
        return work(self)

    monkeypatch.setattr(accounting._RdpMath, "_work", spy)
    model = DPModel(noise_multiplier=1.37)
    monitor = PrivacyMonitor(1e-5, target_epsilon=50.0, exporters=[PrometheusExporter(port=0)])
    fit(model, monitor)
    assert runs == []
    snap = monitor.last_snapshot
    assert snap is not None and snap.epsilon_exact
    assert snap.epsilon == model.privacy_engine.accountant.get_epsilon(1e-5)


def test_a_schedule_still_starts_the_worker_once_sigma_moves():
    math_ = accounting._RdpMath(1e-5)
    math_.lookup(2.71, 0.03)
    assert math_._thread is None  # one (sigma, q): nothing to compute ahead
    math_.lookup(2.70, 0.03)
    try:
        assert math_._thread is not None and math_._want == (2.70, 0.03)
    finally:
        math_.close()
    assert math_._thread is None or not math_._thread.is_alive()


def test_close_stops_the_worker_between_pieces_of_a_vector(monkeypatch):
    started, release = threading.Event(), threading.Event()
    pieces: list[int] = []
    compute = accounting._rdp_analysis.compute_rdp

    def slow(**kwargs):
        pieces.append(len(kwargs["orders"]))
        if threading.current_thread().name == "privacy-accounting-rdp-vectors":
            started.set()
            release.wait(10.0)
        return compute(**kwargs)

    monkeypatch.setattr(accounting._rdp_analysis, "compute_rdp", slow)
    # The in-thread path (what the worker does when the vector process cannot run).
    monkeypatch.setattr(accounting._VectorProcess, "compute", lambda self, *args: None)
    math_ = accounting._RdpMath(1e-5)
    math_._request(3.33, 0.07)
    assert started.wait(10.0)
    closer = threading.Thread(target=math_.close, kwargs={"timeout": 10.0},
                              name="privacy-test-closer")
    closer.start()
    while not math_._stopping:
        threading.Event().wait(0.001)
    release.set()
    closer.join(10.0)
    worker = math_._thread
    assert not closer.is_alive() and (worker is None or not worker.is_alive())
    assert len(pieces) == 1, "the worker went on computing after close()"
    assert not math_._grid  # no partial vector was kept


def test_exact_vectors_are_computed_once_per_process(monkeypatch):
    computed: list[tuple[float, float]] = []
    compute = accounting._RdpMath._compute

    def spy(self, sigma, q):
        computed.append((sigma, q))
        return compute(self, sigma, q)

    monkeypatch.setattr(accounting._RdpMath, "_compute", spy)
    values = []
    for _ in range(2):
        opacus = RDPAccountant()
        opacus.history = [(1.2345, 0.0625, 17)]
        acc = accounting.RdpAccounting(opacus, 1e-5)
        acc.update()
        assert acc.latest is not None and acc.latest.exact
        values.append((acc.latest.value, opacus.get_epsilon(1e-5)))
        acc.close()
    assert computed == [(1.2345, 0.0625)]
    assert all(ours == theirs for ours, theirs in values)  # bit-identical both times
    vec, exact = accounting._RdpMath(1e-5).lookup(1.2345, 0.0625)
    assert exact and not vec.flags.writeable  # shared: nobody may change it in place
    with pytest.raises(ValueError):
        vec += 1.0
    assert np.array_equal(vec, compute(accounting._RdpMath(1e-5), 1.2345, 0.0625))
