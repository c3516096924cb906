"""The node's ``dkv.v1.Admin`` gRPC service: status, membership, leadership, snapshots.

Membership changes go to every shard group, one after the other. Each group's change must be
proposed by that group's leader, which may be another node: this node then forwards the
one-group change (``ChangeShardMembership``) to the leader's client address, learned from the
member registry. Each step is idempotent, so a change that failed halfway is completed by
running it again (the error says so).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio

from dkv.errors import ConfChangeRejected, DeadlineExceeded, DkvError, InvalidArgument, NotLeader
from dkv.host import Host
from dkv.host.grpc_errors import Ctx, call
from dkv.host.members import Member, encode_context
from dkv.raft import ConfChange, ConfChangeType, ConfState, Role
from dkv.v1 import admin_pb2
from dkv.validation import (
    check_change_shard_membership,
    check_member_add,
    check_member_promote,
    check_member_remove,
)

if TYPE_CHECKING:
    from dkv_node.node import Node

__all__ = ["PROMOTE_LAG_MAX_ENTRIES", "AdminService", "add_admin_service"]

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 10.0
# A learner is promoted only when it is this close to the leader's log: a voter that must
# first catch up lowers the group's fault tolerance until it has (etcd refuses likewise).
PROMOTE_LAG_MAX_ENTRIES = 1000

_ROLE = {
    Role.FOLLOWER: admin_pb2.ROLE_FOLLOWER,
    Role.CANDIDATE: admin_pb2.ROLE_CANDIDATE,
    Role.PRE_CANDIDATE: admin_pb2.ROLE_PRE_CANDIDATE,
    Role.LEADER: admin_pb2.ROLE_LEADER,
}
_CHANGE = {
    admin_pb2.MEMBERSHIP_CHANGE_ADD_LEARNER: ConfChangeType.ADD_LEARNER,
    admin_pb2.MEMBERSHIP_CHANGE_PROMOTE: ConfChangeType.ADD_NODE,
    admin_pb2.MEMBERSHIP_CHANGE_REMOVE: ConfChangeType.REMOVE_NODE,
}


def _version() -> str:
    try:
        return metadata.version("dkv")
    except metadata.PackageNotFoundError:
        return "unknown"


class AdminService:
    def __init__(self, node: Node) -> None:
        self.node = node

    @property
    def host(self) -> Host:
        assert self.node.host is not None
        return self.node.host

    def _leader_info(self, member_id: int) -> tuple[str, str]:
        reg = self.node.registry
        return (reg.name(member_id), reg.client_address(member_id)) if reg else ("", "")

    async def _call(self, context: Ctx, fn: Callable[[], Awaitable[T]]) -> T:
        return await call(context, fn, self._leader_info)

    @staticmethod
    def _timeout(context: Ctx) -> float:
        remaining = context.time_remaining()
        return DEFAULT_TIMEOUT_S if remaining is None else max(0.001, remaining)

    # -- status ---------------------------------------------------------------------------------

    def shard_status(self, gid: int) -> admin_pb2.ShardStatus:
        g = self.host.groups[gid]
        st = g.node.status()
        cs: ConfState = st.conf_state
        me = self.node.id
        if me in cs.learners:
            role = admin_pb2.ROLE_LEARNER
        elif me not in cs.voters and cs.voters:
            role = admin_pb2.ROLE_REMOVED
        else:
            role = _ROLE[st.role]
        first = g.storage.first_index()
        last = st.last_index
        return admin_pb2.ShardStatus(
            shard_id=gid,
            role=role,
            term=st.term,
            leader_id=st.leader_id,
            commit_index=st.commit,
            applied_index=g.storage.applied_index,
            first_index=first,
            last_index=last,
            snapshot_index=g.storage.snapshot().metadata.index,
            log_entries=max(0, last - first + 1),
            revision=self.node.shards[gid].kv.store.revision(),
            voters=cs.voters,
            learners=cs.learners,
            peers=[
                admin_pb2.PeerProgress(
                    id=pid,
                    match_index=pr.match,
                    next_index=pr.next,
                    state=pr.state.value,
                    is_learner=pr.is_learner,
                    recent_active=pr.recent_active,
                )
                for pid, pr in sorted(st.progress.items())
            ],
        )

    async def status(self, req: admin_pb2.StatusRequest, context: Ctx) -> admin_pb2.StatusResponse:
        node = self.node
        me = node.registry.get(node.id) if node.registry else None
        size = sum(f.stat().st_size for f in node.cfg.data_dir.rglob("*") if f.is_file())
        return admin_pb2.StatusResponse(
            member_id=node.id,
            name=node.cfg.name,
            peer_address=me.peer_address if me else "",
            client_address=me.client_address if me else "",
            cluster_token=node.cfg.cluster_token,
            shards=[self.shard_status(gid) for gid in sorted(node.shards)],
            db_size_bytes=size,
            version=_version(),
        )

    # -- membership -----------------------------------------------------------------------------

    def members(self) -> list[admin_pb2.Member]:
        """Every member of any shard's configuration, as this node has applied it."""
        ids: dict[int, tuple[list[int], bool]] = {}
        for gid in sorted(self.node.shards):
            cs: ConfState = self.host.groups[gid].node.status().conf_state
            for mid in (*cs.voters, *cs.learners):
                shards, learner = ids.setdefault(mid, ([], False))
                shards.append(gid)
                ids[mid] = (shards, learner or mid in cs.learners)
        out = []
        reg = self.node.registry
        for mid, (shards, learner) in ids.items():
            m = reg.get(mid) if reg else None
            out.append(
                admin_pb2.Member(
                    id=mid,
                    name=m.name if m else "",
                    peer_address=m.peer_address if m else "",
                    client_address=m.client_address if m else "",
                    is_learner=learner,
                    shard_ids=shards,
                )
            )
        return sorted(out, key=lambda m: (m.name, m.id))

    async def member_list(
        self, req: admin_pb2.MemberListRequest, context: Ctx
    ) -> admin_pb2.MemberListResponse:
        async def run() -> admin_pb2.MemberListResponse:
            if not req.serializable:
                # Linearizable: every configuration change committed before this call is
                # applied here before we answer (ReadIndex on every shard).
                t = self._timeout(context)
                await asyncio.gather(*(self.host.read_index(g, t) for g in self.node.shards))
            return admin_pb2.MemberListResponse(members=self.members())

        return await self._call(context, run)

    def _static_placement_only(self) -> None:
        """Member add/promote/remove change every shard by hand; with placement managed by
        the membership service they would fight its driver."""
        if self.node.cfg.managed:
            raise ConfChangeRejected(
                "replicas of this cluster are placed by the membership service: start a node "
                "with --membership to add it, `dkvctl cluster drain NODE` to remove one"
            )

    async def member_add(
        self, req: admin_pb2.MemberAddRequest, context: Ctx
    ) -> admin_pb2.MemberAddResponse:
        async def run() -> admin_pb2.MemberAddResponse:
            check_member_add(req)
            self._static_placement_only()
            mid = self.node.member_id_of(req.name)
            known = self.node.registry.get(mid) if self.node.registry else None
            in_conf = any(m.id == mid for m in self.members())
            if known and in_conf and known.peer_address != req.peer_address:
                raise InvalidArgument(
                    f"member {req.name} already exists with peer address "
                    f"{known.peer_address}; remove it first to change its address"
                )
            await self._every_shard(
                context, admin_pb2.MEMBERSHIP_CHANGE_ADD_LEARNER, mid, req.name, req.peer_address
            )
            members = self.members()
            return admin_pb2.MemberAddResponse(
                member=next(m for m in members if m.id == mid), members=members
            )

        return await self._call(context, run)

    async def member_promote(
        self, req: admin_pb2.MemberPromoteRequest, context: Ctx
    ) -> admin_pb2.MemberPromoteResponse:
        async def run() -> admin_pb2.MemberPromoteResponse:
            check_member_promote(req)
            self._static_placement_only()
            m = self._known_member(req.id)
            await self._every_shard(
                context, admin_pb2.MEMBERSHIP_CHANGE_PROMOTE, req.id, m.name, m.peer_address
            )
            return admin_pb2.MemberPromoteResponse(members=self.members())

        return await self._call(context, run)

    async def member_remove(
        self, req: admin_pb2.MemberRemoveRequest, context: Ctx
    ) -> admin_pb2.MemberRemoveResponse:
        async def run() -> admin_pb2.MemberRemoveResponse:
            check_member_remove(req)
            self._static_placement_only()
            self._known_member(req.id)
            await self._every_shard(context, admin_pb2.MEMBERSHIP_CHANGE_REMOVE, req.id, "", "")
            return admin_pb2.MemberRemoveResponse(members=self.members())

        return await self._call(context, run)

    def _known_member(self, mid: int) -> Member:
        if not any(m.id == mid for m in self.members()):
            raise InvalidArgument(f"member {mid:x} is not a member of this cluster")
        reg = self.node.registry
        m = reg.get(mid) if reg else None
        return m or Member(mid, "", "")

    async def _every_shard(
        self,
        context: Ctx,
        change: admin_pb2.MembershipChange,
        mid: int,
        name: str,
        peer: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout(context)
        done: list[int] = []
        for gid in sorted(self.node.shards):
            try:
                await self._on_leader(gid, change, mid, name, peer, deadline)
            except DkvError as exc:
                if not done:
                    raise
                raise type(exc)(
                    f"{exc} (shards {', '.join(map(str, done))} are done; repeat the command "
                    "to finish the others)"
                ) from exc
            done.append(gid)

    async def _on_leader(
        self,
        gid: int,
        change: admin_pb2.MembershipChange,
        mid: int,
        name: str,
        peer: str,
        deadline: float,
    ) -> None:
        """Carry out one group's change at that group's leader, wherever it is."""

        async def local(timeout_s: float) -> None:
            await self.change_local(gid, change, mid, name, peer, timeout_s)

        async def remote(ch: grpc.aio.Channel, timeout_s: float) -> None:
            stub = ch.unary_unary(
                "/dkv.v1.Admin/ChangeShardMembership",
                request_serializer=admin_pb2.ChangeShardMembershipRequest.SerializeToString,
                response_deserializer=admin_pb2.ChangeShardMembershipResponse.FromString,
            )
            req = admin_pb2.ChangeShardMembershipRequest(
                shard_id=gid, change=change, member_id=mid, name=name, peer_address=peer
            )
            await stub(req, timeout=timeout_s)
            # Answer with what this node has applied: wait until the change reached us too.
            await self.host.wait_for(lambda: self._applied(gid, change, mid), timeout_s)

        assert self.node.router is not None
        await self.node.router.run(gid, local, remote, deadline)

    def _applied(self, gid: int, change: admin_pb2.MembershipChange, mid: int) -> bool:
        cs: ConfState = self.host.groups[gid].node.status().conf_state
        if change == admin_pb2.MEMBERSHIP_CHANGE_ADD_LEARNER:
            return mid in cs.learners or mid in cs.voters
        if change == admin_pb2.MEMBERSHIP_CHANGE_PROMOTE:
            return mid in cs.voters
        return mid not in cs.voters and mid not in cs.learners

    def _learner_lag(self, gid: int, mid: int) -> int | None:
        """How far the learner's log is behind this leader's; None if it never answered."""
        st = self.host.groups[gid].node.status()
        pr = st.progress.get(mid)
        if pr is None or pr.match == 0:
            return None
        return st.last_index - pr.match

    async def change_local(
        self,
        gid: int,
        change: admin_pb2.MembershipChange,
        mid: int,
        name: str,
        peer: str,
        timeout_s: float,
    ) -> ConfState:
        """One group's change, proposed here (this node must lead the group)."""
        g = self.host.groups[gid]
        st = g.node.status()
        if st.role is not Role.LEADER:
            raise NotLeader(st.leader_id)
        cs: ConfState = st.conf_state
        if self._applied(gid, change, mid):
            return cs  # idempotent: already done
        if change == admin_pb2.MEMBERSHIP_CHANGE_PROMOTE:
            if mid not in cs.learners:
                raise InvalidArgument(f"member {mid:x} is not a learner of shard {gid}")
            # The leader's view of a learner lags by a round trip (and starts at zero after
            # an election): give it two election timeouts to show it caught up.
            cfg = self.host.cfg
            grace_s = 2 * cfg.election_timeout_ticks * cfg.tick_interval_ms / 1000
            with contextlib.suppress(DeadlineExceeded):
                await self.host.wait_for(
                    lambda: (
                        (self._learner_lag(gid, mid) or 0) <= PROMOTE_LAG_MAX_ENTRIES
                        and self._learner_lag(gid, mid) is not None
                    ),
                    min(grace_s, timeout_s),
                )
            lag = self._learner_lag(gid, mid)
            if lag is None:
                raise ConfChangeRejected(
                    f"learner {mid:x} has not answered the leader of shard {gid} yet (is it "
                    "running?); promote it once it caught up"
                )
            if lag > PROMOTE_LAG_MAX_ENTRIES:
                raise ConfChangeRejected(
                    f"learner {mid:x} is {lag} entries behind the leader of shard {gid} "
                    f"(at most {PROMOTE_LAG_MAX_ENTRIES}); promote it once it caught up"
                )
        if change == admin_pb2.MEMBERSHIP_CHANGE_REMOVE and cs.voters == (mid,):
            raise ConfChangeRejected(f"member {mid:x} is the last voter of shard {gid}")
        ctx = encode_context(name, peer) if name and peer else b""
        cc = ConfChange(_CHANGE[change], mid, ctx)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                return await self.host.propose_conf_change(gid, cc, deadline - loop.time())
            except ConfChangeRejected:
                # One change at a time (thesis §4.1): wait for the pending one to apply.
                if loop.time() >= deadline or not self.host.conf_change_pending(gid):
                    raise
                await self.host.wait_for(
                    lambda: not self.host.conf_change_pending(gid), deadline - loop.time()
                )

    async def change_shard_membership(
        self, req: admin_pb2.ChangeShardMembershipRequest, context: Ctx
    ) -> admin_pb2.ChangeShardMembershipResponse:
        async def run() -> admin_pb2.ChangeShardMembershipResponse:
            check_change_shard_membership(req)
            if req.shard_id not in self.node.shards:
                raise InvalidArgument(f"shard {req.shard_id} is not hosted here")
            # Every node derives a member's id from its name (dkv.host.members.member_id):
            # a name under another id would teach every replica a wrong address for it.
            if req.name and self.node.member_id_of(req.name) != req.member_id:
                raise InvalidArgument(
                    f"name {req.name!r} is member {self.node.member_id_of(req.name):x} in this "
                    f"cluster, not member_id {req.member_id:x}"
                )
            cs = await self.change_local(
                req.shard_id,
                req.change,
                req.member_id,
                req.name,
                req.peer_address,
                self._timeout(context),
            )
            return admin_pb2.ChangeShardMembershipResponse(voters=cs.voters, learners=cs.learners)

        return await self._call(context, run)

    # -- leadership and snapshots ---------------------------------------------------------------

    def _shards_arg(self, shard_id: int) -> list[int]:
        if shard_id == 0:
            return sorted(self.node.shards)
        if shard_id not in self.node.shards:
            raise InvalidArgument(
                f"shard {shard_id} does not exist (shards are 1..{len(self.node.shards)})"
            )
        return [shard_id]

    async def transfer_leadership(
        self, req: admin_pb2.TransferLeadershipRequest, context: Ctx
    ) -> admin_pb2.TransferLeadershipResponse:
        async def run() -> admin_pb2.TransferLeadershipResponse:
            gids = self._shards_arg(req.shard_id)
            if req.shard_id == 0:
                gids = [g for g in gids if self.host.leader(g) == self.node.id]
            out: dict[int, int] = {}
            for gid in gids:
                st = self.host.groups[gid].node.status()
                if st.role is not Role.LEADER:
                    raise NotLeader(st.leader_id)
                target = req.target_id or self._best_successor(gid)
                await self.host.transfer_leadership(gid, target, self._timeout(context))
                out[gid] = target
            return admin_pb2.TransferLeadershipResponse(leaders=out)

        return await self._call(context, run)

    def _best_successor(self, gid: int) -> int:
        st = self.host.groups[gid].node.status()
        others = [v for v in st.conf_state.voters if v != self.node.id]
        if not others:
            raise InvalidArgument(f"shard {gid} has no other voter to lead it")
        return max(others, key=lambda v: (st.progress[v].match if v in st.progress else 0, -v))

    async def snapshot(
        self, req: admin_pb2.SnapshotRequest, context: Ctx
    ) -> admin_pb2.SnapshotResponse:
        async def run() -> admin_pb2.SnapshotResponse:
            out = {}
            for gid in self._shards_arg(req.shard_id):
                out[gid] = await self.host.snapshot_now(gid, self._timeout(context))
            return admin_pb2.SnapshotResponse(snapshot_index=out)

        return await self._call(context, run)


def add_admin_service(server: grpc.aio.Server, service: AdminService) -> None:
    def unary(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )

    a = admin_pb2
    handlers = {
        "Status": unary(service.status, a.StatusRequest, a.StatusResponse),
        "MemberList": unary(service.member_list, a.MemberListRequest, a.MemberListResponse),
        "MemberAdd": unary(service.member_add, a.MemberAddRequest, a.MemberAddResponse),
        "MemberPromote": unary(
            service.member_promote, a.MemberPromoteRequest, a.MemberPromoteResponse
        ),
        "MemberRemove": unary(service.member_remove, a.MemberRemoveRequest, a.MemberRemoveResponse),
        "TransferLeadership": unary(
            service.transfer_leadership, a.TransferLeadershipRequest, a.TransferLeadershipResponse
        ),
        "Snapshot": unary(service.snapshot, a.SnapshotRequest, a.SnapshotResponse),
        "ChangeShardMembership": unary(
            service.change_shard_membership,
            a.ChangeShardMembershipRequest,
            a.ChangeShardMembershipResponse,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("dkv.v1.Admin", handlers),)
    )
