"""DifferentialPrivacy: makes an unmodified LightningModule private with Opacus, DDP included."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence, Sized, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.validators import ModuleValidator
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, IterableDataset

from .. import checks, opacus_compat
from .sampling import PoissonBatchSampler, entropy_seed, mixed_seed, poisson_loader

logger = logging.getLogger(__name__)

__all__ = ["DifferentialPrivacy"]


class _SplitNoise:
    """``noise_multiplier`` (accounted, what hooks, guard and schedulers see) also covers a
    statistics release; ``add_noise`` adds the gradient's share."""

    noise_multiplier: float

    def add_noise(self) -> None:
        sigma = self.noise_multiplier
        self.noise_multiplier = opacus_compat.gradient_noise_multiplier(cast(Any, self), sigma)
        try:
            super().add_noise()  # type: ignore[misc]
        finally:
            self.noise_multiplier = sigma


_SPLIT = {cls: type(f"Split{cls.__name__}", (_SplitNoise, cls), {})
          for cls in (DPOptimizer, DistributedDPOptimizer)}


def _unsupported_modules(module: torch.nn.Module, prefix: str = "") -> list[str]:
    """``name (Type): reason`` for the innermost submodules Opacus cannot handle."""
    failing = {name: f"{name or '<root>'} ({type(sub).__name__}): {errors[0]}"
               for name, sub in module.named_modules(prefix=prefix)
               if (errors := ModuleValidator.validate(sub, strict=False))}
    return [reason for n, reason in failing.items()
            if not any(o != n and o.startswith(f"{n}." if n else "") for o in failing)]


def _hooked_roots(module: torch.nn.Module, private: set[Any]) -> list[tuple[str, Any]]:
    """The outermost submodules whose trainable parameters are all private (and mixed ones)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not any(p in private for p in params):
        return []
    if all(p in private for p in params) or any(
            p in private for p in module.parameters(recurse=False) if p.requires_grad):
        return [("", module)]
    return [(f"{name}.{sub_name}" if sub_name else name, sub)
            for name, child in module.named_children()
            for sub_name, sub in _hooked_roots(child, private)]


class DifferentialPrivacy(Callback):
    """Trains any LightningModule with DP-SGD (Opacus), on one process or under DDP.

    It hooks Opacus' per-sample gradients into the module (no wrapper), wraps the chosen
    optimizers in DP optimizers (schedulers keep working: they share ``param_groups``), samples
    the train dataloader as Poisson and accounts each step in :attr:`privacy_engine` (fitting
    twice accumulates). Under DDP every rank draws the same mask over the whole dataset and takes
    its share; rank 0 adds the noise once: epsilon is a one-process run's on the global batch.
    With ``accumulate_grad_batches=k`` a step is charged ``j / len(dataloader)`` for the ``j``
    batches it accumulated, the rate its samples were drawn at. Masks and noise never come from
    torch's global RNG: ``seed_everything`` and a resume never replay those of released steps.

    Args:
        noise_multiplier: Noise multiplier sigma. Give this or ``target_epsilon``.
        max_grad_norm: Per-sample clipping norm C.
        target_epsilon: Calibrate sigma to end at this epsilon (at ``delta``) after ``epochs``,
            else the trainer's ``max_epochs``/``max_steps``.
        delta, epochs, epsilon_tolerance: Of that calibration.
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.
        poisson_sampling: ``False`` keeps the dataloader (accounted as Opacus does then).
        seed: Reproducible masks and noise, mixed with the run's position (steps accounted,
            global step, epoch); by default the operating system's entropy.
        secure_mode: Opacus' secure mode (``torchcsprng``'s ``/dev/urandom``; one process).
        statistics_noise_multiplier: Release a histogram of per-sample gradient norms (for
            ``MechanismMetrics``) with this noise multiplier on each count; it must exceed
            sigma: the gradient noise becomes ``(sigma**-2 - sigma_s**-2) ** -0.5``, so both
            releases are one Gaussian mechanism with sigma, which the accountant records.
        optimizers: The private optimizers: an index, indices, or a predicate; all by default
            (a GAN: ``[1]``, its discriminator's).
        modules: Submodules to hook; by default those holding the private parameters.
    """

    def __init__(self, *, noise_multiplier: float | None = None, max_grad_norm: float = 1.0,
                 target_epsilon: float | None = None, delta: float | None = None,
                 epochs: int | None = None, accountant: str = "rdp",
                 poisson_sampling: bool = True, epsilon_tolerance: float = 0.01,
                 seed: int | None = None, secure_mode: bool = False,
                 statistics_noise_multiplier: float | None = None,
                 optimizers: int | Sequence[int] | Callable[[torch.optim.Optimizer], bool]
                 | None = None, modules: Sequence[str] | None = None) -> None:
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(
                f"Unexpected combination noise_multiplier={noise_multiplier!r}, target_epsilon="
                f"{target_epsilon!r}: pass exactly one, e.g. DifferentialPrivacy(noise_multiplier="
                "1.1, max_grad_norm=1.0) or DifferentialPrivacy(target_epsilon=8.0, delta=1e-5)")
        self.noise_multiplier = checks.number("noise_multiplier", noise_multiplier,
                                              "a finite number >= 0", low_ok=True, none=True)
        self.target_epsilon = checks.number("target_epsilon", target_epsilon, none=True)
        self.delta = checks.number("delta", delta, "a number in (0, 1), typically below 1/(training"
                                   " set size)", high=1.0, none=target_epsilon is None)
        self.max_grad_norm = checks.number("max_grad_norm", max_grad_norm)
        self.epochs = checks.number("epochs", epochs, "a number of epochs >= 1, or None for the "
                                    "trainer's plan", low=1, low_ok=True, integer=True, none=True)
        if accountant not in ("rdp", "prv", "gdp"):
            raise ValueError(f"Unexpected value for accountant: {accountant!r}; use rdp/prv/gdp")
        self.poisson_sampling = checks.flag("poisson_sampling", poisson_sampling)
        self.epsilon_tolerance = checks.number("epsilon_tolerance", epsilon_tolerance)
        self.seed = checks.number("seed", seed, "an integer, or None for the operating system's "
                                  "entropy", low=-math.inf, integer=True, none=True)
        self.secure_mode = checks.flag("secure_mode", secure_mode)
        self._secure_rng = self._secure_generator() if secure_mode else None
        self.statistics_noise_multiplier = checks.number(
            "statistics_noise_multiplier", statistics_noise_multiplier, none=True)
        self._check_split(self.noise_multiplier)
        if isinstance(optimizers, int) and not isinstance(optimizers, bool):
            optimizers = (optimizers,)
        if not (optimizers is None or callable(optimizers) or _names(optimizers, int)):
            raise ValueError(f"Unexpected value for optimizers: {optimizers!r}; use an index into"
                             " configure_optimizers' optimizers (e.g. 1), a list of indices, or a "
                             "predicate taking an optimizer, or None for all of them")
        if not (modules is None or _names(modules, str)):
            raise ValueError(f"Unexpected value for modules: {modules!r}; use a list of the "
                             "LightningModule's submodule names, e.g. ['discriminator']")
        self.optimizers: Any = optimizers if optimizers is None or callable(optimizers) \
            else tuple(cast(Sequence[int], optimizers))
        self.modules = None if modules is None else tuple(modules)
        self.privacy_engine = PrivacyEngine(accountant=accountant)
        self.sample_rate: float | None = None
        self._expected_batch_size: float | None = None
        self._optimizers: list[DPOptimizer] = []
        self._unchecked: list[tuple[int, DPOptimizer]] = []
        self._hooks: list[GradSampleHooks] = []
        self._strategy: Any = None

    def _secure_generator(self) -> torch.Generator:
        if self.seed is not None:
            raise ValueError(f"Unexpected combination seed={self.seed!r}, secure_mode=True: pass "
                             "one (secure mode cannot be reproduced)")
        try:
            import torchcsprng  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ValueError("Unexpected value for secure_mode: True needs the torchcsprng "
                             "package; install it, or use secure_mode=False") from exc
        return torchcsprng.create_random_device_generator("/dev/urandom")

    def _check_split(self, sigma: float | None) -> None:
        sigma_s = self.statistics_noise_multiplier
        if sigma_s is not None and sigma is not None and sigma > 0 and not sigma_s > sigma:
            raise ValueError(
                f"Unexpected value for statistics_noise_multiplier: {sigma_s!r} with noise "
                f"multiplier {sigma!r}; use a larger one (no gradient noise sigma_g = (sigma^-2 -"
                f" sigma_s^-2)^-1/2 exists otherwise), e.g. {10 * sigma:g}")

    # -- lifecycle ---------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = self._strategy = trainer.strategy
        original = strategy.process_dataloader
        # Lightning has no hook that replaces the train dataloader; the strategy's public
        # process_dataloader sees it once prepared (sharded) from any source (module, datamodule,
        # fit()). An instance attribute shadows the method; teardown pops it.
        vars(strategy)["process_dataloader"] = lambda loader: self._private_dataloader(
            trainer, original(loader)) if trainer.training else original(loader)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = list(trainer.strategy.optimizers)
        if any(isinstance(opt, DPOptimizer) for opt in optimizers):
            raise ValueError(f"{type(pl_module).__name__} already returns an Opacus DPOptimizer "
                             "from configure_optimizers: remove its make_private(...) call or the"
                             " DifferentialPrivacy callback, not both")
        chosen = self._chosen(optimizers)
        private = {p for i in chosen for g in optimizers[i].param_groups for p in g["params"]}
        roots = self._roots(pl_module, private)
        unsupported = [reason for name, sub in roots for reason in _unsupported_modules(sub, name)]
        if unsupported:
            raise ValueError(
                f"Opacus cannot compute per-sample gradients for {type(pl_module).__name__}; "
                "unsupported modules:\n  " + "\n  ".join(unsupported) + "\nReplace them before "
                "fitting, e.g. `model = ModuleValidator.fix(model)` (from opacus.validators "
                "import ModuleValidator), or keep them out of the private part with "
                "DifferentialPrivacy(optimizers=..., modules=...).")
        self._hooks = [GradSampleHooks(sub, batch_first=True, loss_reduction="mean", strict=True)
                       for _, sub in roots]
        distributed = trainer.world_size > 1 and torch.distributed.is_initialized()
        cls = DistributedDPOptimizer if distributed else DPOptimizer
        cls = cls if self.statistics_noise_multiplier is None else _SPLIT[cls]
        wrapped = list(optimizers)
        for i in chosen:
            dp = wrapped[i] = cls(
                optimizers[i], noise_multiplier=self.noise_multiplier or 0.0,
                max_grad_norm=self.max_grad_norm, loss_reduction="mean",
                expected_batch_size=self._expected_batch_size or 1.0, secure_mode=self.secure_mode,
                generator=self._generator(trainer, "noise", optimizers[i]))
            dp.attach_step_hook(self._account)
            if self.statistics_noise_multiplier is not None:
                dp.statistics_noise_multiplier = self.statistics_noise_multiplier
            # LearningRateMonitor names an optimizer by its `.optimizer` when it has one (as for
            # DeepSpeed's wrapper): one `lr-SGD` column, not `lr-SGD` and `lr-DPOptimizer`.
            dp.optimizer = optimizers[i]
        # Schedulers keep pointing at the original optimizers: a DPOptimizer's param_groups ARE
        # the original's, and the original's step (called by the DPOptimizer) is what they count.
        trainer.strategy.optimizers = wrapped
        self._optimizers = [wrapped[i] for i in chosen]
        self._unchecked = [(i, wrapped[i]) for i in chosen]
        self._configure()
        # The DP optimizer reduces the noised gradients itself; DDP's all-reduce is model-wide,
        # so an optimizer left public still needs it.
        model = trainer.strategy.model
        if distributed and len(chosen) == len(optimizers) and isinstance(model, DDP):
            try:
                model.register_comm_hook(state=None, hook=noop_hook)
            except RuntimeError:  # the user registered a communication hook already
                logger.info("DDP communication hook kept; gradients are reduced twice")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sample_rate is None:
            raise RuntimeError(
                "DifferentialPrivacy did not see a training DataLoader (found "
                f"{type(trainer.train_dataloader).__name__}): Poisson sampling and accounting need "
                "a torch DataLoader over a map-style dataset from train_dataloader().")
        for opt in self._optimizers:  # the checkpoint (history, global step) is restored by now
            opt.generator = self._generator(trainer, "noise", opt)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        # Opacus fails on a private parameter without per-sample gradients with an error that
        # names neither this callback nor the fix; check each private optimizer's first step.
        entry = next((e for e in self._unchecked if e[1] is optimizer), None)
        if entry is None:
            return
        self._unchecked.remove(entry)
        (index, dp), names = entry, {p: n for n, p in pl_module.named_parameters()}
        missing = [names.get(p, "?") for p in dp.params if p.grad_sample is None]
        if missing:
            kind = type(dp.original_optimizer).__name__
            raise ValueError(
                f"DifferentialPrivacy made optimizer {index} ({kind}) private, but its parameters "
                f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} got no per-sample"
                " gradients in this backward pass (e.g. a GAN's generator, which never sees the "
                "private data, or a submodule left out of modules=). Choose the private "
                "optimizer(s) with DifferentialPrivacy(optimizers=[...]) (an index or a "
                "predicate), and the hooked submodules with modules=[...].")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips teardown when a fit raises

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._strategy is not None:
            vars(self._strategy).pop("process_dataloader", None)
        for hooks in self._hooks:
            hooks.remove_hooks()
        self._strategy, self._hooks, self._optimizers, self._unchecked = None, [], [], []

    # -- wiring ------------------------------------------------------------------------------

    def _chosen(self, optimizers: list[Any]) -> list[int]:
        """Indices of the optimizers to make private."""
        if self.optimizers is None:
            return list(range(len(optimizers)))
        if callable(self.optimizers):
            chosen = [i for i, opt in enumerate(optimizers) if self.optimizers(opt)]
            if not chosen:
                raise ValueError(f"DifferentialPrivacy(optimizers={self.optimizers!r}) chose none "
                                 f"of the {len(optimizers)} optimizers: make the predicate "
                                 "return True for the private one(s)")
            return chosen
        if any(i >= len(optimizers) for i in self.optimizers):
            raise ValueError(f"Unexpected value for optimizers: DifferentialPrivacy(optimizers="
                             f"{list(self.optimizers)!r}) but configure_optimizers returns "
                             f"{len(optimizers)} optimizers; use indices below {len(optimizers)}")
        return sorted(set(self.optimizers))

    def _roots(self, pl_module: pl.LightningModule, private: set[Any]) -> list[tuple[str, Any]]:
        """The submodules to hook: those named in ``modules``, else those holding ``private``."""
        if self.modules is None:
            return _hooked_roots(pl_module, private)
        children = dict(pl_module.named_modules())
        for name in self.modules:
            if name not in children:
                raise ValueError(f"Unexpected value in modules: {name!r} is not a submodule of "
                                 f"{type(pl_module).__name__} (its children: "
                                 f"{[n for n, _ in pl_module.named_children()]})")
        return [(name, children[name]) for name in self.modules]

    def accounted_sample_rate(self, optimizer: DPOptimizer,
                              accumulated: int | None = None) -> float | None:
        """The rate charged for a step of ``accumulated`` batches (default: the optimizer's
        count so far), asked by the budget guard before it runs; ``None`` before the data."""
        return None if self.sample_rate is None else self.sample_rate * (
            optimizer.accumulated_iterations if accumulated is None else accumulated)

    def _account(self, optimizer: DPOptimizer) -> None:
        # The step hook Opacus calls after the noise: charged at the rate the batches were drawn.
        self.privacy_engine.accountant.step(noise_multiplier=optimizer.noise_multiplier,
                                            sample_rate=self.accounted_sample_rate(optimizer))

    def _generator(self, trainer: pl.Trainer, purpose: str, opt: Any = None) -> torch.Generator:
        """A fresh generator on ``opt``'s device: OS entropy, or ``seed`` mixed with where the
        run stands."""
        if self._secure_rng is not None:
            return self._secure_rng
        params = [p for g in opt.param_groups for p in g["params"]] if opt is not None else []
        seed = entropy_seed() if self.seed is None else mixed_seed(
            self.seed, purpose, trainer.global_rank if purpose == "noise" else 0,
            sum(int(s) for _, _, s in self.privacy_engine.accountant.history),
            trainer.global_step, trainer.current_epoch)
        return torch.Generator(device=params[0].device if params else "cpu").manual_seed(seed)

    def _configure(self) -> None:
        if self.noise_multiplier is not None and self._expected_batch_size is not None:
            for opt in self._optimizers:
                opt.noise_multiplier = self.noise_multiplier
                opt.expected_batch_size = self._expected_batch_size

    def _private_dataloader(self, trainer: pl.Trainer, dataloader: object) -> object:
        if not isinstance(dataloader, DataLoader) or isinstance(dataloader.dataset,
                                                                IterableDataset):
            raise ValueError(
                f"Unexpected train dataloader {type(dataloader).__name__}: DifferentialPrivacy "
                "needs a torch DataLoader over a map-style dataset (Poisson sampling picks "
                "samples by index)")
        batches, world = len(dataloader), trainer.world_size
        size = len(cast(Sized, dataloader.dataset))
        accumulate = max(1, min(int(trainer.accumulate_grad_batches), batches))
        self.sample_rate = 1.0 / batches
        # Opacus' expected batch size is each rank's share of the global one: each rank averages
        # over it and the DP optimizer's all-reduce averages the ranks.
        self._expected_batch_size = max(1, int(size * self.sample_rate)) / world
        steps = batches // accumulate
        if self.target_epsilon is not None:
            self.noise_multiplier = self._calibrate(trainer, steps, min(1.0, accumulate / batches))
            self._check_split(self.noise_multiplier)
        self._configure()
        if not self.poisson_sampling:
            return dataloader
        if self._secure_rng is not None and world > 1:
            raise ValueError(f"Unexpected combination secure_mode=True with {world} processes: "
                             "ranks cannot share a random-device generator's Poisson masks")
        generator = self._secure_rng or torch.Generator().manual_seed(trainer.strategy.broadcast(
            int(self._generator(trainer, "sampler").initial_seed()), src=0))  # masks agree
        return poisson_loader(dataloader, PoissonBatchSampler(
            num_samples=size, logical_rate=min(1.0, self.sample_rate * accumulate), steps=steps,
            accumulate=accumulate, rank=trainer.global_rank, world_size=world,
            generator=generator))

    def _calibrate(self, trainer: pl.Trainer, steps_per_epoch: int, rate: float) -> float:
        limits = [self.epochs * steps_per_epoch] if self.epochs is not None else [
            n for n in (trainer.max_steps, (trainer.max_epochs or 0) * steps_per_epoch) if n > 0]
        if not limits:
            raise ValueError("DifferentialPrivacy(target_epsilon=...) needs a planned length: "
                             "set the Trainer's max_epochs or max_steps, or pass epochs=")
        sigma = float(get_noise_multiplier(
            target_epsilon=self.target_epsilon, target_delta=self.delta, sample_rate=rate,
            steps=min(limits), accountant=self.privacy_engine.accountant.mechanism(),
            epsilon_tolerance=self.epsilon_tolerance))
        logger.info("DifferentialPrivacy: noise multiplier %.4g for epsilon %g at delta %g after "
                    "%d steps", sigma, self.target_epsilon, self.delta, min(limits))
        return sigma

    # -- checkpoint state --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        accountant = self.privacy_engine.accountant
        return {"accountant": accountant.mechanism(),
                "history": [list(seg) for seg in accountant.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        accountant = self.privacy_engine.accountant
        if state_dict.get("accountant") != accountant.mechanism():
            raise ValueError(f"Unexpected accountant {state_dict.get('accountant')!r} in the "
                             f"checkpoint; this callback uses {accountant.mechanism()!r}")
        # Resuming must not forget the privacy already spent.
        accountant.history = [tuple(seg) for seg in state_dict["history"]]


def _names(value: Any, kind: type) -> bool:
    """``value`` is a non-empty sequence of ``kind`` (indices >= 0, names non-empty)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and bool(value) \
        and all(isinstance(v, kind) and not isinstance(v, bool) and (
            cast(int, v) >= 0 if kind is int else bool(v)) for v in value)
