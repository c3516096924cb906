"""Three storage nodes (in one process, real gRPC on 127.0.0.1, peer mTLS, real RocksDB)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import grpc.aio
import pytest
from dkv_node.limits import Limits
from dkv_node.node import Node, NodeConfig
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dkv.host.channels import TlsFiles
from dkv.security import PkiLayout, write_dev_pki
from dkv.sharding import shard_for_key
from dkv.v1 import kv_pb2

NAMES = ("a", "b", "c")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def solo_config(data_dir: Path, shards: int = 1) -> NodeConfig:
    """A one-member cluster on free ports (the member is its own quorum)."""
    peer = f"127.0.0.1:{free_port()}"
    return NodeConfig(
        name="solo",
        data_dir=data_dir,
        listen_peer=peer,
        listen_client="127.0.0.1:0",
        initial_cluster={"solo": peer},
        shards=shards,
        tick_interval_ms=10,
    )


class Client:
    """Finds the leader itself: follows the dkv-leader-id hint of NOT_LEADER answers."""

    def __init__(self, nodes: dict[int, Node]) -> None:
        self.nodes = nodes
        self.channels = {
            nid: grpc.aio.insecure_channel(f"127.0.0.1:{n.client_port}") for nid, n in nodes.items()
        }

    def _stub(self, nid: int, method: str, req_type: type, resp_type: type):  # type: ignore[no-untyped-def]
        return self.channels[nid].unary_unary(
            f"/dkv.v1.KV/{method}",
            request_serializer=req_type.SerializeToString,
            response_deserializer=resp_type.FromString,
        )

    async def call(self, method: str, req, resp_type, at: int | None = None):  # type: ignore[no-untyped-def]
        ids = list(self.nodes)
        nid = at if at is not None else ids[0]
        for attempt in range(200):
            try:
                return await self._stub(nid, method, type(req), resp_type)(req, timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise
                hint = dict(exc.trailing_metadata() or ()).get("dkv-leader-id")
                if hint and int(hint) in self.nodes:
                    nid = int(hint)
                    continue
                # No usable hint (election under way, or the hinted leader is gone).
                nid = ids[(attempt + 1) % len(ids)]
                await asyncio.sleep(0.02)
        raise AssertionError("no leader found")

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()


def test_three_nodes_serve_the_kv_api(tmp_path: Path) -> None:
    pki = PkiLayout(tmp_path / "pki")
    write_dev_pki(pki.directory, [("node", n) for n in NAMES])
    peers = {n: f"localhost:{free_port()}" for n in NAMES}

    async def scenario() -> None:
        nodes: dict[int, Node] = {}
        for n in NAMES:
            tls = TlsFiles(str(pki.cert(n)), str(pki.key(n)), str(pki.ca_cert))
            cfg = NodeConfig(
                name=n,
                data_dir=tmp_path / n,
                listen_peer=peers[n].replace("localhost", "127.0.0.1"),
                listen_client="127.0.0.1:0",
                initial_cluster=peers,
                shards=3,
                peer_tls=tls,
                limits=Limits(value_bytes_max=1000),
                tick_interval_ms=10,
            )
            node = Node(cfg)
            await node.start()
            nodes[node.id] = node
        client = Client(nodes)
        try:
            for node in nodes.values():
                assert node.host is not None
                h = node.host
                await h.wait_for(
                    lambda h=h: all(g.node.status().leader_id for g in h.groups.values()), 20
                )
            for i in range(30):
                put = kv_pb2.PutRequest(key=b"user/%02d" % i, value=b"v%d" % i, request_id=f"p{i}")
                resp = await client.call("Put", put, kv_pb2.PutResponse)
                assert resp.succeeded and resp.header.revision > 0
            # A prefix range spans all three shards: merged in key order, paged.
            keys: list[bytes] = []
            cont = b""
            while True:
                req = kv_pb2.RangeRequest(prefix=b"user/", limit=7, continuation=cont)
                page = await client.call("Range", req, kv_pb2.RangeResponse)
                keys += [kv.key for kv in page.kvs]
                if not page.more:
                    break
                cont = page.continuation
            assert keys == [b"user/%02d" % i for i in range(30)]
            # Linearizable and serializable single-key reads on every node.
            for nid in nodes:
                for consistency in (
                    kv_pb2.READ_CONSISTENCY_LINEARIZABLE,
                    kv_pb2.READ_CONSISTENCY_SERIALIZABLE,
                ):
                    req = kv_pb2.RangeRequest(key=b"user/07", consistency=consistency)
                    got = await client.call("Range", req, kv_pb2.RangeResponse, at=nid)
                    if consistency == kv_pb2.READ_CONSISTENCY_LINEARIZABLE:
                        assert [kv.value for kv in got.kvs] == [b"v7"]
            # Bad input: a clear INVALID_ARGUMENT naming the problem, nothing proposed.
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await client.call("Put", kv_pb2.PutRequest(key=b"", value=b"x"), kv_pb2.PutResponse)
            assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "key must not be empty" in (exc.value.details() or "")
            big = kv_pb2.PutRequest(key=b"k", value=b"x" * 1001)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await client.call("Put", big, kv_pb2.PutResponse)
            assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "limit is 1000 bytes" in (exc.value.details() or "")
            # Health.
            first = next(iter(nodes.values()))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{first.client_port}") as ch:
                h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                assert h.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await client.close()
            for node in nodes.values():
                await node.stop()

    asyncio.run(scenario())


def test_watch_survives_a_leader_change_without_gaps_or_duplicates(tmp_path: Path) -> None:
    peers = {n: f"127.0.0.1:{free_port()}" for n in NAMES}

    async def scenario() -> None:
        nodes: dict[int, Node] = {}
        for n in NAMES:
            cfg = NodeConfig(
                name=n,
                data_dir=tmp_path / n,
                listen_peer=peers[n],
                listen_client="127.0.0.1:0",
                initial_cluster=peers,
                shards=2,
                tick_interval_ms=10,
            )
            node = Node(cfg)
            await node.start()
            nodes[node.id] = node
        for node in nodes.values():
            h = node.host
            assert h is not None
            await h.wait_for(
                lambda h=h: all(g.node.status().leader_id for g in h.groups.values()), 20
            )
        key = b"watched"
        any_host = next(iter(nodes.values())).host
        assert any_host is not None
        gid = shard_for_key(key, 2)
        leader_id = any_host.groups[gid].node.status().leader_id
        watcher_id = next(i for i in nodes if i != leader_id)
        others = {i: n for i, n in nodes.items() if i != leader_id}
        client = Client(nodes)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{nodes[watcher_id].client_port}")
        stream = ch.unary_stream(
            "/dkv.v1.KV/Watch",
            request_serializer=kv_pb2.WatchRequest.SerializeToString,
            response_deserializer=kv_pb2.WatchResponse.FromString,
        )(kv_pb2.WatchRequest(key=key, start_revision=1, prev_kv=True))
        seen: list[kv_pb2.Event] = []
        written: list[int] = []

        async def collect(n: int) -> None:
            async for resp in stream:
                seen.extend(resp.events)
                if len(seen) >= n:
                    return

        try:
            for i in range(5):
                r = await client.call(
                    "Put",
                    kv_pb2.PutRequest(key=key, value=b"%d" % i, request_id=f"a{i}"),
                    kv_pb2.PutResponse,
                )
                written.append(r.header.revision)
            await nodes[leader_id].stop()  # the shard's leader goes away: a new one is elected
            client.nodes = others
            for i in range(5, 10):
                r = await client.call(
                    "Put",
                    kv_pb2.PutRequest(key=key, value=b"%d" % i, request_id=f"a{i}"),
                    kv_pb2.PutResponse,
                )
                written.append(r.header.revision)
            await asyncio.wait_for(collect(10), 20)
            assert [e.kv.mod_revision for e in seen] == written  # every write once, in order
            assert [e.kv.value for e in seen] == [b"%d" % i for i in range(10)]
            assert [e.prev_kv.value for e in seen[1:]] == [b"%d" % i for i in range(9)]
        finally:
            stream.cancel()
            await ch.close()
            await client.close()
            for i, node in nodes.items():
                if i != leader_id:
                    await node.stop()

    asyncio.run(scenario())


def test_range_delete_spans_every_shard_in_bounded_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small steps, so a range of 23 keys over 3 shards takes several entries per shard.
    monkeypatch.setattr("dkv_node.kv_state.DELETE_RANGE_KEYS_MAX", 4)
    monkeypatch.setattr("dkv_node.kv_service.DELETE_RANGE_KEYS_MAX", 4)

    async def scenario() -> None:
        node = Node(solo_config(tmp_path / "solo", shards=3))
        await node.start()
        client = Client({node.id: node})
        try:
            for i in range(30):
                put = kv_pb2.PutRequest(key=b"r/%02d" % i, value=b"v%d" % i)
                await client.call("Put", put, kv_pb2.PutResponse)
            shards_hit = {shard_for_key(b"r/%02d" % i, 3) for i in range(5, 28)}
            assert len(shards_hit) > 1  # the range really spans shards
            req = kv_pb2.DeleteRequest(
                key=b"r/05", range_end=b"r/28", prev_kv=True, request_id="d1"
            )
            resp = await client.call("Delete", req, kv_pb2.DeleteResponse)
            assert resp.deleted == 23
            assert [kv.key for kv in resp.prev_kvs] == [b"r/%02d" % i for i in range(5, 28)]
            # A retry with the same id changes nothing and answers the same.
            again = await client.call("Delete", req, kv_pb2.DeleteResponse)
            assert again.deleted == 23
            left = await client.call(
                "Range", kv_pb2.RangeRequest(prefix=b"r/"), kv_pb2.RangeResponse
            )
            assert [kv.key for kv in left.kvs] == [
                b"r/%02d" % i for i in (*range(5), *range(28, 30))
            ]
            everything = kv_pb2.DeleteRequest(key=b"r/", range_end=b"\x00")
            assert (await client.call("Delete", everything, kv_pb2.DeleteResponse)).deleted == 7
            for bad, why in (
                (kv_pb2.DeleteRequest(key=b"b", range_end=b"a"), "range_end must be greater"),
                (
                    kv_pb2.DeleteRequest(
                        key=b"a", range_end=b"b", precondition=kv_pb2.Precondition(version=1)
                    ),
                    "precondition applies to one key",
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await client.call("Delete", bad, kv_pb2.DeleteResponse)
                assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert why in (exc.value.details() or "")
        finally:
            await client.close()
            await node.stop()

    asyncio.run(scenario())


def test_without_quorum_requests_fail_within_their_deadline_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    peers = {n: f"127.0.0.1:{free_port()}" for n in NAMES}

    def config(n: str) -> NodeConfig:
        return NodeConfig(
            name=n,
            data_dir=tmp_path / n,
            listen_peer=peers[n],
            listen_client="127.0.0.1:0",
            initial_cluster=peers,
            initial_cluster_state="existing" if (tmp_path / n).exists() else "new",
            tick_interval_ms=10,
        )

    async def scenario() -> None:
        nodes: dict[str, Node] = {}
        for n in NAMES:
            nodes[n] = Node(config(n))
            await nodes[n].start()
        client = Client({node.id: node for node in nodes.values()})
        try:
            put = kv_pb2.PutRequest(key=b"k", value=b"before", request_id="w0")
            first = await client.call("Put", put, kv_pb2.PutResponse)
            assert first.succeeded
            survivor = nodes["a"]
            for n in ("b", "c"):
                await nodes.pop(n).stop()
            ch = grpc.aio.insecure_channel(f"127.0.0.1:{survivor.client_port}")
            codes: list[grpc.StatusCode] = []
            stub_put = ch.unary_unary(
                "/dkv.v1.KV/Put",
                request_serializer=kv_pb2.PutRequest.SerializeToString,
                response_deserializer=kv_pb2.PutResponse.FromString,
            )
            stub_get = ch.unary_unary(
                "/dkv.v1.KV/Range",
                request_serializer=kv_pb2.RangeRequest.SerializeToString,
                response_deserializer=kv_pb2.RangeResponse.FromString,
            )
            # Until the lone node notices (CheckQuorum), a write may wait for its deadline;
            # after that every request is refused at once as UNAVAILABLE. Never a hang.
            for i in range(1, 200):
                try:
                    await stub_put(
                        kv_pb2.PutRequest(key=b"k", value=b"lost?", request_id=f"w{i}"),
                        timeout=1,
                    )
                    raise AssertionError("a write succeeded without a quorum")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
                    if exc.code() is grpc.StatusCode.UNAVAILABLE:
                        break
            assert codes[-1] is grpc.StatusCode.UNAVAILABLE
            assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
            with pytest.raises(grpc.aio.AioRpcError) as read_exc:
                await stub_get(kv_pb2.RangeRequest(key=b"k"), timeout=1)
            assert read_exc.value.code() is grpc.StatusCode.UNAVAILABLE
            # A serializable read is still served from the local state.
            local = await stub_get(
                kv_pb2.RangeRequest(key=b"k", consistency=kv_pb2.READ_CONSISTENCY_SERIALIZABLE),
                timeout=1,
            )
            assert local.kvs[0].value in (b"before", b"lost?")
            await ch.close()
            # Quorum back: the acknowledged write is there.
            nodes["b"] = Node(config("b"))
            await nodes["b"].start()
            await client.close()
            client = Client({node.id: node for node in nodes.values()})
            got = await client.call("Range", kv_pb2.RangeRequest(key=b"k"), kv_pb2.RangeResponse)
            assert got.kvs[0].value in (b"before", b"lost?")  # unacknowledged: either way
            assert got.kvs[0].create_revision == first.header.revision  # the acknowledged put
        finally:
            await client.close()
            for node in nodes.values():
                await node.stop()

    asyncio.run(scenario())
