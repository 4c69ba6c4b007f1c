"""MechanismMetrics: clipping, noise, signal and DP overhead of each step, read from the device."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from functools import partial
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
)
from opacus.optimizers import (AdaClipDPOptimizer, DistributedDPOptimizer, DPOptimizer,
                               DPOptimizerFastGradientClipping)
from opacus.optimizers.optimizer import _generate_noise

from .. import checks, opacus_compat
from ..catalog import by_name
from ..snapshot import Source
from . import device as d

logger = logging.getLogger(__name__)

__all__ = ["MechanismMetrics"]

# Opacus implementations whose clipping divides max_grad_norm by the per-sample norms once.
_TAPPABLE = {DPOptimizer.clip_and_accumulate, AdaClipDPOptimizer.clip_and_accumulate}
# add_noise that leave p.summed_grad (signal) and p.grad = signal + noise (split noise wraps one).
_KNOWN_NOISE = {DPOptimizer.add_noise, DistributedDPOptimizer.add_noise,
                AdaClipDPOptimizer.add_noise, DPOptimizerFastGradientClipping.add_noise}
_DIVISIONS = {torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.true_divide, torch.div,
              torch.true_divide}
_EPS = 1e-6  # Opacus adds it to the norm before dividing: a sample is clipped iff norm+eps > C
_NAMES = ("privacy_clipped_fraction", "privacy_per_sample_grad_norm", "privacy_noise_magnitude",
          "privacy_signal_magnitude", "privacy_signal_to_noise_ratio", "privacy_overhead_ratio")


class _FloatTap(float):
    """``max_grad_norm`` recording a tensor divisor; ``Tensor.__rtruediv__`` then divides."""

    sink: list[torch.Tensor]

    def __truediv__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor):
            self.sink.append(other)
        return NotImplemented


class _TensorTap(torch.Tensor):
    """``max_grad_norm`` as a tensor (adaptive clipping): records the divisor of a division."""

    sink: list[torch.Tensor]

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _DIVISIONS and len(args) == 2 and isinstance(args[0], _TensorTap):
            args[0].sink.append(args[1])
        # torch's documented way (there is no public one) to run func as Tensor does, without
        # turning the result into this subclass.
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _grad_sample_hooks(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
    """Opacus' per-sample hooks: submodules, or attributes (in a dict or list too) of the module
    or of a callback."""
    found: list[Any] = list(pl_module.modules())
    for obj in (pl_module, *trainer.callbacks):  # type: ignore[attr-defined]
        for value in vars(obj).values():
            found += [value, *(value.values() if isinstance(value, Mapping) else value
                               if isinstance(value, (list, tuple)) else ())]
    return list({id(h): h for h in found if isinstance(h, GradSampleHooks)}.values())


class MechanismMetrics(Callback):
    """Measures clipping, noise, signal and DP overhead of the first DP optimizer, without syncs.

    Add it beside :class:`~privacy_callbacks.PrivacyMonitor`, which publishes its values. The
    noise is ``p.grad - p.summed_grad`` after ``add_noise``; the per-sample norms are ghost
    clipping's, or the divisor of ``max_grad_norm / (norms + 1e-6)`` read by a look-alike of
    ``max_grad_norm`` (bit-identical). The training thread only queues device work. On a CPU a
    run without per-sample statistics is measured every k-th step (their time over
    ``STATS_SHARE`` of the step's, at most ``MAX_STRIDE``) and at each calibration. Per-sample
    statistics are released only as the noised histogram of
    ``DifferentialPrivacy(statistics_noise_multiplier=...)``, accounted with the gradient.

    Exported metrics: ``privacy_clipped_fraction``, ``privacy_per_sample_grad_norm``,
    ``privacy_noise_magnitude``, ``privacy_signal_magnitude``, ``privacy_signal_to_noise_ratio``,
    ``privacy_overhead_ratio{operation}``.

    Args:
        overhead_every: Every this many steps (the first at the third) time one plain
            forward/backward on the step's batch (hooks removed; gradients, buffers and RNG
            restored; logging off) for the overhead ratios; ``None``: none.
        raw_private_statistics: Publish the exact per-sample norms and clipped fraction, outside
            epsilon (debugging on data that needs no protection).
    """

    WARMUP_STEPS = 2
    STATS_SHARE = 0.01
    MAX_STRIDE = 100

    def __init__(self, *, overhead_every: int | None = 1000,
                 raw_private_statistics: bool = False) -> None:
        self.overhead_every = checks.number("overhead_every", overhead_every, "a number of steps "
                                            ">= 1, or None", low=1, low_ok=True, integer=True,
                                            none=True)
        self.raw_private_statistics = checks.flag("raw_private_statistics", raw_private_statistics)
        if raw_private_statistics:
            warnings.warn("raw_private_statistics=True publishes per-sample gradient norms and "
                          "the exact clipped fraction of the private data, outside epsilon: use "
                          "it only on data that needs no protection.", UserWarning, stacklevel=2)
        self._opt: Any = None  # the instrumented optimizer; None: off
        self._now: d.Step | None = None  # the step in progress, when it is measured
        self._pending: tuple[Any, ...] | None = None
        self._step, self._hook = 0, None
        self._installed: dict[str, Any] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not any(isinstance(cb, Source)
                                      for cb in trainer.callbacks):  # type: ignore[attr-defined]
            raise RuntimeError("MechanismMetrics publishes through PrivacyMonitor: add "
                               "PrivacyMonitor(delta=...) to the Trainer's callbacks too")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = trainer.global_step
        if not trainer.is_global_zero:
            return  # rank 0 publishes the privacy values
        opt = self._opt = opacus_compat.dp_optimizers(trainer)[0]
        split = getattr(opt, "statistics_noise_multiplier", None) is not None
        self.statistics = "raw" if self.raw_private_statistics else "dp" if split else None
        if self.statistics is None:
            logger.info("Per-sample gradient statistics are off: they need "
                        "DifferentialPrivacy(statistics_noise_multiplier=...)")
        self._params, self._micro, self.due = list(opt.params), 0, 0.0
        self._divisors: list[torch.Tensor] = []
        self._start, self._reducing = self._step + self.WARMUP_STEPS, True  # first calibration
        self._cuda = bool(self._params) and self._params[0].is_cuda
        self._hooks = _grad_sample_hooks(trainer, pl_module)
        self._ghost, kind = isinstance(opt, DPOptimizerFastGradientClipping), type(opt).__name__
        self._buckets = None if self.statistics != "dp" else d.Buckets(
            by_name("privacy_per_sample_grad_norm").buckets, float(opt.max_grad_norm), _EPS,
            self._params[0].device)
        ghost = next((h for h in self._hooks
                      if isinstance(h, GradSampleHooksFastGradientClipping)), None)
        norms_ok = ghost is not None if self._ghost else type(opt).clip_and_accumulate in _TAPPABLE
        noise_ok = type(opt).add_noise in _KNOWN_NOISE or split
        problem = ("ghost clipping clips inside backward: no plain pass to time" if self._ghost
                   else "no Opacus per-sample hooks found on the module or its attributes"
                   if not self._hooks else "manual optimization" if not
                   pl_module.automatic_optimization else "a plain pass would run DDP's hooks"
                   if trainer.world_size > 1 else None)
        self._calibration = d.Calibration() if self.overhead_every and not problem else None
        missing = {**(dict.fromkeys(_NAMES[:2], "no ghost-clipping module found" if self._ghost
                                    else f"{kind} clips in a way not read here")
                      if not norms_ok and self.statistics is not None else {}),
                   **({} if noise_ok else dict.fromkeys(_NAMES[2:5], f"{kind} adds noise in a "
                                                        "way not read here")),
                   **({_NAMES[5]: problem} if self.overhead_every and problem else {})}
        if missing:
            rank_zero_warn("MechanismMetrics cannot measure " + "; ".join(
                f"{m} ({why})" for m, why in missing.items()) + ". Every other metric is reported.")
        self._installed = {}  # instance attributes shadow Opacus' public methods until teardown
        if noise_ok:
            self._installed["add_noise"] = partial(self._add_noise, opt.add_noise)
            self._hook = opt.original_optimizer.register_step_pre_hook(self._before_update)
        if norms_ok:
            name = "accumulate" if self._ghost else "clip_and_accumulate"
            self._installed[name] = partial(self._clip_and_accumulate, getattr(opt, name), ghost)
        vars(opt).update(self._installed)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips teardown when a fit raises

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._opt is None:
            return
        for name in self._installed:
            vars(self._opt).pop(name, None)
        if self._hook is not None:
            self._hook.remove()
        self._opt = self._now = self._pending = self._hook = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._now is None:
            step = self._step  # optimizer steps so far
            if self._opt is None or step < self.due:
                return  # not measured: no buffer, no mark
            now = self._now = d.Step(self._cuda)
            self._micro, done = 0, step - self._start
            if self._calibration is not None and done >= 0 and done % self.overhead_every == 0:
                try:  # the RNG is restored: the real step draws what it would have
                    with torch.random.fork_rng(range(torch.cuda.device_count() * self._cuda)):
                        self._calibrate(trainer, pl_module, now, batch, batch_idx)
                except Exception:  # the user's training_step raised outside its real step
                    self._calibration = None
                    logger.exception("The overhead calibration pass failed; "
                                     "privacy_overhead_ratio is off for this fit")
            now.mark(d.START)
        self._micro += 1

    def privacy_step_values(self, step: int) -> Callable[[], Mapping[str, Any]] | None:
        """Close the step that just ran: its reader for the publisher thread, or ``None``."""
        self._step, now, self._now, self._pending = step, self._now, None, None
        if now is None:
            return None
        self._divisors.clear()  # a skipped step's norms never go out with a later step
        now.mark(d.END)
        if now.host is None:
            return None
        if self.statistics is None and not self._cuda:  # host clock: both times known now
            own, seconds = now.seconds(d.NOISE_END, d.STATS_END), now.seconds(d.START, d.END)
            if own is not None and seconds:
                stride = max(1, min(self.MAX_STRIDE, math.ceil(own / (self.STATS_SHARE * seconds))))
                self.due = step + stride - 1
                if self._calibration is not None:  # the next calibration step is measured too
                    every, start = self.overhead_every, self._start
                    self.due = min(self.due, start + max(0, -((start - step) // every) * every))
        return now.read

    def _clip_and_accumulate(self, original: Callable[..., Any], ghost: Any, *args: Any,
                             **kwargs: Any) -> Any:
        opt, now = self._opt, self._now
        value = opt.max_grad_norm
        if now is None:  # a step not measured
            return original(*args, **kwargs)
        now.mark(d.CLIP_START)
        tap, norms = value, getattr(ghost, "per_sample_gradient_norms", None)
        if self.statistics is not None and self._ghost and isinstance(norms, torch.Tensor):
            self._divisors.append(norms + _EPS)
        elif self.statistics is not None and not self._ghost and isinstance(
                value, (int, float, torch.Tensor)) and not isinstance(value, bool):
            # a look-alike of C that records the divisor
            tap = value.as_subclass(_TensorTap) if torch.is_tensor(value) else _FloatTap(value)
            tap.sink = self._divisors
            opt.max_grad_norm = tap
        try:
            return original(*args, **kwargs)
        finally:
            if opt.max_grad_norm is tap:
                opt.max_grad_norm = value
            now.mark(d.CLIP_END)

    def _add_noise(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if (now := self._now) is not None:
            now.mark(d.NOISE_START)
        result = original(*args, **kwargs)
        if now is not None and self._reducing:
            now.mark(d.NOISE_END)
            self._guarded(self._reduce)
            now.mark(d.STATS_END)
        self._divisors.clear()
        return result

    def _guarded(self, work: Callable[..., None], *args: Any) -> None:
        try:
            work(*args)
        except Exception:  # monitoring never breaks the training step
            self._reducing = False
            logger.exception("Mechanism metrics failed; they are off for this fit")

    def _reduce(self) -> None:
        """Queue this step's statistics on the device (right after the noise was added)."""
        opt, params = self._opt, [p for p in self._params
                                  if p.summed_grad is not None and p.grad is not None]
        if not params:
            return
        summed, dev, stats = [p.summed_grad for p in params], params[0].device, self.statistics
        noise = _norm(torch._foreach_sub([p.grad for p in params], summed))
        clip = opt.max_grad_norm  # the C add_noise just used (adaptive: this step's)
        tail, clipped = None, torch.zeros((), device=dev)
        if self._divisors and stats is not None:
            denom = torch.cat(self._divisors).to(device=dev, dtype=torch.float32)
            if stats == "raw":  # C is still the one this step clipped with
                clipped = (denom > (clip.to(dev) if torch.is_tensor(clip) else float(clip))
                           ).sum().float()
                tail = denom - _EPS
            elif self._buckets is not None:  # accounted: noised counts, never the norms
                edges = self._buckets.tensor
                counts = torch.zeros(len(edges) + 1, device=dev).index_add_(
                    0, torch.bucketize(denom, edges), torch.ones_like(denom))
                # Opacus' own draw (no public one): its generator, and its secure mode.
                tail = counts + _generate_noise(
                    std=float(opt.statistics_noise_multiplier), reference=counts,
                    generator=opt.generator, secure_mode=opt.secure_mode)
        head = torch.stack((clipped, noise, clip.to(device=dev, dtype=torch.float32).reshape(())
                            if torch.is_tensor(clip) else torch.full((), math.nan, device=dev)))
        expected = getattr(opt, "expected_batch_size", None)
        self._pending = (head, tail, params, dict(
            clip=None if torch.is_tensor(clip) else float(clip), raw=stats == "raw",
            entries=sum(s.numel() for s in summed),
            sigma=opacus_compat.gradient_noise_multiplier(opt, float(opt.noise_multiplier)),
            buckets=self._buckets if stats == "dp" and tail is not None else None,
            expected=float(expected) * self._micro if expected else None,
            calibration=self._calibration, micro_batches=self._micro))

    def _before_update(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """The original optimizer's step pre-hook: noise added, step accounted, DDP reduced."""
        now, pending, self._pending = self._now, self._pending, None
        if now is not None and pending is not None:
            now.mark(d.UPDATE)
            self._guarded(self._store, now, *pending)

    def _store(self, now: d.Step, head: Any, tail: Any, params: list[Any], known: dict) -> None:
        # The update is the noised sum over the global expected batch of each batch accumulated
        # (one parameter's count: Opacus' property walks them all): undo that averaging.
        opt, samples = self._opt, params[0].grad_sample
        scale = (opacus_compat.global_expected_batch_size(opt) or 1.0) * (
            len(samples) if type(samples) is list else 1) if opt.loss_reduction == "mean" else 1
        grad = (_norm([p.grad for p in params if p.grad is not None]) * scale).reshape(1)
        now.store(torch.cat((head, grad) if tail is None else (head, grad, tail)), **known)

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, now: d.Step,
                   batch: Any, batch_idx: int) -> None:
        """Time one plain forward/backward on ``batch``, nothing kept (hooks removed: disabled
        ones would still make PyTorch warn "Full backward hook is firing")."""
        grads = [(p, p.grad) for p in pl_module.parameters()]
        buffers = [(b, b.clone()) for b in pl_module.buffers()]
        enabled = [hooks.hooks_enabled for hooks in self._hooks]
        for hooks in self._hooks:
            hooks.remove_hooks()
        pl_module.log = pl_module.log_dict = lambda *a, **k: None  # type: ignore[method-assign,assignment]
        try:
            pl_module.zero_grad(set_to_none=True)
            now.mark(d.CAL_START)
            with trainer.precision_plugin.train_step_context():
                out = pl_module.training_step(batch, batch_idx)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
                self._calibration = None
                rank_zero_warn("MechanismMetrics cannot measure privacy_overhead_ratio "
                               "(training_step returned no loss with a gradient).")
                return
            loss.backward()
            now.mark(d.CAL_END)
        finally:
            for hooks, was in zip(self._hooks, enabled):
                hooks.add_hooks(loss_reduction=hooks.loss_reduction, batch_first=hooks.batch_first,
                                force_functorch=hooks.force_functorch)
                if not was:
                    hooks.disable_hooks()
            del pl_module.log, pl_module.log_dict
            for p, g in grads:
                p.grad = g
            for b, saved in buffers:
                b.copy_(saved)


def _norm(tensors: Any) -> torch.Tensor:
    # torch's _foreach ops (no public equivalent): one fused kernel per dtype and device, as
    # clip_grad_norm_ uses them; float32 alike.
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors,
                                                                    dtype=torch.float32)))

