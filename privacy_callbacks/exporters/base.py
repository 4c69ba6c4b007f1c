"""What every exporter implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..publisher import Publisher
    from ..snapshot import PrivacySnapshot

__all__ = ["Exporter", "RunInfo"]


@dataclass(frozen=True)
class RunInfo:
    """Facts fixed for one fit, handed to each exporter when fitting starts.

    Attributes:
        session_id: Label identifying the training run.
        model_name: Label naming the model.
        accountant: The accountant's mechanism (``rdp``, ``prv``, ``gdp``).
        rank: Global rank of this process.
        world_size: Number of processes.
        delta: Delta epsilon is reported for.
        target_epsilon: The budget, if one was set.
        exporters: Every exporter of the monitor and its publisher, so one can report the others'
            health (``name`` and ``dropped``).
    """

    session_id: str
    model_name: str
    accountant: str
    rank: int = 0
    world_size: int = 1
    delta: float = 0.0
    target_epsilon: float | None = None
    exporters: tuple[Exporter | Publisher, ...] = field(default=(), compare=False)


class Exporter:
    """Base class of exporters.

    Lifecycle, driven by :class:`~privacy_callbacks.PrivacyMonitor`:

    1. :meth:`start` in ``setup`` (bind ports, connect; errors surface before training);
    2. :meth:`open` when fitting starts, with the run's :class:`RunInfo`;
    3. :meth:`export` for every snapshot, on the publisher's background thread, never on the
       training thread;
    4. :meth:`close` at teardown, bounded by ``timeout`` seconds.

    Under DDP every rank runs its own copy; ranks other than 0 get snapshots holding only their
    throughput and step time.

    Attributes:
        name: Value of the ``exporter`` label in ``privacy_export_dropped_total``.
        dropped: Snapshots or points this exporter has dropped so far.
        rank: Global rank of this process, set by the monitor before :meth:`start`.
        local_rank: Rank on this machine (e.g. to pick a port), set before :meth:`start`.
    """

    name: str = "exporter"

    def __init__(self) -> None:
        self.dropped = 0
        self.rank = 0
        self.local_rank = 0

    def start(self) -> None:
        """Acquire resources (ports, connections). Called once per fit on the exporting rank."""

    def open(self, info: RunInfo) -> None:
        """Bind the run's labels. Called when fitting starts."""

    def export(self, snapshot: PrivacySnapshot) -> None:
        """Publish one snapshot. Called on the publisher's thread; must not block for long."""
        raise NotImplementedError

    def close(self, timeout: float = 10.0) -> None:
        """Flush and release resources within ``timeout`` seconds."""
