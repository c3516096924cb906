"""The Admin API on real nodes (one process, real gRPC and RocksDB, peer mTLS, 2 shards):
status, member list / add as learner / promote / remove across every shard, forwarding to a
shard leader on another node, leader transfer, snapshots, and a restarted member that reaches
a member added after its --initial-cluster was written (the persisted member registry)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from dkv_node.admin_service import PROMOTE_LAG_MAX_ENTRIES
from dkv_node.node import Node, NodeConfig
from test_node_grpc import free_port, solo_config

from dkv.client import Client
from dkv.errors import ConfChangeRejected, InvalidArgument, NotLeader, ProposalDropped
from dkv.host.channels import TlsFiles
from dkv.host.members import member_id
from dkv.security import PkiLayout, write_dev_pki
from dkv.sharding import shard_for_key
from dkv.v1 import admin_pb2, kv_pb2

NAMES = ("a", "b", "c", "d")
SHARDS = 2


def _ids(members: list[admin_pb2.Member]) -> dict[str, tuple[bool, list[int]]]:
    return {m.name: (m.is_learner, list(m.shard_ids)) for m in members}


def test_membership_changes_across_every_shard(tmp_path: Path) -> None:
    pki = PkiLayout(tmp_path / "pki")
    write_dev_pki(pki.directory, [("node", n) for n in NAMES])
    peers = {n: f"127.0.0.1:{free_port()}" for n in NAMES}
    founders = {n: peers[n] for n in "abc"}

    def config(name: str, state: str, cluster: dict[str, str]) -> NodeConfig:
        return NodeConfig(
            name=name,
            data_dir=tmp_path / name,
            listen_peer=peers[name],
            listen_client="127.0.0.1:0",
            initial_cluster=cluster,
            initial_cluster_state=state,
            shards=SHARDS,
            peer_tls=TlsFiles(str(pki.cert(name)), str(pki.key(name)), str(pki.ca_cert)),
            tick_interval_ms=10,
        )

    async def scenario() -> None:
        nodes: dict[str, Node] = {}

        async def start(name: str, state: str, cluster: dict[str, str]) -> Node:
            node = Node(config(name, state, cluster))
            await node.start()
            nodes[name] = node
            return node

        def ep(name: str) -> str:
            return f"127.0.0.1:{nodes[name].client_port}"

        async def converged(name: str, minimum_revision: int) -> None:
            """Wait until every shard on ``name`` applied at least what the others have."""
            host = nodes[name].host
            assert host is not None
            await host.wait_for(
                lambda: (
                    sum(s.kv.store.revision() for s in nodes[name].shards.values())
                    >= minimum_revision
                ),
                30,
            )

        clients: list[Client] = []

        def connect(*names: str) -> Client:
            clients.append(Client([ep(n) for n in names], timeout_s=30))
            return clients[-1]

        for n in "abc":
            await start(n, "new", founders)
        client = connect("c", "b", "a")
        try:
            for i in range(20):
                assert (await client.put(b"k%02d" % i, b"v%d" % i, f"w{i}")).succeeded
            # Status: each shard has exactly one leader, and every node agrees on the voters.
            statuses = [await client.status(ep(n)) for n in "abc"]
            for sid in range(1, SHARDS + 1):
                views = [next(s for s in st.shards if s.shard_id == sid) for st in statuses]
                assert sum(v.role == admin_pb2.ROLE_LEADER for v in views) == 1
                assert {tuple(v.voters) for v in views} == {
                    tuple(sorted(member_id("dkv-cluster", n) for n in "abc"))
                }
                assert all(v.applied_index <= v.commit_index <= v.last_index for v in views)
            assert statuses[0].name == "a" and statuses[0].db_size_bytes > 0

            members = await client.member_list()
            assert _ids(members) == {n: (False, [1, 2]) for n in "abc"}
            assert {m.name: m.peer_address for m in members} == founders

            # Add d as a learner. Ask a node that does not lead every shard, so at least one
            # shard's change is forwarded to its leader on another node.
            leaders = {s.shard_id: s.leader_id for s in statuses[0].shards}
            asked = next(
                (n for n in "abc" if set(leaders.values()) != {member_id("dkv-cluster", n)}),
            )
            added = await connect(asked).member_add("d", peers["d"])
            assert added.member.is_learner and list(added.member.shard_ids) == [1, 2]
            assert added.member.id == member_id("dkv-cluster", "d")
            # Repeating it is harmless (a change interrupted halfway is finished this way).
            again = await client.member_add("d", peers["d"])
            assert _ids(list(again.members))["d"] == (True, [1, 2])
            with pytest.raises(InvalidArgument, match="already exists"):
                await client.member_add("d", "127.0.0.1:1")
            with pytest.raises(InvalidArgument, match="not host:port"):
                await client.member_add("x", "nowhere")

            # A learner that never caught up is not promoted (it would weaken the quorum).
            await client.member_add("ghost", f"127.0.0.1:{free_port()}")
            ghost = member_id("dkv-cluster", "ghost")
            with pytest.raises(ConfChangeRejected, match="has not answered the leader"):
                await client.member_promote(ghost)
            await client.member_remove(ghost)
            assert "ghost" not in _ids(await client.member_list())

            # Start d: it joins with an empty data dir and catches up from the leaders.
            await start("d", "existing", peers)
            revision = sum(s.kv.store.revision() for s in nodes["a"].shards.values())
            await converged("d", revision)
            # The leaders' status shows when the learner caught up; then promote it.
            d_id = member_id("dkv-cluster", "d")
            leader_of = {s.shard_id: s.leader_id for s in statuses[0].shards}
            names = {member_id("dkv-cluster", n): n for n in "abc"}
            for sid, lid in leader_of.items():
                host = nodes[names[lid]].host
                assert host is not None
                await host.wait_for(
                    lambda h=host, sid=sid: (
                        h.groups[sid].node.status().progress[d_id].match
                        == h.groups[sid].node.status().last_index
                    ),
                    30,
                )
            views = {s.shard_id: s for s in (await client.status(ep(names[lid]))).shards}
            d_progress = [p for p in views[sid].peers if p.id == d_id]
            assert d_progress and d_progress[0].is_learner
            assert d_progress[0].match_index == views[sid].last_index
            await client.member_promote(d_id)
            assert _ids(await client.member_list()) == {n: (False, [1, 2]) for n in "abcd"}
            assert PROMOTE_LAG_MAX_ENTRIES > 0

            # Hand shard 1's leadership to d; writes go on.
            assert await client.transfer_leadership(1, d_id) == {1: d_id}
            assert (await client.put(b"after-transfer", b"x", "t1")).succeeded
            assert nodes["d"].host is not None and nodes["d"].host.leader(1) == d_id

            # Remove a: every shard drops it and the rest serve. (a itself may never hear of
            # its removal: the leader stops replicating to it once the change is applied.)
            a_id = member_id("dkv-cluster", "a")
            if nodes["a"].host is not None and nodes["a"].host.leader(2) != a_id:
                await client.transfer_leadership(2, a_id)
            await client.member_remove(a_id)
            assert set(_ids(await client.member_list())) == {"b", "c", "d"}
            for n in "bcd":
                assert all(a_id not in s.voters for s in (await client.status(ep(n))).shards)
            # A member that knows it was removed refuses to serve (reads would otherwise wait
            # for a leader that no longer talks to it, or be stale forever); clients move on.
            # a led shard 2 when removed, so it applied its own removal there.
            a_host = nodes["a"].host
            assert a_host is not None
            await a_host.wait_for(lambda: a_host.removed_from(2), 30)
            key = next(b"k%02d" % i for i in range(20) if shard_for_key(b"k%02d" % i, SHARDS) == 2)
            removed = connect("a")
            removed.timeout_s = 1
            with pytest.raises((NotLeader, ProposalDropped), match="removed from shard 2"):
                await removed.get(key, serializable=True)
            both = connect("a", "b")
            assert len((await both.get(key)).kvs) == 1
            await nodes.pop("a").stop()
            client = connect("d", "c", "b")
            assert (await client.put(b"after-remove", b"y", "r1")).succeeded

            # Snapshot on demand.
            snap = await client.snapshot(ep("d"))
            st = await client.status(ep("d"))
            assert {s.shard_id: s.snapshot_index for s in st.shards} == snap
            assert all(idx > 0 for idx in snap.values())

            # Restart b with the founders' --initial-cluster (which does not name d) and stop
            # c: the shards' quorum is now {b, d}, reachable only if b remembered d's address.
            await nodes.pop("b").stop()
            await nodes.pop("c").stop()
            await start("b", "existing", founders)
            client = connect("b", "d")
            assert (await client.put(b"after-restart", b"z", "s1")).succeeded
            got = await client.get(b"k07")
            assert [kv.value for kv in got.kvs] == [b"v7"]
        finally:
            for c in clients:
                await c.close()
            for node in nodes.values():
                await node.stop()

    asyncio.run(scenario())


def test_member_list_and_status_on_a_single_node(tmp_path: Path) -> None:
    async def scenario() -> None:
        node = Node(solo_config(tmp_path / "solo"))
        await node.start()
        client = Client([f"127.0.0.1:{node.client_port}"], timeout_s=20)
        try:
            put = await client.put(b"k", b"v")
            st = await client.status(f"127.0.0.1:{node.client_port}")
            assert [s.role for s in st.shards] == [admin_pb2.ROLE_LEADER]
            assert st.client_address == f"127.0.0.1:{node.client_port}"
            assert st.shards[0].revision == put.header.revision > 0
            with pytest.raises(ConfChangeRejected, match="last voter"):
                await client.member_remove(node.id)
            with pytest.raises(InvalidArgument, match="no other voter"):
                await client.transfer_leadership(1)
            with pytest.raises(InvalidArgument, match="not a member"):
                await client.member_promote(12345)
            with pytest.raises(InvalidArgument, match="does not exist"):
                await client.snapshot(f"127.0.0.1:{node.client_port}", 7)
            got = await client.range(kv_pb2.RangeRequest(key=b"k"))
            assert got.kvs[0].value == b"v"
        finally:
            await client.close()
            await node.stop()

    asyncio.run(scenario())


def test_nonsense_admin_requests_are_invalid_argument_naming_the_field(tmp_path: Path) -> None:
    """dkv.validation at the top of every Admin handler, on a real node: each refusal is
    INVALID_ARGUMENT naming the field, and nothing changed. Before, a peer port of 0 added a
    learner nobody can reach, ChangeShardMembership of member 0 was FAILED_PRECONDITION
    ('invalid node id 0') or, as a removal, OK."""
    C = admin_pb2.ChangeShardMembershipRequest
    ADD, REMOVE = admin_pb2.MEMBERSHIP_CHANGE_ADD_LEARNER, admin_pb2.MEMBERSHIP_CHANGE_REMOVE

    async def scenario() -> None:
        node = Node(solo_config(tmp_path / "solo", shards=SHARDS))
        await node.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{node.client_port}")
        client = Client([f"127.0.0.1:{node.client_port}"], timeout_s=20)

        async def admin(method: str, req: Any) -> Any:
            fn = channel.unary_unary(
                f"/dkv.v1.Admin/{method}",
                request_serializer=type(req).SerializeToString,
                response_deserializer=getattr(admin_pb2, f"{method}Response").FromString,
            )
            return await fn(req, timeout=10)

        async def refused(method: str, req: Any, words: str) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin(method, req)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value
            assert words in (info.value.details() or ""), info.value

        try:
            await client.member_list()  # every shard has its leader
            add = admin_pb2.MemberAddRequest
            await refused("MemberAdd", add(name="x", peer_address="h:0"), "peer_address 'h:0'")
            await refused("MemberAdd", add(name="x", peer_address="h:99999"), "port 1-65535")
            await refused("MemberAdd", add(peer_address="h:1"), "name ''")
            await refused("MemberPromote", admin_pb2.MemberPromoteRequest(), "id must be >= 1")
            await refused("MemberRemove", admin_pb2.MemberRemoveRequest(), "id must be >= 1")

            e = node.member_id_of("e")
            csm = "ChangeShardMembership"
            await refused(csm, C(member_id=e, change=REMOVE), "shard_id must be >= 1; got 0")
            bad_change = C(shard_id=1, change=99, member_id=e)  # type: ignore[arg-type]
            await refused(csm, bad_change, "change must be one of")
            await refused(csm, C(shard_id=1, change=REMOVE), "member_id must be >= 1")
            zero = C(shard_id=1, change=ADD, name="e", peer_address="127.0.0.1:1")
            await refused(csm, zero, "member_id must be >= 1; got 0")
            await refused(csm, C(shard_id=1, change=ADD, member_id=e, name="e"), "peer_address")
            await refused(csm, C(shard_id=1, change=ADD, member_id=e), "name must not be empty")
            wrong_id = C(shard_id=1, change=ADD, member_id=e + 1, name="e", peer_address="h:1")
            await refused(csm, wrong_id, f"not member_id {e + 1:x}")
            assert [m.name for m in await client.member_list()] == ["solo"]

            # What the node itself forwards still works: e in, e out (shard 1 only).
            good = C(shard_id=1, change=ADD, member_id=e, name="e", peer_address="h:1")
            assert list((await admin(csm, good)).learners) == [e]
            named = C(shard_id=1, change=REMOVE, member_id=e, name="e", peer_address="h:1")
            removed = await admin(csm, named)  # as the membership driver sends it
            assert list(removed.voters) == [node.id] and not removed.learners
        finally:
            await client.close()
            await channel.close()
            await node.stop()

    asyncio.run(scenario())
