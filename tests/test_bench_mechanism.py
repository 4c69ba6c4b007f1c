"""The mechanism benchmark and the device check run end to end (quick sizes, CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _json(out: str) -> dict:
    return json.loads(out[out.index("{"):out.rindex("}") + 1])


def test_bench_mechanism_quick_reports_both_ratios():
    result = _json(_run("bench_mechanism.py", "--quick"))
    assert result["mechanism_cost_ratio"] > 0
    assert result["side_by_side_total"] > 0
    assert math.isfinite(result["reported_total"]) and result["reported_total"] >= 1


def test_gpu_check_runs_on_cpu_and_says_the_sync_check_was_skipped():
    out = _run("gpu_mechanism_check.py", "--size", "tiny", "--steps", "8", "--rounds", "1",
               "--warmup", "1")
    assert "sync check skipped: no CUDA device" in out
    result = _json(out[out.index("{"):])
    assert result["sync_check"] == "skipped (no CUDA)"
    assert result["reported_total"] is not None and result["reported_total"] >= 1
