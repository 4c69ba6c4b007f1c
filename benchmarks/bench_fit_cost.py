"""Fixed cost per fit: what PrivacyMonitor adds to a short ``trainer.fit``, and where.

    python benchmarks/bench_fit_cost.py                 # 20 rounds of 20-step fits (about a minute)
    python benchmarks/bench_fit_cost.py --quick --json out.json   # smoke test

Rows, fitted round by round in one process (the order rotates every round), each on a fresh
``tests/dp_models.DPModel`` (batch 8, ``--steps`` optimizer steps, one epoch, one torch thread,
no logger, no checkpointing, no progress bar):

- ``none``: no monitor;
- ``monitor``: ``PrivacyMonitor(1e-5, target_epsilon=...)`` with its defaults, no exporter;
- ``monitor+prometheus``: the same plus ``PrometheusExporter(port=0)`` (start, serve, close);
- ``monitor+prometheus, cold``: the same as the first fit of a process, for the monitor: the
  process-wide cache of exact RDP vectors is emptied first, so the fit computes its (sigma, q)
  vector with Opacus' ``compute_rdp`` (15-70 ms) as a fresh process does. (Lightning's and
  torch's own first-fit warm-up is not repeated: it is the same with or without the monitor.)

Reported: the median wall time of the whole ``trainer.fit`` per row, the extra over ``none``
(difference of medians, and median of the differences within a round), and for the monitor rows
the median time spent inside each lifecycle hook (setup, on_fit_start, on_train_start,
on_train_end, on_fit_end, teardown), timed by wrapping the hooks on the instance. The per-step
hooks are summed (``steps``), and the first optimizer step's ``on_train_batch_end`` shown on its
own (``first step``): it pays for what a fit sets up on first use. Each monitor fit also checks
that the exact final epsilon was published before fit returned and that no thread of the monitor
outlived the fit.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import opacus  # noqa: E402
import torch  # noqa: E402

from dp_models import DPModel  # noqa: E402
from machine import cpu_name  # noqa: E402
from privacy_callbacks import PrivacyMonitor, PrometheusExporter, accounting  # noqa: E402

ROWS = ("none", "monitor", "monitor+prometheus", "monitor+prometheus, cold")
HOOKS = ("setup", "on_fit_start", "on_train_start", "on_train_end", "on_fit_end", "teardown")
STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_optimizer_step",
              "on_train_epoch_start")
DELTA = 1e-5
TARGET = 50.0
BATCH = 8


class HookClock:
    """Wall time spent inside each hook of one callback, by wrapping its bound methods."""

    def __init__(self, callback: pl.Callback) -> None:
        self.seconds: dict[str, float] = {name: 0.0 for name in (*HOOKS, "steps", "first step")}
        self._first = True
        for name in HOOKS:
            setattr(callback, name, self._wrap(name, getattr(callback, name)))
        for name in STEP_HOOKS:
            setattr(callback, name, self._wrap("steps", getattr(callback, name)))

    def _wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        first = fn.__name__ == "on_train_batch_end"

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                if first and self._first:
                    self._first = False
                    self.seconds["first step"] += took
                else:
                    self.seconds[key] += took

        return timed


def _ours_alive() -> list[str]:
    """Threads of the monitor (and of the servers it starts) still running."""
    return sorted(t.name for t in threading.enumerate() if t.is_alive() and (
        t.name.startswith("privacy-") or "serve_forever" in repr(getattr(t, "_target", ""))))


def fit_once(row: str, steps: int, accountant: str = "rdp") -> dict[str, Any]:
    """One fit of ``row``: its wall time, hook times and what the monitor left behind."""
    model = DPModel(n=BATCH * steps, batch_size=BATCH, accountant=accountant)
    callbacks: list[pl.Callback] = []
    monitor = clock = exporter = None
    if row != "none":
        exporter = PrometheusExporter(port=0) if "prometheus" in row else None
        monitor = PrivacyMonitor(DELTA, target_epsilon=TARGET,
                                 exporters=[exporter] if exporter is not None else [])
        clock = HookClock(monitor)
        callbacks.append(monitor)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=callbacks)
    before = set(_ours_alive())
    shared = getattr(accounting, "_SHARED", None)  # absent in versions without one: all cold
    if row.endswith("cold") and shared is not None:
        shared.clear()
    gc.collect()
    t0 = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"fit_s": seconds, "steps": trainer.global_step}
    if monitor is not None and clock is not None:
        result["hooks_s"] = dict(clock.seconds)
        result["threads_left"] = sorted(set(_ours_alive()) - before)
        exact = model.privacy_engine.accountant.get_epsilon(DELTA)
        snap = monitor.last_snapshot
        result["final_exact"] = bool(
            snap is not None and snap.epsilon_exact and snap.epsilon == exact
            and snap.steps == trainer.global_step)
        if exporter is not None:
            served = exporter._collector.state[1]  # what /metrics served last
            result["final_exact"] = result["final_exact"] and served is not None and (
                served.epsilon == exact and bool(served.epsilon_exact))
        result["epsilon"] = exact
    return result


def summarise(fits: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    none = [f["fit_s"] for f in fits["none"]]
    base = statistics.median(none)
    rows = []
    for row in ROWS:
        runs = fits[row]
        times = [f["fit_s"] for f in runs]
        med = statistics.median(times)
        entry: dict[str, Any] = {
            "row": row, "fit_ms": 1e3 * med, "fit_ms_runs": [1e3 * t for t in times],
            "extra_ms": 1e3 * (med - base),
            # The same round's fits ran back to back: their difference sees the same load.
            "extra_ms_paired": 1e3 * statistics.median(t - n for t, n in zip(times, none)),
            "steps": runs[0]["steps"]}
        if row != "none":
            entry["hooks_ms"] = {name: 1e3 * statistics.median(f["hooks_s"][name] for f in runs)
                                 for name in runs[0]["hooks_s"]}
            entry["lifecycle_ms"] = 1e3 * statistics.median(
                sum(f["hooks_s"][name] for name in HOOKS) for f in runs)
            entry["threads_left"] = sorted({t for f in runs for t in f["threads_left"]})
            entry["final_exact"] = all(f["final_exact"] for f in runs)
            entry["epsilon"] = runs[-1]["epsilon"]
        rows.append(entry)
    return rows


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} / {five:.2f} (1 / 5 min)"


def environment() -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "opacus": opacus.__version__,
        "lightning": lightning.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = [f"{env['cpu']} · {env['cpu_threads']} torch thread · torch {env['torch']} · Opacus "
             f"{env['opacus']} · Lightning {env['lightning']} · {settings['accountant']} "
             f"accountant · {settings['rounds']} rounds × "
             f"{settings['steps']}-step fits · load before {settings['load_before']}, after "
             f"{settings['load_after']} · {env['date']}",
             "",
             "| row | fit ms (median) | min–max ms | extra over none ms | same-round extra ms |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['fit_ms']:.1f} | {min(r['fit_ms_runs']):.1f}–"
                     f"{max(r['fit_ms_runs']):.1f} | {r['extra_ms']:+.1f} | "
                     f"{r['extra_ms_paired']:+.1f} |")
    monitored = [r for r in rows if "hooks_ms" in r]
    names = list(monitored[0]["hooks_ms"]) if monitored else []
    lines += ["", "Time inside the monitor's hooks, ms (median per fit):", "",
              "| row | " + " | ".join(names) + " | lifecycle sum | final ε exact | threads left |",
              "|---|" + "---:|" * (len(names) + 1) + "---|---|"]
    for r in monitored:
        lines.append(f"| {r['row']} | " + " | ".join(f"{r['hooks_ms'][n]:.1f}" for n in names)
                     + f" | {r['lifecycle_ms']:.1f} | {'yes' if r['final_exact'] else 'NO'} | "
                     f"{', '.join(r['threads_left']) or 'none'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="rounds (each fits every row)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--accountant", choices=("rdp", "prv", "gdp"), default="rdp",
                        help="the Opacus accountant of every fit")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3-step fits")
    parser.add_argument("--json", type=Path, help="write environment, settings and rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 3, 1
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"Unexpected value for --{name}: {getattr(args, name)}; use 1 or more")
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    settings: dict[str, Any] = {
        "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "batch": BATCH,
        "accountant": args.accountant,
        "delta": DELTA, "target_epsilon": TARGET, "load_before": _load(),
        "command": " ".join(["python benchmarks/bench_fit_cost.py",
                             *(sys.argv[1:] if argv is None else argv)])}
    for i in range(args.warmup * len(ROWS)):
        fit_once(ROWS[i % len(ROWS)], args.steps, args.accountant)
    fits: dict[str, list[dict[str, Any]]] = {row: [] for row in ROWS}
    for rnd in range(args.rounds):
        for i in range(len(ROWS)):
            row = ROWS[(rnd + i) % len(ROWS)]
            fits[row].append(fit_once(row, args.steps, args.accountant))
    settings["load_after"] = _load()
    env = environment()
    rows = summarise(fits)
    report = {"environment": env, "settings": settings, "rows": rows}
    print(markdown(rows, env, settings))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
