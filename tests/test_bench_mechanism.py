"""The mechanism benchmark and the device check run end to end (quick sizes, CPU), and the
overhead total the monitor reports agrees with a plain fit and a DP fit timed side by side.

``privacy_overhead_ratio{operation="total"}`` is at least 1 and equals 1 plus its parts by the
way it is computed, so neither says whether it is right. Both scripts also time, in the same
process and interleaved with the monitored fit, a plain fit (no Opacus) and a DP fit without the
monitor, on the same model and batches. The tests compare what DP adds to the plain step:

    excess = (reported total - 1) / (side-by-side total - 1)

which is 1 for a perfect measurement and 0 for a total that leaves the DP cost out.

The test holds the lower end only, 0.3: a total that leaves a DP cost out reads 0 (a constant
1.0) or 0.09 to 0.16 (no per-sample gradient cost), while right totals gave 0.46 to 1.46 on a
2-core machine under a load average of 1 to 5 (``bench_mechanism.py --quick`` 30 runs, the
device check's tiny encoder 18). The upper end (a total that counts the whole forward/backward
as DP cost read 2.8 to 5.9) overlaps what a busy machine gives a right total (2.57 was seen in a
full test run), so it is the benchmark's to report (``excess_ratio``), not a test's. A guard
first checks that DP costs clearly more than the plain step in the run (side-by-side above 1.5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MIN_EXCESS = 0.3
MIN_SIDE_BY_SIDE = 1.5


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _json(out: str) -> dict:
    return json.loads(out[out.index("{"):out.rindex("}") + 1])


def assert_total_matches_side_by_side(result: dict) -> None:
    side, reported = result["side_by_side_total"], result["reported_total"]
    assert side > MIN_SIDE_BY_SIDE, (
        f"DP step only {side}x the plain step in this run: too close to tell a total without "
        f"the DP cost from a right one; use a model where per-sample gradients cost more")
    excess = (reported - 1) / (side - 1)
    assert excess >= MIN_EXCESS, (
        f"reported total {reported} vs side-by-side {side}: the DP cost reported is {excess:.2f}x "
        f"the one measured, below {MIN_EXCESS}: the total leaves a DP cost out")


def test_bench_mechanism_quick_reported_total_agrees_with_side_by_side():
    result = _json(_run("bench_mechanism.py", "--quick"))
    # 3 rounds x 13 timed steps; on a CPU the mechanism metrics (the overhead total with them)
    # are measured every k-th step by their cost, and at every calibration.
    steps = result["timed_steps"]
    assert (steps["plain"], steps["dp"]) == (39, 39) and 3 <= steps["reported"] <= 39
    assert_total_matches_side_by_side(result)


def test_gpu_check_runs_on_cpu_and_its_reported_total_agrees_with_side_by_side():
    out = _run("gpu_mechanism_check.py", "--size", "tiny", "--steps", "16", "--rounds", "3",
               "--warmup", "3", "--overhead-every", "2")
    assert "sync check, CPU twin" in out
    result = _json(out[out.index("{"):])
    # No call on the training thread that would wait for a CUDA device: none from us, and the
    # same count (the framework's own) with and without the monitor and mechanism metrics.
    assert result["sync_check"] == "cpu twin"
    assert result["syncs_from_privacy_callbacks"] == 0 and result["syncs_added_by_monitor"] == 0
    steps = result["timed_steps"]
    reported = steps.pop("reported")
    assert steps == {"none": 39, "off": 39, "on": 39, "plain": 39}
    assert 3 <= reported <= 39  # on a CPU, every k-th step and every calibration (see above)
    assert_total_matches_side_by_side(result)
