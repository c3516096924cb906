"""Raft safety invariants, checked incrementally while a simulation runs.

The simulator (:mod:`dkv.testing.sim`) reports every observable event to one
:class:`RaftInvariants`: a node's role and term after each step, every batch of entries a
node's storage persists (and what that batch truncated), every entry a node applies, every
snapshot a node installs. Each report is checked at once against what the run has seen so far,
so a breach is caught at the step that caused it, with the node, index and terms named. They
run after every step of every seed, so each costs O(size of the report) -- dictionary lookups,
never a scan of the history -- except the full leader-completeness check when a node becomes
leader, which walks its retained log once per election.

The properties are the ones of the Raft paper's figure 3 / thesis figure 3.2:

- **Election safety**: at most one leader per term, over the whole run, crashed or removed
  nodes included (:meth:`RaftInvariants.observe_role`).
- **Log matching**: two logs holding an entry with the same index and term are identical up to
  it. Checked locally: every (index, term) ever persisted anywhere maps to one payload and one
  predecessor term. By induction on the index that is the whole property for every pair of
  logs over their common range (:meth:`RaftInvariants.observe_append`).
- **Leader completeness**: a committed entry is in the log of every leader of a later term
  (:meth:`RaftInvariants.check_leader_log`, run when a node becomes leader and for the current
  leaders whenever a new entry is committed).
- **State-machine safety**: no two nodes apply different entries at one index, and a restarted
  node re-applies exactly what it applied before (:meth:`RaftInvariants.observe_apply`).
- **Committed entries are durable**: no storage ever truncates or snapshots over a committed
  entry, and the newest committed entry is held by enough voters' durable storage that no
  quorum of the current configuration lacks it (:meth:`RaftInvariants.check_durable_quorum`,
  run after crashes and at the end).

What "committed" means here: the checker cannot see a leader's count of replicas, so an entry
is recorded as committed when the first node *applies* it (only committed entries are ever
applied). The term in which it was committed is not observable either; what is, is an upper
bound: the applying node's current term (the commit index it acted on came from a leader of that
term or an earlier one). Leader completeness is only asserted for leaders of a term above that
bound, which keeps the check sound: it cannot fire on a correct run.

The whole-state functions at the bottom (:func:`check_log_matching`,
:func:`check_applied_entries`, :func:`check_state_machines`, :func:`check_history`) check a
complete state at once; the simulator runs them at the end as a cross-check of the incremental
checks (and for what only the end can see: equal applied indexes must mean equal state machines,
the client history must be linearizable), and the tests use them on hand-made states.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from dkv.errors import InvariantViolation
from dkv.raft import Entry, EntryType
from dkv.testing.linearizability import CheckResult, Operation, check_operations_verbose
from dkv.testing.models import kv_model

__all__ = [
    "APPLIED_CONSISTENT",
    "COMMITTED_DURABLE",
    "ELECTION_SAFETY",
    "LEADER_COMPLETENESS",
    "LINEARIZABILITY",
    "LOG_MATCHING",
    "STATE_MACHINE_SAFETY",
    "CommittedEntry",
    "DurableLog",
    "InvariantFailure",
    "LogView",
    "RaftInvariants",
    "check_applied_entries",
    "check_history",
    "check_log_matching",
    "check_state_machines",
]

ELECTION_SAFETY = "election safety"
LOG_MATCHING = "log matching"
LEADER_COMPLETENESS = "leader completeness"
STATE_MACHINE_SAFETY = "state machine safety"
COMMITTED_DURABLE = "committed entries are durable"
APPLIED_CONSISTENT = "equal applied index, equal state"
LINEARIZABILITY = "linearizability"


class InvariantFailure(InvariantViolation):
    """A safety property was breached. ``invariant`` names it (one of the constants above);
    ``detail`` says where and how, in words a human can check against the trace."""

    def __init__(self, invariant: str, detail: str) -> None:
        self.invariant = invariant
        self.detail = detail
        super().__init__(f"{invariant}: {detail}")


class LogView(Protocol):
    """A node's whole log (stable and unstable), as the leader-completeness check reads it."""

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def term(self, index: int) -> int:
        """Term at ``index``, for ``first_index() - 1 <= index <= last_index()``."""
        ...


class DurableLog(Protocol):
    """What survives a crash of one node: its storage's snapshot index and log."""

    def snapshot_index(self) -> int: ...

    def last_index(self) -> int: ...

    def term(self, index: int) -> int:
        """Term at ``index``, for ``snapshot_index() <= index <= last_index()``."""
        ...


@dataclass(frozen=True, slots=True)
class CommittedEntry:
    """An entry some node applied, so it is committed. ``commit_term_max`` bounds the term in
    which it was committed from above (the lowest term any node applied it in)."""

    index: int
    term: int
    type: EntryType
    data: bytes
    commit_term_max: int
    first_node: int


def _short(data: bytes, limit: int = 60) -> str:
    text = repr(data)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(term: int, type_: EntryType, data: bytes) -> str:
    kind = "conf" if type_ is EntryType.CONF_CHANGE else ("no-op" if not data else "normal")
    return f"term {term} {kind} {_short(data)}" if data else f"term {term} {kind}"


class RaftInvariants:
    """Incremental checker of one run; see the module docstring.

    Every ``observe_*``/``check_*`` method raises :class:`InvariantFailure` at the first breach.
    Memory is O(distinct entries ever persisted), which the simulator bounds by its run length.
    """

    def __init__(self) -> None:
        # term -> the one node that led it
        self.leader_of_term: dict[int, int] = {}
        # (index, term) -> (type, data, term of the entry before it, first node seen holding it)
        self._entries: dict[tuple[int, int], tuple[EntryType, bytes, int, int]] = {}
        # index -> the committed entry there
        self.committed: dict[int, CommittedEntry] = {}
        self.max_committed_index = 0
        self.checks = 0

    # -- election safety ---------------------------------------------------------------------

    def observe_role(self, node: int, term: int, is_leader: bool) -> None:
        """Called after every step with each touched node's role and term."""
        self.checks += 1
        if not is_leader:
            return
        other = self.leader_of_term.setdefault(term, node)
        if other != node:
            raise InvariantFailure(
                ELECTION_SAFETY, f"nodes {other} and {node} were both leader in term {term}"
            )

    # -- log matching and "committed entries are never truncated" ----------------------------

    def observe_append(
        self,
        node: int,
        prev_term: int,
        entries: Sequence[Entry],
        removed: Iterable[tuple[int, int]] = (),
    ) -> None:
        """``node``'s durable log now holds ``entries`` right after an entry of ``prev_term``;
        ``removed`` lists the (index, term) pairs the write truncated or replaced."""
        self.checks += 1
        for index, term in removed:
            c = self.committed.get(index)
            if c is not None and c.term == term:
                raise InvariantFailure(
                    COMMITTED_DURABLE,
                    f"node {node} truncated committed entry {index} "
                    f"({_describe(c.term, c.type, c.data)}, first applied by node "
                    f"{c.first_node})",
                )
        known = self._entries
        prev = prev_term
        for e in entries:
            key = (e.index, e.term)
            seen = known.get(key)
            if seen is None:
                known[key] = (e.type, e.data, prev, node)
            else:
                s_type, s_data, s_prev, s_node = seen
                if s_data != e.data or s_type is not e.type:
                    raise InvariantFailure(
                        LOG_MATCHING,
                        f"entry {e.index} of term {e.term} differs between node {s_node} "
                        f"({_describe(e.term, s_type, s_data)}) and node {node} "
                        f"({_describe(e.term, e.type, e.data)})",
                    )
                if s_prev != prev:
                    raise InvariantFailure(
                        LOG_MATCHING,
                        f"entry {e.index} of term {e.term} follows an entry of term {s_prev} on "
                        f"node {s_node} but of term {prev} on node {node}: the logs share an "
                        f"entry but not the prefix before it",
                    )
            prev = e.term

    def observe_snapshot(
        self, node: int, index: int, term: int, removed: Iterable[tuple[int, int]] = ()
    ) -> None:
        """``node``'s storage installed a snapshot ending at (``index``, ``term``), dropping the
        entries in ``removed`` that lay beyond it."""
        self.checks += 1
        c = self.committed.get(index)
        if c is not None and c.term != term:
            raise InvariantFailure(
                STATE_MACHINE_SAFETY,
                f"node {node} installed a snapshot ending at {index} with term {term}, but the "
                f"committed entry there has term {c.term}",
            )
        self.observe_append(node, 0, (), removed)

    # -- state-machine safety and the record of committed entries ----------------------------

    def observe_apply(self, node: int, entry: Entry, node_term: int) -> CommittedEntry | None:
        """``node`` (at ``node_term``) applied ``entry``. Returns the record when the entry is
        newly known to be committed, so the caller can check the current leaders have it."""
        self.checks += 1
        c = self.committed.get(entry.index)
        if c is None:
            c = CommittedEntry(entry.index, entry.term, entry.type, entry.data, node_term, node)
            self.committed[entry.index] = c
            self.max_committed_index = max(self.max_committed_index, entry.index)
            return c
        if c.term != entry.term or c.data != entry.data or c.type is not entry.type:
            raise InvariantFailure(
                STATE_MACHINE_SAFETY,
                f"index {entry.index}: node {c.first_node} applied "
                f"{_describe(c.term, c.type, c.data)} but node {node} applied "
                f"{_describe(entry.term, entry.type, entry.data)}",
            )
        if node_term < c.commit_term_max:
            self.committed[entry.index] = CommittedEntry(
                c.index, c.term, c.type, c.data, node_term, c.first_node
            )
        return None

    # -- leader completeness -----------------------------------------------------------------

    def check_leader_log(
        self, node: int, term: int, log: LogView, only: Iterable[CommittedEntry] | None = None
    ) -> None:
        """The leader ``node`` of ``term`` must hold every entry committed in an earlier term
        (all known ones, or just ``only``). Entries below its snapshot are covered by it."""
        self.checks += 1
        first = log.first_index()
        last = log.last_index()
        if only is None:
            candidates: Iterable[CommittedEntry] = (
                c
                for i in range(max(first, 1), self.max_committed_index + 1)
                if (c := self.committed.get(i)) is not None
            )
        else:
            candidates = only
        for c in candidates:
            if c.commit_term_max >= term or c.index < first:
                continue
            if c.index > last:
                raise InvariantFailure(
                    LEADER_COMPLETENESS,
                    f"node {node} leads term {term} but its log ends at {last}, without "
                    f"committed entry {c.index} ({_describe(c.term, c.type, c.data)}, "
                    f"committed by term {c.commit_term_max} at the latest)",
                )
            t = log.term(c.index)
            if t != c.term:
                raise InvariantFailure(
                    LEADER_COMPLETENESS,
                    f"node {node} leads term {term} with an entry of term {t} at {c.index}, "
                    f"where committed entry {_describe(c.term, c.type, c.data)} belongs "
                    f"(committed by term {c.commit_term_max} at the latest)",
                )

    # -- durability of committed entries -----------------------------------------------------

    def check_durable_quorum(
        self, voters: Sequence[int], durable: Mapping[int, DurableLog]
    ) -> None:
        """No quorum of ``voters`` may be without the newest committed entry in durable storage.

        Committing needs a quorum of the configuration the leader used; with one-server-at-a-
        time changes every later configuration still intersects it, so a set of voters lacking
        the entry that is big enough to elect a leader means an acknowledged write can vanish.
        A voter whose durable state is missing from ``durable`` counts as lacking the entry.
        Only the newest entry needs checking: by log matching a holder holds all before it.
        """
        self.checks += 1
        c = self.committed.get(self.max_committed_index)
        if c is None or not voters:
            return
        holders = []
        for v in voters:
            d = durable.get(v)
            if d is None:
                continue
            if d.snapshot_index() >= c.index or (
                c.index <= d.last_index() and d.term(c.index) == c.term
            ):
                holders.append(v)
        quorum = len(voters) // 2 + 1
        if len(holders) <= len(voters) - quorum:
            lacking = sorted(set(voters) - set(holders))
            raise InvariantFailure(
                COMMITTED_DURABLE,
                f"committed entry {c.index} ({_describe(c.term, c.type, c.data)}) is durable "
                f"on voters {sorted(holders)} only; voters {lacking} lack it and are a quorum "
                f"of {sorted(voters)}: it could be lost",
            )


# -- whole-state checks --------------------------------------------------------------------------


def check_log_matching(logs: Mapping[int, tuple[int, Sequence[Entry]]]) -> None:
    """Log matching over complete logs: ``logs[node] = (term of the entry before the first,
    entries in index order)``. Raises InvariantFailure naming the first divergence."""
    inv = RaftInvariants()
    for node, (prev_term, entries) in sorted(logs.items()):
        for a, b in itertools.pairwise(entries):
            if b.index != a.index + 1:
                raise InvariantFailure(
                    LOG_MATCHING, f"node {node}: entry {b.index} follows entry {a.index}"
                )
        inv.observe_append(node, prev_term, entries)


def check_applied_entries(
    applied: Mapping[int, Mapping[int, tuple[int, EntryType, bytes]]],
) -> None:
    """State-machine safety over complete records: ``applied[node][index] = (term, type,
    data)`` (``MemoryHost.applied_entries``). No two nodes may differ at any index."""
    first: dict[int, tuple[int, tuple[int, EntryType, bytes]]] = {}
    for node, entries in sorted(applied.items()):
        for index, rec in entries.items():
            seen = first.setdefault(index, (node, rec))
            if seen[1] != rec:
                other, (t, ty, d) = seen
                raise InvariantFailure(
                    STATE_MACHINE_SAFETY,
                    f"index {index}: node {other} applied {_describe(t, ty, d)} but node "
                    f"{node} applied {_describe(rec[0], rec[1], rec[2])}",
                )


def check_state_machines(states: Mapping[int, tuple[int, bytes]]) -> None:
    """Nodes that applied the same index must hold the same state: ``states[node] =
    (applied index, state machine snapshot bytes)``. Catches a snapshot taken at or installed
    as the wrong index, which entry-by-entry checks cannot see."""
    by_index: dict[int, tuple[int, bytes]] = {}
    for node, (index, blob) in sorted(states.items()):
        other = by_index.setdefault(index, (node, blob))
        if other[1] != blob:
            raise InvariantFailure(
                APPLIED_CONSISTENT,
                f"nodes {other[0]} and {node} both applied up to {index} but their state "
                f"machines differ: {_short(other[1], 200)} vs {_short(blob, 200)}",
            )


def check_history(
    history: Sequence[Operation],
    timeout_s: float = 60.0,
    clock: Callable[[], float] | None = None,
) -> None:
    """The client history must be linearizable for the KV model (checked one key at a time).

    ILLEGAL raises with the checker's explanation. UNKNOWN (the search ran out of time) raises
    too: histories from the simulator are small, so a timeout means something to look at, not
    something to ignore."""
    if clock is None:
        res = check_operations_verbose(kv_model(), history, timeout_s)
    else:
        res = check_operations_verbose(kv_model(), history, timeout_s, clock)
    if res.result is CheckResult.ILLEGAL:
        raise InvariantFailure(
            LINEARIZABILITY, "the client history is not linearizable\n" + res.explain()
        )
    if res.result is CheckResult.UNKNOWN:
        raise InvariantFailure(
            LINEARIZABILITY,
            f"the checker gave up after {timeout_s}s on {len(history)} operations "
            f"(UNKNOWN, not a verdict)",
        )
