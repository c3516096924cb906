"""Snapshots are made in the background (thesis §5.1 log compaction without stopping the loop).

The shards here make their snapshot's data only once the test opens a gate (a
threading.Event): while it is shut, the host's loop must go on ticking, replicating and
applying; once it opens, the snapshot recorded must be the state at the index of its view,
not later, unless the state moved under it (a snapshot installed from the leader, the group
removed, the host stopped), in which case it is discarded.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from pathlib import Path

from dkv_node.kv_store import RocksKvStore
from dkv_node.shard import KvShard

from dkv.errors import NotLeader, ProposalDropped
from dkv.host import Host, HostConfig, MemoryNetwork
from dkv.raft import ConfState, Role
from dkv.storage import CF_RAFT_STATE, COLUMN_FAMILIES, Engine, Identity, group_prefix
from dkv.storage.raft_log import RocksRaftStorage
from dkv.v1 import kv_pb2

NODES = (1, 2, 3)
GROUP = 1
GATE_TIMEOUT_S = 60  # only so that a failing test cannot leave a thread waiting forever


def put_cmd(key: bytes, rid: str) -> bytes:
    return kv_pb2.KvCommand(
        request_id=rid, put=kv_pb2.PutRequest(key=key, value=b"v-" + key)
    ).SerializeToString()


class GatedShard(KvShard):
    """A KV shard whose snapshot view is taken at once (on the loop, as always) but whose
    chunks are made only when ``gate`` opens; ``entered`` is set once the snapshot thread
    waits at the gate. ``viewed_revision``: the shard's revision (the Raft index of the last
    write applied) when the last view was taken."""

    def __init__(self, engine: Engine, shard_id: int, member_id: int) -> None:
        super().__init__(engine, shard_id, member_id)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.views = 0
        self.viewed_revision = 0

    def snapshot_view(self) -> Iterator[bytes]:
        self.views += 1
        self.viewed_revision = self.store.revision()
        return self._gated(super().snapshot_view())

    def _gated(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        self.entered.set()
        self.gate.wait(GATE_TIMEOUT_S)
        yield from chunks


class Cluster:
    def __init__(self, root: Path, gated: set[int], **cfg: int) -> None:
        self.root = root
        self.net = MemoryNetwork()
        self.engines: dict[int, Engine] = {}
        self.hosts: dict[int, Host] = {}
        self.shards: dict[int, KvShard] = {}
        self.gated: dict[int, GatedShard] = {}
        for n in NODES:
            eng = Engine.open(root / f"n{n}", Identity("c", f"n{n}"), create=True)
            host = Host(
                HostConfig(node_id=n, tick_interval_ms=5, **cfg),
                eng,
                self.net.transport(n),
                random.Random(n),
            )
            shard = GatedShard(eng, GROUP, n) if n in gated else KvShard(eng, GROUP, n)
            if isinstance(shard, GatedShard):
                self.gated[n] = shard
            host.add_group(GROUP, shard, ConfState.of(NODES))
            self.engines[n], self.hosts[n], self.shards[n] = eng, host, shard

    async def start(self) -> None:
        for h in self.hosts.values():
            await h.start()
        await self.wait(lambda: self.leader() != 0)

    async def wait(self, pred: object, timeout_s: float = 30) -> None:
        await self.hosts[1].wait_for(pred, timeout_s)  # type: ignore[arg-type]

    def leader(self) -> int:
        leaders = [
            n
            for n, h in self.hosts.items()
            if GROUP in h.groups and h.groups[GROUP].node.status().role is Role.LEADER
        ]
        return leaders[0] if len(leaders) == 1 else 0

    def applied(self, n: int) -> int:
        return self.hosts[n].groups[GROUP].storage.applied_index

    async def put(self, i: int, among: tuple[int, ...] = NODES) -> int:
        """Put key ``i`` at the leader (one of ``among``); returns the revision it got (the
        Raft index of its entry). Retries with the same request id on a leader change."""
        while True:
            await self.wait(lambda: self.leader() in among)
            lead = self.leader()
            if lead not in among:
                continue
            try:
                resp = await self.hosts[lead].propose(GROUP, put_cmd(b"k%04d" % i, f"r{i}"), 10)
            except (NotLeader, ProposalDropped):
                continue
            assert isinstance(resp, kv_pb2.PutResponse) and resp.succeeded
            return resp.header.revision

    async def stop(self) -> None:
        for s in self.gated.values():
            s.gate.set()
        for h in self.hosts.values():
            await h.stop()
        for e in self.engines.values():
            e.close()


def restored_keys(tmp_path: Path, data: bytes) -> dict[bytes, int]:
    """The keys (and their mod revisions) of a KV snapshot's data, loaded into a new store."""
    eng = Engine.open(tmp_path / "restore", Identity("c", "restore"), create=True)
    try:
        store = RocksKvStore(eng, GROUP)
        batch = eng.batch()
        store.begin(batch)
        store.load(data)
        eng.write(batch, sync=False)
        store.end()
        return {k: rec.mod_revision for k, rec in store.scan(b"", b"", 1_000_000)}
    finally:
        eng.close()


def test_loop_keeps_committing_while_a_snapshot_is_made_and_records_the_view(
    tmp_path: Path,
) -> None:
    """Every member's snapshot thread waits at its gate: meanwhile, for five election
    timeouts and more, the leader stays, the term stays, and 30 more writes commit and apply
    on every member. Opened, each member records a snapshot at the index of its view whose
    data holds exactly the writes up to that index, compacts its log behind it, and finds
    the same snapshot (written in chunks) after a restart."""

    async def scenario() -> None:
        c = Cluster(
            tmp_path,
            gated=set(NODES),
            snapshot_every_entries=10,
            compact_keep_entries=2,
            snapshot_write_chunk_bytes=256,  # several chunks: the chunked record is tested
        )
        await c.start()
        revisions: dict[bytes, int] = {}
        try:
            for i in range(12):
                revisions[b"k%04d" % i] = await c.put(i)
            await c.wait(lambda: all(s.entered.is_set() for s in c.gated.values()))
            assert all(s.views == 1 for s in c.gated.values())
            viewed = {n: s.viewed_revision for n, s in c.gated.items()}
            term, leader = c.hosts[1].term(GROUP), c.leader()
            ticks = c.hosts[1].ticks
            timeout_ticks = c.hosts[1].cfg.election_timeout_ticks

            for i in range(12, 42):
                revisions[b"k%04d" % i] = await c.put(i)
            last = c.applied(leader)
            await c.wait(
                lambda: (
                    all(c.applied(n) == last for n in NODES)
                    and c.hosts[1].ticks >= ticks + 5 * timeout_ticks
                )
            )
            assert all(s.entered.is_set() and not s.gate.is_set() for s in c.gated.values())
            assert all(h.term(GROUP) == term for h in c.hosts.values())
            assert c.leader() == leader
            for h in c.hosts.values():
                assert h.snapshots_taken == 0
                assert h.groups[GROUP].storage.snapshot().metadata.index == 1  # bootstrap

            for s in c.gated.values():
                s.gate.set()
            await c.wait(lambda: all(h.snapshots_taken == 1 for h in c.hosts.values()))
            recorded = {}
            for n, h in c.hosts.items():
                st = h.groups[GROUP].storage
                snap = st.snapshot()
                assert snap.metadata.index == viewed[n] < last
                assert snap.metadata.term == st.term(viewed[n]) == term
                assert snap.metadata.conf_state == ConfState.of(NODES)
                assert st.first_index() == viewed[n] - 2 + 1  # compacted, 2 entries kept
                assert len(snap.data) > 3 * 256
                expected = {k: r for k, r in revisions.items() if r <= viewed[n]}
                # Index 1 is the bootstrap, 2 the leader's no-op, every later one a put.
                assert len(expected) == viewed[n] - 2 < len(revisions)
                assert restored_keys(tmp_path / f"r{n}", snap.data) == expected
                recorded[n] = snap
                assert h.snapshots_discarded == 0
        finally:
            await c.stop()

        for n in NODES:  # the chunked snapshot reads back the same after a restart
            eng = Engine.open(tmp_path / f"n{n}", Identity("c", f"n{n}"), create=False)
            try:
                assert RocksRaftStorage(eng, GROUP).snapshot() == recorded[n]
            finally:
                eng.close()

    asyncio.run(scenario())


def chunk_keys(engine: Engine) -> list[bytes]:
    """The keys of the group's snapshot chunks (RocksRaftStorage's layout)."""
    p = group_prefix(GROUP)
    return [k for k, _ in engine.scan(CF_RAFT_STATE, p + b"snpc", p + b"snpd")]


def chunk_index(key: bytes) -> int:
    """The snapshot index a chunk key belongs to."""
    return int.from_bytes(key[12:20], "big")


def test_snapshot_made_while_the_leaders_is_installed_is_discarded(tmp_path: Path) -> None:
    """Node 3 takes a view at about index 23 and its thread waits; cut off, it falls behind
    a compacted log, and the leader's snapshot is installed. When node 3's thread ends, its
    older snapshot is discarded, not recorded over the installed one."""

    async def scenario() -> None:
        c = Cluster(tmp_path, gated={3}, snapshot_every_entries=20, compact_keep_entries=5)
        await c.start()
        h3, s3 = c.hosts[3], c.gated[3]
        try:
            await c.wait(lambda: c.leader() in (1, 2))
            for i in range(22):
                await c.put(i, among=(1, 2))
            await c.wait(s3.entered.is_set)
            viewed = s3.viewed_revision
            c.net.blocked = {3}
            for i in range(22, 122):
                await c.put(i, among=(1, 2))
            lead = c.leader()
            assert c.hosts[lead].groups[GROUP].storage.first_index() > viewed + 1
            c.net.blocked = set()
            target = c.applied(lead)
            await c.wait(lambda: h3.snapshots_installed == 1 and c.applied(3) >= target)
            installed = h3.groups[GROUP].storage.snapshot()
            assert installed.metadata.index > viewed
            assert h3.snapshots_taken == 0

            s3.gate.set()
            await c.wait(lambda: h3.snapshots_discarded == 1)
            # Not recorded over the installed snapshot (node 3 may have made a newer one
            # since, from a new view: it applied entries past the installed snapshot).
            snap = h3.groups[GROUP].storage.snapshot()
            assert snap == installed or snap.metadata.index > installed.metadata.index
            assert h3.snapshots_taken == (0 if snap == installed else 1)
            assert not [k for k in chunk_keys(c.engines[3]) if chunk_index(k) <= viewed]
            got = c.shards[3].kv.range(kv_pb2.RangeRequest(prefix=b"k", limit=1000))
            assert [kv.key for kv in got.kvs] == [b"k%04d" % i for i in range(122)]
            # Node 3 snapshots again later, from a new view.
            for i in range(122, 122 + 25):
                await c.put(i)
            await c.wait(lambda: h3.snapshots_taken >= 1)
            assert h3.groups[GROUP].storage.snapshot().metadata.index > installed.metadata.index
            assert s3.views >= 2
        finally:
            await c.stop()
        eng = Engine.open(tmp_path / "n3", Identity("c", "n3"), create=False)
        try:
            st = RocksRaftStorage(eng, GROUP)
            assert st.snapshot().metadata.index > installed.metadata.index
        finally:
            eng.close()

    asyncio.run(scenario())


def test_group_removed_while_its_snapshot_is_made_leaves_no_trace(tmp_path: Path) -> None:
    """remove_group while the group's snapshot thread runs: the snapshot is discarded and
    nothing of the group comes back in RocksDB."""

    async def scenario() -> None:
        c = Cluster(tmp_path, gated={3}, snapshot_every_entries=10)
        await c.start()
        h3, s3 = c.hosts[3], c.gated[3]
        try:
            for i in range(12):
                await c.put(i)
            await c.wait(s3.entered.is_set)
            await h3.remove_group(GROUP)
            s3.gate.set()
            await c.wait(lambda: h3.snapshots_discarded == 1)
            assert h3.snapshots_taken == 0
            p = group_prefix(GROUP)
            left = [
                k
                for cf in COLUMN_FAMILIES
                for k, _ in c.engines[3].scan(cf, p, group_prefix(GROUP + 1))
            ]
            assert left == []
        finally:
            await c.stop()

    asyncio.run(scenario())


def test_stop_while_a_snapshot_is_made_drops_it_and_loses_nothing(tmp_path: Path) -> None:
    """A host stopped while its snapshot thread runs returns once the thread let go of
    RocksDB, records nothing, and the data and log are intact after a restart."""

    async def scenario() -> None:
        eng = Engine.open(tmp_path / "n1", Identity("c", "n1"), create=True)
        host = Host(
            HostConfig(node_id=1, tick_interval_ms=5, snapshot_every_entries=10),
            eng,
            MemoryNetwork().transport(1),
            random.Random(1),
        )
        shard = GatedShard(eng, GROUP, 1)
        host.add_group(GROUP, shard, ConfState.of([1]))
        await host.start()
        stopping: asyncio.Task[None] | None = None
        try:
            await host.wait_for(lambda: host.leader(GROUP) == 1, 20)
            for i in range(12):
                await host.propose(GROUP, put_cmd(b"k%04d" % i, f"r{i}"), 10)
            await host.wait_for(shard.entered.is_set, 20)
            stopping = asyncio.create_task(host.stop())
            await asyncio.sleep(0)  # stop() has asked the thread to abort, and waits for it
            assert not stopping.done()
            shard.gate.set()
            await stopping
            assert host.snapshots_taken == 0
            applied = host.groups[GROUP].storage.applied_index
        finally:
            shard.gate.set()
            if stopping is None:
                await host.stop()
            eng.close()

        eng = Engine.open(tmp_path / "n1", Identity("c", "n1"), create=False)
        try:
            st = RocksRaftStorage(eng, GROUP)
            assert st.snapshot().metadata.index == 1
            assert st.applied_index == applied
            assert st.first_index() == 2  # nothing compacted
            store = RocksKvStore(eng, GROUP)
            assert store.keys == 12
        finally:
            eng.close()

    asyncio.run(scenario())
