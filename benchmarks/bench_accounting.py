"""Epsilon per step: privacy_callbacks' accounting vs Opacus' ``get_epsilon``.

    python benchmarks/bench_accounting.py            # full table (a few minutes: PRV is slow)
    python benchmarks/bench_accounting.py --quick    # RDP only, small sizes (CI smoke test)

For each accountant, history length (steps) and number of (sigma, q) segments it builds the same
history, then times what the training thread pays per step: ours is ``Accounting.update()``
after one more accountant step (for PRV/GDP that is only the hand-off to the background worker);
Opacus' is ``accountant.get_epsilon(delta)``. Both run in the same process, interleaved; the
ratio is what counts. It also checks the values: RDP must be identical.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings

import opacus
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from privacy_callbacks.accounting import make_accounting

DELTA = 1e-5
CLASSES = {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant}


def build_history(steps: int, segments: int) -> list[tuple[float, float, int]]:
    segments = min(segments, steps)
    per, extra = divmod(steps, segments)
    return [(0.8 + 0.01 * i, 0.01, per + (1 if i < extra else 0)) for i in range(segments)]


def measure(mechanism: str, steps: int, segments: int, reps: int, opacus_reps: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = CLASSES[mechanism]()
        accountant.history = build_history(steps, segments)
        ours = make_accounting(accountant, DELTA)
        ours.update()
        sigma, q, _ = accountant.history[-1]
        ours_times, theirs_times = [], []
        try:
            for i in range(max(reps, opacus_reps)):
                if i < reps:
                    accountant.step(noise_multiplier=sigma, sample_rate=q)
                    t0 = time.perf_counter_ns()
                    ours.update()
                    ours_times.append(time.perf_counter_ns() - t0)
                if i < opacus_reps:
                    t0 = time.perf_counter_ns()
                    theirs = accountant.get_epsilon(DELTA)
                    theirs_times.append(time.perf_counter_ns() - t0)
            ours.update()
            ours.settle(timeout=600)
            theirs = accountant.get_epsilon(DELTA)
            same = bool(ours.epsilon == theirs)
        finally:
            ours.close()
    ours_us = statistics.median(ours_times) / 1e3
    theirs_us = statistics.median(theirs_times) / 1e3
    return {"accountant": mechanism, "steps": steps, "segments": segments,
            "ours_us": ours_us, "opacus_us": theirs_us, "speedup": theirs_us / ours_us,
            "epsilon": ours.epsilon, "opacus_epsilon": theirs, "identical": same}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="RDP only, small sizes")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)

    if args.quick:
        grid = [("rdp", 1, 1), ("rdp", 100, 1), ("rdp", 100, 10)]
    else:
        grid = [(m, s, g) for m in ("rdp", "prv", "gdp") for s in (1, 100, 10_000)
                for g in (1, 10, 100)
                if g <= s                            # a segment holds at least one step
                and not (m == "gdp" and g > 1)       # GDP accepts one (sigma, q) only
                and not (m == "prv" and g > 10)]     # PRV: ~35 s per Opacus call at 100
    rows = []
    for n, (mechanism, steps, segments) in enumerate(grid, 1):
        slow = mechanism == "prv" or segments >= 100 or steps >= 10_000
        row = measure(mechanism, steps, segments, reps=2000, opacus_reps=3 if slow else 20)
        rows.append(row)
        print(f"[{n}/{len(grid)}] {mechanism} steps={steps} segments={segments}: "
              f"{row['speedup']:.0f}x", file=sys.stderr, flush=True)

    print(f"\nOpacus {opacus.__version__}, Python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, delta={DELTA}\n")
    print("Ours: time on the training thread per step (RDP: the exact epsilon; PRV/GDP: the "
          "hand-off to the background worker, which then runs Opacus' own get_epsilon).\n")
    print("| accountant | steps | segments | ours µs/step | Opacus get_epsilon µs | speed-up | identical ε |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['accountant']} | {r['steps']} | {r['segments']} | {r['ours_us']:.1f} | "
              f"{r['opacus_us']:.0f} | {r['speedup']:.0f}× | {'yes' if r['identical'] else 'NO'} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
