"""PrivacySnapshot, one frozen record per optimizer step; protocols by which callbacks add to it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

__all__ = ["FIELDS", "Observer", "PrivacySnapshot", "Reporter", "StepReporter", "reported"]


@dataclass(frozen=True, slots=True)
class PrivacySnapshot:
    """What the monitor knows after one optimizer step; ``None`` means "not known".

    ``epsilon`` (earlier fits included) is never below the accountant's ``get_epsilon`` after
    ``epsilon_step`` steps (``epsilon_exact`` 1: that value, 0: a bound). ``session_*`` and
    ``accounting_errors`` count this session (``session_epsilon``: exact values only).
    ``assessed``: forecast, steps left and risk were computed (the newest step of each publisher
    batch). ``extra``: optional parts' values by catalog attribute."""

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
    def privacy_values(self) -> Mapping[str, Any]:
        """Latest results by catalog attribute (an attack's score), read on the publisher thread."""


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
    def privacy_step_values(self, step: int) -> Callable[[], Mapping[str, Any]] | None:
        """After each step, on the training thread: a reader the publisher thread calls, or None."""


@runtime_checkable
class Observer(Protocol):
    def privacy_observe(self, snapshot: PrivacySnapshot) -> None:
        """Sees every snapshot of the exporting rank (the audit trail), on the publisher thread."""


@runtime_checkable
class Source(Protocol):
    """The callback that publishes the snapshots (``PrivacyMonitor``), found by what it offers."""

    delta: float
    session_id: str
    accounting: Any

    @property
    def last_snapshot(self) -> PrivacySnapshot | None: ...
