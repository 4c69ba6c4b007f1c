"""DP policy checks: the run's settings measured against a policy the user sets.

A policy is the user's; its name only labels the violations. No law (GDPR, HIPAA, …) prescribes an
epsilon, and a clean report here is not a legal finding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DPPolicy", "Violation", "check_start"]

VIOLATION_TYPES = ("delta_not_below_inverse_n", "non_poisson_sampling", "secure_mode_off",
                   "target_above_policy_max", "epsilon_above_policy_max", "training_past_target")


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``type`` is the ``violation_type`` label, ``detail`` the log text."""

    type: str
    detail: str


@dataclass(frozen=True)
class DPPolicy:
    """What a run must satisfy; each broken rule counts in ``privacy_compliance_violations_total``.

    Args:
        name: The ``policy`` label, e.g. ``"default"`` or your organisation's policy name.
        max_epsilon: Largest epsilon allowed: the target must not exceed it and training must not
            spend more. ``None``: no ceiling.
        delta_below_inverse_n: Require delta < 1/N (N: training set size): a delta of 1/N allows
            a mechanism that publishes one whole record.
        require_poisson_sampling: Require Poisson subsampling (Opacus ``DPDataLoader`` or the
            ``DifferentialPrivacy`` callback's sampler), which every Opacus accountant assumes
            when it computes epsilon.
        require_secure_mode: Require Opacus ``secure_mode`` (noise from a cryptographically
            secure generator; floating-point attacks on the plain one are known).
        stop_at_target: Count a violation when training goes on after epsilon passed the target.
    """

    name: str = "default"
    max_epsilon: float | None = None
    delta_below_inverse_n: bool = True
    require_poisson_sampling: bool = True
    require_secure_mode: bool = False
    stop_at_target: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Unexpected policy name {self.name!r}; use a non-empty string")
        if self.max_epsilon is not None and (
                isinstance(self.max_epsilon, bool) or not isinstance(self.max_epsilon, (int, float))
                or not 0 < self.max_epsilon < math.inf):
            raise ValueError(f"Unexpected value for max_epsilon: {self.max_epsilon!r}; use a "
                             "positive finite number or None")

    @classmethod
    def preset(cls, preset: str, **overrides: Any) -> DPPolicy:
        """A named starting point: ``"default"`` or ``"strict"`` (secure mode, epsilon <= 8).

        ``overrides`` replace fields, e.g. ``DPPolicy.preset("strict", name="hipaa")`` to label
        the violations with your own policy's name.
        """
        presets = {
            "default": cls(),
            "strict": cls(name="strict", max_epsilon=8.0, require_secure_mode=True),
        }
        if preset not in presets:
            raise ValueError(f"Unknown policy preset {preset!r}; use one of {sorted(presets)}")
        return dataclasses.replace(presets[preset], **overrides)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> DPPolicy:
        """Read a policy from JSON or TOML; keys are the field names, plus ``preset``."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib

                data = tomllib.loads(text)
            else:
                raise ModuleNotFoundError(f"{path}: TOML policies need Python >= 3.11 (tomllib); "
                                          "use a JSON policy", name="tomllib")
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a policy is a table/object of fields")
        known = {f.name for f in dataclasses.fields(cls)} | {"preset"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown policy keys {unknown}; use {sorted(known)}")
        preset = data.pop("preset", "default")
        return cls.preset(preset, **data)


def check_start(policy: DPPolicy, *, delta: float, dataset_size: int | None,
                poisson: bool | None, secure_mode: bool,
                target_epsilon: float | None) -> list[Violation]:
    """The policy's rules that the run's settings break when training starts."""
    found: list[Violation] = []
    if policy.delta_below_inverse_n and dataset_size and delta >= 1.0 / dataset_size:
        found.append(Violation("delta_not_below_inverse_n",
                               f"delta={delta:g} is not below 1/N={1.0 / dataset_size:g} "
                               f"(N={dataset_size} training examples)"))
    if policy.require_poisson_sampling and poisson is False:
        found.append(Violation("non_poisson_sampling",
                               "the train loader does not sample as Poisson but the accountant "
                               "assumes it; use make_private(poisson_sampling=True) and its "
                               "data loader, or DifferentialPrivacy(poisson_sampling=True)"))
    if policy.require_secure_mode and not secure_mode:
        found.append(Violation("secure_mode_off",
                               "secure_mode is off; use PrivacyEngine(secure_mode=True) or "
                               "DifferentialPrivacy(secure_mode=True)"))
    if (policy.max_epsilon is not None and target_epsilon is not None
            and target_epsilon > policy.max_epsilon):
        found.append(Violation("target_above_policy_max",
                               f"target epsilon {target_epsilon:g} is above the policy's "
                               f"maximum {policy.max_epsilon:g}"))
    return found
