"""The public ``dkv.v1.KV`` service of the gateway: route each request to its shard(s).

- Put, single-key Delete and single-key Range go to the key's shard (key -> slot -> shard from
  the cluster map) through :class:`dkv_gateway.router.Router`, which finds the leader and
  retries within the caller's deadline. A serializable read may be answered by any replica.
  These pass bytes through (:mod:`dkv_gateway.wire`): the request is decoded once, for the
  checks and the route, and the node receives the bytes the caller sent; the caller receives
  the bytes the node answered. So do a Range and a range Delete that name their shard.
- A write without a ``request_id`` gets a fresh one here, before the first attempt, so that
  every retry carries the same id and the shard applies the write at most once (appended to
  the bytes: :func:`dkv_gateway.wire.with_request_id`). When the write fails with UNAVAILABLE
  its outcome is unknown: the trailer ``dkv-request-id`` names the id, and retrying with it
  is safe.
- Every request is checked first (:mod:`dkv.validation`): a request that makes no sense is
  INVALID_ARGUMENT naming the field, before anything is routed.
- A Range over a key range or prefix asks every shard for its first page after the
  continuation (``RangeRequest.shard_id = N``, in parallel) and merges the pages in key order
  (:func:`dkv.paging.merge_pages`: exact up to the smallest last key of a shard that has
  more, then cut by ``limit`` and by bytes). ``more``, ``continuation`` (last key +
  ``\\0``) and ``count`` (keys in this page, as a node answers) follow the node's rules, so a
  caller pages the same way through a node or the gateway. The header has ``shard_id`` 0 and
  the largest shard revision. It is *not* one snapshot across shards: each shard is read on
  its own (linearizably by default), at slightly different moments.
- A range Delete runs in every shard (``DeleteRequest.shard_id = N``, at each shard's leader)
  with the same request id (the node derives one id per shard and step from it); ``deleted``
  is the sum and ``prev_kvs`` are merged in key order. Like a node's, it is not atomic across
  shards.
- Watch: see :mod:`dkv_gateway.watch`.

Errors become statuses in one place (:func:`_answer`): a node's final status passes through
unchanged; a shard that has no reachable leader before the deadline is UNAVAILABLE naming the
shard, with ``grpc-retry-pushback-ms`` (gRPC's standard server pushback); a deadline too short
for any replica to answer is DEADLINE_EXCEEDED (with ``dkv-request-id`` for a write, whose
outcome is then unknown); a cluster whose map
has no shards yet is UNAVAILABLE saying so; the rest is :mod:`dkv.host.grpc_errors`.
"""

from __future__ import annotations

import asyncio
import heapq
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio

from dkv.errors import DkvError
from dkv.host.grpc_errors import Ctx, call
from dkv.keys import range_limit
from dkv.paging import merge_pages
from dkv.security.access import CALLER
from dkv.v1 import kv_pb2
from dkv.validation import check_delete, check_put, check_range, check_watch
from dkv_gateway.router import (
    CallerDeadline,
    NodeStatus,
    NotInitialized,
    Router,
    ShardUnreachable,
)
from dkv_gateway.watch import merged_watch
from dkv_gateway.wire import Decoder, Received, with_request_id

__all__ = ["WATCHES_PER_CALLER_MAX", "KvGateway", "add_kv_gateway"]

T = TypeVar("T")

NOT_INITIALIZED_PUSHBACK_MS = 1_000
WATCHES_PER_CALLER_MAX = 256
"""Watch streams one caller (identity) may hold open at one gateway; the gateway serves at
most CLIENT_RPCS_MAX calls in all."""


def _no_leader_info(_member_id: int) -> tuple[str, str]:
    return "", ""


async def _answer(context: Ctx, fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn``; turn a failure into the caller's status (``context.abort`` raises)."""

    async def run() -> T:
        try:
            return await fn()
        except NodeStatus as exc:
            if exc.trailers:
                context.set_trailing_metadata(exc.trailers)
            await context.abort(exc.code, exc.details)
        except ShardUnreachable as exc:
            trailers = [("grpc-retry-pushback-ms", str(exc.retry_pushback_ms))]
            if exc.request_id:
                trailers.append(("dkv-request-id", exc.request_id))
            context.set_trailing_metadata(tuple(trailers))
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except CallerDeadline as exc:
            if exc.request_id:
                context.set_trailing_metadata((("dkv-request-id", exc.request_id),))
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except NotInitialized as exc:
            context.set_trailing_metadata(
                (("grpc-retry-pushback-ms", str(NOT_INITIALIZED_PUSHBACK_MS)),)
            )
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        raise AssertionError("unreachable")  # context.abort always raises

    return await call(context, run, _no_leader_info)


async def _all(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` concurrently; the first failure cancels the others and is raised."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled():
                exc = t.exception()
                if exc is not None:
                    raise exc
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _fail(context: Ctx, exc: DkvError, request_id: str = "") -> NoReturn:
    """Answer with ``exc``'s status (:func:`_answer`). ``request_id``: the write's (maybe chosen
    by the gateway), named when its outcome is unknown, so the caller can retry the very same
    write."""
    if request_id and isinstance(exc, (ShardUnreachable, CallerDeadline)):
        exc.request_id = request_id

    async def again() -> NoReturn:
        raise exc

    await _answer(context, again)
    raise AssertionError("unreachable")  # _answer aborts the call


class KvGateway:
    """See the module docstring. ``closing`` ends watch streams cleanly when set."""

    def __init__(
        self,
        router: Router,
        closing: asyncio.Event | None = None,
        watches_per_caller_max: int = WATCHES_PER_CALLER_MAX,
    ) -> None:
        self.router = router
        self.metrics = router.metrics
        self.closing = closing or asyncio.Event()
        self.watches_per_caller_max = watches_per_caller_max
        self._watches: dict[str, int] = {}  # open watches per caller subject (bounded keys:
        # an entry exists only while its caller has a watch open)

    def _deadline(self, context: Ctx) -> float:
        return self.router.deadline(context.time_remaining())

    # -- writes ---------------------------------------------------------------------------------

    async def put(self, req: Received[kv_pb2.PutRequest], context: Ctx) -> bytes:
        msg = req.msg
        try:
            check_put(msg)
            deadline = self._deadline(context)
            data = req.data
            if not msg.request_id:
                # Before the first attempt: retries share it.
                msg.request_id = uuid.uuid4().hex
                data = with_request_id(data, msg.request_id)
            shard = self.router.shard_of_key(msg.key)
            return await self.router.unary_raw(shard, "Put", data, deadline, write=True)
        except DkvError as exc:
            return await _fail(context, exc, msg.request_id)

    async def delete(self, req: Received[kv_pb2.DeleteRequest], context: Ctx) -> bytes:
        msg = req.msg
        try:
            check_delete(msg)
            deadline = self._deadline(context)
            data = req.data
            if not msg.request_id:
                msg.request_id = uuid.uuid4().hex
                data = with_request_id(data, msg.request_id)
            if msg.shard_id:
                shard = self.router.check_shard(msg.shard_id)
            elif msg.range_end:
                merged = await self._delete_range(msg, deadline)
                return merged.SerializeToString()
            else:
                shard = self.router.shard_of_key(msg.key)
            return await self.router.unary_raw(shard, "Delete", data, deadline, write=True)
        except DkvError as exc:
            return await _fail(context, exc, msg.request_id)

    async def _delete_range(
        self, req: kv_pb2.DeleteRequest, deadline: float
    ) -> kv_pb2.DeleteResponse:
        def part(shard: int) -> Coroutine[Any, Any, kv_pb2.DeleteResponse]:
            sub = kv_pb2.DeleteRequest()
            sub.CopyFrom(req)
            sub.shard_id = shard
            return self.router.unary(
                shard, "Delete", sub, kv_pb2.DeleteResponse.FromString, deadline, write=True
            )

        shard_ids = self.router.shards()
        if self.metrics is not None:
            self.metrics.fanout_shards.observe(len(shard_ids))
        parts = await _all([part(s) for s in shard_ids])
        merged = kv_pb2.DeleteResponse(
            succeeded=all(p.succeeded for p in parts), deleted=sum(p.deleted for p in parts)
        )
        merged.header.revision = max(p.header.revision for p in parts)
        if req.prev_kv:
            merged.prev_kvs.extend(heapq.merge(*(p.prev_kvs for p in parts), key=lambda kv: kv.key))
        return merged

    # -- reads ----------------------------------------------------------------------------------

    async def range(self, req: Received[kv_pb2.RangeRequest], context: Ctx) -> bytes:
        msg = req.msg
        try:
            check_range(msg)
            deadline = self._deadline(context)
            if msg.shard_id:
                shard = self.router.check_shard(msg.shard_id)
            elif msg.prefix or msg.range_end:
                merged = await self._range_all(msg, deadline)
                return merged.SerializeToString()
            else:
                shard = self.router.shard_of_key(msg.key)
            return await self.router.unary_raw(shard, "Range", req.data, deadline)
        except DkvError as exc:
            return await _fail(context, exc)

    async def _range_all(self, req: kv_pb2.RangeRequest, deadline: float) -> kv_pb2.RangeResponse:
        limit = range_limit(req.limit)
        sub = kv_pb2.RangeRequest()
        sub.CopyFrom(req)
        sub.limit = limit
        if req.count_only:
            # The cut at `limit` needs the keys (not the values) to find the page's end.
            sub.count_only = False
            sub.keys_only = True

        def part(shard: int) -> Coroutine[Any, Any, kv_pb2.RangeResponse]:
            scoped = kv_pb2.RangeRequest()
            scoped.CopyFrom(sub)
            scoped.shard_id = shard
            return self.router.unary(
                shard, "Range", scoped, kv_pb2.RangeResponse.FromString, deadline
            )

        shard_ids = self.router.shards()
        if self.metrics is not None:
            self.metrics.fanout_shards.observe(len(shard_ids))
        parts = await _all([part(s) for s in shard_ids])
        resp = kv_pb2.RangeResponse()
        resp.header.revision = max(p.header.revision for p in parts)
        return merge_pages(parts, limit).fill(resp, req.count_only)

    async def watch(
        self, req: kv_pb2.WatchRequest, context: Ctx
    ) -> AsyncIterator[kv_pb2.WatchResponse]:
        async def shards() -> list[int]:
            check_watch(req)
            if req.shard_id:
                return [self.router.check_shard(req.shard_id)]
            if req.prefix or req.range_end:
                return self.router.shards()
            return [self.router.shard_of_key(req.key)]

        who = CALLER.get()
        subject = who.subject if who is not None else ""
        if subject and self._watches.get(subject, 0) >= self.watches_per_caller_max:
            # A bound per caller, so one client cannot hold every stream the gateway serves.
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{subject} has {self.watches_per_caller_max} watches open, the most one "
                "caller may (--watches-per-caller-max): close one first",
            )
        shard_ids = await _answer(context, shards)
        if subject:
            self._watches[subject] = self._watches.get(subject, 0) + 1

        failure: NodeStatus | None = None
        metrics = self.metrics
        if metrics is not None:
            if req.prefix or req.range_end:
                metrics.fanout_shards.observe(len(shard_ids))
            metrics.watches += 1
        try:
            async for resp in merged_watch(self.router, req, shard_ids, self.closing):
                yield resp
        except NodeStatus as exc:
            failure = exc
        finally:
            if metrics is not None:
                metrics.watches -= 1
            if subject:
                left = self._watches.get(subject, 1) - 1
                if left > 0:
                    self._watches[subject] = left
                else:
                    self._watches.pop(subject, None)
        if failure is not None:
            error = failure

            async def fail() -> None:
                raise error

            await _answer(context, fail)


def add_kv_gateway(server: grpc.aio.Server, gateway: KvGateway) -> None:
    """Serve ``gateway`` as ``dkv.v1.KV`` on ``server``. Put, Delete and Range answer with
    the bytes they return (:mod:`dkv_gateway.wire`: a node's answer passes through as it is)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Put": grpc.unary_unary_rpc_method_handler(
            gateway.put,
            request_deserializer=Decoder(kv_pb2.PutRequest).decode,
            response_serializer=None,
        ),
        "Delete": grpc.unary_unary_rpc_method_handler(
            gateway.delete,
            request_deserializer=Decoder(kv_pb2.DeleteRequest).decode,
            response_serializer=None,
        ),
        "Range": grpc.unary_unary_rpc_method_handler(
            gateway.range,
            request_deserializer=Decoder(kv_pb2.RangeRequest).decode,
            response_serializer=None,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            gateway.watch,
            request_deserializer=kv_pb2.WatchRequest.FromString,
            response_serializer=kv_pb2.WatchResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("dkv.v1.KV", handlers),))
