"""What every exporter implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..snapshot import PrivacySnapshot

__all__ = ["Exporter", "RunInfo"]


@dataclass(frozen=True)
class RunInfo:
    """Facts fixed for one fit, given to each exporter when it starts; ``exporters`` are every
    exporter of the monitor and its publisher (each has ``name`` and ``dropped``)."""

    session_id: str
    model_name: str
    accountant: str
    rank: int = 0
    world_size: int = 1
    delta: float = 0.0
    target_epsilon: float | None = None
    exporters: tuple[Any, ...] = field(default=(), compare=False)


class Exporter:
    """Base class of exporters, driven by :class:`~privacy_callbacks.PrivacyMonitor`:
    :meth:`start` in ``setup`` (bind ports: errors surface before training), :meth:`open` when
    training starts, :meth:`export` on the publisher thread (never the training thread),
    :meth:`close` at teardown within ``timeout`` seconds. Under DDP every rank runs its own.

    Attributes:
        name: The ``exporter`` label of ``privacy_export_dropped_total``.
        dropped: Snapshots or points dropped so far (outage, full buffer).
        rank, local_rank: Set by the monitor before :meth:`start` (a port per local rank).
        every_step: Whether it needs every step's snapshot (a time-series database does). With
            ``False`` it gets the newest of each publisher batch (every 50 ms) and every step
            with measured values.
    """

    name: str = "exporter"
    every_step: bool = True

    def __init__(self) -> None:
        self.dropped = 0
        self.rank = 0
        self.local_rank = 0

    def start(self) -> None:
        """Acquire ports and connections; once per fit."""

    def open(self, info: RunInfo) -> None:
        """Bind the run's labels."""

    def export(self, snapshot: PrivacySnapshot) -> None:
        """Publish one snapshot; must not block for long."""
        raise NotImplementedError

    def close(self, timeout: float = 10.0) -> None:
        """Flush and release everything within ``timeout`` seconds."""
