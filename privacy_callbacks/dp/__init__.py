"""DifferentialPrivacy: makes an unmodified LightningModule private with Opacus, DDP included."""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import warnings
from typing import Any, Callable, Iterator, Sequence, Sized, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.validators import ModuleValidator
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, IterableDataset, Sampler

from .. import checks, opacus_compat

logger = logging.getLogger(__name__)

__all__ = ["DifferentialPrivacy", "PoissonBatchSampler"]


class _SplitNoise:
    """The accounted sigma also covers a statistics release: the gradient gets its share."""

    def add_noise(self: Any) -> None:
        sigma = self.noise_multiplier
        self.noise_multiplier = opacus_compat.gradient_noise_multiplier(self, sigma)
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


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson sampling of the whole dataset, identical on every rank, cut into physical batches.

    Every rank draws the same mask (a one-process run's) and takes every ``world_size``-th
    selected sample. Each goes to one of its window's ``accumulate`` batches at random: the first
    ``j`` are a Poisson sample at ``j * logical_rate / accumulate``, the rate a window cut short
    is charged. Empty batches are yielded: every rank takes the same steps.
    """

    poisson_sampling = True  # read by the compliance audit: the accountant's assumption holds

    def __init__(self, *, num_samples: int, logical_rate: float, steps: int, accumulate: int,
                 rank: int, world_size: int, generator: torch.Generator) -> None:
        self.num_samples, self.logical_rate, self.steps = num_samples, logical_rate, steps
        self.accumulate, self.rank, self.world_size = accumulate, rank, world_size
        self.generator = generator

    def __len__(self) -> int:
        return self.steps * self.accumulate

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.logical_rate
            selected = mask.nonzero().flatten()
            slot = torch.randint(0, self.accumulate, (len(selected),), generator=self.generator)
            for j in range(self.accumulate):
                yield selected[slot == j][self.rank::self.world_size].tolist()


def poisson_loader(dataloader: DataLoader, sampler: PoissonBatchSampler) -> DataLoader:
    """``dataloader``'s dataset and worker settings with batches from ``sampler``; an empty batch
    keeps the samples' shapes and dtypes (Opacus' collate), so its step runs and is accounted."""
    sample = dataloader.dataset[0]
    fields = sample if isinstance(sample, (tuple, list)) else None
    collate = wrap_collate_with_empty(
        collate_fn=dataloader.collate_fn,
        sample_empty_shapes=None if fields is None else [(0, *shape_safe(x)) for x in fields],
        dtypes=None if fields is None else [dtype_safe(x) for x in fields])
    workers = {k: getattr(dataloader, k) for k in ("prefetch_factor", "persistent_workers")
               if dataloader.num_workers}
    return DataLoader(dataloader.dataset, batch_sampler=sampler, collate_fn=collate,
                      num_workers=dataloader.num_workers, pin_memory=dataloader.pin_memory,
                      timeout=dataloader.timeout, worker_init_fn=dataloader.worker_init_fn,
                      multiprocessing_context=dataloader.multiprocessing_context, **workers)


def mixed_seed(seed: int, *parts: object) -> int:
    """A 62-bit seed from ``seed`` and the run's position, so no position reuses a stream."""
    text = ":".join(str(x) for x in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 2


def _items(value: Any, kind: type) -> bool:
    """A non-empty sequence of ``kind``: indices >= 0, or non-empty names."""
    return isinstance(value, Sequence) and not isinstance(value, str) and bool(value) and all(
        type(v) is kind and (cast(int, v) >= 0 if kind is int else v != "") for v in value)


class DifferentialPrivacy(Callback):
    """Trains any LightningModule with DP-SGD (Opacus), on one process or under DDP.

    It hooks per-sample gradients into the module (no wrapper), wraps the chosen optimizers in
    DP optimizers (schedulers keep working), samples the train dataloader as Poisson (under DDP:
    one mask, each rank its share; epsilon is a one-process run's) and accounts each step in
    :attr:`privacy_engine` at the rate its batches were drawn at (``j / len(dataloader)`` for
    ``j`` accumulated). Masks and noise never come from torch's global RNG: no
    ``seed_everything`` or resume replays them.

    Args:
        noise_multiplier: Sigma (C is ``max_grad_norm``), or ``target_epsilon`` at ``delta``
            after ``epochs`` (else the trainer's plan), within ``epsilon_tolerance``.
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.
        poisson_sampling: ``False`` keeps the dataloader (accounted as Opacus does then).
        seed: Reproducible masks and noise, mixed with the run's position (steps accounted,
            global step, epoch); by default the operating system's entropy.
        secure_mode: Opacus' secure mode (``torchcsprng``'s ``/dev/urandom``; one process).
        statistics_noise_multiplier: Also release the per-sample norm histogram (for
            ``MechanismMetrics``) with this noise on each count, above sigma: the gradient's
            is then ``(sigma**-2 - sigma_s**-2) ** -0.5``, so that both releases are the one
            Gaussian mechanism with sigma that the accountant records.
        optimizers: The private optimizers: an index, indices or a predicate; all by default.
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
            raise ValueError(f"Unexpected combination noise_multiplier={noise_multiplier!r}, "
                             f"target_epsilon={target_epsilon!r}: pass exactly one")
        self.noise_multiplier = checks.number("noise_multiplier", noise_multiplier,
                                              "a finite number >= 0", low_ok=True, none=True)
        self.target_epsilon = checks.number("target_epsilon", target_epsilon, none=True)
        self.delta = checks.number("delta", delta, "a number in (0, 1)", high=1.0,
                                   none=target_epsilon is None)
        self.max_grad_norm = checks.number("max_grad_norm", max_grad_norm)
        self.epochs = checks.number("epochs", epochs, "a number of epochs >= 1", low=1,
                                    low_ok=True, integer=True, none=True)
        if accountant not in ("rdp", "prv", "gdp"):
            raise ValueError(f"Unexpected value for accountant: {accountant!r}; use rdp/prv/gdp")
        self.poisson_sampling = checks.flag("poisson_sampling", poisson_sampling)
        self.epsilon_tolerance = checks.number("epsilon_tolerance", epsilon_tolerance)
        self.seed = checks.number("seed", seed, "an int", low=-math.inf, integer=True, none=True)
        self.secure_mode = checks.flag("secure_mode", secure_mode)
        self.statistics_noise_multiplier = checks.number(
            "statistics_noise_multiplier", statistics_noise_multiplier, none=True)
        self._check_split(self.noise_multiplier)
        optimizers = [optimizers] if isinstance(optimizers, int) else optimizers
        if not (optimizers is None or callable(optimizers) or _items(optimizers, int)):
            raise ValueError(f"Unexpected value for optimizers: {optimizers!r}; use an index, "
                             "indices or a predicate")
        if not (modules is None or _items(modules, str)):
            raise ValueError(f"Unexpected value for modules: {modules!r}; use submodule names")
        self.optimizers: Any = list(optimizers) if isinstance(optimizers, Sequence) else optimizers
        self.modules = None if modules is None else tuple(modules)
        # The engine only holds the accountant; the noise's generator is ours (secure_mode).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Secure RNG turned off")
            self.privacy_engine = PrivacyEngine(accountant=accountant)
        self.sample_rate: float | None = None
        self._secure_rng = None
        if secure_mode and seed is not None:
            raise ValueError(f"Unexpected combination seed={seed!r}, secure_mode=True: pass one")
        if secure_mode:
            try:
                import torchcsprng  # type: ignore[import-not-found]
            except ImportError as exc:
                raise ValueError("Unexpected value for secure_mode: True needs the torchcsprng "
                                 "package; install it, or use secure_mode=False") from exc
            self._secure_rng = torchcsprng.create_random_device_generator("/dev/urandom")
        self._optimizers: list[DPOptimizer] = []
        self._unchecked: list[DPOptimizer] = []  # their first step checks the per-sample grads
        self._hooks: list[GradSampleHooks] = []

    def _check_split(self, sigma: float | None) -> None:
        sigma_s = self.statistics_noise_multiplier
        if sigma_s is not None and sigma is not None and sigma > 0 and not sigma_s > sigma:
            raise ValueError(f"Unexpected value for statistics_noise_multiplier: {sigma_s!r} with"
                             f" sigma {sigma!r}; use a larger one (the gradient keeps (sigma^-2 -"
                             f" sigma_s^-2)^-1/2), e.g. {10 * sigma:g}")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        original = trainer.strategy.process_dataloader
        # No Lightning hook replaces the train dataloader; the strategy's public process_
        # dataloader sees it, prepared, from any source: an instance attribute until teardown.
        vars(trainer.strategy)["process_dataloader"] = lambda loader: self._private_dataloader(
            trainer, original(loader)) if trainer.training else original(loader)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers, kind = list(trainer.strategy.optimizers), type(pl_module).__name__
        if any(isinstance(opt, DPOptimizer) for opt in optimizers):
            raise ValueError(f"{kind} already returns an Opacus DPOptimizer from configure_"
                             "optimizers: remove its make_private(...) or this callback")
        chosen = self._chosen(optimizers)
        private = {p for i in chosen for g in optimizers[i].param_groups for p in g["params"]}
        names = dict(pl_module.named_modules())
        if unknown := [n for n in self.modules or () if n not in names]:
            raise ValueError(f"Unexpected value in modules: {unknown}; not submodules of {kind}")
        roots = _hooked_roots(pl_module, private) if self.modules is None else [
            (n, names[n]) for n in self.modules]
        unsupported = [reason for name, sub in roots for reason in _unsupported_modules(sub, name)]
        if unsupported:
            raise ValueError(f"Opacus cannot compute per-sample gradients for {kind}; unsupported "
                             "modules:\n  " + "\n  ".join(unsupported) + "\nReplace them (e.g. "
                             "`ModuleValidator.fix(model)` from opacus.validators) or keep them "
                             "out with DifferentialPrivacy(optimizers=..., modules=...).")
        self._hooks = [GradSampleHooks(sub, batch_first=True, loss_reduction="mean", strict=True)
                       for _, sub in roots]
        distributed = trainer.world_size > 1 and torch.distributed.is_initialized()
        cls = DistributedDPOptimizer if distributed else DPOptimizer
        cls = cls if self.statistics_noise_multiplier is None else _SPLIT[cls]
        wrapped = list(optimizers)
        for i in chosen:  # the data sets sigma and batch size; on_train_start the generator
            dp = wrapped[i] = cls(optimizers[i], noise_multiplier=self.noise_multiplier or 0.0,
                                  max_grad_norm=self.max_grad_norm, expected_batch_size=1,
                                  loss_reduction="mean", secure_mode=self.secure_mode)
            dp.attach_step_hook(self._account)
            dp.statistics_noise_multiplier = self.statistics_noise_multiplier
            dp.optimizer = optimizers[i]  # so LearningRateMonitor logs `lr-SGD`, not two columns
        # Schedulers keep the original optimizers: same param_groups, and their step counts.
        trainer.strategy.optimizers = wrapped
        self._optimizers = [wrapped[i] for i in chosen]
        self._unchecked = list(self._optimizers)
        # DP optimizers reduce the noised gradients; DDP's all-reduce is for public ones only.
        model = trainer.strategy.model
        if distributed and len(chosen) == len(optimizers) and isinstance(model, DDP):
            try:
                model.register_comm_hook(state=None, hook=noop_hook)
            except RuntimeError:  # the user registered a communication hook already
                logger.info("DDP communication hook kept; gradients are reduced twice")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sample_rate is None:  # no train dataloader came through process_dataloader
            raise RuntimeError("DifferentialPrivacy saw no train DataLoader to sample and account")
        for opt in self._optimizers:  # the checkpoint (history, global step) is restored by now
            device = next((p.device for p in opt.params), torch.device("cpu"))
            opt.generator = self._secure_rng or torch.Generator(device=device).manual_seed(
                self._seed(trainer, "noise"))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        # Opacus' error for a private parameter without per-sample gradients names no fix.
        if not any(optimizer is dp for dp in self._unchecked):
            return
        self._unchecked.remove(optimizer)
        names = {p: n for n, p in pl_module.named_parameters()}
        missing = [names.get(p, "?") for p in optimizer.params if p.grad_sample is None]
        if missing:
            raise ValueError(
                f"DifferentialPrivacy made optimizer {trainer.optimizers.index(optimizer)} "
                f"({type(optimizer.original_optimizer).__name__}) private, but "
                f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} got no per-sample "
                "gradients (a GAN's generator never sees private data): choose them with "
                "DifferentialPrivacy(optimizers=[...], modules=[...])")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips teardown when a fit raises

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            vars(trainer.strategy).pop("process_dataloader", None)
            for hooks in self._hooks:
                hooks.remove_hooks()
            self._hooks, self._optimizers, self._unchecked = [], [], []

    def _chosen(self, optimizers: list[Any]) -> list[int]:
        """Indices of the optimizers to make private."""
        n, pick = len(optimizers), self.optimizers
        chosen = list(range(n)) if pick is None else sorted(set(pick)) if not callable(pick) \
            else [i for i, opt in enumerate(optimizers) if pick(opt)]
        if not chosen or chosen[-1] >= n:
            raise ValueError(f"Unexpected value for optimizers: DifferentialPrivacy(optimizers="
                             f"{pick!r}) but configure_optimizers returns {n} optimizers; use "
                             f"indices below {n}, or a predicate true for the private ones")
        return chosen

    def accounted_sample_rate(self, optimizer: DPOptimizer, accumulated: int) -> float | None:
        """The rate charged for a step of ``accumulated`` batches (the budget guard asks before
        it runs); ``None`` before the data."""
        return None if self.sample_rate is None else self.sample_rate * accumulated

    def _account(self, optimizer: DPOptimizer) -> None:  # Opacus' step hook, after the noise
        self.privacy_engine.accountant.step(noise_multiplier=optimizer.noise_multiplier,
                                            sample_rate=self.accounted_sample_rate(
                                                optimizer, optimizer.accumulated_iterations))

    def _seed(self, trainer: pl.Trainer, purpose: str) -> int:
        """OS entropy, or ``seed`` mixed with where the run stands: no position reuses one."""
        return secrets.randbits(62) if self.seed is None else mixed_seed(
            self.seed, purpose, trainer.global_rank if purpose == "noise" else 0,
            sum(int(s) for _, _, s in self.privacy_engine.accountant.history),
            trainer.global_step, trainer.current_epoch)

    def _private_dataloader(self, trainer: pl.Trainer, loader: object) -> object:
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            raise ValueError(f"Unexpected train dataloader {type(loader).__name__}: Poisson "
                             "sampling needs a torch DataLoader over a map-style dataset")
        batches, world, size = len(loader), trainer.world_size, len(cast(Sized, loader.dataset))
        accumulate = max(1, min(int(trainer.accumulate_grad_batches), batches))
        self.sample_rate, steps = 1.0 / batches, batches // accumulate
        if self.target_epsilon is not None:
            self.noise_multiplier = self._calibrate(trainer, steps, min(1.0, accumulate / batches))
            self._check_split(self.noise_multiplier)
        for opt in self._optimizers:  # expected batch: each rank's share (the ranks average)
            opt.noise_multiplier = self.noise_multiplier
            opt.expected_batch_size = max(1, int(size * self.sample_rate)) / world
        if not self.poisson_sampling:
            return loader
        if self._secure_rng is not None and world > 1:
            raise ValueError(f"Unexpected combination secure_mode=True with {world} processes: "
                             "ranks cannot share a random-device generator's Poisson masks")
        generator = self._secure_rng or torch.Generator().manual_seed(trainer.strategy.broadcast(
            self._seed(trainer, "sampler"), src=0))  # one mask on every rank
        return poisson_loader(loader, PoissonBatchSampler(
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
        logger.info("DifferentialPrivacy: sigma %.4g for epsilon %g at delta %g after %d steps",
                    sigma, self.target_epsilon, self.delta, min(limits))
        return sigma

    def state_dict(self) -> dict[str, Any]:
        accountant = self.privacy_engine.accountant
        return {"accountant": accountant.mechanism(),
                "history": [list(seg) for seg in accountant.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        accountant = self.privacy_engine.accountant
        if state_dict.get("accountant") != accountant.mechanism():
            raise ValueError(f"Unexpected accountant {state_dict.get('accountant')!r} in the "
                             f"checkpoint; this callback uses {accountant.mechanism()!r}")
        accountant.history = [tuple(seg) for seg in state_dict["history"]]  # the privacy spent
