"""The host's log names the Raft group of each line the consensus core writes."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest
from dkv_node.shard import KvShard

from dkv.host import Host, HostConfig, MemoryNetwork
from dkv.raft import ConfState
from dkv.storage import Engine, Identity


def test_raft_lines_say_which_group(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        eng = Engine.open(tmp_path / "n1", Identity("c", "n1"), create=True)
        host = Host(
            HostConfig(node_id=1, tick_interval_ms=5),
            eng,
            MemoryNetwork().transport(1),
            random.Random(1),
        )
        for gid in (1, 2):
            host.add_group(gid, KvShard(eng, gid, 1), ConfState.of([1]))
        await host.start()
        try:
            await host.wait_for(lambda: host.leader(1) == 1 and host.leader(2) == 1, 20)
        finally:
            await host.stop()
            eng.close()

    with caplog.at_level(logging.INFO, logger="dkv.host"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "dkv.host"]
    for gid in (1, 2):
        assert f"group {gid}: raft 1: leader at term 2" in lines, lines
        assert any(line.startswith(f"group {gid}: raft 1: start term=") for line in lines), lines
