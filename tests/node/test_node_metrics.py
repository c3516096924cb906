"""A real node (RocksDB, gRPC) exports its Raft, disk and gRPC metrics and its probes."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc.aio
import httpx
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
