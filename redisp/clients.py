"""The ``max_clients`` cap, shared by both front doors.

One counter for HTTP and RESP together, as SPEC §1 asks: a connection takes a
slot when accepted and gives it back when closed.  The count is the
``connected_clients`` gauge itself, so it cannot drift from what is reported.
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
        if self._metrics.connected_clients >= self.limit:
            return False
        self._metrics.connected_clients += 1
        self._metrics.connections_received += 1
        return True

    def release(self) -> None:
        """Give back the slot of a connection that was admitted and has closed."""
        self._metrics.connected_clients -= 1
