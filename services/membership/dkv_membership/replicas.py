"""Adding and removing replicas of the membership group itself (``AddReplica``,
``RemoveReplica``): a Raft configuration change of group 1, one server at a time (thesis
§4.1), with the new replica caught up as a learner before it votes (thesis §4.2.1), so that
growing from the single replica of a development cluster to three never costs availability.

Both calls run at the membership leader (a follower answers NOT_LEADER with the leader's
address, which :class:`dkv.client.membership.MembershipClient` follows) and are idempotent:
each step first checks whether the configuration already has it.

Replica ids are ``member_id(cluster token, name)``, as at start-up; the change carries the
replica's name and peer address (``dkv.host.members.encode_context``), so every replica
learns where to reach it when the change applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from dkv.errors import ConfChangeRejected, DeadlineExceeded, NotLeader
from dkv.host import Host
from dkv.host.grpc_errors import Ctx, LeaderInfo, call
from dkv.host.members import MemberRegistry, encode_context
from dkv.raft import ConfChange, ConfChangeType, ConfState, Role
from dkv.v1 import membership_pb2 as pb
from dkv.validation import check_add_replica, check_remove_replica

__all__ = ["CATCH_UP_LAG_MAX_ENTRIES", "ReplicaAdmin", "add_replica_admin"]

CATCH_UP_LAG_MAX_ENTRIES = 100
"""A learner this close to the leader's log is promoted."""
DEFAULT_TIMEOUT_S = 30.0


class ReplicaAdmin:
    """See the module docstring. ``replica_id(name)`` derives a replica's id."""

    def __init__(
        self,
        host: Host,
        group_id: int,
        registry: MemberRegistry,
        replica_id: Callable[[str], int],
        leader_info: LeaderInfo,
    ) -> None:
        self.host = host
        self.group_id = group_id
        self.registry = registry
        self.replica_id = replica_id
        self.leader_info = leader_info

    def _conf(self) -> ConfState:
        st = self.host.groups[self.group_id].node.status()
        if st.role is not Role.LEADER:
            raise NotLeader(st.leader_id)
        conf: ConfState = st.conf_state
        return conf

    def replicas(self) -> list[pb.Replica]:
        cs = self.host.groups[self.group_id].storage.conf_state
        out = []
        for mid in (*cs.voters, *cs.learners):
            m = self.registry.get(mid)
            out.append(
                pb.Replica(
                    id=mid,
                    name=m.name if m else "",
                    peer_address=m.peer_address if m else "",
                    client_address=m.client_address if m else "",
                    is_learner=mid in cs.learners,
                )
            )
        return sorted(out, key=lambda r: r.name)

    async def _change(self, cc: ConfChange, timeout_s: float) -> None:
        try:
            await self.host.propose_conf_change(self.group_id, cc, timeout_s)
        except ConfChangeRejected:
            # One change at a time: wait for the pending one, then try once more.
            await self.host.wait_for(
                lambda: not self.host.conf_change_pending(self.group_id), timeout_s
            )
            await self.host.propose_conf_change(self.group_id, cc, timeout_s)

    def _lag(self, mid: int) -> int | None:
        st = self.host.groups[self.group_id].node.status()
        pr = st.progress.get(mid)
        if pr is None or pr.match == 0:
            return None
        return int(st.last_index - pr.match)

    async def add(self, req: pb.AddReplicaRequest, context: Ctx) -> pb.AddReplicaResponse:
        async def run() -> pb.AddReplicaResponse:
            check_add_replica(req)
            mid = self.replica_id(req.name)
            timeout = _timeout(context)
            cs = self._conf()
            if mid not in cs.voters and mid not in cs.learners:
                ctx = encode_context(req.name, req.peer_address)
                await self._change(ConfChange(ConfChangeType.ADD_LEARNER, mid, ctx), timeout)
            if mid not in self._conf().voters:
                try:
                    await self.host.wait_for(
                        lambda: (
                            (lag := self._lag(mid)) is not None and lag <= CATCH_UP_LAG_MAX_ENTRIES
                        ),
                        timeout,
                    )
                except DeadlineExceeded as exc:
                    raise ConfChangeRejected(
                        f"replica {req.name} was added as a learner but has not caught up "
                        f"(is it running with --initial-cluster-state existing?); repeat the "
                        "call to promote it once it has"
                    ) from exc
                await self._change(ConfChange(ConfChangeType.ADD_NODE, mid), timeout)
            return pb.AddReplicaResponse(replicas=self.replicas())

        return await call(context, run, self.leader_info)

    async def remove(self, req: pb.RemoveReplicaRequest, context: Ctx) -> pb.RemoveReplicaResponse:
        async def run() -> pb.RemoveReplicaResponse:
            check_remove_replica(req)
            mid = self.replica_id(req.name)
            timeout = _timeout(context)
            cs = self._conf()
            if mid in cs.voters or mid in cs.learners:
                if cs.voters == (mid,):
                    raise ConfChangeRejected(f"{req.name} is the last voting replica")
                if mid == self.host.cfg.node_id:
                    # The leader leaves last: hand leadership to another voter first; the
                    # caller repeats the call at the new leader (NOT_LEADER names it).
                    successor = next(v for v in cs.voters if v != mid)
                    await self.host.transfer_leadership(self.group_id, successor, timeout)
                    raise NotLeader(successor, "leadership moved away from the leaving replica")
                await self._change(ConfChange(ConfChangeType.REMOVE_NODE, mid), timeout)
            return pb.RemoveReplicaResponse(replicas=self.replicas())

        return await call(context, run, self.leader_info)


def _timeout(context: Ctx) -> float:
    remaining = context.time_remaining()
    return DEFAULT_TIMEOUT_S if remaining is None else max(0.001, remaining)


def add_replica_admin(server: grpc.aio.Server, admin: ReplicaAdmin) -> None:
    def unary(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "AddReplica": unary(admin.add, pb.AddReplicaRequest, pb.AddReplicaResponse),
        "RemoveReplica": unary(admin.remove, pb.RemoveReplicaRequest, pb.RemoveReplicaResponse),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("dkv.v1.Membership", handlers),)
    )
