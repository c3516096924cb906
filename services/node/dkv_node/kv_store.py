"""The shard state machine's store in the node's RocksDB (a :class:`~dkv_node.kv_state.KvStore`).

Writes are staged into the host's shared :class:`~dkv.storage.Batch` between ``begin`` and
``end``, so a shard's data, its applied index (staged by the Raft storage) and every other
group's Ready land in one atomic write. Reads during an apply batch see the writes staged
earlier in it through an overlay.

Layout, every key prefixed by the group id (8 bytes):

- ``data``:  ``k`` + user key -> create_revision, mod_revision, version (3 x 8 bytes) + value;
  ``m/rev`` -> the shard's revision; ``m/compact`` -> the watch history's compact revision;
  ``r`` + request id -> revision (8 bytes) + serialized response; ``R`` + revision + request id
  -> b"" (the FIFO order in which request ids are forgotten).
- ``watch``: revision (8 bytes) + sequence within the revision (4 bytes) -> serialized Event.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

from dkv.errors import InvariantViolation
from dkv.storage import CF_DATA, CF_WATCH, Batch, Engine, ReadView, group_prefix
from dkv.v1 import kv_pb2
from dkv_node.kv_state import KeyRecord

__all__ = ["DUMP_CHUNK_BYTES", "RocksKvStore"]

_U64 = struct.Struct(">Q")
_REC = struct.Struct(">QQQ")
_EV = struct.Struct(">QI")
_DUMP = struct.Struct(">BII")  # snapshot record: column family tag, key length, value length
_TOMBSTONE = None
DUMP_CHUNK_BYTES = 1 << 20
"""About how much of a dump ``snapshot_view`` makes at a time (a record past it ends a chunk)."""


class RocksKvStore:
    """See the module docstring."""

    def __init__(
        self,
        engine: Engine,
        group_id: int,
        max_request_ids: int = 10_000,
        watch_history_max_events: int = 100_000,
    ) -> None:
        self.engine = engine
        self._p = group_prefix(group_id)
        self._p_end = group_prefix(group_id + 1)
        self.max_request_ids = max_request_ids
        self.watch_history_max_events = watch_history_max_events
        self._batch: Batch | None = None
        self._overlay: dict[bytes, KeyRecord | None] = {}
        self._pending_requests: dict[str, bytes] = {}
        # Request-id index keys deleted in the open batch (a scan cannot see staged deletes).
        # Where the scan for the oldest request id starts: past the last one forgotten. A
        # scan from the start of the table steps over the tombstone of every id forgotten
        # since RocksDB last compacted them, which made each write with an id slower than
        # the one before (the watch history's trim had the same shape: bench-scale).
        self._evict_after: bytes | None = None
        self._pending_order: list[bytes] = []  # request-id index keys staged, oldest first
        self._staged_events: list[tuple[int, int]] = []  # (revision, events) staged
        # A snapshot was loaded into the open batch: RocksDB's current keys are all being
        # deleted, so reads must come from the overlay alone until the batch is written.
        self._restored = False
        self._load_counters()

    def _load_counters(self) -> None:
        engine = self.engine
        rev = engine.get(CF_DATA, self._p + b"m/rev")
        self._rev = _U64.unpack(rev)[0] if rev else 0
        comp = engine.get(CF_DATA, self._p + b"m/compact")
        self._compact_rev = _U64.unpack(comp)[0] if comp else 0
        # Counts kept in memory to enforce the bounds without scanning on every write; both
        # are bounded, so counting them once at start-up is cheap.
        self._events = sum(1 for _ in engine.scan(CF_WATCH, self._p, self._p_end))
        self._requests = sum(1 for _ in engine.scan(CF_DATA, self._p + b"R", self._p + b"S"))
        # Keys are not bounded: this one scan at start-up is O(keys) (about 1 s per million
        # here); after it the count is kept by put/delete (for ``dkv_node_keys``).
        self._keys = sum(1 for _ in engine.scan(CF_DATA, self._p + b"k", self._p + b"l"))

    @property
    def keys(self) -> int:
        """How many keys the shard holds (including writes staged in the open batch)."""
        return self._keys

    @property
    def request_ids(self) -> int:
        """How many request ids the dedup table remembers."""
        return self._requests

    # -- snapshots ------------------------------------------------------------------------------

    def snapshot_view(self) -> Iterator[bytes]:
        """This shard as of the last written batch, as the chunks of a ``dump`` (which they
        make when joined). Call between batches: the view is taken now, and cheaply (a
        RocksDB read view, no copy); the chunks are made as they are read, from that view
        only, so they may be read in another thread while later batches are written (the
        host's snapshots: a million keys take seconds to dump)."""
        if self._batch is not None:
            raise InvariantViolation("KV store snapshot taken while a batch is open")
        return self._dump_chunks(self.engine.read_view((CF_DATA, CF_WATCH)))

    def _dump_chunks(self, view: ReadView) -> Iterator[bytes]:
        # Reads nothing of ``self`` that changes (only the key prefix): safe in a thread.
        try:
            out = bytearray()
            skip = len(self._p)
            for tag, cf in ((0, CF_DATA), (1, CF_WATCH)):
                for key, value in view.scan(cf, self._p, self._p_end):
                    k = key[skip:]
                    out += _DUMP.pack(tag, len(k), len(value))
                    out += k
                    out += value
                    if len(out) >= DUMP_CHUNK_BYTES:
                        yield bytes(out)
                        out.clear()
            if out:
                yield bytes(out)
        finally:
            view.close()

    def dump(self) -> bytes:
        """Everything this shard stores (data, metadata, request ids, watch history) as one
        blob: the state machine part of a Raft snapshot. Call between batches."""
        return b"".join(self.snapshot_view())

    def load(self, blob: bytes) -> None:
        """Replace this shard's contents with a ``dump`` (staged into the open batch)."""
        b = self._b()
        b.delete_range(CF_DATA, self._p, self._p_end)
        b.delete_range(CF_WATCH, self._p, self._p_end)
        self._overlay.clear()
        self._pending_requests.clear()
        self._pending_order.clear()
        self._staged_events.clear()
        self._evict_after = None
        rev = compact = events = requests = keys = 0
        pos = 0
        while pos < len(blob):
            tag, klen, vlen = _DUMP.unpack_from(blob, pos)
            pos += _DUMP.size
            k, v = blob[pos : pos + klen], blob[pos + klen : pos + klen + vlen]
            pos += klen + vlen
            b.put(CF_DATA if tag == 0 else CF_WATCH, self._p + k, v)
            if tag == 1:
                events += 1
            elif k == b"m/rev":
                rev = _U64.unpack(v)[0]
            elif k == b"m/compact":
                compact = _U64.unpack(v)[0]
            elif k[:1] == b"R":
                requests += 1
            elif k[:1] == b"k":
                self._overlay[k[1:]] = _decode_record(v)
                keys += 1
        if pos != len(blob):
            raise InvariantViolation("truncated KV snapshot")
        self._rev, self._compact_rev, self._events, self._requests = rev, compact, events, requests
        self._keys = keys
        self._restored = True

    # -- batch lifecycle (the host) -------------------------------------------------------------

    def begin(self, batch: Batch) -> None:
        if self._batch is not None:
            raise InvariantViolation("KV store batch already open")
        self._batch = batch

    def end(self) -> None:
        """The batch was written: the overlay is now what RocksDB holds."""
        self._batch = None
        self._overlay.clear()
        self._pending_requests.clear()
        self._pending_order.clear()
        self._staged_events.clear()
        self._restored = False

    def _b(self) -> Batch:
        if self._batch is None:
            raise InvariantViolation("KV store written outside begin()/end()")
        return self._batch

    # -- keys -----------------------------------------------------------------------------------

    def _k(self, key: bytes) -> bytes:
        return self._p + b"k" + key

    def get(self, key: bytes) -> KeyRecord | None:
        if key in self._overlay or self._restored:
            return self._overlay.get(key)
        blob = self.engine.get(CF_DATA, self._k(key))
        return _decode_record(blob) if blob is not None else None

    def scan(self, lo: bytes, hi: bytes, limit: int) -> list[tuple[bytes, KeyRecord]]:
        """The first ``limit`` keys of ``[lo, hi)`` (``hi`` empty: to the end)."""
        return self.scan_page(lo, hi, limit)[0]

    def scan_page(
        self, lo: bytes, hi: bytes, limit: int, bytes_max: int = 0, count_values: bool = True
    ) -> tuple[list[tuple[bytes, KeyRecord]], bool]:
        """The first keys of ``[lo, hi)``: at most ``limit``, and (``bytes_max`` > 0) stop
        reading once ``bytes_max`` bytes of keys (and values, with ``count_values``) were
        read, past at least one key that is not hidden. Returns (keys in order, whether the
        range ended within them); what is returned is exact up to its last key."""
        start = self._k(lo)
        end = self._k(hi) if hi else self._p + b"l"  # b"l" is the tag after b"k"
        # Staged deletes may hide stored keys: read enough to still fill ``limit``.
        hidden = sum(1 for v in self._overlay.values() if v is _TOMBSTONE)
        found: dict[bytes, KeyRecord] = {}
        skip = len(self._p) + 1
        stored = () if self._restored else self.engine.scan(CF_DATA, start, end)
        size = 0
        last: bytes | None = None  # the first stored key not read, when reading stopped early
        for read, (k, v) in enumerate(stored):
            if read >= limit + hidden or (bytes_max and size >= bytes_max and read > hidden):
                last = k[skip:]
                break
            found[k[skip:]] = _decode_record(v)
            size += len(k) - skip + (len(v) if count_values else 0)
        for key, rec in self._overlay.items():
            if key >= lo and (not hi or key < hi) and (last is None or key < last):
                if rec is None:
                    found.pop(key, None)
                else:
                    found[key] = rec
        return sorted(found.items())[:limit], last is None

    def put(self, key: bytes, rec: KeyRecord) -> None:
        if rec.version == 1:  # the state machine creates a key with version 1
            self._keys += 1
        self._b().put(
            CF_DATA,
            self._k(key),
            _REC.pack(rec.create_revision, rec.mod_revision, rec.version) + rec.value,
        )
        self._overlay[key] = rec

    def delete(self, key: bytes) -> None:
        # The state machine deletes only keys that exist (it read them first).
        self._keys -= 1
        self._b().delete(CF_DATA, self._k(key))
        self._overlay[key] = _TOMBSTONE

    def revision(self) -> int:
        return self._rev

    def set_revision(self, revision: int) -> None:
        self._b().put(CF_DATA, self._p + b"m/rev", _U64.pack(revision))
        self._rev = revision

    # -- watch history --------------------------------------------------------------------------

    def append_events(self, revision: int, events: Sequence[kv_pb2.Event]) -> None:
        b = self._b()
        for seq, ev in enumerate(events):
            b.put(CF_WATCH, self._p + _EV.pack(revision, seq), ev.SerializeToString())
        self._staged_events.append((revision, len(events)))
        self._events += len(events)
        if self._events <= self.watch_history_max_events:
            return
        # Over the bound: forget a tenth of the history at once, not one revision per write.
        # Each trim is a RocksDB range delete, and every range tombstone slows the iterators
        # made after it until compaction: trimming per write made each put scan them all
        # (measured by `make bench-scale`: puts fell from ~1,600/s to 20-35/s once a shard's
        # history reached the bound, 97% of the leader's time in this scan).
        keep = self.watch_history_max_events - self.watch_history_max_events // 10
        excess = self._events - keep
        # Forget whole revisions, oldest first (stored ones, then ones staged earlier in this
        # batch), until within the bound; never the revision being written.
        drop_to, dropped = self._compact_rev, 0
        for rev, n in self._event_revisions_oldest_first():
            if dropped >= excess or rev >= revision:
                break
            drop_to, dropped = rev, dropped + n
        if drop_to > self._compact_rev:
            # One range delete covers stored and staged events alike.
            b.delete_range(CF_WATCH, self._p, self._p + _EV.pack(drop_to + 1, 0))
            b.put(CF_DATA, self._p + b"m/compact", _U64.pack(drop_to))
            self._compact_rev = drop_to
            self._events -= dropped
            self._staged_events = [(r, n) for r, n in self._staged_events if r > drop_to]

    def _event_revisions_oldest_first(self) -> Iterator[tuple[int, int]]:
        """(revision, number of events) for every revision still kept, oldest first."""
        lo = self._p + _EV.pack(self._compact_rev + 1, 0)
        current, count = -1, 0
        for key, _ in self.engine.scan(CF_WATCH, lo, self._p + b"\xff" * 12):
            rev = _EV.unpack(key[len(self._p) :])[0]
            if rev != current and count:
                yield current, count
                count = 0
            current, count = rev, count + 1
        if count:
            yield current, count
        yield from self._staged_events

    def events_since(
        self, revision: int, limit: int, bytes_max: int = 0
    ) -> tuple[list[tuple[int, kv_pb2.Event]], int]:
        out: list[tuple[int, kv_pb2.Event]] = []
        size = 0
        lo = self._p + _EV.pack(max(revision, 0), 0)
        for key, value in self.engine.scan(CF_WATCH, lo, self._p + b"\xff" * 12):
            if len(out) >= limit or (bytes_max and size >= bytes_max):
                break
            out.append((_EV.unpack(key[len(self._p) :])[0], kv_pb2.Event.FromString(value)))
            size += len(value)
        return out, self._compact_rev

    # -- request ids ----------------------------------------------------------------------------

    def recall_request(self, request_id: str) -> bytes | None:
        if request_id in self._pending_requests:
            return self._pending_requests[request_id]
        blob = self.engine.get(CF_DATA, self._p + b"r" + request_id.encode())
        return blob[8:] if blob is not None else None

    def remember_request(self, request_id: str, revision: int, response: bytes) -> None:
        b = self._b()
        rid = request_id.encode()
        order_key = self._p + b"R" + _U64.pack(revision) + rid
        b.put(CF_DATA, self._p + b"r" + rid, _U64.pack(revision) + response)
        b.put(CF_DATA, order_key, b"")
        self._pending_requests[request_id] = response
        self._pending_order.append(order_key)
        self._requests += 1
        while self._requests > self.max_request_ids:
            self._forget_oldest_request(b)

    def _forget_oldest_request(self, b: Batch) -> None:
        """Forget the oldest id (FIFO by revision): a stored one, else one staged earlier in
        this batch (a scan cannot see staged writes, so those are tracked in memory)."""
        victim = None
        lo = self._evict_after or self._p + b"R"
        # A scan cannot see this batch's deletes; it need not: it starts past every id
        # forgotten so far, staged or written.
        for key, _ in self.engine.scan(CF_DATA, lo, self._p + b"S"):
            victim = key
            break
        if victim is None:
            victim = self._pending_order.pop(0)
            self._pending_requests.pop(victim[len(self._p) + 9 :].decode(), None)
        # Ids are forgotten in order (revision, then id): nothing older than this one is left.
        self._evict_after = victim + b"\x00"
        b.delete(CF_DATA, victim)
        b.delete(CF_DATA, self._p + b"r" + victim[len(self._p) + 9 :])
        self._requests -= 1


def _decode_record(blob: bytes) -> KeyRecord:
    c, m, v = _REC.unpack_from(blob)
    return KeyRecord(create_revision=c, mod_revision=m, version=v, value=blob[_REC.size :])
