"""The sink interface: where result lines go once they are in the store."""

from __future__ import annotations

import abc

from ..store.contract import PendingResult, Store


class Sink(abc.ABC):
    """A destination for result lines.

    Delivery is at-least-once from the store's point of view, so each sink makes it idempotent
    (by result id) and records its own progress durably before `deliver` returns.
    """

    name: str
    # Results handed to one `deliver` call at most (each call records its progress: a commit).
    chunk: int = 2000

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def node(self) -> str | None:
        """Deliver only the results of files this node ingested (the outbox), or everyone's (None)."""
        return None

    def ingested(self) -> None:  # noqa: B027 - only the outbox tracks files
        """A spool file has just been wholly ingested (its line count is final now)."""

    async def may_deliver(self) -> bool:
        """Whether this node delivers this sink now (a shared sink needs its lease); checked per chunk."""
        return True

    async def recover(self) -> None:  # noqa: B027 - most sinks need nothing at start-up
        """Repair anything a crash left half-done; called once before the first delivery."""

    async def before_delivery(self) -> None:  # noqa: B027 - only sinks that park results need it
        """Called before each round of delivery (e.g. to send again what was asked to be redelivered)."""

    async def close(self) -> None:  # noqa: B027 - only sinks holding connections need it
        """Release what the sink holds open."""

    @abc.abstractmethod
    async def cursor(self) -> int:
        """The id of the last result this sink has durably delivered."""

    @abc.abstractmethod
    async def deliver(self, results: list[PendingResult]) -> None:
        """Deliver these results (in id order) and durably record that they were delivered."""
