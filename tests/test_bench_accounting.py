"""The accounting benchmark runs, finds identical values, and its guard rows are right."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_accounting  # noqa: E402


def test_quick_run_is_identical_to_opacus_and_the_guard_takes_what_is_allowed(capsys, tmp_path):
    out = bench_accounting.main(["--quick", "--json", str(tmp_path / "rows.json")])
    assert [(r["accountant"], r["steps"], r["segments"]) for r in out["speed"]] == [
        ("rdp", 100, 1), ("rdp", 100, 10)]
    assert all(r["identical"] and r["speedup"] > 1 for r in out["speed"])
    (row,) = out["guard"]
    assert row["released"] == row["allowed"] > 0 and row["epsilon"] <= 3.0
    table = capsys.readouterr().out
    assert table.count("| rdp |") == 3
    assert '"identical": true' in (tmp_path / "rows.json").read_text()
    # Run inside this process: the warnings a later test checks for still reach the log.
    assert not logging.root.manager.disable
