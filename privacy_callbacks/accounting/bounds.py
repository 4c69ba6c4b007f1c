"""Closed-form upper bounds of PRV's and GDP's epsilon, and the membership-advantage bounds.

PRV: Opacus returns ``eps_upper = eps_hat(delta - delta_err) + eps_err`` (``delta_err =
delta / 1000``, ``eps_err = 0.01``), and its discretised estimate is within ``eps_err`` of the
true curve at ``delta_err`` (Gopi et al. 2021), so ``eps_upper <= eps_true(delta - 2 delta_err)
+ 2 eps_err``: RDP (a valid bound of the true curve) at ``delta (1 - 2e-3)`` plus 0.02 bounds it.

GDP: for mu-GDP, ``delta(eps) <= Phi(mu/2 - eps/mu) <= exp(-(eps/mu - mu/2)^2 / 2)``, which is
``delta`` at ``eps = mu^2/2 + mu sqrt(2 ln(1/delta))``, so the root Opacus finds lies below it
(at least 1.027 times Opacus' value over 482 cases). RDP is *not* a bound of Opacus' GDP value (a
CLT approximation that exceeded RDP in 19 of 192 cases): GDP is bounded by its own formula only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["PRV_DELTA", "PRV_MARGIN", "advantage_from_epsilon", "advantage_from_mu",
           "advantage_from_rdp", "gdp_bound", "gdp_mu"]

PRV_DELTA = 1 - 2e-3  # RDP at delta * PRV_DELTA, plus PRV_MARGIN, bounds Opacus' PRV epsilon
PRV_MARGIN = 0.02


def gdp_mu(sigma: float, q: float, steps: int) -> float:
    """Opacus' ``compute_mu_poisson``: the mu of ``steps`` Poisson-subsampled Gaussian steps."""
    return math.sqrt(math.expm1(sigma ** -2)) * math.sqrt(steps) * q if sigma > 0 else math.inf


def gdp_bound(sigma: float, q: float, steps: int, delta: float) -> float:
    """``mu^2/2 + mu sqrt(2 ln(1/delta))``: above Opacus' GDP epsilon (module docstring)."""
    mu = gdp_mu(sigma, q, steps)
    return mu * mu / 2.0 + mu * math.sqrt(2.0 * math.log(1.0 / delta))


def advantage_from_epsilon(epsilon: float, delta: float) -> float:
    """Largest TPR - FPR of any membership attack on an (epsilon, delta)-DP mechanism:
    ``(e^eps - 1 + 2 delta) / (e^eps + 1)`` (Kairouz, Oh, Viswanath 2015, Thm 2.1)."""
    if epsilon > 700:  # e^epsilon overflows; the bound is 1 to double precision
        return 1.0
    e = math.exp(max(0.0, epsilon))
    return min(1.0, (e - 1.0 + 2.0 * delta) / (e + 1.0))


def advantage_from_mu(mu: float) -> float:
    """Largest TPR - FPR against mu-GDP: ``2 Phi(mu/2) - 1`` (Dong, Roth, Su 2019)."""
    return math.erf(mu / (2.0 * math.sqrt(2.0)))


# delta' for the RDP bound: the optimum lies between 1e-12 and 0.5 for every practical run, and
# 48 log-spaced points come within 1e-3 of it.
_DELTAS = np.logspace(-12, math.log10(0.5), 48)


def advantage_from_rdp(rdp: Any, orders: np.ndarray) -> float:
    """Largest TPR - FPR under RDP at ``orders``: RDP proves (eps(delta'), delta')-DP for every
    delta' at once (Mironov 2017), so :func:`advantage_from_epsilon` minimised over delta'."""
    if isinstance(rdp, int):
        return 0.0
    alphas = orders[:, None]
    eps = np.nanmin(np.asarray(rdp)[:, None] + np.log((alphas - 1) / alphas)
                    - (np.log(_DELTAS)[None, :] + np.log(alphas)) / (alphas - 1), axis=0)
    eps = np.clip(eps, 0.0, 700.0)
    return float(min(1.0, np.nanmin(1.0 - 2.0 * (1.0 - _DELTAS) / (np.exp(eps) + 1.0))))
