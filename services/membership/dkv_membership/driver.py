"""The placement driver: the membership leader's loop that initializes the cluster and moves
shard replicas to where placement wants them (DESIGN.md "membership").

Runs on every replica, acts only on the leader, one pass every ``interval_ms``:

1. **Bootstrap.** Before the cluster is initialized, once ``min_nodes`` nodes are UP, it
   proposes ``InitClusterCommand``: ``shard_count`` shards, the slot table, and each shard's
   initial voters from :func:`dkv_membership.placement.place`. Nodes that see themselves in a
   shard's epoch-1 voters bootstrap that group with exactly those voters (``dkv_node.hosting``).
2. **Moves.** For every shard whose replicas differ from the plan (consistent hashing with
   bounded loads over the nodes that are UP or DOWN; LEAVING nodes are drained), one step per
   pass, at most ``moves_max`` shards at a time, each step through the shard leader's Admin
   API and always **Raft first, map second**:

   - the map is brought in line with the shard's real Raft configuration (as reported by its
     leader's ``Status``) whenever they differ: a step interrupted between its Raft change and
     its map update is finished by the next pass;
   - add the missing replica as a learner (it joins empty and catches up from the leader's
     snapshot once the map tells its node to host the shard);
   - promote the learner (the node refuses while it lags; the next pass tries again);
   - transfer leadership away from a replica that must go, then remove it.

   Because the map records a removal only after Raft committed it, a node may drop a shard's
   data as soon as the map stops listing it; because a learner is added before it is
   promoted, and a voter removed only once the replacement votes, the shard never has fewer
   than the planned number of voters.
3. **Leaving.** A LEAVING node that holds no replica any more is removed from the map.

A DOWN node keeps its replicas for ``replace_down_after_ms`` (its shards serve from the
remaining majority meanwhile); after that its replicas are re-created on other nodes, as for a
draining node, when enough other nodes are UP. If it comes back, it is UP with fewer (or no)
replicas, and placement may give it some again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from dkv.errors import DkvError
from dkv.v1 import admin_pb2
from dkv.v1 import membership_pb2 as pb
from dkv_membership.placement import NodeInfo, place
from dkv_membership.service import MembershipService

__all__ = ["DriverConfig", "PlacementDriver"]

log = logging.getLogger("dkv.membership.driver")

R = TypeVar("R", bound=Message)

UP, DOWN, LEAVING = pb.NODE_STATE_UP, pb.NODE_STATE_DOWN, pb.NODE_STATE_LEAVING


@dataclass(frozen=True)
class DriverConfig:
    shard_count: int = 8
    replication: int = 3
    # Nodes that must be UP before the cluster is initialized (default: ``replication``).
    min_nodes: int = 0
    epsilon: float = 0.25
    interval_ms: int = 1000
    moves_max: int = 2  # shards being moved at the same time
    rpc_timeout_ms: int = 5000
    # A node DOWN (no heartbeat) for longer than this loses its replicas to other nodes, if
    # enough others are UP; 0: never (drain it with LeaveNode).
    replace_down_after_ms: int = 300_000


class PlacementDriver:
    """See the module docstring. ``channel_for(address)`` gives a (cached) channel to a
    node's client port."""

    def __init__(
        self,
        service: MembershipService,
        cfg: DriverConfig,
        channel_for: Callable[[str], grpc.aio.Channel],
    ) -> None:
        self.service = service
        self.cfg = cfg
        self.channel_for = channel_for
        self.passes = 0
        self.steps = 0  # Raft or map changes made (tests and metrics)
        # Metrics: shards the last pass found away from their plan, and moves seen finished
        # (a shard moving at one pass and at its plan at a later one).
        self.moves_in_flight = 0
        self.moves_completed = 0
        self._moving: set[int] = set()

    # -- loop -----------------------------------------------------------------------------------

    async def run(self, closing: asyncio.Event) -> None:
        while not closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), self.cfg.interval_ms / 1000)
            if closing.is_set():
                return
            try:
                await self.run_pass()
            except DkvError as exc:  # lost leadership, no quorum: next pass
                log.info("placement pass failed: %s", exc)
            except Exception:  # never let the driver die; the next pass retries
                log.exception("placement pass failed")

    async def run_pass(self) -> None:
        """One pass (a no-op on followers)."""
        if not self.service.is_leader():
            self.moves_in_flight = 0
            self._moving = set()
            return
        self.passes += 1
        st = self.service.sm.state
        if not st.shards:
            await self._maybe_initialize()
            return
        plan = self.plan()
        moving = [
            sid
            for sid in sorted(st.shards)
            if sid in plan
            and (_replicas(st.shards[sid]) != set(plan[sid]) or st.shards[sid].learners)
        ]
        now_moving = set(moving)
        self.moves_completed += len(self._moving - now_moving)
        self._moving = now_moving
        # At most moves_max of them are worked on at once; the rest wait their turn.
        self.moves_in_flight = min(len(now_moving), self.cfg.moves_max)
        if moving:
            # Shards already in motion (a learner, or an extra voter) finish first, so at most
            # moves_max shards are ever between two configurations; within each group start
            # where the last pass stopped, so a shard that cannot move now (its new node is
            # down) does not hold up the others for good.
            def rotated(sids: list[int]) -> list[int]:
                k = self.passes % len(sids) if sids else 0
                return sids[k:] + sids[:k]

            started = [
                sid
                for sid in moving
                if st.shards[sid].learners or len(st.shards[sid].voters) > len(plan[sid])
            ]
            rest = [sid for sid in moving if sid not in started]
            moving = (rotated(started) + rotated(rest))[: self.cfg.moves_max]
            results = await asyncio.gather(
                *(self._step(sid, plan[sid]) for sid in moving), return_exceptions=True
            )
            for sid, r in zip(moving, results, strict=False):
                if isinstance(r, BaseException):
                    log.info("move of shard %d: %s", sid, r)
        await self._remove_drained()

    def plan(self) -> dict[int, tuple[int, ...]]:
        """Where each shard's replicas should be, keeping current replicas where the load
        bound allows: over UP nodes and nodes DOWN for a short while (a restart, a network
        blip: moving their replicas would cost more than waiting). Nodes DOWN for longer than
        ``replace_down_after_ms`` are left out (their replicas are re-created elsewhere) as
        long as enough other nodes remain for the replication factor; LEAVING nodes are left
        out (drained) unless too few other nodes remain."""
        st = self.service.sm.state
        now_ms = self.service.clock()
        wait_ms = self.cfg.replace_down_after_ms

        def dead(n: pb.Node) -> bool:
            return n.state == DOWN and wait_ms > 0 and now_ms - n.last_heartbeat_unix_ms > wait_ms

        candidates = [n for n in st.nodes.values() if n.state in (UP, DOWN)]
        alive = [n for n in candidates if not dead(n)]
        if len(alive) >= self.cfg.replication:
            candidates = alive
        elif st.shards:
            # Too few nodes for the replication factor: replicas stay where they are, LEAVING
            # nodes too (a drain waits for a new node rather than shrinking every shard).
            leaving = [n for n in st.nodes.values() if n.state == LEAVING]
            candidates += leaving[: max(0, self.cfg.replication - len(candidates))]
            if leaving and self.passes % 60 == 1:
                log.warning(
                    "cannot drain %s: %d nodes left for %d replicas per shard; add a node",
                    ", ".join(n.name for n in leaving),
                    len(alive),
                    self.cfg.replication,
                )
        nodes = sorted(candidates, key=lambda n: n.id)
        if not nodes:
            return {}
        name_of = {n.id: n.name for n in st.nodes.values()}
        id_of = {n.name: n.id for n in nodes}
        previous = {
            s.id: [name_of[i] for i in (*s.voters, *s.learners) if i in name_of]
            for s in st.shards.values()
        }
        table = place(
            sorted(st.shards),
            [NodeInfo(n.name, n.zone) for n in nodes],
            replication=min(self.cfg.replication, len(nodes)),
            epsilon=self.cfg.epsilon,
            previous=previous,
        )
        return {sid: tuple(id_of[name] for name in names) for sid, names in table.items()}

    # -- bootstrap ------------------------------------------------------------------------------

    async def _maybe_initialize(self) -> None:
        st = self.service.sm.state
        up = sorted((n for n in st.nodes.values() if n.state == UP), key=lambda n: n.id)
        need = self.cfg.min_nodes or self.cfg.replication
        if len(up) < need:
            return
        id_of = {n.name: n.id for n in up}
        table = place(
            list(range(1, self.cfg.shard_count + 1)),
            [NodeInfo(n.name, n.zone) for n in up],
            replication=min(self.cfg.replication, len(up)),
            epsilon=self.cfg.epsilon,
        )
        shards = [
            pb.Shard(id=sid, voters=[id_of[name] for name in names])
            for sid, names in sorted(table.items())
        ]
        cmd = pb.MembershipCommand(
            init_cluster=pb.InitClusterCommand(shard_count=self.cfg.shard_count, shards=shards)
        )
        out = await self.service.propose(cmd, self._timeout_s)
        if out.accepted and out.changed:
            self.steps += 1
            log.info(
                "cluster initialized: %d shards over %d nodes (replication %d)",
                self.cfg.shard_count,
                len(up),
                min(self.cfg.replication, len(up)),
            )

    # -- moves ----------------------------------------------------------------------------------

    @property
    def _timeout_s(self) -> float:
        return self.cfg.rpc_timeout_ms / 1000

    async def _step(self, sid: int, target: tuple[int, ...]) -> None:
        """One step of shard ``sid`` toward ``target`` (see the module docstring)."""
        shard = self.service.sm.state.shards[sid]
        leader, status = await self._leader_status(sid, shard)
        raft_voters, raft_learners = set(status.voters), set(status.learners)
        if raft_voters != set(shard.voters) or raft_learners != set(shard.learners):
            await self._record(shard, raft_voters, raft_learners, target)
            return
        for learner in shard.learners:
            if learner not in target:
                await self._change(leader, sid, admin_pb2.MEMBERSHIP_CHANGE_REMOVE, learner)
            else:
                await self._change(leader, sid, admin_pb2.MEMBERSHIP_CHANGE_PROMOTE, learner)
            return
        missing = [n for n in target if n not in raft_voters]
        if missing:
            await self._change(leader, sid, admin_pb2.MEMBERSHIP_CHANGE_ADD_LEARNER, missing[0])
            return
        extra = [v for v in shard.voters if v not in target]
        if extra:
            victim = extra[0]
            if victim == leader:
                successor = next(v for v in target if v in raft_voters)
                await self._admin(
                    leader,
                    "TransferLeadership",
                    admin_pb2.TransferLeadershipRequest(shard_id=sid, target_id=successor),
                    admin_pb2.TransferLeadershipResponse,
                )
                return  # the next pass removes it at the new leader
            await self._change(leader, sid, admin_pb2.MEMBERSHIP_CHANGE_REMOVE, victim)

    async def _change(
        self, leader: int, sid: int, change: admin_pb2.MembershipChange, node_id: int
    ) -> None:
        """A Raft change at the shard leader, then the map mirrors the new configuration."""
        node = self.service.sm.state.nodes.get(node_id)
        req = admin_pb2.ChangeShardMembershipRequest(
            shard_id=sid,
            change=change,
            member_id=node_id,
            name=node.name if node is not None else "",
            peer_address=node.peer_address if node is not None else "",
        )
        resp = await self._admin(
            leader, "ChangeShardMembership", req, admin_pb2.ChangeShardMembershipResponse
        )
        self.steps += 1
        log.info(
            "shard %d: %s %s",
            sid,
            admin_pb2.MembershipChange.Name(change).removeprefix("MEMBERSHIP_CHANGE_").lower(),
            node.name if node is not None else node_id,
        )
        shard = self.service.sm.state.shards[sid]
        await self._record(shard, set(resp.voters), set(resp.learners), ())

    async def _record(
        self, shard: pb.Shard, voters: set[int], learners: set[int], target: tuple[int, ...]
    ) -> None:
        """Compare-and-set the map's replica sets of ``shard`` to the Raft configuration
        (voters in the plan's order first: the first is the preferred leader)."""
        order = {n: i for i, n in enumerate(target or shard.voters)}
        cmd = pb.MembershipCommand(
            set_shard_replicas=pb.SetShardReplicasCommand(
                shard_id=shard.id,
                expected_epoch=shard.epoch,
                voters=sorted(voters, key=lambda n: (order.get(n, len(order)), n)),
                learners=sorted(learners),
            )
        )
        out = await self.service.propose(cmd, self._timeout_s)
        if out.accepted and out.changed:
            self.steps += 1

    async def _leader_status(self, sid: int, shard: pb.Shard) -> tuple[int, admin_pb2.ShardStatus]:
        """The shard's leader and its view of the shard (following one leader hint)."""
        st = self.service.sm.state
        entry = st.leaders.get(sid)
        candidates = [entry.leader_id] if entry is not None else []
        candidates += [n for n in (*shard.voters, *shard.learners) if n not in candidates]
        last: Exception | None = None
        for node_id in candidates:
            try:
                resp = await self._admin(
                    node_id, "Status", admin_pb2.StatusRequest(), admin_pb2.StatusResponse
                )
            except (DkvError, grpc.aio.AioRpcError) as exc:
                last = exc
                continue
            ss = next((s for s in resp.shards if s.shard_id == sid), None)
            if ss is None:
                continue
            if ss.role == admin_pb2.ROLE_LEADER:
                return node_id, ss
            if ss.leader_id and ss.leader_id != node_id and ss.leader_id in st.nodes:
                try:
                    resp = await self._admin(
                        ss.leader_id, "Status", admin_pb2.StatusRequest(), admin_pb2.StatusResponse
                    )
                except (DkvError, grpc.aio.AioRpcError) as exc:
                    last = exc
                    continue
                ss2 = next((s for s in resp.shards if s.shard_id == sid), None)
                if ss2 is not None and ss2.role == admin_pb2.ROLE_LEADER:
                    return int(ss.leader_id), ss2
        raise DkvError(f"shard {sid}: no leader found ({last})")

    async def _admin(self, node_id: int, method: str, req: Message, resp_type: type[R]) -> R:
        node = self.service.sm.state.nodes.get(node_id)
        if node is None or not node.client_address:
            raise DkvError(f"node {node_id:x} has no client address in the map")
        call: Any = self.channel_for(node.client_address).unary_unary(
            f"/dkv.v1.Admin/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp_type.FromString,
        )
        resp: R = await call(req, timeout=self._timeout_s)
        return resp

    # -- leaving --------------------------------------------------------------------------------

    async def _remove_drained(self) -> None:
        st = self.service.sm.state
        held = {n for s in st.shards.values() for n in (*s.voters, *s.learners)}
        for n in list(st.nodes.values()):
            if n.state == LEAVING and n.id not in held:
                out = await self.service.propose(
                    pb.MembershipCommand(remove_node=pb.RemoveNodeCommand(node_id=n.id)),
                    self._timeout_s,
                )
                if out.accepted and out.changed:
                    self.steps += 1
                    log.info("node %s drained and removed from the map", n.name)


def _replicas(s: pb.Shard) -> set[int]:
    return {*s.voters, *s.learners}
