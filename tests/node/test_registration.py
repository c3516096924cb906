"""Storage nodes register with the membership service and heartbeat their shard leaderships.

Three membership replicas and three storage nodes (2 shards) in one process, real gRPC on
127.0.0.1 and real RocksDB. The storage nodes start first, while membership is down: they keep
serving and join once it comes up. Then the cluster map must list them UP with their client
addresses, and its leader table must follow the shards' actual leaders (Host.leader/term),
also across a leadership transfer and the loss of the membership leader. Every wait is a
condition with a deadline; nothing sleeps to let things settle.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
from dkv_membership.server import MembershipConfig, MembershipServer
from dkv_membership.service import MEMBERSHIP_GROUP_ID
from dkv_node.node import Node, NodeConfig
from dkv_node.registration import Registration

from dkv.errors import InvalidArgument
from dkv.host import Host
from dkv.v1 import membership_pb2 as pb

M_NAMES = ("m1", "m2", "m3")
N_NAMES = ("a", "b", "c")
SHARDS = 2
WAIT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Re-check ``check`` until it holds; fail naming ``what`` after WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {WAIT_S} s: {what}")
        await asyncio.sleep(0.02)


def host_of(x: Node | MembershipServer) -> Host:
    assert x.host is not None
    return x.host


def reg(n: Node) -> Registration:
    assert n.registration is not None
    return n.registration


def test_nodes_register_and_report_leaders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dkv.node.registration")
    m_peers = {n: f"127.0.0.1:{free_port()}" for n in M_NAMES}
    m_clients = {n: f"127.0.0.1:{free_port()}" for n in M_NAMES}
    n_peers = {n: f"127.0.0.1:{free_port()}" for n in N_NAMES}

    def m_config(name: str) -> MembershipConfig:
        return MembershipConfig(
            name=name,
            data_dir=tmp_path / name,
            listen_peer=m_peers[name],
            listen_client=m_clients[name],
            initial_cluster=m_peers,
            tick_interval_ms=10,
        )

    async def scenario() -> None:
        nodes: dict[str, Node] = {}
        replicas: dict[str, MembershipServer] = {}
        channel = grpc.aio.insecure_channel(m_clients["m3"])  # the replica the test reads

        async def cluster_map() -> pb.ClusterMap | None:
            get_map = channel.unary_unary(
                "/dkv.v1.Membership/GetClusterMap",
                request_serializer=pb.GetClusterMapRequest.SerializeToString,
                response_deserializer=pb.GetClusterMapResponse.FromString,
            )
            try:
                resp = await get_map(pb.GetClusterMapRequest(), timeout=2)
            except grpc.aio.AioRpcError:  # an election under way
                return None
            m: pb.ClusterMap = resp.map
            return m

        async def map_matches() -> bool:
            """All nodes UP with their addresses; each shard's entry names its actual leader
            with that leader's term."""
            m = await cluster_map()
            if m is None:
                return False
            want_nodes = sorted(
                (n.id, n.cfg.name, n.advertise_peer, n.advertise_client, pb.NODE_STATE_UP)
                for n in nodes.values()
            )
            got_nodes = [(x.id, x.name, x.peer_address, x.client_address, x.state) for x in m.nodes]
            if got_nodes != want_nodes:
                return False
            by_id = {n.id: n for n in nodes.values()}
            any_host = host_of(nodes["a"])
            want_leaders = []
            for sid in range(1, SHARDS + 1):
                lid = any_host.leader(sid)
                if lid not in by_id or host_of(by_id[lid]).leader(sid) != lid:
                    return False  # no leader, or the nodes do not agree yet
                want_leaders.append((sid, lid, host_of(by_id[lid]).term(sid)))
            return [(e.shard_id, e.leader_id, e.term) for e in m.leaders] == want_leaders

        try:
            # Storage nodes first: membership is not there yet.
            for name in N_NAMES:
                node = Node(
                    NodeConfig(
                        name=name,
                        data_dir=tmp_path / f"node-{name}",
                        listen_peer=n_peers[name],
                        listen_client="127.0.0.1:0",
                        initial_cluster=n_peers,
                        shards=SHARDS,
                        tick_interval_ms=10,
                        membership=tuple(m_clients.values()),
                        heartbeat_interval_ms=100,
                    )
                )
                await node.start()
                nodes[name] = node
            for node in nodes.values():
                h = host_of(node)

                def led(h: Host = h) -> bool:
                    return all(h.leader(g) for g in range(1, SHARDS + 1))

                await h.wait_for(led, WAIT_S)

            async def join_failed() -> bool:
                return all(reg(n).join_failures > 0 for n in nodes.values())

            await eventually(join_failed, "every node tried to join and failed")
            assert not any(reg(n).joined for n in nodes.values())
            assert all(reg(n).running for n in nodes.values())
            # Logged once per state change, not once per attempt.
            failing = [r for r in caplog.records if "joining membership" in r.getMessage()]
            assert len(failing) == len(nodes), [r.getMessage() for r in failing]

            # Membership comes up: every node joins.
            for name in M_NAMES:
                s = MembershipServer(m_config(name))
                await s.start()
                replicas[name] = s

            async def all_joined() -> bool:
                return all(reg(n).joined for n in nodes.values())

            await eventually(all_joined, "every node joined")
            registered = [r for r in caplog.records if "registered with" in r.getMessage()]
            assert len(registered) == len(nodes)
            # Shards exist once the cluster is initialized (here by hand, on the leader).
            lid = 0

            async def has_leader() -> bool:
                nonlocal lid
                ids = {host_of(s).leader(MEMBERSHIP_GROUP_ID) for s in replicas.values()}
                lid = ids.pop() if len(ids) == 1 else 0
                return lid != 0

            await eventually(has_leader, "a membership leader")
            m_leader = next(n for n, s in replicas.items() if s.id == lid)
            svc = replicas[m_leader].service
            assert svc is not None
            init = pb.MembershipCommand(init_cluster=pb.InitClusterCommand(shard_count=SHARDS))
            assert (await svc.propose(init, 5)).accepted

            await eventually(map_matches, "map lists the nodes and the shards' leaders")

            # A leadership transfer: the map's leader entry follows.
            by_id = {n.id: n for n in nodes.values()}
            old = by_id[host_of(nodes["a"]).leader(1)]
            target = next(n for n in nodes.values() if n is not old)
            await host_of(old).transfer_leadership(1, target.id, WAIT_S)
            await eventually(map_matches, "leader entry of shard 1 follows the transfer")
            m = await cluster_map()
            assert m is not None and m.leaders[0].leader_id == target.id

            # The membership leader stops: heartbeats go on to the new leader.
            if m_leader == "m3":  # read from a replica that stays
                await channel.close()
                channel = grpc.aio.insecure_channel(m_clients["m1"])
            await replicas.pop(m_leader).stop()
            base = {n.id: reg(n).heartbeats_ok for n in nodes.values()}

            async def beats_continue() -> bool:
                return all(reg(n).heartbeats_ok >= base[n.id] + 3 for n in nodes.values())

            await eventually(beats_continue, "heartbeats reach the new membership leader")
            new_lid = host_of(next(iter(replicas.values()))).leader(MEMBERSHIP_GROUP_ID)
            assert new_lid in {s.id for s in replicas.values()}

            # ... and the leader table still follows the shards.
            old = by_id[host_of(nodes["a"]).leader(2)]
            target = next(n for n in nodes.values() if n is not old)
            await host_of(old).transfer_leadership(2, target.id, WAIT_S)
            await eventually(map_matches, "leader entry of shard 2 follows, new leader")
            assert all(reg(n).joins == 1 for n in nodes.values())  # never had to re-register
        finally:
            await channel.close()
            for n in nodes.values():
                await n.stop(grace_s=0)
            for s in replicas.values():
                await s.stop(grace_s=0)
        # Stopping the node stopped its registration first.
        assert all(n.registration is None for n in nodes.values())

    asyncio.run(scenario())


def test_registration_refuses_bad_arguments() -> None:
    me = pb.Node(id=1, name="a", peer_address="x:1", client_address="x:2")

    async def scenario() -> None:
        with pytest.raises(InvalidArgument, match="at least one membership endpoint"):
            Registration([], me, list)
        with pytest.raises(InvalidArgument, match="interval"):
            Registration(["x:1"], me, list, interval_s=0)
        with pytest.raises(InvalidArgument, match="id"):
            Registration(["x:1"], pb.Node(name="a"), list)

    asyncio.run(scenario())
