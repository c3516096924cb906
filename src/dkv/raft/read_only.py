"""ReadIndex bookkeeping on the leader (thesis §6.4).

A leader serving a linearizable read records its commit index as the read index, then confirms
it is still the leader by a round of heartbeats: once a quorum acknowledged a heartbeat that
carried the request's id (or any later one), no other leader can have committed anything the
read would miss. Requests are confirmed in arrival order, so one acknowledged heartbeat releases
every request queued before it: reads are batched for free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dkv.raft.types import Message

__all__ = ["ReadIndexStatus", "ReadOnly"]


@dataclass(slots=True)
class ReadIndexStatus:
    request: Message
    index: int
    acks: set[int] = field(default_factory=set)


class ReadOnly:
    """Pending ReadIndex requests, bounded by ``max_pending``."""

    __slots__ = ("max_pending", "pending", "queue")

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.pending: dict[bytes, ReadIndexStatus] = {}
        self.queue: deque[bytes] = deque()

    def is_full(self) -> bool:
        return len(self.queue) >= self.max_pending

    def add_request(self, index: int, request: Message) -> bool:
        """Queue a request; False if a request with the same id is already pending."""
        ctx = request.context
        if ctx in self.pending:
            return False
        self.pending[ctx] = ReadIndexStatus(request=request, index=index)
        self.queue.append(ctx)
        return True

    def recv_ack(self, node_id: int, ctx: bytes) -> set[int] | None:
        """Record that ``node_id`` acknowledged the heartbeat carrying ``ctx``."""
        status = self.pending.get(ctx)
        if status is None:
            return None
        status.acks.add(node_id)
        return status.acks

    def advance(self, ctx: bytes) -> list[ReadIndexStatus]:
        """Release ``ctx`` and every request queued before it (all are now confirmed)."""
        if ctx not in self.pending:
            return []
        released: list[ReadIndexStatus] = []
        while self.queue:
            c = self.queue.popleft()
            released.append(self.pending.pop(c))
            if c == ctx:
                break
        return released

    def last_pending_request_ctx(self) -> bytes:
        return self.queue[-1] if self.queue else b""
