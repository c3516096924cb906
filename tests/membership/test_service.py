"""The membership service: three replicas in one process, real gRPC on 127.0.0.1 (peer mTLS),
real RocksDB.

Judged by comparing ClusterMap protos and versions: what every replica answers (linearizable
reads), what a watcher rebuilds from the full map plus deltas, and what a restarted replica
rebuilds from its snapshot and log. Nothing sleeps to let things settle: every wait is on an
event or a condition with a deadline (``Host.wait_for``, the next stream message).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from dkv_membership.server import MembershipConfig, MembershipServer
from dkv_membership.service import MEMBERSHIP_GROUP_ID

from dkv.host import Host
from dkv.host.channels import TlsFiles
from dkv.security import PkiLayout, write_dev_pki
from dkv.v1 import membership_pb2 as pb

NAMES = ("m1", "m2", "m3")
GID = MEMBERSHIP_GROUP_ID
WAIT_S = 20.0
UP, DOWN, LEAVING = pb.NODE_STATE_UP, pb.NODE_STATE_DOWN, pb.NODE_STATE_LEAVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node(nid: int, zone: str = "z1") -> pb.Node:
    return pb.Node(
        id=nid,
        name=f"n{nid}",
        peer_address=f"10.0.0.{nid}:2380",
        client_address=f"10.0.0.{nid}:2379",
        zone=zone,
        labels={"rack": f"r{nid % 2}"},
    )


class Stub:
    """Typed-enough calls to one replica's client port."""

    def __init__(self, server: MembershipServer) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.client_port}")

    async def unary(self, method: str, req: Any, resp_type: Any) -> Any:
        fn = self.channel.unary_unary(
            f"/dkv.v1.Membership/{method}",
            request_serializer=type(req).SerializeToString,
            response_deserializer=resp_type.FromString,
        )
        return await fn(req, timeout=10)

    def watch(self, from_version: int) -> Any:
        fn = self.channel.unary_stream(
            "/dkv.v1.Membership/WatchClusterMap",
            request_serializer=pb.WatchClusterMapRequest.SerializeToString,
            response_deserializer=pb.WatchClusterMapResponse.FromString,
        )
        return fn(pb.WatchClusterMapRequest(from_version=from_version))

    async def join(self, n: pb.Node) -> pb.JoinNodeResponse:
        resp: pb.JoinNodeResponse = await self.unary(
            "JoinNode", pb.JoinNodeRequest(node=n), pb.JoinNodeResponse
        )
        return resp

    async def cluster_map(self) -> pb.ClusterMap:
        resp = await self.unary(
            "GetClusterMap", pb.GetClusterMapRequest(), pb.GetClusterMapResponse
        )
        m: pb.ClusterMap = resp.map
        return m

    async def close(self) -> None:
        await self.channel.close()


class Watcher:
    """Keeps a client-side map up to date from a WatchClusterMap stream, as a gateway would."""

    def __init__(self, stub: Stub, from_version: int = 0, have: pb.ClusterMap | None = None):
        self.call = stub.watch(from_version)
        self.stream: AsyncIterator[pb.WatchClusterMapResponse] = self.call.__aiter__()
        self.map = pb.ClusterMap()
        if have is not None:
            self.map.CopyFrom(have)
        self.messages: list[pb.WatchClusterMapResponse] = []

    async def next(self) -> pb.WatchClusterMapResponse:
        msg = await asyncio.wait_for(self.stream.__anext__(), WAIT_S)
        self.messages.append(msg)
        self._apply(msg)
        return msg

    def _apply(self, msg: pb.WatchClusterMapResponse) -> None:
        if msg.full:
            self.map.CopyFrom(msg.map)
            return
        assert msg.version > self.map.version, "a delta must move the map forward"
        nodes = {n.id: n for n in self.map.nodes}
        nodes.update({n.id: n for n in msg.nodes})
        for nid in msg.removed_node_ids:
            del nodes[nid]
        shards = {s.id: s for s in self.map.shards}
        shards.update({s.id: s for s in msg.shards})
        leaders = {e.shard_id: e for e in self.map.leaders}
        leaders.update({e.shard_id: e for e in msg.leaders})
        out = pb.ClusterMap(version=msg.version)
        out.nodes.extend(nodes[k] for k in sorted(nodes))
        out.shards.extend(shards[k] for k in sorted(shards))
        out.slot_ranges.extend(msg.slot_ranges or self.map.slot_ranges)
        out.leaders.extend(leaders[k] for k in sorted(leaders))
        self.map = out

    def cancel(self) -> None:
        self.call.cancel()


def visible(m: pb.ClusterMap) -> pb.ClusterMap:
    """The map as watchers see it: heartbeat times are leader-internal (never a new version)."""
    out = pb.ClusterMap()
    out.CopyFrom(m)
    for n in out.nodes:
        n.ClearField("last_heartbeat_unix_ms")
    return out


class Cluster:
    def __init__(
        self, tmp_path: Path, clock: Callable[[], int] | None = None, **overrides: Any
    ) -> None:
        pki = PkiLayout(tmp_path / "pki")
        write_dev_pki(pki.directory, [("membership", n) for n in NAMES])
        peers = {n: f"localhost:{free_port()}" for n in NAMES}
        self.configs = {
            n: MembershipConfig(
                name=n,
                data_dir=tmp_path / n,
                listen_peer=peers[n].replace("localhost", "127.0.0.1"),
                listen_client="127.0.0.1:0",
                initial_cluster=peers,
                peer_tls=TlsFiles(str(pki.cert(n)), str(pki.key(n)), str(pki.ca_cert)),
                tick_interval_ms=10,
                # Small, so that restarts rebuild from a snapshot plus the log after it.
                snapshot_count=4,
                snapshot_catchup_entries=2,
                change_log_max=3,
                **overrides,
            )
            for n in NAMES
        }
        self.clock = clock
        self.servers: dict[str, MembershipServer] = {}
        self.stubs: dict[str, Stub] = {}

    async def start(self, name: str, state: str = "new") -> MembershipServer:
        cfg = self.configs[name]
        if state != cfg.initial_cluster_state:
            cfg = MembershipConfig(**{**cfg.__dict__, "initial_cluster_state": state})
        s = MembershipServer(cfg) if self.clock is None else MembershipServer(cfg, self.clock)
        await s.start()
        self.servers[name] = s
        self.stubs[name] = Stub(s)
        return s

    async def stop(self, name: str) -> None:
        await self.servers.pop(name).stop()
        await self.stubs.pop(name).close()

    async def close(self) -> None:
        for name in list(self.servers):
            await self.stop(name)

    @staticmethod
    def host(s: MembershipServer) -> Host:
        assert s.host is not None
        return s.host

    async def leader(self) -> str:
        """The replica every running replica agrees leads (waits for it)."""
        servers = list(self.servers.values())

        def agreed() -> bool:
            ids = {self.host(s).leader(GID) for s in servers}
            return len(ids) == 1 and 0 not in ids and ids <= {s.id for s in servers}

        for s in servers:
            await self.host(s).wait_for(agreed, WAIT_S)
        lid = self.host(servers[0]).leader(GID)
        return next(n for n, s in self.servers.items() if s.id == lid)

    async def converged(self) -> pb.ClusterMap:
        """Wait until every running replica applied the same map; return it."""
        servers = list(self.servers.values())

        def same() -> bool:
            maps = [s.sm.cluster_map() for s in servers if s.sm is not None]
            return all(m == maps[0] for m in maps)

        for s in servers:
            await self.host(s).wait_for(same, WAIT_S)
        sm = servers[0].sm
        assert sm is not None
        return sm.cluster_map()


async def expect_status(coro: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() is code, info.value
    return info.value


def test_three_replicas_serve_membership(tmp_path: Path) -> None:
    async def scenario() -> None:
        c = Cluster(tmp_path)
        try:
            for n in NAMES:
                await c.start(n)
            lname = await c.leader()
            leader = c.stubs[lname]
            followers = [n for n in NAMES if n != lname]

            # A watcher on a follower from 0: the whole (empty) map first.
            w = Watcher(c.stubs[followers[0]], 0)
            first = await w.next()
            assert first.full and first.version == 0 and first.map == pb.ClusterMap()

            # Bad input: INVALID_ARGUMENT naming the problem, nothing proposed.
            bad = node(1)
            bad.name = ""
            err = await expect_status(leader.join(bad), grpc.StatusCode.INVALID_ARGUMENT)
            assert "node.name must not be empty" in (err.details() or "")
            err = await expect_status(
                leader.join(pb.Node(name="x", peer_address="a:1", client_address="a:2")),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert "node.id must be >= 1; got 0" in (err.details() or "")
            err = await expect_status(
                leader.unary(
                    "Heartbeat",
                    pb.HeartbeatRequest(
                        node_id=1, leaders=[pb.LeaderEntry(shard_id=1, leader_id=2, term=3)]
                    ),
                    pb.HeartbeatResponse,
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert "reports only the shards it leads" in (err.details() or "")
            assert all(s.sm is not None and s.sm.version == 0 for s in c.servers.values())

            # A follower does not propose: UNAVAILABLE with the leader's id, name and address.
            err = await expect_status(
                c.stubs[followers[1]].join(node(1)), grpc.StatusCode.UNAVAILABLE
            )
            md = dict(err.trailing_metadata() or ())
            ls = c.servers[lname]
            assert md["dkv-leader-id"] == str(ls.id)
            assert md["dkv-leader-name"] == lname
            assert md["dkv-leader-address"] == f"127.0.0.1:{ls.client_port}"

            # Nodes join one at a time; the watcher sees one delta per version.
            for nid in (1, 2, 3):
                resp = await leader.join(node(nid))
                assert resp.version == nid and resp.node.state == UP
                assert resp.node.name == f"n{nid}"
                d = await w.next()
                assert not d.full and d.version == nid
                assert [n.id for n in d.nodes] == [nid] and not d.removed_node_ids
            # Joining again with the same id and name changes nothing (no new version).
            assert (await leader.join(node(2))).version == 3
            # Another id under a taken name: FAILED_PRECONDITION with the reason.
            taken = node(9)
            taken.name = "n1"
            err = await expect_status(leader.join(taken), grpc.StatusCode.FAILED_PRECONDITION)
            assert "registered by node 1" in (err.details() or "")

            # Every replica answers ListNodes linearizably: ids and addresses, in id order.
            for n in NAMES:
                got = await c.stubs[n].unary(
                    "ListNodes", pb.ListNodesRequest(), pb.ListNodesResponse
                )
                assert got.version == 3
                assert [(x.id, x.peer_address, x.client_address, x.state) for x in got.nodes] == [
                    (i, f"10.0.0.{i}:2380", f"10.0.0.{i}:2379", UP) for i in (1, 2, 3)
                ]

            # Heartbeats keep nodes UP and are not changes of the map.
            for nid in (1, 2, 3):
                hb = await leader.unary(
                    "Heartbeat", pb.HeartbeatRequest(node_id=nid), pb.HeartbeatResponse
                )
                assert hb.version == 3
            err = await expect_status(
                leader.unary("Heartbeat", pb.HeartbeatRequest(node_id=42), pb.HeartbeatResponse),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert "register it first" in (err.details() or "")
            # Leader reports ride on heartbeats once shards exist (created here directly).
            init = pb.MembershipCommand(
                init_cluster=pb.InitClusterCommand(
                    shard_count=2,
                    shards=[pb.Shard(id=1, voters=[1, 2, 3]), pb.Shard(id=2, voters=[2, 3, 1])],
                )
            )
            assert c.servers[lname].service is not None
            await c.servers[lname].service.propose(init, 5)
            d = await w.next()
            assert d.version == 4 and [s.id for s in d.shards] == [1, 2] and d.slot_ranges
            hb = await leader.unary(
                "Heartbeat",
                pb.HeartbeatRequest(node_id=2, leaders=[pb.LeaderEntry(shard_id=2, term=7)]),
                pb.HeartbeatResponse,
            )
            assert hb.version == 5
            d = await w.next()
            assert d.version == 5 and list(d.leaders) == [
                pb.LeaderEntry(shard_id=2, leader_id=2, term=7)
            ]
            m = await leader.cluster_map()
            assert all(n.state == UP for n in m.nodes)
            assert visible(w.map) == visible(m)

            # A watcher that reconnects with its last version gets exactly what it missed.
            w.cancel()
            seen = w.map
            await leader.unary("LeaveNode", pb.LeaveNodeRequest(node_id=3), pb.LeaveNodeResponse)
            await leader.join(node(4))
            await leader.unary(
                "Heartbeat",
                pb.HeartbeatRequest(node_id=1, leaders=[pb.LeaderEntry(shard_id=1, term=8)]),
                pb.HeartbeatResponse,
            )
            # Followers learn a commit from the leader's next append or heartbeat: wait until
            # they applied it, then the one delta holds all three changes.
            await c.converged()
            w = Watcher(c.stubs[followers[1]], seen.version, have=seen)
            d = await w.next()
            assert not d.full and d.version == 8
            assert [n.id for n in d.nodes] == [3, 4] and d.nodes[0].state == LEAVING
            assert [e.shard_id for e in d.leaders] == [1]
            assert not d.shards and not d.slot_ranges and not d.removed_node_ids
            m = await leader.cluster_map()
            assert visible(w.map) == visible(m)
            # From a version the change log no longer reaches (it keeps 3): the whole map.
            old = Watcher(c.stubs[followers[0]], 2)
            full = await old.next()
            assert full.full and full.version == 8 and full.map == m
            old.cancel()
            # From a version this replica never reaches (another cluster's): after waiting
            # for it a while, the whole map.
            svc = c.servers[followers[0]].service
            assert svc is not None
            svc.watch_future_wait_s = 0.2
            future = Watcher(c.stubs[followers[0]], 99)
            full = await future.next()
            assert full.full and full.version == 8
            future.cancel()

            # The map survives stopping the leader.
            before = await c.converged()
            on_leader = Watcher(leader, 0)
            assert (await on_leader.next()).map == before
            applied_before = c.host(c.servers[lname]).written_applied(GID)
            await c.stop(lname)
            # A watch on the stopped replica ends cleanly (status OK).
            with pytest.raises(StopAsyncIteration):
                await on_leader.next()
            assert await on_leader.call.code() is grpc.StatusCode.OK
            new_lname = await c.leader()
            assert new_lname != lname
            assert await c.stubs[new_lname].cluster_map() == before
            # The stopped replica restarts and rebuilds the same map from snapshot + log.
            restarted = await c.start(lname, state="existing")
            h = c.host(restarted)
            assert h.groups[GID].storage.snapshot().metadata.index > 0
            await h.wait_for(lambda: h.written_applied(GID) >= applied_before, WAIT_S)
            assert restarted.sm is not None
            assert restarted.sm.cluster_map() == before
            # A linearizable read there needs a known leader (before: UNAVAILABLE, retry-safe).
            assert await c.leader() == new_lname
            assert await c.stubs[lname].cluster_map() == before
            # The new leader takes writes; every replica and the watcher follow.
            resp = await c.stubs[new_lname].join(node(5))
            assert resp.version == before.version + 1
            d = await w.next()
            assert d.version == resp.version and [n.id for n in d.nodes] == [5]
            after = await c.converged()
            assert visible(w.map) == visible(after)
            assert after.version == before.version + 1
            w.cancel()
        finally:
            await c.close()

    asyncio.run(scenario())


def test_leader_marks_silent_nodes_down(tmp_path: Path) -> None:
    """down_after_ms: judged by the leader's (here: a fake) clock at proposal time; a
    heartbeat brings the node back UP. Each change is one version, seen by a watcher."""
    now = [1_000_000]

    async def scenario() -> None:
        c = Cluster(tmp_path, lambda: now[0], down_after_ms=1000, down_check_interval_ms=10)
        try:
            for n in NAMES:
                await c.start(n)
            lname = await c.leader()
            leader = c.stubs[lname]
            svc = c.servers[lname].service
            assert svc is not None
            # The leader's grace period starts at its first detection round.
            await c.host(c.servers[lname]).wait_for(
                lambda: svc.leading_since_ms is not None, WAIT_S
            )
            await leader.join(node(1))
            await leader.join(node(2))
            await c.converged()  # the follower learns the commit with the next heartbeat
            w = Watcher(c.stubs[next(n for n in NAMES if n != lname)], 0)
            assert (await w.next()).version == 2
            now[0] += 500
            beat = pb.HeartbeatRequest(node_id=2)
            assert (await leader.unary("Heartbeat", beat, pb.HeartbeatResponse)).version == 2
            now[0] += 600  # node 1 silent for 1100 ms, node 2 for 600 ms
            d = await w.next()
            assert d.version == 3 and [(n.id, n.state) for n in d.nodes] == [(1, DOWN)]
            m = await leader.cluster_map()
            assert [(n.id, n.state) for n in m.nodes] == [(1, DOWN), (2, UP)]
            assert m.nodes[0].last_heartbeat_unix_ms == 1_000_000
            # A heartbeat brings it back.
            beat = pb.HeartbeatRequest(node_id=1)
            assert (await leader.unary("Heartbeat", beat, pb.HeartbeatResponse)).version == 4
            d = await w.next()
            assert d.version == 4 and [(n.id, n.state) for n in d.nodes] == [(1, UP)]
            assert visible(w.map) == visible(await c.converged())
            w.cancel()
        finally:
            await c.close()

    asyncio.run(scenario())


def test_refuses_a_data_dir_it_does_not_own(tmp_path: Path) -> None:
    from dkv.errors import DataDirError

    async def scenario() -> None:
        c = Cluster(tmp_path)
        await c.start("m1")
        await c.stop("m1")
        foreign = MembershipConfig(**{**c.configs["m2"].__dict__, "data_dir": tmp_path / "m1"})
        with pytest.raises(DataDirError, match="belongs to"):
            await MembershipServer(foreign).start()
        # Its own data dir still opens (the refusals closed what they opened).
        await c.start("m1", state="existing")
        await c.close()

    asyncio.run(scenario())


def test_nonsense_membership_requests_are_invalid_argument_naming_the_field(
    tmp_path: Path,
) -> None:
    """dkv.validation at the top of every Membership handler, on one real replica: each refusal
    is INVALID_ARGUMENT naming the field, and nothing was proposed. Before, a node registered
    with addresses nobody can dial ('nowhere', port 0), a heartbeat could report one shard
    twice, AddReplica with port 0 added a learner and then timed out, and RemoveReplica of ''
    answered OK."""

    async def scenario() -> None:
        peer = f"127.0.0.1:{free_port()}"
        cfg = MembershipConfig(
            name="m1",
            data_dir=tmp_path / "m1",
            listen_peer=peer,
            listen_client="127.0.0.1:0",
            initial_cluster={"m1": peer},
            tick_interval_ms=10,
        )
        server = MembershipServer(cfg)
        await server.start()
        stub = Stub(server)
        host = Cluster.host(server)
        try:
            await host.wait_for(lambda: host.leader(GID) == server.id, WAIT_S)

            async def refused(method: str, req: Any, resp: Any, words: str) -> None:
                err = await expect_status(
                    stub.unary(method, req, resp), grpc.StatusCode.INVALID_ARGUMENT
                )
                assert words in (err.details() or ""), err

            join, join_resp = pb.JoinNodeRequest, pb.JoinNodeResponse
            bad = node(1)
            bad.peer_address = "nowhere"
            await refused("JoinNode", join(node=bad), join_resp, "node.peer_address 'nowhere'")
            bad = node(1)
            bad.client_address = "10.0.0.1:0"
            await refused("JoinNode", join(node=bad), join_resp, "node.client_address")
            await refused("JoinNode", join(), join_resp, "node is required")
            await refused(
                "LeaveNode", pb.LeaveNodeRequest(), pb.LeaveNodeResponse, "node_id must be >= 1"
            )
            twice = pb.HeartbeatRequest(
                node_id=1,
                leaders=[pb.LeaderEntry(shard_id=1, term=2), pb.LeaderEntry(shard_id=1, term=3)],
            )
            await refused("Heartbeat", twice, pb.HeartbeatResponse, "leaders[1].shard_id 1")
            zero_term = pb.HeartbeatRequest(node_id=1, leaders=[pb.LeaderEntry(shard_id=1)])
            await refused("Heartbeat", zero_term, pb.HeartbeatResponse, "leaders[0].term")
            add = pb.AddReplicaRequest(name="m2", peer_address="127.0.0.1:0")
            await refused("AddReplica", add, pb.AddReplicaResponse, "peer_address '127.0.0.1:0'")
            await refused(
                "RemoveReplica", pb.RemoveReplicaRequest(), pb.RemoveReplicaResponse, "name must"
            )
            assert server.sm is not None and server.sm.version == 0
            conf = host.groups[GID].storage.conf_state
            assert list(conf.voters) == [server.id] and not conf.learners

            # What a node registers and reports is still accepted.
            assert (await stub.join(node(1))).version == 1
            beat = pb.HeartbeatRequest(node_id=1, leaders=[pb.LeaderEntry(shard_id=1, term=2)])
            assert (await stub.unary("Heartbeat", beat, pb.HeartbeatResponse)).version == 1
        finally:
            await stub.close()
            await server.stop()

    asyncio.run(scenario())
