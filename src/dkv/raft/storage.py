"""The core's read-only view of stable storage, and an in-memory implementation.

The core only ever *reads* stable storage; the host writes to it while processing a ``Ready``
(see :class:`dkv.raft.types.Ready`). Errors are the three ``StorageError`` kinds in
:mod:`dkv.errors`: ``Compacted``, ``Unavailable`` and ``SnapshotTemporarilyUnavailable``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dkv.errors import Compacted, InvalidArgument, InvariantViolation, Unavailable
from dkv.raft.types import (
    ENTRY_OVERHEAD_BYTES,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMetadata,
)

__all__ = ["MemoryStorage", "Storage", "limit_size"]


class Storage(Protocol):
    """What the core reads from stable storage.

    Indexes: the storage holds entries ``first_index() .. last_index()`` inclusive; the entry
    just before ``first_index()`` is covered by the snapshot, and ``term(first_index() - 1)``
    must still answer (it is the snapshot's term).
    """

    def initial_state(self) -> tuple[HardState, ConfState]:
        """The persisted hard state and the membership as of the last persisted snapshot/log."""
        ...

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries in ``[lo, hi)``; at least one entry if any is in range, even past max_bytes."""
        ...

    def term(self, index: int) -> int:
        """The term of entry ``index``, valid for ``first_index() - 1 <= index <= last_index()``."""
        ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot:
        """The most recent snapshot (may raise SnapshotTemporarilyUnavailable)."""
        ...


def limit_size(entries: Sequence[Entry], max_bytes: int | None) -> list[Entry]:
    """The longest prefix of ``entries`` within ``max_bytes``, but never empty if ``entries``
    is not: a single oversized entry must still make progress."""
    if max_bytes is None or not entries:
        return list(entries)
    # Hot path (every append and every Ready): inline Entry.size_bytes.
    total = 0
    for i, e in enumerate(entries):
        total += len(e.data) + ENTRY_OVERHEAD_BYTES
        if total > max_bytes and i > 0:
            return list(entries[:i])
    return list(entries)


class MemoryStorage:
    """In-memory :class:`Storage` with the mutators a host needs. Used by tests and the
    simulator; the RocksDB engine implements the same protocol.

    ``_ents[0]`` is a dummy entry holding the index and term of the last snapshot, so that
    ``term(first_index() - 1)`` always answers (etcd-io/raft's MemoryStorage does the same).
    """

    def __init__(self, conf_state: ConfState | None = None) -> None:
        """An empty storage, or with ``conf_state`` one bootstrapped as an initial member.

        Bootstrapping writes a snapshot at index 1, term 1 whose metadata carries the initial
        configuration, and a hard state at term 1 committing it (etcd's bootstrap does the
        same with entries). The configuration thereby lives *in the log*: a node that joins
        later starts empty, its leader finds index 1 compacted and sends that snapshot, so
        the newcomer learns the initial members before it replays any change to them. (With
        the configuration only outside the log, a joiner would replay "add node 4" onto an
        empty configuration and believe it is alone.) Every initial member must be
        bootstrapped with the same ``conf_state``; the first election is for term 2.
        """
        self._hard_state = HardState()
        self._snapshot = Snapshot()
        self._ents: list[Entry] = [Entry(term=0, index=0)]
        if conf_state is not None:
            if not conf_state.voters:
                raise InvalidArgument("bootstrapping needs at least one voter")
            meta = SnapshotMetadata(index=1, term=1, conf_state=conf_state)
            self._snapshot = Snapshot(metadata=meta)
            self._ents = [Entry(term=1, index=1)]
            self._hard_state = HardState(term=1, vote=0, commit=1)

    # -- Storage protocol --------------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._snapshot.metadata.conf_state

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        offset = self._ents[0].index
        if lo <= offset:
            raise Compacted(f"entries from {lo} compacted (first index {offset + 1})")
        if hi > self.last_index() + 1:
            raise Unavailable(
                f"entries up to {hi - 1} unavailable (last index {self.last_index()})"
            )
        return limit_size(self._ents[lo - offset : hi - offset], max_bytes)

    def term(self, index: int) -> int:
        offset = self._ents[0].index
        if index < offset:
            raise Compacted(f"term of {index} compacted (snapshot index {offset})")
        if index - offset >= len(self._ents):
            raise Unavailable(f"term of {index} unavailable (last index {self.last_index()})")
        return self._ents[index - offset].term

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        return self._ents[0].index + len(self._ents) - 1

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- mutators used by the host ------------------------------------------------------------

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    def set_hard_state(self, hs: HardState) -> None:
        self._hard_state = hs

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace the whole log with ``snap`` (a follower installing the leader's snapshot)."""
        if snap.metadata.index <= self._snapshot.metadata.index:
            return  # stale: we already have a newer snapshot
        self._snapshot = snap
        self._ents = [Entry(term=snap.metadata.term, index=snap.metadata.index)]

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record a snapshot of the state machine at ``index`` (which must be applied)."""
        if index <= self._snapshot.metadata.index:
            return self._snapshot
        if index > self.last_index():
            raise InvariantViolation(f"snapshot {index} is beyond last index {self.last_index()}")
        meta = SnapshotMetadata(index=index, term=self.term(index), conf_state=conf_state)
        self._snapshot = Snapshot(metadata=meta, data=data)
        return self._snapshot

    def compact(self, compact_index: int) -> None:
        """Discard entries before ``compact_index`` (log compaction, thesis §5.1). The entry at
        ``compact_index`` becomes the new dummy entry."""
        offset = self._ents[0].index
        if compact_index <= offset:
            raise Compacted(f"already compacted to {offset}")
        if compact_index > self.last_index():
            raise Unavailable(f"compact {compact_index} is beyond last index {self.last_index()}")
        i = compact_index - offset
        dummy = Entry(term=self._ents[i].term, index=self._ents[i].index)
        self._ents = [dummy, *self._ents[i + 1 :]]

    def append(self, entries: Sequence[Entry]) -> None:
        """Append entries; an entry at an index we already hold truncates the tail from there."""
        if not entries:
            return
        first = self.first_index()
        last = entries[0].index + len(entries) - 1
        if last < first:
            return  # entirely covered by the snapshot already
        if first > entries[0].index:
            entries = entries[first - entries[0].index :]
        offset = entries[0].index - self._ents[0].index
        if offset > len(self._ents):
            raise InvariantViolation(
                f"missing log entries: last {self.last_index()}, appending at {entries[0].index}"
            )
        del self._ents[offset:]
        self._ents.extend(entries)
