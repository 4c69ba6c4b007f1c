"""How fresh and how tight the published epsilon is for PRV and GDP (computed in the background).

    python benchmarks/bench_freshness.py                 # 1000 steps, 20 and 60 ms, PRV and GDP
    python benchmarks/bench_freshness.py --steps 200     # shorter
    python benchmarks/bench_freshness.py --alone         # update() alone, no computation running

Simulates training at a fixed step cadence: every ``cadence`` seconds one accountant step
(constant sigma, q) and ``Accounting.update()`` on this thread, as the monitor does; the
background worker publishes through ``Accounting.listener`` whenever it improves the value.
Measured per step n:

* what a scraper sees just before step n+1: the published value for step n (exact or bound);
* gap: that value over Opacus' ``get_epsilon`` for the history at step n (computed afterwards
  for every ``--check-every``-th step), and that it is never below it;
* exact lag: n minus the latest step whose exact value has been published, in steps and in
  seconds since that step was accounted;
* the training thread's cost of ``update()``: the first step apart (it computes the RDP vector
  of the new (sigma, q), milliseconds, once), then mean / 99th percentile / max of the rest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import warnings

from opacus.accountants import GaussianAccountant, PRVAccountant

from privacy_callbacks.accounting import Epsilon, make_accounting

DELTA = 1e-5
SIGMA, Q = 1.0, 0.01
CLASSES = {"prv": PRVAccountant, "gdp": GaussianAccountant}


def run(mechanism: str, cadence: float, steps: int, check_every: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = CLASSES[mechanism]()
    accounting = make_accounting(accountant, DELTA)
    lock = threading.Lock()
    exact_at: dict[int, float] = {}  # step -> when its exact value was first published
    stepped_at: dict[int, float] = {}

    def listener(value: Epsilon) -> None:
        if value.exact:
            with lock:
                exact_at.setdefault(value.step, time.monotonic())

    accounting.listener = listener
    seen: list[Epsilon] = []
    costs: list[float] = []
    lag_steps: list[int] = []
    lag_seconds: list[float] = []
    last_exact = 0
    try:
        start = time.monotonic()
        for n in range(1, steps + 1):
            time.sleep(max(0.0, start + n * cadence - time.monotonic()))
            if n > 1:  # what a scraper sees at the end of step n-1
                latest = accounting.latest
                seen.append(latest)
                if latest.exact:
                    with lock:
                        exact_at.setdefault(latest.step, time.monotonic())
                with lock:
                    done = [s for s in exact_at if s > last_exact]
                last_exact = max([last_exact, *done])
                lag_steps.append(n - 1 - last_exact)
                if last_exact:
                    lag_seconds.append(time.monotonic() - stepped_at[last_exact]
                                       if last_exact < n - 1 else 0.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                accountant.step(noise_multiplier=SIGMA, sample_rate=Q)
            t0 = time.perf_counter_ns()
            accounting.update()
            costs.append((time.perf_counter_ns() - t0) / 1e3)
            stepped_at[n] = time.monotonic()
            if accounting.latest.exact:
                with lock:
                    exact_at.setdefault(n, time.monotonic())
        settled = accounting.settle(timeout=60)
        seen.append(accounting.latest)
    finally:
        accounting.close()
    gaps, below = [], 0
    exact_steps = sum(1 for e in seen if e.exact)
    for e in seen:
        if e.step % check_every and e.step != steps:
            continue
        truth_acc = CLASSES[mechanism].__new__(CLASSES[mechanism])
        truth_acc.history = [(SIGMA, Q, e.step)]
        truth = truth_acc.get_epsilon(DELTA)
        below += e.value < truth
        gaps.append(e.value / truth - 1)
    first, costs = costs[0], sorted(costs[1:])
    return {
        "accountant": mechanism, "cadence_ms": cadence * 1e3, "steps": steps,
        "exact_share": exact_steps / len(seen), "final_exact": settled and seen[-1].exact,
        "lag_steps_mean": statistics.mean(lag_steps), "lag_steps_max": max(lag_steps),
        "lag_s_mean": statistics.mean(lag_seconds), "lag_s_max": max(lag_seconds),
        "gap_mean": statistics.mean(gaps), "gap_max": max(gaps), "below": below,
        "checked": len(gaps), "cost_first_us": first, "cost_mean_us": statistics.mean(costs),
        "cost_p99_us": costs[int(0.99 * (len(costs) - 1))], "cost_max_us": costs[-1],
    }


def alone(mechanism: str, steps: int = 3000, cadence: float | None = None) -> dict:
    """``update()`` on the training thread with no background computation running.

    ``cadence``: sleep that long before every step, as at the freshness runs' cadence (else
    20 ms every 100th step).
    """
    from opacus.accountants import RDPAccountant

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = {**CLASSES, "rdp": RDPAccountant}[mechanism]()
    accountant.history = [(SIGMA, Q, 100)]
    accounting = make_accounting(accountant, DELTA)
    if mechanism != "rdp":
        accounting._thread = threading.current_thread()  # keeps the worker from starting
    accounting.update()
    costs = []
    for n in range(steps):
        accountant.step(noise_multiplier=SIGMA, sample_rate=Q)
        if cadence is not None:
            time.sleep(cadence)
        elif n % 100 == 0:
            time.sleep(0.02)
        t0 = time.perf_counter_ns()
        accounting.update()
        costs.append((time.perf_counter_ns() - t0) / 1e3)
    accounting._thread = None
    costs.sort()
    return {"accountant": mechanism, "median": costs[len(costs) // 2],
            "mean": statistics.mean(costs), "p99": costs[int(0.99 * (len(costs) - 1))],
            "max": costs[-1]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--cadence-ms", type=float, nargs="+", default=[20.0, 60.0])
    parser.add_argument("--accountants", nargs="+", default=["prv", "gdp"])
    parser.add_argument("--check-every", type=int, default=10,
                        help="compare with Opacus at every this many steps (PRV costs ms-s)")
    parser.add_argument("--alone", action="store_true",
                        help="time update() alone (3000 steps, no background computation)")
    parser.add_argument("--alone-cadence", action="store_true",
                        help="with --alone: --steps steps, sleeping the first --cadence-ms "
                             "before each, as the freshness runs do")
    args = parser.parse_args(argv)
    if args.alone:
        print("| accountant | update() µs median | mean | p99 | max |\n|---|---:|---:|---:|---:|")
        for mechanism in ("rdp", *args.accountants):
            r = (alone(mechanism, args.steps, args.cadence_ms[0] / 1e3) if args.alone_cadence
                 else alone(mechanism))
            print(f"| {r['accountant']} | {r['median']:.1f} | {r['mean']:.1f} | {r['p99']:.1f} | "
                  f"{r['max']:.1f} |")
        return []
    rows = []
    for mechanism in args.accountants:
        for cadence in args.cadence_ms:
            row = run(mechanism, cadence / 1e3, args.steps, args.check_every)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    print(f"\nsigma={SIGMA}, q={Q}, delta={DELTA}, {args.steps} steps; gap = published / Opacus' "
          "get_epsilon for the same step - 1, checked at every "
          f"{args.check_every}th step and the last\n")
    print("| accountant | step | exact share | exact lag steps mean / max | exact lag s mean / max "
          "| gap mean / max | below Opacus | final exact | update() µs first "
          "| then mean / p99 / max |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['accountant']} | {r['cadence_ms']:.0f} ms | {r['exact_share']:.0%} | "
              f"{r['lag_steps_mean']:.2f} / {r['lag_steps_max']} | "
              f"{r['lag_s_mean']:.3f} / {r['lag_s_max']:.3f} | "
              f"{r['gap_mean']:.2%} / {r['gap_max']:.2%} | {r['below']} of {r['checked']} | "
              f"{'yes' if r['final_exact'] else 'NO'} | {r['cost_first_us']:.0f} | "
              f"{r['cost_mean_us']:.1f} / "
              f"{r['cost_p99_us']:.1f} / {r['cost_max_us']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
