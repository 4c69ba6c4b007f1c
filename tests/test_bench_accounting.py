"""The accounting benchmark keeps running and keeps finding identical values."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_accounting  # noqa: E402


def test_quick_benchmark_rows_are_identical_to_opacus(capsys, tmp_path):
    rows = bench_accounting.main(["--quick", "--json", str(tmp_path / "rows.json")])
    # Three tight-loop rows, then a constant-sigma row and a noise-schedule row at a step cadence.
    assert [(r["accountant"], r["steps"], r["segments"], r["schedule"]) for r in rows] == [
        ("rdp", 1, 1, False), ("rdp", 100, 1, False), ("rdp", 100, 10, False),
        ("rdp", 100, 1, False), ("rdp", 100, 1, True)]
    # Constant sigma is exact at once; the schedule's exact value may still be on its way.
    assert all(r["identical"] for r in rows[:4])
    table = capsys.readouterr().out
    assert table.count("| rdp |") == 5
    assert (tmp_path / "rows.json").read_text().count('"identical": true') >= 4
