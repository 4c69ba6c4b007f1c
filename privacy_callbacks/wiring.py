"""DifferentialPrivacy: makes an unmodified LightningModule private with Opacus, DDP included."""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
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
from torch.utils.data import DataLoader, IterableDataset, Sampler

logger = logging.getLogger(__name__)

__all__ = ["DifferentialPrivacy"]

_ACCOUNTANTS = ("rdp", "prv", "gdp")


class _PoissonBatchSampler(Sampler[list[int]]):
    """Poisson sampling of the whole dataset, identical on every rank, cut into physical batches.

    Every rank draws the same inclusion mask (its generator is seeded with a seed broadcast from
    rank 0), so the global batch holds each sample independently with probability
    ``logical_rate`` -- exactly the batch of a one-process run -- and no sample lands on two
    ranks. Each selected sample then goes to one of the ``accumulate`` physical batches of the
    window uniformly at random (same generator), so the first ``j`` physical batches together
    are a Poisson sample at rate ``j * logical_rate / accumulate``: a window cut short after
    ``j`` batches is exactly the sample its step is charged for. Rank ``r`` takes every
    ``world_size``-th index of each physical batch. Empty batches are yielded, never skipped:
    every rank must take the same number of steps.
    """

    def __init__(self, *, num_samples: int, logical_rate: float, steps: int, accumulate: int,
                 rank: int, world_size: int, generator: torch.Generator) -> None:
        self.num_samples = num_samples
        self.logical_rate = logical_rate
        self.steps = steps
        self.accumulate = accumulate
        self.rank = rank
        self.world_size = world_size
        self._generator = generator

    def __len__(self) -> int:
        return self.steps * self.accumulate

    def __iter__(self) -> Iterator[list[int]]:
        gen = self._generator
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=gen) < self.logical_rate
            selected = mask.nonzero().flatten()
            slot = torch.randint(0, self.accumulate, (len(selected),), generator=gen)
            for j in range(self.accumulate):
                yield selected[slot == j][self.rank::self.world_size].tolist()


def _entropy_seed() -> int:
    """A seed from the operating system's entropy, which no ``seed_everything`` or resume
    replays."""
    return secrets.randbits(62)


def _mixed_seed(seed: int, *parts: object) -> int:
    """A 62-bit seed from ``seed`` and the run's position, so no position reuses a stream."""
    text = ":".join(str(x) for x in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 2


def split_noise(noise_multiplier: float, statistics_noise_multiplier: float) -> float:
    """The gradient's noise multiplier when statistics are released with their own noise.

    Two Gaussian releases of one sampled batch, each of sensitivity 1 after scaling (the clipped
    sum over C, a histogram where one record moves one bucket), with multipliers ``sigma_g`` and
    ``sigma_s`` compose to exactly one Gaussian mechanism with ``sigma**-2 = sigma_g**-2 +
    sigma_s**-2`` -- what the accountant records (the pattern of Opacus' adaptive clipping).
    """
    sigma, sigma_s = float(noise_multiplier), float(statistics_noise_multiplier)
    if sigma == 0:
        return 0.0
    if not sigma_s > sigma:
        raise ValueError(
            f"Unexpected value for statistics_noise_multiplier: {sigma_s!r} with noise_multiplier "
            f"{sigma!r}: the statistics' noise must be larger than the accounted noise multiplier "
            f"(no gradient noise sigma_g = (sigma^-2 - sigma_s^-2)^-1/2 exists otherwise); use, "
            f"e.g., statistics_noise_multiplier={10 * sigma:g}")
    return (sigma ** -2 - sigma_s ** -2) ** -0.5


class SplitNoise:
    """Mixin for a DP optimizer: ``noise_multiplier`` (accounted) covers a statistics release too.

    ``add_noise`` adds the gradient's share ``split_noise(noise_multiplier,
    statistics_noise_multiplier)``; everything else (the accountant's hook, the budget guard,
    noise schedulers) keeps reading and writing the accounted ``noise_multiplier``.
    """

    noise_multiplier: float  # the DP optimizer's own attribute
    statistics_noise_multiplier: float

    def add_noise(self) -> None:
        sigma = self.noise_multiplier
        self.noise_multiplier = split_noise(sigma, self.statistics_noise_multiplier)
        try:
            super().add_noise()  # type: ignore[misc]
        finally:
            self.noise_multiplier = sigma


class _SplitDPOptimizer(SplitNoise, DPOptimizer):
    """A DPOptimizer whose accounted noise also covers a noised statistics release."""


class _SplitDistributedDPOptimizer(SplitNoise, DistributedDPOptimizer):
    """A DistributedDPOptimizer whose accounted noise also covers a noised statistics release."""


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"Unexpected value for {name}: {value!r}; use a positive finite number")
    return float(value)


def _unsupported_modules(module: torch.nn.Module, prefix: str = "") -> list[str]:
    """``name (Type): reason`` for the innermost submodules Opacus cannot handle."""
    failing: dict[str, str] = {}
    for name, sub in module.named_modules(prefix=prefix):
        errors = ModuleValidator.validate(sub, strict=False)
        if errors:
            failing[name] = f"{name or '<root>'} ({type(sub).__name__}): {errors[0]}"
    innermost = [n for n in failing
                 if not any(o != n and o.startswith(f"{n}." if n else "") for o in failing)]
    return [failing[n] for n in innermost]


def _hooked_roots(module: torch.nn.Module, private: set[torch.nn.Parameter]
                  ) -> list[tuple[str, torch.nn.Module]]:
    """The outermost submodules whose trainable parameters are all private (and mixed ones)."""
    roots: list[tuple[str, torch.nn.Module]] = []

    def visit(name: str, sub: torch.nn.Module) -> None:
        params = [p for p in sub.parameters() if p.requires_grad]
        if not any(p in private for p in params):
            return
        own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
        if all(p in private for p in params) or any(p in private for p in own):
            roots.append((name, sub))
            return
        for child_name, child in sub.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", module)
    return roots


class DifferentialPrivacy(Callback):
    """Trains any LightningModule with DP-SGD (Opacus), on one process or under DDP.

    Without changing the module it attaches Opacus' per-sample gradient hooks (no wrapper
    module), wraps the configured optimizers (all of them, or those chosen with ``optimizers``)
    in Opacus DP optimizers (LR schedulers keep working: they share the optimizer's
    ``param_groups``), replaces the train dataloader by a
    Poisson-sampling one and accounts every step in :attr:`privacy_engine`'s accountant, which
    :class:`~privacy_callbacks.PrivacyMonitor` finds by itself.

    Under DDP (any number of processes) the mechanism is the one-process mechanism on the global
    batch: every rank draws the same Poisson mask over the whole dataset and takes its share;
    the sample rate and the expected batch size are the global ones; the Gaussian noise is added
    once (on global rank 0) before the gradients are averaged (Opacus' ``DistributedDPOptimizer``),
    so the noise on the averaged gradient is ``sigma * C / global_batch`` and epsilon equals a
    one-process run with the same global batch. DDP's own gradient all-reduce is replaced by a
    no-op hook because the DP optimizer reduces the noised gradients itself.

    The sample rate is ``1 / len(train dataloader)`` as Lightning prepares it (under DDP the
    default ``use_distributed_sampler=True`` shards it, so a per-device ``batch_size`` of ``b``
    gives a global expected batch of ``b * world_size``). With ``accumulate_grad_batches=k`` one
    Poisson batch of rate ``k / len`` is drawn per optimizer step and each of its samples is put
    into one of the ``k`` physical batches at random; a step is charged ``j / len`` for the ``j``
    physical batches it accumulated, which is exactly the rate its samples were drawn at, also
    for a window cut short at the end of an epoch (as Opacus' accountant hook charges it).

    Randomness: the Poisson masks and the Gaussian noise come from generators seeded from the
    operating system's entropy, never from torch's global RNG, so ``seed_everything`` and a
    resume from a checkpoint never replay masks or noise of released steps. ``seed=`` makes a
    run reproducible on purpose; the seed is then mixed with the steps already accounted, the
    global step and the epoch, so a resume and every reloaded dataloader continue with fresh
    streams.

    GANs and other multi-optimizer modules: only the chosen optimizers are private, and only
    the submodules holding their parameters get per-sample hooks (and must be supported by
    Opacus), e.g. ``DifferentialPrivacy(noise_multiplier=1.0, optimizers=[1])`` for a GAN whose
    second optimizer trains the discriminator, the only part that sees the private data. Every
    private optimizer step is accounted once.

    Args:
        noise_multiplier: Noise multiplier sigma. Give this or ``target_epsilon``.
        max_grad_norm: Per-sample clipping norm C.
        target_epsilon: Calibrate sigma so that training ends at this epsilon (with ``delta``),
            as Opacus' ``make_private_with_epsilon`` does, for the planned steps: ``epochs``, else
            the trainer's ``max_epochs``/``max_steps``.
        delta: Delta for ``target_epsilon``.
        epochs: Epochs to calibrate sigma for; the trainer's plan by default.
        accountant: Opacus accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.
        poisson_sampling: Replace the train dataloader by Poisson sampling (what the privacy
            analysis assumes). ``False`` keeps the dataloader and accounts as Opacus does then.
        epsilon_tolerance: Tolerance of the sigma calibration.
        seed: Make the Poisson masks and the noise reproducible (for debugging and tests):
            both generators are seeded from ``seed`` mixed with the steps already accounted, the
            global step and the epoch. By default (``None``) both are seeded from the operating
            system's entropy (the sampling seed is drawn on rank 0 and broadcast, so every rank
            draws the same masks); ``seed_everything`` has no effect on them.
        secure_mode: Opacus' secure mode: noise and Poisson masks from ``torchcsprng``'s
            ``/dev/urandom`` generator, and noise drawn as Opacus' defence against
            floating-point attacks does. Needs ``torchcsprng`` and one process (the masks
            must agree across ranks, and a random-device generator cannot be shared).
        statistics_noise_multiplier: Release a histogram of per-sample gradient norms each step
            (:class:`~privacy_callbacks.PrivacyMonitor` publishes it, with the clipped fraction
            read from its buckets above C) with Gaussian noise of this multiplier on each count.
            It must be larger than the noise multiplier sigma: the gradient noise is raised to
            ``sigma_g = (sigma**-2 - sigma_s**-2) ** -0.5`` so that the two releases together are
            one Gaussian mechanism with sigma, which is what the accountant records. ``None``
            releases no histogram.
        optimizers: Which of ``configure_optimizers``' optimizers are private: an index, a
            sequence of indices, or a predicate called with each optimizer; all by default.
        modules: Names of the LightningModule's submodules that get per-sample gradient hooks
            (e.g. ``["discriminator"]``); by default the submodules holding the private
            optimizers' parameters.

    Attributes:
        privacy_engine: The Opacus ``PrivacyEngine`` whose accountant records every step; it
            lives as long as the callback, so fitting twice accumulates the privacy spent.
        noise_multiplier: Sigma in use (calibrated once the train dataloader is known).
        sample_rate: Sample rate of one physical batch, once the train dataloader is known.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        target_epsilon: float | None = None,
        delta: float | None = None,
        epochs: int | None = None,
        accountant: str = "rdp",
        poisson_sampling: bool = True,
        epsilon_tolerance: float = 0.01,
        seed: int | None = None,
        secure_mode: bool = False,
        statistics_noise_multiplier: float | None = None,
        optimizers: int | Sequence[int] | Callable[[torch.optim.Optimizer], bool] | None = None,
        modules: Sequence[str] | None = None,
    ) -> None:
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(
                f"Unexpected combination noise_multiplier={noise_multiplier!r}, target_epsilon="
                f"{target_epsilon!r}: pass exactly one, e.g. DifferentialPrivacy(noise_multiplier="
                "1.1, max_grad_norm=1.0) or DifferentialPrivacy(target_epsilon=8.0, delta=1e-5)")
        if noise_multiplier is not None:
            _positive("noise_multiplier", noise_multiplier, allow_zero=True)
        if target_epsilon is not None:
            _positive("target_epsilon", target_epsilon)
            if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
                raise ValueError(f"Unexpected value for delta: {delta!r}; target_epsilon needs a "
                                 "delta in (0, 1), typically below 1/(training set size)")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)
                                   or epochs < 1):
            raise ValueError(f"Unexpected value for epochs: {epochs!r}; use a positive integer "
                             "or None for the trainer's max_epochs/max_steps")
        if accountant not in _ACCOUNTANTS:
            raise ValueError(f"Unexpected value for accountant: {accountant!r}; use one of "
                             f"{', '.join(_ACCOUNTANTS)}")
        self.max_grad_norm = _positive("max_grad_norm", max_grad_norm)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.delta = None if delta is None else float(delta)
        self.epochs = epochs
        self.poisson_sampling = poisson_sampling
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Unexpected value for seed: {seed!r}; use an integer or None")
        self.seed = seed
        if not isinstance(secure_mode, bool):
            raise ValueError(f"Unexpected value for secure_mode: {secure_mode!r}; "
                             "use True or False")
        if secure_mode and seed is not None:
            raise ValueError(f"Unexpected combination seed={seed!r}, secure_mode=True: secure mode "
                             "draws from the operating system's generator and cannot be "
                             "reproduced; pass one of them")
        self.secure_mode = secure_mode
        self._secure_rng: torch.Generator | None = None
        if secure_mode:
            try:
                import torchcsprng  # type: ignore[import-not-found]
            except ImportError as exc:
                raise ValueError(
                    "Unexpected value for secure_mode: True needs the torchcsprng package "
                    "(Opacus' cryptographically secure generator), which is not installed: "
                    "install a torchcsprng build for your torch version, or use "
                    "secure_mode=False") from exc
            self._secure_rng = torchcsprng.create_random_device_generator("/dev/urandom")
        if isinstance(optimizers, int) and not isinstance(optimizers, bool):
            optimizers = (optimizers,)
        if optimizers is not None and not callable(optimizers) and (
                isinstance(optimizers, (str, bytes)) or not isinstance(optimizers, Sequence)
                or not optimizers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                         for i in optimizers)):
            raise ValueError(f"Unexpected value for optimizers: {optimizers!r}; use an index "
                             "into configure_optimizers' optimizers (e.g. 1), a list of indices, "
                             "or a predicate taking an optimizer, or None for all of them")
        if modules is not None and (isinstance(modules, str) or not isinstance(modules, Sequence)
                                    or not modules
                                    or not all(isinstance(m, str) and m for m in modules)):
            raise ValueError(f"Unexpected value for modules: {modules!r}; use a list of the "
                             "LightningModule's submodule names, e.g. ['discriminator']")
        self.optimizers = optimizers if callable(optimizers) or optimizers is None \
            else tuple(optimizers)
        self.modules = None if modules is None else tuple(modules)
        self.epsilon_tolerance = _positive("epsilon_tolerance", epsilon_tolerance)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        if statistics_noise_multiplier is not None:
            _positive("statistics_noise_multiplier", statistics_noise_multiplier)
            if self.noise_multiplier is not None:
                split_noise(self.noise_multiplier, statistics_noise_multiplier)  # raises, naming it
        self.statistics_noise_multiplier = (None if statistics_noise_multiplier is None
                                            else float(statistics_noise_multiplier))
        self.sample_rate: float | None = None
        self.privacy_engine = PrivacyEngine(accountant=accountant)
        self._expected_batch_size: float | None = None
        self._optimizers: list[DPOptimizer] = []
        self._hooks: list[GradSampleHooks] | None = None
        self._unchecked: list[tuple[int, DPOptimizer]] = []
        self._strategy: Any = None

    # -- lifecycle ---------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        original = strategy.process_dataloader

        def process_dataloader(dataloader: object) -> object:
            dataloader = original(dataloader)
            return self._private_dataloader(trainer, dataloader) if trainer.training else dataloader

        # The strategy's process_dataloader sees the train dataloader after Lightning prepared it
        # (distributed sampler included) from any source: module hook, datamodule or fit().
        # An instance attribute shadowing the method; teardown pops it.
        vars(strategy)["process_dataloader"] = process_dataloader
        self._strategy = strategy

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.make_private(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sample_rate is None:
            raise RuntimeError(
                "DifferentialPrivacy did not see a training DataLoader (found "
                f"{type(trainer.train_dataloader).__name__}): Poisson sampling and accounting need "
                "a torch DataLoader over a map-style dataset from train_dataloader().")
        # Checkpoint state (history, global step) is restored by now, whatever the strategy.
        for opt in self._optimizers:
            opt.generator = self._generator(trainer, "noise", opt.params[0].device
                                            if opt.params else torch.device("cpu"))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        # Lightning skips the teardown hook when a fit raises: unhook the module here.
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._strategy is not None:
            vars(self._strategy).pop("process_dataloader", None)
            self._strategy = None
        if self._hooks is not None:
            for hooks in self._hooks:
                hooks.remove_hooks()
            self._hooks = None
        self._optimizers = []
        self._unchecked = []

    # -- wiring ------------------------------------------------------------------------------

    def make_private(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook the module and wrap the optimizers; idempotent within one fit.

        Called from ``on_fit_start``; :class:`~privacy_callbacks.PrivacyMonitor` calls it too,
        so the two callbacks work in either order.
        """
        if self._hooks is not None:
            return
        optimizers = list(trainer.strategy.optimizers)
        if any(isinstance(opt, DPOptimizer) for opt in optimizers):
            raise ValueError(
                f"{type(pl_module).__name__} already returns an Opacus DPOptimizer from "
                "configure_optimizers: remove its make_private(...) call or the "
                "DifferentialPrivacy callback, not both")
        chosen = self._chosen(optimizers)
        private = {p for i in chosen for group in optimizers[i].param_groups
                   for p in group["params"]}
        roots = self._roots(pl_module, private)
        unsupported = [reason for name, sub in roots for reason in _unsupported_modules(sub, name)]
        if unsupported:
            raise ValueError(
                f"Opacus cannot compute per-sample gradients for {type(pl_module).__name__}; "
                "unsupported modules:\n  " + "\n  ".join(unsupported) + "\nReplace them before "
                "fitting, e.g. `model = ModuleValidator.fix(model)` "
                "(from opacus.validators import ModuleValidator), or keep them out of the private "
                "part with DifferentialPrivacy(optimizers=..., modules=...).")
        self._hooks = [GradSampleHooks(sub, batch_first=True, loss_reduction="mean", strict=True)
                       for _, sub in roots]
        distributed = trainer.world_size > 1 and torch.distributed.is_initialized()
        cls = DistributedDPOptimizer if distributed else DPOptimizer
        if self.statistics_noise_multiplier is not None:
            cls = _SplitDistributedDPOptimizer if distributed else _SplitDPOptimizer
        wrapped = list(optimizers)
        for i in chosen:
            opt = optimizers[i]
            params = [p for group in opt.param_groups for p in group["params"]]
            device = params[0].device if params else torch.device("cpu")
            dp = cls(opt, noise_multiplier=self.noise_multiplier or 0.0,
                     max_grad_norm=self.max_grad_norm,
                     expected_batch_size=self._expected_batch_size or 1.0,
                     loss_reduction="mean", generator=self._generator(trainer, "noise", device),
                     secure_mode=self.secure_mode)
            dp.attach_step_hook(self._account)
            if self.statistics_noise_multiplier is not None:
                dp.statistics_noise_multiplier = self.statistics_noise_multiplier
            # LearningRateMonitor names an optimizer by its `.optimizer` when it has one (as for
            # DeepSpeed's wrapper): one `lr-SGD` column, not `lr-SGD` and `lr-DPOptimizer`.
            dp.optimizer = opt
            wrapped[i] = dp
        # Schedulers keep pointing at the original optimizers: a DPOptimizer's param_groups ARE
        # the original's, and the original's step (called by the DPOptimizer) is the one the
        # scheduler counts.
        trainer.strategy.optimizers = wrapped
        self._optimizers = [wrapped[i] for i in chosen]
        self._unchecked = [(i, wrapped[i]) for i in chosen]
        self._configure()
        # The no-op hook is model-wide: an optimizer left public needs DDP's own reduction.
        if distributed and len(chosen) == len(optimizers):
            self._disable_ddp_allreduce(trainer)

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
        bad = [i for i in self.optimizers if i >= len(optimizers)]
        if bad:
            raise ValueError(f"Unexpected value for optimizers: DifferentialPrivacy(optimizers="
                             f"{list(self.optimizers)!r}) but configure_optimizers returns "
                             f"{len(optimizers)} optimizers; use indices below {len(optimizers)}")
        return sorted(set(self.optimizers))

    def _roots(self, pl_module: pl.LightningModule, private: set[torch.nn.Parameter]
               ) -> list[tuple[str, torch.nn.Module]]:
        """The submodules to hook: the ones named in ``modules``, else those holding ``private``."""
        if self.modules is None:
            return _hooked_roots(pl_module, private)
        roots = []
        for name in self.modules:
            try:
                roots.append((name, pl_module.get_submodule(name)))
            except AttributeError:
                names = [n for n, _ in pl_module.named_children()]
                raise ValueError(f"Unexpected value in modules: {name!r} is not a submodule of "
                                 f"{type(pl_module).__name__} (its children: {names})") from None
        return roots

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        # Opacus fails on a private parameter without per-sample gradients with an error that
        # names neither this callback nor the fix; check each private optimizer's first step.
        if not self._unchecked:
            return
        entry = next((e for e in self._unchecked if e[1] is optimizer), None)
        if entry is None:
            return
        self._unchecked.remove(entry)
        index, dp = entry
        names = {p: n for n, p in pl_module.named_parameters()}
        missing = [names.get(p, "?") for p in dp.params
                   if getattr(p, "grad_sample", None) is None]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(
                f"DifferentialPrivacy made optimizer {index} "
                f"({type(dp.original_optimizer).__name__}) private, but its parameters {shown} "
                "got no per-sample gradients in this "
                "backward pass (e.g. a GAN's generator, which never sees the private data, or a "
                "submodule left out of modules=). Choose the private optimizer(s) with "
                "DifferentialPrivacy(optimizers=[...]) (an index or a predicate), and the hooked "
                "submodules with modules=[...].")

    def _disable_ddp_allreduce(self, trainer: pl.Trainer) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
        from torch.nn.parallel import DistributedDataParallel

        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            try:
                model.register_comm_hook(state=None, hook=noop_hook)
            except RuntimeError:  # the user registered a communication hook already
                logger.info("DDP communication hook kept; gradients are reduced twice")

    def accounted_sample_rate(self, optimizer: DPOptimizer,
                              accumulated: int | None = None) -> float | None:
        """The sample rate this callback accounts for the optimizer's next step.

        The rate of one physical batch times the batches accumulated into the step (as Opacus'
        accountant hook computes it); ``None`` before the train dataloader is known. The budget
        guard asks for it before the step runs.

        Args:
            optimizer: The DP optimizer about to step.
            accumulated: Batches accumulated into that step; by default the optimizer's own
                count (only valid once the step's backward passes ran).
        """
        if self.sample_rate is None:
            return None
        if accumulated is None:
            accumulated = optimizer.accumulated_iterations
        return self.sample_rate * accumulated

    def _account(self, optimizer: DPOptimizer) -> None:
        # Opacus' accountant hook: the rate of one physical batch times the batches accumulated.
        self.privacy_engine.accountant.step(
            noise_multiplier=optimizer.noise_multiplier,
            sample_rate=self.accounted_sample_rate(optimizer))

    def _generator(self, trainer: pl.Trainer, purpose: str,
                   device: torch.device) -> torch.Generator:
        """A fresh generator: OS entropy, or ``seed`` mixed with where the run stands."""
        if self._secure_rng is not None:
            return self._secure_rng
        if self.seed is None:
            seed = _entropy_seed()
        else:
            accounted = sum(int(s) for _, _, s in self.privacy_engine.accountant.history)
            seed = _mixed_seed(self.seed, purpose, trainer.global_rank if purpose == "noise"
                               else 0, accounted, trainer.global_step, trainer.current_epoch)
        return torch.Generator(device=device).manual_seed(seed)

    def _configure(self) -> None:
        if self.noise_multiplier is None or self._expected_batch_size is None:
            return
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
        batches = len(dataloader)
        dataset_size = len(cast(Sized, dataloader.dataset))  # map-style, checked above
        world = trainer.world_size
        accumulate = max(1, min(int(trainer.accumulate_grad_batches), batches))
        self.sample_rate = 1.0 / batches
        # Opacus' expected batch size is the global one; each rank averages over its share and
        # the DP optimizer's all-reduce averages the ranks.
        self._expected_batch_size = max(1, int(dataset_size * self.sample_rate)) / world
        steps_per_epoch = batches // accumulate
        if self.target_epsilon is not None:
            self.noise_multiplier = self._calibrate(trainer, steps_per_epoch, accumulate)
            if self.statistics_noise_multiplier is not None:
                split_noise(self.noise_multiplier, self.statistics_noise_multiplier)
        self._configure()
        if not self.poisson_sampling:
            return dataloader
        if self._secure_rng is not None:
            if world > 1:
                raise ValueError(
                    f"Unexpected combination secure_mode=True with {world} processes: every rank "
                    "must draw the same Poisson masks, which a random-device generator cannot "
                    "give; train on one process or use secure_mode=False")
            generator = self._secure_rng
        else:
            # Every rank must draw the same masks: rank 0's seed is broadcast.
            seed = trainer.strategy.broadcast(
                int(self._generator(trainer, "sampler", torch.device("cpu")).initial_seed()),
                src=0)
            generator = torch.Generator().manual_seed(seed)
        sampler = _PoissonBatchSampler(
            num_samples=dataset_size, logical_rate=min(1.0, self.sample_rate * accumulate),
            steps=steps_per_epoch, accumulate=accumulate, rank=trainer.global_rank,
            world_size=world, generator=generator)
        sample = dataloader.dataset[0]
        fields = sample if isinstance(sample, (tuple, list)) else None
        collate = wrap_collate_with_empty(
            collate_fn=dataloader.collate_fn,
            sample_empty_shapes=None if fields is None else [(0, *shape_safe(x)) for x in fields],
            dtypes=None if fields is None else [dtype_safe(x) for x in fields])
        extra: dict[str, Any] = ({"prefetch_factor": dataloader.prefetch_factor,
                  "persistent_workers": dataloader.persistent_workers}
                 if dataloader.num_workers else {})
        return DataLoader(dataloader.dataset, batch_sampler=sampler, collate_fn=collate,
                          num_workers=dataloader.num_workers, pin_memory=dataloader.pin_memory,
                          timeout=dataloader.timeout, worker_init_fn=dataloader.worker_init_fn,
                          multiprocessing_context=dataloader.multiprocessing_context, **extra)

    def _calibrate(self, trainer: pl.Trainer, steps_per_epoch: int, accumulate: int) -> float:
        if self.epochs is not None:
            steps = self.epochs * steps_per_epoch
        else:
            limits = []
            if trainer.max_steps is not None and trainer.max_steps > 0:
                limits.append(trainer.max_steps)
            if trainer.max_epochs is not None and trainer.max_epochs > 0:
                limits.append(trainer.max_epochs * steps_per_epoch)
            if not limits:
                raise ValueError("DifferentialPrivacy(target_epsilon=...) needs a planned length: "
                                 "set the Trainer's max_epochs or max_steps, or pass epochs=")
            steps = min(limits)
        assert self.delta is not None and self.sample_rate is not None
        sigma = get_noise_multiplier(
            target_epsilon=self.target_epsilon, target_delta=self.delta,
            sample_rate=min(1.0, self.sample_rate * accumulate), steps=steps,
            accountant=self.privacy_engine.accountant.mechanism(),
            epsilon_tolerance=self.epsilon_tolerance)
        logger.info("DifferentialPrivacy: noise multiplier %.4g for epsilon %g at delta %g "
                    "after %d steps", sigma, self.target_epsilon, self.delta, steps)
        return float(sigma)

    # -- checkpoint state -------------------------------------------------------------------

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
