"""Epsilon per step: privacy_callbacks' accounting vs Opacus' ``get_epsilon``.

    python benchmarks/bench_accounting.py            # full table (a few minutes: PRV is slow)
    python benchmarks/bench_accounting.py --quick    # RDP only, small sizes (CI smoke test)

For each accountant, history length (steps) and number of (sigma, q) segments it builds the same
history, then times what the training thread pays per step: ours is ``Accounting.update()``
after one more accountant step (for PRV/GDP that is only the hand-off to the background worker);
Opacus' is ``accountant.get_epsilon(delta)``. Both run in the same process, interleaved; the
ratio is what counts. It also checks the values: RDP must be identical.

Mean, 99th percentile and maximum are reported with the median: a background computation
competes for the GIL, which shows in the tail. Scheduler rows decay sigma by 0.1 % every step
(Opacus' ``ExponentialNoise(gamma=0.999)`` stepped every batch), so each step is a new segment;
they run at a 20 ms step cadence (the sleep is not timed), as training would, next to a
constant-sigma row at the same cadence (a step after a 20 ms sleep costs more on this CPU).
``--schedule`` runs only those rows.
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


def measure(mechanism: str, steps: int, segments: int, reps: int, opacus_reps: int,
            schedule: bool = False, cadence: float = 0.0) -> dict:
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
                    if schedule:
                        sigma *= 0.999
                    if cadence:
                        time.sleep(cadence)
                    accountant.step(noise_multiplier=sigma, sample_rate=q)
                    t0 = time.perf_counter_ns()
                    ours.update()
                    ours_times.append(time.perf_counter_ns() - t0)
                if i < opacus_reps:
                    t0 = time.perf_counter_ns()
                    theirs = accountant.get_epsilon(DELTA)
                    theirs_times.append(time.perf_counter_ns() - t0)
            ours.update()
            settled = ours.settle(timeout=10.0)
            if opacus_reps:
                ours.settle(timeout=600)
                theirs = accountant.get_epsilon(DELTA)
                same = bool(ours.epsilon == theirs)
            elif settled and mechanism == "rdp":  # exact once settled: check it
                theirs = accountant.get_epsilon(DELTA)
                same = bool(ours.epsilon == theirs)
            else:  # Opacus takes minutes on this many segments
                theirs, same = None, None
        finally:
            ours.close()
    ours_us = statistics.median(ours_times) / 1e3
    theirs_us = statistics.median(theirs_times) / 1e3 if theirs_times else None
    ours_times.sort()
    return {"accountant": mechanism, "steps": steps, "segments": segments, "schedule": schedule,
            "cadence_ms": cadence * 1e3, "settled": settled,
            "fallbacks": getattr(ours._rdp, "fallbacks", None),
            "ours_us": ours_us, "ours_mean_us": statistics.mean(ours_times) / 1e3,
            "ours_p99_us": ours_times[int(0.99 * (len(ours_times) - 1))] / 1e3,
            "ours_max_us": ours_times[-1] / 1e3, "opacus_us": theirs_us,
            "speedup": theirs_us / ours_us if theirs_us else None,
            "epsilon": ours.epsilon, "opacus_epsilon": theirs, "identical": same}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="RDP only, small sizes")
    parser.add_argument("--schedule", action="store_true",
                        help="only the noise-schedule rows and their constant-sigma baseline")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)

    if args.schedule:
        grid = []
    elif args.quick:
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
    for mechanism in ("rdp",) if args.quick else ("rdp", "prv"):
        # The same 20 ms cadence with a constant sigma: what a step costs after a sleep here.
        rows.append(measure(mechanism, 100, 1, reps=300, opacus_reps=0, cadence=0.02))
        rows.append(measure(mechanism, 100, 1, reps=300, opacus_reps=0, schedule=True,
                            cadence=0.02))

    print(f"\nOpacus {opacus.__version__}, Python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, delta={DELTA}\n")
    print("Ours: time on the training thread per step (RDP: the exact epsilon; PRV/GDP: the "
          "hand-off to the background worker, which then runs Opacus' own get_epsilon).\n")
    print("| accountant | steps | segments | ours µs/step median | mean | p99 | max "
          "| Opacus get_epsilon µs | speed-up | identical ε |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        segments = f"+1 per step ({r['segments']} first)" if r["schedule"] else r["segments"]
        if r["cadence_ms"]:
            segments = f"{segments}, {r['cadence_ms']:.0f} ms cadence"
        opacus_us = "-" if r["opacus_us"] is None else f"{r['opacus_us']:.0f}"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.0f}×"
        same = "-" if r["identical"] is None else "yes" if r["identical"] else "NO"
        print(f"| {r['accountant']} | {r['steps']} | {segments} | {r['ours_us']:.1f} | "
              f"{r['ours_mean_us']:.1f} | {r['ours_p99_us']:.1f} | {r['ours_max_us']:.1f} | "
              f"{opacus_us} | {speedup} | {same} |")
    for r in rows:
        if r["cadence_ms"]:
            print(f"{r['accountant']} {'schedule' if r['schedule'] else 'constant sigma'}: "
                  f"exact final value within the 10 s settle: {r['settled']}; closed-form "
                  f"(no grid point yet) vectors: {r['fallbacks']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
