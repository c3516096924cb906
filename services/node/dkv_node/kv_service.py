"""The node's ``dkv.v1.KV`` gRPC service: validate, route to the shard's group, answer.

Errors become gRPC statuses in one place, :mod:`dkv.host.grpc_errors` (NOT_LEADER is
UNAVAILABLE with the leader's id, name and client address in trailing metadata).

Ranges fan out to every shard this node hosts, in parallel, and are merged in key order. A
request that names a shard (``RangeRequest.shard_id``, ``WatchRequest.shard_id``,
``DeleteRequest.shard_id``) touches only that shard: that is how the gateway fans out across
nodes and merges, since a node may host only some shards of a cluster.

Key -> shard: ``shard_for_key(key, shard_count())`` when the node is told the cluster's shard
count (a node hosting only some shards), else the number of shards hosted (every node hosts
every shard while placement is static). A key whose shard is not hosted here answers
UNAVAILABLE (NOT_LEADER with no leader hint), so a router tries another node.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from dkv import sizes
from dkv.errors import InvalidArgument, NotLeader
from dkv.host import Host
from dkv.host.grpc_errors import Ctx, LeaderInfo, call, leader_trailers
from dkv.keys import range_limit
from dkv.paging import merge_pages
from dkv.sharding import shard_for_key
from dkv.v1 import kv_pb2
from dkv.validation import check_delete, check_put, check_range, check_watch
from dkv_node.kv_state import (
    DELETE_RANGE_KEYS_MAX,
    prefix_end,
)
from dkv_node.leader_router import LeaderRouter
from dkv_node.limits import Limits
from dkv_node.metrics import NodeStats
from dkv_node.shard import KvShard

__all__ = ["KvService", "add_kv_service"]

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 5.0


class KvService:
    def __init__(
        self,
        host: Host,
        shards: dict[int, KvShard],
        limits: Limits,
        leader_info: LeaderInfo | None = None,
        router: LeaderRouter | None = None,
        *,
        shard_count: Callable[[], int] | None = None,
        stats: NodeStats | None = None,
    ) -> None:
        self.host = host
        self.stats = stats
        self._on_error = stats.on_error if stats is not None else None
        self.shards = shards
        self.limits = limits
        self.router = router
        self.shard_count = shard_count
        self.leader_info: LeaderInfo = leader_info or (lambda _id: ("", ""))

    # -- plumbing -------------------------------------------------------------------------------

    def _shard_of(self, key: bytes) -> int:
        count = self.shard_count() if self.shard_count is not None else len(self.shards)
        if count <= 0:  # a node that has not learned the cluster's shards yet
            raise NotLeader(0, "this node does not know the cluster's shards yet")
        gid = shard_for_key(key, count)
        if gid not in self.shards:
            raise NotLeader(0, f"shard {gid} is not hosted on this node")
        return self._serving(gid)

    def _scoped(self, shard_id: int) -> int:
        """A shard a request names explicitly. One the cluster does not have is the caller's
        mistake (INVALID_ARGUMENT); one that exists but is not hosted here is a routing miss
        (UNAVAILABLE, no leader hint): during a move the map can name this node a moment
        before it hosts the shard, or after it dropped it, and the caller should try another
        replica."""
        count = self.shard_count() if self.shard_count is not None else len(self.shards)
        if shard_id not in self.shards:
            if count and not 1 <= shard_id <= count:
                raise InvalidArgument(
                    f"shard {shard_id} does not exist (the cluster has shards 1..{count})"
                )
            raise NotLeader(0, f"shard {shard_id} is not hosted on this node")
        return self._serving(shard_id)

    def _serving(self, gid: int) -> int:
        """``gid``, unless this member was removed from it: then NOT_LEADER (UNAVAILABLE with
        the leader it last knew), so clients go to the members instead of waiting on a node
        that no leader talks to any more."""
        if self.host.removed_from(gid):
            raise NotLeader(
                self.host.leader(gid),
                f"this member was removed from shard {gid}; use the cluster's other members",
            )
        return gid

    @staticmethod
    def _timeout(context: Ctx) -> float:
        remaining = context.time_remaining()
        return DEFAULT_TIMEOUT_S if remaining is None else max(0.001, remaining)

    async def _call(self, context: Ctx, fn: Callable[[], Awaitable[T]]) -> T:
        return await call(context, fn, self.leader_info, self._on_error)

    def _term(self, group_id: int) -> int:
        return self.host.term(group_id)

    # -- writes ---------------------------------------------------------------------------------

    async def put(self, req: kv_pb2.PutRequest, context: Ctx) -> kv_pb2.PutResponse:
        async def run() -> kv_pb2.PutResponse:
            check_put(req)
            self.limits.check_key(req.key)
            self.limits.check_value(req.value)
            if req.precondition.WhichOneof("condition") == "value":
                # Longer than any stored value, it could never match; bounded, it keeps the
                # largest valid Put within the message limits (dkv.sizes).
                self.limits.check_value(req.precondition.value, "precondition.value")
            self.limits.check_request_id(req.request_id)
            gid = self._shard_of(req.key)
            cmd = kv_pb2.KvCommand(request_id=req.request_id, put=req)
            resp = await self.host.propose(gid, cmd.SerializeToString(), self._timeout(context))
            assert isinstance(resp, kv_pb2.PutResponse)
            resp.header.raft_term = self._term(gid)
            return resp

        return await self._call(context, run)

    async def delete(self, req: kv_pb2.DeleteRequest, context: Ctx) -> kv_pb2.DeleteResponse:
        async def run() -> kv_pb2.DeleteResponse:
            check_delete(req)
            self.limits.check_key(req.key)
            if req.precondition.WhichOneof("condition") == "value":
                self.limits.check_value(req.precondition.value, "precondition.value")
            self.limits.check_request_id(req.request_id)
            if req.range_end:
                return await self._delete_range(req, self._timeout(context))
            gid = self._shard_of(req.key)
            cmd = kv_pb2.KvCommand(request_id=req.request_id, delete=req)
            resp = await self.host.propose(gid, cmd.SerializeToString(), self._timeout(context))
            assert isinstance(resp, kv_pb2.DeleteResponse)
            resp.header.raft_term = self._term(gid)
            return resp

        return await self._call(context, run)

    async def _delete_range(
        self, req: kv_pb2.DeleteRequest, timeout_s: float
    ) -> kv_pb2.DeleteResponse:
        """Delete ``[key, range_end)`` in every shard. Each shard deletes its part in steps of
        at most DELETE_RANGE_KEYS_MAX keys, each step one Raft entry (atomic within it); the
        whole range is not one atomic operation across shards or steps. Retrying with the
        same request id is safe: every step has its own id derived from it."""
        if req.shard_id and req.shard_id not in self.shards:
            raise InvalidArgument(f"shard {req.shard_id} does not exist")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        async def steps(gid: int, timeout_s: float) -> list[kv_pb2.DeleteResponse]:
            """This node leads ``gid``: delete its part in steps."""
            out = []
            for step in itertools.count():
                sub = kv_pb2.DeleteRequest()
                sub.CopyFrom(req)
                rid = f"{req.request_id}/{gid}/{step}" if req.request_id else ""
                cmd = kv_pb2.KvCommand(request_id=rid, delete=sub)
                left = max(0.001, deadline - loop.time())
                resp = await self.host.propose(gid, cmd.SerializeToString(), left)
                assert isinstance(resp, kv_pb2.DeleteResponse)
                out.append(resp)
                if resp.deleted < DELETE_RANGE_KEYS_MAX:
                    return out
            raise AssertionError("unreachable")

        async def forwarded(
            gid: int, ch: grpc.aio.Channel, timeout_s: float
        ) -> list[kv_pb2.DeleteResponse]:
            sub = kv_pb2.DeleteRequest()
            sub.CopyFrom(req)
            sub.shard_id = gid
            stub = ch.unary_unary(
                "/dkv.v1.KV/Delete",
                request_serializer=kv_pb2.DeleteRequest.SerializeToString,
                response_deserializer=kv_pb2.DeleteResponse.FromString,
            )
            return [await stub(sub, timeout=timeout_s)]

        async def one_shard(gid: int) -> list[kv_pb2.DeleteResponse]:
            if self.router is None or req.shard_id:
                return await steps(gid, timeout_s)  # shard-scoped: this node must lead it
            return await self.router.run(
                gid,
                lambda t: steps(gid, t),
                lambda ch, t: forwarded(gid, ch, t),
                deadline,
            )

        gids = [req.shard_id] if req.shard_id else sorted(self.shards)
        parts = await asyncio.gather(*(one_shard(g) for g in gids))
        resps = [r for rs in parts for r in rs]
        merged = kv_pb2.DeleteResponse(succeeded=True, deleted=sum(r.deleted for r in resps))
        merged.header.CopyFrom(max(resps, key=lambda r: r.header.revision).header)
        if req.prev_kv:
            merged.prev_kvs.extend(
                sorted((kv for r in resps for kv in r.prev_kvs), key=lambda kv: kv.key)
            )
        return merged

    # -- reads ----------------------------------------------------------------------------------

    async def watch(
        self, req: kv_pb2.WatchRequest, context: Ctx
    ) -> AsyncIterator[kv_pb2.WatchResponse]:
        async for resp in watch_stream(self, req, context):
            yield resp

    async def _fresh(self, gid: int, req: kv_pb2.RangeRequest, timeout_s: float) -> None:
        self._serving(gid)
        if req.consistency == kv_pb2.READ_CONSISTENCY_LINEARIZABLE:
            await self.host.read_index(gid, timeout_s)

    async def range(self, req: kv_pb2.RangeRequest, context: Ctx) -> kv_pb2.RangeResponse:
        async def run() -> kv_pb2.RangeResponse:
            check_range(req)
            timeout = self._timeout(context)
            if not req.prefix and not req.range_end:
                self.limits.check_key(req.key)
                # shard_id N: read the key in shard N (empty if the key lives elsewhere).
                gid = self._scoped(req.shard_id) if req.shard_id else self._shard_of(req.key)
                await self._fresh(gid, req, timeout)
                resp = self.shards[gid].kv.range(req)
                resp.header.raft_term = self._term(gid)
                return resp
            if req.prefix:
                self.limits.check_key(req.prefix, "prefix")
            gids = [self._scoped(req.shard_id)] if req.shard_id else sorted(self.shards)
            # Every shard may hold keys of the range: confirm freshness everywhere at once,
            # then merge each shard's first `limit` keys in key order.
            await asyncio.gather(*(self._fresh(gid, req, timeout) for gid in gids))
            limit = range_limit(req.limit)
            sub = kv_pb2.RangeRequest()
            sub.CopyFrom(req)
            sub.limit = limit
            if req.count_only:
                # Each shard's page must carry keys for the merge; values would only shrink
                # the pages (their bytes count), as at the gateway.
                sub.count_only = False
                sub.keys_only = True
            parts = [self.shards[gid].kv.range(sub) for gid in gids]
            resp = kv_pb2.RangeResponse()
            resp.header.CopyFrom(parts[0].header)
            resp.header.revision = max(p.header.revision for p in parts)
            return merge_pages(parts, limit).fill(resp, req.count_only)

        return await self._call(context, run)


WATCH_BATCH_EVENTS_MAX = 1000
WATCH_BATCH_BYTES_MAX = sizes.WATCH_BATCH_BYTES_MAX
"""A watch message carries about this many bytes of events (whole revisions; one revision
alone may be bigger), so big values do not exceed a receiver's message limit (4 MiB by
default in gRPC; dkv.sizes derives the servers' limits from it)."""


async def watch_stream(
    svc: KvService, req: kv_pb2.WatchRequest, context: Ctx
) -> AsyncIterator[kv_pb2.WatchResponse]:
    """Stream the changes of a key or prefix from ``start_revision`` on.

    Served from this replica's applied history, so it keeps going through leader changes.
    Revisions are per shard: a key's watch lives in its shard; a prefix watch covers every
    shard and each response names its shard in ``header.shard_id`` (``start_revision``
    then applies to every shard's revision space). ``shard_id`` N watches shard N only."""
    try:
        check_watch(req)
        if req.prefix:
            svc.limits.check_key(req.prefix, "prefix")
            lo, hi = req.prefix, prefix_end(req.prefix)
        else:
            svc.limits.check_key(req.key)
            lo = req.key
            hi = req.range_end or req.key + b"\x00"
        if req.shard_id:
            gids = [svc._scoped(req.shard_id)]
        elif req.prefix or req.range_end:
            gids = sorted(svc.shards)
        else:
            gids = [svc._shard_of(req.key)]
        for gid in gids:
            svc._serving(gid)
    except InvalidArgument as exc:
        if svc._on_error is not None:
            svc._on_error(exc)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except NotLeader as exc:
        if svc._on_error is not None:
            svc._on_error(exc)
        context.set_trailing_metadata(leader_trailers(exc.leader_hint, svc.leader_info))
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    queue: asyncio.Queue[kv_pb2.WatchResponse | None] = asyncio.Queue(maxsize=64)

    async def follow(gid: int) -> None:
        kv = svc.shards[gid].kv
        nxt = req.start_revision if req.start_revision > 0 else kv.store.revision() + 1
        # Until the node stops, or the shard moves away (Host.remove_group): the stream then
        # ends cleanly and the client resumes at another replica, as after a shutdown.
        while svc.host.running and gid in svc.host.groups:
            # The watch history is read from RocksDB itself: look only as far as what is
            # written (an apply batch may be staged but still on its way to disk).
            seen_applied = svc.host.written_applied(gid)
            events, last, compacted = kv.watch_events(
                nxt, lo, hi, WATCH_BATCH_EVENTS_MAX, WATCH_BATCH_BYTES_MAX
            )
            if compacted:
                resp = kv_pb2.WatchResponse(compacted=True, compact_revision=last)
                resp.header.CopyFrom(kv.header())
                await queue.put(resp)
                await queue.put(None)
                return
            if events:
                resp = kv_pb2.WatchResponse()
                resp.header.CopyFrom(kv.header())
                for ev in events:
                    e = resp.events.add()
                    e.CopyFrom(ev)
                    if not req.prev_kv:
                        e.ClearField("prev_kv")
                await queue.put(resp)  # bounded: a slow watcher slows only itself
            advanced = last + 1 > nxt
            nxt = max(nxt, last + 1)
            if gid not in svc.host.groups:
                break  # removed while we were handing over the batch
            if advanced:
                # The batch may have stopped at a bound (count or bytes) with more history
                # written after it: read on before waiting.
                continue
            # Caught up: sleep until this shard applies anything new (an event, not a poll).
            await svc.host.wait_applied(gid, seen_applied + 1)
        await queue.put(None)  # the node is stopping or the shard left: end the stream

    tasks = [asyncio.get_running_loop().create_task(follow(g)) for g in gids]
    stats = svc.stats
    watchers = stats.watchers if stats is not None else {}
    sent = stats.watch_events_sent if stats is not None else {}
    for g in gids:
        watchers[g] = watchers.get(g, 0) + 1
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            yield item
            gid = item.header.shard_id
            sent[gid] = sent.get(gid, 0) + len(item.events)
    finally:
        for g in gids:
            watchers[g] -= 1
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def add_kv_service(server: grpc.aio.Server, service: KvService) -> None:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Put": grpc.unary_unary_rpc_method_handler(
            service.put,
            request_deserializer=kv_pb2.PutRequest.FromString,
            response_serializer=kv_pb2.PutResponse.SerializeToString,
        ),
        "Delete": grpc.unary_unary_rpc_method_handler(
            service.delete,
            request_deserializer=kv_pb2.DeleteRequest.FromString,
            response_serializer=kv_pb2.DeleteResponse.SerializeToString,
        ),
        "Range": grpc.unary_unary_rpc_method_handler(
            service.range,
            request_deserializer=kv_pb2.RangeRequest.FromString,
            response_serializer=kv_pb2.RangeResponse.SerializeToString,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            service.watch,
            request_deserializer=kv_pb2.WatchRequest.FromString,
            response_serializer=kv_pb2.WatchResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("dkv.v1.KV", handlers),))
