"""A DP fit that runs on one process or, as a script, under Lightning DDP on CPU (gloo).

Lightning's DDP launcher re-executes ``sys.argv`` for every rank, so DDP runs only as
``python tests/ddp_fit.py OUT_DIR --devices 2 ...`` in its own process, never inside pytest. Each
rank writes ``rank<N>.json``: the accountant's history and epsilon, the noise measured on the
averaged gradient, the sample indices of every step, a parameter checksum, what its
``/metrics`` endpoint served and, per step, the update's norm and the monitor's mechanism values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from privacy_callbacks import (DifferentialPrivacy, MechanismMetrics,  # noqa: E402
                               PrivacyMonitor, PrometheusExporter)

# The tests compare each step's mechanism values: measured every step, not every k-th by cost.
MechanismMetrics.STATS_SHARE = 1.0

N, FEATURES = 256, 100
SIGMA, CLIP, SEED = 1.0, 1.0, 7
DRIFT = 10.0
DELTA = 1e-5


class ZeroGradModel(pl.LightningModule):
    """``net``'s per-sample gradients are exactly zero: an SGD step with lr=1 moves its weights
    by the DP noise on the averaged gradient, nothing else. ``drift`` gets a per-sample gradient
    of norm ``DRIFT`` > C, so each sample adds exactly C to the signal: its norm is
    ``batch size * C``."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.net = nn.Linear(FEATURES, FEATURES)
        self.drift = nn.Linear(1, 1, bias=False)
        self.batch_size = batch_size
        gen = torch.Generator().manual_seed(0)
        self.dataset = TensorDataset(torch.randn(N, FEATURES, generator=gen), torch.arange(N))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return (self.net(x) * 0.0).sum() + DRIFT * self.drift(x.new_ones(len(x), 1)).sum()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class Record(pl.Callback):
    """Measures the noise of every step and the samples each rank trained on."""

    def __init__(self, monitor: PrivacyMonitor, exporter: PrometheusExporter | None) -> None:
        self.monitor, self.exporter = monitor, exporter
        self.sq, self.count, self.batches = 0.0, 0, []
        self.noise: list[float] = []  # per step: the noise std measured on net.weight
        self.update_sq: list[float] = []  # per step: squared norm of the whole update
        self.mechanism: list[dict] = []  # per step on global rank 0: what the monitor reported
        self.served: str | None = None
        self.url: str | None = None
        self.expected_batch_size: float | None = None
        self._before: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._before is None:
            self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(sorted(int(i) for i in batch[1]))
        if trainer.global_step == len(self.noise):
            return  # accumulating: no optimizer step yet
        deltas = [(p.detach() - b).double() for p, b in zip(pl_module.parameters(), self._before)]
        self._before = None
        weight = deltas[0]  # net.weight
        self.sq += float((weight ** 2).sum())
        self.count += weight.numel()
        self.noise.append(float((weight ** 2).mean()) ** 0.5)
        self.update_sq.append(sum(float((d ** 2).sum()) for d in deltas))
        if trainer.is_global_zero:
            assert self.monitor.flush(60)
            snap = self.monitor.last_snapshot
            self.mechanism.append({"noise_std": snap.noise_std, **{a: snap.get(a) for a in (
                "noised_counts", "clipped_fraction", "signal_energy", "noise_magnitude")}})

    def on_train_end(self, trainer, pl_module):
        self.expected_batch_size = trainer.optimizers[0].expected_batch_size
        if self.exporter is not None and self.exporter.url:
            self.url = self.exporter.url
            import urllib.request
            self.monitor.flush()
            with urllib.request.urlopen(self.exporter.url, timeout=10) as resp:
                self.served = resp.read().decode()


def run(*, devices: int, batch_size: int, max_epochs: int = 1, port: int | None = None,
        pushgateway: str | None = None, session_id: str = "ddp",
        statistics_noise_multiplier: float | None = None, **trainer_kwargs) -> dict:
    pl.seed_everything(0, verbose=False)
    exporters = []
    exporter = None
    if port is not None or pushgateway is not None:
        exporter = PrometheusExporter(port=port or 0, serve=port is not None,
                                      pushgateway=pushgateway, job="dp_training",
                                      push_interval=0.5)
        exporters.append(exporter)
    dp = DifferentialPrivacy(noise_multiplier=SIGMA, max_grad_norm=CLIP, seed=SEED,
                             statistics_noise_multiplier=statistics_noise_multiplier)
    monitor = PrivacyMonitor(delta=DELTA, exporters=exporters, session_id=session_id,
                             model_name="zero")
    record = Record(monitor, exporter)
    kwargs = {"strategy": "ddp", "accelerator": "cpu", "devices": devices} if devices > 1 else \
        {"accelerator": "cpu", "devices": 1}
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[monitor, dp, MechanismMetrics(), record],
                         logger=False,
                         enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, **kwargs, **trainer_kwargs)
    model = ZeroGradModel(batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    accountant = dp.privacy_engine.accountant
    return {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "history": [list(seg) for seg in accountant.history],
        "epsilon": accountant.get_epsilon(DELTA),
        "monitor_epsilon": monitor.last_snapshot.epsilon if trainer.is_global_zero else None,
        "noise_std": (record.sq / record.count) ** 0.5,
        "step_noise_std": record.noise,
        "update_sq": record.update_sq,
        "mechanism": record.mechanism,
        "entries": sum(p.numel() for p in model.parameters()),
        "batches": record.batches,
        "expected_batch_size": record.expected_batch_size,
        "checksum": float(model.net.weight.detach().double().sum()),
        "url": record.url,
        "served": record.served,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--port", type=int)
    parser.add_argument("--pushgateway")
    parser.add_argument("--session-id", default="ddp")
    parser.add_argument("--statistics-noise-multiplier", type=float)
    args = parser.parse_args()
    result = run(devices=args.devices, batch_size=args.batch_size, port=args.port,
                 pushgateway=args.pushgateway, session_id=args.session_id,
                 statistics_noise_multiplier=args.statistics_noise_multiplier)
    with open(os.path.join(args.out, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
