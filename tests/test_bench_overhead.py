"""The overhead benchmark's quick CPU mode yields every row, as a table and as JSON, and times
only fits that did their job."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_overhead  # noqa: E402

from privacy_callbacks.metrics import PrivacyMetrics  # noqa: E402

QUICK = ["--mode", "cpu", "--reps", "1", "--steps", "2", "--warmup", "1"]


def test_quick_cpu_run_reports_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench_overhead.main([*QUICK, "--json", str(out)])
    table = capsys.readouterr().out
    rows = [r["row"] for r in report["results"]]
    assert rows == list(bench_overhead.ROWS)
    by_row = {r["row"]: r for r in report["results"]}
    for r in report["results"]:
        assert r["step_ms"] > 0 and len(r["step_ms_reps"]) == 1
        assert f"| {r['row']} | {r['step_ms']:.2f} |" in table
        # The ratios are of this run's own rows, side by side.
        assert r["vs_plain"] == pytest.approx(r["step_ms"] / by_row["plain"]["step_ms"])
        if r["row"] != "plain":
            assert r["vs_dp"] == pytest.approx(r["step_ms"] / by_row["dp"]["step_ms"] - 1)
    assert by_row["plain"]["vs_plain"] == 1.0 and by_row["dp"]["vs_dp"] == 0.0
    saved = json.loads(out.read_text())
    assert saved["environment"]["opacus"] and saved["environment"]["device"]
    assert [r["row"] for r in saved["results"]] == rows


def test_a_monitor_that_publishes_nothing_stops_the_benchmark(monkeypatch):
    # A monitor that silently did no work would make the overhead look free: the benchmark
    # checks each monitor fit published the accountant's own epsilon for its last step.
    monkeypatch.setattr(PrivacyMetrics, "on_train_batch_end", lambda self, *args: None)
    with pytest.raises(RuntimeError, match="row dp\\+monitor.*last snapshot is None"):
        bench_overhead.main(QUICK)
