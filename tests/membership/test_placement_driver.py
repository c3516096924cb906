"""The placement driver with real nodes: bootstrap from membership, moves onto a new node,
draining a leaving node.

One membership replica (driver on) and managed storage nodes (no --initial-cluster) in one
process, real gRPC on 127.0.0.1 and real RocksDB. Judged by the map, by what each node really
hosts (its Raft groups and their configurations), and by the data: every acknowledged write
is read back linearizably after the moves.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
from dkv_membership.driver import DriverConfig
from dkv_membership.server import MembershipConfig, MembershipServer
from dkv_node.node import Node, NodeConfig
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dkv.client import Client
from dkv.errors import ConfChangeRejected
from dkv.v1 import kv_pb2
from dkv.v1 import membership_pb2 as pb

SHARDS = 4
WAIT_S = 30.0


async def eventually(
    check: Callable[[], bool],
    what: str,
    timeout_s: float = WAIT_S,
    on_fail: Callable[[], str] = lambda: "",
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {timeout_s} s: {what} {on_fail()}")
        await asyncio.sleep(0.02)


class Watches:
    """One shard-scoped watch of the whole key space per (node, shard), each drained by a task
    whose result says how its stream ended."""

    def __init__(self) -> None:
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: dict[tuple[str, int], asyncio.Task[str]] = {}

    async def close(self) -> None:
        for t in self.tasks.values():
            t.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for ch in self.channels:
            await ch.close()


async def open_watches(nodes: list[Node]) -> Watches:
    w = Watches()
    for n in nodes:
        ch = grpc.aio.insecure_channel(n.advertise_client)
        w.channels.append(ch)
        watch = ch.unary_stream(
            "/dkv.v1.KV/Watch",
            request_serializer=kv_pb2.WatchRequest.SerializeToString,
            response_deserializer=kv_pb2.WatchResponse.FromString,
        )
        for sid in sorted(n.shards):
            call = watch(
                kv_pb2.WatchRequest(key=b"\x00", range_end=b"\x00", shard_id=sid, start_revision=0)
            )

            async def drain(call: object = call) -> str:
                try:
                    async for _ in call:  # type: ignore[attr-defined]
                        pass
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
                return "ended"

            w.tasks[(n.cfg.name, sid)] = asyncio.get_running_loop().create_task(drain())
    return w


class Fixture:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.m: MembershipServer | None = None
        self.nodes: dict[str, Node] = {}

    async def start_membership(self, replace_down_after_ms: int = 0) -> None:
        self.m = MembershipServer(
            MembershipConfig(
                name="m1",
                data_dir=self.root / "m1",
                listen_peer="127.0.0.1:0",
                listen_client="127.0.0.1:0",
                initial_cluster={"m1": "127.0.0.1:1"},  # one replica: never dialled
                tick_interval_ms=10,
                down_after_ms=400,
                down_check_interval_ms=50,
                driver=DriverConfig(
                    shard_count=SHARDS,
                    replication=3,
                    interval_ms=50,
                    replace_down_after_ms=replace_down_after_ms,
                ),
            )
        )
        await self.m.start()

    @property
    def membership_address(self) -> str:
        assert self.m is not None
        return f"127.0.0.1:{self.m.client_port}"

    async def start_node(self, name: str) -> Node:
        n = Node(
            NodeConfig(
                name=name,
                data_dir=self.root / name,
                listen_peer="127.0.0.1:0",
                listen_client="127.0.0.1:0",
                initial_cluster={},
                membership=(self.membership_address,),
                heartbeat_interval_ms=100,
                tick_interval_ms=10,
            )
        )
        await n.start()
        self.nodes[name] = n
        return n

    @property
    def state(self) -> object:
        assert self.m is not None and self.m.sm is not None
        return self.m.sm.state

    def shards(self) -> dict[int, pb.Shard]:
        assert self.m is not None and self.m.sm is not None
        return dict(self.m.sm.state.shards)

    def leader_of(self, sid: int) -> Node | None:
        for n in self.nodes.values():
            assert n.host is not None
            if sid in n.host.groups and n.host.leader(sid) == n.id:
                return n
        return None

    def settled(self) -> bool:
        """The map equals the driver's plan, no learners left, every node hosts exactly the
        shards the map gives it, and each shard's Raft voters (at its leader) are the map's."""
        assert self.m is not None and self.m.driver is not None
        shards = self.shards()
        if len(shards) != SHARDS:
            return False
        plan = self.m.driver.plan()
        for sid, s in shards.items():
            if s.learners or set(s.voters) != set(plan.get(sid, ())):
                return False
            lead = self.leader_of(sid)
            if lead is None or lead.host is None:
                return False
            if set(lead.host.groups[sid].storage.conf_state.voters) != set(s.voters):
                return False
        for n in self.nodes.values():
            want = {sid for sid, s in shards.items() if n.id in s.voters}
            if set(n.shards) != want:
                return False
        return True

    def describe(self) -> str:
        """The map's nodes and shards, for a failure message."""
        if self.m is None or self.m.sm is None:
            return "membership stopped"
        st = self.m.sm.state
        nodes = {n.id: (n.name, n.state) for n in st.nodes.values()}
        shards = {
            s.id: ([nodes[v][0] for v in s.voters], list(s.learners)) for s in st.shards.values()
        }
        return f"nodes {sorted(nodes.values())}; shards (voters, learners) {shards}"

    def client(self) -> Client:
        return Client([n.advertise_client for n in self.nodes.values()], timeout_s=10)

    async def stop(self) -> None:
        for n in self.nodes.values():
            await n.stop()
        if self.m is not None:
            await self.m.stop()


def test_cluster_boots_from_membership_and_moves_replicas_onto_a_new_node(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        f = Fixture(tmp_path)
        await f.start_membership()
        try:
            await f.start_node("a")
            await f.start_node("b")
            # Two nodes are fewer than the replication factor: no cluster yet.
            await eventually(lambda: len(f.m.sm.state.nodes) == 2, "a and b registered")  # type: ignore[union-attr]
            assert not f.shards()
            await f.start_node("c")
            await eventually(f.settled, "cluster initialized on a, b, c")
            assert all(set(n.shards) == set(range(1, SHARDS + 1)) for n in f.nodes.values())
            assert all(s.epoch == 1 for s in f.shards().values())

            async with f.client() as client:
                written = {}
                for i in range(40):
                    key = b"key-%03d" % i
                    resp = await client.put(key, b"v%d" % i)
                    written[key] = (b"v%d" % i, resp.header.revision)

            # A watch of every shard at every node: when a shard moves away from a node, that
            # node's watch of it must end (cleanly, so the client resumes elsewhere) instead
            # of hanging on a group that no longer exists there.
            watches = await open_watches(list(f.nodes.values()))
            d = await f.start_node("d")
            await eventually(
                lambda: any(d.id in s.voters for s in f.shards().values()) and f.settled(),
                "replicas moved onto d and placement settled",
                on_fail=f.describe,
            )
            # The leader's driver counted the moves it saw finish, and none is left in flight.
            assert f.m is not None and f.m.driver is not None
            driver = f.m.driver
            await eventually(lambda: driver.moves_in_flight == 0, "no move in flight")
            text = generate_latest(f.m.metrics.registry).decode()
            placement = {
                s.name: s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name.startswith("dkv_membership_placement_")
            }
            assert placement["dkv_membership_placement_moves_in_flight"] == 0
            assert placement["dkv_membership_placement_moves_completed_total"] >= 1
            try:
                await eventually(
                    lambda: all(
                        w.done() == (sid not in f.nodes[name].shards)
                        for (name, sid), w in watches.tasks.items()
                    ),
                    "watches of moved shards ended, the others still open",
                    on_fail=lambda: str(
                        {
                            k: (w.done(), k[1] in f.nodes[k[0]].shards)
                            for k, w in watches.tasks.items()
                        }
                    ),
                )
                for (name, sid), w in watches.tasks.items():
                    if w.done():
                        assert w.result() == "ended", (name, sid, w.result())
            finally:
                await watches.close()
            load = {n.cfg.name: len(n.shards) for n in f.nodes.values()}
            cap = math.ceil(1.25 * SHARDS * 3 / 4)
            assert all(1 <= c <= cap for c in load.values()), load
            assert sum(load.values()) == SHARDS * 3
            assert all(len(s.voters) == 3 for s in f.shards().values())
            # A node that lost a shard dropped its data: only its own shards' groups remain.
            for n in f.nodes.values():
                assert n.host is not None
                assert set(n.host.groups) == set(n.shards)

            async with f.client() as client:
                for key, (value, _rev) in written.items():
                    got = await client.get(key)
                    assert [kv.value for kv in got.kvs] == [value], key

            # Draining: d leaves, its replicas move back, then it is removed from the map.
            # (First: with a, b and c, draining one of them would leave too few nodes for
            # 3 replicas; that drain waits, nothing moves, see below.)
            assert f.m is not None and f.m.service is not None
            out = await f.m.service.propose(
                pb.MembershipCommand(leave=pb.LeaveCommand(node_id=d.id)), 5.0
            )
            assert out.accepted
            await eventually(
                lambda: d.id not in f.m.sm.state.nodes and not d.shards,  # type: ignore[union-attr]
                "d drained and removed from the map",
                on_fail=lambda: f"{f.describe()}; d hosts {sorted(d.shards)}",
            )
            # d is still running: its registration is refused now, it gets nothing back.
            assert d.registration is not None
            await eventually(
                lambda: d.registration is not None and d.registration.join_failures > 0,
                "d's registration refused",
            )
            assert d.id not in f.m.sm.state.nodes and not d.shards
            del f.nodes["d"]
            await d.stop()
            await eventually(f.settled, "placement settled on a, b, c")
            c = f.nodes["c"]
            out = await f.m.service.propose(
                pb.MembershipCommand(leave=pb.LeaveCommand(node_id=c.id)), 5.0
            )
            assert out.accepted
            passes = f.m.driver.passes if f.m.driver is not None else 0
            await eventually(
                lambda: (
                    f.m is not None and f.m.driver is not None and f.m.driver.passes > passes + 20
                ),
                "driver ran 20 more passes",
            )
            assert all(len(s.voters) == 3 and c.id in s.voters for s in f.shards().values())
            assert f.m.sm is not None and c.id in f.m.sm.state.nodes
            async with f.client() as client:
                for key, (value, _rev) in written.items():
                    got = await client.get(key)
                    assert [kv.value for kv in got.kvs] == [value], key
        finally:
            await f.stop()

    asyncio.run(scenario())


def test_managed_node_restart_serves_its_shards_from_disk(tmp_path: Path) -> None:
    """A restarted managed node hosts its shards again from what it persisted, before it
    hears from membership, and the cluster keeps its data."""

    async def scenario() -> None:
        f = Fixture(tmp_path)
        await f.start_membership()
        try:
            for name in ("a", "b", "c"):
                await f.start_node(name)
            await eventually(f.settled, "cluster initialized")
            async with f.client() as client:
                await client.put(b"k", b"v1")
                # Hand-made member changes would fight the placement driver: refused.
                with pytest.raises(ConfChangeRejected, match="placed by the membership"):
                    await client.member_add("x", "127.0.0.1:1")
            a = f.nodes.pop("a")
            hosted = set(a.shards)
            await a.stop()
            assert f.m is not None
            await f.m.stop()  # membership down: a must come back from its own disk
            f.m = None
            a2 = Node(a.cfg)
            await a2.start()
            f.nodes["a"] = a2
            assert set(a2.shards) == hosted
            async with f.client() as client:
                got = await client.get(b"k")
                assert [kv.value for kv in got.kvs] == [b"v1"]
        finally:
            await f.stop()

    asyncio.run(scenario())


def test_replicas_of_a_node_down_too_long_are_recreated_elsewhere(tmp_path: Path) -> None:
    """Four nodes; one dies for good. Once DOWN longer than replace_down_after_ms, its
    replicas are added elsewhere and it is removed from every shard, with no data lost. With
    only three nodes, a dead node keeps its replicas (nowhere else to put them)."""

    async def scenario() -> None:
        f = Fixture(tmp_path)
        await f.start_membership(replace_down_after_ms=300)
        try:
            for name in ("a", "b", "c"):
                await f.start_node(name)
            await eventually(f.settled, "cluster initialized")
            async with f.client() as client:
                for i in range(20):
                    await client.put(b"k%d" % i, b"v%d" % i)
            d = await f.start_node("d")
            await eventually(
                lambda: any(d.id in s.voters for s in f.shards().values()) and f.settled(),
                "replicas moved onto d",
            )
            del f.nodes["d"]
            await d.stop()
            assert f.m is not None and f.m.sm is not None
            sm = f.m.sm
            await eventually(
                lambda: sm.state.nodes[d.id].state == pb.NODE_STATE_DOWN, "d marked DOWN"
            )
            await eventually(
                lambda: (
                    all(d.id not in s.voters and not s.learners for s in f.shards().values())
                    and f.settled()
                ),
                "d's replicas re-created on a, b and c",
                on_fail=f.describe,
            )
            async with f.client() as client:
                for i in range(20):
                    got = await client.get(b"k%d" % i)
                    assert [kv.value for kv in got.kvs] == [b"v%d" % i]
            # Now only three nodes are left: another death moves nothing.
            c = f.nodes.pop("c")
            await c.stop()
            await eventually(
                lambda: sm.state.nodes[c.id].state == pb.NODE_STATE_DOWN, "c marked DOWN"
            )
            passes = f.m.driver.passes if f.m.driver is not None else 0
            await eventually(
                lambda: (
                    f.m is not None and f.m.driver is not None and f.m.driver.passes > passes + 20
                ),
                "driver ran 20 more passes",
            )
            assert all(c.id in s.voters for s in f.shards().values())
        finally:
            await f.stop()

    asyncio.run(scenario())
