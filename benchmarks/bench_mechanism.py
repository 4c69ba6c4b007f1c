"""What the mechanism metrics cost, and whether their overhead ratio tells the truth.

    python benchmarks/bench_mechanism.py            # full run (under a minute on 1 CPU thread)
    python benchmarks/bench_mechanism.py --quick    # small sizes, 3 short rounds (CI test)

(a) Cost: the same DP fit with ``PrivacyMonitor`` alone and with ``MechanismMetrics`` beside it,
    interleaved round by round in one process; the ratio of median step times.
(b) Honesty: a plain fit (no Opacus) and a DP fit without the monitor, interleaved, give the
    side-by-side ratio DP step / plain step; a DP fit with the mechanism metrics reports
    ``privacy_overhead_ratio{operation="total"}`` from its own calibration. They should agree
    within 15 %. ``excess_ratio`` compares what DP adds to the plain step: (reported - 1) /
    (side-by-side - 1); a total that leaves out a DP cost drives it towards 0.

The DP fits use the RDP accountant by default: with PRV, the monitor computes the exact epsilon of
every step on a background thread, which on a machine with few cores slows the monitored steps
beside the calibration pass (that is the monitor's cost, measured by ``bench_overhead.py``, not
DP's). ``--accountant prv`` measures that case.

Step time is a callback's ``on_train_batch_start`` to ``on_train_batch_end``, median over the
steps after warm-up. On a GPU the timing callback synchronises (the benchmark harness does, the
library never does) so that every variant is timed the same way.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
import warnings

import lightning.pytorch as pl
import opacus
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy_callbacks import MechanismMetrics, PrivacyMonitor


class TokenMLP(pl.LightningModule):
    """A per-token MLP over sequences, mean-pooled into a classifier, on random data.

    Weights are shared across the sequence as in a transformer's feed-forward blocks, so the
    per-sample gradient cost relative to the plain step is of the same kind as in fine-tuning
    an encoder. ``private`` wires Opacus as its Lightning example does.
    """

    def __init__(self, *, private: bool, features: int, hidden: int, seq: int, batch: int,
                 steps: int, accountant: str = "rdp") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, features), nn.ReLU())
        self.head = nn.Linear(features, 10)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch * steps, seq, features, generator=gen)
        self.data = TensorDataset(x, torch.randint(0, 10, (batch * steps,), generator=gen))
        self.private, self.batch = private, batch
        self.privacy_engine = PrivacyEngine(accountant=accountant) if private else None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.net(x).mean(dim=1)), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch, shuffle=False)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        if not self.private:
            return optimizer
        dp_module, optimizer, _ = self.privacy_engine.make_private(
            module=self, optimizer=optimizer, data_loader=self.train_dataloader(),
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
        self.dp = {"module": dp_module}
        return optimizer


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t = warmup, [], 0.0

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(self._now() - self._t)


def wait_for_background_accounting(timeout: float = 10.0) -> bool:
    """Wait until the monitor's RDP-vector thread has ended; False on timeout.

    At a fit's first step the accounting computes RDP vectors for nearby noise levels on a
    background thread (pure Python, a few hundred milliseconds). On a small CPU machine that
    thread slows the training steps it overlaps with, and a calibration pass timed beside an
    undisturbed step would credit the slow-down to DP. The thread ends after a second without
    work. (The PRV accountant's exact-epsilon thread works beside every step: not waited for.)
    """
    deadline = time.monotonic() + timeout
    while any(t.name == "privacy-accounting-rdp-vectors" for t in threading.enumerate()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Totals(pl.Callback):
    """Collects the monitor's overhead ratios once the publisher resolved them.

    Only steps from ``warmup`` on count, the same steps the side-by-side fits are timed over.
    After the first step it waits (untimed: it runs after the step timer) for the background
    accounting, so that calibration and DP steps are timed alike.
    """

    def __init__(self, monitor: PrivacyMonitor, warmup: int = 0) -> None:
        self.monitor, self.warmup, self.totals = monitor, warmup, []
        self.quiet: bool | None = None

    def on_train_epoch_end(self, trainer, pl_module):
        self.monitor.flush(60)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.monitor.flush(60)
        if batch_idx == 0:
            self.quiet = wait_for_background_accounting()
        overhead = self.monitor.last_snapshot.get("overhead")
        if overhead is not None and batch_idx >= self.warmup:
            self.totals.append(overhead)


def fit_times(model: pl.LightningModule, warmup: int, monitor: tuple = (),
              extra: tuple = ()) -> list[float]:
    """Fit ``model`` for one epoch; the step times after ``warmup``.

    The timer runs after the ``monitor`` callbacks (the monitor, the mechanism metrics) start a
    step and before ``extra`` callbacks (which may wait for the publisher) end it.
    """
    timer = StepTimer(warmup)
    trainer = pl.Trainer(max_epochs=1, accelerator="auto", devices=1,
                         callbacks=[*monitor, timer, *extra],
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False)
    trainer.fit(model)
    return timer.times


def run(args: argparse.Namespace, *, private: bool, monitor: tuple = (),
        extra: tuple = ()) -> list[float]:
    model = TokenMLP(private=private, features=args.features, hidden=args.hidden, seq=args.seq,
                     batch=args.batch, steps=args.steps, accountant=args.accountant)
    return fit_times(model, args.warmup, monitor, extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 short rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--accountant", choices=("rdp", "prv"), default="rdp",
                        help="Opacus accountant of the DP fits (see the module docstring)")
    parser.add_argument("--overhead-every", type=int, default=None,
                        help="calibration cadence of the monitored fit (default: steps // 4)")
    args = parser.parse_args(argv)
    if args.quick:
        # Per-sample gradients still cost more than the plain step, so a total without them is
        # far from the side-by-side one; three rounds keep one disturbed fit from deciding.
        args.rounds, args.steps, args.warmup, args.overhead_every = 3, 16, 3, 2
        args.features, args.hidden, args.seq, args.batch = 32, 128, 16, 16
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    off, on, plain, dp, totals, quiet = [], [], [], [], [], []
    for r in range(args.rounds):
        # Alternate the order each round so drift in machine load hits both sides alike.
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        for variant in order:
            monitor = PrivacyMonitor(delta=1e-5)
            callbacks = (monitor, MechanismMetrics(overhead_every=10_000)) if variant == "on" \
                else (monitor,)
            (on if variant == "on" else off).extend(run(args, private=True, monitor=callbacks))
        for variant in (("plain", "dp") if r % 2 == 0 else ("dp", "plain")):
            (plain if variant == "plain" else dp).extend(run(args, private=variant == "dp"))
        monitor = PrivacyMonitor(delta=1e-5)
        mechanism = MechanismMetrics(overhead_every=args.overhead_every or max(1, args.steps // 4))
        collect = Totals(monitor, args.warmup)
        run(args, private=True, monitor=(monitor, mechanism), extra=(collect,))
        totals.extend(o["total"] for o in collect.totals)
        quiet.append(collect.quiet)

    med = statistics.median
    side_by_side = med(dp) / med(plain)
    reported = med(totals) if totals else float("nan")
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
        f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread)",
        "torch": torch.__version__, "opacus": opacus.__version__,
        "model": f"token MLP {args.features}-{args.hidden}-{args.features}, seq {args.seq}, "
                 f"batch {args.batch}",
        "rounds": args.rounds, "steps_per_fit": args.steps, "accountant": args.accountant,
        "timed_steps": {"plain": len(plain), "dp": len(dp), "reported": len(totals)},
        "background_accounting_ended": quiet,
        "dp_step_ms_mechanism_off": round(med(off) * 1e3, 3),
        "dp_step_ms_mechanism_on": round(med(on) * 1e3, 3),
        "mechanism_cost_ratio": round(med(on) / med(off), 4),
        "plain_step_ms": round(med(plain) * 1e3, 3),
        "dp_step_ms": round(med(dp) * 1e3, 3),
        "side_by_side_total": round(side_by_side, 3),
        "reported_total": round(reported, 3),
        "agreement": round(reported / side_by_side - 1, 4),
        "excess_ratio": round((reported - 1) / (side_by_side - 1), 4),
    }
    print(json.dumps(result, indent=1))
    print(f"\nmechanism metrics cost: x{result['mechanism_cost_ratio']} per DP step; "
          f"overhead total reported {result['reported_total']} vs side-by-side "
          f"{result['side_by_side_total']} ({result['agreement']:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
