"""The overhead benchmark's quick CPU mode yields every row, as a table and as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_overhead  # noqa: E402


def test_quick_cpu_run_reports_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench_overhead.main(["--mode", "cpu", "--reps", "1", "--steps", "2",
                                  "--warmup", "1", "--json", str(out)])
    table = capsys.readouterr().out
    rows = [r["row"] for r in report["results"]]
    assert rows == list(bench_overhead.ROWS)
    for r in report["results"]:
        assert r["step_ms"] > 0 and len(r["step_ms_reps"]) == 1
        assert f"| {r['row']} | {r['step_ms']:.2f} |" in table
    by_row = {r["row"]: r for r in report["results"]}
    assert by_row["plain"]["vs_plain"] == 1.0
    saved = json.loads(out.read_text())
    assert saved["environment"]["opacus"] and saved["environment"]["device"]
    assert [r["row"] for r in saved["results"]] == rows
