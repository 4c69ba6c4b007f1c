"""The one module that knows where Opacus keeps things in a Lightning run.

It finds the privacy accountant and the DP optimizers, and reads the mechanism's configuration
(sigma, C, expected batch size) from host-side attributes each step: noise schedulers and adaptive
clipping change them, and reading a Python attribute never touches the device.

:class:`MechanismProbe` measures the mechanism itself (clipping, noise, signal, overhead). It
reuses what Opacus computes: the per-sample norms of hooks mode exist only inside
``clip_and_accumulate``, where the one expression that touches them is ``max_grad_norm /
(per_sample_norms + 1e-6)``; for the length of that call ``max_grad_norm`` is a look-alike of the
same value (a ``float`` subclass or a tensor view) that keeps the divisor and lets the division
run unchanged. Ghost clipping keeps its norms on the module (``per_sample_gradient_norms``). The
accountant's step hook is never touched.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from opacus import PrivacyEngine
from opacus.accountants.accountant import IAccountant
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
)
from opacus.optimizers.optimizer import _generate_noise
from opacus.optimizers import (
    AdaClipDPOptimizer,
    DistributedDPOptimizer,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
)
from opacus.utils.uniform_sampler import (DistributedUniformWithReplacementSampler,
                                          UniformWithReplacementSampler)

from .catalog import by_name
from .device import Buckets as _Buckets
from .device import DeviceStats, Marks, OverheadModel, SlotPool
from .wiring import SplitNoise, _PoissonBatchSampler, split_noise

logger = logging.getLogger(__name__)

# The calibration pass runs backward with Opacus' per-sample hooks disabled but still registered,
# and PyTorch then warns "Full backward hook is firing ..." from here on every fit. Only warnings
# attributed to this module are silenced (a filter installed once: one set inside the pass would
# reset Python's once-only registry and repeat the training step's own warnings).
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning,
                        module=__name__)

__all__ = ["HOW_TO_WIRE", "AccountedRate", "MechanismProbe", "accounted_sample_rate",
           "discard_skipped_step", "dp_config", "find_accountant", "find_dp_optimizers",
           "gradient_noise_multiplier", "global_expected_batch_size", "secure_mode",
           "skip_next_step", "training_data_facts"]

HOW_TO_WIRE = (
    "Wire Opacus as its Lightning example does: create `self.privacy_engine = PrivacyEngine()` in "
    "your LightningModule and return the optimizer from `self.privacy_engine.make_private(...)` "
    "in `configure_optimizers`, or add the `DifferentialPrivacy` callback (in any order)."
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
    (``make_private(poisson_sampling=True)``) implements with a ``UniformWithReplacementSampler``
    and the ``DifferentialPrivacy`` callback with its own Poisson batch sampler.
    Call once the trainer has loaded its train dataloaders (``on_train_start``).
    """
    loaders = _loaders(getattr(trainer, "train_dataloader", None))
    if not loaders:
        return None, None
    size: int | None
    try:
        size = sum(len(loader.dataset) for loader in loaders)
    except (AttributeError, TypeError):
        size = None
    poisson = all(isinstance(getattr(loader, "batch_sampler", None),
                             (UniformWithReplacementSampler,
                              DistributedUniformWithReplacementSampler, _PoissonBatchSampler))
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
            "statistics_noise_multiplier": getattr(opt, "statistics_noise_multiplier", None),
            "secure_mode": secure_mode(optimizers),
            "optimizer": type(opt).__name__, "optimizers": len(optimizers)}


def _hook_sample_rate(optimizer: DPOptimizer) -> float | None:
    """The per-batch sample rate Opacus' accountant hook multiplies by the accumulated batches.

    ``IAccountant.get_optimizer_hook_fn`` closes over ``sample_rate``; reading it from the
    closure gives the exact float the hook uses, so a predicted step merges with Opacus' own.
    """
    hook = getattr(optimizer, "step_hook", None)
    cached = _HOOK_RATES.get(id(hook))
    if cached is not None and cached[0] is hook:
        return cached[1]  # a closure's cell is never rebound: read once per hook
    code = getattr(hook, "__code__", None)
    cells = getattr(hook, "__closure__", None)
    rate = None
    if code is not None and cells:
        for name, cell in zip(code.co_freevars, cells):
            if name == "sample_rate":
                try:
                    value = cell.cell_contents
                except ValueError:
                    break
                rate = float(value) if isinstance(value, (int, float)) else None
                break
    if hook is not None:
        if len(_HOOK_RATES) > 64:
            _HOOK_RATES.clear()
        _HOOK_RATES[id(hook)] = (hook, rate)
    return rate


# id(hook) -> (hook, its closure's sample rate): the hook is kept, so its id is not reused.
_HOOK_RATES: dict[int, tuple[Any, float | None]] = {}


def accumulated_iterations(optimizer: DPOptimizer) -> int:
    """Opacus' ``accumulated_iterations`` from the first trained parameter alone.

    Opacus' property walks every parameter (and a model has hundreds) to check that they
    agree, and raises from the optimizer step when they do not -- so that step is never
    released, whatever is read here. One parameter says the count every released step has.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                samples = getattr(p, "grad_sample", None)
                if isinstance(samples, list):
                    return len(samples)
                if isinstance(samples, torch.Tensor):
                    return 1
                return optimizer.accumulated_iterations  # raises, with Opacus' message
    return optimizer.accumulated_iterations


def accounted_sample_rate(optimizer: DPOptimizer, accumulated: int | None = None) -> float | None:
    """The sample rate Opacus will account for the optimizer's next step, if it can be known.

    Two hooks are understood: Opacus' own (``PrivacyEngine.make_private``), whose per-batch rate
    sits in its closure, and a hook that is a bound method of an object with an
    ``accounted_sample_rate(optimizer, accumulated)`` method (the ``DifferentialPrivacy``
    callback), which says the rate itself. ``None`` for any other hook, or none.

    Args:
        optimizer: The DP optimizer about to step.
        accumulated: Batches accumulated into that step; by default the optimizer's own count
            (only valid once the step's backward passes ran).
    """
    hook = getattr(optimizer, "step_hook", None)
    told = getattr(getattr(hook, "__self__", None), "accounted_sample_rate", None)
    if callable(told):
        rate = told(optimizer, accumulated_iterations(optimizer) if accumulated is None
                    else accumulated)
        return None if rate is None else float(rate)
    rate = _hook_sample_rate(optimizer)
    if rate is None:
        return None
    if accumulated is None:
        accumulated = accumulated_iterations(optimizer)
    # Same operands and order as the hook: sample_rate * accumulated_iterations.
    return rate * accumulated


class AccountedRate:
    """:func:`accounted_sample_rate` of one optimizer, in a few attribute reads per step.

    Caches what a step does not change: Opacus' hook and its closure's rate, and the first
    trained parameter, whose ``grad_sample`` says the batches accumulated. Anything else
    (another hook, a hook that states its own rate, a parameter no longer trained, no
    per-sample gradients) takes :func:`accounted_sample_rate` itself.
    """

    __slots__ = ("optimizer", "_hook", "_rate", "_param")

    def __init__(self, optimizer: DPOptimizer) -> None:
        self.optimizer = optimizer
        self._hook: Any = None
        self._rate: float | None = None
        self._param: Any = None

    def __call__(self) -> float | None:
        optimizer = self.optimizer
        rate, param = self._rate, self._param
        if (rate is not None and param is not None and param.requires_grad
                and getattr(optimizer, "step_hook", None) is self._hook):
            samples = getattr(param, "grad_sample", None)
            if type(samples) is list:
                return rate * len(samples)  # as the hook: sample_rate * accumulated_iterations
            if samples is not None:
                # A tensor (Opacus keeps a tensor or a list there): one backward pass. Not
                # isinstance(): torch.Tensor's metaclass makes that a Python call.
                return rate * 1
        return self._slow()

    def _slow(self) -> float | None:
        optimizer = self.optimizer
        hook = getattr(optimizer, "step_hook", None)
        self._hook, self._rate, self._param = hook, None, None
        if not callable(getattr(getattr(hook, "__self__", None), "accounted_sample_rate",
                                None)):
            self._rate = _hook_sample_rate(optimizer)
            self._param = next((p for group in optimizer.param_groups
                                for p in group["params"] if p.requires_grad), None)
        return accounted_sample_rate(optimizer)


def gradient_noise_multiplier(optimizer: DPOptimizer, sigma: float | None = None) -> float:
    """The noise multiplier of the noise ``add_noise`` puts on the summed clipped gradients
    (``sigma``: the optimizer's noise multiplier at that step; now by default)."""
    sigma = float(optimizer.noise_multiplier) if sigma is None else sigma
    if isinstance(optimizer, SplitNoise):
        return split_noise(sigma, optimizer.statistics_noise_multiplier)
    if isinstance(optimizer, AdaClipDPOptimizer):  # its add_noise leaves a share to its count
        return (sigma ** -2 - (2 * optimizer.unclipped_num_std) ** -2) ** -0.5 if sigma > 0 else 0.0
    return sigma


def global_expected_batch_size(optimizer: DPOptimizer) -> float | None:
    """The expected batch over every rank; Opacus keeps each rank's share on the optimizer."""
    size = getattr(optimizer, "expected_batch_size", None)
    if not size:
        return None
    return float(size) * (getattr(optimizer, "world_size", 1)
                          if isinstance(optimizer, DistributedDPOptimizer) else 1)


def skip_next_step(optimizer: DPOptimizer) -> None:
    """Make the optimizer's next step add no noise, update nothing and account nothing.

    Opacus still clips and sums the step's per-sample gradients into ``p.summed_grad`` and keeps
    them after a skipped step (for its virtual batches); call :func:`discard_skipped_step` once
    the step ran so that no later step releases them.
    """
    optimizer.signal_skip_step(do_skip=True)


def discard_skipped_step(optimizer: DPOptimizer) -> None:
    """Drop what a skipped step left behind: summed and per-sample gradients, the skip flag.

    Afterwards the next step holds exactly the batches accumulated after this call, which is
    what ``accumulated_iterations`` (the length of ``p.grad_sample``) and so the accountant count.
    """
    for p in optimizer.params:
        p.summed_grad = None
        p.grad_sample = None
        p.grad = None
    optimizer._is_last_step_skipped = False


# Opacus implementations whose clipping divides max_grad_norm by the per-sample norms once.
_TAPPABLE_CLIP = {DPOptimizer.clip_and_accumulate, AdaClipDPOptimizer.clip_and_accumulate}
# add_noise implementations that leave p.summed_grad (signal) and p.grad = signal + noise.
_KNOWN_NOISE = {DPOptimizer.add_noise, DistributedDPOptimizer.add_noise,
                AdaClipDPOptimizer.add_noise, DPOptimizerFastGradientClipping.add_noise,
                SplitNoise.add_noise}
_DIVISIONS = {torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.true_divide, torch.div,
              torch.true_divide}
_EPS = 1e-6  # Opacus adds it to the norm before dividing: a sample is clipped iff norm+eps > C

MECHANISM_METRICS = ("privacy_clipped_fraction", "privacy_per_sample_grad_norm",
                     "privacy_noise_magnitude", "privacy_signal_magnitude",
                     "privacy_signal_to_noise_ratio", "privacy_overhead_ratio")


class _FloatTap(float):
    """``max_grad_norm`` as a float: records a tensor divisor, then divides exactly as a float.

    Returning ``NotImplemented`` hands the division to ``Tensor.__rtruediv__`` with this float, the
    very path ``float / tensor`` takes, so the result is bit-identical.
    """

    sink: list[torch.Tensor]

    def __truediv__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor):
            self.sink.append(other)
        return NotImplemented


class _TensorTap(torch.Tensor):
    """``max_grad_norm`` as a tensor (adaptive clipping): records the divisor of a division."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _DIVISIONS and len(args) == 2 and isinstance(args[0], _TensorTap):
            args[0].sink.append(args[1])  # type: ignore[attr-defined]
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _tap(value: Any, sink: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tap: Any = value.as_subclass(_TensorTap)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        tap = _FloatTap(value)
    else:
        return None
    tap.sink = sink
    return tap


def _nested(obj: Any) -> list[Any]:
    """Attribute values of ``obj``, one level into dicts, lists and tuples."""
    found = []
    for value in vars(obj).values():
        found.append(value)
        if isinstance(value, Mapping):
            found.extend(value.values())
        elif isinstance(value, (list, tuple)):
            found.extend(value)
    return found


def find_grad_sample_hooks(trainer: Any, pl_module: Any,
                           params: list[torch.Tensor]) -> GradSampleHooks | None:
    """The Opacus per-sample-gradient hooks attached to ``params``.

    Opacus' Lightning example keeps the wrapper in a dict on the module (``self.dp["model"]``),
    since as an attribute it would become a submodule of itself; a wrapped submodule or a
    callback attribute is found too.
    """
    ids = {id(p) for p in params}
    candidates = _nested(pl_module) + list(pl_module.modules())
    for callback in getattr(trainer, "callbacks", []) or []:
        candidates += _nested(callback)
    for obj in candidates:
        if isinstance(obj, GradSampleHooks) and any(
                id(p) in ids for p in obj._module.parameters()):
            return obj
    return None


class MechanismProbe:
    """Measures clipping, noise, signal and DP overhead of one DP optimizer, without syncs.

    Per step, on the training thread, everything is queued on the device: the L2 norms of the
    noised gradient (the global one under DDP, after the optimizer's reduction) and of the noise
    (``p.grad - p.summed_grad`` after ``add_noise``, reduced with ``torch._foreach_norm``), the
    per-sample statistics the run releases, an asynchronous copy into a pinned buffer and timing
    events. The publisher's thread resolves the :class:`~privacy_callbacks.device.DeviceStats`
    handle. On a CPU, where this is synchronous work in the step, the statistics without
    per-sample ones are measured every :attr:`stride`-th step: their own time over
    ``STATS_SHARE`` of the step's, re-set at each measured step (and always at a calibration);
    the other steps take no slot and set no mark.

    Per-sample statistics (``statistics``): ``None`` releases none; ``"dp"`` releases the
    histogram of per-sample norms (bucket edges: the catalog's and C) as counts with Gaussian
    noise of ``optimizer.statistics_noise_multiplier`` (sensitivity 1: one record moves one
    bucket), accounted together with the gradient
    (:class:`~privacy_callbacks.wiring.SplitNoise`); ``"raw"`` copies the per-sample norms and
    the clipped count as they are (outside epsilon).

    Args:
        trainer: The Lightning trainer.
        pl_module: The LightningModule.
        optimizer: The DP optimizer to instrument.
        overhead_every: Run the plain-step calibration every this many optimizer steps (the
            first at the third step, after warm-up); ``None`` turns overhead ratios off.
        statistics: ``None``, ``"dp"`` or ``"raw"``, as above.
    """

    WARMUP_STEPS = 2
    #: On a CPU, the largest share of a step the statistics may take: they are synchronous work
    #: in the step there, so without per-sample statistics they are measured every k-th step.
    STATS_SHARE = 0.01
    MAX_STRIDE = 100

    def __init__(self, trainer: Any, pl_module: Any, optimizer: DPOptimizer, *,
                 overhead_every: int | None, statistics: str | None = None) -> None:
        if statistics not in (None, "dp", "raw"):
            raise ValueError(f"Unexpected value for statistics: {statistics!r}; use None, 'dp' "
                             "or 'raw'")
        if statistics == "dp" and not isinstance(optimizer, SplitNoise):
            raise ValueError(
                f"Unexpected statistics='dp' for {type(optimizer).__name__}: only an optimizer "
                "whose accounted sigma covers the release (DifferentialPrivacy("
                "statistics_noise_multiplier=...)) may release noised statistics")
        self.optimizer = optimizer
        self.overhead_every = overhead_every
        self.statistics = statistics
        self.missing: dict[str, str] = {}
        params = list(optimizer.params)
        device = params[0].device if params else torch.device("cpu")
        self.pool = SlotPool(device)
        self._params = params
        self._pl_module = pl_module
        self._trainer = trainer
        #: The timing slot of the optimizer step in progress; ``None`` when it is not measured.
        self.slot: Any = None
        self._micro_batches = 0
        self._first: int | None = None  # the trainer's step count at this fit's first step
        self._divisors: list[torch.Tensor] = []
        self._clip_value: Any = None
        self._handle: DeviceStats | None = None
        self._reducing = True
        #: The trainer's step count from which the next step is measured (the stride: on a
        #: CPU, without per-sample statistics, which a run asked for every step, it follows
        #: their cost, STATS_SHARE of the step; on a GPU they are asynchronous work and every
        #: step is measured). A calibration step is never past it.
        self.due: float = 0
        self._stride_by_cost = statistics is None and device.type == "cpu"
        self.stride = 1
        self._installed: list[str] = []
        self._model = OverheadModel()
        self._hooks = find_grad_sample_hooks(trainer, pl_module, params)
        self._ghost = isinstance(optimizer, DPOptimizerFastGradientClipping)
        # Under DDP the global noised gradient exists only after the optimizer's all-reduce.
        self._distributed = (isinstance(optimizer, DistributedDPOptimizer)
                             and getattr(optimizer, "world_size", 1) > 1)
        self._pending: tuple[Any, ...] | None = None
        self._with_grad: list[torch.Tensor] = []
        self._buckets: Any = None
        if statistics == "dp":
            # Edges on norm + eps, the value Opacus compares with C: the catalog's edges (shifted
            # by eps) and C itself, so the clipped count is a sum of buckets.
            clip = float(optimizer.max_grad_norm)
            shown = by_name("privacy_per_sample_grad_norm").buckets
            edges = sorted({b + _EPS for b in shown} | {clip})
            self._buckets = _Buckets(edges, shown, clip)
            self._edges = torch.tensor(edges, dtype=torch.float32, device=device)

        kind = type(optimizer)
        noise_ok = kind.add_noise in _KNOWN_NOISE
        if self._ghost:
            norms_ok = isinstance(self._hooks, GradSampleHooksFastGradientClipping)
            why = "the ghost-clipping module holding per_sample_gradient_norms was not found"
        else:
            norms_ok = kind.clip_and_accumulate in _TAPPABLE_CLIP
            why = f"{kind.__name__} clips in a way this version cannot read"
        if not norms_ok and statistics is not None:
            for name in MECHANISM_METRICS[:2]:
                self.missing[name] = why
        if not noise_ok:
            for name in MECHANISM_METRICS[2:5]:
                self.missing[name] = f"{kind.__name__} adds noise in a way this version cannot read"
        self._timing = overhead_every is not None and self._calibration_problem() is None
        if overhead_every is not None and not self._timing:
            self.missing["privacy_overhead_ratio"] = str(self._calibration_problem())
        if noise_ok:
            self._install("add_noise", self._wrap_noise(optimizer.add_noise))
        if norms_ok:
            name = "accumulate" if self._ghost else "clip_and_accumulate"
            self._install(name, self._wrap_clip(getattr(optimizer, name)))
        if noise_ok and self._distributed:
            self._install("reduce_gradients", self._wrap_reduce(optimizer.reduce_gradients))
        if self.missing:
            rank_zero_warn(
                "PrivacyMonitor cannot measure "
                + "; ".join(f"{m} ({why})" for m, why in self.missing.items())
                + ". Every other metric is reported.")

    def _calibration_problem(self) -> str | None:
        if self._ghost:
            return "ghost clipping clips inside backward, so there is no plain pass to time"
        if not isinstance(self._hooks, GradSampleHooks):
            return ("the Opacus GradSampleModule was not found on the LightningModule (keep it "
                    "as an attribute or in a dict attribute, as Opacus' Lightning example does)")
        if not getattr(self._pl_module, "automatic_optimization", True):
            return "manual optimization: the plain pass needs automatic optimization"
        if getattr(self._trainer, "world_size", 1) > 1:
            return "a plain pass would run the distributed gradient hooks"
        return None

    def _install(self, name: str, fn: Any) -> None:
        # An instance attribute shadows the class method; deleting it restores Opacus' own.
        setattr(self.optimizer, name, fn)
        self._installed.append(name)

    def close(self) -> None:
        """Restore the optimizer's own methods."""
        for name in self._installed:
            self.optimizer.__dict__.pop(name, None)
        self._installed = []
        self.slot = self._handle = self._pending = None

    # -- training-thread hooks -------------------------------------------------------------

    def batch_start(self, batch: Any, batch_idx: int, step: int) -> None:
        """Start timing the optimizer step this batch belongs to (calibrating when due).

        ``step``: the trainer's count of optimizer steps before this one. A step before
        :attr:`due` is not measured: it takes no slot and no mark (nothing of it would be
        read), so a caller may leave out both calls for it.
        """
        if self.slot is None:
            if step < self.due:
                return
            if self._first is None:
                self._first = step
            slot = self.slot = self.pool.acquire()
            self._micro_batches = 0
            if slot is None:
                return
            every = self.overhead_every
            steps = step - self._first
            calibrating = (self._timing and every is not None and steps >= self.WARMUP_STEPS
                           and (steps - self.WARMUP_STEPS) % every == 0)
            if calibrating:
                try:
                    self._calibrate(slot, batch, batch_idx)
                except Exception:  # the user's training_step raised outside its real step
                    self._timing = False
                    logger.exception("The overhead calibration pass failed; "
                                     "privacy_overhead_ratio is off for this fit")
            slot.mark(Marks.START)
        self._micro_batches += 1

    def step_end(self, step: int) -> DeviceStats | None:
        """Close the step that just ran (``step``: the trainer's count of optimizer steps now);
        the handle the snapshot carries, if any. Nothing to do for a step without a slot."""
        slot, self.slot = self.slot, None
        handle, self._handle = self._handle, None
        if slot is None:
            return None
        slot.mark(Marks.END)
        if handle is None:
            self.pool.release(slot)
        elif self._stride_by_cost:
            # Host clock marks: the statistics' own time and the step's, known now.
            own = slot.seconds(Marks.NOISE_END, Marks.STATS_END)
            seconds = slot.seconds(Marks.START, Marks.END)
            if own is not None and seconds:
                self.stride = max(1, min(self.MAX_STRIDE,
                                         math.ceil(own / (self.STATS_SHARE * seconds))))
                # A calibration step is measured: its overhead ratio is what it is for.
                self.due = min(step + self.stride - 1, self._next_calibration(step))
        return handle

    def _next_calibration(self, step: int) -> float:
        """The trainer's step count of the first calibration step at or after ``step``
        (inf: none)."""
        every, warmup, first = self.overhead_every, self.WARMUP_STEPS, self._first
        if not self._timing or every is None or first is None:
            return math.inf
        steps = step - first
        if steps <= warmup:
            return first + warmup
        return first + warmup + -(-(steps - warmup) // every) * every

    def _wrap_clip(self, original: Any) -> Any:
        optimizer, divisors = self.optimizer, self._divisors
        ghost, hooks = self._ghost, self._hooks

        def clip(*args: Any, **kwargs: Any) -> Any:
            slot = self.slot
            value = optimizer.max_grad_norm
            self._clip_value = value
            if slot is None:  # a step not measured
                return original(*args, **kwargs)
            slot.mark(Marks.CLIP_START)
            if ghost:
                norms = getattr(hooks, "per_sample_gradient_norms", None)
                if isinstance(norms, torch.Tensor):
                    divisors.append(norms + _EPS)
                result = original(*args, **kwargs)
            else:
                tap = _tap(value, divisors)
                if tap is not None:
                    optimizer.max_grad_norm = tap
                try:
                    result = original(*args, **kwargs)
                finally:
                    if optimizer.max_grad_norm is tap:
                        optimizer.max_grad_norm = value
            slot.mark(Marks.CLIP_END)
            return result

        return clip

    def _wrap_noise(self, original: Any) -> Any:
        def add_noise(*args: Any, **kwargs: Any) -> Any:
            slot = self.slot
            if slot is not None:
                slot.mark(Marks.NOISE_START)
            result = original(*args, **kwargs)
            if slot is not None and self._reducing:
                slot.mark(Marks.NOISE_END)
                try:
                    self._reduce(slot)
                except Exception:  # monitoring never breaks the training step
                    self._reducing = False
                    logger.exception("Mechanism metrics failed; they are off for this fit")
                slot.mark(Marks.STATS_END)
            self._divisors.clear()
            return result

        return add_noise

    def _wrap_reduce(self, original: Any) -> Any:
        def reduce_gradients(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            pending, self._pending = self._pending, None
            if pending is not None:
                try:
                    opt = self.optimizer
                    # Each rank divided its share by its expected batch and the reduction
                    # averaged the ranks: undo both to get the global noised sum.
                    scale = (float(opt.expected_batch_size) * opt.accumulated_iterations
                             * opt.world_size if opt.loss_reduction == "mean" else 1.0)
                    # _reduce kept only parameters with a gradient; the all-reduce keeps it.
                    grads = [p.grad for p in self._with_grad if p.grad is not None]
                    self._store(*pending, grad=self._norm(grads), scale=scale)
                except Exception:  # monitoring never breaks the training step
                    self._reducing = False
                    logger.exception("Mechanism metrics failed; they are off for this fit")
            return result

        return reduce_gradients

    @staticmethod
    def _norm(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        # Parameters may mix dtypes; the norms are float32 alike.
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors,
                                                                        dtype=torch.float32)))

    def _reduce(self, slot: Any) -> None:
        """Queue this step's statistics on the device and their copy to the host."""
        params, summed, grads = [], [], []
        for p in self._params:
            s = getattr(p, "summed_grad", None)
            if s is not None and p.grad is not None:
                params.append(p)
                summed.append(s)
                grads.append(p.grad)
        if not summed:
            return
        device = summed[0].device
        # The noise vector does not depend on the data; its exact norm is still published only
        # with raw statistics (see DeviceStats.noise_magnitude).
        noise = self._norm(torch._foreach_sub(grads, summed))
        clip = self.optimizer.max_grad_norm  # the C add_noise just used (adaptive: this step's)
        tensor_clip = isinstance(clip, torch.Tensor)
        if tensor_clip:
            clip = clip.to(device=device, dtype=torch.float32)
        divisors = self._divisors
        tail: torch.Tensor | None = None
        clipped = torch.zeros((), device=device)
        norms: int | None = None
        if divisors and self.statistics is not None:
            denom = (divisors[0] if len(divisors) == 1 else torch.cat(divisors)).to(
                device=device, dtype=torch.float32)
            if self.statistics == "raw":
                bound = self._clip_value  # the C of this step's clipping
                if isinstance(bound, torch.Tensor):
                    bound = bound.to(device)
                clipped = (denom > bound).sum().float()
                norms = int(denom.shape[0])
                tail = denom - _EPS
            else:  # an accounted release: noised counts, never the norms themselves
                edges = self._edges.to(device)
                counts = torch.zeros(edges.shape[0] + 1, device=device).index_add_(
                    0, torch.bucketize(denom, edges), torch.ones_like(denom))
                opt = self.optimizer
                tail = counts + _generate_noise(
                    std=float(opt.statistics_noise_multiplier), reference=counts,
                    generator=opt.generator, secure_mode=opt.secure_mode)
        head = torch.stack((clipped, noise, clip.reshape(()) if tensor_clip
                            else torch.full((), math.nan, device=device)))
        self._with_grad = params
        pending = (slot, head, tail, norms, None if tensor_clip else float(clip),
                   gradient_noise_multiplier(self.optimizer), sum(s.numel() for s in summed))
        if self._distributed:
            self._pending = pending
        else:
            self._store(*pending, grad=self._norm(grads), scale=1.0)

    def _store(self, slot: Any, head: torch.Tensor, tail: torch.Tensor | None,
               norms: int | None, clip: float | None, sigma: float, entries: int, *,
               grad: torch.Tensor, scale: float) -> None:
        values = torch.cat((head, grad.reshape(1)) if tail is None
                           else (head, grad.reshape(1), tail))
        slot.store(values)
        opt = self.optimizer
        expected = getattr(opt, "expected_batch_size", None)
        self._handle = DeviceStats(
            self.pool, slot, norms=norms, has_values=True, micro_batches=self._micro_batches,
            model=self._model if self._timing else None, clip=clip, noise_multiplier=sigma,
            entries=entries, scale=scale, buckets=self._buckets if tail is not None else None,
            expected_samples=float(expected) * self._micro_batches if expected else None,
            raw=self.statistics == "raw")

    def _calibrate(self, slot: Any, batch: Any, batch_idx: int) -> None:
        """Time one plain forward/backward on ``batch``: per-sample hooks off, nothing kept.

        Gradients, buffers and random-number state are restored afterwards and logging is
        suppressed, so the fit continues exactly as it would have without this pass.
        """
        module, hooks, trainer = self._pl_module, self._hooks, self._trainer
        assert hooks is not None
        grads = [(p, p.grad) for p in module.parameters()]
        buffers = [(b, b.clone()) for b in module.buffers()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        was_enabled = hooks.hooks_enabled
        module.log = module.log_dict = _no_log
        hooks.disable_hooks()
        try:
            for p, _ in grads:
                p.grad = None
            slot.mark(Marks.CAL_START)
            with trainer.precision_plugin.train_step_context():
                out = module.training_step(batch, batch_idx)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                loss.backward()  # the "Full backward hook" warning it raises is filtered above
                slot.mark(Marks.CAL_END)
            else:
                self._timing = False
                rank_zero_warn("PrivacyMonitor cannot measure privacy_overhead_ratio "
                               "(training_step returned no loss with a gradient).")
        finally:
            hooks.hooks_enabled = was_enabled
            del module.log, module.log_dict
            for p, g in grads:
                p.grad = g
            for b, saved in buffers:
                b.copy_(saved)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` during the calibration pass."""
