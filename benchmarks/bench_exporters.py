"""What the InfluxDB exporter costs the training thread, server up and server down.

    python benchmarks/bench_exporters.py            # 3 rounds of 128-step fits per setting
    python benchmarks/bench_exporters.py --quick    # 1 round of 8-step fits (CI smoke test)

Three settings run in the same process, interleaved round by round, on the same tiny Opacus
model: the monitor without exporters (the baseline), with an InfluxDBExporter writing to a real
VictoriaMetrics (``/api/v2/write``), and with one pointed at a port where nothing listens (an
outage for the whole fit). Per optimizer step it records the step's wall time, the time the
monitor's hook takes on the training thread, and the part of it spent handing the snapshot to the
publisher (the only work the exporter adds there). Ratios are against the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from privacy_callbacks import InfluxDBExporter, PrivacyMonitor  # noqa: E402


class TimedMonitor(PrivacyMonitor):
    """The monitor, timing its per-step hook and the publisher hand-off inside it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hook_ns: list[int] = []
        self.publish_ns: list[int] = []
        self.step_ns: list[int] = []
        self._t_prev: int | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        publisher = self._publisher
        if publisher is None:
            return
        later, times = publisher.publish_later, self.publish_ns

        # The training thread hands each step over with publish_later (the snapshot is built
        # on the publisher thread).
        def timed(build: Any, record: Any) -> None:
            t0 = time.perf_counter_ns()
            later(build, record)
            times.append(time.perf_counter_ns() - t0)
        publisher.publish_later = timed  # type: ignore[method-assign]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        t0 = time.perf_counter_ns()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        t1 = time.perf_counter_ns()
        self.hook_ns.append(t1 - t0)
        if self._t_prev is not None:
            self.step_ns.append(t1 - self._t_prev)
        self._t_prev = t1


def run_fit(exporters: list, samples: int) -> TimedMonitor:
    monitor = TimedMonitor(delta=1e-5, target_epsilon=8.0, exporters=exporters,
                           session_id="bench", progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=1, callbacks=[monitor], logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False).fit(
            DPModel(n=samples, batch_size=16))
    return monitor


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 8-step fits")
    parser.add_argument("--rounds", type=int, help="rounds per setting (default 3, quick 1)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    samples = 128 if args.quick else 2048

    server = victoria_metrics().start()
    dead = f"http://127.0.0.1:{free_port()}"
    settings = {
        "monitor, no exporter (baseline)": lambda: [],
        "+ InfluxDBExporter, server up": lambda: [
            InfluxDBExporter(server.url, org="bench", bucket="bench")],
        # close_timeout only shortens the end of each fit; it costs nothing per step.
        "+ InfluxDBExporter, server down": lambda: [
            InfluxDBExporter(dead, org="bench", bucket="bench", close_timeout=1.0)],
    }
    samples_by: dict[str, dict[str, list[int]]] = {
        name: {"step": [], "hook": [], "publish": []} for name in settings}
    counts: dict[str, list[int]] = {name: [0, 0] for name in settings}
    try:
        run_fit([], 64)  # warm-up: imports, first-call costs
        for _ in range(rounds):
            for name, make in settings.items():
                exporters = make()
                monitor = run_fit(exporters, samples)
                samples_by[name]["step"] += monitor.step_ns
                samples_by[name]["hook"] += monitor.hook_ns
                samples_by[name]["publish"] += monitor.publish_ns
                for exporter in exporters:
                    counts[name][0] += exporter.written
                    counts[name][1] += exporter.dropped
    finally:
        server.stop()

    base = samples_by["monitor, no exporter (baseline)"]
    base_step = statistics.median(base["step"])
    base_hook = statistics.median(base["hook"])
    rows = []
    for name, data in samples_by.items():
        step, hook = statistics.median(data["step"]), statistics.median(data["hook"])
        rows.append({
            "setting": name, "steps": len(data["hook"]),
            "step_ms": step / 1e6, "step_ratio": step / base_step,
            "hook_us": hook / 1e3, "hook_ratio": hook / base_hook,
            "publish_us": statistics.median(data["publish"]) / 1e3,
            "publish_p99_us": sorted(data["publish"])[int(0.99 * (len(data["publish"]) - 1))] / 1e3,
            "written": counts[name][0], "dropped": counts[name][1]})

    print(f"\nInfluxDB exporter on the training thread: {rounds} round(s), {samples} samples, "
          f"batch 16; Python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| setting | steps | median step (ms) | step ratio | monitor hook (µs) | hook ratio "
          "| publish median / p99 (µs) | points written / dropped |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['steps']} | {r['step_ms']:.2f} | {r['step_ratio']:.3f} "
              f"| {r['hook_us']:.1f} | {r['hook_ratio']:.3f} | {r['publish_us']:.1f} / "
              f"{r['publish_p99_us']:.1f} | {r['written']} / {r['dropped']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
