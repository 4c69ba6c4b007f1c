"""Training-step overhead of privacy monitoring: plain vs DP vs hand-written vs PrivacyMonitor.

    python benchmarks/bench_overhead.py                   # CPU, tiny encoder (about a minute)
    python benchmarks/bench_overhead.py --mode gpu        # MiniLM-size and BERT-base-size encoders

Rows, all on the same model (same initial weights), the same batches and the same loop:

- ``plain``: no DP.
- ``dp``: Opacus DP-SGD through the ``DifferentialPrivacy`` callback (fixed batches, no Poisson
  sampling, so every row does the same work), nothing else.
- ``dp+naive``: what people write by hand: ``privacy_engine.get_epsilon(delta)`` and
  ``loss.item()`` after every step.
- ``dp+monitor``: ``PrivacyMonitor`` with its defaults plus a target epsilon (every metric, every
  step) and an in-process ``PrometheusExporter`` serving /metrics.
- ``dp+monitor mechanism=False``: the same without the mechanism metrics (device-side
  reductions each step: asynchronous kernel launches on a GPU, real work on a CPU).

The loop is Lightning's own (``Trainer.fit``) for every row, so the monitor runs exactly as users
run it. Each repetition fits every row once, rows rotated, each for ``--warmup`` untimed steps and
``--steps`` timed ones; the timed block is bracketed by a device synchronisation (on GPU) at both
ends only, so asynchronous execution is not disturbed inside it. Reported: the median over
repetitions of the mean step time, and ratios of medians. Every fit is checked to have done
what it is timed for (Opacus accounted each step; a monitor published the accountant's own
epsilon for the last step before ``fit`` returned); a fit that did not stops the benchmark.
Embeddings are frozen (as in ``examples/finetune_dp.py``); every encoder layer and the head are
trained.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# The model comes from the example; by path, as other packages install a top-level `examples`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import opacus  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from finetune_dp import DPTextClassifier, freeze_for_dp  # noqa: E402
from machine import cpu_name  # noqa: E402
from privacy_callbacks import DifferentialPrivacy, PrivacyMonitor, PrometheusExporter  # noqa: E402

ROWS = ("plain", "dp", "dp+naive", "dp+monitor", "dp+monitor mechanism=False")
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
                                 session_id="bench", model_name="bench",
                                 mechanism="mechanism=False" not in row)
        callbacks.append(monitor)
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
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
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

    configs = args.configs or MODES[args.mode]
    env = environment(accelerator)
    settings = {"mode": args.mode, "reps": args.reps, "steps": args.steps,
                "warmup": args.warmup, "accountant": args.accountant, "delta": DELTA,
                "loop": "lightning",
                "command": " ".join(["python benchmarks/bench_overhead.py",
                                     *(sys.argv[1:] if argv is None else argv)])}
    report: dict[str, Any] = {"environment": env, "settings": settings, "results": []}
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
    table = markdown(report["results"], env, settings)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()
