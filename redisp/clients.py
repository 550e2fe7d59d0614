"""The ``max_clients`` cap, shared by both front doors.

One counter for HTTP and RESP together, as SPEC §1 asks: a connection takes a
slot when accepted and gives it back when closed.  A client's pinned backing
connection (SPEC §7) takes one too: each is a file descriptor like a client's.
The counts are the ``connected_clients`` and ``pinned_clients`` gauges
themselves, so they cannot drift from what is reported.
"""

from __future__ import annotations

from redisp.metrics import Metrics


class ClientSlots:
    """Admission of connections up to ``limit`` open at once."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self._metrics = metrics

    def acquire(self) -> bool:
        """Take a slot for a new connection; False when every slot is taken."""
        m = self._metrics
        if m.connected_clients + m.pinned_clients >= self.limit:
            return False
        m.connected_clients += 1
        m.connections_received += 1
        return True

    def release(self) -> None:
        """Give back the slot of a connection that was admitted and has closed."""
        self._metrics.connected_clients -= 1

    def acquire_pinned(self) -> bool:
        """Take a slot for a client's pinned backing connection; False when full."""
        m = self._metrics
        if m.connected_clients + m.pinned_clients >= self.limit:
            return False
        m.pinned_clients += 1
        return True

    def release_pinned(self) -> None:
        """Give back the slot of a pinned connection that was let go."""
        self._metrics.pinned_clients -= 1
