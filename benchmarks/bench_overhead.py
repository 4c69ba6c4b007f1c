"""What privacy monitoring costs a training step: the benchmark to run.

    python benchmarks/bench_overhead.py                 # CPU: tiny encoder, then the hooks
    python benchmarks/bench_overhead.py --mode gpu      # MiniLM-size and BERT-base-size encoders
    python benchmarks/bench_overhead.py --hooks-only --baseline /tmp/before  # beside a tree

Part 1, the overhead table. Rows, all on the same model (same initial weights), the same
batches and the same loop:

- ``plain``: no DP.
- ``dp``: Opacus DP-SGD through the ``DifferentialPrivacy`` callback (fixed batches, no Poisson
  sampling, so every row does the same work), nothing else.
- ``dp+naive``: what people write by hand: ``privacy_engine.get_epsilon(delta)`` and
  ``loss.item()`` after every step.
- ``dp+monitor``: ``PrivacyMonitor`` with its defaults, a target epsilon (so the budget guard)
  and an in-process ``PrometheusExporter`` serving /metrics.
- ``dp+monitor+mechanism``: the same plus ``MechanismMetrics`` (device-side reductions each
  measured step: asynchronous kernel launches on a GPU, real work on a CPU).

The loop is Lightning's own (``Trainer.fit``) for every row, so the monitor runs exactly as users
run it. Each repetition fits every row once, rows rotated, each for ``--warmup`` untimed steps and
``--steps`` timed ones; the timed block is bracketed by a device synchronisation (on GPU) at both
ends only, so asynchronous execution is not disturbed inside it. Reported: the median over
repetitions of the mean step time, and ratios of medians. Every fit is checked to have done
what it is timed for (Opacus accounted each step; a monitor published the accountant's own
epsilon for the last step before ``fit`` returned); a fit that did not stops the benchmark.
Embeddings are frozen (as in ``examples/finetune_dp.py``); every encoder layer and the head are
trained.

Part 2 (CPU), the hooks beside their floor: a tiny Opacus-wired MLP (a 1-2 ms DP step, one torch
thread) fitted with Lightning's loop, rows rotated in every round: ``dp`` (no monitor), ``floor``
(not a monitor: the least one with a budget guard reads per step -- sigma, the rate the step is
charged, the accountant's history, one record -- in one callback, timed the same way),
``monitor <rdp|prv|gdp>`` (defaults, a target, an in-process Prometheus endpoint) and ``monitor
rdp schedule`` (Opacus' ``ExponentialNoise`` every batch). Per row: the step time (median and
mean over rounds of per-fit medians/means) over ``dp``, and the time inside the monitor's own
per-step hooks (mean, p99, max). ``--baseline DIR`` also runs each monitor row with another tree
of the package (``git archive REV | tar -x -C DIR``) in the same rounds.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

# The model comes from the example, the MLP from the tests; by path, as other packages install
# top-level `examples` and `tests`.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import opacus  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dp_models import DPModel, ScheduledModel  # noqa: E402
from finetune_dp import DPTextClassifier, freeze_for_dp  # noqa: E402
from privacy_callbacks import (DifferentialPrivacy, MechanismMetrics,  # noqa: E402
                               PrivacyMonitor, PrometheusExporter)
from privacy_callbacks.opacus_compat import ChargedRate  # noqa: E402

ROWS = ("plain", "dp", "dp+naive", "dp+monitor", "dp+monitor+mechanism")
DELTA = 1e-5
CONFIGS: dict[str, dict[str, int]] = {
    "tiny": dict(layers=2, hidden=32, heads=2, intermediate=64, seq=16, batch=8),
    "minilm-b32": dict(layers=6, hidden=384, heads=12, intermediate=1536, seq=128, batch=32),
    "minilm-b128": dict(layers=6, hidden=384, heads=12, intermediate=1536, seq=128, batch=128),
    "bert-base-b32": dict(layers=12, hidden=768, heads=12, intermediate=3072, seq=128, batch=32),
}
MODES = {"cpu": ("tiny",), "gpu": ("minilm-b32", "minilm-b128", "bert-base-b32")}


class NaiveEpsilon(pl.Callback):
    """The hand-written way: ask Opacus for epsilon and read the loss on every step."""

    def __init__(self, delta: float, engine: Any) -> None:
        self.delta, self.engine = delta, engine
        self.last: tuple[float, float] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        epsilon = self.engine.get_epsilon(self.delta)
        self.last = (epsilon, outputs["loss"].item())


class BlockTimer(pl.Callback):
    """Wall time of the steps after ``warmup``; must be the trainer's last callback."""

    def __init__(self, warmup: int, last: int, cuda: bool) -> None:
        self.warmup, self.last, self.cuda = warmup, last, cuda
        self.seconds: float | None = None
        self._t0 = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup - 1:
            self._t0 = self._now()
        elif batch_idx == self.last:
            self.seconds = self._now() - self._t0


def build_models(cfg: dict[str, int], seed: int) -> dict[str, DPTextClassifier]:
    """One model per row, all with the same initial weights and the same data."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                        num_attention_heads=cfg["heads"], intermediate_size=cfg["intermediate"],
                        max_position_embeddings=max(512, cfg["seq"]))
    encoder = BertModel(config, add_pooling_layer=False)
    freeze_for_dp(encoder, cfg["layers"])
    return {row: DPTextClassifier(copy.deepcopy(encoder), _data(cfg, seed), None, 2,
                                  batch_size=cfg["batch"])
            for row in ROWS}


def _data(cfg: dict[str, int], seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    n = cfg["batch"] * cfg["batches"]
    ids = torch.randint(1000, 30000, (n, cfg["seq"]), generator=gen)
    lengths = torch.randint(cfg["seq"] // 2, cfg["seq"] + 1, (n, 1), generator=gen)
    mask = (torch.arange(cfg["seq"]).unsqueeze(0) < lengths).long()
    return TensorDataset(ids, mask, torch.randint(0, 2, (n,), generator=gen))


def run_block(model: DPTextClassifier, row: str, accelerator: str, warmup: int, steps: int,
              cuda: bool, accountant: str) -> float:
    """Fit ``row`` for ``warmup + steps`` steps; the mean seconds per timed step."""
    callbacks: list[pl.Callback] = []
    if row != "plain":
        # Fixed batches (no Poisson sampling) so every row times the same work.
        private = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0,
                                      accountant=accountant, poisson_sampling=False)
        callbacks.append(private)
    monitor = None
    if row == "dp+naive":
        callbacks.append(NaiveEpsilon(DELTA, private.privacy_engine))
    elif row.startswith("dp+monitor"):
        monitor = PrivacyMonitor(delta=DELTA, target_epsilon=8.0,
                                 exporters=[PrometheusExporter(port=0)],
                                 session_id="bench", model_name="bench")
        callbacks.append(monitor)
        if row.endswith("+mechanism"):
            callbacks.append(MechanismMetrics())
    timer = BlockTimer(warmup, warmup + steps - 1, cuda)
    callbacks.append(timer)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=1,
                         max_steps=warmup + steps, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks)
    trainer.fit(model)
    if timer.seconds is None:
        raise RuntimeError(f"row {row}: the timed block did not complete")
    if row != "plain":
        check_row(row, private.privacy_engine.accountant, monitor, warmup + steps)
    return timer.seconds / steps


def check_row(row: str, accountant: Any, monitor: PrivacyMonitor | None, steps: int) -> None:
    """Raise unless the row did what it is timed for: DP accounted every step, and the monitor
    published the accountant's own epsilon for the last one (a monitor that did nothing would
    look free)."""
    accounted = sum(n for _, _, n in accountant.history)
    if accounted != steps:
        raise RuntimeError(f"row {row}: Opacus accounted {accounted} steps, not {steps}")
    if monitor is None:
        return
    last = monitor.last_snapshot
    expected = accountant.get_epsilon(DELTA)
    if last is None or (last.step, last.epsilon, last.epsilon_exact) != (steps, expected, 1):
        raise RuntimeError(
            f"row {row}: the monitor's last snapshot is "
            f"{None if last is None else (last.step, last.epsilon, last.epsilon_exact)}, not "
            f"(step, epsilon, exact) = {(steps, expected, 1)}")


def cpu_name() -> str:
    """The CPU's model name and core count."""
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.machine()} ({os.cpu_count()} cores)"


def environment(accelerator: str) -> dict[str, Any]:
    import transformers
    cuda = accelerator == "gpu"
    return {
        "device": torch.cuda.get_device_name(0) if cuda else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None, "opacus": opacus.__version__,
        "lightning": lightning.__version__, "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def summarise(config: str, cfg: dict[str, int], times: dict[str, list[float]]) -> list[dict]:
    med = {row: statistics.median(ts) for row, ts in times.items()}
    return [{"config": config, "layers": cfg["layers"], "hidden": cfg["hidden"],
             "seq": cfg["seq"], "batch": cfg["batch"], "row": row,
             "step_ms": 1e3 * med[row], "step_ms_reps": [1e3 * t for t in times[row]],
             "vs_plain": med[row] / med["plain"],
             "vs_dp": None if row == "plain" else med[row] / med["dp"] - 1.0}
            for row in ROWS]


def markdown(results: list[dict], env: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = [f"{env['device']} · torch {env['torch']} · Opacus {env['opacus']} · Lightning "
             f"{env['lightning']} · {settings['accountant']} accountant · {settings['reps']} reps "
             f"× {settings['steps']} timed steps (+{settings['warmup']} warm-up) · {env['date']}",
             "",
             "| encoder | batch × seq | row | step ms (median) | min–max ms | × plain | over dp |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        over = "" if r["row"] in ("plain", "dp") else f"{100 * r['vs_dp']:+.1f} %"
        lines.append(f"| {r['config']} ({r['layers']}L/{r['hidden']}) | {r['batch']} × "
                     f"{r['seq']} | {r['row']} | {r['step_ms']:.2f} | "
                     f"{min(r['step_ms_reps']):.2f}–{max(r['step_ms_reps']):.2f} | "
                     f"{r['vs_plain']:.2f} | {over} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=tuple(MODES), default="cpu",
                        help="cpu: tiny encoder; gpu: MiniLM- and BERT-base-size encoders")
    parser.add_argument("--configs", nargs="+", choices=tuple(CONFIGS),
                        help="override the mode's encoder sizes")
    parser.add_argument("--reps", type=int, default=7, help="repetitions (each fits every row)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per repetition")
    parser.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU mode: torch threads (1 keeps timings stable on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write environment and results here")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--hooks-only", action="store_true", help="part 2 only")
    parser.add_argument("--no-hooks", action="store_true", help="part 1 only")
    parser.add_argument("--hook-rounds", type=int, default=5)
    parser.add_argument("--hook-steps", type=int, default=300)
    parser.add_argument("--hook-rows", default="dp,floor,monitor rdp,monitor prv,monitor gdp,"
                        "monitor rdp schedule")
    parser.add_argument("--baseline", type=Path,
                        help="part 2: also run each monitor row with this tree of the package")
    args = parser.parse_args(argv)
    if args.hook_steps <= HOOK_WARMUP + 1:
        parser.error(f"--hook-steps {args.hook_steps}: use more than {HOOK_WARMUP + 1} "
                     f"(the first {HOOK_WARMUP} steps of a fit are not timed)")
    for name in ("reps", "steps", "warmup"):
        if getattr(args, name) < 1:
            raise SystemExit(f"Unexpected value for --{name}: {getattr(args, name)}; use 1 or more")
    accelerator = "gpu" if args.mode == "gpu" else "cpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs a CUDA device; this machine has none (use --mode cpu)")
    if accelerator == "cpu":
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    env = environment(accelerator)
    report: dict[str, Any] = {"environment": env, "results": [], "hooks": None}
    tables = []
    if not args.hooks_only:
        tables.append(overhead(args, accelerator, env, argv, report))
    if accelerator == "cpu" and not args.no_hooks:
        report["hooks"] = hooks_part(args)
        tables.append(hooks_table(report["hooks"], env))
    print("\n\n".join(tables))
    if args.markdown:
        args.markdown.write_text("\n\n".join(tables) + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


def overhead(args: argparse.Namespace, accelerator: str, env: dict[str, Any],
             argv: list[str] | None, report: dict[str, Any]) -> str:
    """Part 1: the rows of the overhead table, fitted in rotation."""
    configs = args.configs or MODES[args.mode]
    settings = {"mode": args.mode, "reps": args.reps, "steps": args.steps,
                "warmup": args.warmup, "accountant": args.accountant, "delta": DELTA,
                "loop": "lightning",
                "command": " ".join(["python benchmarks/bench_overhead.py",
                                     *(sys.argv[1:] if argv is None else argv)])}
    report["settings"] = settings
    bar = tqdm(total=len(configs) * args.reps * len(ROWS), desc="bench_overhead", unit="fit",
               file=sys.stderr, dynamic_ncols=True)
    for config in configs:
        cfg = dict(CONFIGS[config], batches=args.warmup + args.steps)
        models = build_models(cfg, args.seed)
        times: dict[str, list[float]] = {row: [] for row in ROWS}
        for rep in range(args.reps):
            for i in range(len(ROWS)):
                row = ROWS[(rep + i) % len(ROWS)]
                bar.set_postfix_str(f"{config} {row}")
                times[row].append(run_block(models[row], row, accelerator, args.warmup,
                                            args.steps, accelerator == "gpu", args.accountant))
                bar.update()
        report["results"].extend(summarise(config, cfg, times))
        del models
        if accelerator == "gpu":
            torch.cuda.empty_cache()
        if args.json:  # after each encoder: a run cut short still leaves its finished rows
            args.json.write_text(json.dumps(report, indent=2))
    bar.close()
    return markdown(report["results"], env, settings)


# -- part 2: the hooks beside their floor -----------------------------------------------------

HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
HOOK_WARMUP = 20


class _Gap(pl.Callback):
    """When each batch ends: wall clock and the training thread's own CPU time."""

    def __init__(self) -> None:
        self.t: list[float] = []
        self.thread: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.t.append(time.perf_counter())
        self.thread.append(time.thread_time())


class _Floor(pl.Callback):
    """The least a per-step monitor with a budget guard does on the training thread: before the
    step, sigma and the rate it is charged compared with a kept count; after it, the step's
    number (counted in the hook before), the clocks, sigma, C and the history's view in one
    record appended to a deque. No thread, no exporter, no epsilon."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.optimizer: Any = trainer.optimizers[0]
        self.rate = ChargedRate(self.optimizer)
        self.accountant = pl_module.privacy_engine.accountant  # type: ignore[union-attr]
        self.records: list[tuple[Any, ...]] = []
        self.credit: tuple[float, float, int] = (0.0, 0.0, 1 << 62)
        self.step, self.stepped, self.t_last = trainer.global_step, False, None

    def on_train_batch_start(self, *args: Any) -> None:
        if self.t_last is None:
            self.t_last = time.perf_counter()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        sigma, q, credit = optimizer.noise_multiplier, self.rate(), self.credit
        if not (q == credit[1] and sigma >= credit[0] and self.step < credit[2]):
            self.credit = (sigma, q, 1 << 62)
        self.step += 1
        self.stepped = True

    def on_train_batch_end(self, *args: Any) -> None:
        if not self.stepped:
            return
        self.stepped = False
        now, t_last, history, opt = time.perf_counter(), self.t_last, self.accountant.history, \
            self.optimizer
        n = len(history)
        self.records.append((self.step, time.time_ns(), (history, n, history[n - 1]),
                             opt.noise_multiplier, opt.max_grad_norm,
                             None if t_last is None else now - t_last))
        self.t_last = now


_BASELINE: Any = None  # another tree of the package (--baseline): rows "<row> [baseline]"


def _load_baseline(root: Path) -> Any:
    """``root``'s ``privacy_callbacks`` as the package ``privacy_callbacks_baseline``."""
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
    return module


def _timed(callback: pl.Callback, into: list[float]) -> None:
    """Wrap the per-step hooks: their time per batch goes to ``into``."""
    clock, spent = time.perf_counter, [0.0]
    for name in HOOKS:
        hook = getattr(callback, name)

        def timed(*args: Any, _hook: Callable[..., Any] = hook, _end: bool =
                  name == "on_train_batch_end") -> None:
            t = clock()
            _hook(*args)
            spent[0] += clock() - t
            if _end:
                into.append(spent[0])
                spent[0] = 0.0

        setattr(callback, name, timed)


def _hook_fit(row: str, steps: int) -> tuple[list[float], list[float], float]:
    """One fit of ``row``: the gaps between batch ends, the hooks' time per step, and the
    training thread's CPU time per step."""
    gap, hook_times, callbacks = _Gap(), [], []
    accountant, model_cls = "rdp", DPModel
    if row == "floor":
        callbacks.append(_Floor())
    elif row != "dp":
        accountant = row.split()[1]
        model_cls = ScheduledModel if "schedule" in row else DPModel
        package = sys.modules["privacy_callbacks"] if not row.endswith("[baseline]") \
            else _BASELINE
        callbacks.append(package.PrivacyMonitor(
            1e-5, target_epsilon=None if "no target" in row else 1e4, progress_bar=False,
            exporters=[package.PrometheusExporter(port=0)]))
    for callback in callbacks:
        _timed(callback, hook_times)
    model = model_cls(n=8 * steps, batch_size=8, accountant=accountant)
    pl.Trainer(max_epochs=1, callbacks=[*callbacks, gap], logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               accelerator="cpu").fit(model)
    if callbacks and row != "floor":  # a monitor that did nothing would look free
        last, expected = callbacks[0].last_snapshot, model.privacy_engine.get_epsilon(1e-5)
        if last is None or (last.step, last.epsilon) != (steps, expected):
            raise RuntimeError(f"row {row}: the monitor's last snapshot is "
                               f"{last and (last.step, last.epsilon)}, not {(steps, expected)}")
    t, thread = gap.t[HOOK_WARMUP:], gap.thread[HOOK_WARMUP:]
    return ([b - a for a, b in zip(t, t[1:])], hook_times[HOOK_WARMUP:],
            (thread[-1] - thread[0]) / (len(thread) - 1))


def hooks_part(args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: every row fitted ``--hook-rounds`` times, rotated; medians over rounds."""
    rows = args.hook_rows.split(",")
    for row in rows:
        words = row.split()
        if row not in ("dp", "floor") and not (
                len(words) >= 2 and words[0] == "monitor" and words[1] in ("rdp", "prv", "gdp")
                and " ".join(words[2:]) in ("", "schedule", "schedule no target", "no target")):
            raise SystemExit(f"Unexpected row in --hook-rows: {row!r}; use dp, floor or "
                             "'monitor <rdp|prv|gdp>' optionally followed by 'schedule', "
                             "'schedule no target' or 'no target'")
    global _BASELINE
    if args.baseline is not None:
        _BASELINE = _load_baseline(args.baseline.resolve())
        rows = [r for row in rows
                for r in ((row,) if row in ("dp", "floor") else (row, f"{row} [baseline]"))]
    torch.set_num_threads(1)
    previous = logging.root.manager.disable  # main() also runs inside test processes
    logging.disable(logging.WARNING)
    gaps: dict[str, list[tuple[float, float]]] = {r: [] for r in rows}
    hooks: dict[str, list[float]] = {r: [] for r in rows}
    thread: dict[str, list[float]] = {r: [] for r in rows}
    try:
        for k in range(args.hook_rounds):
            for row in rows[k % len(rows):] + rows[:k % len(rows)]:
                g, h, th = _hook_fit(row, args.hook_steps)
                gaps[row].append((statistics.median(g), statistics.mean(g)))
                hooks[row].extend(h)
                thread[row].append(th)
    finally:
        logging.disable(previous)
    out: dict[str, Any] = {"rounds": args.hook_rounds, "steps": args.hook_steps,
                           "load": os.getloadavg(), "rows": {}}
    base = rows[0]
    for row in rows:
        h = sorted(hooks[row])
        out["rows"][row] = {
            "step_median_us": 1e6 * statistics.median(m for m, _ in gaps[row]),
            "step_mean_us": 1e6 * statistics.median(m for _, m in gaps[row]),
            "thread_cpu_us": 1e6 * statistics.median(thread[row]),
            "hooks_us": {"mean": 1e6 * statistics.mean(h), "p99": 1e6 * h[int(0.99 * (len(h) - 1))],
                         "max": 1e6 * h[-1]} if h else None}
    for r in out["rows"].values():
        b = out["rows"][base]
        r.update({f"over_{base}_{k}": r[k] - b[k]
                  for k in ("step_median_us", "step_mean_us", "thread_cpu_us")})
    return out


def hooks_table(out: dict[str, Any], env: dict[str, Any]) -> str:
    rows, base = out["rows"], next(iter(out["rows"]))
    lines = [f"{env['device']} · torch {env['torch']} · {out['rounds']} rounds × {out['steps']} "
             f"steps of a tiny DP MLP, rows rotated · load average "
             f"{'/'.join(f'{x:.1f}' for x in out['load'])} · {env['date']}", "",
             f"| row | step median µs | over {base} | step mean µs | over {base} | training "
             f"thread CPU µs | over {base} | hooks µs mean | p99 | max |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row, r in rows.items():
        h = r["hooks_us"]
        hook = " | | |" if h is None else f" {h['mean']:.1f} | {h['p99']:.1f} | {h['max']:.0f} |"
        lines.append(f"| {row} | {r['step_median_us']:.0f} | "
                     f"{r[f'over_{base}_step_median_us']:+.0f} | {r['step_mean_us']:.0f} | "
                     f"{r[f'over_{base}_step_mean_us']:+.0f} | {r['thread_cpu_us']:.0f} | "
                     f"{r[f'over_{base}_thread_cpu_us']:+.0f} |{hook}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
