"""Quickstart: a tiny DP-SGD fit on CPU with live privacy metrics on /metrics.

    python examples/quickstart.py                    # serves http://127.0.0.1:9108/metrics
    python examples/quickstart.py --accountant prv   # Opacus' PRV accountant instead of RDP

The module is plain Lightning: ``DifferentialPrivacy`` makes it private (per-sample gradients,
a DP optimizer, Poisson sampling, the accountant) and ``PrivacyMonitor`` publishes what it
spends, through an in-process ``PrometheusExporter``. At the end of the fit the example scrapes
its own endpoint and prints the epsilon lines. With ``--accountant prv`` or ``gdp`` epsilon is
computed in the background: an upper bound (``privacy_epsilon_exact 0``) until the exact value
for the step is known, and exact at the end of the fit.
"""

from __future__ import annotations

import argparse
import logging
import urllib.request

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy_callbacks import DifferentialPrivacy, PrivacyMonitor, PrometheusExporter


class Classifier(pl.LightningModule):
    """A two-layer MLP on 2048 seeded random points: no privacy code in it."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2048, 16, generator=gen)
        self.dataset = TensorDataset(x, (x[:, :4].sum(dim=1) > 0).long())
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
        self.batch_size = batch_size

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9108, help="/metrics port (0: any free)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument("--accountant", choices=["rdp", "prv", "gdp"], default="rdp")
    args = parser.parse_args(argv)
    # force=True: importing Opacus already configured the root logger, so without it the
    # monitor's INFO lines (the metrics URL, "Privacy spent") would not show.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        force=True)

    exporter = PrometheusExporter(port=args.port)
    monitor = PrivacyMonitor(delta=args.delta, target_epsilon=args.target_epsilon,
                             exporters=[exporter], session_id="quickstart", model_name="mlp")
    dp = DifferentialPrivacy(noise_multiplier=args.noise_multiplier,
                             max_grad_norm=args.max_grad_norm, accountant=args.accountant)

    class ShowMetrics(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            # After the monitor's on_fit_end, which publishes the exact final epsilon; the
            # endpoint is served until teardown.
            with urllib.request.urlopen(exporter.url, timeout=5) as resp:
                lines = [ln for ln in resp.read().decode().splitlines()
                         if ln.startswith(("privacy_epsilon_consumed{", "privacy_epsilon_exact{",
                                           "privacy_epsilon_step{", "privacy_budget_remaining{",
                                           "privacy_noise_multiplier{"))]
            print(f"Scraped from {exporter.url}:", *lines, sep="\n  ")

    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[dp, monitor, ShowMetrics()],
                         logger=False, enable_checkpointing=False, log_every_n_steps=5)
    trainer.fit(Classifier())
    snap = monitor.last_snapshot
    assert snap is not None and snap.epsilon is not None
    opacus_epsilon = dp.privacy_engine.get_epsilon(args.delta)
    print(f"Final: epsilon={snap.epsilon:.4f} ({'exact' if snap.epsilon_exact else 'upper bound'}"
          f" for step {snap.epsilon_step}) at delta={snap.delta:g} ({snap.accountant}; target "
          f"{args.target_epsilon}, remaining {snap.budget_remaining:.4f}; Opacus says "
          f"{opacus_epsilon:.4f})")
    return snap.epsilon


if __name__ == "__main__":
    main()
