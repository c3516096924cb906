"""One RocksDB per process (through rocksdict), shared by every Raft group on the node.

Column families:

- ``raft_log``   -- Raft log entries, key = group id (8 bytes) + index (8 bytes), big-endian so
  that the byte order is the numeric order and one group's entries are contiguous.
- ``raft_state`` -- per group: hard state, applied index + configuration, snapshot.
- ``data``       -- the state machines' data, keys prefixed by group id.
- ``watch``      -- the state machines' change history, keys prefixed by group id.
- ``default``    -- the node's identity (cluster id, node name, format version).

Every change is staged in a :class:`Batch` and written atomically by :meth:`Engine.write`; the
host writes the Readys of all its groups in ONE batch with ONE fsync (group commit). A
:class:`ReadView` reads some column families as they were at one moment, while writes go on
(state machine snapshots are dumped from one in a thread). rocksdict errors are translated
here, at this boundary, into :mod:`dkv.errors` types.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from rocksdict import (
    ColumnFamily,
    Options,
    Rdict,
    RdictIter,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from dkv.errors import DataDirError, DkvError, InvalidArgument

__all__ = [
    "CF_DATA",
    "CF_RAFT_LOG",
    "CF_RAFT_STATE",
    "CF_WATCH",
    "COLUMN_FAMILIES",
    "FORMAT_VERSION",
    "Batch",
    "Engine",
    "Identity",
    "ReadView",
]

CF_RAFT_LOG = "raft_log"
CF_RAFT_STATE = "raft_state"
CF_DATA = "data"
CF_WATCH = "watch"
COLUMN_FAMILIES = (CF_RAFT_LOG, CF_RAFT_STATE, CF_DATA, CF_WATCH)
FORMAT_VERSION = 1
MEMTABLES_BYTES_MAX = 64 << 20
"""What the memtables of every column family together may hold before RocksDB flushes the
largest (``db_write_buffer_size``)."""
_IDENTITY_KEY = b"dkv/identity"
_READ_VIEW_TRIES = 100


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a data directory belongs to. A node refuses a directory of another identity: starting
    node "b" on node "a"'s data, or joining a cluster with another cluster's data, would
    silently corrupt both."""

    cluster_id: str
    node_name: str
    format_version: int = FORMAT_VERSION

    def describe(self) -> str:
        return f"node {self.node_name!r} of cluster {self.cluster_id!r}"


class Batch:
    """Writes staged for one atomic RocksDB write."""

    __slots__ = ("_cfs", "_wb", "bytes_staged", "ops")

    def __init__(self, cfs: dict[str, ColumnFamily]) -> None:
        self._wb = WriteBatch(raw_mode=True)
        self._cfs = cfs
        self.ops = 0
        self.bytes_staged = 0

    def put(self, cf: str, key: bytes, value: bytes) -> None:
        self._wb.put(key, value, self._cfs[cf])
        self.ops += 1
        self.bytes_staged += len(key) + len(value)

    def delete(self, cf: str, key: bytes) -> None:
        self._wb.delete(key, self._cfs[cf])
        self.ops += 1

    def delete_range(self, cf: str, lo: bytes, hi: bytes) -> None:
        """Delete keys in ``[lo, hi)``."""
        self._wb.delete_range(lo, hi, self._cfs[cf])
        self.ops += 1

    @property
    def raw(self) -> WriteBatch:
        return self._wb


class ReadView:
    """Some column families as they were when :meth:`Engine.read_view` made this view: later
    writes are not seen. Made cheaply (no copy: RocksDB keeps what the view needs until it
    is closed), so it can be taken on the event loop and read at length elsewhere.

    One RocksDB iterator per column family, all made at one sequence number. An iterator
    made without ``ReadOptions.snapshot`` reads "an implicit snapshot of the DB as of its
    creation" (RocksDB wiki, Iterator); an explicit ``Rdict.snapshot()`` would do as well,
    but rocksdict 0.3.29's ``Snapshot.iter`` (and ``items``) read the current DB instead
    (the snapshot is set on a copy of the read options the iterator never uses; checked:
    a key changed after the snapshot is seen changed), and only its point reads honour it.

    Not safe for concurrent use: scan from one thread at a time (any thread). A view pins
    the memtables and files it reads from memory and disk, so close it when done."""

    __slots__ = ("_iters",)

    def __init__(self, iters: dict[str, RdictIter]) -> None:
        self._iters = iters

    def scan(self, cf: str, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Key-value pairs with ``lo <= key < hi`` in key order, as of the view."""
        it = self._iters.get(cf)
        if it is None:
            raise InvalidArgument(f"column family {cf} is not in this view (or it is closed)")
        # The iterators have no upper bound (it is fixed when an iterator is made, and one
        # iterator serves every range of its column family): stop at ``hi`` here.
        it.seek(lo)
        while it.valid():
            key: bytes = it.key()
            if key >= hi:
                return
            yield key, it.value()
            it.next()

    def close(self) -> None:
        """Let RocksDB release what the view pinned."""
        self._iters.clear()


class Engine:
    """The node's RocksDB. Safe to call from several threads (RocksDB is)."""

    def __init__(self, path: Path, db: Rdict, identity: Identity) -> None:
        self.path = path
        self._db = db
        self.identity = identity
        # Handles are what a WriteBatch takes; views (Rdicts of one column family) read.
        self._cfs = {name: db.get_column_family_handle(name) for name in COLUMN_FAMILIES}
        self._views = {name: db.get_column_family(name) for name in COLUMN_FAMILIES}
        self._sync = WriteOptions()
        self._sync.sync = True
        self._nosync = WriteOptions()
        self._lock = threading.Lock()
        # Counters for tests and metrics: group commit is judged by syncs per entry.
        self.writes = 0
        self.sync_writes = 0
        self._closed = False

    def size_bytes(self) -> int | None:
        """RocksDB's own size of every column family: SST files plus memtables (for
        ``dkv_storage_db_size_bytes``); None once closed."""
        if self._closed:
            return None
        total = 0
        for view in (self._db, *self._views.values()):
            for prop in ("rocksdb.total-sst-files-size", "rocksdb.cur-size-all-mem-tables"):
                value = view.property_int_value(prop)
                total += int(value or 0)
        return total

    def compaction_figures(self) -> tuple[int, int, int | None] | None:
        """(compactions running, estimated pending compaction bytes, compactions completed or
        None when RocksDB's stats text cannot be read) for the ``dkv_storage_compaction*``
        metrics; None once closed. ``num-running-compactions`` is a DB-wide property (the same
        on every handle), pending bytes are per column family (summed). The completed count
        is the "Low" priority row's ``Comp(cnt)`` of each family's compaction stats (the
        "High" row counts memtable flushes); RocksDB has no integer property for it."""
        if self._closed:
            return None
        running = int(self._db.property_int_value("rocksdb.num-running-compactions") or 0)
        pending = 0
        done: int | None = 0
        for view in (self._db, *self._views.values()):
            value = view.property_int_value("rocksdb.estimate-pending-compaction-bytes")
            pending += int(value or 0)
            count = _low_priority_compactions(
                view.property_value("rocksdb.cfstats-no-file-histogram") or ""
            )
            done = None if count is None or done is None else done + count
        return running, pending, done

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, identity: Identity, *, create: bool) -> Engine:
        """Open (or, with ``create``, initialise) the data directory at ``path``.

        Raises DataDirError with a one-line reason when the directory is missing (and not
        ``create``), unreadable, or belongs to another identity."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise DataDirError(f"data dir {path} is not a directory")
        exists = (path / "CURRENT").is_file()
        if not exists:
            if not create:
                raise DataDirError(
                    f"data dir {path} holds no data; start a new member with "
                    "--initial-cluster-state new, or point --data-dir at this node's data"
                )
            if path.exists() and any(path.iterdir()):
                raise DataDirError(f"data dir {path} is not empty and holds no dkv data")
        opts = Options(raw_mode=True)
        # One budget for the memtables of all column families: RocksDB's default is 64 MiB
        # per family with two of them each, up to 640 MiB for our five, so a node's memory
        # grew with the write rate (issue 12: RSS at most 200 MB under the put rows).
        opts.set_db_write_buffer_size(MEMTABLES_BYTES_MAX)
        opts.create_if_missing(create)
        opts.create_missing_column_families(True)
        try:
            db = Rdict(
                str(path),
                options=opts,
                column_families={name: Options(raw_mode=True) for name in COLUMN_FAMILIES},
            )
        except Exception as exc:  # rocksdict raises plain Exception subclasses
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataDirError(f"cannot open data dir {path}: {reason}") from exc
        try:
            stored = db.get(_IDENTITY_KEY)
            if stored is None:
                if exists:
                    raise DataDirError(f"data dir {path} has no dkv identity; refusing to use it")
                blob = json.dumps(asdict(identity), sort_keys=True).encode()
                wo = WriteOptions()
                wo.sync = True
                db.put(_IDENTITY_KEY, blob, wo)
            else:
                found = _decode_identity(path, stored)
                if found.format_version != FORMAT_VERSION:
                    raise DataDirError(
                        f"data dir {path} has format version {found.format_version}; "
                        f"this build reads version {FORMAT_VERSION}"
                    )
                if (found.cluster_id, found.node_name) != (
                    identity.cluster_id,
                    identity.node_name,
                ):
                    raise DataDirError(
                        f"data dir {path} belongs to {found.describe()}, not {identity.describe()}"
                    )
        except DataDirError:
            db.close()
            raise
        return cls(path, db, identity)

    # -- writing --------------------------------------------------------------------------------

    def batch(self) -> Batch:
        return Batch(self._cfs)

    def write(self, batch: Batch, *, sync: bool) -> None:
        """Apply ``batch`` atomically; with ``sync``, return only once it is on stable storage."""
        if batch.ops == 0:
            return
        self._db.write(batch.raw, self._sync if sync else self._nosync)
        with self._lock:
            self.writes += 1
            if sync:
                self.sync_writes += 1

    def sync(self) -> None:
        """Make every write so far durable: fsync RocksDB's write-ahead log (``FlushWAL(true)``).

        ``write(batch, sync=False)`` followed by ``sync()`` is as durable as a synced write once
        ``sync`` returns, and a crash before that loses a suffix of whole batches (RocksDB
        replays its WAL to the last intact record), never part of one. The point is the GIL: a
        synced ``write`` holds it through the fsync, ``flush_wal`` releases it (measured,
        docs/benchmarks.md, lever 1), so the event loop runs while a thread waits for the disk."""
        self._db.flush_wal(True)
        with self._lock:
            self.sync_writes += 1

    # -- reading --------------------------------------------------------------------------------

    def get(self, cf: str, key: bytes) -> bytes | None:
        value = self._views[cf].get(key)
        if value is not None and not isinstance(value, bytes):
            raise InvalidArgument(f"unexpected value type {type(value).__name__} in {cf}")
        return value

    def scan(self, cf: str, lo: bytes, hi: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Key-value pairs with ``lo <= key < hi`` in key order."""
        ro = ReadOptions()
        ro.set_iterate_upper_bound(hi)
        # The iterator's lower bound option is ignored by rocksdict (FIELD-NOTES): seek instead.
        it = self._views[cf].iter(ro)
        it.seek(lo)
        while it.valid():
            yield it.key(), it.value()
            it.next()

    def read_view(self, cfs: Iterable[str]) -> ReadView:
        """A consistent point-in-time view of the column families ``cfs`` (see ReadView).

        Consistent across the families: the view's iterators are made with no write in
        between (RocksDB's sequence number did not move while they were made; retried if it
        did, which needs a write from another thread exactly then; DkvError after many
        tries)."""
        names = list(cfs)
        ro = ReadOptions()
        # A bulk scan: do not evict the blocks the requests use. (rocksdict's stub omits the
        # argument that the method takes.)
        ro.fill_cache(False)  # type: ignore[call-arg]
        for _ in range(_READ_VIEW_TRIES):
            seq = self._db.latest_sequence_number()
            iters = {name: self._views[name].iter(ro) for name in names}
            if self._db.latest_sequence_number() == seq:
                return ReadView(iters)
        # Never seen: every write of ours is made on the event loop, where views are made too.
        raise DkvError(f"no read view of {names}: writes kept arriving while it was made")

    def last_key(self, cf: str, lo: bytes, hi: bytes) -> bytes | None:
        """The greatest key in ``[lo, hi)``, or None."""
        it = self._views[cf].iter(ReadOptions())
        it.seek_for_prev(hi)
        while it.valid():
            k: bytes = it.key()
            if k < hi:
                return k if k >= lo else None
            it.prev()
        return None

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Column family handles must be released before closing, or a reopen in this process
        # fails on the lock (FIELD-NOTES).
        self._cfs.clear()
        for view in self._views.values():
            view.close()
        self._views.clear()
        self._db.close()


def _low_priority_compactions(stats: str) -> int | None:
    """``Comp(cnt)`` of the ``Low`` row of a ``rocksdb.cfstats`` text (see
    :meth:`Engine.compaction_figures`); None when the text does not have that shape."""
    columns: list[str] | None = None
    for line in stats.splitlines():
        words = line.split()
        if words[:1] == ["Priority"]:
            columns = words
        elif columns is not None and words[:1] == ["Low"] and "Comp(cnt)" in columns:
            # Data rows have one more word than the header: "Files" holds "0/0", "Size" two.
            at = columns.index("Comp(cnt)") + 1
            try:
                return int(words[at])
            except (IndexError, ValueError):
                return None
    return 0 if columns is not None else None


def _decode_identity(path: Path, blob: bytes) -> Identity:
    try:
        raw = json.loads(blob)
        return Identity(
            cluster_id=str(raw["cluster_id"]),
            node_name=str(raw["node_name"]),
            format_version=int(raw["format_version"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise DataDirError(f"data dir {path} has an unreadable identity record") from exc
