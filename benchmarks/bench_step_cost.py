"""What the monitor costs the training thread per step, for every accountant.

    python benchmarks/bench_step_cost.py                 # 5 rounds x 300-step fits per row
    python benchmarks/bench_step_cost.py --quick --json /tmp/sc.json
    python benchmarks/bench_step_cost.py --baseline /tmp/before   # side by side with a tree

A tiny Opacus-wired MLP (``tests/dp_models.DPModel``: batch 8, one torch thread, a 1-2 ms DP
step on a small CPU) is fitted with Lightning's own loop, rows rotated in every round:

- ``dp``: no monitor (a timing callback only, present in every row).
- ``floor``: not a monitor but the least one with a budget guard does per step (read sigma,
  the rate the step is charged at and the accountant's history, compare them with a kept
  credit, append one record), timed the same way: the floor the monitor's hooks are compared
  with on this machine.
- ``monitor <accountant>``: ``PrivacyMonitor`` with its defaults, a target epsilon and an
  in-process ``PrometheusExporter`` (scraped by nobody), for RDP, PRV and GDP.
- ``monitor rdp schedule``: the same under Opacus' ``ExponentialNoise`` stepped every
  batch (a new sigma every step).
- ``monitor rdp mechanism=False``, ``monitor rdp schedule no target`` (on request,
  ``--rows``): without the mechanism metrics; without a target (so without a budget guard).
- ``<row> [baseline]`` (with ``--baseline DIR``): the same row with another tree of the package
  (``git archive REV | tar -x -C DIR``), in the same rounds: before and after side by side.

Reported per row, after 20 warm-up steps: the gap between consecutive ``on_train_batch_end``
calls (median and mean over rounds of the per-fit median/mean), its difference to ``dp`` of the
same run, the process's CPU time per step (every thread: the training thread, the publisher,
the exporters; steal time excluded, so less sensitive to a busy host than the gaps), the
training thread's own CPU time per step (over ``dp``: the work the monitor adds to that thread,
its hooks, Lightning's calls of them and the mechanism's work inside the optimizer step, waits
for the interpreter lock excluded), and the time spent inside the monitor's own per-step hooks
on the training thread
(``on_train_batch_start``, ``on_before_optimizer_step``, ``on_train_batch_end``; mean, p99 and
max over every step of every round) -- the cost the ``<= 20 us`` target is about -- and the
part of it spent in the accounting (epsilon for the metrics, the guard's checks).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import json
import logging
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from dp_models import DPModel, ScheduledModel  # noqa: E402
from machine import cpu_name  # noqa: E402
from privacy_callbacks import PrivacyMonitor, PrometheusExporter, accounting, probe  # noqa: E402
from privacy_callbacks.ledger import step_progress  # noqa: E402

HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
WARMUP = 20


class _Gap(Callback):
    def __init__(self) -> None:
        self.t: list[float] = []
        self.cpu: list[float] = []
        self.thread: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.t.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.thread.append(time.thread_time())  # the training thread's own CPU time


class _Floor(Callback):
    """The least a per-step monitor with a budget guard does on the training thread.

    Before the optimizer step: sigma, the rate the step will be charged at and the accountant's
    history, compared with a kept credit (as the guard clears most steps); after it: the step,
    the clocks, sigma and C in one record appended to a deque. No thread, no exporter, no
    epsilon, no mechanism metrics -- a reference for the monitor's own hooks, timed the same way.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.optimizer: Any = trainer.optimizers[0]
        self.rate = probe.AccountedRate(self.optimizer)
        engine: Any = pl_module.privacy_engine
        self.accountant = engine.accountant
        self.progress = step_progress(trainer)
        self.records: collections.deque[tuple[Any, ...]] = collections.deque()
        self.credit: tuple[Any, ...] | None = None
        self.last_step = trainer.global_step
        self.t_last: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.t_last is None:
            self.t_last = time.perf_counter()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        sigma, q = float(optimizer.noise_multiplier), self.rate()
        history = self.accountant.history
        n = len(history)
        last = history[n - 1] if n else None
        credit = self.credit
        if not (credit is not None and sigma >= credit[0] and q == credit[1]
                and n == credit[2] and last == credit[3]):
            credit = (sigma, q, n, last)
        same = last is not None and last[0] == sigma and last[1] == q
        self.credit = (credit[0], q, n if same else n + 1,
                       (sigma, q, last[2] + 1 if same and last is not None else 1))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.progress.completed
        if step == self.last_step:
            return
        self.last_step = step
        now, t_last = time.perf_counter(), self.t_last
        history, opt = self.accountant.history, self.optimizer
        n = len(history)
        self.records.append((step, time.time_ns(), (history, n, history[n - 1]),
                             float(opt.noise_multiplier), float(opt.max_grad_norm),
                             None if t_last is None else now - t_last))
        self.t_last = now


# Time spent computing epsilon (any accounting method) on the training thread, this step.
_EPS = [0.0, 0]  # seconds, nesting depth
_ACCOUNTING_METHODS = ("update", "view", "epsilon_after", "steps_until", "exhaustion_steps",
                       "exhaustion_cached", "forecast", "rdp_after", "settle", "fits", "credit",
                       "keep_bound_current")


# Another tree of the package (``--baseline``), imported under another name: its rows end in
# " [baseline]" and run in the same rounds, so before and after are compared side by side.
_BASELINE: Any = None


def _load_baseline(root: Path) -> Any:
    """``root``'s ``privacy_callbacks`` as the package ``privacy_callbacks_baseline`` (it imports
    its own modules relatively)."""
    init = root / "privacy_callbacks" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline {root}: no privacy_callbacks/__init__.py there; give the "
                         "root of an unpacked tree (git archive REV | tar -x -C DIR)")
    spec = importlib.util.spec_from_file_location(
        "privacy_callbacks_baseline", init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    importlib.import_module(f"{spec.name}.accounting")
    return module


def _time_accounting(acc: Any) -> Callable[[], None]:
    """Wrap every accounting method: time on the training thread goes to ``_EPS``. Returns
    what puts the methods back."""
    main, clock = threading.main_thread(), time.perf_counter
    wrapped: list[tuple[type, str, Any]] = []
    for cls in (acc.Accounting, acc.RdpAccounting, acc.BackgroundAccounting):
        for name in _ACCOUNTING_METHODS:
            if name not in vars(cls):
                continue
            method = vars(cls)[name]
            wrapped.append((cls, name, method))

            def timed(self: Any, *args: Any, _method: Callable[..., Any] = method,
                      **kwargs: Any) -> Any:
                if threading.current_thread() is not main:
                    return _method(self, *args, **kwargs)
                _EPS[1] += 1
                t = clock()
                try:
                    return _method(self, *args, **kwargs)
                finally:
                    _EPS[1] -= 1
                    if not _EPS[1]:
                        _EPS[0] += clock() - t

            setattr(cls, name, timed)

    def restore() -> None:
        for cls, name, method in wrapped:
            setattr(cls, name, method)

    return restore


def _timed(monitor: Callback, into: list[float], eps_into: list[float]) -> None:
    """Wrap the monitor's per-step hooks: their time per batch goes to ``into``, the epsilon
    part of it to ``eps_into``."""
    clock = time.perf_counter
    acc = [0.0]
    for name in HOOKS:
        hook = getattr(monitor, name)

        def timed(*args: Any, _hook: Callable[..., Any] = hook, _name: str = name) -> None:
            t = clock()
            _hook(*args)
            acc[0] += clock() - t
            if _name == "on_train_batch_end":
                into.append(acc[0])
                eps_into.append(_EPS[0])
                acc[0] = _EPS[0] = 0.0

        setattr(monitor, name, timed)


def _fit(row: str, steps: int) -> tuple[list[float], list[float], list[float], float, float]:
    gap, hook_times, eps_times = _Gap(), [], []
    callbacks: list[Callback] = []
    accountant = "rdp"
    model_cls: type[DPModel] = DPModel
    if row == "floor":
        floor = _Floor()
        _timed(floor, hook_times, eps_times)
        callbacks.append(floor)
    elif row != "dp":
        accountant = row.split()[1]
        if "schedule" in row:
            model_cls = ScheduledModel
        package = _BASELINE if row.endswith("[baseline]") else None
        monitor_cls = PrivacyMonitor if package is None else package.PrivacyMonitor
        exporter_cls = PrometheusExporter if package is None else package.PrometheusExporter
        monitor = monitor_cls(1e-5, target_epsilon=None if "no target" in row else 1e4,
                              progress_bar=False, exporters=[exporter_cls(port=0)],
                              mechanism="mechanism=False" not in row)
        _timed(monitor, hook_times, eps_times)
        callbacks.append(monitor)
    model = model_cls(n=8 * steps, batch_size=8, accountant=accountant)
    trainer = pl.Trainer(max_epochs=1, callbacks=[*callbacks, gap], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(model)
    if callbacks and not isinstance(callbacks[0], _Floor):
        # A monitor that did nothing would look free: it must have published the accountant's
        # own epsilon for the last step before fit returned.
        fitted: Any = callbacks[0]
        last, expected = fitted.last_snapshot, model.privacy_engine.get_epsilon(1e-5)
        if last is None or (last.step, last.epsilon) != (steps, expected):
            raise RuntimeError(f"row {row}: the monitor's last snapshot is "
                               f"{last and (last.step, last.epsilon)}, not {(steps, expected)}")
    t, cpu, thread = gap.t[WARMUP:], gap.cpu[WARMUP:], gap.thread[WARMUP:]
    return ([b - a for a, b in zip(t, t[1:])], hook_times[WARMUP:], eps_times[WARMUP:],
            (cpu[-1] - cpu[0]) / (len(cpu) - 1), (thread[-1] - thread[0]) / (len(thread) - 1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 60 steps")
    parser.add_argument("--rows", default="dp,floor,monitor rdp,monitor prv,monitor gdp,"
                        "monitor rdp schedule")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--baseline", type=Path,
                        help="the root of another tree of the package (say, the last release "
                        "unpacked with git archive): each monitor row also runs with it, as "
                        "'<row> [baseline]', in the same rounds")
    args = parser.parse_args(argv)
    rounds, steps = (2, 60) if args.quick else (args.rounds, args.steps)
    rows = args.rows.split(",")
    for row in rows:
        words = row.split()
        if row not in ("dp", "floor") and not (
                len(words) >= 2 and words[0] == "monitor" and words[1] in ("rdp", "prv", "gdp")
                and " ".join(words[2:]) in ("", "schedule", "schedule no target",
                                            "mechanism=False", "no target")):
            raise SystemExit(f"Unexpected row in --rows: {row!r}; use dp, floor or 'monitor "
                             "<rdp|prv|gdp>' optionally followed by 'schedule', "
                             "'schedule no target', 'no target' or 'mechanism=False'")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    global _BASELINE
    restore = [_time_accounting(accounting)]
    if args.baseline is not None:
        _BASELINE = _load_baseline(args.baseline.resolve())
        restore.append(_time_accounting(_BASELINE.accounting))
        rows = [r for row in rows
                for r in ((row,) if row in ("dp", "floor") else (row, f"{row} [baseline]"))]
    try:
        return _run(args, rows, rounds, steps)
    finally:
        for put_back in restore:
            put_back()


def _run(args: argparse.Namespace, rows: list[str], rounds: int, steps: int) -> dict[str, Any]:
    gaps: dict[str, list[tuple[float, float]]] = {r: [] for r in rows}
    hooks: dict[str, list[float]] = {r: [] for r in rows}
    eps: dict[str, list[float]] = {r: [] for r in rows}
    cpu: dict[str, list[float]] = {r: [] for r in rows}
    thread: dict[str, list[float]] = {r: [] for r in rows}
    for k in range(rounds):
        for row in rows[k % len(rows):] + rows[:k % len(rows)]:
            g, h, e, c, th = _fit(row, steps)
            cpu[row].append(c)
            thread[row].append(th)
            gaps[row].append((statistics.median(g), statistics.mean(g)))
            hooks[row].extend(h)
            eps[row].extend(e)
    base = rows[0]
    base_med = statistics.median(m for m, _ in gaps[base]) * 1e6
    base_mean = statistics.median(m for _, m in gaps[base]) * 1e6
    base_cpu = statistics.median(cpu[base]) * 1e6
    base_thread = statistics.median(thread[base]) * 1e6
    load = os.getloadavg()
    print(f"{cpu_name()} · torch {torch.__version__} · "
          f"{rounds} rounds x {steps} steps, rows rotated · load average "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} · "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| row | step median µs | over dp | step mean µs | over dp | CPU µs/step | over dp | "
          "training thread CPU µs/step | over dp | "
          "monitor hooks µs mean | p99 | max | of which ε µs mean | p99 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    out: dict[str, Any] = {"rounds": rounds, "steps": steps, "load": load, "rows": {}}
    for row in rows:
        med = statistics.median(m for m, _ in gaps[row]) * 1e6
        mean = statistics.median(m for _, m in gaps[row]) * 1e6
        cpu_us = statistics.median(cpu[row]) * 1e6
        thread_us = statistics.median(thread[row]) * 1e6
        h = sorted(hooks[row])
        hook = ({"mean": statistics.mean(h) * 1e6, "p99": h[int(0.99 * (len(h) - 1))] * 1e6,
                 "max": h[-1] * 1e6} if h else None)
        e = sorted(eps[row])
        eps_us = ({"mean": statistics.mean(e) * 1e6, "p99": e[int(0.99 * (len(e) - 1))] * 1e6}
                  if e else None)
        out["rows"][row] = {"step_median_us": med, "step_mean_us": mean,
                            "over_dp_median_us": med - base_med,
                            "over_dp_mean_us": mean - base_mean, "cpu_us": cpu_us,
                            "over_dp_cpu_us": cpu_us - base_cpu, "thread_cpu_us": thread_us,
                            "over_dp_thread_cpu_us": thread_us - base_thread, "hooks_us": hook,
                            "epsilon_us": eps_us}
        over = "" if row == base else (
            f"+{med - base_med:.0f} ({(med / base_med - 1) * 100:+.1f} %)")
        over_m = "" if row == base else (
            f"+{mean - base_mean:.0f} ({(mean / base_mean - 1) * 100:+.1f} %)")
        hook_cols = (" | | | | |" if hook is None or eps_us is None else
                     f" {hook['mean']:.1f} | {hook['p99']:.1f} | {hook['max']:.0f} |"
                     f" {eps_us['mean']:.1f} | {eps_us['p99']:.1f} |")
        over_c = "" if row == base else (
            f"+{cpu_us - base_cpu:.0f} ({(cpu_us / base_cpu - 1) * 100:+.1f} %)")
        over_t = "" if row == base else f"+{thread_us - base_thread:.0f}"
        print(f"| {row} | {med:.0f} | {over} | {mean:.0f} | {over_m} | {cpu_us:.0f} | {over_c} "
              f"| {thread_us:.0f} | {over_t} |{hook_cols}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
