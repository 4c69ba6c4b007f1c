"""PrivacySnapshot: one frozen record per optimizer step, and how optional parts add to it.

The monitor finds the protocols' implementers among the trainer's callbacks (duck typing).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

__all__ = ["FIELDS", "Observer", "PrivacySnapshot", "Reporter", "StepReporter", "reported"]


@dataclass(frozen=True, slots=True)
class PrivacySnapshot:
    """What the monitor knows after one optimizer step; ``None`` means "not known".

    ``epsilon`` (at ``delta``, earlier fits included) is never below the accountant's own
    ``get_epsilon`` for ``epsilon_step`` accounted steps: ``epsilon_exact`` 1 when it is that
    value, 0 for an upper bound. ``session_steps``, ``session_epsilon`` (exact values only: a
    counter cannot go down) and ``accounting_errors`` count what this session (a fit, or every
    fit of a named one) accounted. ``assessed``: the forecast, steps left and risk bound were
    computed (for the newest step of each publisher batch). ``extra``: the optional parts'
    values by catalog attribute (:class:`Reporter`, :class:`StepReporter`). Under DDP, ranks
    other than 0 export only ``throughput`` and ``step_seconds``.
    """

    step: int
    timestamp_ns: int
    accountant: str
    rank: int = 0
    delta: float | None = None
    epsilon: float | None = None
    epsilon_step: int | None = None
    epsilon_exact: int | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    sample_rate: float | None = None
    noise_std: float | None = None
    throughput: float | None = None
    step_seconds: float | None = None
    target_epsilon: float | None = None
    budget_remaining: float | None = None
    epsilon_forecast: float | None = None
    budget_exhaustion_steps: int | None = None
    budget_exhausted: int | None = None
    session_steps: int | None = None
    session_epsilon: float | None = None
    accounting_errors: int | None = None
    membership_inference_risk: float | None = None
    assessed: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    def get(self, attr: str) -> Any:
        """The value of catalog attribute ``attr``: a field, else an ``extra`` value."""
        return getattr(self, attr) if attr in FIELDS else self.extra.get(attr)


FIELDS = frozenset(f.name for f in fields(PrivacySnapshot))


@runtime_checkable
class Reporter(Protocol):
    """Latest results (an attack's score, policy violations) by catalog attribute, read on the
    publisher thread for the newest step of each batch and at the end of the fit."""

    def privacy_values(self) -> Mapping[str, Any]:
        ...


def reported(reporters: Any) -> dict[str, Any]:
    """The reporters' latest values together; mappings (attack scores by attack) are merged."""
    values: dict[str, Any] = {}
    for reporter in reporters:
        for key, value in reporter.privacy_values().items():
            old = values.get(key)
            values[key] = {**old, **value} if isinstance(old, dict) and value else value
    return values


@runtime_checkable
class StepReporter(Protocol):
    """Per-step measurements (mechanism statistics): called on the training thread after each
    optimizer step, it returns what the publisher thread calls to read the step's values (device
    values are read there), or ``None``."""

    def privacy_step_values(self, step: int) -> Callable[[], Mapping[str, Any]] | None:
        ...


@runtime_checkable
class Observer(Protocol):
    """Sees every snapshot of the exporting rank (the audit trail), on the publisher thread."""

    def privacy_observe(self, snapshot: PrivacySnapshot) -> None:
        ...
