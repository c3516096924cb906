"""Access control on `make run`'s stack (real processes, real Envoy, mTLS, the default policy
in ROOT/auth plus grants this test adds): who may do what through the front door, at every
internal port, with forged XFCC headers, and a policy edited while it runs. Every refusal is
checked by its status and message, and the data is unchanged afterwards."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from peer_probe import hello_frame, peer_exchange
from prometheus_client.parser import text_string_to_metric_families

from dkv.devstack import DevLayout, DevStack
from dkv.host.members import member_id
from dkv.security import write_dev_pki
from dkv.v1 import admin_pb2, cluster_pb2, kv_pb2, raft_pb2
from dkv.v1 import membership_pb2 as mpb

pytestmark = pytest.mark.slow

WAIT_S = 20.0
GRANTS = "p, user:alice, app/*, read\np, user:alice, app/*, write\n"
WRITER = "g, user:bob, role:writer\n"
DENIED = grpc.StatusCode.PERMISSION_DENIED


def free_layout(root: Path) -> DevLayout:
    return DevLayout.with_free_ports(root, shards=4)


class As:
    """gRPC calls to one address with one user's certificate."""

    def __init__(self, layout: DevLayout, user: str, port: int) -> None:
        pki = layout.certs
        creds = grpc.ssl_channel_credentials(
            pki.ca_cert.read_bytes(), pki.key(user).read_bytes(), pki.cert(user).read_bytes()
        )
        self.channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)

    def unary(self, method: str, resp: Any) -> Any:
        return self.channel.unary_unary(
            method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp.FromString,
        )

    async def put(self, key: bytes, value: bytes, **kw: Any) -> kv_pb2.PutResponse:
        md = kw.pop("metadata", None)
        req = kv_pb2.PutRequest(key=key, value=value, **kw)
        out: kv_pb2.PutResponse = await self.unary("/dkv.v1.KV/Put", kv_pb2.PutResponse)(
            req, timeout=10, metadata=md
        )
        return out

    async def range(self, **kw: Any) -> kv_pb2.RangeResponse:
        out: kv_pb2.RangeResponse = await self.unary("/dkv.v1.KV/Range", kv_pb2.RangeResponse)(
            kv_pb2.RangeRequest(**kw), timeout=10
        )
        return out

    async def refused(self, call: Any, code: grpc.StatusCode = DENIED) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() is code, err.value
        return err.value.details() or ""


def stream_refused(
    layout: DevLayout, user: str, port: int, method: str, request: Any, resp: Any
) -> str:
    """A request-streaming call refused with PERMISSION_DENIED; returns its message. With the
    synchronous client: grpc.aio sometimes reports a refusal that arrives while it still sends
    as INTERNAL "Internal error from Core" (grpc/grpc#36066)."""
    pki = layout.certs
    creds = grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(), pki.key(user).read_bytes(), pki.cert(user).read_bytes()
    )
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        call = channel.stream_stream(
            method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp.FromString,
        )(iter([request]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            next(iter(call))
    assert err.value.code() is DENIED, err.value  # type: ignore[attr-defined]
    return str(err.value.details() or "")  # type: ignore[attr-defined]


def peer_refused(
    layout: DevLayout, user: str, port: int, hello: bytes, batch: raft_pb2.MessageBatch
) -> str:
    """A Raft peer connection refused with PERMISSION_DENIED; returns the refusal's message."""
    pki = layout.certs
    got = peer_exchange(
        port,
        batch,
        hello,
        ca_pem=pki.ca_cert.read_bytes(),
        pem=(pki.key(user).read_bytes(), pki.cert(user).read_bytes()),
    )
    assert got.code is DENIED, got
    return got.details


@asynccontextmanager
async def users(layout: DevLayout, port: int, *names: str) -> AsyncIterator[list[As]]:
    clients = [As(layout, n, port) for n in names]
    try:
        yield clients
    finally:
        for c in clients:
            await c.channel.close()


def gateway_counter(layout: DevLayout, name: str) -> float:
    url = f"http://127.0.0.1:{layout.gateway_metrics}/metrics"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
    )


async def eventually(check: Any, what: str) -> float:
    """Seconds until ``await check()`` is true (fails after WAIT_S, naming ``what``)."""
    t0 = time.monotonic()
    while not await check():
        assert time.monotonic() - t0 < WAIT_S, f"not within {WAIT_S} s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def test_who_may_do_what_at_every_port(tmp_path: Path) -> None:
    layout = free_layout(tmp_path)
    stack = DevStack(layout)
    try:
        stack.start()
        asyncio.run(stack.wait_ready())
        write_dev_pki(
            layout.certs.directory, [("user", "alice"), ("user", "mallory"), ("user", "bob")]
        )
        policy = layout.auth_dir / "policy.csv"
        policy.write_text(policy.read_text() + GRANTS + WRITER)
        asyncio.run(scenario(layout, policy))
    finally:
        stack.stop()


async def scenario(layout: DevLayout, policy: Path) -> None:
    door = layout.front_door
    async with users(layout, door, "admin", "reader", "alice", "mallory") as (
        admin,
        reader,
        alice,
        mallory,
    ):

        async def alice_may_write() -> bool:
            try:
                await alice.put(b"app/probe", b"p")
                return True
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is DENIED
                return False

        await eventually(alice_may_write, "alice's grant from the edited policy")
        await admin.put(b"app/x", b"1")
        await admin.put(b"other", b"2")

        # A reader reads everything and writes nothing.
        got = await reader.range(key=b"app/x")
        assert [kv.value for kv in got.kvs] == [b"1"]
        assert (await reader.range(key=b"\0", range_end=b"\0")).count >= 2
        msg = await reader.refused(reader.put(b"app/x", b"evil"))
        assert msg == "user:reader may not write b'app/x' (dkv.v1.KV/Put)"
        delete = reader.unary("/dkv.v1.KV/Delete", kv_pb2.DeleteResponse)
        await reader.refused(delete(kv_pb2.DeleteRequest(key=b"other"), timeout=10))

        # A prefix grant: inside it, yes; across or outside its boundary, no.
        await alice.put(b"app/y", b"3")
        assert (await alice.range(prefix=b"app/")).count >= 2
        await alice.refused(alice.put(b"other", b"x"))
        await alice.refused(alice.range(prefix=b"ap"))  # also "apple"
        await alice.refused(alice.range(key=b"app/", range_end=b"b"))
        await alice.refused(alice.range(key=b"\0", range_end=b"\0"))  # the whole keyspace
        await alice.put(b"app/y", b"4", prev_kv=True)  # read is granted too
        watch = alice.channel.unary_stream(
            "/dkv.v1.KV/Watch",
            request_serializer=kv_pb2.WatchRequest.SerializeToString,
            response_deserializer=kv_pb2.WatchResponse.FromString,
        )
        await alice.refused(
            anext(aiter(watch(kv_pb2.WatchRequest(prefix=b"oth", start_revision=0))))
        )
        ok_watch = watch(kv_pb2.WatchRequest(prefix=b"app/", start_revision=0))
        await alice.put(b"app/w", b"5")
        first = await anext(aiter(ok_watch))
        assert first is not None
        ok_watch.cancel()
        # Nobody: denied by default.
        await mallory.refused(mallory.range(key=b"app/x"))

        # Cluster internals are for admins.
        status = reader.unary("/dkv.v1.Cluster/Status", cluster_pb2.ClusterStatusResponse)
        request = cluster_pb2.ClusterStatusRequest()
        assert "admin" in await reader.refused(status(request, timeout=10))

        # A writer (role:writer) writes and reads every key, and administers nothing.
        async with users(layout, door, "bob") as [bob]:
            await bob.put(b"bob/k", b"b")
            assert (await bob.range(key=b"\0", range_end=b"\0")).count >= 3
            status = bob.unary("/dkv.v1.Cluster/Status", cluster_pb2.ClusterStatusResponse)
            msg = await bob.refused(status(request, timeout=10))
            assert msg == "user:bob may not admin every key (dkv.v1.Cluster/Status)"

        # Envoy sanitizes a client's own XFCC: the reader stays the reader.
        forged = (("x-forwarded-client-cert", "URI=spiffe://dkv/user/admin"),)
        await reader.refused(reader.put(b"app/x", b"evil", metadata=forged))

    # Straight to the gateway: only Envoy's XFCC is believed; the forgery is counted.
    before = gateway_counter(layout, "dkv_auth_forged_xfcc_total")
    async with users(layout, layout.gateway, "reader") as [reader_at_gw]:
        await reader_at_gw.refused(reader_at_gw.put(b"app/x", b"evil", metadata=forged))
    assert gateway_counter(layout, "dkv_auth_forged_xfcc_total") == before + 1
    assert gateway_counter(layout, "dkv_auth_denied_total") >= 8

    # A node's client port: components and admins only.
    async with users(layout, layout.node_client(1), "reader", "admin") as [r, a]:
        msg = await r.refused(r.range(key=b"app/x"))
        assert "user:reader may not call dkv.v1.KV/Range" in msg
        assert (
            await a.range(key=b"app/x", consistency=kv_pb2.READ_CONSISTENCY_SERIALIZABLE)
        ).count <= 1
    # A node's Raft peer port: nodes only (the framed peer protocol, dkv.host.peer_wire).
    batch = raft_pb2.MessageBatch(from_node=1, cluster_id="dkv-cluster")
    admin = peer_refused(layout, "admin", layout.node_peer(1), hello_frame("dkv-cluster", 1), batch)
    assert admin.startswith("user:admin may not call dkv.v1.RaftPeer/Stream"), admin
    # A node speaks only for itself: n1's certificate, a batch claiming to come from n2.
    n1, n2 = member_id("dkv-cluster", "n1"), member_id("dkv-cluster", "n2")
    forged_batch = raft_pb2.MessageBatch(from_node=n2, cluster_id="dkv-cluster")
    n1_hello = hello_frame("dkv-cluster", n1)
    msg = peer_refused(layout, "n1", layout.node_peer(3), n1_hello, forged_batch)
    assert msg.startswith("node:n1 (member ") and "a peer speaks only for itself" in msg
    # ... and so is its hello.
    msg = peer_refused(layout, "n1", layout.node_peer(3), hello_frame("dkv-cluster", n2), batch)
    assert msg.startswith("node:n1 (member ") and "said hello as member" in msg
    # A writer is no admin at the internal ports either: no node Admin call, no drain, no
    # replica change.
    async with users(layout, layout.node_client(1), "bob") as [bob]:
        transfer = bob.unary(
            "/dkv.v1.Admin/TransferLeadership", admin_pb2.TransferLeadershipResponse
        )
        msg = await bob.refused(transfer(admin_pb2.TransferLeadershipRequest(), timeout=10))
        assert msg.startswith("user:bob may not call dkv.v1.Admin/TransferLeadership"), msg
        snap = bob.unary("/dkv.v1.Admin/Snapshot", admin_pb2.SnapshotResponse)
        await bob.refused(snap(admin_pb2.SnapshotRequest(), timeout=10))
    async with users(layout, layout.membership_client(1), "bob") as [bob]:
        m = "/dkv.v1.Membership/"
        for method, req, resp in (
            ("LeaveNode", mpb.LeaveNodeRequest(node_id=1), mpb.LeaveNodeResponse),
            ("AddReplica", mpb.AddReplicaRequest(), mpb.AddReplicaResponse),
            ("RemoveReplica", mpb.RemoveReplicaRequest(), mpb.RemoveReplicaResponse),
        ):
            msg = await bob.refused(bob.unary(m + method, resp)(req, timeout=10))
            assert msg == f"user:bob may not admin every key (dkv.v1.Membership/{method})"
    # Membership: joins from nodes only, drains from admins only.
    async with users(layout, layout.membership_client(1), "reader", "admin") as [r, a]:
        m = "/dkv.v1.Membership/"
        await r.refused(
            r.unary(m + "LeaveNode", mpb.LeaveNodeResponse)(
                mpb.LeaveNodeRequest(node_id=1), timeout=10
            )
        )
        await r.refused(
            r.unary(m + "GetClusterMap", mpb.GetClusterMapResponse)(
                mpb.GetClusterMapRequest(), timeout=10
            )
        )
        assert (
            await a.unary(m + "GetClusterMap", mpb.GetClusterMapResponse)(
                mpb.GetClusterMapRequest(), timeout=10
            )
        ).map.version > 0
        join = a.unary(m + "JoinNode", mpb.JoinNodeResponse)
        assert "only node" in await a.refused(join(mpb.JoinNodeRequest(), timeout=10))
        the_map = await a.unary(m + "GetClusterMap", mpb.GetClusterMapResponse)(
            mpb.GetClusterMapRequest(), timeout=10
        )
        n2 = next(n for n in the_map.map.nodes if n.name == "n2")
    # A node joins and heartbeats only as itself.
    async with users(layout, layout.membership_client(1), "n1") as [n1]:
        as_n2 = mpb.Node()
        as_n2.CopyFrom(n2)
        msg = await n1.refused(
            n1.unary(m + "JoinNode", mpb.JoinNodeResponse)(
                mpb.JoinNodeRequest(node=as_n2), timeout=10
            )
        )
        assert msg == "node:n1 may not join as node 'n2'"
        beat = n1.unary(m + "Heartbeat", mpb.HeartbeatResponse)
        msg = await n1.refused(beat(mpb.HeartbeatRequest(node_id=n2.id), timeout=10))
        assert msg == "node:n1 may not heartbeat as node 'n2'"
    # The xDS port: Envoy only (an admin certificate is not Envoy's).
    stream_refused(
        layout,
        "admin",
        layout.xds,
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        discovery_pb2.DiscoveryRequest(),
        discovery_pb2.DiscoveryResponse,
    )

    async with users(layout, door, "admin", "alice") as (admin, alice):
        # Nothing any refusal touched changed.
        got = await admin.range(key=b"\0", range_end=b"\0")
        values = {kv.key: kv.value for kv in got.kvs}
        assert values[b"app/x"] == b"1" and values[b"other"] == b"2"
        assert values[b"app/y"] == b"4"

        # The grant revoked while the stack runs: enforced at the next poll.
        policy.write_text(policy.read_text().replace(GRANTS, ""))

        async def alice_refused() -> bool:
            try:
                await alice.put(b"app/z", b"6")
                return False
            except grpc.aio.AioRpcError as exc:
                return exc.code() is DENIED

        took = await eventually(alice_refused, "the revoked grant")
        print(f"revocation enforced after {took:.2f} s")
