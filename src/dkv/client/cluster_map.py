"""A local copy of the cluster map, kept current by ``WatchClusterMap``.

:class:`ClusterMapView` applies the watch's messages (a whole map, or the parts that changed)
and answers what routers ask: key → slot → shard → replicas and leader, node addresses.
:func:`follow_cluster_map` keeps one view current for as long as it runs: it resumes from the
view's version at any membership replica after a failure (the service then sends only what
was missed, or the whole map), backing off with jitter while no replica answers.

Both the gateway (routing) and managed nodes (which shards to host) use it.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
from collections.abc import Callable, Iterable
from typing import TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from dkv.sharding import slot_for_key
from dkv.v1 import membership_pb2 as pb

__all__ = ["ClusterMapView", "follow_cluster_map"]

log = logging.getLogger("dkv.cluster_map")

M = TypeVar("M", bound=Message)


def _copy(m: M) -> M:
    """A copy the view owns: a protobuf sub-message is a view into its parent, so keeping it
    would let whoever holds the message change (or clear) the view's map behind its back."""
    out = type(m)()
    out.CopyFrom(m)
    return out


# Backoff between watch attempts while no membership replica answers.
RETRY_DELAY_MIN_MS = 50
RETRY_DELAY_MAX_MS = 2000


class ClusterMapView:
    """The cluster map as last seen, with lookups. Not thread-safe (one event loop)."""

    def __init__(self) -> None:
        self.version = 0
        self.nodes: dict[int, pb.Node] = {}
        self.shards: dict[int, pb.Shard] = {}
        self.leaders: dict[int, pb.LeaderEntry] = {}
        self._slot_starts: list[int] = []
        self._slot_ranges: list[pb.SlotRange] = []

    # -- updates --------------------------------------------------------------------------------

    def apply(self, msg: pb.WatchClusterMapResponse) -> None:
        """Bring the view to ``msg.version`` (a whole map replaces everything)."""
        if msg.full:
            self.replace(msg.map)
            return
        for n in msg.nodes:
            self.nodes[n.id] = _copy(n)
        for i in msg.removed_node_ids:
            self.nodes.pop(i, None)
        for s in msg.shards:
            self.shards[s.id] = _copy(s)
        for e in msg.leaders:
            self.leaders[e.shard_id] = _copy(e)
        if msg.slot_ranges:
            self._set_slots(msg.slot_ranges)
        self.version = msg.version

    def replace(self, m: pb.ClusterMap) -> None:
        self.nodes = {n.id: _copy(n) for n in m.nodes}
        self.shards = {s.id: _copy(s) for s in m.shards}
        self.leaders = {e.shard_id: _copy(e) for e in m.leaders}
        self._set_slots(m.slot_ranges)
        self.version = m.version

    def _set_slots(self, ranges: Iterable[pb.SlotRange]) -> None:
        rs = sorted((_copy(r) for r in ranges), key=lambda r: r.start)
        self._slot_ranges = rs
        self._slot_starts = [r.start for r in rs]

    # -- lookups --------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return bool(self.shards) and bool(self._slot_ranges)

    @property
    def shard_count(self) -> int:
        return len(self.shards)

    def shard_of_slot(self, slot: int) -> int:
        """The shard owning ``slot`` (0 when the cluster is not initialized)."""
        i = bisect.bisect_right(self._slot_starts, slot) - 1
        if i < 0:
            return 0
        r = self._slot_ranges[i]
        return int(r.shard_id) if r.start <= slot < r.end else 0

    def shard_of_key(self, key: bytes) -> int:
        return self.shard_of_slot(slot_for_key(key))

    def slot_ranges(self) -> list[pb.SlotRange]:
        """The slot table, sorted by start (the view's own messages: do not change them)."""
        return list(self._slot_ranges)

    def replicas(self, shard_id: int) -> list[int]:
        """Voters (preferred leader first), then learners."""
        s = self.shards.get(shard_id)
        return [] if s is None else [*s.voters, *s.learners]

    def leader(self, shard_id: int) -> int:
        """The last leader the shard reported (0: none known)."""
        e = self.leaders.get(shard_id)
        return 0 if e is None else int(e.leader_id)

    def client_address(self, node_id: int) -> str:
        n = self.nodes.get(node_id)
        return "" if n is None else n.client_address

    def shards_of_node(self, node_id: int) -> dict[int, pb.Shard]:
        """The shards that list ``node_id`` as a voter or learner."""
        return {
            sid: s for sid, s in self.shards.items() if node_id in s.voters or node_id in s.learners
        }


def _delay_s(attempt: int, rng: random.Random) -> float:
    base_ms: float = min(RETRY_DELAY_MAX_MS, RETRY_DELAY_MIN_MS * 2 ** min(attempt, 10))
    return base_ms * (0.5 + rng.random()) / 1000


async def follow_cluster_map(
    channel_for: Callable[[str], grpc.aio.Channel],
    endpoints: list[str],
    view: ClusterMapView,
    on_change: Callable[[ClusterMapView], None],
    rng: random.Random | None = None,
) -> None:
    """Keep ``view`` current from any of ``endpoints`` until cancelled; call ``on_change``
    after every message applied. ``channel_for(endpoint)`` returns a (cached) channel."""
    rng = rng or random.Random()
    attempt = 0
    i = rng.randrange(len(endpoints))
    while True:
        endpoint = endpoints[i % len(endpoints)]
        stream = channel_for(endpoint).unary_stream(
            "/dkv.v1.Membership/WatchClusterMap",
            request_serializer=pb.WatchClusterMapRequest.SerializeToString,
            response_deserializer=pb.WatchClusterMapResponse.FromString,
        )
        call = stream(pb.WatchClusterMapRequest(from_version=view.version))
        try:
            async for msg in call:
                view.apply(msg)
                attempt = 0
                on_change(view)
        except grpc.aio.AioRpcError as exc:
            log.debug("cluster map watch at %s: %s", endpoint, exc.code().name)
        finally:
            call.cancel()
        # The stream ended (replica stopping) or failed: go on at the next replica.
        i += 1
        await asyncio.sleep(_delay_s(attempt, rng))
        attempt += 1
