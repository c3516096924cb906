"""Durable Raft storage for one group, in the node's shared RocksDB.

Implements :class:`dkv.raft.Storage` (what the core reads) plus ``stage_*`` methods with which
the host writes a ``Ready`` into a shared :class:`~dkv.storage.engine.Batch`. Staging updates
this object's in-memory view at once: the core only reads what it handed out in a Ready after
``advance()``, which the host calls after the batch was written, and a failed write is fatal to
the process, so the view never runs ahead of what a restart would find.

Layout (column ``raft_state``, key = group id + tag): ``hard`` = term, vote, commit; ``appl`` =
applied index + configuration at that index (written in the same batch as the state machine
data it covers, so a restart resumes exactly); ``snap`` = the last snapshot: the metadata's
length (8 bytes) and the metadata, then either the data, or (the length's top bit set) the
number of chunks (4 bytes) the data is stored in, under ``snpc`` + snapshot index (8 bytes) +
chunk number (4 bytes). The host writes a local snapshot's data in chunks, a few megabytes
per write, before the record that points at them (one write of a whole snapshot holds the
GIL for as long as RocksDB copies it: about a second for 300 MB here). Log entries are in
``raft_log`` under group id + index.

The newest ``cache_entries_max`` entries stay in memory: followers are served and terms are
checked from memory in the common case; older entries are read from RocksDB.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from dkv.errors import Compacted, InvariantViolation, Unavailable
from dkv.raft import codec
from dkv.raft.storage import limit_size
from dkv.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
)
from dkv.storage.engine import CF_RAFT_LOG, CF_RAFT_STATE, Batch, Engine
from dkv.v1 import raft_pb2

__all__ = ["RocksRaftStorage", "group_prefix"]

_U64 = struct.Struct(">Q")
_KEY = struct.Struct(">QQ")
_ENTRY_HEADER = struct.Struct(">QB")
_HARD = struct.Struct(">QQQ")
_U32 = struct.Struct(">I")
_CHUNKED = 1 << 63  # in a snapshot record's metadata length: the data is in chunks


def group_prefix(group_id: int) -> bytes:
    return _U64.pack(group_id)


def _encode_entry(e: Entry) -> bytes:
    return _ENTRY_HEADER.pack(e.term, int(e.type)) + e.data


def _decode_entry(index: int, blob: bytes) -> Entry:
    term, t = _ENTRY_HEADER.unpack_from(blob)
    return Entry(term=term, index=index, type=EntryType(t), data=blob[_ENTRY_HEADER.size :])


class RocksRaftStorage:
    """The Raft log, hard state, applied index and snapshot of one group."""

    def __init__(self, engine: Engine, group_id: int, cache_entries_max: int = 8192) -> None:
        if group_id < 0:
            raise InvariantViolation(f"negative group id {group_id}")
        self.engine = engine
        self.group_id = group_id
        self._prefix = group_prefix(group_id)
        self.cache_entries_max = cache_entries_max
        self._hard = self._load_hard_state()
        self._snapshot = self._load_snapshot()
        self._applied, self._applied_conf = self._load_applied()
        # The truncation point: index and term of the last entry removed from the log. It
        # trails the snapshot by the entries kept for slow followers (see stage_compact).
        self._trunc = self._load_truncation()
        first = self._trunc[0] + 1
        last_key = engine.last_key(CF_RAFT_LOG, self._log_key(first), self._log_key(2**64 - 1))
        self._last = _KEY.unpack(last_key)[1] if last_key is not None else first - 1
        # The in-memory tail: _cache[i] has index _cache_first + i.
        self._cache_first = max(first, self._last + 1 - cache_entries_max)
        self._cache: list[Entry] = []
        if self._cache_first <= self._last:
            self._cache = self._read(self._cache_first, self._last + 1)

    # -- keys -----------------------------------------------------------------------------------

    def _log_key(self, index: int) -> bytes:
        return _KEY.pack(self.group_id, index)

    def _state_key(self, tag: bytes) -> bytes:
        return self._prefix + tag

    def _chunk_key(self, index: int, seq: int) -> bytes:
        return self._prefix + b"snpc" + _U64.pack(index) + _U32.pack(seq)

    # -- loading --------------------------------------------------------------------------------

    def _load_hard_state(self) -> HardState:
        blob = self.engine.get(CF_RAFT_STATE, self._state_key(b"hard"))
        if blob is None:
            return HardState()
        term, vote, commit = _HARD.unpack(blob)
        return HardState(term=term, vote=vote, commit=commit)

    def _load_snapshot(self) -> Snapshot:
        blob = self.engine.get(CF_RAFT_STATE, self._state_key(b"snap"))
        if blob is None:
            return Snapshot()
        meta_len = _U64.unpack_from(blob)[0]
        chunked = bool(meta_len & _CHUNKED)
        meta_len &= ~_CHUNKED
        meta = codec.snapshot_metadata_from_proto(
            raft_pb2.SnapshotMetadata.FromString(blob[8 : 8 + meta_len])
        )
        if not chunked:
            return Snapshot(metadata=meta, data=blob[8 + meta_len :])
        chunks = _U32.unpack_from(blob, 8 + meta_len)[0]
        lo, hi = self._chunk_key(meta.index, 0), self._chunk_key(meta.index + 1, 0)
        parts: list[bytes] = []
        for key, value in self.engine.scan(CF_RAFT_STATE, lo, hi):
            if key != self._chunk_key(meta.index, len(parts)):
                break
            parts.append(value)
        if len(parts) != chunks:
            raise InvariantViolation(
                f"group {self.group_id}: snapshot {meta.index} has {len(parts)} of its "
                f"{chunks} chunks"
            )
        return Snapshot(metadata=meta, data=b"".join(parts))

    def _load_truncation(self) -> tuple[int, int]:
        blob = self.engine.get(CF_RAFT_STATE, self._state_key(b"trnc"))
        if blob is None:
            meta = self._snapshot.metadata
            return meta.index, meta.term
        index, term = _KEY.unpack(blob)
        return index, term

    def _stage_truncation(self, batch: Batch, index: int, term: int) -> None:
        batch.put(CF_RAFT_STATE, self._state_key(b"trnc"), _KEY.pack(index, term))
        self._trunc = (index, term)

    def _load_applied(self) -> tuple[int, ConfState]:
        blob = self.engine.get(CF_RAFT_STATE, self._state_key(b"appl"))
        if blob is None:
            meta = self._snapshot.metadata
            return meta.index, meta.conf_state
        index = _U64.unpack_from(blob)[0]
        cs = codec.conf_state_from_proto(raft_pb2.ConfState.FromString(blob[8:]))
        return index, cs

    def _read(self, lo: int, hi: int) -> list[Entry]:
        out = []
        expected = lo
        for key, value in self.engine.scan(CF_RAFT_LOG, self._log_key(lo), self._log_key(hi)):
            index = _KEY.unpack(key)[1]
            if index != expected:
                raise InvariantViolation(
                    f"group {self.group_id}: log hole at {expected} (found {index})"
                )
            out.append(_decode_entry(index, value))
            expected += 1
        if expected != hi:
            raise InvariantViolation(
                f"group {self.group_id}: log ends at {expected - 1} < {hi - 1}"
            )
        return out

    # -- Storage protocol -----------------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        # The configuration as of the applied index: the core starts with applied_index and
        # must see the membership that includes every configuration entry applied so far.
        return self._hard, self._applied_conf

    def first_index(self) -> int:
        return self._trunc[0] + 1

    def last_index(self) -> int:
        return self._last

    def term(self, index: int) -> int:
        trunc_index, trunc_term = self._trunc
        if index == trunc_index:
            return trunc_term
        if index < trunc_index:
            raise Compacted(f"term of {index} compacted (log starts after {trunc_index})")
        if index > self._last:
            raise Unavailable(f"term of {index} unavailable (last index {self._last})")
        if index >= self._cache_first:
            return self._cache[index - self._cache_first].term
        return self._read(index, index + 1)[0].term

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        first = self.first_index()
        if lo < first:
            raise Compacted(f"entries from {lo} compacted (first index {first})")
        if hi > self._last + 1:
            raise Unavailable(f"entries up to {hi - 1} unavailable (last index {self._last})")
        if lo >= self._cache_first:
            off = self._cache_first
            return limit_size(self._cache[lo - off : hi - off], max_bytes)
        return limit_size(self._read(lo, hi), max_bytes)

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- what the host reads --------------------------------------------------------------------

    @property
    def hard_state(self) -> HardState:
        return self._hard

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def conf_state(self) -> ConfState:
        return self._applied_conf

    # -- staging writes (the host) --------------------------------------------------------------

    def stage_append(self, batch: Batch, entries: Sequence[Entry]) -> None:
        """Append ``entries``; an index we hold already truncates our log from there."""
        if not entries:
            return
        first_new = entries[0].index
        if first_new <= self._trunc[0]:
            skip = self._trunc[0] + 1 - first_new
            entries = entries[skip:]
            if not entries:
                return
            first_new = entries[0].index
        if first_new > self._last + 1:
            raise InvariantViolation(
                f"group {self.group_id}: appending at {first_new} after last {self._last}"
            )
        if first_new <= self._last:
            # Conflict resolution truncated the tail: drop the stale entries durably too.
            batch.delete_range(CF_RAFT_LOG, self._log_key(first_new), self._log_key(self._last + 1))
        for e in entries:
            batch.put(CF_RAFT_LOG, self._log_key(e.index), _encode_entry(e))
        # Update the in-memory tail.
        if first_new < self._cache_first:
            self._cache = list(entries)
            self._cache_first = first_new
        else:
            del self._cache[first_new - self._cache_first :]
            self._cache.extend(entries)
        self._last = entries[-1].index
        excess = len(self._cache) - self.cache_entries_max
        if excess > 0:
            del self._cache[:excess]
            self._cache_first += excess

    def stage_hard_state(self, batch: Batch, hs: HardState) -> None:
        batch.put(CF_RAFT_STATE, self._state_key(b"hard"), _HARD.pack(hs.term, hs.vote, hs.commit))
        self._hard = hs

    def rewind_applied_to_snapshot(self) -> None:
        """Start applying again after the latest snapshot: for a state machine that keeps its
        state in memory, restored from that snapshot at start (the entries after it are
        applied again). Changes nothing on disk."""
        meta = self._snapshot.metadata
        self._applied, self._applied_conf = meta.index, meta.conf_state

    def stage_applied(self, batch: Batch, index: int, conf_state: ConfState) -> None:
        """Record the applied index and the configuration at it, in the same batch as the state
        machine's writes for the entries up to ``index``."""
        if index < self._applied:
            raise InvariantViolation(f"applied index going back: {index} < {self._applied}")
        cs = codec.conf_state_to_proto(conf_state).SerializeToString()
        batch.put(CF_RAFT_STATE, self._state_key(b"appl"), _U64.pack(index) + cs)
        self._applied, self._applied_conf = index, conf_state

    def stage_snapshot_chunk(self, batch: Batch, index: int, seq: int, data: bytes) -> None:
        """Stage chunk ``seq`` (from 0) of the data of a snapshot at ``index`` that a later
        ``stage_snapshot(..., chunks=n)`` records. Until then nothing reads the chunk: a
        crash in between leaves chunks that the next recorded snapshot deletes."""
        batch.put(CF_RAFT_STATE, self._chunk_key(index, seq), data)

    def stage_snapshot(self, batch: Batch, snap: Snapshot, *, chunks: int = 0) -> None:
        """Record ``snap`` as the latest snapshot (taken locally or received from the leader).

        With ``chunks`` > 0 its data was written already, in that many chunks (see
        ``stage_snapshot_chunk``, which must have been written before this batch); otherwise
        the data is staged in the record. Chunks of every other snapshot are deleted.

        A received snapshot newer than our log replaces the whole log; a local one (at or below
        our last index) leaves the log alone -- compaction is a separate step."""
        meta = snap.metadata
        if meta.index <= self._snapshot.metadata.index:
            return
        meta_blob = codec.snapshot_metadata_to_proto(meta).SerializeToString()
        if chunks > 0:
            record = _U64.pack(len(meta_blob) | _CHUNKED) + meta_blob + _U32.pack(chunks)
            batch.delete_range(CF_RAFT_STATE, self._chunk_key(0, 0), self._chunk_key(meta.index, 0))
            batch.delete_range(
                CF_RAFT_STATE, self._chunk_key(meta.index + 1, 0), self._prefix + b"snpd"
            )
        else:
            record = _U64.pack(len(meta_blob)) + meta_blob + snap.data
            batch.delete_range(CF_RAFT_STATE, self._chunk_key(0, 0), self._prefix + b"snpd")
        batch.put(CF_RAFT_STATE, self._state_key(b"snap"), record)
        replaces_log = meta.index > self._last or self.term_or_zero(meta.index) != meta.term
        self._snapshot = snap
        if replaces_log:
            batch.delete_range(CF_RAFT_LOG, self._log_key(0), self._log_key(meta.index + 1))
            if self._last > meta.index:
                batch.delete_range(
                    CF_RAFT_LOG, self._log_key(meta.index + 1), self._log_key(self._last + 1)
                )
            self._last = meta.index
            self._cache = []
            self._cache_first = meta.index + 1
            self._stage_truncation(batch, meta.index, meta.term)
        if meta.index > self._applied and replaces_log:
            # Installing a snapshot applies it: data and applied index move together (the
            # state machine stages its data in this same batch).
            self._applied, self._applied_conf = meta.index, meta.conf_state
            cs = codec.conf_state_to_proto(meta.conf_state).SerializeToString()
            batch.put(CF_RAFT_STATE, self._state_key(b"appl"), _U64.pack(meta.index) + cs)

    def term_or_zero(self, index: int) -> int:
        try:
            return self.term(index)
        except (Compacted, Unavailable):
            return 0

    def stage_compact(self, batch: Batch, compact_index: int) -> None:
        """Drop log entries up to and including ``compact_index`` (which a snapshot covers)."""
        if compact_index > self._snapshot.metadata.index:
            raise InvariantViolation(
                f"compacting to {compact_index} beyond snapshot {self._snapshot.metadata.index}"
            )
        if compact_index <= self._trunc[0]:
            return  # already compacted that far
        term = self.term(compact_index)
        batch.delete_range(CF_RAFT_LOG, self._log_key(0), self._log_key(compact_index + 1))
        self._stage_truncation(batch, compact_index, term)
        if compact_index >= self._cache_first:
            drop = compact_index + 1 - self._cache_first
            del self._cache[:drop]
            self._cache_first = compact_index + 1
