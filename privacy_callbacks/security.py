"""Membership-inference risk: a proven bound every step, and an opt-in empirical attack.

The *membership advantage* of an attack is TPR - FPR when it guesses whether one example was in
the training set (Yeom et al. 2018). Differential privacy caps it for every attack:

* (epsilon, delta)-DP: TPR <= e^epsilon * FPR + delta and 1 - FPR <= e^epsilon * (1 - TPR) + delta
  (Kairouz, Oh, Viswanath 2015, "The composition theorem for differential privacy", Thm 2.1), whose
  best corner gives ``advantage <= (e^epsilon - 1 + 2 delta) / (e^epsilon + 1)``.
* An RDP accountant proves (epsilon(delta'), delta')-DP for *every* delta' at once (Mironov 2017,
  Prop. 3; the conversion Opacus uses), so the bound is the minimum of the above over delta'.
* mu-GDP (Dong, Roth, Su 2019, "Gaussian differential privacy"): the trade-off curve is that of
  N(0, 1) vs N(mu, 1), whose largest TPR - FPR is ``2 Phi(mu / 2) - 1``. Opacus' Gaussian
  accountant derives mu from (sigma, q, steps) with the CLT of that paper (Thm 6, Poisson).
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["MembershipInferenceProbe", "RiskBound", "advantage_from_epsilon", "advantage_from_mu",
           "advantage_from_rdp", "attack_metrics", "attack_results"]


def advantage_from_epsilon(epsilon: float, delta: float) -> float:
    """Largest TPR - FPR of any membership attack on an (epsilon, delta)-DP mechanism.

    ``(e^epsilon - 1 + 2 delta) / (e^epsilon + 1)`` (Kairouz, Oh, Viswanath 2015, Thm 2.1); with
    ``delta = 0`` it is ``tanh(epsilon / 2)``. Capped at 1.
    """
    if epsilon > 700:  # e^epsilon overflows; the bound is 1 to double precision
        return 1.0
    e = math.exp(max(0.0, epsilon))
    return min(1.0, (e - 1.0 + 2.0 * delta) / (e + 1.0))


def advantage_from_mu(mu: float) -> float:
    """Largest TPR - FPR against mu-GDP: ``2 Phi(mu/2) - 1 = erf(mu / (2 sqrt 2))``
    (Dong et al.)."""
    return math.erf(mu / (2.0 * math.sqrt(2.0)))


# delta' grid for the RDP bound: the optimum sits where e^epsilon(delta') and delta' trade off,
# between 1e-12 and 0.5 for every practical run; 48 log-spaced points come within 1e-3 of it.
_DELTA_GRID = np.logspace(-12, math.log10(0.5), 48)


def advantage_from_rdp(rdp: Any, orders: Sequence[float]) -> float:
    """Largest TPR - FPR under (alpha, rdp_alpha)-RDP for all ``orders``.

    The minimum over delta' of :func:`advantage_from_epsilon` at (epsilon(delta'), delta'), with
    epsilon(delta') converted from RDP exactly as Opacus does.
    """
    if isinstance(rdp, int):  # nothing accounted yet
        return 0.0
    alphas = np.asarray(orders, dtype=float)[:, None]
    eps = np.nanmin(np.asarray(rdp, dtype=float)[:, None] + np.log((alphas - 1) / alphas)
                    - (np.log(_DELTA_GRID)[None, :] + np.log(alphas)) / (alphas - 1), axis=0)
    eps = np.clip(eps, 0.0, 700.0)
    return float(min(1.0, np.nanmin(1.0 - 2.0 * (1.0 - _DELTA_GRID) / (np.exp(eps) + 1.0))))


class RiskBound:
    """``membership_inference_risk_score`` for one run: the tightest bound the accountant allows.

    * ``gdp``: :func:`advantage_from_mu` with the mu Opacus' Gaussian accountant uses.
    * others (``rdp``, ``prv``): the smaller of :func:`advantage_from_epsilon` at the reported
      (epsilon, delta) and :func:`advantage_from_rdp` on the same history (RDP composition of the
      subsampled Gaussian is a valid bound whatever accountant reports epsilon).

    :meth:`score` runs on the training thread every step and stays sub-microsecond: the Kairouz
    bound is cached on epsilon, and the RDP bound (~100 us) is computed for a *later* step (5 %
    more steps at the current sigma and q; under a noise schedule at 3 % below the current
    sigma) and reused until then, or until a step comes at a lower sigma or higher q than it
    was computed for. Privacy loss only grows with steps (and falls with sigma), so a bound for
    a later step holds now; it is at most those 5 % of steps (and 3 % of sigma) loose.

    Args:
        accounting: The run's :class:`~privacy_callbacks.accounting.Accounting`.
        delta: The delta epsilon is reported for.
    """

    def __init__(self, accounting: Any, delta: float) -> None:
        self.accounting = accounting
        self.delta = delta
        self._gdp = accounting.mechanism == "gdp"
        self._eps_key: float | None = None
        self._eps_value = 1.0
        self._rdp_key: Any = None
        self._rdp_until = -1
        self._rdp_value = 1.0

    def _holds(self, history: list, n: int, steps: int) -> bool:
        """Whether the cached RDP bound covers ``history``: every step since it was computed
        (at most ``_rdp_until``) came at a sigma and sample rate it was computed for or safer."""
        key = self._rdp_key
        if key is None or key[0] is not history or steps > self._rdp_until:
            return False
        _, checked, sigma, q = key
        if checked > n:
            return False
        for s, r, _ in history[checked - 1:n]:
            if s < sigma or r > q:
                return False
        if checked != n:
            self._rdp_key = (history, n, sigma, q)
        return True

    def score(self, epsilon: float | None, noise_multiplier: float,
              sample_rate: float | None, view: Any = None,
              steps: int | None = None) -> float | None:
        """The bound for the step just accounted (or the one of ``view``, an
        :meth:`Accounting.view` of it); ``None`` while nothing is known."""
        accounting = self.accounting
        history, n, last = accounting.view() if view is None else view
        if self._gdp:
            if last is None:
                return None
            segment = last
            if segment != self._rdp_key:
                sigma, q, steps = segment
                # Opacus' compute_mu_poisson (Dong et al. Thm 6): the mu its accountant uses.
                self._rdp_key = segment
                self._rdp_value = advantage_from_mu(
                    math.sqrt(math.expm1(sigma ** -2)) * math.sqrt(steps) * q)
            return self._rdp_value
        if epsilon is None:
            return None
        if epsilon != self._eps_key:
            self._eps_key, self._eps_value = epsilon, advantage_from_epsilon(epsilon, self.delta)
        if sample_rate is not None and last is not None:
            if steps is None:
                steps = sum(k for _, _, k in history[:n - 1]) + last[2]
            if not self._holds(history, n, steps):
                extra = max(1, steps // 20)
                # Under a noise schedule (more than one segment) the later steps may come at a
                # lower sigma: bound them at 3 % below this one (a grid point the accounting
                # computes ahead), so one value lasts while sigma decays by up to 3 %.
                sigma = noise_multiplier if n <= 1 else noise_multiplier * 0.97
                try:
                    rdp = accounting.rdp_after(extra, sigma, sample_rate, view)
                    value = advantage_from_rdp(rdp, accounting.orders)
                except Exception:  # a bound is never worth a failed step; Kairouz still holds
                    value = 1.0
                self._rdp_key = (history, n, sigma, sample_rate)
                self._rdp_until, self._rdp_value = steps + extra, value
            return min(self._eps_value, self._rdp_value)
        return self._eps_value


def attack_metrics(member_losses: Sequence[float] | np.ndarray,
                   nonmember_losses: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """AUC and best advantage of the loss-threshold attack ("member if loss <= t").

    Args:
        member_losses: Per-example losses on training examples.
        nonmember_losses: Per-example losses on held-out examples.

    Returns:
        ``(auc, advantage)``: the probability that a random member has a lower loss than a random
        non-member (ties count half; Mann-Whitney U), and max over t of TPR - FPR.
    """
    members = np.asarray(member_losses, dtype=float)
    others = np.asarray(nonmember_losses, dtype=float)
    if members.size == 0 or others.size == 0:
        raise ValueError("attack_metrics needs at least one member and one non-member loss")
    scores = np.concatenate([members, others])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size)
    sorted_scores = scores[order]
    # Average ranks over ties so equal losses count half.
    uniq, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    n_m, n_o = members.size, others.size
    u = ranks[n_m:].sum() - n_o * (n_o + 1) / 2.0  # non-members ranked above members
    auc = float(u / (n_m * n_o))
    tpr = np.searchsorted(np.sort(members), uniq, side="right") / n_m
    fpr = np.searchsorted(np.sort(others), uniq, side="right") / n_o
    advantage = float(max(0.0, np.max(tpr - fpr)))
    return auc, advantage


def attack_results(attacks: Sequence[Any]) -> tuple[dict[str, float] | None, float | None]:
    """``({attack_type: score}, audit epsilon lower bound)`` from the trainer's attack callbacks.

    Each callback has ``attack_type`` and ``score`` (``None`` until it measured); an audit also
    has ``epsilon_lower_bound``. ``None`` where nothing was measured yet.
    """
    scores: dict[str, float] = {}
    bound: float | None = None
    for attack in attacks:
        if attack.score is not None:
            scores[attack.attack_type] = attack.score
        value = getattr(attack, "epsilon_lower_bound", None)
        if value is not None:
            bound = value if bound is None else max(bound, value)
    return scores or None, bound


def _sample(dataset: Any, n: int, seed: int) -> list[int]:
    size = len(dataset)
    if size == 0:
        raise ValueError("MembershipInferenceProbe got an empty dataset")
    return sorted(random.Random(seed).sample(range(size), min(n, size)))


class MembershipInferenceProbe(Callback):
    """Runs the loss-threshold membership attack at the end of each validation.

    It computes per-example losses on a fixed random sample of training examples (members) and of
    held-out examples (non-members), and reports the attack's AUC and best advantage
    (TPR - FPR) as ``membership_inference_empirical_auc`` and
    ``membership_inference_empirical_advantage`` through the :class:`PrivacyMonitor` of the same
    trainer. An AUC near 0.5 means the attack cannot tell members apart; the proven bound
    ``membership_inference_risk_score`` caps the advantage of every attack, this one included.

    Costs one forward pass over ``2 * samples`` examples per validation, in eval mode, without
    gradients. The sample is drawn once (``seed``) so successive values are comparable.

    Its results are computed from training records without noise, so they are a release outside
    the reported epsilon (a warning says so when the probe is built): use it on evaluation runs,
    or keep its metrics where the training data may be seen.

    Args:
        members: The training dataset (or a subset of it); items are ``(input, target)``.
        nonmembers: Held-out examples from the same distribution, never trained on.
        samples: Examples drawn from each dataset.
        loss_fn: ``loss_fn(outputs, targets)`` returning one loss per example; cross-entropy by
            default.
        batch_size: Examples per forward pass.
        seed: Seed of the fixed sample.

    Its ``privacy_attack_score{attack_type="loss_threshold"}`` is the attack's best balanced
    accuracy, ``(1 + advantage) / 2`` (0.5 = chance): ``PrivacyAttackDetected`` fires above the
    rules' ``attack_score_threshold`` (0.7 by default). It is a point estimate on ``samples``
    examples per side, not a confidence bound, and members are not chosen by a coin, so it cannot
    disprove the reported epsilon; :class:`~privacy_callbacks.privacy_audit.OneRunAudit` can.

    Attributes:
        auc: Latest AUC, or ``None`` before the first validation.
        advantage: Latest advantage, or ``None``.
    """

    attack_type = "loss_threshold"

    def __init__(self, members: Any, nonmembers: Any, *, samples: int = 256,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 batch_size: int = 256, seed: int = 0) -> None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
            raise ValueError(f"Unexpected value for samples: {samples!r}; use an int >= 2")
        warnings.warn(
            "MembershipInferenceProbe scores training records without noise: its AUC, advantage "
            "and attack score are released outside the reported epsilon. Use it on evaluation "
            "runs, or keep its metrics where the training data may be seen.", stacklevel=2)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Unexpected value for batch_size: {batch_size!r}; use an int >= 1")
        for name, data in (("members", members), ("nonmembers", nonmembers)):
            if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
                raise ValueError(f"Unexpected value for {name}: {type(data).__name__}; use a "
                                 "map-style dataset of (input, target) pairs")
        self.members = members
        self.nonmembers = nonmembers
        self.samples = samples
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.seed = seed
        self.auc: float | None = None
        self.advantage: float | None = None
        self._idx = (_sample(members, samples, seed), _sample(nonmembers, samples, seed + 1))

    @property
    def score(self) -> float | None:
        """Best balanced accuracy of the attack, ``(1 + advantage) / 2``; ``None`` before any."""
        return None if self.advantage is None else 0.5 + self.advantage / 2.0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.auc, self.advantage = self.measure(pl_module)

    def measure(self, model: torch.nn.Module) -> tuple[float, float]:
        """Run the attack on ``model`` now; returns ``(auc, advantage)``."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                member = self._losses(model, self.members, self._idx[0])
                other = self._losses(model, self.nonmembers, self._idx[1])
        finally:
            model.train(was_training)
        return attack_metrics(member, other)

    def _losses(self, model: torch.nn.Module, dataset: Any, indices: list[int]) -> np.ndarray:
        device = next(model.parameters()).device
        out: list[torch.Tensor] = []
        for start in range(0, len(indices), self.batch_size):
            items = [dataset[i] for i in indices[start:start + self.batch_size]]
            x = torch.stack([torch.as_tensor(item[0]) for item in items]).to(device)
            y = torch.stack([torch.as_tensor(item[1]) for item in items]).to(device)
            pred = model(x)
            if self.loss_fn is None:
                loss = torch.nn.functional.cross_entropy(pred, y, reduction="none")
            else:
                loss = self.loss_fn(pred, y)
            out.append(loss.detach().reshape(-1).float().cpu())
        return torch.cat(out).numpy()
