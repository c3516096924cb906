"""The shard's KV state machine on its in-memory store twin."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dkv_node.kv_state import (
    RANGE_LIMIT_DEFAULT,
    KeyRecord,
    KvStateMachine,
    MemoryKvStore,
    prefix_end,
)
from dkv_node.kv_store import DUMP_CHUNK_BYTES, RocksKvStore
from hypothesis import given, settings
from hypothesis import strategies as st

from dkv.paging import PAGE_BYTES_MAX, kv_bytes
from dkv.storage import Engine, Identity
from dkv.v1 import kv_pb2

STORES = ["memory", "rocksdb"]


@pytest.fixture(params=STORES)
def make_shard(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Each test runs on the in-memory twin and on the real RocksDB store."""
    engines: list[Engine] = []

    def make(**store_kw: int) -> Shard:
        if request.param == "memory":
            return Shard(MemoryKvStore(**store_kw))
        path = tmp_path_factory.mktemp("kv")
        engine = Engine.open(path / "db", Identity("c", "n"), create=True)
        engines.append(engine)
        return Shard(RocksKvStore(engine, group_id=3, **store_kw), engine)

    yield make
    for e in engines:
        e.close()


class Shard:
    """Applies commands at increasing Raft indexes, as the host does: with RocksDB, each
    command's writes go into a batch that is written before the next command."""

    def __init__(self, store: MemoryKvStore | RocksKvStore, engine: Engine | None = None) -> None:
        self.store = store
        self.engine = engine
        self.sm = KvStateMachine(store, shard_id=1, member_id=1)
        self.index = 1

    def apply(self, cmd: kv_pb2.KvCommand) -> kv_pb2.PutResponse | kv_pb2.DeleteResponse:
        self.index += 1
        if isinstance(self.store, RocksKvStore):
            assert self.engine is not None
            batch = self.engine.batch()
            self.store.begin(batch)
            resp = self.sm.apply(self.index, cmd.SerializeToString())
            self.engine.write(batch, sync=False)
            self.store.end()
            return resp
        return self.sm.apply(self.index, cmd.SerializeToString())

    def put(self, key: bytes, val: bytes, rid: str = "", **pre: object) -> kv_pb2.PutResponse:
        req = kv_pb2.PutRequest(key=key, value=val, prev_kv=True)
        if pre:
            req.precondition.CopyFrom(kv_pb2.Precondition(**pre))  # type: ignore[arg-type]
        resp = self.apply(kv_pb2.KvCommand(request_id=rid, put=req))
        assert isinstance(resp, kv_pb2.PutResponse)
        return resp

    def delete(self, key: bytes, range_end: bytes = b"", **pre: object) -> kv_pb2.DeleteResponse:
        req = kv_pb2.DeleteRequest(key=key, range_end=range_end, prev_kv=True)
        if pre:
            req.precondition.CopyFrom(kv_pb2.Precondition(**pre))  # type: ignore[arg-type]
        resp = self.apply(kv_pb2.KvCommand(delete=req))
        assert isinstance(resp, kv_pb2.DeleteResponse)
        return resp

    def get(self, key: bytes) -> kv_pb2.KeyValue | None:
        resp = self.sm.range(kv_pb2.RangeRequest(key=key))
        return resp.kvs[0] if resp.kvs else None


def test_revisions_and_versions_follow_etcd(make_shard: Callable[..., Shard]) -> None:
    s = make_shard()
    s.put(b"a", b"1")  # index 2
    s.put(b"b", b"x")  # index 3
    s.put(b"a", b"2")  # index 4
    a = s.get(b"a")
    assert a is not None
    assert (a.create_revision, a.mod_revision, a.version, a.value) == (2, 4, 2, b"2")
    assert s.sm.store.revision() == 4
    s.delete(b"a")  # index 5
    assert s.get(b"a") is None
    s.put(b"a", b"3")  # recreated: version restarts, create_revision moves
    a = s.get(b"a")
    assert a is not None and (a.create_revision, a.version) == (6, 1)


def test_compare_and_swap_on_version_mod_revision_and_value(
    make_shard: Callable[..., Shard],
) -> None:
    s = make_shard()
    assert s.put(b"k", b"v1", version=0).succeeded  # create only if absent
    rev_before = s.sm.store.revision()
    failed = s.put(b"k", b"v2", version=0)
    assert not failed.succeeded and failed.current.value == b"v1"
    assert s.sm.store.revision() == rev_before  # a failed CAS writes nothing
    k = s.get(b"k")
    assert k is not None
    assert s.put(b"k", b"v2", mod_revision=k.mod_revision).succeeded
    assert not s.put(b"k", b"v3", mod_revision=k.mod_revision).succeeded
    assert s.put(b"k", b"v3", value=b"v2").succeeded
    assert not s.delete(b"k", version=1).succeeded  # version is 3 now
    assert s.delete(b"k", version=3).deleted == 1


def test_retried_request_id_returns_the_first_result_without_applying_twice(
    make_shard: Callable[..., Shard],
) -> None:
    s = make_shard()
    first = s.put(b"counter", b"1", rid="req-1", version=0)
    again = s.put(b"counter", b"1", rid="req-1", version=0)  # a client retry after a timeout
    assert first.succeeded and again.succeeded
    assert again == first
    c = s.get(b"counter")
    assert c is not None and c.version == 1


def test_request_id_table_is_bounded(make_shard: Callable[..., Shard]) -> None:
    s = make_shard(max_request_ids=2)
    s.put(b"k", b"1", rid="r1")
    s.put(b"k", b"2", rid="r2")
    s.put(b"k", b"3", rid="r3")  # forgets r1
    s.put(b"k", b"1", rid="r1")  # so this applies again
    k = s.get(b"k")
    assert k is not None and k.version == 4


def test_range_prefix_limit_and_continuation(make_shard: Callable[..., Shard]) -> None:
    s = make_shard()
    for i in range(25):
        s.put(b"p/%02d" % i, b"v")
    s.put(b"q", b"other")
    keys: list[bytes] = []
    cont = b""
    pages = 0
    while True:
        resp = s.sm.range(kv_pb2.RangeRequest(prefix=b"p/", limit=10, continuation=cont))
        keys += [kv.key for kv in resp.kvs]
        pages += 1
        if not resp.more:
            break
        cont = resp.continuation
    assert keys == [b"p/%02d" % i for i in range(25)] and pages == 3
    resp = s.sm.range(kv_pb2.RangeRequest(key=b"p/10", range_end=b"p/13", keys_only=True))
    assert [(kv.key, kv.value) for kv in resp.kvs] == [
        (b"p/10", b""),
        (b"p/11", b""),
        (b"p/12", b""),
    ]
    everything = s.sm.range(kv_pb2.RangeRequest(key=b"\x00", range_end=b"\x00"))
    assert len(everything.kvs) == 26 and RANGE_LIMIT_DEFAULT > 26


def test_a_range_of_big_values_pages_by_bytes(make_shard: Callable[..., Shard]) -> None:
    """Nine 1-MiB values: pages stay within PAGE_BYTES_MAX (a single bigger key still comes
    alone), every key comes once; keys_only pages are not shrunk by values they do not carry."""
    s = make_shard()
    mib = 1 << 20
    for i in range(9):
        s.put(b"big/%d" % i, bytes([i]) * mib)
    s.put(b"big/9", b"z" * (PAGE_BYTES_MAX + 10))  # larger than a page on its own
    seen: list[bytes] = []
    cont = b""
    while True:
        resp = s.sm.range(kv_pb2.RangeRequest(prefix=b"big/", continuation=cont))
        assert resp.kvs and resp.count == len(resp.kvs)
        if len(resp.kvs) > 1:
            assert sum(kv_bytes(kv) for kv in resp.kvs) <= PAGE_BYTES_MAX
        assert resp.ByteSize() < 4 * mib  # gRPC's default message limit
        seen += [kv.key for kv in resp.kvs]
        if not resp.more:
            break
        cont = resp.continuation
    assert seen == [b"big/%d" % i for i in range(10)]
    keys = s.sm.range(kv_pb2.RangeRequest(prefix=b"big/", keys_only=True))
    assert len(keys.kvs) == 10 and not keys.more


def test_watch_batches_of_big_values_are_bounded_by_bytes(make_shard: Callable[..., Shard]) -> None:
    s = make_shard()
    mib = 1 << 20
    for i in range(9):
        s.put(b"w/%d" % i, bytes([i]) * mib)
    seen: list[bytes] = []
    nxt = 1
    while True:
        events, last, compacted = s.sm.watch_events(nxt, b"w/", b"w0", 1000, 2 * mib)
        assert not compacted
        if not events:
            break
        assert len(events) == 1 or sum(e.ByteSize() for e in events) <= 2 * mib
        seen += [e.kv.key for e in events]
        nxt = last + 1
    assert seen == [b"w/%d" % i for i in range(9)]


def test_a_page_is_exact_with_writes_staged_in_the_batch(tmp_path: Path) -> None:
    """RocksKvStore.scan_page stops reading by bytes while a batch holds staged puts and
    deletes: what it returns is exactly the store's view, up to its last key."""
    engine = Engine.open(tmp_path / "db", Identity("c", "n"), create=True)
    try:
        store = RocksKvStore(engine, group_id=3)
        batch = engine.batch()
        store.begin(batch)
        for i in range(0, 20, 2):
            store.put(b"k%02d" % i, KeyRecord(1, 1, 1, b"x" * 100))
        engine.write(batch, sync=False)
        store.end()
        batch = engine.batch()
        store.begin(batch)  # staged, not written: odd keys appear, some even ones go
        for i in range(1, 20, 2):
            store.put(b"k%02d" % i, KeyRecord(2, 2, 1, b"y" * 100))
        for i in (0, 4, 6):
            store.delete(b"k%02d" % i)
        view = [b"k%02d" % i for i in range(20) if i not in (0, 4, 6)]
        for bytes_max in (1, 150, 450, 10_000):
            found, complete = store.scan_page(b"k", b"l", 100, bytes_max=bytes_max)
            got = [k for k, _ in found]
            assert got and got == view[: len(got)], bytes_max
            assert complete == (got == view)
        store.end()
    finally:
        engine.close()


def test_delete_range_emits_one_event_per_key_at_one_revision(
    make_shard: Callable[..., Shard],
) -> None:
    s = make_shard()
    for k in (b"a1", b"a2", b"b1"):
        s.put(k, b"v")
    resp = s.delete(b"a", range_end=prefix_end(b"a"))
    assert resp.deleted == 2 and [kv.key for kv in resp.prev_kvs] == [b"a1", b"a2"]
    events, last, compacted = s.sm.watch_events(s.index, b"", b"", 100)
    assert not compacted and last == s.index
    assert [(e.type, e.kv.key) for e in events] == [
        (kv_pb2.Event.EVENT_TYPE_DELETE, b"a1"),
        (kv_pb2.Event.EVENT_TYPE_DELETE, b"a2"),
    ]


def test_watch_batches_never_end_inside_a_revision(make_shard: Callable[..., Shard]) -> None:
    """A range delete's events share one revision. A batch cut by the limit in the middle of
    that revision would lose the rest (the watcher goes on from the next revision): a batch
    holds whole revisions only, and one revision larger than the limit comes whole."""
    s = make_shard()
    for i in range(5):
        s.put(b"d/%d" % i, b"v")
    first = s.index - 4  # the revision of d/0
    s.delete(b"d/", range_end=prefix_end(b"d/"))  # 5 events at one revision
    delete_rev = s.index
    seen: list[tuple[int, bytes]] = []
    nxt = first
    for _ in range(20):
        events, last, compacted = s.sm.watch_events(nxt, b"", b"", 3)
        assert not compacted
        revs = {e.kv.mod_revision for e in events if e.type == kv_pb2.Event.EVENT_TYPE_PUT}
        assert all(r <= last for r in revs)
        seen += [(int(e.type), e.kv.key) for e in events]
        if last < nxt:
            break
        nxt = last + 1
    deletes = [k for t, k in seen if t == kv_pb2.Event.EVENT_TYPE_DELETE]
    assert deletes == [b"d/%d" % i for i in range(5)], seen
    assert len(seen) == 10 and nxt == delete_rev + 1


def test_watch_history_is_bounded_and_reports_compaction(make_shard: Callable[..., Shard]) -> None:
    s = make_shard(watch_history_max_events=5)
    for i in range(10):
        s.put(b"k%d" % i, b"v")  # revisions 2..11
    events, _, compacted = s.sm.watch_events(2, b"", b"", 100)
    assert compacted and events == []
    events, last, compacted = s.sm.watch_events(8, b"k", prefix_end(b"k"), 100)
    assert not compacted and [e.kv.mod_revision for e in events] == [8, 9, 10, 11] and last == 11


def test_rocksdb_watch_history_is_trimmed_a_tenth_at_a_time(tmp_path: Path) -> None:
    """Over its bound the history loses a tenth at once (one range delete per tenth of the
    bound, not one per write: range tombstones slow every later scan) and never holds more
    than the bound."""
    engine = Engine.open(tmp_path / "db", Identity("c", "n"), create=True)
    try:
        store = RocksKvStore(engine, group_id=1, watch_history_max_events=100)
        sm = KvStateMachine(store, shard_id=1, member_id=1)
        compactions = set()
        for i in range(2, 1002):
            batch = engine.batch()
            store.begin(batch)
            put = kv_pb2.PutRequest(key=b"k%d" % (i % 7), value=b"v")
            sm.apply(i, kv_pb2.KvCommand(put=put).SerializeToString())
            engine.write(batch, sync=False)
            store.end()
            kept, compact_rev = store.events_since(0, 1000)
            assert 0 < len(kept) <= 100
            compactions.add(compact_rev)
        # 1,000 events over a bound of 100: nine hundred forgotten, ten at a time.
        assert len(compactions) <= 900 // 10 + 1, len(compactions)
        kept, compact_rev = store.events_since(0, 1000)
        assert len(kept) >= 90 and kept[-1][0] == 1001 and kept[0][0] == compact_rev + 1
    finally:
        engine.close()


def test_rocksdb_request_ids_are_forgotten_oldest_first_without_rescanning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The oldest request id is looked for past the last one forgotten, never from the start
    of the table again (which steps over every forgotten id's tombstone), and the newest
    ``max_request_ids`` ids are still recalled."""
    engine = Engine.open(tmp_path / "db", Identity("c", "n"), create=True)
    try:
        store = RocksKvStore(engine, group_id=1, max_request_ids=3)
        sm = KvStateMachine(store, shard_id=1, member_id=1)
        starts: list[bytes] = []
        scan = engine.scan

        def recording_scan(cf: str, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
            if hi.endswith(b"S"):
                starts.append(lo)
            return scan(cf, lo, hi)

        monkeypatch.setattr(engine, "scan", recording_scan)
        for i in range(2, 12):
            batch = engine.batch()
            store.begin(batch)
            put = kv_pb2.PutRequest(key=b"k", value=b"%d" % i)
            sm.apply(i, kv_pb2.KvCommand(request_id=f"r{i}", put=put).SerializeToString())
            engine.write(batch, sync=False)
            store.end()
        assert len(starts) == 7  # ids 2..8 forgotten, one scan each
        assert all(a < b for a, b in itertools.pairwise(starts)), starts
        assert [store.recall_request(f"r{i}") is not None for i in range(7, 12)] == [
            False,
            False,
            True,
            True,
            True,
        ]
    finally:
        engine.close()


def test_prefix_end() -> None:
    assert prefix_end(b"a") == b"b"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b""


@pytest.mark.parametrize("kind", STORES)
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "delete", "cas"]),
            st.sampled_from([b"a", b"b", b"c"]),
            st.binary(max_size=3),
        ),
        max_size=40,
    )
)
def test_agrees_with_a_plain_dict(kind: str, ops: list[tuple[str, bytes, bytes]]) -> None:
    """Whatever the sequence, the state machine's values equal a dict's."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = (
            Engine.open(Path(tmp) / "db", Identity("c", "n"), create=True)
            if kind == "rocksdb"
            else None
        )
        try:
            s = Shard(RocksKvStore(engine, 1), engine) if engine else Shard(MemoryKvStore())
            _check_against_dict(s, ops)
        finally:
            if engine is not None:
                engine.close()


def _check_against_dict(s: Shard, ops: list[tuple[str, bytes, bytes]]) -> None:
    model: dict[bytes, bytes] = {}
    for op, key, value in ops:
        if op == "put":
            s.put(key, value)
            model[key] = value
        elif op == "delete":
            s.delete(key)
            model.pop(key, None)
        else:
            ok = s.put(key, value, value=b"x").succeeded
            if model.get(key) == b"x":
                assert ok
                model[key] = value
            else:
                assert not ok
    for key in (b"a", b"b", b"c"):
        got = s.get(key)
        assert (got.value if got else None) == model.get(key)


def test_rocksdb_commands_in_one_batch_see_each_other(tmp_path: Path) -> None:
    """The host applies many committed entries into one write batch."""
    engine = Engine.open(tmp_path / "db", Identity("c", "n"), create=True)
    try:
        store = RocksKvStore(engine, group_id=1, max_request_ids=2, watch_history_max_events=3)
        sm = KvStateMachine(store, shard_id=1, member_id=1)
        batch = engine.batch()
        store.begin(batch)
        for i in range(2, 8):
            put = kv_pb2.PutRequest(key=b"k", value=b"%d" % i)
            sm.apply(i, kv_pb2.KvCommand(request_id=f"r{i}", put=put).SerializeToString())
        got = store.get(b"k")
        assert got is not None and got.version == 6  # each put saw the previous one
        assert [k for k, _ in store.scan(b"", b"", 10)] == [b"k"]
        engine.write(batch, sync=True)
        store.end()
        # Reopen: everything, including the bounds' bookkeeping, comes back.
        engine.close()
        engine = Engine.open(tmp_path / "db", Identity("c", "n"), create=False)
        store = RocksKvStore(engine, group_id=1, max_request_ids=2, watch_history_max_events=3)
        sm = KvStateMachine(store, shard_id=1, member_id=1)
        assert store.revision() == 7
        got = store.get(b"k")
        assert got is not None and (got.version, got.value) == (6, b"7")
        assert store.recall_request("r7") is not None and store.recall_request("r6") is not None
        assert store.recall_request("r5") is None  # only the newest two ids are kept
        events, _, compacted = sm.watch_events(5, b"", b"", 10)
        assert not compacted and [e.kv.mod_revision for e in events] == [5, 6, 7]
        assert sm.watch_events(4, b"", b"", 10)[2]  # revision 4 was compacted away
    finally:
        engine.close()


def test_rocksdb_snapshot_view_is_the_store_when_it_was_taken(tmp_path: Path) -> None:
    """snapshot_view is taken between batches and read later: what is applied after it
    (puts, deletes, request ids, watch events) is not in it, and its chunks joined load back
    into exactly the store as it was."""
    engine = Engine.open(tmp_path / "db", Identity("c", "n"), create=True)
    try:
        s = Shard(RocksKvStore(engine, group_id=3), engine)
        for i in range(300):
            s.put(b"k%03d" % i, b"x" * 100, rid=f"r{i}")
        assert isinstance(s.store, RocksKvStore)
        before = s.store.dump()
        chunks = s.store.snapshot_view()
        s.put(b"k000", b"changed", rid="later")
        s.delete(b"k001")
        s.put(b"new", b"v")
        data = b"".join(chunks)
        assert data == before
        assert data != s.store.dump()

        copy = Shard(RocksKvStore(engine, group_id=4), engine)
        assert isinstance(copy.store, RocksKvStore)
        batch = engine.batch()
        copy.store.begin(batch)
        copy.store.load(data)
        engine.write(batch, sync=False)
        copy.store.end()
        assert copy.store.revision() == 301
        assert copy.store.keys == 300
        assert copy.get(b"k000") is not None and copy.get(b"k000").value == b"x" * 100  # type: ignore[union-attr]
        assert copy.get(b"k001") is not None and copy.get(b"new") is None
        assert copy.store.recall_request("r299") is not None
        assert copy.store.recall_request("later") is None
    finally:
        engine.close()


def test_rocksdb_snapshot_view_comes_in_chunks_of_about_a_mebibyte(tmp_path: Path) -> None:
    engine = Engine.open(tmp_path / "db", Identity("c", "n"), create=True)
    try:
        s = Shard(RocksKvStore(engine, group_id=3), engine)
        for i in range(30):
            s.put(b"k%03d" % i, b"x" * 100_000)
        assert isinstance(s.store, RocksKvStore)
        chunks = list(s.store.snapshot_view())
        assert b"".join(chunks) == s.store.dump()
        # 3 MB of values, and as much again in the watch history's events.
        assert len(chunks) == 6
        # A chunk ends at the first record past the size: one record (<= 110 kB) over it.
        assert all(DUMP_CHUNK_BYTES <= len(c) < DUMP_CHUNK_BYTES + 110_000 for c in chunks[:-1])
        with pytest.raises(AssertionError):  # not while a batch is open
            s.store.begin(engine.batch())
            s.store.snapshot_view()
    finally:
        engine.close()
