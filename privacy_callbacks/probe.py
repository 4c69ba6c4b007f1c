"""The one module that knows where Opacus keeps things in a Lightning run.

It finds the privacy accountant and the DP optimizers, and reads the mechanism's configuration
(sigma, C, expected batch size) from host-side attributes each step: noise schedulers and adaptive
clipping change them, and reading a Python attribute never touches the device.
"""

from __future__ import annotations

from typing import Any

from opacus import PrivacyEngine
from opacus.accountants.accountant import IAccountant
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import (DistributedUniformWithReplacementSampler,
                                          UniformWithReplacementSampler)

__all__ = ["HOW_TO_WIRE", "accounted_sample_rate", "dp_config", "find_accountant",
           "find_dp_optimizers", "secure_mode", "skip_next_step", "training_data_facts"]

HOW_TO_WIRE = (
    "Wire Opacus as its Lightning example does: create `self.privacy_engine = PrivacyEngine()` in "
    "your LightningModule and return the optimizer from `self.privacy_engine.make_private(...)` "
    "in `configure_optimizers`, or add the `DifferentialPrivacy` callback before `PrivacyMonitor`."
)


def find_dp_optimizers(trainer: Any) -> list[DPOptimizer]:
    """The trainer's Opacus DP optimizers; a clear error when there is none."""
    optimizers = list(getattr(trainer, "optimizers", []) or [])
    found = [opt for opt in optimizers if isinstance(opt, DPOptimizer)]
    if not found:
        kinds = ", ".join(type(opt).__name__ for opt in optimizers) or "none"
        raise RuntimeError(
            f"PrivacyMonitor found no Opacus DPOptimizer among the trainer's optimizers "
            f"(found: {kinds}). {HOW_TO_WIRE}")
    return found


def _as_accountant(obj: Any) -> IAccountant | None:
    if isinstance(obj, IAccountant):
        return obj
    if isinstance(obj, PrivacyEngine):
        return obj.accountant
    return None


def find_accountant(trainer: Any, pl_module: Any, explicit: Any = None) -> IAccountant:
    """The accountant: the one given, else a ``PrivacyEngine`` on the module or a callback."""
    if explicit is not None:
        accountant = _as_accountant(explicit)
        if accountant is None:
            raise ValueError(
                f"Unexpected value for accountant: {explicit!r}. Pass an Opacus accountant "
                "(e.g. `engine.accountant`) or the `PrivacyEngine` itself.")
        return accountant
    candidates = [getattr(pl_module, "privacy_engine", None)]
    candidates += [v for v in vars(pl_module).values() if isinstance(v, PrivacyEngine)]
    candidates += [getattr(cb, "privacy_engine", None) for cb in getattr(trainer, "callbacks", [])]
    for candidate in candidates:
        accountant = _as_accountant(candidate)
        if accountant is not None:
            return accountant
    raise RuntimeError(
        f"PrivacyMonitor found no Opacus PrivacyEngine on {type(pl_module).__name__} or the "
        f"trainer's callbacks. {HOW_TO_WIRE} Or pass it: PrivacyMonitor(accountant=engine).")


def _loaders(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _loaders(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _loaders(v)]
    return [obj] if obj is not None else []


def training_data_facts(trainer: Any) -> tuple[int | None, bool | None]:
    """(training set size, whether every train loader samples as Poisson), ``None`` if unknown.

    Opacus' accountants assume Poisson subsampling, which its ``DPDataLoader``
    (``make_private(poisson_sampling=True)``) implements with a ``UniformWithReplacementSampler``.
    Call once the trainer has loaded its train dataloaders (``on_train_start``).
    """
    loaders = _loaders(getattr(trainer, "train_dataloader", None))
    if not loaders:
        return None, None
    size = 0
    for loader in loaders:
        try:
            size += len(loader.dataset)
        except (AttributeError, TypeError):
            size = None
            break
    poisson = all(isinstance(getattr(loader, "batch_sampler", None),
                             (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler))
                  for loader in loaders)
    return size, poisson


def secure_mode(optimizers: list[DPOptimizer]) -> bool:
    """Whether every DP optimizer draws its noise from a cryptographically secure generator."""
    return bool(optimizers) and all(getattr(opt, "secure_mode", False) for opt in optimizers)


def dp_config(optimizers: list[DPOptimizer]) -> dict[str, Any]:
    """The mechanism's settings for the audit trail: plain values read from host attributes."""
    opt = optimizers[0]
    return {"noise_multiplier": float(opt.noise_multiplier),
            "max_grad_norm": float(opt.max_grad_norm),
            "expected_batch_size": getattr(opt, "expected_batch_size", None),
            "loss_reduction": getattr(opt, "loss_reduction", None),
            "secure_mode": secure_mode(optimizers),
            "optimizer": type(opt).__name__, "optimizers": len(optimizers)}


def _hook_sample_rate(optimizer: DPOptimizer) -> float | None:
    """The per-batch sample rate Opacus' accountant hook multiplies by the accumulated batches.

    ``IAccountant.get_optimizer_hook_fn`` closes over ``sample_rate``; reading it from the
    closure gives the exact float the hook uses, so a predicted step merges with Opacus' own.
    """
    hook = getattr(optimizer, "step_hook", None)
    code = getattr(hook, "__code__", None)
    cells = getattr(hook, "__closure__", None)
    if code is None or not cells:
        return None
    for name, cell in zip(code.co_freevars, cells):
        if name == "sample_rate":
            try:
                value = cell.cell_contents
            except ValueError:
                return None
            return float(value) if isinstance(value, (int, float)) else None
    return None


def accounted_sample_rate(optimizer: DPOptimizer, accumulated: int | None = None) -> float | None:
    """The sample rate Opacus will account for the optimizer's next step, if it can be known.

    Args:
        optimizer: The DP optimizer about to step.
        accumulated: Batches accumulated into that step; by default the optimizer's own count
            (only valid once the step's backward passes ran).
    """
    rate = _hook_sample_rate(optimizer)
    if rate is None:
        return None
    if accumulated is None:
        accumulated = optimizer.accumulated_iterations
    # Same operands and order as the hook: sample_rate * accumulated_iterations.
    return rate * accumulated


def skip_next_step(optimizer: DPOptimizer) -> None:
    """Make the optimizer's next step add no noise, update nothing and account nothing."""
    optimizer.signal_skip_step(do_skip=True)
