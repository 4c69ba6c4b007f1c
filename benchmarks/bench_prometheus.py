"""What one snapshot costs the Prometheus exporter on the publisher thread, before and after.

    python benchmarks/bench_prometheus.py --before f0c4eb9       # 7 rounds of 2000 snapshots
    python benchmarks/bench_prometheus.py --before f0c4eb9 --quick
    python benchmarks/bench_prometheus.py --before f0c4eb9 --fits 5   # + training-step cost

``--before REV`` loads ``privacy_callbacks/exporters/prometheus.py`` as it was at git revision
``REV`` (the exporter that set one Gauge child per metric and snapshot) next to the current one,
in the same process. Rounds alternate the two, each with a fresh exporter (``serve=False``) fed
the same synthetic snapshots: the monitor's defaults on CPU (RDP with a target, mechanism
metrics from a resolved noised histogram of 32 observations, overhead ratios), with every tenth
snapshot a background epsilon for the same step (no device statistics) and a final snapshot
without step time, as a fit publishes them. Timed: ``export(snapshot)`` per snapshot, and one
scrape (``generate_latest`` of the registry) after the round. Both exporters must serve the same
text (``_created`` timestamps aside); the script fails otherwise.

``--fits N`` also runs N rounds of four 300-step fits of ``tests/dp_models.DPModel`` (a tiny
Opacus MLP, batch 8, one torch thread), rows rotated: ``dp`` (no monitor), and ``PrivacyMonitor``
with its defaults and a target, without exporters or with the earlier or the current exporter
serving ``/metrics``. Per
step: the gap between consecutive ``on_train_batch_end`` calls (the training thread's whole
step), median and mean over the steps after 20 warm-up steps, and each against ``dp``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from privacy_callbacks import PrivacySnapshot, PrometheusExporter  # noqa: E402
from privacy_callbacks.exporters.base import RunInfo  # noqa: E402


class ResolvedStats:
    """Stands in for a resolved ``DeviceStats``: the values a CPU step of the defaults carries."""

    def __init__(self, step: int) -> None:
        self.clipped_fraction = 0.25 + 0.001 * (step % 100)
        # Noised histogram: one observation per (rounded) count, at its bucket's upper edge.
        self.per_sample_grad_norms = tuple([0.5] * 8 + [1.0] * 16 + [2.0] * 8)
        self.noised_counts = (8.0, 16.0, 8.0)
        self.noise_magnitude = 41.3
        self.signal_energy = 9.0 + step
        self.signal_magnitude = (9.0 + step) ** 0.5
        self.signal_to_noise_ratio = self.signal_magnitude / 41.3
        self.overhead = {"per_sample_gradients": 0.8, "clipping": 0.1, "noise": 0.05,
                         "accounting": 0.01, "total": 1.96}

    def resolve(self) -> None:
        """Already resolved."""


def snapshots(count: int) -> list[PrivacySnapshot]:
    out: list[PrivacySnapshot] = []
    step = 0
    while len(out) < count - 1:
        step += 1
        eps = 0.05 * step ** 0.5
        snap = PrivacySnapshot(
            step=step, timestamp_ns=time.time_ns(), accountant="rdp", delta=1e-5, epsilon=eps,
            epsilon_step=step, epsilon_exact=1, steps=step, noise_multiplier=1.0,
            max_grad_norm=1.0, sample_rate=1 / 8, noise_std=1 / 32, throughput=4000.0 + step,
            step_seconds=0.008, accounting_errors=0, target_epsilon=8.0,
            budget_remaining=8.0 - eps, epsilon_forecast=3.0, budget_exhaustion_steps=10_000,
            budget_exhausted=0, membership_inference_risk=0.01 * eps,
            device_stats=ResolvedStats(step))
        out.append(snap)
        if step % 10 == 0:  # a background epsilon for the same step: no device statistics
            out.append(dataclasses.replace(snap, epsilon=eps * 0.99, device_stats=None))
    last = out[-1]
    out.append(dataclasses.replace(last, throughput=None, step_seconds=None, device_stats=None))
    return out[:count]


def load_before(rev: str) -> type:
    """The exporter class as it was at ``rev``, importable beside the current one."""
    path = "privacy_callbacks/exporters/prometheus.py"
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    name = "privacy_callbacks.exporters._prometheus_before"
    module = types.ModuleType(name)
    module.__package__ = "privacy_callbacks.exporters"
    sys.modules[name] = module
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module.PrometheusExporter


def exposition(exporter: Any) -> list[str]:
    return [line for line in generate_latest(exporter.registry).decode().splitlines()
            if "_created" not in line]


def run_round(cls: type, snaps: list[PrivacySnapshot], session: str) -> tuple[list[int], int,
                                                                               Any]:
    exporter = cls(port=0, serve=False)
    exporter.open(RunInfo(session_id=session, model_name="bench", accountant="rdp",
                          delta=1e-5, target_epsilon=8.0, exporters=(exporter,)))
    times = []
    clock = time.perf_counter_ns
    export = exporter.export
    for snap in snaps:
        t0 = clock()
        export(snap)
        times.append(clock() - t0)
    t0 = clock()
    generate_latest(exporter.registry)
    scrape = clock() - t0
    return times, scrape, exporter


class _NoExporter:
    """Row marker: the monitor without exporters."""


def fit_gaps(exporter_cls: type | None, steps: int, warmup: int = 20) -> list[int]:
    """Nanoseconds between consecutive ``on_train_batch_end`` calls of one fit."""
    import lightning.pytorch as pl

    from dp_models import DPModel, fit

    from privacy_callbacks import PrivacyMonitor

    stamps: list[int] = []

    class Gaps(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            stamps.append(time.perf_counter_ns())

    callbacks: list[Any] = []
    if exporter_cls is not None:
        exporters = [] if exporter_cls is _NoExporter else [exporter_cls(port=0)]
        callbacks.append(PrivacyMonitor(delta=1e-5, target_epsilon=8.0, exporters=exporters,
                                        session_id="bench"))
    fit(DPModel(n=8 * steps, batch_size=8), *callbacks, Gaps(), max_steps=steps)
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]


def fits(rounds: int, variants: dict[str, type], steps: int = 300) -> None:
    import logging

    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import)
    import torch
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows: dict[str, type | None] = {"dp": None, "dp+monitor, no exporter": _NoExporter}
    rows.update({f"dp+monitor, {name}": cls for name, cls in variants.items()})
    names = list(rows)
    gaps: dict[str, list[int]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            gaps[name] += fit_gaps(rows[name], steps)
    base_median = statistics.median(gaps["dp"])
    base_mean = statistics.fmean(gaps["dp"])
    print(f"\n{rounds} rounds x {len(names)} fits of {steps} steps, rows rotated\n")
    print("| row | step median µs | over dp | step mean µs | over dp |")
    print("|---|---|---|---|---|")
    for name in names:
        median, mean = statistics.median(gaps[name]), statistics.fmean(gaps[name])
        print(f"| {name} | {median / 1e3:.0f} | {(median - base_median) / 1e3:+.0f} µs "
              f"({100 * (median / base_median - 1):+.1f} %) | {mean / 1e3:.0f} | "
              f"{(mean - base_mean) / 1e3:+.0f} µs ({100 * (mean / base_mean - 1):+.1f} %) |"
              .replace("+-", "-"))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision of the earlier exporter")
    parser.add_argument("--rounds", type=int, help="rounds per exporter (default 7, quick 1)")
    parser.add_argument("--snapshots", type=int, help="snapshots per round (default 2000, "
                        "quick 200)")
    parser.add_argument("--quick", action="store_true", help="1 round of 200 snapshots")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    parser.add_argument("--fits", type=int, default=0,
                        help="also time training steps over this many rounds of fits")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 7)
    count = args.snapshots or (200 if args.quick else 2000)
    if rounds < 1 or count < 2:
        raise SystemExit(f"Unexpected value for --rounds/--snapshots: {rounds}/{count}; use "
                         "at least 1 round of 2 snapshots")
    variants = {f"before ({args.before})": load_before(args.before), "after": PrometheusExporter}
    snaps = snapshots(count)
    export_ns: dict[str, list[int]] = {name: [] for name in variants}
    scrape_ns: dict[str, list[int]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        served = []
        for name in (names if r % 2 == 0 else names[::-1]):
            times, scrape, exporter = run_round(variants[name], snaps, f"r{r}")
            export_ns[name] += times
            scrape_ns[name].append(scrape)
            served.append(exposition(exporter))
            exporter.close()
        if served[0] != served[1]:
            raise SystemExit("The two exporters serve different text for the same snapshots:\n"
                             + "\n".join(sorted(set(served[0]) ^ set(served[1]))))
    rows = []
    for name in names:
        t = sorted(export_ns[name])
        rows.append({"exporter": name, "snapshots": len(t),
                     "export_median_us": statistics.median(t) / 1e3,
                     "export_mean_us": statistics.fmean(t) / 1e3,
                     "export_p99_us": t[int(0.99 * (len(t) - 1))] / 1e3,
                     "scrape_median_ms": statistics.median(scrape_ns[name]) / 1e6})
    print(f"{rounds} rounds x {count} snapshots per exporter, interleaved; same text served\n")
    print("| exporter | export() median µs | mean µs | p99 µs | scrape (generate_latest) ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['exporter']} | {row['export_median_us']:.1f} | "
              f"{row['export_mean_us']:.1f} | {row['export_p99_us']:.1f} | "
              f"{row['scrape_median_ms']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.fits:
        fits(args.fits, variants)
    return rows


if __name__ == "__main__":
    main()
