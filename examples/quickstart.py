"""Quickstart: a tiny DP-SGD fit on CPU with live privacy metrics on /metrics.

    python examples/quickstart.py            # serves http://127.0.0.1:9108/metrics while training

The model wires Opacus as Opacus' Lightning example does (a PrivacyEngine on the module,
``make_private`` in ``configure_optimizers``); PrivacyMonitor finds it on its own. The engine uses
Opacus' default accountant, PRV: epsilon is computed in the background, published as an upper
bound (``privacy_epsilon_exact 0``) until the exact value for the step is known, and exact
(``privacy_epsilon_exact 1``) at the end of the fit. ``--accountant rdp`` or ``gdp`` for the others.
"""

from __future__ import annotations

import argparse
import logging
import urllib.request
import warnings

import lightning.pytorch as pl
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy_callbacks import PrivacyMonitor, PrometheusExporter


class PrivateClassifier(pl.LightningModule):
    def __init__(self, noise_multiplier: float, max_grad_norm: float, batch_size: int,
                 accountant: str = "prv") -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2048, 16, generator=gen)
        y = (x[:, :4].sum(dim=1) > 0).long()
        self.dataset = TensorDataset(x, y)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self.batch_size = batch_size
        self.privacy_engine = PrivacyEngine(accountant=accountant)  # Opacus' default is "prv"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5)
        if hasattr(self, "dp"):
            self.dp["module"].remove_hooks()
        dp_module, optimizer, _ = self.privacy_engine.make_private(
            module=self, optimizer=optimizer, data_loader=self.train_dataloader(),
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            poisson_sampling=False)
        self.dp = {"module": dp_module}
        return optimizer


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9108, help="/metrics port (0: any free)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument("--accountant", choices=["prv", "rdp", "gdp"], default="prv")
    args = parser.parse_args(argv)
    # force=True: importing Opacus already configured the root logger (a WARNING handler), and
    # without it this call does nothing and the monitor's INFO lines never show.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    exporter = PrometheusExporter(port=args.port)
    monitor = PrivacyMonitor(delta=args.delta, target_epsilon=args.target_epsilon,
                             exporters=[exporter], session_id="quickstart",
                             model_name="mlp")

    class ShowMetrics(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            print(f"Privacy metrics: {exporter.url}", flush=True)

        def on_fit_end(self, trainer, pl_module):
            # After the monitor's on_fit_end, which publishes the exact final epsilon.
            with urllib.request.urlopen(exporter.url, timeout=5) as resp:
                lines = [ln for ln in resp.read().decode().splitlines()
                         if ln.startswith(("privacy_epsilon_consumed{", "privacy_epsilon_exact{",
                                           "privacy_epsilon_step{"))]
            print(f"Scraped from {exporter.url}:", *lines, sep="\n  ")

    model = PrivateClassifier(args.noise_multiplier, args.max_grad_norm, args.batch_size,
                              args.accountant)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[monitor, ShowMetrics()],
                         logger=False, enable_checkpointing=False, log_every_n_steps=5)
    trainer.fit(model)
    snap = monitor.last_snapshot
    opacus_epsilon = model.privacy_engine.get_epsilon(args.delta)
    print(f"Final: epsilon={snap.epsilon:.4f} ({'exact' if snap.epsilon_exact else 'upper bound'} "
          f"for step {snap.epsilon_step}) at delta={snap.delta:g} after {snap.steps} steps "
          f"({snap.accountant}; target {args.target_epsilon}, remaining "
          f"{snap.budget_remaining:.4f}; Opacus says {opacus_epsilon:.4f})")
    return snap.epsilon


if __name__ == "__main__":
    main()
