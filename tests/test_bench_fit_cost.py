"""The fixed-cost benchmark runs end to end and its monitor rows stay sound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ("setup", "on_fit_start", "on_train_start", "on_train_end", "on_fit_end", "teardown",
         "steps", "first step")


def test_quick_fit_cost_benchmark(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_fit_cost.py"), "--quick",
         "--json", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["none", "monitor", "monitor+prometheus", "monitor+prometheus, cold"]
    assert report["settings"]["rounds"] == 2 and report["settings"]["steps"] == 3
    assert rows["none"]["extra_ms"] == 0.0 and "hooks_ms" not in rows["none"]
    for name, row in rows.items():
        assert row["steps"] == 3 and len(row["fit_ms_runs"]) == 2
        assert f"| {name} | {row['fit_ms']:.1f} |" in proc.stdout
        if name == "none":
            continue
        assert set(HOOKS) <= set(row["hooks_ms"])
        assert all(v >= 0 for v in row["hooks_ms"].values())
        # Sound whatever it costs: the exact final epsilon went out before fit returned, and
        # nothing the monitor started outlived the fit.
        assert row["final_exact"] is True
        assert row["threads_left"] == []
