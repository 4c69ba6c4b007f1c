"""Accounting: how fast, how fresh, and how many steps the guard lets training take.

    python benchmarks/bench_accounting.py                  # all three parts (a few minutes)
    python benchmarks/bench_accounting.py --quick          # RDP speed and an RDP guard row only
    python benchmarks/bench_accounting.py --guard --baseline /tmp/before   # beside another tree

1. **Speed**: epsilon per step as the publisher computes it (``Accounting.epsilon(view)`` after
   one more accountant step) beside Opacus' ``get_epsilon``, in one process, interleaved; RDP's
   values must be identical.
2. **Freshness** (PRV, GDP): steps at a fixed cadence, one ``epsilon(view)`` each as the monitor
   does; per step, what was published for it by the next step (exact, or a bound, and how far
   above Opacus' value), and how long after the last step its exact value was known.
3. **Guard**: a tiny DP fit (sigma 1, q 1/16: batch 32 of 512, 6 epochs planned) with
   ``PrivacyMonitor(target_epsilon=...)`` for RDP, PRV and GDP at targets 1, 3 and 8: the steps
   the guard released beside the steps the accountant allows (the last k with ``get_epsilon``
   within the target). ``--baseline DIR`` adds the same fits with another tree of the package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import lightning.pytorch as pl  # noqa: E402
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant  # noqa: E402

from dp_models import DPModel  # noqa: E402
from privacy_callbacks import PrivacyMonitor  # noqa: E402
from privacy_callbacks.accounting import Accounting  # noqa: E402

DELTA = 1e-5
CLASSES = {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant}


def _accountant(mechanism: str, history: list) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = CLASSES[mechanism]()
    accountant.history = list(history)
    return accountant


def speed(mechanism: str, steps: int, segments: int, reps: int, opacus_reps: int) -> dict:
    per, extra = divmod(steps, segments)
    accountant = _accountant(mechanism, [(0.8 + 0.01 * i, 0.01, per + (i < extra))
                                         for i in range(segments)])
    ours = Accounting(accountant, DELTA)
    ours.prepare(*accountant.history[-1][:2])
    ours_ns, theirs_ns = [], []
    try:
        for i in range(max(reps, opacus_reps)):
            if i < reps:
                sigma, q, _ = accountant.history[-1]
                accountant.step(noise_multiplier=sigma, sample_rate=q)
                view = ours.view()
                t0 = time.perf_counter_ns()
                ours.epsilon(view)
                ours_ns.append(time.perf_counter_ns() - t0)
            if i < opacus_reps:
                t0 = time.perf_counter_ns()
                theirs = accountant.get_epsilon(DELTA)
                theirs_ns.append(time.perf_counter_ns() - t0)
        settled = ours.settle(timeout=600)
        theirs = accountant.get_epsilon(DELTA)
    finally:
        ours.close()
    ours_ns.sort()
    median = statistics.median(ours_ns) / 1e3
    opacus = statistics.median(theirs_ns) / 1e3
    return {"accountant": mechanism, "steps": steps, "segments": segments, "ours_us": median,
            "ours_mean_us": statistics.mean(ours_ns) / 1e3,
            "ours_p99_us": ours_ns[int(0.99 * (len(ours_ns) - 1))] / 1e3, "opacus_us": opacus,
            "speedup": opacus / median, "identical": settled and ours.latest.value == theirs}


def freshness(mechanism: str, cadence: float, steps: int) -> dict:
    accountant = _accountant(mechanism, [])
    ours = Accounting(accountant, DELTA)
    ours.prepare(1.0, 0.01)
    published: list[tuple[int, float, bool]] = []
    try:
        for _ in range(steps):
            accountant.step(noise_multiplier=1.0, sample_rate=0.01)
            ours.epsilon(ours.view())
            time.sleep(cadence)
            latest = ours.latest
            assert latest is not None
            published.append((latest.step, latest.value, latest.exact))
        started = time.monotonic()
        ours.settle(timeout=60)
        settle_s = time.monotonic() - started
    finally:
        ours.close()
    checked = published[::max(1, steps // 25)]
    gaps = [value / _accountant(mechanism, [(1.0, 0.01, step)]).get_epsilon(DELTA) - 1
            for step, value, _ in checked]
    return {"accountant": mechanism, "cadence_ms": 1e3 * cadence, "steps": steps,
            "exact_share": sum(exact for _, _, exact in published) / steps,
            "mean_gap": statistics.mean(gaps), "min_gap": min(gaps), "settle_s": settle_s}


def _baseline(root: Path) -> Any:
    init = root / "privacy_callbacks" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline {root}: no privacy_callbacks/__init__.py there")
    spec = importlib.util.spec_from_file_location(
        "privacy_callbacks_baseline", init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def guard(mechanism: str, target: float, package: Any = None) -> dict:
    model = DPModel(accountant=mechanism, n=512, batch_size=32)
    monitor = (package.PrivacyMonitor if package is not None else PrivacyMonitor)(
        DELTA, target_epsilon=target, progress_bar=False)
    started = time.monotonic()
    pl.Trainer(max_epochs=6, callbacks=[monitor], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(model)
    released = sum(s for _, _, s in model.privacy_engine.accountant.history)
    allowed = 0  # at most the 96 planned
    while allowed < 96 and _accountant(mechanism, [(1.0, 1 / 16, allowed + 1)]).get_epsilon(
            DELTA) <= target:
        allowed += 1
    return {"accountant": mechanism, "target": target, "tree": "baseline" if package else "this",
            "released": released, "allowed": allowed, "fit_s": time.monotonic() - started,
            "epsilon": model.privacy_engine.accountant.get_epsilon(DELTA) if released else 0.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--guard", action="store_true", help="part 3 only")
    parser.add_argument("--baseline", type=Path, help="part 3 also with this tree")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    previous = logging.root.manager.disable  # main() also runs inside test processes
    logging.disable(logging.WARNING)
    try:
        out = _measure(args)
    finally:  # the caller's logging stays as it was
        logging.disable(previous)
    print(table(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"speed": [], "freshness": [], "guard": []}
    if not args.guard:
        grid = [("rdp", 100, 1), ("rdp", 100, 10)] if args.quick else [
            (m, s, g) for m in ("rdp", "prv", "gdp") for s, g in ((100, 1), (10_000, 1),
                                                                   (10_000, 10))
            if not (m == "gdp" and g > 1)]
        out["speed"] = [speed(m, s, g, reps=500, opacus_reps=3 if m == "prv" else 10)
                        for m, s, g in grid]
        if not args.quick:
            out["freshness"] = [freshness(m, c, 300) for m in ("prv", "gdp") for c in (0.02,)]
    package = None if args.baseline is None else _baseline(args.baseline.resolve())
    cases = [("rdp", 3.0)] if args.quick else [(m, t) for m in ("rdp", "prv", "gdp")
                                               for t in (1.0, 3.0, 8.0)]
    for mechanism, target in cases:
        out["guard"].append(guard(mechanism, target))
        if package is not None:
            out["guard"].append(guard(mechanism, target, package))
    return out


def table(out: dict[str, Any]) -> str:
    lines = []
    if out["speed"]:
        lines += ["| accountant | steps | segments | ours µs median | mean | p99 | Opacus "
                  "get_epsilon µs | speed-up | identical ε |", "|---|---:|---:|---:|---:|---:|"
                  "---:|---:|---|"]
        lines += [f"| {r['accountant']} | {r['steps']} | {r['segments']} | {r['ours_us']:.1f} | "
                  f"{r['ours_mean_us']:.1f} | {r['ours_p99_us']:.1f} | {r['opacus_us']:.0f} | "
                  f"{r['speedup']:.0f}× | {'yes' if r['identical'] else 'NO'} |"
                  for r in out["speed"]] + [""]
    if out["freshness"]:
        lines += ["| accountant | cadence | steps | published exact by the next step | mean over "
                  "Opacus | least | exact final after | ", "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['accountant']} | {r['cadence_ms']:.0f} ms | {r['steps']} | "
                  f"{100 * r['exact_share']:.0f} % | {100 * r['mean_gap']:+.2f} % | "
                  f"{100 * r['min_gap']:+.2f} % | {r['settle_s']:.2f} s |"
                  for r in out["freshness"]] + [""]
    lines += ["| accountant | target | tree | steps released | steps the accountant allows | "
              "ε after the fit | fit s |", "|---|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['accountant']} | {r['target']:g} | {r['tree']} | {r['released']} | "
              f"{r['allowed']} | {r['epsilon']:.3f} | {r['fit_s']:.1f} |" for r in out["guard"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
