"""The overhead benchmark yields every row of both parts, and times only fits that did their job."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_overhead  # noqa: E402

from privacy_callbacks import PrivacyMonitor  # noqa: E402

QUICK = ["--mode", "cpu", "--reps", "1", "--steps", "2", "--warmup", "1", "--hook-rounds", "1",
         "--hook-steps", "40", "--hook-rows", "dp,floor,monitor rdp"]


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
    hooks = report["hooks"]["rows"]
    assert list(hooks) == ["dp", "floor", "monitor rdp"] and hooks["dp"]["hooks_us"] is None
    for row in ("floor", "monitor rdp"):
        timed = hooks[row]["hooks_us"]
        assert 0 < timed["mean"] <= timed["max"] and timed["p99"] <= timed["max"]
        assert f"| {row} |" in table
        assert hooks[row]["over_dp_step_mean_us"] == pytest.approx(
            hooks[row]["step_mean_us"] - hooks["dp"]["step_mean_us"])
    saved = json.loads(out.read_text())
    assert saved["environment"]["opacus"] and saved["environment"]["device"]
    assert [r["row"] for r in saved["results"]] == rows and saved["hooks"]["rows"]


@pytest.mark.parametrize("part", [["--no-hooks"], ["--hooks-only"]])
def test_a_monitor_that_publishes_nothing_stops_the_benchmark(monkeypatch, part):
    # A monitor that silently did no work would make the overhead look free: the benchmark
    # checks each monitor fit published the accountant's own epsilon for its last step.
    monkeypatch.setattr(PrivacyMonitor, "on_train_batch_end", lambda self, *args: None)
    with pytest.raises(RuntimeError, match="row (dp\\+)?monitor.*last snapshot is None"):
        bench_overhead.main([*QUICK, *part])
