"""Function calls per step: the monitor's work counted, not timed.

    python benchmarks/bench_work_per_step.py
    python benchmarks/bench_work_per_step.py --baseline /tmp/before   # another tree beside it

On a shared machine whose speed drifts by tens of percent between fits, a change of a few
microseconds a step cannot be timed; the Python function calls it makes can, exactly and the
same on any machine. One 300-step ``tests/dp_models.DPModel`` fit per row (batch 8,
``PrivacyMonitor`` defaults, a target of 1e4 so the budget guard runs, ``PrometheusExporter``),
and the same with ``ScheduledModel`` (sigma x 0.999 every step). Counted with ``cProfile``
(builtins included): the calls made inside the monitor's three per-step hooks on the training
thread, and every call on the publisher thread (snapshot build, device statistics, exporters),
per optimizer step. The training thread's work inside the optimizer step (the mechanism
metrics' wrapped clipping and noise) is not in either count. Each row is counted on the second
of two fits in the process: the first computes the exact RDP vectors the process then keeps
(timing-dependent work; ``bench_fit_cost.py`` measures that first fit).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import logging
import pstats
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import privacy_callbacks  # noqa: E402
from bench_step_cost import HOOKS, _load_baseline  # noqa: E402
from dp_models import DPModel, ScheduledModel  # noqa: E402

STEPS = 300


def _calls(profile: cProfile.Profile) -> int:
    stats: Any = pstats.Stats(profile)
    return sum(entry[1] for entry in stats.stats.values())


def count(package: Any, model_cls: type[DPModel]) -> tuple[float, float]:
    """(calls per step in the per-step hooks, calls per step on the publisher thread)."""
    hooks, publisher = cProfile.Profile(), cProfile.Profile()
    publisher_cls = importlib.import_module(f"{package.__name__}.publisher").Publisher
    run = publisher_cls._run

    def profiled_run(self: Any) -> None:
        publisher.enable()
        try:
            run(self)
        finally:
            publisher.disable()

    publisher_cls._run = profiled_run
    try:
        monitor = package.PrivacyMonitor(1e-5, target_epsilon=1e4, progress_bar=False,
                                         exporters=[package.PrometheusExporter(port=0)])
        for name in HOOKS:
            hook = getattr(monitor, name)

            def profiled(*args: Any, _hook: Any = hook) -> None:
                hooks.enable()
                try:
                    _hook(*args)
                finally:
                    hooks.disable()

            setattr(monitor, name, profiled)
        trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu")
        trainer.fit(model_cls(n=8 * STEPS, batch_size=8, accountant="rdp"))
        steps = monitor.last_snapshot.steps
    finally:
        publisher_cls._run = run
    # profiled_run's own disable() is one call; the hook wrappers' enable/disable are not
    # counted by the profiler they switch.
    return _calls(hooks) / steps, (_calls(publisher) - 1) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path,
                        help="the root of another tree of the package, counted the same way")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    packages = [("this tree", privacy_callbacks)]
    if args.baseline is not None:
        packages.append((f"baseline {args.baseline}", _load_baseline(args.baseline.resolve())))
    print(f"{STEPS}-step fits, calls per optimizer step (cProfile, builtins included)\n")
    print("| package | sigma | per-step hooks (training thread) | publisher thread |")
    print("|---|---|---:|---:|")
    for label, package in packages:
        for sigma, model_cls in (("constant", DPModel), ("x 0.999 every step", ScheduledModel)):
            count(package, model_cls)  # warm-up: a process's first fit computes its vectors
            in_hooks, on_publisher = count(package, model_cls)
            print(f"| {label} | {sigma} | {in_hooks:.1f} | {on_publisher:.1f} |")


if __name__ == "__main__":
    main()
