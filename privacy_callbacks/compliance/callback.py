"""ComplianceAudit: a fit's audit trail and DP policy checks, beside the PrivacyMonitor."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import CombinedLoader
from opacus.utils import uniform_sampler

from .. import checks, opacus_compat
from ..accounting import Accounting
from ..snapshot import PrivacySnapshot, Reporter, Source, reported
from .audit import AuditTrail, verify

logger = logging.getLogger(__name__)

__all__ = ["MAX_POINTS", "ComplianceAudit", "DPPolicy"]

MAX_POINTS = 500  # of each series in fit_end: enough for a chart, small in the trail
_POISSON = (uniform_sampler.UniformWithReplacementSampler,  # Opacus' DPDataLoader's samplers
            uniform_sampler.DistributedUniformWithReplacementSampler)


def _add(points: list[list[Any]], point: list[Any]) -> bool:
    """Append; past MAX_POINTS (even: the last stays) drop every other point. True if it did."""
    points.append(point)
    if thinned := len(points) > MAX_POINTS:
        del points[1::2]
    return thinned


@dataclasses.dataclass(frozen=True)
class DPPolicy:
    """What a run must satisfy, the user's (no law prescribes an epsilon; a clean run is not a
    legal finding); each broken rule counts in ``privacy_compliance_violations_total``."""

    name: str = "default"  # the ``policy`` label
    max_epsilon: float | None = None  # for the target and for what training spends
    delta_below_inverse_n: bool = True  # delta < 1/N: a delta of 1/N allows publishing a record
    require_poisson_sampling: bool = True  # which every Opacus accountant assumes
    require_secure_mode: bool = False  # Opacus' plain noise has known floating-point attacks
    stop_at_target: bool = True  # training on after epsilon passed the target is a violation

    def __post_init__(self) -> None:
        checks.label("name", self.name)
        checks.number("max_epsilon", self.max_epsilon, "a positive finite number or None",
                      none=True)
        for field in dataclasses.fields(self)[2:]:
            checks.flag(field.name, getattr(self, field.name))

    @classmethod
    def preset(cls, preset: str, **overrides: Any) -> DPPolicy:
        """``"default"`` or ``"strict"`` (secure mode, epsilon <= 8) with fields replaced."""
        presets = {"default": cls(),
                   "strict": cls(name="strict", max_epsilon=8.0, require_secure_mode=True)}
        if preset not in presets:
            raise ValueError(f"Unknown policy preset {preset!r}; use one of {sorted(presets)}")
        return dataclasses.replace(presets[preset], **overrides)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> DPPolicy:
        """A policy from JSON or TOML; keys are the field names, plus ``preset``."""
        path, names = Path(path), [f.name for f in dataclasses.fields(cls)]
        if path.suffix == ".toml" and sys.version_info < (3, 11):
            raise ValueError(f"{path}: TOML policies need Python >= 3.11; use a JSON policy")
        data = importlib.import_module("tomllib" if path.suffix == ".toml" else "json").loads(
            path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a policy is a table/object of fields")
        if unknown := sorted(set(data) - set(names) - {"preset"}):
            raise ValueError(f"{path}: unknown policy keys {unknown}; use preset and {names}")
        return cls.preset(data.pop("preset", "default"), **data)


class ComplianceAudit(Callback):
    """Writes a fit's audit trail (an :class:`AuditTrail` or path) from rank 0: fit start, resume,
    the ``audit_thresholds`` (fractions of ``target_epsilon``) crossed, violations of the
    :class:`DPPolicy` (or preset name, or JSON/TOML policy file), the first accounting error, a
    guard's stop, fit end. ``report`` (a path, or a callable from session id to one) gets the
    privacy report at fit end; failing to write it only warns."""

    def __init__(self, delta: float, target_epsilon: float | None = None, *,
                 audit: AuditTrail | str | os.PathLike[str] | None = None,
                 audit_thresholds: Sequence[float] = (0.5, 0.8, 1.0),
                 policy: DPPolicy | str | os.PathLike[str] | None = None,
                 report: str | os.PathLike[str] | Callable[[str], Any] | None = None) -> None:
        self.delta = checks.number("delta", delta, "a number in (0, 1), the monitor's", high=1)
        target = self.target_epsilon = checks.number(
            "target_epsilon", target_epsilon, "a positive finite number, or None", none=True)
        self.thresholds = tuple(sorted(checks.number(
            "audit_thresholds", t, "fractions of the target such as (0.5, 0.8, 1.0)", high=10,
            high_ok=True) for t in audit_thresholds))
        self.audit = audit if audit is None or isinstance(audit, AuditTrail) else AuditTrail(audit)
        if isinstance(policy, (str, os.PathLike)):
            policy = DPPolicy.preset(str(policy)) if policy in ("default", "strict") \
                else DPPolicy.from_file(policy)
        if not isinstance(policy, (DPPolicy, type(None))):
            raise ValueError(f"Unexpected value for policy: {policy!r}; use a DPPolicy, a preset "
                             "name ('default', 'strict') or a JSON/TOML policy file")
        if report is not None and not (callable(report) or isinstance(report, (str, os.PathLike))):
            raise ValueError(f"Unexpected value for report: {report!r}; use a file path or a "
                             "callable that returns one for a session id")
        self.policy, self.report = policy, report
        #: ``{(policy, violation_type): count}``; replaced, never changed (read on other threads).
        self.violations: dict[tuple[str, str], int] = {}
        # (epsilon, event, fraction or limit), ascending; a violation is epsilon strictly above.
        marks: list[tuple[float, str, Any]] = [
            (f * target, "budget_threshold", f) for f in self.thresholds if target is not None]
        limits = [] if policy is None else [
            (target if policy.stop_at_target else None, "training_past_target", "the target"),
            (policy.max_epsilon, "epsilon_above_policy_max", "the policy's maximum")]
        marks += [(math.nextafter(v, math.inf), e, w) for v, e, w in limits if v is not None]
        self._marks = sorted(marks, key=lambda m: m[0]) + [(math.inf, "", None)]
        self._failed = self._errored = False
        self._session: str | None = None
        self._exporting = self._pending = False

    def privacy_values(self) -> Mapping[str, Any]:
        return {} if self.policy is None else {"compliance_violations": self.violations}

    def privacy_observe(self, snapshot: PrivacySnapshot) -> None:
        """Publisher thread: the epsilon series, sigma/q changes, the limits exact values cross."""
        if not self._exporting:
            return
        eps, step = snapshot.epsilon, snapshot.step
        mechanism = [snapshot.noise_multiplier, snapshot.sample_rate]
        if mechanism != (self._changes[-1][1:] if self._changes else [None, None]):
            _add(self._changes, [step, *mechanism])
        if eps is not None and (not self._series or step >= self._series[-1][0] + self._stride):
            self._stride *= 2 if _add(self._series, [step, eps, snapshot.epsilon_exact]) else 1
        if eps is not None and snapshot.epsilon_exact and eps >= self._marks[0][0]:
            self._check(eps, step)  # a bound proves no crossing
        if snapshot.accounting_errors and not self._errored:
            self._errored = True  # the first; fit_end holds the count
            self._record("accounting_error", step=step, errors=snapshot.accounting_errors)

    def _check(self, eps: float, step: int) -> None:
        # No lock: on_fit_end calls it only once the monitor's publisher built every snapshot.
        while eps >= self._marks[0][0]:
            value, event, what = self._marks.pop(0)
            if event == "budget_threshold":
                logger.info("Privacy budget %.0f%% reached at step %d: epsilon=%.4g of %.4g",
                            what * 100, step, eps, self.target_epsilon)
                self._record(event, fraction=what, epsilon=eps, step=step,
                             target_epsilon=self.target_epsilon)
            else:
                self._violate(event, f"epsilon={eps:.4g} is above {what}, {value:g}, at step "
                              f"{step}", step=step, epsilon=eps)

    def _violate(self, kind: str, detail: str, **data: Any) -> None:
        key = (self.policy.name, kind)  # type: ignore[union-attr]
        self.violations = {**self.violations, key: self.violations.get(key, 0) + 1}
        logger.warning("DP policy %r violated (%s): %s", key[0], kind, detail)
        self._record("policy_violation", policy=key[0], violation_type=kind, detail=detail, **data)

    def _record(self, event: str, **data: Any) -> None:
        if not self._exporting:
            return
        record: dict[str, Any] = {"event": event, "data": {"session_id": self._session, **data},
                                  "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            record = record if self.audit is None else self.audit.record(event, **record["data"])
        except Exception:
            if not self._failed:  # once: training goes on without its trail
                self._failed = True
                logger.exception("Writing the privacy audit trail %s failed; training "
                                 "continues", self.audit.path)  # type: ignore[union-attr]
        if self.report is not None:
            self._records.append(record)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        monitor = self._monitor = next((cb for cb in trainer.callbacks  # type: ignore[attr-defined]
                                        if isinstance(cb, Source)), None)
        if monitor is not None and monitor.delta != self.delta:
            raise ValueError(f"Unexpected value for delta: {self.delta!r}; use the "
                             f"PrivacyMonitor's, {monitor.delta!r}")
        session = None if monitor is None else monitor.session_id
        if session != self._session or session is None:  # always at the first fit
            self._records: list[dict[str, Any]] = []  # a report covers one session, all its fits
        self._session, self._exporting = session, trainer.is_global_zero and (
            self.audit is not None or self.policy is not None or self.report is not None)
        self._pending = self._exporting
        self._series: list[list[Any]] = []  # [step, epsilon, exact]
        self._changes: list[list[Any]] = []  # [step, sigma, q]
        self._stride = 1  # steps between series points: the next is due at the last one + stride

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._pending:  # once, after every on_train_start restored the accountant's history
            return
        callbacks, self._pending = trainer.callbacks, False  # type: ignore[attr-defined]
        owner = next((cb for cb in callbacks
                      if isinstance(getattr(cb, "accounting", None), Accounting)), None)
        accountant = self._accountant = opacus_compat.find_accountant(trainer, pl_module) \
            if owner is None else owner.accounting.accountant
        optimizers = opacus_compat.dp_optimizers(trainer)
        loaders = CombinedLoader(trainer.train_dataloader).flattened
        try:
            size: int | None = sum(len(loader.dataset) for loader in loaders) or None
        except (AttributeError, TypeError):
            size = None
        poisson = all(isinstance(s := getattr(loader, "batch_sampler", None), _POISSON)
                      or getattr(s, "poisson_sampling", False) is True for loader in loaders)
        secure = all(getattr(o, "secure_mode", False) for o in optimizers)
        steps = sum(n for _, _, n in accountant.history)
        policy, target = self.policy, self.target_epsilon
        self._record(
            "fit_start", model_name=getattr(owner, "model_name", None) or type(pl_module).__name__,
            accountant=accountant.mechanism(), delta=self.delta, target_epsilon=target,
            dataset_size=size, poisson_sampling=poisson, secure_mode=secure,
            dp={name: getattr(optimizers[0], name, None) for name in (
                "noise_multiplier", "max_grad_norm", "expected_batch_size", "loss_reduction",
                "statistics_noise_multiplier")} | {"optimizers": len(optimizers)},
            world_size=trainer.world_size, global_step=trainer.global_step, steps_accounted=steps,
            thresholds=list(self.thresholds), planned_steps=int(n) if math.isfinite(
                n := trainer.estimated_stepping_batches) else None,
            policy=None if policy is None else dataclasses.asdict(policy),
            versions={"python": platform.python_version()} | {
                name: getattr(sys.modules.get(name), "__version__", None)
                for name in ("privacy_callbacks", "torch", "opacus", "lightning", "numpy")})
        for broken, kind, detail in [] if policy is None else [
            (policy.delta_below_inverse_n and size and self.delta >= 1 / size,
             "delta_not_below_inverse_n", f"delta={self.delta:g} is not below 1/N="
             f"{1 / (size or 1):g} (N={size} training examples)"),
            (policy.require_poisson_sampling and not poisson, "non_poisson_sampling",
             "the accountant assumes Poisson sampling: use poisson_sampling=True in Opacus"),
            (policy.require_secure_mode and not secure, "secure_mode_off",
             "secure_mode is off: use secure_mode=True in Opacus or DifferentialPrivacy"),
            (policy.max_epsilon is not None and (target or 0) > policy.max_epsilon,
             "target_above_policy_max", f"target epsilon {target} > maximum {policy.max_epsilon}")]:
            if broken:
                self._violate(kind, detail)
        if trainer.ckpt_path is not None:
            self._record("resume", global_step=trainer.global_step, steps_accounted=steps)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)  # a fit without an epoch has a start too
        if not self._exporting:
            return
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        for guard in (g for cb in callbacks for g in (cb, getattr(cb, "guard", None))):
            if isinstance(record := getattr(guard, "stop_record", None), dict):
                self._record("budget_guard_stop", **record)
        last = None if self._monitor is None else self._monitor.last_snapshot
        accountant, step = self._accountant, trainer.global_step
        steps = sum(n for _, _, n in accountant.history)
        errors = getattr(last, "accounting_errors", None) or 0
        eps = last.epsilon if last and last.epsilon_exact and last.epsilon_step == steps else None
        try:  # the accountant's own, unless the monitor published it
            eps = float(accountant.get_epsilon(self.delta)) if eps is None and steps else eps
        except Exception:
            eps, errors = None, errors + 1
            logger.exception("The accountant's final epsilon could not be computed")
        if eps is not None:
            self._check(eps, step)
            if self._series and self._series[-1][0] == step:
                self._series.pop()  # the exact value replaces that step's
            _add(self._series, [step, eps, 1])
        self._record(
            "fit_end", epsilon=eps, epsilon_exact=eps is not None, delta=self.delta,
            target_epsilon=self.target_epsilon, accountant=accountant.mechanism(),
            steps_accounted=steps, global_step=step, accounting_errors=errors,
            membership_inference_risk=getattr(last, "membership_inference_risk", None),
            epsilon_forecast=getattr(last, "epsilon_forecast", None),
            reported=reported(c for c in callbacks if isinstance(c, Reporter) and c is not self),
            series=self._series, changes=self._changes)
        if self.report is None:
            return
        path = self.report(self._session or "") if callable(self.report) else self.report
        try:
            from ..report import render

            verified = None if self.audit is None else verify(self.audit.path,
                                                                key_env=self.audit.key_env)
            Path(path).write_text(render(self._records, verified=verified), encoding="utf-8")
        except Exception as exc:
            logger.warning("The privacy report could not be written to %s (%s); the fit is "
                           "not affected", path, exc)
