"""The replicated log as the core sees it: stable storage plus an unstable tail.

``RaftLog`` = entries already on stable storage (read through :class:`Storage`) followed by
``Unstable`` entries (and possibly a snapshot) that the host has not yet persisted. The core
appends to the unstable part; the host persists it from a ``Ready`` and ``advance`` moves the
boundary. Indexes in the comments: ``committed`` is the highest index known to be stored on a
quorum (thesis §3.5), ``applied`` the highest index handed to the state machine.
"""

from __future__ import annotations

from collections.abc import Sequence

from dkv.errors import Compacted, InvariantViolation, Unavailable
from dkv.raft.storage import Storage, limit_size
from dkv.raft.types import Entry, Snapshot

__all__ = ["RaftLog", "Unstable"]


class Unstable:
    """Entries (and at most one snapshot) not yet on stable storage.

    ``entries[i]`` has index ``offset + i``. If ``snapshot`` is set, ``offset`` is its index + 1.
    """

    __slots__ = ("entries", "offset", "snapshot")

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset

    def maybe_first_index(self) -> int | None:
        if self.snapshot is not None:
            return self.snapshot.metadata.index + 1
        return None

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.metadata.index
        return None

    def maybe_term(self, index: int) -> int | None:
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.metadata.index == index:
                return self.snapshot.metadata.term
            return None
        last = self.maybe_last_index()
        if last is None or index > last:
            return None
        return self.entries[index - self.offset].term

    def stable_to(self, index: int, term: int) -> None:
        """The host persisted entries up to ``index`` (with ``term``); drop them from here.

        If the entry at ``index`` was since replaced by one of another term, the persisted entry
        is stale and nothing is dropped: the new one still needs persisting.
        """
        t = self.maybe_term(index)
        if t is None or t != term or index < self.offset:
            return
        del self.entries[: index + 1 - self.offset]
        self.offset = index + 1

    def stable_snap_to(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.metadata.index == index:
            self.snapshot = None

    def restore(self, snap: Snapshot) -> None:
        self.offset = snap.metadata.index + 1
        self.entries = []
        self.snapshot = snap

    def truncate_and_append(self, ents: Sequence[Entry]) -> None:
        after = ents[0].index
        if after == self.offset + len(self.entries):
            self.entries.extend(ents)  # the common case: a plain append
        elif after <= self.offset:
            # Replacing the whole unstable tail (and possibly some stable entries: the host's
            # persist of these entries truncates storage from ``after`` on).
            self.offset = after
            self.entries = list(ents)
        else:
            del self.entries[after - self.offset :]
            self.entries.extend(ents)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        if lo < self.offset or hi > self.offset + len(self.entries):
            raise InvariantViolation(
                f"unstable slice [{lo},{hi}) out of [{self.offset},"
                f"{self.offset + len(self.entries)})"
            )
        return self.entries[lo - self.offset : hi - self.offset]


class RaftLog:
    """Stable storage + unstable tail, with the commit and apply cursors."""

    __slots__ = ("applied", "committed", "max_committed_bytes_per_ready", "storage", "unstable")

    def __init__(self, storage: Storage, max_committed_bytes_per_ready: int) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        # Everything up to the snapshot is committed and applied by definition.
        self.committed = first - 1
        self.applied = first - 1
        self.max_committed_bytes_per_ready = max_committed_bytes_per_ready

    def __repr__(self) -> str:
        return (
            f"RaftLog(committed={self.committed}, applied={self.applied}, "
            f"unstable.offset={self.unstable.offset}, unstable.len={len(self.unstable.entries)})"
        )

    # -- indexes and terms --------------------------------------------------------------------

    def first_index(self) -> int:
        i = self.unstable.maybe_first_index()
        return i if i is not None else self.storage.first_index()

    def last_index(self) -> int:
        i = self.unstable.maybe_last_index()
        return i if i is not None else self.storage.last_index()

    def term(self, index: int) -> int:
        """Term of ``index``; raises Compacted / Unavailable outside the retained range."""
        t = self.unstable.maybe_term(index)
        if t is not None:
            return t
        # The valid range is [first_index - 1, last_index]: the entry before the first is
        # covered by the snapshot, whose term is still known.
        if index < self.first_index() - 1:
            raise Compacted(f"term of {index} compacted")
        if index > self.last_index():
            raise Unavailable(f"term of {index} unavailable")
        return self.storage.term(index)

    def term_or_zero(self, index: int) -> int:
        """Term of ``index``, or 0 if it is compacted or beyond the log (never matches)."""
        try:
            return self.term(index)
        except (Compacted, Unavailable):
            return 0

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        return self.term_or_zero(index) == term

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Whether a candidate's log is at least as up-to-date as ours (thesis §3.6.1)."""
        lt = self.last_term()
        return term > lt or (term == lt and last_index >= self.last_index())

    # -- appending ----------------------------------------------------------------------------

    def maybe_append(
        self, index: int, log_term: int, committed: int, ents: Sequence[Entry]
    ) -> int | None:
        """Follower side of AppendEntries (thesis §3.5, figure 3.1 receiver steps 2-5).

        Returns the index of the last new entry, or None if our log does not contain an entry
        at ``index`` with ``log_term`` (the consistency check fails).
        """
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(ents)
        ci = self.find_conflict(ents)
        if ci != 0:
            if ci <= self.committed:
                raise InvariantViolation(
                    f"entry {ci} conflicts with committed entry (committed {self.committed})"
                )
            self.append(ents[ci - index - 1 :])
        self.commit_to(min(committed, last_new))
        return last_new

    def append(self, ents: Sequence[Entry]) -> int:
        if not ents:
            return self.last_index()
        after = ents[0].index - 1
        if after < self.committed:
            raise InvariantViolation(f"append after {after} is below committed {self.committed}")
        self.unstable.truncate_and_append(ents)
        return self.last_index()

    def find_conflict(self, ents: Sequence[Entry]) -> int:
        """Index of the first entry of ``ents`` that is new or conflicts with ours, else 0.

        Entries we already hold with the same term are skipped, so a duplicated or reordered
        AppendEntries never truncates entries that a later one added (thesis §3.5 step 3).
        """
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= ``index`` whose term is <= ``term``, with that term.

        Lets a leader skip all entries of a conflicting term in one round trip instead of one
        index per round trip (thesis §3.5, the optimisation at the end of the section).
        """
        while index > 0:
            try:
                t = self.term(index)
            except (Compacted, Unavailable):
                return index, 0
            if t <= term:
                return index, t
            index -= 1
        return 0, 0

    # -- reading ------------------------------------------------------------------------------

    def slice(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
        """Entries in ``[lo, hi)`` within ``max_bytes`` (at least one). Raises Compacted."""
        if lo > hi:
            raise InvariantViolation(f"invalid slice {lo} > {hi}")
        first = self.first_index()
        if lo < first:
            raise Compacted(f"slice from {lo} compacted (first index {first})")
        if hi > self.last_index() + 1:
            raise InvariantViolation(f"slice to {hi} beyond last index {self.last_index()}")
        if lo == hi:
            return []
        off = self.unstable.offset
        if lo >= off:
            return limit_size(self.unstable.slice(lo, hi), max_bytes)
        ents = self.storage.entries(lo, min(hi, off), max_bytes)
        if hi <= off or len(ents) < off - lo:
            return ents  # all from storage, or storage stopped early at max_bytes
        # Spans storage and the unstable tail: limit the combined list once.
        ents.extend(self.unstable.slice(off, hi))
        return limit_size(ents, max_bytes)

    def entries_from(self, index: int, max_bytes: int | None) -> list[Entry]:
        if index > self.last_index():
            return []
        return self.slice(index, self.last_index() + 1, max_bytes)

    def unstable_entries(self) -> list[Entry]:
        return list(self.unstable.entries)

    def has_next_committed_entries(self) -> bool:
        return self.committed > self.applied and self.applied + 1 >= self.first_index()

    def next_committed_entries(self) -> list[Entry]:
        if not self.has_next_committed_entries():
            return []
        return self.slice(self.applied + 1, self.committed + 1, self.max_committed_bytes_per_ready)

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    # -- cursors ------------------------------------------------------------------------------

    def commit_to(self, index: int) -> None:
        # Never decrease the commit index (a stale message can carry an older one).
        if index > self.committed:
            if index > self.last_index():
                raise InvariantViolation(
                    f"commit {index} out of range (last index {self.last_index()})"
                )
            self.committed = index

    def maybe_commit(self, max_index: int, term: int) -> bool:
        """Advance commit to ``max_index`` only if that entry is of ``term`` (the leader's
        current term): Raft never commits older-term entries by counting replicas (thesis
        §3.6.2, figure 3.7 -- the "figure 8" problem of the paper)."""
        if max_index > self.committed and self.term_or_zero(max_index) == term:
            self.commit_to(max_index)
            return True
        return False

    def applied_to(self, index: int) -> None:
        if index == 0:
            return
        if index > self.committed or index < self.applied:
            raise InvariantViolation(
                f"applied {index} out of range [{self.applied}, {self.committed}]"
            )
        self.applied = index

    def stable_to(self, index: int, term: int) -> None:
        self.unstable.stable_to(index, term)

    def stable_snap_to(self, index: int) -> None:
        self.unstable.stable_snap_to(index)

    def restore(self, snap: Snapshot) -> None:
        """Replace the log with a snapshot received from the leader."""
        self.committed = snap.metadata.index
        self.unstable.restore(snap)
