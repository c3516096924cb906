"""Faults behind the front door, with clients that talk to Envoy only.

One stack of real processes (``dkv.devstack``: three membership replicas, three managed
nodes, the gateway, Envoy) and concurrent clients (:class:`dkv.testing.cluster.Workload`
through :class:`dkv.testing.frontdoor.FrontDoorClient`: one call per operation, so every
failure the platform lets through is one an application sees). In turn:

1. kill -9 the leader of a shard: no client call fails (the gateway follows the new leader
   inside the call's deadline);
2. kill -9 the membership leader: routing keeps working, the map keeps moving;
3. add a fourth node while traffic runs: membership moves replicas onto it, no call fails;
4. kill -9 the gateway: Envoy answers UNAVAILABLE at once (no hang) and counts the failed
   connections; once the gateway is back, calls succeed again.

Every history is checked for linearizability, and every acknowledged write must be read back.
``DKV_FAULT_OPS`` scales the operations per phase.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from pathlib import Path

import grpc
import grpc.aio
import pytest

from dkv.client import ClientTls
from dkv.client.membership import MembershipClient
from dkv.devstack import DevLayout, DevStack
from dkv.testing.cluster import History, Workload, check, lost_writes, read_back
from dkv.testing.frontdoor import FrontDoorClient
from dkv.v1 import kv_pb2
from dkv.v1 import membership_pb2 as mpb

pytestmark = pytest.mark.slow

SHARDS = 4
OPS = 30 * int(os.environ.get("DKV_FAULT_OPS", "1"))


def free_layout(root: Path) -> DevLayout:
    return DevLayout.with_free_ports(root, shards=SHARDS, membership_replicas=3)


class Ops:
    """Helpers bound to one running stack."""

    def __init__(self, stack: DevStack) -> None:
        self.stack = stack
        lay = stack.layout
        pki = lay.certs
        self.tls = ClientTls(str(pki.cert("admin")), str(pki.key("admin")), str(pki.ca_cert))
        self.membership = MembershipClient(
            lay.membership_endpoints.split(","), self.tls, timeout_s=10
        )
        self.front_door = f"127.0.0.1:{lay.front_door}"

    async def describe(self) -> mpb.GetClusterMapResponse:
        return await self.membership.describe()

    async def node_name(self, node_id: int) -> str:
        m = (await self.describe()).map
        return next(n.name for n in m.nodes if n.id == node_id)

    async def wait_map(self, pred: object, what: str, timeout_s: float = 90) -> mpb.ClusterMap:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                m = (await self.describe()).map
                if pred(m):  # type: ignore[operator]
                    return m
            except Exception:  # membership may be electing: look again
                pass
            if loop.time() > deadline:
                raise AssertionError(f"not reached within {timeout_s} s: {what}")
            await asyncio.sleep(0.2)


async def run_phase(
    ops: Ops, client: FrontDoorClient, history: History, fault: object, label: str, seed: int
) -> Workload:
    """Traffic before, during and after ``fault()``; no call may fail."""
    work = Workload(
        client,  # type: ignore[arg-type]
        history,
        workers=4,
        ops_per_worker=OPS,
        keys=6,
        prefix=f"{label}/".encode(),
        op_timeout_s=15.0,
        seed=seed,
    )
    task = asyncio.create_task(work.run())
    try:
        await work.wait_succeeded(OPS // 2, timeout_s=60)
        await fault()  # type: ignore[operator]
        await work.wait_succeeded(OPS * 2, timeout_s=90)
    finally:
        await task
    assert not history.errors, f"{label}: calls failed through the front door: {history.errors}"
    assert not history.unknown, f"{label}: calls got no answer in time: {history.unknown}"
    return work


def envoy_upstream_connect_failures(layout: DevLayout) -> int:
    url = f"http://127.0.0.1:{layout.envoy_admin}/stats?format=json&filter=dkv_gateway"
    with urllib.request.urlopen(url, timeout=10) as resp:
        stats = json.loads(resp.read())["stats"]
    return sum(
        int(s.get("value", 0))
        for s in stats
        if s.get("name") == "cluster.dkv_gateway.upstream_cx_connect_fail"
    )


def test_faults_behind_the_front_door(tmp_path: Path) -> None:
    layout = free_layout(tmp_path / ".dkv")
    stack = DevStack(layout)
    stack.start()
    try:
        asyncio.run(stack.wait_ready())
        asyncio.run(scenario(stack))
    finally:
        stack.stop()


async def scenario(stack: DevStack) -> None:
    ops = Ops(stack)
    history = History()
    works: list[Workload] = []
    tls = stack.layout.client_tls_files()
    async with FrontDoorClient(ops.front_door, SHARDS, tls) as client:
        try:
            # 1. The leader of a shard dies.
            killed: list[str] = []

            async def kill_shard_leader() -> None:
                m = await ops.wait_map(lambda m: len(m.leaders) == SHARDS, "every shard led")
                entry = m.leaders[0]
                name = await ops.node_name(entry.leader_id)
                stack.kill9(f"node {name}")
                killed.append(name)

            works.append(await run_phase(ops, client, history, kill_shard_leader, "p1", 1))
            stack.restart(f"node {killed[0]}")

            # 2. The membership leader dies.
            async def kill_membership_leader() -> None:
                d = await ops.describe()
                assert d.leader_name, "membership has a leader"
                stack.kill9(f"membership {d.leader_name}")
                killed.append(d.leader_name)

            works.append(await run_phase(ops, client, history, kill_membership_leader, "p2", 2))
            new = await ops.describe()
            assert new.leader_name and new.leader_name != killed[-1]
            stack.restart(f"membership {killed[-1]}")

            # 3. A fourth node joins while traffic runs: replicas move onto it.
            async def add_node() -> None:
                stack.add_node("n4")

            works.append(await run_phase(ops, client, history, add_node, "p3", 3))
            m = await ops.wait_map(
                lambda m: (
                    any(n.name == "n4" for n in m.nodes)
                    and any(
                        next(n.id for n in m.nodes if n.name == "n4") in s.voters for s in m.shards
                    )
                    and all(not s.learners and len(s.voters) == 3 for s in m.shards)
                ),
                "replicas moved onto n4",
            )
            per_node = {n.name: sum(n.id in s.voters for s in m.shards) for n in m.nodes}
            assert sum(per_node.values()) == SHARDS * 3 and per_node["n4"] >= 1, per_node

            # 4. The gateway dies; Envoy says so at once and recovers when it is back.
            stack.kill9("gateway")
            before = envoy_upstream_connect_failures(stack.layout)
            stub = client.channel.unary_unary(
                "/dkv.v1.KV/Range",
                request_serializer=kv_pb2.RangeRequest.SerializeToString,
                response_deserializer=kv_pb2.RangeResponse.FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub(kv_pb2.RangeRequest(key=b"p1/0"), timeout=20)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert envoy_upstream_connect_failures(stack.layout) > before
            stack.restart("gateway")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while True:
                try:
                    await stub(kv_pb2.RangeRequest(key=b"p1/0"), timeout=5)
                    break
                except grpc.aio.AioRpcError:
                    if loop.time() > deadline:
                        raise
                    await asyncio.sleep(0.2)

            # Every acknowledged write is there; the history is linearizable.
            keys = [k for w in works for k in w.key_set()]
            final = await read_back(client, history, keys)  # type: ignore[arg-type]
            assert not lost_writes(history.acked, final)
            check(history)
        finally:
            await ops.membership.close()
