"""The step-cost benchmark times what it says: the monitor's hooks beside the floor, and only
monitors that did their job."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_step_cost  # noqa: E402

from privacy_callbacks.metrics import PrivacyMetrics  # noqa: E402


def test_quick_run_times_the_hooks_of_every_row(capsys):
    out = bench_step_cost.main(["--quick", "--rows", "dp,floor,monitor rdp"])
    rows = out["rows"]
    assert list(rows) == ["dp", "floor", "monitor rdp"]
    assert rows["dp"]["hooks_us"] is None
    for row in ("floor", "monitor rdp"):
        hooks = rows[row]["hooks_us"]
        assert 0 < hooks["mean"] <= hooks["max"] and hooks["p99"] <= hooks["max"]
    assert rows["floor"]["epsilon_us"]["mean"] == 0.0  # the floor computes no epsilon
    assert "| floor |" in capsys.readouterr().out


def test_a_monitor_that_publishes_nothing_stops_the_benchmark(monkeypatch):
    monkeypatch.setattr(PrivacyMetrics, "on_train_batch_end", lambda self, *args: None)
    with pytest.raises(RuntimeError, match="row monitor rdp: the monitor's last snapshot is None"):
        bench_step_cost.main(["--quick", "--rows", "dp,monitor rdp"])
