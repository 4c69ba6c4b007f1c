"""A tiny DP model wired the way Opacus documents it for Lightning."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n: int = 256, features: int = 8, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


class DPModel(pl.LightningModule):
    """Logistic regression made private in ``configure_optimizers``, as Opacus' example does."""

    def __init__(self, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
                 n: int = 256, batch_size: int = 32, accountant: str = "rdp",
                 lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.n, self.batch_size, self.lr = n, batch_size, lr
        self.privacy_engine = PrivacyEngine(accountant=accountant)
        self.dataset = make_data(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if hasattr(self, "dp"):
            self.dp["module"].remove_hooks()
        # A dict, not an attribute: the wrapper would become a submodule of itself.
        dp_module, optimizer, _ = self.privacy_engine.make_private(
            module=self, optimizer=optimizer, data_loader=self.train_dataloader(),
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            poisson_sampling=False)
        self.dp = {"module": dp_module}
        return optimizer


class ScheduledModel(DPModel):
    """Decays sigma every batch with Opacus' ExponentialNoise, as a noise schedule does."""

    def __init__(self, gamma: float = 0.999, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gamma = gamma

    def configure_optimizers(self):
        from opacus.schedulers import ExponentialNoise
        optimizer = super().configure_optimizers()
        self.scheduler = ExponentialNoise(optimizer, gamma=self.gamma)
        return optimizer

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.scheduler.step()


class PlainModel(pl.LightningModule):
    """No Opacus anywhere: what a user has before adding the callback."""

    def __init__(self, scheduler: bool = False, norm: nn.Module | None = None,
                 dataset: TensorDataset | None = None, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        self.bn = norm
        self.scheduler = scheduler
        self.dataset = make_data(256) if dataset is None else dataset
        self.lr = lr
        self.batch_sizes: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batch_sizes.append(len(x))
        if self.bn is not None:
            x = self.bn(x)
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=32)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def fit(model: pl.LightningModule, *callbacks: pl.Callback, ckpt_path: str | None = None,
        fit_kwargs: dict[str, Any] | None = None, **trainer_kwargs: Any) -> pl.Trainer:
    """A quiet one-epoch fit on CPU; ``trainer_kwargs`` override the Trainer's settings."""
    kwargs: dict[str, Any] = dict(max_epochs=1, enable_progress_bar=False, logger=False,
                                  enable_checkpointing=False, enable_model_summary=False)
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=list(callbacks), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, ckpt_path=ckpt_path, **(fit_kwargs or {}))
    return trainer
