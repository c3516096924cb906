"""Run one shard's part of a request at that shard's leader, wherever it is.

A request that touches several shards (a range delete, a membership change) reaches one node,
which leads some shards and follows in others. For each shard this node either does the work
itself (it leads) or forwards a shard-scoped request to the leader's client address (learned
from the member registry). While a shard has no leader, or the leader moved, it waits for
this node to see a new one, within the caller's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import grpc
import grpc.aio

from dkv.errors import ConfChangeRejected, DeadlineExceeded, DkvError, InvalidArgument, NotLeader

if TYPE_CHECKING:
    from dkv.host import Host
    from dkv.host.members import MemberRegistry

__all__ = ["LeaderRouter"]

T = TypeVar("T")


class LeaderRouter:
    def __init__(
        self,
        host: Host,
        registry: MemberRegistry,
        self_id: int,
        channel_factory: Callable[[str], grpc.aio.Channel],
    ) -> None:
        self.host = host
        self.registry = registry
        self.self_id = self_id
        # A pool's get (dkv.host.channels.ChannelPool): asked per call, never cached here,
        # since the pool replaces its channels when the certificate files change.
        self._channel_factory = channel_factory

    def channel(self, address: str) -> grpc.aio.Channel:
        return self._channel_factory(address)

    async def run(
        self,
        gid: int,
        local: Callable[[float], Awaitable[T]],
        remote: Callable[[grpc.aio.Channel, float], Awaitable[T]],
        deadline: float,
    ) -> T:
        """``local(timeout_s)`` when this node leads ``gid``, else ``remote(channel to the
        leader, timeout_s)``; retried as leadership moves, until ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"shard {gid}: no leader answered in time")
            leader = self.host.leader(gid)
            if leader == self.self_id:
                try:
                    return await local(remaining)
                except NotLeader:
                    pass  # lost leadership meanwhile: look again
            elif leader:
                address = self.registry.client_address(leader)
                if not address:
                    raise NotLeader(
                        leader,
                        f"shard {gid} is led by {leader:x}, whose client address is not known "
                        "here yet; send the request to the leader",
                    )
                try:
                    return await remote(self.channel(address), remaining)
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                    if code is grpc.StatusCode.FAILED_PRECONDITION:
                        raise ConfChangeRejected(details) from exc
                    if code is grpc.StatusCode.INVALID_ARGUMENT:
                        raise InvalidArgument(details) from exc
                    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise DeadlineExceeded(f"shard {gid} leader: {details}") from exc
                    if code is not grpc.StatusCode.UNAVAILABLE:
                        raise DkvError(f"shard {gid} leader: {code.name}: {details}") from exc
            # No leader (an election is under way) or it moved: wait until this node sees
            # another one -- at most half a second, since the forwarded-to node may simply
            # have been slow to answer.
            with contextlib.suppress(DeadlineExceeded):
                await self.host.wait_for(
                    lambda seen=leader: self.host.leader(gid) not in (0, seen),  # type: ignore[misc]
                    min(0.5, max(0.01, deadline - loop.time())),
                )

    async def close(self) -> None:
        """Nothing to close: the channels belong to the caller's pool."""
