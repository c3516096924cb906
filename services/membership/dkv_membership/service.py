"""The ``dkv.v1.Membership`` gRPC service of one membership replica (DESIGN.md "membership").

Writes (JoinNode, LeaveNode, Heartbeat) become ``MembershipCommand`` entries of the
membership group:

1. the request is checked (:mod:`dkv.validation`: ids, addresses, leader reports), turned into
   commands and checked again with :func:`validate_command`; bad input is INVALID_ARGUMENT
   naming the field, and nothing is proposed;
2. the values that need a clock (heartbeat times) are read from the injected ``clock`` here,
   at proposal time: the only clock read of the replicated path (``apply`` never reads one);
3. the commands are proposed through :meth:`Host.propose`. Only the leader proposes: a
   follower answers NOT_LEADER (UNAVAILABLE with the leader's id, name and client address in
   trailing metadata, :mod:`dkv.host.grpc_errors`), so nothing is forwarded;
4. a command the state machine refused (a name taken by another id, a heartbeat of an unknown
   node) is FAILED_PRECONDITION with the state machine's reason.

Reads (ListNodes, GetClusterMap) are linearizable: ReadIndex (thesis §6.4), served by any
replica once it has applied that far. The request messages have no consistency option, so
there is no serializable variant; a caller that wants a cheap, possibly stale view watches.

WatchClusterMap is served by every replica from its applied map, so a watch does not care
about leader changes; a client that loses its stream reconnects anywhere with the last version
it saw. One message brings the client from the version it has to the replica's current one:
the whole map when the client starts at 0 or the change log no longer reaches back that far,
otherwise the parts that changed (nodes added, changed or removed, shards, slot table,
leaders). Changes that land while a message waits in the bounded queue are merged into the
next message, so a slow watcher costs memory for one map, not for a backlog.

Down detection (:meth:`MembershipService.mark_down_pass`): the leader marks UP nodes DOWN
when their last heartbeat is older than ``down_after_ms`` by its clock. A replica that has
just become leader waits ``down_after_ms`` first, so nodes get a chance to find it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from dkv.errors import DeadlineExceeded, DkvError, InvalidArgument, PermissionDenied
from dkv.host import Host
from dkv.host.grpc_errors import Ctx, LeaderInfo, call
from dkv.security.access import CALLER
from dkv.security.identity import Kind
from dkv.v1 import membership_pb2 as pb
from dkv.validation import check_heartbeat, check_join_node, check_leave_node
from dkv_membership.state import MembershipStateMachine, Outcome, validate_command

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MEMBERSHIP_GROUP_ID",
    "WATCH_QUEUE_MAX",
    "Clock",
    "MembershipService",
    "add_membership_service",
    "wall_clock_ms",
]

log = logging.getLogger("dkv.membership")

T = TypeVar("T")

MEMBERSHIP_GROUP_ID = 1
"""The Raft group id of the membership group in its replicas' own RocksDB (never shared with a
storage node's engine, so it cannot collide with shard ids)."""

DEFAULT_TIMEOUT_S = 5.0
"""Deadline for a call that carries none."""

WATCH_QUEUE_MAX = 8
"""Messages a watch stream holds for a slow reader before it stops producing (and merges)."""

WATCH_FUTURE_WAIT_S = 10.0
"""How long a watch that starts at a version this replica has not reached yet waits for it (a
lagging replica catches up) before it sends the whole map (the version is of another cluster)."""

Clock = Callable[[], int]
"""Unix time in milliseconds."""


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class _Rejected(Exception):
    """The state machine refused a committed command (not a DkvError: grpc_errors would make
    it INTERNAL; this is the caller's precondition)."""


class MembershipService:
    """See the module docstring. ``sm`` is the state machine hosted as ``group_id`` in
    ``host``; ``leader_info`` names a member id's name and client address for NOT_LEADER."""

    def __init__(
        self,
        host: Host,
        sm: MembershipStateMachine,
        group_id: int = MEMBERSHIP_GROUP_ID,
        leader_info: LeaderInfo | None = None,
        clock: Clock = wall_clock_ms,
        watch_queue_max: int = WATCH_QUEUE_MAX,
        watch_future_wait_s: float = WATCH_FUTURE_WAIT_S,
    ) -> None:
        if watch_queue_max < 1:
            raise InvalidArgument(f"watch_queue_max must be >= 1, got {watch_queue_max}")
        self.host = host
        self.sm = sm
        self.group_id = group_id
        self.leader_info: LeaderInfo = leader_info or (lambda _id: ("", ""))
        self.clock = clock
        self.watch_queue_max = watch_queue_max
        self.watch_future_wait_s = watch_future_wait_s
        self._closing = asyncio.Event()
        # Down detection: the term this replica leads and since when (its clock), or None.
        self._leading_term = 0
        self.leading_since_ms: int | None = None

    # -- plumbing -------------------------------------------------------------------------------

    @staticmethod
    def _timeout(context: Ctx) -> float:
        remaining = context.time_remaining()
        return DEFAULT_TIMEOUT_S if remaining is None else max(0.001, remaining)

    async def _call(self, context: Ctx, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call(context, fn, self.leader_info)
        except _Rejected as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        raise AssertionError("unreachable")  # context.abort always raises

    async def propose(self, cmd: pb.MembershipCommand, timeout_s: float) -> Outcome:
        """Validate ``cmd`` and replicate it; returns the state machine's outcome (accepted or
        not). Raises InvalidArgument (nothing proposed) and the host's errors."""
        validate_command(cmd)
        out = await self.host.propose(self.group_id, cmd.SerializeToString(), timeout_s)
        assert isinstance(out, Outcome)
        return out

    async def _propose_accepted(self, cmd: pb.MembershipCommand, timeout_s: float) -> Outcome:
        out = await self.propose(cmd, timeout_s)
        if not out.accepted:
            raise _Rejected(out.reason)
        return out

    async def _read_index(self, context: Ctx) -> None:
        await self.host.read_index(self.group_id, self._timeout(context))

    # -- writes ---------------------------------------------------------------------------------

    async def join_node(self, req: pb.JoinNodeRequest, context: Ctx) -> pb.JoinNodeResponse:
        async def run() -> pb.JoinNodeResponse:
            check_join_node(req)
            _only_as_itself(req.node.name, "join")
            node = pb.Node()
            node.CopyFrom(req.node)
            node.ClearField("state")  # ignored: the state machine decides
            node.last_heartbeat_unix_ms = self.clock()  # joining counts as a heartbeat
            cmd = pb.MembershipCommand(register_node=pb.RegisterNodeCommand(node=node))
            out = await self._propose_accepted(cmd, self._timeout(context))
            return pb.JoinNodeResponse(node=out.node, version=out.version)

        return await self._call(context, run)

    async def leave_node(self, req: pb.LeaveNodeRequest, context: Ctx) -> pb.LeaveNodeResponse:
        async def run() -> pb.LeaveNodeResponse:
            check_leave_node(req)
            cmd = pb.MembershipCommand(leave=pb.LeaveCommand(node_id=req.node_id))
            out = await self._propose_accepted(cmd, self._timeout(context))
            return pb.LeaveNodeResponse(node=out.node, version=out.version)

        return await self._call(context, run)

    async def heartbeat(self, req: pb.HeartbeatRequest, context: Ctx) -> pb.HeartbeatResponse:
        """One heartbeat entry, plus one leader report per shard whose (leader, term) is news
        to this replica. A report the state machine refuses (an older term than the known one,
        a shard not created yet) is not an error of the heartbeat: a newer report won."""

        async def run() -> pb.HeartbeatResponse:
            check_heartbeat(req)
            beating = self.sm.state.nodes.get(req.node_id)
            if beating is not None:
                _only_as_itself(beating.name, "heartbeat")
            beat = pb.MembershipCommand(
                heartbeat=pb.HeartbeatCommand(node_id=req.node_id, unix_ms=self.clock())
            )
            validate_command(beat)
            reports: list[pb.MembershipCommand] = []
            for e in req.leaders:
                cmd = pb.MembershipCommand(
                    report_leader=pb.ReportLeaderCommand(
                        shard_id=e.shard_id, leader_id=req.node_id, term=e.term
                    )
                )
                validate_command(cmd)
                known = self.sm.state.leaders.get(e.shard_id)
                if known is None or (known.leader_id, known.term) != (req.node_id, e.term):
                    reports.append(cmd)
            timeout = self._timeout(context)
            # Proposed together: they land in one Raft batch.
            outs = await asyncio.gather(*(self.propose(c, timeout) for c in (beat, *reports)))
            if not outs[0].accepted:
                raise _Rejected(outs[0].reason)
            return pb.HeartbeatResponse(version=max(o.version for o in outs))

        return await self._call(context, run)

    # -- reads ----------------------------------------------------------------------------------

    async def list_nodes(self, req: pb.ListNodesRequest, context: Ctx) -> pb.ListNodesResponse:
        async def run() -> pb.ListNodesResponse:
            await self._read_index(context)
            m = self.sm.cluster_map()
            return pb.ListNodesResponse(nodes=m.nodes, version=m.version)

        return await self._call(context, run)

    async def get_cluster_map(
        self, req: pb.GetClusterMapRequest, context: Ctx
    ) -> pb.GetClusterMapResponse:
        async def run() -> pb.GetClusterMapResponse:
            await self._read_index(context)
            me, leader = self.host.cfg.node_id, self.host.leader(self.group_id)
            return pb.GetClusterMapResponse(
                map=self.sm.cluster_map(),
                replica_id=me,
                replica_name=self.leader_info(me)[0],
                leader_id=leader,
                leader_name=self.leader_info(leader)[0] if leader else "",
            )

        return await self._call(context, run)

    # -- watch ----------------------------------------------------------------------------------

    async def watch_cluster_map(
        self, req: pb.WatchClusterMapRequest, context: Ctx
    ) -> AsyncIterator[pb.WatchClusterMapResponse]:
        queue: asyncio.Queue[pb.WatchClusterMapResponse | None] = asyncio.Queue(
            maxsize=self.watch_queue_max
        )
        task = asyncio.get_running_loop().create_task(self._follow(req.from_version, queue))
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _serving(self) -> bool:
        return self.host.running and not self._closing.is_set()

    async def _next_apply(self, seen_applied: int) -> None:
        """Wait until the group applies past ``seen_applied``, the host stops or the service
        closes (an event, not a poll)."""
        applied = asyncio.ensure_future(self.host.wait_applied(self.group_id, seen_applied + 1))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((applied, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (applied, closing):
                t.cancel()
            await asyncio.gather(applied, closing, return_exceptions=True)

    async def _follow(
        self, version: int, queue: asyncio.Queue[pb.WatchClusterMapResponse | None]
    ) -> None:
        full_first = version == 0
        if version > self.sm.version:
            # The client saw a version this replica has not applied yet: a lagging replica
            # catches up; a version of another cluster never comes (then: the whole map).
            # One condition wait, re-checked after every host iteration (an event).
            try:
                await self.host.wait_for(
                    lambda: self.sm.version >= version or not self._serving(),
                    self.watch_future_wait_s,
                )
            except DeadlineExceeded:
                full_first = True
        while self._serving():
            # Map, version and change log are read together, with no await in between.
            seen_applied = self.host.written_applied(self.group_id)
            changes = None if full_first else self.sm.changes_since(version)
            full_first = False
            msg: pb.WatchClusterMapResponse | None = None
            if changes is None:
                m = self.sm.cluster_map()
                msg = pb.WatchClusterMapResponse(version=m.version, full=True, map=m)
            elif changes:
                msg = self._delta(changes)
            if msg is not None:
                version = msg.version
                await queue.put(msg)  # bounded: a slow watcher holds up only its own stream
            await self._next_apply(seen_applied)
        await queue.put(None)  # the replica is stopping: end the stream cleanly

    def _delta(self, changes: list[pb.MapChange]) -> pb.WatchClusterMapResponse:
        st = self.sm.state
        node_ids = sorted({i for c in changes for i in c.node_ids})
        shard_ids = sorted({i for c in changes for i in c.shard_ids})
        leader_ids = sorted({i for c in changes for i in c.leader_shard_ids})
        out = pb.WatchClusterMapResponse(version=st.version, full=False)
        out.nodes.extend(st.nodes[i] for i in node_ids if i in st.nodes)
        out.removed_node_ids.extend(i for i in node_ids if i not in st.nodes)
        out.shards.extend(st.shards[i] for i in shard_ids if i in st.shards)
        out.leaders.extend(st.leaders[i] for i in leader_ids if i in st.leaders)
        if any(c.slots for c in changes):
            out.slot_ranges.extend(sorted(st.slot_ranges, key=lambda r: r.start))
        return out

    # -- down detection -------------------------------------------------------------------------

    def is_leader(self) -> bool:
        return self.host.leader(self.group_id) == self.host.cfg.node_id

    async def mark_down_pass(
        self, down_after_ms: int, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> list[int]:
        """One round of down detection (see the module docstring); returns the ids this round
        marked DOWN. A no-op on followers."""
        if not self.is_leader():
            self.leading_since_ms = None
            return []
        now = self.clock()
        term = self.host.term(self.group_id)
        if self.leading_since_ms is None or term != self._leading_term:
            self._leading_term, self.leading_since_ms = term, now
        if now - self.leading_since_ms < down_after_ms:
            return []
        stale = [
            (n.id, n.last_heartbeat_unix_ms)
            for n in self.sm.state.nodes.values()
            if n.state == pb.NODE_STATE_UP and now - n.last_heartbeat_unix_ms > down_after_ms
        ]
        marked = []
        for node_id, last in stale:
            cmd = pb.MembershipCommand(
                mark_down=pb.MarkDownCommand(node_id=node_id, last_heartbeat_unix_ms=last)
            )
            out = await self.propose(cmd, timeout_s)
            if out.accepted and out.changed:
                log.warning("node %d marked DOWN: no heartbeat for %d ms", node_id, now - last)
                marked.append(node_id)
        return marked

    async def run_down_detector(self, down_after_ms: int, check_interval_s: float) -> None:
        """Run :meth:`mark_down_pass` every ``check_interval_s`` until the service closes."""
        while self._serving():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), check_interval_s)
            if not self._serving():
                return
            try:
                await self.mark_down_pass(down_after_ms, timeout_s=max(check_interval_s, 1.0))
            except DkvError as exc:  # lost leadership, no quorum: try again next round
                log.info("down detection round failed: %s", exc)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def closing(self) -> asyncio.Event:
        """Set when the service closes (background loops end)."""
        return self._closing

    def close(self) -> None:
        """End every watch stream (cleanly, status OK) and the down detector."""
        self._closing.set()


def _only_as_itself(name: str, what: str) -> None:
    """A node may join and heartbeat only as itself: its certificate names it (the access
    rules already let only nodes call; without mTLS there is no caller to compare)."""
    who = CALLER.get()
    if who is not None and who.kind is Kind.NODE and who.name != name:
        raise PermissionDenied(f"{who.subject} may not {what} as node {name!r}")


def add_membership_service(server: grpc.aio.Server, service: MembershipService) -> None:
    def unary(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "JoinNode": unary(service.join_node, pb.JoinNodeRequest, pb.JoinNodeResponse),
        "LeaveNode": unary(service.leave_node, pb.LeaveNodeRequest, pb.LeaveNodeResponse),
        "Heartbeat": unary(service.heartbeat, pb.HeartbeatRequest, pb.HeartbeatResponse),
        "ListNodes": unary(service.list_nodes, pb.ListNodesRequest, pb.ListNodesResponse),
        "GetClusterMap": unary(
            service.get_cluster_map, pb.GetClusterMapRequest, pb.GetClusterMapResponse
        ),
        "WatchClusterMap": grpc.unary_stream_rpc_method_handler(
            service.watch_cluster_map,
            request_deserializer=pb.WatchClusterMapRequest.FromString,
            response_serializer=pb.WatchClusterMapResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("dkv.v1.Membership", handlers),)
    )
