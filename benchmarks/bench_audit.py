"""How tight the one-run privacy audit is: its epsilon lower bound next to the accountant's.

    python benchmarks/bench_audit.py            # 4 noise multipliers x 2 lengths, 3 runs each
    python benchmarks/bench_audit.py --quick    # one setting, one run (CI smoke test)

Each run trains a 5.6k-parameter MLP on 256 random examples (batch 32, so q = 1/8) with Opacus
and ``OneRunAudit(DELTA, canaries=1000)``, and records the audit's 95 % lower bound and the
epsilon the RDP accountant reports at delta = 1e-5. "noise off" rows break the mechanism on
purpose (Opacus' noise generator returns zeros, the accountant still charges sigma): the bound
must then pass the reported epsilon. A correct run's bound is far below: the audit is a smoke
alarm for broken mechanisms, not an estimate of epsilon (the paper's white-box canaries get
closer with many more canaries and steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
import warnings

import lightning.pytorch as pl
import opacus
import opacus.optimizers.optimizer as opacus_optimizer
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy_callbacks import OneRunAudit, PrivacyMonitor

DELTA = 1e-5


class Wide(pl.LightningModule):
    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 2))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(256, 8, generator=gen)
        self.data = TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())
        self.sigma = sigma
        self.privacy_engine = PrivacyEngine(accountant="rdp")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        module, optimizer, _ = self.privacy_engine.make_private(
            module=self, optimizer=optimizer, data_loader=self.train_dataloader(),
            noise_multiplier=self.sigma, max_grad_norm=1.0, poisson_sampling=False)
        self.dp = {"module": module}
        return optimizer


def _no_noise(std, reference, generator=None, secure_mode=False):
    return torch.zeros_like(reference)


def run(sigma: float, epochs: int, canaries: int, broken: bool) -> tuple[float, float]:
    original = opacus_optimizer._generate_noise
    if broken:
        opacus_optimizer._generate_noise = _no_noise
    try:
        monitor = PrivacyMonitor(delta=DELTA, progress_bar=False)
        auditor = OneRunAudit(DELTA, canaries=canaries)
        trainer = pl.Trainer(max_epochs=epochs, callbacks=[monitor, auditor], logger=False,
                             enable_progress_bar=False, enable_checkpointing=False,
                             enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Wide(sigma))
    finally:
        opacus_optimizer._generate_noise = original
    final = monitor.last_snapshot  # the accountant's exact epsilon once the fit returned
    assert auditor.result is not None and final is not None and final.epsilon_exact == 1
    return auditor.result.epsilon_lower_bound, final.epsilon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--canaries", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("privacy_callbacks").setLevel(logging.CRITICAL)
    if args.quick:
        settings, repeats = [(3.0, 1, False)], 1
    else:
        settings = [(s, e, False) for s in (0.6, 1.0, 2.0, 4.0) for e in (1, 4)]
        settings += [(s, e, True) for s, e in ((1.0, 1), (3.0, 1), (4.0, 4))]
        repeats = args.repeats
    rows = []
    start = time.time()
    print("| σ | steps | mechanism | reported ε (RDP) | audit bound: median | max | runs |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for sigma, epochs, broken in settings:
        bounds, eps = [], 0.0
        for _ in range(repeats):
            bound, eps = run(sigma, epochs, args.canaries, broken)
            bounds.append(bound)
        row = {"sigma": sigma, "steps": 8 * epochs, "broken": broken, "epsilon": eps,
               "bounds": bounds}
        rows.append(row)
        print(f"| {sigma:g} | {8 * epochs} | {'noise off' if broken else 'correct'} | "
              f"{eps:.3f} | {statistics.median(bounds):.3f} | {max(bounds):.3f} | {repeats} |",
              flush=True)
    print(json.dumps({"rows": rows, "canaries": args.canaries, "delta": DELTA,
                      "seconds": round(time.time() - start, 1), "torch": torch.__version__,
                      "opacus": opacus.__version__, "python": platform.python_version()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
