"""The loss-threshold membership attack (Yeom et al. 2018), measured at each validation."""

from __future__ import annotations

import random
import warnings
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from scipy.stats import rankdata

from .. import checks

__all__ = ["MembershipInferenceProbe", "attack_metrics"]


def attack_metrics(member_losses: Sequence[float] | np.ndarray,
                   nonmember_losses: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """``(auc, advantage)`` of the attack "member if loss <= t": P[a random member's loss < a
    random non-member's] (ties count half; Mann-Whitney U), and max_t TPR - FPR."""
    members = np.asarray(member_losses, dtype=float)
    others = np.asarray(nonmember_losses, dtype=float)
    if members.size == 0 or others.size == 0:
        raise ValueError("attack_metrics needs at least one member and one non-member loss")
    scores = np.concatenate([members, others])
    n_m, n_o = members.size, others.size
    u = rankdata(scores)[n_m:].sum() - n_o * (n_o + 1) / 2.0  # the pairs ordered right
    thresholds = np.unique(scores)
    tpr = np.searchsorted(np.sort(members), thresholds, side="right") / n_m
    fpr = np.searchsorted(np.sort(others), thresholds, side="right") / n_o
    return float(u / (n_m * n_o)), float(max(0.0, np.max(tpr - fpr)))


class MembershipInferenceProbe(Callback):
    """Runs the loss-threshold membership attack at the end of each validation.

    Losses on a fixed sample of training examples (members) and of held-out ones give ``auc``,
    the best ``advantage`` (TPR - FPR; ``membership_inference_risk_score`` caps every attack's)
    and ``score`` (best balanced accuracy), published by a :class:`~privacy_callbacks.
    PrivacyMonitor` as ``membership_inference_empirical_{auc,advantage}`` and
    ``privacy_attack_score{attack_type="loss_threshold"}``. It cannot disprove epsilon
    (:class:`~privacy_callbacks.OneRunAudit` can) and, scoring records without noise, is a
    release outside epsilon (it warns): use it on evaluation runs.

    Args:
        members: The training dataset (or a subset of it); items are ``(input, target)``.
        nonmembers: Held-out examples from the same distribution, never trained on.
        samples: Examples drawn from each dataset, once (``seed``): successive values compare.
        loss_fn: ``loss_fn(outputs, targets)``, one loss per example; cross-entropy by default.
        batch_size: Examples per forward pass.
    """

    attack_type = "loss_threshold"

    def __init__(self, members: Any, nonmembers: Any, *, samples: int = 256,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 batch_size: int = 256, seed: int = 0) -> None:
        self.samples = checks.number("samples", samples, "an int >= 2", low=2, low_ok=True,
                                     integer=True)
        self.batch_size = checks.number("batch_size", batch_size, "an int >= 1", low=1,
                                        low_ok=True, integer=True)
        self.seed = checks.number("seed", seed, "an int >= 0", low_ok=True, integer=True)
        for name, data in (("members", members), ("nonmembers", nonmembers)):
            if not hasattr(data, "__len__") or not hasattr(data, "__getitem__") or not len(data):
                raise ValueError(f"Unexpected value for {name}: {type(data).__name__}; use a "
                                 "non-empty map-style dataset of (input, target) pairs")
        warnings.warn(
            "MembershipInferenceProbe scores training records without noise: its AUC, advantage "
            "and attack score are released outside the reported epsilon. Use it on evaluation "
            "runs, or keep its metrics where the training data may be seen.", stacklevel=2)
        self.members, self.nonmembers, self.loss_fn = members, nonmembers, loss_fn
        self._idx = [sorted(random.Random(seed + i).sample(range(len(d)), min(samples, len(d))))
                     for i, d in enumerate((members, nonmembers))]
        self.auc: float | None = None  # the latest values; None before the first validation
        self.advantage: float | None = None
        self.score: float | None = None
        self._values: Mapping[str, Any] = {}  # one reference: the publisher reads a whole set

    def privacy_values(self) -> Mapping[str, Any]:
        return self._values

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.auc, self.advantage = self.measure(pl_module)
        self.score = 0.5 + self.advantage / 2.0
        self._values = {"membership_inference_auc": self.auc,
                        "membership_inference_advantage": self.advantage,
                        "attack_scores": {self.attack_type: self.score}}

    def measure(self, model: torch.nn.Module) -> tuple[float, float]:
        """Run the attack on ``model`` now; returns ``(auc, advantage)``."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return attack_metrics(*(self._losses(model, data, idx) for data, idx in
                                        zip((self.members, self.nonmembers), self._idx)))
        finally:
            model.train(was_training)

    def _losses(self, model: torch.nn.Module, dataset: Any, indices: list[int]) -> np.ndarray:
        device = next(model.parameters()).device
        out: list[torch.Tensor] = []
        for start in range(0, len(indices), self.batch_size):
            items = [dataset[i] for i in indices[start:start + self.batch_size]]
            x, y = (torch.stack([torch.as_tensor(item[k]) for item in items]).to(device)
                    for k in (0, 1))
            pred = model(x)
            loss = torch.nn.functional.cross_entropy(pred, y, reduction="none") \
                if self.loss_fn is None else self.loss_fn(pred, y)
            out.append(loss.detach().reshape(-1).float().cpu())
        return torch.cat(out).numpy()
