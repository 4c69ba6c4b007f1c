"""What every exporter implements."""

from dataclasses import dataclass, field
from typing import Any

from ..snapshot import PrivacySnapshot

__all__ = ["Exporter", "RunInfo"]


@dataclass(frozen=True)
class RunInfo:
    """Facts fixed for one fit; ``exporters`` are the monitor's and its publisher."""

    session_id: str
    model_name: str
    accountant: str
    rank: int = 0
    world_size: int = 1
    delta: float = 0.0
    target_epsilon: float | None = None
    exporters: tuple[Any, ...] = field(default=(), compare=False)


class Exporter:
    """Base class of exporters, driven by :class:`~privacy_callbacks.PrivacyMonitor` on each
    rank: :meth:`start` in ``setup`` (bind ports before training), :meth:`open` at train start,
    :meth:`export` on the publisher thread, :meth:`close` at teardown. ``name`` labels its
    ``dropped`` count (outage, full buffer); ``rank`` and ``local_rank`` are set before ``start``;
    with ``every_step = False`` it gets each publisher batch's newest snapshot and measured steps.
    """

    name: str = "exporter"
    every_step: bool = True

    def __init__(self) -> None:
        self.dropped = self.rank = self.local_rank = 0

    def start(self) -> None:
        """Acquire ports and connections; once per fit."""

    def open(self, info: RunInfo) -> None:
        """Bind the run's labels."""

    def export(self, snapshot: PrivacySnapshot) -> None:
        """Publish one snapshot; must not block for long."""
        raise NotImplementedError

    def close(self, timeout: float = 10.0) -> None:
        """Flush and release everything within ``timeout`` seconds."""
