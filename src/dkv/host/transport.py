"""How hosts exchange Raft messages: the protocol, and an in-process twin for tests.

Messages travel in batches per destination node: ``(group_id, Message)`` pairs, so one
stream between two nodes carries every group they share. Sending never blocks the host loop:
each destination has a bounded queue, and when it is full the batch is dropped and counted
(Raft treats a lost message like any network loss; the leader retries).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from dkv.raft import Message

__all__ = ["Delivery", "MemoryNetwork", "MemoryTransport", "Transport"]

Delivery = Callable[[int, Sequence[tuple[int, Message]]], None]
"""Called by a transport with (from node id, [(group id, message), ...])."""


class Transport(Protocol):
    def send(self, to: int, batch: Sequence[tuple[int, Message]]) -> None:
        """Queue ``batch`` for node ``to``; never blocks; may drop when the queue is full."""
        ...

    def set_delivery(self, deliver: Delivery) -> None: ...

    async def close(self) -> None: ...


class MemoryNetwork:
    """Connects MemoryTransports in one process (the twin of the gRPC peer transport)."""

    def __init__(self, queue_batches_max: int = 1024) -> None:
        self.transports: dict[int, MemoryTransport] = {}
        self.queue_batches_max = queue_batches_max
        self.blocked: set[int] = set()  # nodes cut off from everyone
        self.dropped_batches = 0

    def transport(self, node_id: int) -> MemoryTransport:
        t = MemoryTransport(self, node_id)
        self.transports[node_id] = t
        return t


class MemoryTransport:
    def __init__(self, net: MemoryNetwork, node_id: int) -> None:
        self.net = net
        self.node_id = node_id
        self._deliver: Delivery | None = None
        self._queue: asyncio.Queue[tuple[int, Sequence[tuple[int, Message]]]] = asyncio.Queue(
            maxsize=net.queue_batches_max
        )
        self._task: asyncio.Task[None] | None = None

    def set_delivery(self, deliver: Delivery) -> None:
        self._deliver = deliver
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._pump())

    def send(self, to: int, batch: Sequence[tuple[int, Message]]) -> None:
        dst = self.net.transports.get(to)
        if dst is None or to in self.net.blocked or self.node_id in self.net.blocked:
            self.net.dropped_batches += 1
            return
        try:
            dst._queue.put_nowait((self.node_id, batch))
        except asyncio.QueueFull:
            self.net.dropped_batches += 1

    async def _pump(self) -> None:
        while True:
            frm, batch = await self._queue.get()
            if self._deliver is not None:
                self._deliver(frm, batch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.net.transports.pop(self.node_id, None)
