"""Send one request to the right node of one shard, following leadership as it moves.

The gateway is stateless: all it knows is the cluster map (:class:`ClusterMapView`, kept
current by ``WatchClusterMap``) plus what answers taught it. For each shard it keeps one
*leader hint*: the node named by a NOT_LEADER answer's ``dkv-leader-id`` trailer, or the
``header.member_id`` of a successful write (only the leader applies writes; a linearizable read
may be served by a follower through ReadIndex, so reads teach nothing). Hints beat the map,
which learns of a new leader only at the next heartbeat; a hint is dropped when its node stops
answering or when the map reports a newer leadership for the shard.

One call (:meth:`Router.unary`) tries, in order, the hinted leader, the map's leader and then
every replica (voters first, nodes marked DOWN last). UNAVAILABLE and CANCELLED (the node went
away with the call in flight) are retried: at the leader the answer names, when it names
another node, else at the next replica. Writes are safe to retry because every write carries
a request id the shard deduplicates (the gateway sets one before the first attempt). After
each full round without an answer it backs off with jitter, and it gives up shortly before
the caller's deadline so that the caller hears why: UNAVAILABLE naming the shard, with a
``grpc-retry-pushback-ms`` hint, when replicas were tried and said they could not serve;
DEADLINE_EXCEEDED (:class:`CallerDeadline`) when nothing but the caller's own deadline went
wrong -- too short to try a replica, or every attempt ran out of it. Any other status is the
node's final word and is passed through unchanged (:class:`NodeStatus`).

Channels: one pooled ``grpc.aio`` channel per node client address, created on first use and
closed when the node leaves the map (or changes address) or when the gateway stops.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
from opentelemetry.trace import Span, Tracer

from dkv.client.cluster_map import ClusterMapView
from dkv.errors import DeadlineExceeded, DkvError, InvalidArgument
from dkv.host.channels import CHANNEL_OPTIONS, ChannelPool
from dkv.telemetry.tracing import (
    UNSAMPLED_PARENT,
    end_rpc_span,
    inject_metadata,
    start_client_span,
)
from dkv.v1 import kv_pb2
from dkv.v1 import membership_pb2 as mpb
from dkv_gateway.metrics import GatewayMetrics, retry_reason

__all__ = [
    "ATTEMPT_TIMEOUT_MIN_S",
    "BACKOFF_BASE_MS",
    "BACKOFF_MAX_MS",
    "CallerDeadline",
    "CHANNEL_OPTIONS",
    "DEFAULT_TIMEOUT_S",
    "RETRY_PUSHBACK_MS",
    "ChannelPool",
    "NodeStatus",
    "NotInitialized",
    "Router",
    "ShardUnreachable",
    "Target",
]

log = logging.getLogger("dkv.gateway.router")

DEFAULT_TIMEOUT_S = 10.0
"""The deadline of a call whose caller set none."""
BACKOFF_BASE_MS = 25
"""Pause after the first full round of replicas without an answer; doubles per round."""
BACKOFF_MAX_MS = 500
"""Largest pause between rounds (an election takes about one election timeout, 1 s)."""
ATTEMPT_TIMEOUT_MIN_S = 0.5
"""One attempt gets half of the time left, at least this: a leader that lost its quorum
holds a write until the caller's deadline, and the other half is for the next leader."""
DEADLINE_MARGIN_MAX_S = 0.25
"""Give up this long (at most 10% of the budget) before the caller's deadline, so that the
caller receives the reason rather than its own DEADLINE_EXCEEDED."""
RETRY_PUSHBACK_MS = 500
"""``grpc-retry-pushback-ms`` sent with UNAVAILABLE: when a shard may have a leader again."""

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})

R = TypeVar("R", bound="_WithHeader")


class _WithHeader(Protocol):
    @property
    def header(self) -> kv_pb2.ResponseHeader: ...


class NotInitialized(DkvError):
    """The cluster map has no shards yet."""

    def __init__(self) -> None:
        super().__init__("the cluster is not initialized yet (waiting for nodes to register)")


class ShardUnreachable(DkvError):
    """No replica of a shard answered usefully before the deadline."""

    def __init__(self, shard_id: int, message: str, retry_pushback_ms: int = RETRY_PUSHBACK_MS):
        self.shard_id = shard_id
        self.retry_pushback_ms = retry_pushback_ms
        # A write's request id (maybe chosen by the gateway): the caller may retry with it,
        # since the write may or may not have happened.
        self.request_id = ""
        super().__init__(message)


class CallerDeadline(DeadlineExceeded):
    """The caller's deadline ran out before any replica answered, and none said it was in
    trouble: DEADLINE_EXCEEDED, not "no quorum" (nothing may be wrong with the shard)."""

    def __init__(self, shard_id: int, budget_s: float) -> None:
        self.shard_id = shard_id
        self.request_id = ""  # a write's id: it may have happened, retrying with it is safe
        super().__init__(
            f"the call's deadline ({max(0.0, budget_s) * 1000:.0f} ms) ran out before a "
            f"replica of shard {shard_id} answered"
        )


class NodeStatus(DkvError):
    """A node's final answer (not retried): the gateway answers with the same status."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...]):
        self.code = code
        self.details = details
        self.trailers = trailers
        super().__init__(f"{code.name}: {details}")


@dataclass(frozen=True, slots=True)
class Target:
    """One node to try: its id (0 when known only by address) and client address."""

    node_id: int
    address: str


def text_trailers(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    """The string-valued trailing metadata of a failed call."""
    return {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}


@dataclass(slots=True)
class _Hint:
    node_id: int
    term: int  # 0: not known (a NOT_LEADER trailer carries no term)
    address: str  # from the trailer, for a node the map does not list yet


class Router:
    """See the module docstring. ``view`` is read at every attempt, so a map change takes
    effect at once; call :meth:`on_map_change` after every change (it evicts channels and
    stale hints)."""

    def __init__(
        self,
        view: ClusterMapView,
        pool: ChannelPool,
        *,
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
        rng: random.Random | None = None,
        metrics: GatewayMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.view = view
        self.metrics = metrics
        # One CLIENT span per attempt (dkv.telemetry.tracing); None: tracing is off.
        self.tracer = tracer
        self.pool = pool
        self.default_timeout_s = default_timeout_s
        self.rng = rng or random.Random()
        self._hints: dict[int, _Hint] = {}
        self._map_leaders: dict[int, tuple[int, int]] = {}  # shard -> (leader, term) last seen
        # Counters for tests and metrics.
        self.attempts = 0
        self.retries = 0
        self.hint_follows = 0
        self.watch_streams_opened = 0  # shard watch streams sent to a node (incl. resumptions)

    # -- the map --------------------------------------------------------------------------------

    def on_map_change(self, view: ClusterMapView) -> None:
        """Drop hints the map made stale and channels to nodes that left the map."""
        for sid, entry in view.leaders.items():
            now = (int(entry.leader_id), int(entry.term))
            if self._map_leaders.get(sid) == now:
                continue
            self._map_leaders[sid] = now
            hint = self._hints.get(sid)
            # The map reports a leadership (a heartbeat after an election): it wins over a
            # hint learned before, unless the hint is known to be newer.
            if hint is not None and hint.term <= now[1] and hint.node_id != now[0]:
                del self._hints[sid]
        known = {n.client_address for n in view.nodes.values() if n.client_address}
        known |= {h.address for h in self._hints.values() if h.address}
        for address in self.pool.addresses - known:
            self.pool.discard(address)

    def shards(self) -> list[int]:
        """Every shard id, sorted (NotInitialized when there are none yet)."""
        if not self.view.initialized:
            raise NotInitialized()
        return sorted(self.view.shards)

    def shard_of_key(self, key: bytes) -> int:
        if not self.view.initialized:
            raise NotInitialized()
        sid = self.view.shard_of_key(key)
        if sid == 0:
            raise NotInitialized()  # a slot without a shard: the map is being set up
        return sid

    def check_shard(self, shard_id: int) -> int:
        """``shard_id`` as a caller named it: it must exist."""
        if not self.view.initialized:
            raise NotInitialized()
        if shard_id not in self.view.shards:
            raise InvalidArgument(
                f"shard {shard_id} does not exist (shards are 1..{self.view.shard_count})"
            )
        return shard_id

    def hint(self, shard_id: int) -> int:
        """The node this gateway believes leads ``shard_id`` (0: none)."""
        h = self._hints.get(shard_id)
        return 0 if h is None else h.node_id

    def _address(self, node_id: int, fallback: str = "") -> str:
        return self.view.client_address(node_id) or fallback

    def candidates(self, shard_id: int) -> list[Target]:
        """Whom to try for ``shard_id``, best first: hinted leader, map leader, replicas
        (nodes not DOWN first). Nodes without a known address are left out."""
        order: list[tuple[int, str]] = []
        h = self._hints.get(shard_id)
        if h is not None:
            order.append((h.node_id, self._address(h.node_id, h.address)))
        leader = self.view.leader(shard_id)
        if leader:
            order.append((leader, self._address(leader)))
        replicas = self.view.replicas(shard_id)

        def down(nid: int) -> bool:
            n = self.view.nodes.get(nid)
            return n is not None and n.state == mpb.NODE_STATE_DOWN

        order.extend((nid, self._address(nid)) for nid in replicas if not down(nid))
        order.extend((nid, self._address(nid)) for nid in replicas if down(nid))
        seen: set[str] = set()
        out: list[Target] = []
        for nid, address in order:
            if address and address not in seen:
                seen.add(address)
                out.append(Target(nid, address))
        return out

    def learn_leader(self, shard_id: int, node_id: int, term: int, address: str = "") -> None:
        """Remember ``node_id`` as the leader of ``shard_id`` (from an answer)."""
        if not node_id:
            return
        old = self._hints.get(shard_id)
        if old is not None and old.term > term > 0:
            return  # an older term's news
        self._hints[shard_id] = _Hint(node_id, max(term, 0), address)

    def forget_leader(self, shard_id: int, node_id: int) -> None:
        h = self._hints.get(shard_id)
        if h is not None and h.node_id == node_id:
            del self._hints[shard_id]

    def _hint_from(self, shard_id: int, target: Target, trailers: dict[str, str]) -> Target | None:
        """Learn from a failed attempt's trailers; returns the leader to try next, if any."""
        raw = trailers.get("dkv-leader-id")
        if raw is None:
            # No NOT_LEADER answer: the node is down or shutting down -- unless it says the
            # request was dropped before proposing (an election or a transfer under way).
            if "dkv-retry-safe" not in trailers:
                self.forget_leader(shard_id, target.node_id)
            return None
        leader = int(raw) if raw.isdigit() else 0
        if leader in (0, target.node_id):
            self.forget_leader(shard_id, target.node_id)  # it knows no (other) leader
            return None
        address = self._address(leader, trailers.get("dkv-leader-address", ""))
        if not address:
            return None
        self.learn_leader(shard_id, leader, 0, trailers.get("dkv-leader-address", ""))
        return Target(leader, address)

    # -- calls ----------------------------------------------------------------------------------

    def deadline(self, time_remaining_s: float | None) -> float:
        """The loop time by which a call must be answered."""
        budget = self.default_timeout_s if time_remaining_s is None else time_remaining_s
        return asyncio.get_running_loop().time() + max(0.0, budget)

    def _backoff_s(self, rounds: int) -> float:
        base_ms = min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * (1 << min(rounds - 1, 10)))
        return base_ms * (0.5 + self.rng.random()) / 1000

    async def unary(
        self,
        shard_id: int,
        method: str,
        request: Any,
        response_type: Callable[[bytes], R],
        deadline: float,
        *,
        write: bool = False,
    ) -> R:
        """Call ``/dkv.v1.KV/<method>`` for ``shard_id`` (see the module docstring).

        ``response_type`` is the response message's ``FromString``. ``write``: the answer's
        header names the leader (learn it). Raises NodeStatus (the node's final answer) or
        ShardUnreachable (the deadline came first)."""
        loop = asyncio.get_running_loop()
        budget = deadline - loop.time()
        stop_at = deadline - min(DEADLINE_MARGIN_MAX_S, 0.1 * max(0.0, budget))
        tried: set[str] = set()
        follow: Target | None = None
        rounds = 0
        last_error = ""
        metrics = self.metrics
        full_method = f"/dkv.v1.KV/{method}"
        # A hint counts as hit or missed by how its call's first attempt went.
        hinted = self.hint(shard_id) if metrics is not None else 0
        first = True
        attempt = 0  # of this call, from 1 (a span attribute)
        while True:
            remaining = stop_at - loop.time()
            if remaining <= 0:
                if not last_error:
                    # Nothing but the caller's own (short) deadline went wrong: no replica
                    # could be tried, or every attempt ran out of the caller's time.
                    raise CallerDeadline(shard_id, budget)
                if metrics is not None:
                    metrics.shard_unreachable.inc()
                raise ShardUnreachable(
                    shard_id,
                    f"shard {shard_id} has no reachable leader (no quorum?): {last_error}",
                )
            target = follow if follow is not None and follow.address not in tried else None
            follow = None
            if target is not None:
                self.hint_follows += 1
            else:
                target = next(
                    (t for t in self.candidates(shard_id) if t.address not in tried), None
                )
            if target is None:
                if not tried:
                    last_error = f"no replica of shard {shard_id} has a known address"
                rounds += 1
                tried.clear()
                await asyncio.sleep(min(self._backoff_s(rounds), max(0.0, stop_at - loop.time())))
                continue
            tried.add(target.address)
            self.attempts += 1
            attempt += 1
            stub = self.pool.get(target.address).unary_unary(
                full_method,
                request_serializer=_serialize,
                response_deserializer=response_type,
            )
            timeout = min(remaining, max(ATTEMPT_TIMEOUT_MIN_S, remaining / 2))
            at_hint = first and hinted != 0 and target.node_id == hinted
            first = False
            t0 = metrics.client.start(full_method) if metrics is not None else 0.0
            span: Span | None = None
            metadata: tuple[tuple[str, str], ...] | None = None
            unsampled = UNSAMPLED_PARENT.get() if self.tracer is not None else None
            if unsampled is not None:
                metadata = (("traceparent", unsampled),)  # not sampled upstream: pass it on
            elif self.tracer is not None:
                span = start_client_span(
                    self.tracer,
                    full_method,
                    {
                        "dkv.shard": shard_id,
                        "dkv.node_id": str(target.node_id),
                        "server.address": target.address,
                        "dkv.attempt": attempt,
                    },
                )
                metadata = inject_metadata(span)
            try:
                resp: R = await stub(request, timeout=timeout, metadata=metadata)
            except asyncio.CancelledError:  # the caller went away (or a fan-out sibling failed)
                if metrics is not None:
                    metrics.client.observe(full_method, grpc.StatusCode.CANCELLED, t0)
                if span is not None:
                    end_rpc_span(span, grpc.StatusCode.CANCELLED, "the caller went away")
                raise
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                trailers = text_trailers(exc)
                if metrics is not None:
                    metrics.client.observe(full_method, code, t0)
                if span is not None:
                    end_rpc_span(span, code, details)
                # DEADLINE_EXCEEDED of one attempt while time is left: the node could not
                # finish (a leader without quorum); a retry elsewhere is safe (request ids).
                # Without time left, the loop's top answers for the caller's deadline.
                retry = code in RETRYABLE or code is grpc.StatusCode.DEADLINE_EXCEEDED
                if not retry:
                    if at_hint and metrics is not None:
                        metrics.hint_hits.inc()  # the leader's final word
                    raise NodeStatus(code, details, _passthrough(trailers)) from exc
                self.retries += 1
                if metrics is not None:
                    metrics.retries[retry_reason(code, "dkv-leader-id" in trailers)].inc()
                    if at_hint:
                        metrics.hint_misses.inc()
                if code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    last_error = f"{target.address}: {code.name}: {details}"
                log.debug("shard %d %s at %s: %s", shard_id, method, target.address, last_error)
                follow = self._hint_from(shard_id, target, trailers)
                continue
            if metrics is not None:
                metrics.client.observe(full_method, None, t0)
                if at_hint:
                    metrics.hint_hits.inc()
            if span is not None:
                end_rpc_span(span, None)
            if write and resp.header.member_id:
                address = "" if self.view.client_address(resp.header.member_id) else target.address
                self.learn_leader(shard_id, resp.header.member_id, resp.header.raft_term, address)
            return resp


def _serialize(m: Any) -> bytes:
    data: bytes = m.SerializeToString()
    return data


def _passthrough(trailers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The trailers of a node's final answer the caller may see (not the leader hints: they
    name node addresses the caller cannot and should not use)."""
    return tuple((k, v) for k, v in trailers.items() if not k.startswith("dkv-leader-"))
