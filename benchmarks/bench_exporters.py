"""What the exporters cost, server up and server down.

    python benchmarks/bench_exporters.py            # 3 rounds of 128-step fits per setting
    python benchmarks/bench_exporters.py --quick    # 1 round of 8-step fits (CI smoke test)

Settings run in the same process, interleaved round by round, on the same tiny Opacus model:
the monitor without exporters (the baseline); with a ``PrometheusExporter`` serving ``/metrics``;
with an ``InfluxDBExporter`` writing to a real VictoriaMetrics (``/api/v2/write``); and with one
pointed at a port where nothing listens (an outage for the whole fit). Per setting: the step's
wall time against the baseline, the time the monitor's per-step hook takes on the training
thread, each exporter's ``export()`` per snapshot on the publisher thread, and the points an
InfluxDB exporter wrote and dropped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dp_models import DPModel  # noqa: E402
from servers import free_port, victoria_metrics  # noqa: E402

from privacy_callbacks import InfluxDBExporter, PrivacyMonitor, PrometheusExporter  # noqa: E402


class Timed(pl.Callback):
    """The gap between batch ends (the training thread's whole step) and the monitor's hook."""

    def __init__(self, monitor: PrivacyMonitor) -> None:
        self.gaps: list[int] = []
        self.hook: list[int] = []
        self._prev: int | None = None
        end = monitor.on_train_batch_end

        def timed(*args: Any) -> None:
            t0 = time.perf_counter_ns()
            end(*args)
            self.hook.append(time.perf_counter_ns() - t0)

        monitor.on_train_batch_end = timed  # type: ignore[method-assign]

    def on_train_batch_end(self, *args: Any) -> None:
        now = time.perf_counter_ns()
        if self._prev is not None:
            self.gaps.append(now - self._prev)
        self._prev = now


def timed_export(exporter: Any, into: list[int]) -> Any:
    export = exporter.export

    def timed(snapshot: Any) -> None:
        t0 = time.perf_counter_ns()
        export(snapshot)
        into.append(time.perf_counter_ns() - t0)

    exporter.export = timed
    return exporter


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 8-step fits")
    parser.add_argument("--rounds", type=int, help="rounds per setting (default 3, quick 1)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    samples = 128 if args.quick else 2048
    warnings.filterwarnings("ignore")
    server = victoria_metrics().start()
    dead = f"http://127.0.0.1:{free_port()}"
    settings = {
        "monitor, no exporter (baseline)": lambda: [],
        "+ PrometheusExporter": lambda: [PrometheusExporter(port=0)],
        "+ InfluxDBExporter, server up": lambda: [
            InfluxDBExporter(server.url, org="bench", bucket="bench")],
        # close_timeout only shortens the end of each fit; it costs nothing per step.
        "+ InfluxDBExporter, server down": lambda: [
            InfluxDBExporter(dead, org="bench", bucket="bench", close_timeout=1.0)],
    }
    data: dict[str, dict[str, list[int]]] = {
        name: {"step": [], "hook": [], "export": []} for name in settings}
    counts = {name: [0, 0] for name in settings}
    try:
        for _ in range(rounds):
            for name, make in settings.items():
                exporters = [timed_export(e, data[name]["export"]) for e in make()]
                monitor = PrivacyMonitor(delta=1e-5, target_epsilon=8.0, exporters=exporters,
                                         session_id="bench", progress_bar=False)
                timer = Timed(monitor)
                pl.Trainer(max_epochs=1, callbacks=[monitor, timer], logger=False,
                           enable_progress_bar=False, enable_checkpointing=False,
                           enable_model_summary=False).fit(DPModel(n=samples, batch_size=16))
                data[name]["step"] += timer.gaps
                data[name]["hook"] += timer.hook
                for exporter in exporters:
                    counts[name][0] += getattr(exporter, "written", 0)
                    counts[name][1] += exporter.dropped
    finally:
        server.stop()
    base = statistics.median(data["monitor, no exporter (baseline)"]["step"])
    rows = [{"setting": name, "steps": len(d["hook"]),
             "step_ms": statistics.median(d["step"]) / 1e6,
             "step_ratio": statistics.median(d["step"]) / base,
             "hook_us": statistics.median(d["hook"]) / 1e3,
             "export_us": statistics.median(d["export"]) / 1e3 if d["export"] else None,
             "written": counts[name][0], "dropped": counts[name][1]}
            for name, d in data.items()]
    print(f"\n{rounds} round(s) of {samples // 16}-step fits, batch 16\n")
    print("| setting | steps | median step (ms) | step ratio | monitor hook µs | export() µs "
          "| points written / dropped |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        export = "-" if r["export_us"] is None else f"{r['export_us']:.1f}"
        print(f"| {r['setting']} | {r['steps']} | {r['step_ms']:.2f} | {r['step_ratio']:.3f} "
              f"| {r['hook_us']:.1f} | {export} | {r['written']} / {r['dropped']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
