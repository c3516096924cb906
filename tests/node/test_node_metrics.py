"""A real node (RocksDB, gRPC) exports its Raft, disk and gRPC metrics and its probes."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc.aio
import httpx
import pytest
from dkv_node.node import Node
from prometheus_client.parser import text_string_to_metric_families
from test_node_grpc import solo_config

from dkv.v1 import kv_pb2


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_node_exports_raft_disk_and_grpc_metrics_and_says_when_it_is_ready(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        cfg = dataclasses.replace(
            solo_config(tmp_path / "solo", shards=2), listen_metrics="127.0.0.1:0"
        )
        node = Node(cfg)
        await node.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.metrics_port}") as web:
                assert (await web.get("/livez")).status_code == 200
                # Ready once both shards elected their (only) member: awaited on the host.
                assert node.host is not None
                await node.host.wait_for(
                    lambda: all(node.host.leader(g) for g in (1, 2)),  # type: ignore[union-attr]
                    timeout_s=30,
                )
                r = await web.get("/readyz")
                assert r.status_code == 200, r.text
                async with grpc.aio.insecure_channel(f"127.0.0.1:{node.client_port}") as ch:
                    put = ch.unary_unary(
                        "/dkv.v1.KV/Put",
                        request_serializer=kv_pb2.PutRequest.SerializeToString,
                        response_deserializer=kv_pb2.PutResponse.FromString,
                    )
                    for i in range(5):
                        await put(kv_pb2.PutRequest(key=b"k%d" % i, value=b"v"), timeout=10)
                s = _samples((await web.get("/metrics")).text)
        finally:
            await node.stop()

        def v(name: str, **labels: str) -> float:
            return s.get((name, frozenset(labels.items())), -1.0)

        for shard in ("1", "2"):
            assert v("dkv_raft_is_leader", shard=shard) == 1
            assert v("dkv_raft_has_leader", shard=shard) == 1
            assert v("dkv_raft_term", shard=shard) >= 1
            assert v("dkv_raft_leader_changes_seen_total", shard=shard) == 1
            assert v("dkv_raft_applied_index", shard=shard) == v(
                "dkv_raft_commit_index", shard=shard
            )
            assert v("dkv_raft_proposals_pending", shard=shard) == 0
            assert v("dkv_raft_proposals_failed_total", shard=shard) == 0
        # Five puts took five entries beyond the elections' empty ones, across the shards.
        applied = sum(v("dkv_raft_proposals_applied_total", shard=g) for g in ("1", "2"))
        assert applied >= 5 + 2
        put = {"grpc_type": "unary", "grpc_service": "dkv.v1.KV", "grpc_method": "Put"}
        assert v("grpc_server_handled_total", **put, grpc_code="OK") == 5
        assert v("grpc_server_started_total", **put) == 5
        # Every put waited for a synced group commit; sizes come from RocksDB itself.
        assert v("dkv_disk_wal_fsync_duration_seconds_count") >= 5
        assert v("dkv_disk_batch_entries_count") >= 5
        assert v("dkv_storage_db_size_bytes") > 0
        assert v("process_resident_memory_bytes") > 0

    asyncio.run(main())


def test_a_node_without_a_leader_is_not_ready(tmp_path: Path) -> None:
    """A member of a three-member cluster alone has no quorum, so no leader: 503, saying so."""

    async def main() -> None:
        solo = solo_config(tmp_path / "a")
        cluster = {"a": solo.listen_peer, "b": "127.0.0.1:9", "c": "127.0.0.1:9"}
        cfg = dataclasses.replace(
            solo, name="a", initial_cluster=cluster, listen_metrics="127.0.0.1:0"
        )
        node = Node(cfg)
        await node.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.metrics_port}") as web:
                r = await web.get("/readyz")
                text = (await web.get("/metrics")).text
        finally:
            await node.stop()
        assert r.status_code == 503
        assert "no known leader for shard(s) 1" in r.text
        assert 'dkv_raft_has_leader{shard="1"} 0.0' in text

    asyncio.run(main())


def test_a_node_exports_keys_watchers_request_ids_rejections_and_compactions(
    tmp_path: Path,
) -> None:
    """The per-shard figures follow what clients did: keys created and deleted, ids
    remembered, a watch open and its events sent, refusals counted by reason."""

    async def main() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        cfg = dataclasses.replace(solo_config(tmp_path / "solo"), listen_metrics="127.0.0.1:0")
        node = Node(cfg)
        await node.start()
        try:
            assert node.host is not None
            await node.host.wait_for(lambda: bool(node.host.leader(1)), timeout_s=30)  # type: ignore[union-attr]
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.metrics_port}") as web,
                grpc.aio.insecure_channel(f"127.0.0.1:{node.client_port}") as ch,
            ):
                put = ch.unary_unary(
                    "/dkv.v1.KV/Put",
                    request_serializer=kv_pb2.PutRequest.SerializeToString,
                    response_deserializer=kv_pb2.PutResponse.FromString,
                )
                delete = ch.unary_unary(
                    "/dkv.v1.KV/Delete",
                    request_serializer=kv_pb2.DeleteRequest.SerializeToString,
                    response_deserializer=kv_pb2.DeleteResponse.FromString,
                )
                watch = ch.unary_stream(
                    "/dkv.v1.KV/Watch",
                    request_serializer=kv_pb2.WatchRequest.SerializeToString,
                    response_deserializer=kv_pb2.WatchResponse.FromString,
                )
                stream = watch(kv_pb2.WatchRequest(prefix=b"w/", start_revision=0), timeout=30)
                # Open once the node counts it (polled with a bound, not slept).
                loop = asyncio.get_running_loop()
                give_up = loop.time() + 10
                while (
                    _samples((await web.get("/metrics")).text).get(
                        ("dkv_node_watchers", frozenset({("shard", "1")}))
                    )
                    != 1
                ):
                    assert loop.time() < give_up, "the watch was never counted"
                    await asyncio.sleep(0.02)
                for i in range(4):
                    await put(kv_pb2.PutRequest(key=b"w/%d" % i, value=b"v"), timeout=10)
                await put(kv_pb2.PutRequest(key=b"w/0", value=b"again"), timeout=10)
                await put(kv_pb2.PutRequest(key=b"x", value=b"v", request_id="r1"), timeout=10)
                await delete(kv_pb2.DeleteRequest(key=b"w/3"), timeout=10)
                seen = 0
                async for resp in stream:
                    seen += len(resp.events)
                    if seen >= 6:  # 5 puts and the delete under w/
                        break
                stream.cancel()
                with pytest.raises(grpc.aio.AioRpcError) as big:
                    await put(kv_pb2.PutRequest(key=b"k" * 5000, value=b"v"), timeout=10)
                assert big.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                with pytest.raises(grpc.aio.AioRpcError):
                    await put(kv_pb2.PutRequest(key=b"", value=b"v"), timeout=10)
                give_up = loop.time() + 10
                while True:
                    s = _samples((await web.get("/metrics")).text)
                    if s.get(("dkv_node_watchers", frozenset({("shard", "1")}))) == 0:
                        return s
                    assert loop.time() < give_up, "the ended watch was still counted"
                    await asyncio.sleep(0.02)
        finally:
            await node.stop()

    s = asyncio.run(main())

    def v(name: str, **labels: str) -> float:
        return s.get((name, frozenset(labels.items())), -1.0)

    assert v("dkv_node_keys", shard="1") == 4  # w/0..w/3 and x, less w/3
    assert v("dkv_node_request_ids", shard="1") == 1
    assert v("dkv_node_watch_events_sent_total", shard="1") == 6
    assert v("dkv_node_requests_rejected_total", reason="too_large") == 1
    assert v("dkv_node_requests_rejected_total", reason="invalid_argument") == 1
    assert v("dkv_node_requests_rejected_total", reason="not_leader") == 0
    assert v("dkv_node_requests_rejected_total", reason="overloaded") == 0
    assert v("dkv_storage_compactions_running") >= 0
    assert v("dkv_storage_compaction_pending_bytes") >= 0
    assert v("dkv_storage_compactions_total") >= 0


def test_rocksdb_compactions_are_counted_from_its_own_stats(tmp_path: Path) -> None:
    """A manual compaction of real RocksDB shows in the completed count; flushes do not."""
    from dkv.storage import CF_DATA, Engine, Identity

    engine = Engine.open(tmp_path / "db", Identity("c", "n"), create=True)
    try:
        before = engine.compaction_figures()
        assert before is not None and before[2] is not None
        for round_ in range(3):
            b = engine.batch()
            for i in range(500):
                b.put(CF_DATA, b"k%05d" % i, b"v%d" % round_ * 50)
            engine.write(b, sync=False)
            engine._views[CF_DATA].flush()
        engine._views[CF_DATA].compact_range(None, None)
        after = engine.compaction_figures()
        assert after is not None and after[2] is not None
        assert after[2] > before[2]
    finally:
        engine.close()
