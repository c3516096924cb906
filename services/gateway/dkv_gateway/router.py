"""Send one request to the right node of one shard, following leadership as it moves.

The gateway is stateless: all it knows is the cluster map (:class:`ClusterMapView`, kept
current by ``WatchClusterMap``) plus what answers taught it. For each shard it keeps one
*leader hint*: the node named by a NOT_LEADER answer's ``dkv-leader-id`` trailer, or the
``header.member_id`` of a successful write (only the leader applies writes; a linearizable read
may be served by a follower through ReadIndex, so reads teach nothing). Hints beat the map,
which learns of a new leader only at the next heartbeat; a hint is dropped when its node stops
answering or when the map reports a newer leadership for the shard.

One call (:meth:`Router.unary_raw`: request and answer as encoded bytes, passed through
unchanged; :meth:`Router.unary` for messages) tries, in order, the hinted leader, the map's
leader and then every replica (voters first, nodes marked DOWN last). UNAVAILABLE and
CANCELLED (the node went away with the call in flight, or its connection failed) are retried:
at the leader the answer names, when it names another node, else at the next replica. Writes
are safe to retry because every write carries a request id the shard deduplicates (the
gateway sets one before the first attempt). After each full round without an answer it backs
off with jitter, and it gives up shortly before the caller's deadline so that the caller
hears why: UNAVAILABLE naming the shard, with a ``grpc-retry-pushback-ms`` hint, when
replicas were tried and said they could not serve; DEADLINE_EXCEEDED (:class:`CallerDeadline`)
when nothing but the caller's own deadline went wrong -- too short to try a replica, or the
attempt took all of it. Any other status is the node's final word and is passed through
unchanged (:class:`NodeStatus`).

An attempt may take all the time left before that point. A node that answers slowly (under
overload a write waits behind hundreds of others) is waited for: sending the write again
elsewhere would only add Raft entries where the leader is already the bottleneck (until
2026-12 an attempt got half the time left and 1024-in-flight puts were proposed twice). What
ends an attempt early is the node's UNAVAILABLE (not the leader, shutting down, connection
lost) or news that the shard's leadership moved to another node (a newer map leader, or a
write answered by another node in a known term): a deposed leader may hold a write until its
deadline, so its attempts are cancelled and sent to the new leader (``leader_moved`` in
``dkv_gateway_retries_total``).

Channels: :class:`NodeChannels`, ``CHANNELS_PER_NODE`` pooled ``grpc.aio`` channels (separate
connections) per node client address, created on first use and closed when the node leaves
the map (or changes address) or when the gateway stops.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from opentelemetry.trace import Span, Tracer

from dkv.client.cluster_map import ClusterMapView
from dkv.errors import DeadlineExceeded, DkvError, InvalidArgument
from dkv.host.channels import CHANNEL_OPTIONS, ChannelPool, TlsFiles
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
    "BACKOFF_BASE_MS",
    "BACKOFF_MAX_MS",
    "CallerDeadline",
    "CHANNEL_OPTIONS",
    "DEFAULT_TIMEOUT_S",
    "RETRY_PUSHBACK_MS",
    "ChannelPool",
    "CHANNELS_PER_NODE",
    "Channels",
    "NodeChannels",
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
DEADLINE_MARGIN_MAX_S = 0.25
"""Give up this long (at most 10% of the budget) before the caller's deadline, so that the
caller receives the reason rather than its own DEADLINE_EXCEEDED."""
CHANNELS_PER_NODE = 1
"""HTTP/2 connections to each node (:class:`NodeChannels`)."""
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


class Channels(Protocol):
    """What the router needs of a channel pool (:class:`NodeChannels`, or one
    :class:`~dkv.host.channels.ChannelPool`)."""

    def get(self, address: str) -> grpc.aio.Channel: ...

    @property
    def addresses(self) -> set[str]: ...

    def discard(self, address: str) -> None: ...


class NodeChannels:
    """``per_node`` channels to every node, each its own HTTP/2 connection, used in turn.

    gRPC shares one connection among the channels to one address that have the same
    arguments; each pool here differs by one argument (``dkv.gateway.connection``), so
    ``per_node`` pools make ``per_node`` connections. TLS files are watched by each pool
    (:class:`~dkv.host.channels.ChannelPool` rebuilds its channels when they change)."""

    def __init__(
        self,
        tls: TlsFiles | None,
        per_node: int = CHANNELS_PER_NODE,
        options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
    ) -> None:
        if per_node < 1:
            raise InvalidArgument(f"channels per node must be >= 1, got {per_node}")
        self.pools = [
            ChannelPool(tls, (*options, ("dkv.gateway.connection", i))) for i in range(per_node)
        ]
        self._turn = 0

    def get(self, address: str) -> grpc.aio.Channel:
        pools = self.pools
        if len(pools) == 1:
            return pools[0].get(address)
        self._turn = turn = (self._turn + 1) % len(pools)
        return pools[turn].get(address)

    @property
    def addresses(self) -> set[str]:
        out: set[str] = set()
        for pool in self.pools:
            out |= pool.addresses
        return out

    def discard(self, address: str) -> None:
        for pool in self.pools:
            pool.discard(address)

    async def close(self) -> None:
        for pool in self.pools:
            await pool.close()


class Router:
    """See the module docstring. ``view`` is read at every attempt, so a map change takes
    effect at once; call :meth:`on_map_change` after every change (it evicts channels and
    stale hints)."""

    def __init__(
        self,
        view: ClusterMapView,
        pool: Channels,
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
        # Attempts waiting at a node, by shard (given up when the leadership moves).
        self._in_flight: dict[int, dict[_Attempt, None]] = {}
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
            self._on_leader_moved(sid, *now)
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

    def _first_candidate(self, shard_id: int) -> Target | None:
        """``candidates(shard_id)[0]`` when it is the hinted or the map's leader (nearly
        always), without building the whole list; None: ask :meth:`candidates`."""
        h = self._hints.get(shard_id)
        if h is not None:
            address = self._address(h.node_id, h.address)
            if address:
                return Target(h.node_id, address)
        leader = self.view.leader(shard_id)
        if leader:
            address = self._address(leader)
            if address:
                return Target(leader, address)
        return None

    def learn_leader(self, shard_id: int, node_id: int, term: int, address: str = "") -> None:
        """Remember ``node_id`` as the leader of ``shard_id`` (from an answer)."""
        if not node_id:
            return
        old = self._hints.get(shard_id)
        if old is not None:
            if old.term > term > 0:
                return  # an older term's news
            if old.node_id == node_id and old.term >= term and old.address == address:
                return  # nothing new (every write's answer says it again)
        self._hints[shard_id] = _Hint(node_id, max(term, 0), address)
        if term > 0 and (old is None or old.node_id != node_id):
            self._on_leader_moved(shard_id, node_id, term)

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
        """:meth:`unary_raw` with a message: ``request`` is encoded, the answer decoded with
        ``response_type`` (the response message's ``FromString``)."""
        data: bytes = request.SerializeToString()
        return response_type(await self.unary_raw(shard_id, method, data, deadline, write=write))

    async def unary_raw(
        self, shard_id: int, method: str, request: bytes, deadline: float, *, write: bool = False
    ) -> bytes:
        """Call ``/dkv.v1.KV/<method>`` for ``shard_id`` with ``request`` as it is encoded and
        return the node's answer as it was encoded (see the module docstring).

        ``write``: the answer's header names the leader (learn it). Raises NodeStatus (the
        node's final answer), ShardUnreachable or CallerDeadline (the deadline came first)."""
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
                raise self._gave_up(shard_id, budget, last_error)
            target = follow if follow is not None and follow.address not in tried else None
            follow = None
            if target is not None:
                self.hint_follows += 1
            elif not tried:
                target = self._first_candidate(shard_id)
            if target is None:
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
            # The attempt may take all the time left: a leader that is slow (writes queued
            # behind others) is waited for, never asked again elsewhere (that would only add
            # Raft entries under overload). What moves on: the node's UNAVAILABLE (not the
            # leader, shutting down, a connection that failed) and a leadership that moved
            # away from the node while the attempt waited (_on_leader_moved).
            stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.pool.get(
                target.address
            ).unary_unary(full_method, request_serializer=None, response_deserializer=None)
            call = stub(request, timeout=remaining, metadata=metadata)
            waiting = _Attempt(target.node_id, call)
            in_flight = self._in_flight.setdefault(shard_id, {})
            in_flight[waiting] = None
            try:
                resp: bytes = await call
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not waiting.moved or (task is not None and task.cancelling()):
                    # The caller went away (or a fan-out sibling failed).
                    if metrics is not None:
                        metrics.client.observe(full_method, grpc.StatusCode.CANCELLED, t0)
                    if span is not None:
                        end_rpc_span(span, grpc.StatusCode.CANCELLED, "the caller went away")
                    raise
                self._moved_on(full_method, target, at_hint, t0, span)
                last_error = f"{target.address}: the shard's leadership moved away from it"
                tried.discard(target.address)  # it may lead again
                continue
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if waiting.moved and code is grpc.StatusCode.CANCELLED:
                    # Our own cancellation, reported as a status (grpc.aio does either).
                    self._moved_on(full_method, target, at_hint, t0, span)
                    last_error = f"{target.address}: the shard's leadership moved away from it"
                    tried.discard(target.address)
                    continue
                trailers = text_trailers(exc)
                if metrics is not None:
                    metrics.client.observe(full_method, code, t0)
                if span is not None:
                    end_rpc_span(span, code, details)
                if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                    # The attempt had all the time left: the caller's deadline is here.
                    raise self._gave_up(shard_id, budget, last_error) from exc
                if code not in RETRYABLE:
                    if at_hint and metrics is not None:
                        metrics.hint_hits.inc()  # the leader's final word
                    raise NodeStatus(code, details, _passthrough(trailers)) from exc
                self.retries += 1
                if metrics is not None:
                    metrics.retries[retry_reason(code, "dkv-leader-id" in trailers)].inc()
                    if at_hint:
                        metrics.hint_misses.inc()
                last_error = f"{target.address}: {code.name}: {details}"
                log.debug("shard %d %s at %s: %s", shard_id, method, target.address, last_error)
                follow = self._hint_from(shard_id, target, trailers)
                continue
            finally:
                in_flight.pop(waiting, None)
            if metrics is not None:
                metrics.client.observe(full_method, None, t0)
                if at_hint:
                    metrics.hint_hits.inc()
            if span is not None:
                end_rpc_span(span, None)
            if write:
                member_id, term = _leader_of(method, resp)
                if member_id:
                    address = "" if self.view.client_address(member_id) else target.address
                    self.learn_leader(shard_id, member_id, term, address)
            return resp

    def _moved_on(
        self, full_method: str, target: Target, at_hint: bool, t0: float, span: Span | None
    ) -> None:
        """Count an attempt given up because the shard's leadership moved away from it."""
        self.retries += 1
        metrics = self.metrics
        if metrics is not None:
            metrics.client.observe(full_method, grpc.StatusCode.CANCELLED, t0)
            metrics.retries["leader_moved"].inc()
            if at_hint:
                metrics.hint_misses.inc()
        if span is not None:
            end_rpc_span(span, grpc.StatusCode.CANCELLED, "the leadership moved")
        log.debug("%s at %s: the leadership moved away from it", full_method, target.address)

    def _gave_up(self, shard_id: int, budget_s: float, last_error: str) -> DkvError:
        """Why a call ends at its deadline: DEADLINE_EXCEEDED when nothing but the caller's
        own (short) deadline went wrong -- no replica could be tried, or the attempt took all
        the time -- else UNAVAILABLE naming the last trouble."""
        if not last_error:
            return CallerDeadline(shard_id, budget_s)
        if self.metrics is not None:
            self.metrics.shard_unreachable.inc()
        return ShardUnreachable(
            shard_id, f"shard {shard_id} has no reachable leader (no quorum?): {last_error}"
        )

    def _on_leader_moved(self, shard_id: int, leader: int, term: int) -> None:
        """``leader`` leads ``shard_id`` in ``term``: the attempts waiting at other nodes are
        given up and sent again (to the leader: writes carry request ids, reads change
        nothing). A deposed leader may hold a write until the caller's deadline; a leader
        that is merely slow keeps its calls. News older than the hint changes nothing."""
        waiting = self._in_flight.get(shard_id)
        if not waiting or not leader:
            return
        hint = self._hints.get(shard_id)
        if hint is not None and hint.term > term:
            return
        for a in list(waiting):
            if a.node_id and a.node_id != leader and not a.moved:
                a.moved = True
                a.call.cancel()


@dataclass(eq=False, slots=True)
class _Attempt:
    """One call waiting at a node (identity-hashed: a key of Router._in_flight)."""

    node_id: int
    call: grpc.aio.UnaryUnaryCall[bytes, bytes]
    moved: bool = False


_WRITE_ANSWERS: dict[str, Callable[[bytes], _WithHeader]] = {
    "Put": kv_pb2.PutResponse.FromString,
    "Delete": kv_pb2.DeleteResponse.FromString,
}


def _leader_of(method: str, data: bytes) -> tuple[int, int]:
    """(``header.member_id``, ``header.raft_term``) of a write's answer; (0, 0) when it does
    not decode (the caller receives it as it is; the router learns nothing from it)."""
    decode = _WRITE_ANSWERS.get(method)
    if decode is None:
        return 0, 0
    try:
        header = decode(data).header
    except DecodeError:
        return 0, 0
    return header.member_id, header.raft_term


def _passthrough(trailers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The trailers of a node's final answer the caller may see (not the leader hints: they
    name node addresses the caller cannot and should not use)."""
    return tuple((k, v) for k, v in trailers.items() if not k.startswith("dkv-leader-"))
