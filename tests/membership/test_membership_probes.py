"""A membership replica's Kubernetes probes: alive while its loop answers, ready only when its
Raft group has a leader (a replica cut off from its peers cannot serve the map)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
from dkv_membership.server import MembershipConfig, MembershipServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_replica_without_a_leader_is_alive_but_not_ready(tmp_path: Path) -> None:
    # One of three replicas, the other two never started: no quorum, so no leader.
    peers = {"m1": f"127.0.0.1:{free_port()}", "m2": "127.0.0.1:9", "m3": "127.0.0.1:9"}
    cfg = MembershipConfig(
        name="m1",
        data_dir=tmp_path / "m1",
        listen_peer=peers["m1"],
        listen_client="127.0.0.1:0",
        initial_cluster=peers,
        tick_interval_ms=10,
        listen_metrics="127.0.0.1:0",
    )

    async def scenario() -> None:
        m1 = MembershipServer(cfg)
        await m1.start()
        try:
            await asyncio.sleep(0.5)  # 50 ticks: elections ran, and could not succeed
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{m1.metrics_port}") as web:
                assert (await web.get("/livez")).status_code == 200
                r = await web.get("/readyz")
                assert (r.status_code, r.text) == (
                    503,
                    "the membership group has no known leader\n",
                )
                metrics = (await web.get("/metrics")).text
        finally:
            await m1.stop()
        assert 'dkv_raft_has_leader{shard="1"} 0.0' in metrics  # membership's own group

    asyncio.run(scenario())
