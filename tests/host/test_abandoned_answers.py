"""A proposal or read whose caller gave up leaves nothing behind that asyncio complains about.

Real hosts with RocksDB on an in-process network. A leader cut off from its followers takes
writes it cannot commit; their callers time out; the others elect a leader who writes over
those log indices; when the old leader hears from it, the entries it proposed turn out to be
someone else's. The host used to fail their futures with ProposalDropped although no caller
waited any more, and asyncio logged "Future exception was never retrieved" for each.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
from pathlib import Path
from typing import Any

import pytest
from dkv_node.shard import KvShard

from dkv.errors import DeadlineExceeded, NotLeader
from dkv.host import Host, HostConfig, MemoryNetwork
from dkv.raft import ConfState, Role
from dkv.storage import Engine, Identity
from dkv.v1 import kv_pb2

NODES = (1, 2, 3)
GID = 1


def _put(i: int) -> bytes:
    return kv_pb2.KvCommand(
        request_id=f"r{i}", put=kv_pb2.PutRequest(key=b"k%d" % i, value=b"v")
    ).SerializeToString()


def test_futures_of_callers_that_gave_up_are_not_failed_behind_their_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unhandled: list[dict[str, Any]] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: unhandled.append(ctx))
        net = MemoryNetwork()
        engines = {
            n: Engine.open(tmp_path / f"n{n}", Identity("c", f"n{n}"), create=True) for n in NODES
        }
        hosts = {
            n: Host(
                HostConfig(node_id=n, tick_interval_ms=5),
                engines[n],
                net.transport(n),
                random.Random(n),
            )
            for n in NODES
        }
        for n in NODES:
            hosts[n].add_group(GID, KvShard(engines[n], GID, n), ConfState.of(NODES))
            await hosts[n].start()

        def leader(among: tuple[int, ...] = NODES) -> int:
            ls = [n for n in among if hosts[n].groups[GID].node.status().role is Role.LEADER]
            return ls[0] if len(ls) == 1 else 0

        try:
            await hosts[1].wait_for(lambda: leader() != 0, 20)
            old = leader()
            for i in range(3):  # a committed entry or two first
                await hosts[old].propose(GID, _put(i), timeout_s=10)
            # Cut the leader off; it still takes proposals (until CheckQuorum steps it
            # down) but cannot commit them: their callers give up.
            net.blocked.add(old)
            g = hosts[old].groups[GID]
            first = g.storage.last_index() + 1
            abandoned = 0
            for i in range(3, 6):
                try:
                    await hosts[old].propose(GID, _put(i), timeout_s=0.05)
                except DeadlineExceeded:
                    abandoned += 1
                except NotLeader:
                    break  # stepped down already: the earlier ones are enough
            assert abandoned >= 1
            assert len(g.proposals) == abandoned  # still pending, nobody waits
            old_term = g.node.hard_state().term
            # The others elect a leader and write over those indices.
            others = tuple(n for n in NODES if n != old)
            await hosts[others[0]].wait_for(lambda: leader(others) != 0, 20)
            new = leader(others)
            for i in range(6, 6 + abandoned + 2):
                await hosts[new].propose(GID, _put(i), timeout_s=10)
            net.blocked.discard(old)
            target = hosts[new].groups[GID].storage.applied_index
            await hosts[old].wait_for(lambda: g.storage.applied_index >= target, 20)
            # The old leader applied the new leader's entries at its abandoned indices...
            assert g.storage.term(first) > old_term
            assert g.proposals == {}  # ...and dropped what it had pending there
            gc.collect()
        finally:
            for h in hosts.values():
                await h.stop()
            for e in engines.values():
                e.close()
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(scenario())
    assert unhandled == []
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
