"""One caller's watch, made of one node stream per shard, merged into one stream.

Revisions are per shard, so a watch over a prefix or range is one ``Watch`` call per shard
with ``WatchRequest.shard_id = N`` (a single key's watch is the one shard of the key). Each
shard's stream runs in its own task and puts what it receives into one bounded queue that the
caller's stream drains: a slow caller slows its own shard streams (gRPC flow control reaches
back to the nodes), never the gateway. Every response keeps ``header.shard_id``; events are in
revision order per shard and interleaved across shards.

Any replica serves a watch (it streams its applied history), so a shard's stream that fails
(node stopped, connection lost) resumes at the next replica, from the revision after the last
one delivered. Where nothing was delivered yet, it resumes from the requested start revision;
a watch "from now" (``start_revision = 0``) first reads the shard's current revision R at the
replica it is about to watch (a serializable shard-scoped Range, no leader needed) and watches
from R + 1, so that a resumption knows exactly where to start: no gap, no duplicate. Events at
or below the last delivered revision are dropped, should a replica send them again.

A ``compacted`` answer ends the whole stream (after passing it on): the caller must re-read
and watch again from a newer revision. A status other than a transient one (e.g.
INVALID_ARGUMENT for an empty key) ends the whole stream with that status. Cancelling the
caller's stream cancels every shard stream.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from dkv.v1 import kv_pb2
from dkv_gateway.router import NodeStatus, Router, text_trailers

__all__ = ["WATCH_QUEUE_MAX", "merged_watch"]

log = logging.getLogger("dkv.gateway.watch")

WATCH_QUEUE_MAX = 64
"""Responses buffered between the shard streams and the caller."""
BACKOFF_BASE_MS = 50
BACKOFF_MAX_MS = 2_000
"""Pause after every replica of a shard failed once, doubling up to this."""
NOW_TIMEOUT_S = 5.0
"""Deadline of the Range that reads a shard's current revision."""

# A stream that fails with one of these resumes elsewhere. INTERNAL and UNKNOWN: a connection
# torn down mid-stream can surface as either.
RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


@dataclass(frozen=True, slots=True)
class _Failed:
    """A shard stream's final error: the caller's stream ends with it."""

    error: NodeStatus


def _backoff_s(rounds: int, rng: random.Random) -> float:
    base_ms = min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * (1 << min(rounds - 1, 10)))
    return base_ms * (0.5 + rng.random()) / 1000


WATCH_METHOD = "/dkv.v1.KV/Watch"


async def _current_revision(channel: grpc.aio.Channel, shard_id: int) -> int:
    """The shard's revision at this replica now (its header), without needing a leader."""
    rng = channel.unary_unary(
        "/dkv.v1.KV/Range",
        request_serializer=kv_pb2.RangeRequest.SerializeToString,
        response_deserializer=kv_pb2.RangeResponse.FromString,
    )
    probe = kv_pb2.RangeRequest(
        key=b"\x00",
        range_end=b"\x00",
        limit=1,
        count_only=True,
        consistency=kv_pb2.READ_CONSISTENCY_SERIALIZABLE,
        shard_id=shard_id,
    )
    resp: kv_pb2.RangeResponse = await rng(probe, timeout=NOW_TIMEOUT_S)
    return int(resp.header.revision)


async def _follow_shard(
    router: Router,
    req: kv_pb2.WatchRequest,
    shard_id: int,
    out: asyncio.Queue[kv_pb2.WatchResponse | _Failed],
    rng: random.Random,
) -> None:
    """Stream ``shard_id``'s part of ``req`` into ``out`` until cancelled (see the module
    docstring); returns after a compacted answer or a final error."""
    next_rev = req.start_revision  # 0: "now", resolved at the first replica
    tried: set[str] = set()
    rounds = 0
    while True:
        target = next((t for t in router.candidates(shard_id) if t.address not in tried), None)
        if target is None:
            tried.clear()
            rounds += 1
            await asyncio.sleep(_backoff_s(rounds, rng))
            continue
        tried.add(target.address)
        channel = router.pool.get(target.address)
        try:
            if next_rev <= 0:
                next_rev = await _current_revision(channel, shard_id) + 1
                rounds = 0
            sub = kv_pb2.WatchRequest()
            sub.CopyFrom(req)
            sub.shard_id = shard_id
            sub.start_revision = next_rev
            call = channel.unary_stream(
                WATCH_METHOD,
                request_serializer=kv_pb2.WatchRequest.SerializeToString,
                response_deserializer=kv_pb2.WatchResponse.FromString,
            )(sub)
            router.watch_streams_opened += 1
            # grpc_client_* for the stream: started now, handled with how it ended.
            mm = (
                router.metrics.client.method(WATCH_METHOD, "server_stream")
                if router.metrics
                else None
            )
            if mm is not None:
                mm.started.inc()
            t0 = time.perf_counter()
            ended: grpc.StatusCode | None = grpc.StatusCode.CANCELLED
            try:
                async for resp in call:
                    tried.clear()  # this replica works: after a failure, start over
                    rounds = 0
                    if resp.compacted:
                        ended = None
                        await out.put(resp)
                        return
                    fresh = [e for e in resp.events if e.kv.mod_revision >= next_rev]
                    if not fresh:
                        continue
                    if len(fresh) != len(resp.events):
                        trimmed = kv_pb2.WatchResponse()
                        trimmed.header.CopyFrom(resp.header)
                        trimmed.events.extend(fresh)
                        resp = trimmed
                    next_rev = max(e.kv.mod_revision for e in fresh) + 1
                    await out.put(resp)  # bounded: waits for a slow caller
                ended = None
            except grpc.aio.AioRpcError as exc:
                ended = exc.code()
                raise
            finally:
                call.cancel()
                if mm is not None:
                    mm.done(ended, t0)
            log.debug("shard %d watch at %s ended; resuming", shard_id, target.address)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code not in RESUMABLE:
                trailers = tuple(
                    (k, v) for k, v in text_trailers(exc).items() if not k.startswith("dkv-")
                )
                await out.put(_Failed(NodeStatus(code, exc.details() or "", trailers)))
                return
            log.debug("shard %d watch at %s: %s; resuming", shard_id, target.address, code.name)


async def merged_watch(
    router: Router,
    req: kv_pb2.WatchRequest,
    shard_ids: Sequence[int],
    closing: asyncio.Event,
    rng: random.Random | None = None,
) -> AsyncIterator[kv_pb2.WatchResponse]:
    """The caller's stream: every shard's changes, merged. Ends cleanly when ``closing`` is
    set (the gateway stops; callers resume elsewhere); raises NodeStatus for a final error."""
    rng = rng or random.Random()
    queue: asyncio.Queue[kv_pb2.WatchResponse | _Failed] = asyncio.Queue(maxsize=WATCH_QUEUE_MAX)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_follow_shard(router, req, s, queue, rng)) for s in shard_ids]
    stop = loop.create_task(closing.wait())
    try:
        while True:
            get = loop.create_task(queue.get())
            try:
                await asyncio.wait((get, stop), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not get.done():
                    get.cancel()
            if not get.done() or get.cancelled():
                return  # the gateway is stopping
            item = get.result()
            if isinstance(item, _Failed):
                raise item.error
            yield item
            if item.compacted:
                return
    finally:
        stop.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(stop, *tasks, return_exceptions=True)
