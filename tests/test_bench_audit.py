"""The audit benchmark runs end to end (quick size, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_audit_quick_reports_the_bound_below_the_reported_epsilon():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_audit.py"), "--quick"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    row, = json.loads(out[out.index("{"):out.rindex("}") + 1])["rows"]
    assert row["steps"] == 8 and not row["broken"]
    assert 0 <= row["bounds"][0] < row["epsilon"]
