"""Shard-scoped requests (``RangeRequest.shard_id``, ``WatchRequest.shard_id``) and nodes that
host only some shards of a cluster (``KvService(shard_count=...)``).

A one-member node with 3 shards (its own quorum), real gRPC and RocksDB. The partial-hosting
case serves a second KvService over the same host with only shard 1, as a node that hosts
one shard of three would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from dkv_node.kv_service import KvService, add_kv_service
from dkv_node.node import Node
from test_node_grpc import solo_config

from dkv.sharding import shard_for_key
from dkv.v1 import kv_pb2

SHARDS = 3
WAIT_S = 20.0


class Kv:
    """Raw calls to one client port (exact statuses and trailers)."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    async def unary(self, method: str, req: Any, resp_type: Any) -> Any:
        fn = self.channel.unary_unary(
            f"/dkv.v1.KV/{method}",
            request_serializer=type(req).SerializeToString,
            response_deserializer=resp_type.FromString,
        )
        return await fn(req, timeout=10)

    async def put(self, key: bytes, value: bytes) -> kv_pb2.PutResponse:
        resp: kv_pb2.PutResponse = await self.unary(
            "Put", kv_pb2.PutRequest(key=key, value=value), kv_pb2.PutResponse
        )
        return resp

    async def range(self, req: kv_pb2.RangeRequest) -> kv_pb2.RangeResponse:
        resp: kv_pb2.RangeResponse = await self.unary("Range", req, kv_pb2.RangeResponse)
        return resp

    def watch(self, req: kv_pb2.WatchRequest) -> Any:
        return self.channel.unary_stream(
            "/dkv.v1.KV/Watch",
            request_serializer=kv_pb2.WatchRequest.SerializeToString,
            response_deserializer=kv_pb2.WatchResponse.FromString,
        )(req)

    async def close(self) -> None:
        await self.channel.close()


async def _started(tmp_path: Path) -> Node:
    node = Node(solo_config(tmp_path / "solo", shards=SHARDS))
    await node.start()
    h = node.host
    assert h is not None
    await h.wait_for(lambda: all(h.leader(g) == node.id for g in range(1, SHARDS + 1)), WAIT_S)
    return node


def _keys() -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {s: [] for s in range(1, SHARDS + 1)}
    for i in range(30):
        key = b"s/%02d" % i
        out[shard_for_key(key, SHARDS)].append(key)
    assert all(out.values()), out
    return out


async def _refused(call: Any, code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() is code, err.value
    assert err.value.details() == details
    return err.value


def test_range_and_watch_scoped_to_one_shard(tmp_path: Path) -> None:
    async def scenario() -> None:
        node = await _started(tmp_path)
        kv = Kv(node.client_port)
        try:
            by_shard = _keys()
            for keys in by_shard.values():
                for k in keys:
                    await kv.put(k, b"v")
            for s, keys in by_shard.items():
                # Paged with shard_id: only shard s's keys, in order, once each.
                got: list[bytes] = []
                cont = b""
                while True:
                    page = await kv.range(
                        kv_pb2.RangeRequest(prefix=b"s/", limit=4, continuation=cont, shard_id=s)
                    )
                    assert page.header.shard_id == s
                    got += [x.key for x in page.kvs]
                    if not page.more:
                        break
                    cont = page.continuation
                assert got == sorted(keys)
                counted = await kv.range(
                    kv_pb2.RangeRequest(key=b"s/", range_end=b"s0", count_only=True, shard_id=s)
                )
                assert counted.count == len(keys) and not counted.kvs
                # A single key with shard_id: read in that shard only.
                mine = await kv.range(kv_pb2.RangeRequest(key=keys[0], shard_id=s))
                assert [x.key for x in mine.kvs] == [keys[0]]
                other = next(o for o in by_shard if o != s)
                theirs = await kv.range(kv_pb2.RangeRequest(key=keys[0], shard_id=other))
                assert not theirs.kvs and theirs.header.shard_id == other
            # shard_id 0 is unchanged: every shard, merged.
            whole = await kv.range(kv_pb2.RangeRequest(prefix=b"s/"))
            assert [x.key for x in whole.kvs] == sorted(k for ks in by_shard.values() for k in ks)

            await _refused(
                kv.range(kv_pb2.RangeRequest(prefix=b"s/", shard_id=7)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "shard 7 does not exist (the cluster has shards 1..3)",
            )

            # A watch of shard 2 only: history from revision 1, then a live change; changes
            # of other shards never show up.
            call = kv.watch(kv_pb2.WatchRequest(prefix=b"s/", start_revision=1, shard_id=2))
            stream = call.__aiter__()
            try:
                seen: list[bytes] = []
                while len(seen) < len(by_shard[2]):
                    resp = await asyncio.wait_for(stream.__anext__(), WAIT_S)
                    assert resp.header.shard_id == 2
                    seen += [e.kv.key for e in resp.events]
                assert sorted(seen) == sorted(by_shard[2])
                await kv.put(by_shard[1][0], b"elsewhere")
                await kv.put(by_shard[2][0], b"here")
                resp = await asyncio.wait_for(stream.__anext__(), WAIT_S)
                assert [(e.kv.key, e.kv.value) for e in resp.events] == [(by_shard[2][0], b"here")]
            finally:
                call.cancel()
            bad = kv.watch(kv_pb2.WatchRequest(prefix=b"s/", shard_id=9, start_revision=0))

            async def drain() -> None:
                async for _ in bad:
                    pass

            await _refused(
                drain(),
                grpc.StatusCode.INVALID_ARGUMENT,
                "shard 9 does not exist (the cluster has shards 1..3)",
            )
        finally:
            await kv.close()
            await node.stop(grace_s=0)

    asyncio.run(scenario())


def test_a_node_hosting_some_shards_maps_keys_by_the_cluster_shard_count(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        node = await _started(tmp_path)
        assert node.host is not None
        count = [SHARDS]
        # Hosts shard 1 of a 3-shard cluster.
        svc = KvService(
            node.host,
            {1: node.shards[1]},
            node.cfg.limits,
            shard_count=lambda: count[0],
        )
        server = grpc.aio.server()
        add_kv_service(server, svc)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        kv = Kv(port)
        try:
            by_shard = _keys()
            ok = await kv.put(by_shard[1][0], b"one")
            assert ok.succeeded and ok.header.shard_id == 1
            for s in (2, 3):
                err = await _refused(
                    kv.put(by_shard[s][0], b"x"),
                    grpc.StatusCode.UNAVAILABLE,
                    f"shard {s} is not hosted on this node",
                )
                assert dict(err.trailing_metadata() or ()).get("dkv-leader-id") == "0"
                await _refused(
                    kv.range(kv_pb2.RangeRequest(key=by_shard[s][0])),
                    grpc.StatusCode.UNAVAILABLE,
                    f"shard {s} is not hosted on this node",
                )
                # Named by id: a routing miss too (during a move the map may name this
                # node a moment early or late), not the caller's mistake.
                await _refused(
                    kv.range(kv_pb2.RangeRequest(prefix=b"s/", shard_id=s)),
                    grpc.StatusCode.UNAVAILABLE,
                    f"shard {s} is not hosted on this node",
                )
            # Writes through the full node land in shards 2 and 3; a range with shard_id 0
            # here reads only the hosted shard.
            full = Kv(node.client_port)
            try:
                for s in (2, 3):
                    await full.put(by_shard[s][0], b"other")
            finally:
                await full.close()
            here = await kv.range(kv_pb2.RangeRequest(prefix=b"s/"))
            assert [x.key for x in here.kvs] == [by_shard[1][0]]
            # Watching a key of a shard not hosted: UNAVAILABLE as well.
            watch = kv.watch(kv_pb2.WatchRequest(key=by_shard[2][0], start_revision=0))

            async def drain() -> None:
                async for _ in watch:
                    pass

            await _refused(
                drain(), grpc.StatusCode.UNAVAILABLE, "shard 2 is not hosted on this node"
            )
            # A node that does not know the cluster's shard count yet: UNAVAILABLE too.
            count[0] = 0
            await _refused(
                kv.put(by_shard[1][0], b"x"),
                grpc.StatusCode.UNAVAILABLE,
                "this node does not know the cluster's shards yet",
            )
        finally:
            await kv.close()
            await server.stop(None)
            await node.stop(grace_s=0)

    asyncio.run(scenario())
