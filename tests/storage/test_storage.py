"""The RocksDB engine and the per-group Raft storage, on a real RocksDB in a temp directory."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from dkv.errors import (
    Compacted,
    DataDirError,
    InvalidArgument,
    InvariantViolation,
    Unavailable,
)
from dkv.raft import (
    Config,
    ConfState,
    Entry,
    EntryType,
    HardState,
    RawNode,
    Role,
    Snapshot,
    SnapshotMetadata,
)
from dkv.storage import CF_DATA, CF_RAFT_STATE, CF_WATCH, Engine, Identity, RocksRaftStorage

ME = Identity(cluster_id="c1", node_name="n1")


def ents(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i, EntryType.NORMAL, b"v%d" % i) for i in range(lo, hi)]


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    eng = Engine.open(tmp_path / "db", ME, create=True)
    yield eng  # type: ignore[misc]
    eng.close()


def reopen(eng: Engine) -> Engine:
    eng.close()
    return Engine.open(eng.path, ME, create=False)


# -- the engine and its data directory --------------------------------------------------------


def test_data_dir_of_another_node_is_refused(tmp_path: Path) -> None:
    Engine.open(tmp_path / "db", ME, create=True).close()
    with pytest.raises(DataDirError, match="belongs to node 'n1' of cluster 'c1', not node 'n2'"):
        Engine.open(tmp_path / "db", Identity("c1", "n2"), create=False)
    with pytest.raises(DataDirError, match="cluster 'c1', not node 'n1' of cluster 'other'"):
        Engine.open(tmp_path / "db", Identity("other", "n1"), create=True)


def test_missing_data_dir_is_refused_unless_creating(tmp_path: Path) -> None:
    with pytest.raises(DataDirError, match="holds no data"):
        Engine.open(tmp_path / "nothing", ME, create=False)


def test_foreign_non_empty_dir_and_plain_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(DataDirError, match="not empty"):
        Engine.open(tmp_path / "junk", ME, create=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataDirError, match="not a directory"):
        Engine.open(tmp_path / "file", ME, create=True)


def test_batch_is_atomic_and_survives_reopen(engine: Engine) -> None:
    b = engine.batch()
    for i in range(100):
        b.put(CF_DATA, b"k%03d" % i, b"v%d" % i)
    engine.write(b, sync=True)
    engine = reopen(engine)
    try:
        got = list(engine.scan(CF_DATA, b"k010", b"k015"))
        assert got == [(b"k%03d" % i, b"v%d" % i) for i in range(10, 15)]
        assert engine.last_key(CF_DATA, b"k", b"k050") == b"k049"
        assert engine.last_key(CF_DATA, b"x", b"y") is None
    finally:
        engine.close()


# -- Raft storage -----------------------------------------------------------------------------


def test_restart_resumes_exactly(engine: Engine) -> None:
    st = RocksRaftStorage(engine, group_id=7)
    b = engine.batch()
    st.stage_append(b, ents(1, 51))
    st.stage_hard_state(b, HardState(term=3, vote=2, commit=40))
    st.stage_applied(b, 38, ConfState.of([1, 2, 3]))
    engine.write(b, sync=True)
    engine = reopen(engine)
    try:
        st2 = RocksRaftStorage(engine, group_id=7, cache_entries_max=10)
        assert (st2.first_index(), st2.last_index()) == (1, 50)
        assert st2.initial_state() == (HardState(3, 2, 40), ConfState.of([1, 2, 3]))
        assert st2.applied_index == 38
        # Both from the cache (recent) and from RocksDB (older than the cache).
        assert st2.entries(45, 51) == ents(45, 51)
        assert st2.entries(1, 6) == ents(1, 6)
        assert st2.term(3) == 1
        # Groups are separate.
        other = RocksRaftStorage(engine, group_id=8)
        assert other.last_index() == 0 and other.initial_state()[0] == HardState()
    finally:
        engine.close()


def test_append_over_a_conflicting_tail_truncates_it_durably(engine: Engine) -> None:
    st = RocksRaftStorage(engine, group_id=1)
    b = engine.batch()
    st.stage_append(b, ents(1, 11, term=1))
    engine.write(b, sync=True)
    b = engine.batch()
    st.stage_append(b, ents(6, 8, term=2))  # a new leader overwrote 6.. with a shorter tail
    engine.write(b, sync=True)
    assert st.last_index() == 7 and st.term(7) == 2
    engine = reopen(engine)
    try:
        st2 = RocksRaftStorage(engine, group_id=1)
        assert st2.last_index() == 7
        assert [e.term for e in st2.entries(1, 8)] == [1] * 5 + [2] * 2
        with pytest.raises(Unavailable):
            st2.entries(1, 9)
    finally:
        engine.close()


def test_snapshot_then_compaction(engine: Engine) -> None:
    st = RocksRaftStorage(engine, group_id=1)
    b = engine.batch()
    st.stage_append(b, ents(1, 21))
    engine.write(b, sync=True)
    snap = Snapshot(SnapshotMetadata(15, 1, ConfState.of([1, 2])), data=b"state@15")
    b = engine.batch()
    st.stage_snapshot(b, snap)
    st.stage_compact(b, 15)
    engine.write(b, sync=True)
    assert st.first_index() == 16 and st.term(15) == 1
    with pytest.raises(Compacted):
        st.entries(10, 16)
    engine = reopen(engine)
    try:
        st2 = RocksRaftStorage(engine, group_id=1)
        assert st2.snapshot() == snap
        assert (st2.first_index(), st2.last_index()) == (16, 20)
        assert st2.entries(16, 21) == ents(16, 21)
        with pytest.raises(InvariantViolation):
            st2.stage_compact(engine.batch(), 18)  # beyond the snapshot
    finally:
        engine.close()


def chunk_keys(engine: Engine, group_id: int) -> list[bytes]:
    p = group_id.to_bytes(8, "big")
    return [k for k, _ in engine.scan(CF_RAFT_STATE, p + b"snpc", p + b"snpd")]


def test_snapshot_data_written_in_chunks_reads_back_and_old_chunks_go(engine: Engine) -> None:
    """A local snapshot's data is written in chunks before the record that points at them;
    it reads back whole after a reopen; recording the next snapshot deletes the chunks of
    every other one (the previous snapshot's, and those of an attempt never recorded); an
    installed snapshot (data in the record) deletes them all."""
    st = RocksRaftStorage(engine, group_id=1)
    b = engine.batch()
    st.stage_append(b, ents(1, 41))
    engine.write(b, sync=True)

    def chunked(index: int, data: bytes, size: int) -> Snapshot:
        snap = Snapshot(SnapshotMetadata(index, 1, ConfState.of([1, 2])), data=data)
        parts = [data[i : i + size] for i in range(0, len(data), size)]
        for seq, part in enumerate(parts):
            b = engine.batch()
            st.stage_snapshot_chunk(b, index, seq, part)
            engine.write(b, sync=False)
        b = engine.batch()
        st.stage_snapshot(b, snap, chunks=len(parts))
        engine.write(b, sync=False)
        return snap

    first = chunked(10, b"0123456789" * 10, 7)
    assert st.snapshot() == first
    assert len(chunk_keys(engine, 1)) == 15
    b = engine.batch()
    st.stage_snapshot_chunk(b, 25, 0, b"an attempt never recorded")
    engine.write(b, sync=False)
    second = chunked(20, b"abc" * 50, 64)
    assert len(chunk_keys(engine, 1)) == 3  # the first's 15 and the attempt's 1 are gone
    engine = reopen(engine)
    try:
        st = RocksRaftStorage(engine, group_id=1)
        assert st.snapshot() == second
        installed = Snapshot(SnapshotMetadata(50, 2, ConfState.of([1, 2])), data=b"leader's")
        b = engine.batch()
        st.stage_snapshot(b, installed)
        engine.write(b, sync=False)
        assert chunk_keys(engine, 1) == []
        engine = reopen(engine)
        assert RocksRaftStorage(engine, group_id=1).snapshot() == installed
    finally:
        engine.close()


def test_a_snapshot_record_missing_a_chunk_is_refused(engine: Engine) -> None:
    st = RocksRaftStorage(engine, group_id=1)
    b = engine.batch()
    st.stage_append(b, ents(1, 11))
    for seq in (0, 2):  # chunk 1 is missing
        st.stage_snapshot_chunk(b, 10, seq, b"x")
    st.stage_snapshot(b, Snapshot(SnapshotMetadata(10, 1, ConfState.of([1])), b"xxx"), chunks=3)
    engine.write(b, sync=True)
    engine = reopen(engine)
    try:
        with pytest.raises(InvariantViolation, match="1 of its 3 chunks"):
            RocksRaftStorage(engine, group_id=1)
    finally:
        engine.close()


def test_read_view_sees_the_column_families_as_they_were(engine: Engine) -> None:
    """A read view is a point in time across column families: writes after it (puts,
    deletes, range deletes, a memtable flush) are not seen; it may be read in another
    thread; ranges are bounded on both ends."""
    b = engine.batch()
    for i in range(10):
        b.put(CF_DATA, b"k%d" % i, b"v%d" % i)
        b.put(CF_WATCH, b"w%d" % i, b"e%d" % i)
    engine.write(b, sync=False)
    view = engine.read_view((CF_DATA, CF_WATCH))
    b = engine.batch()
    b.put(CF_DATA, b"k0", b"changed")
    b.put(CF_DATA, b"k55", b"new")
    b.delete(CF_DATA, b"k3")
    b.delete_range(CF_WATCH, b"w0", b"w5")
    engine.write(b, sync=False)
    engine._db.flush()  # what the view reads must outlive a flush too

    got: dict[str, list[tuple[bytes, bytes]]] = {}

    def read() -> None:
        got["data"] = list(view.scan(CF_DATA, b"k", b"k6"))
        got["watch"] = list(view.scan(CF_WATCH, b"w2", b"w4"))

    t = threading.Thread(target=read)
    t.start()
    t.join()
    assert got["data"] == [(b"k%d" % i, b"v%d" % i) for i in range(6)]
    assert got["watch"] == [(b"w2", b"e2"), (b"w3", b"e3")]
    assert dict(engine.scan(CF_DATA, b"k0", b"k1")) == {b"k0": b"changed"}  # the DB moved
    view.close()
    with pytest.raises(InvalidArgument):
        list(view.scan(CF_DATA, b"k", b"l"))


def test_installing_a_leaders_snapshot_replaces_the_log(engine: Engine) -> None:
    st = RocksRaftStorage(engine, group_id=1)
    b = engine.batch()
    st.stage_append(b, ents(1, 6))
    engine.write(b, sync=True)
    snap = Snapshot(SnapshotMetadata(100, 4, ConfState.of([1, 2, 3])), data=b"x")
    b = engine.batch()
    st.stage_snapshot(b, snap)
    engine.write(b, sync=True)
    assert (st.first_index(), st.last_index()) == (101, 100)
    assert st.applied_index == 100 and st.conf_state == ConfState.of([1, 2, 3])
    engine = reopen(engine)
    try:
        st2 = RocksRaftStorage(engine, group_id=1)
        assert (st2.first_index(), st2.last_index(), st2.applied_index) == (101, 100, 100)
        assert not list(engine.scan("raft_log", b"", b"\xff" * 16))
    finally:
        engine.close()


def test_a_raft_group_on_rocksdb_survives_a_full_restart(tmp_path: Path) -> None:
    """Three RawNodes, each on its own RocksDB; everything is closed and reopened."""
    ids = (1, 2, 3)

    def open_all() -> tuple[dict[int, Engine], dict[int, RocksRaftStorage], dict[int, RawNode]]:
        engines = {
            i: Engine.open(tmp_path / f"n{i}", Identity("c", f"n{i}"), create=True) for i in ids
        }
        storages = {i: RocksRaftStorage(engines[i], 1) for i in ids}
        nodes = {
            i: RawNode(
                Config(id=i, applied_index=storages[i].applied_index), storages[i], random.Random(i)
            )
            for i in ids
        }
        return engines, storages, nodes

    def pump(storages: dict[int, RocksRaftStorage], nodes: dict[int, RawNode]) -> list[bytes]:
        applied: list[bytes] = []
        busy = True
        while busy:
            busy = False
            for i, node in nodes.items():
                if not node.has_ready():
                    continue
                busy = True
                rd = node.ready()
                st = storages[i]
                b = st.engine.batch()
                st.stage_append(b, rd.entries)
                if rd.hard_state is not None:
                    st.stage_hard_state(b, rd.hard_state)
                if rd.committed_entries:
                    st.stage_applied(b, rd.committed_entries[-1].index, st.conf_state)
                    if i == 1:
                        applied += [e.data for e in rd.committed_entries if e.data]
                st.engine.write(b, sync=rd.must_sync)
                for m in rd.messages:
                    nodes[m.to].step(m)
                node.advance()
        return applied

    engines, storages, nodes = open_all()
    # Bootstrap as MemoryStorage does: the initial configuration at index 1.
    for i in ids:
        b = engines[i].batch()
        storages[i].stage_snapshot(b, Snapshot(SnapshotMetadata(1, 1, ConfState.of(ids))))
        storages[i].stage_hard_state(b, HardState(term=1, commit=1))
        engines[i].write(b, sync=True)
        engines[i].close()
    engines, storages, nodes = open_all()
    nodes[1].campaign()
    pump(storages, nodes)
    assert nodes[1].status().role is Role.LEADER
    for k in range(20):
        nodes[1].propose(b"put %d" % k)
    assert pump(storages, nodes) == [b"put %d" % k for k in range(20)]
    before = {
        i: (n.status().term, n.status().commit, n.status().last_index) for i, n in nodes.items()
    }
    for e in engines.values():
        e.close()
    engines, storages, nodes = open_all()
    try:
        after = {
            i: (n.status().term, n.status().commit, n.status().last_index) for i, n in nodes.items()
        }
        assert after == before
        # Each member applied what it knew committed (followers learn the leader's last
        # commit index only with its next append or heartbeat).
        assert all(storages[i].applied_index == before[i][1] for i in ids)
        # The restarted group elects again and keeps committing on top of the old log.
        nodes[2].campaign()
        pump(storages, nodes)
        nodes[2].propose(b"after restart")
        pump(storages, nodes)
        assert nodes[2].status().commit == before[2][2] + 2  # the new no-op and the proposal
        assert nodes[3].status().last_index == before[3][2] + 2
    finally:
        for e in engines.values():
            e.close()
