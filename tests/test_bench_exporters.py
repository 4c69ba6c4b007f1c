"""The exporter benchmark keeps running and its InfluxDB settings keep delivering or counting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.servers


def test_quick_exporter_benchmark(tmp_path):
    # A subprocess: with the server down, a write may still be retrying on its daemon thread
    # when the benchmark ends, which only process exit stops.
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_exporters.py"), "--quick",
         "--json", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["setting"]: r for r in json.loads(out.read_text())}
    assert proc.stdout.count("| + InfluxDBExporter, server") == 2
    base, prometheus, up, down = rows.values()
    assert base["step_ratio"] == 1.0 and up["step_ratio"] > 0 and down["step_ratio"] > 0
    assert base["steps"] == prometheus["steps"] == up["steps"] == down["steps"] == 8
    assert prometheus["export_us"] > 0 and prometheus["dropped"] == 0
    assert (up["written"], up["dropped"]) == (8, 0)
    assert (down["written"], down["dropped"]) == (0, 8)
