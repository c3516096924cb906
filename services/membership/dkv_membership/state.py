"""The membership state machine: the replicated cluster map (DESIGN.md "membership").

The membership Raft group replicates one :class:`~dkv.v1.membership_pb2.ClusterMap` (nodes,
shards, slot table, leaders). Each committed entry is one ``MembershipCommand``; this module
applies it. Rules (the same on every replica, so every replica reaches the same map):

- ``apply`` is pure: it depends only on the map and the command. No I/O, no clock, no
  randomness; values that need a clock (heartbeat times) were put into the command by the
  leader when it proposed it.
- Every command that changes the map raises ``version`` by exactly one; a command that changes
  nothing (a repeated registration, a heartbeat of an UP node, an identical replica set) and a
  rejected one leave it alone. The heartbeat time (``Node.last_heartbeat_unix_ms``) is
  leader-internal bookkeeping: updating it alone is not a change.
- Shard replica sets change only by compare-and-set on the shard's ``epoch``; a change bumps
  it. A stale epoch is rejected and changes nothing, so two placement decisions based on the
  same map cannot both win.
- The leader table never goes back in time: a report is accepted only with a term at least the
  known one for that shard (and, at the known term, only for the same leader: Raft elects at
  most one leader per term, thesis §3.4).
- The cluster is initialized once: shards ``1..N`` and a slot table of contiguous ranges that
  cover ``0..SLOT_COUNT-1`` exactly once, split as :func:`dkv.sharding.static_shard_for_slot`.
- A bounded change log remembers, for the last ``change_log_max`` versions, which parts of the
  map each one changed, so a resumed ``WatchClusterMap`` sends only what a watcher missed, or the
  whole map when the log no longer reaches back that far (:meth:`changes_since`).

Malformed commands: :func:`validate_command` raises :class:`~dkv.errors.InvalidArgument`; the
service calls it before proposing. ``apply`` must never raise on a committed entry (that would
stop the host loop on every replica), so there a malformed command is a rejected
:class:`Outcome` with the same message, and changes nothing.

The map lives in memory; ``snapshot``/``restore`` turn it (with its change log) into
deterministic bytes, so two replicas that applied the same log produce identical snapshots.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import DecodeError

from dkv.errors import InvalidArgument
from dkv.sharding import SLOT_COUNT, static_shard_for_slot
from dkv.storage import Batch
from dkv.v1 import membership_pb2 as pb
from dkv_membership.placement import NodeInfo, place

__all__ = [
    "CHANGE_LOG_MAX",
    "MembershipState",
    "MembershipStateMachine",
    "Outcome",
    "decode_command",
    "plan_placement",
    "slot_table",
    "validate_command",
]

CHANGE_LOG_MAX = 1000
"""Versions the change log remembers by default (a map is small; resending it is cheap)."""

UP = pb.NODE_STATE_UP
DOWN = pb.NODE_STATE_DOWN
LEAVING = pb.NODE_STATE_LEAVING


@dataclass(frozen=True, slots=True)
class Outcome:
    """What applying one command did. ``accepted`` false: nothing changed, ``reason`` says why
    (a stale epoch or term, an unknown node, a malformed command...). ``changed``: the map
    moved to ``version``. The entity the command was about (after it) is attached, so a caller
    that lost a compare-and-set can retry from the current epoch without another read."""

    accepted: bool
    changed: bool
    version: int
    reason: str = ""
    node: pb.Node | None = None
    shard: pb.Shard | None = None
    leader: pb.LeaderEntry | None = None


@dataclass
class MembershipState:
    """The cluster map in memory, keyed for lookups; :meth:`to_proto` gives it canonical order."""

    version: int = 0
    nodes: dict[int, pb.Node] = field(default_factory=dict)
    shards: dict[int, pb.Shard] = field(default_factory=dict)
    slot_ranges: list[pb.SlotRange] = field(default_factory=list)
    leaders: dict[int, pb.LeaderEntry] = field(default_factory=dict)
    retired: set[int] = field(default_factory=set)

    @property
    def initialized(self) -> bool:
        return bool(self.slot_ranges)

    def to_proto(self) -> pb.ClusterMap:
        """A copy of the map, every list sorted by its key (so serialization is canonical)."""
        out = pb.ClusterMap(version=self.version)
        out.nodes.extend(self.nodes[k] for k in sorted(self.nodes))
        out.shards.extend(self.shards[k] for k in sorted(self.shards))
        out.slot_ranges.extend(sorted(self.slot_ranges, key=lambda r: r.start))
        out.leaders.extend(self.leaders[k] for k in sorted(self.leaders))
        out.retired_node_ids.extend(sorted(self.retired))
        return out

    @classmethod
    def from_proto(cls, m: pb.ClusterMap) -> MembershipState:
        return cls(
            version=m.version,
            nodes={n.id: _copy(n) for n in m.nodes},
            shards={s.id: _copy(s) for s in m.shards},
            slot_ranges=[_copy(r) for r in m.slot_ranges],
            leaders={e.shard_id: _copy(e) for e in m.leaders},
            retired=set(m.retired_node_ids),
        )


class MembershipStateMachine:
    """The :class:`dkv.host.StateMachine` of the membership group. See the module docstring."""

    # The map lives in memory: the host restores it from the latest snapshot at start and
    # applies the log after it again.
    durable = False

    def __init__(self, change_log_max: int = CHANGE_LOG_MAX) -> None:
        if change_log_max < 1:
            raise InvalidArgument(f"change_log_max must be >= 1, got {change_log_max}")
        self.change_log_max = change_log_max
        self.state = MembershipState()
        self._changes: deque[pb.MapChange] = deque(maxlen=change_log_max)

    # -- host protocol --------------------------------------------------------------------------

    def begin(self, batch: Batch) -> None:
        """Nothing to stage: the map is in memory and reaches disk through Raft snapshots."""

    def end(self) -> None:
        pass

    def snapshot(self) -> bytes:
        snap = pb.MembershipSnapshot(map=self.state.to_proto(), changes=list(self._changes))
        return snap.SerializeToString(deterministic=True)

    def snapshot_view(self) -> tuple[bytes]:
        """The host's snapshot: the map is small and in memory, so it is serialized now (the
        applies that follow change the map in place)."""
        return (self.snapshot(),)

    def restore(self, data: bytes) -> None:
        try:
            snap = pb.MembershipSnapshot.FromString(data)
        except DecodeError as exc:
            raise InvalidArgument(f"membership snapshot does not decode: {exc}") from exc
        self.state = MembershipState.from_proto(snap.map)
        self._changes = deque((_copy(c) for c in snap.changes), maxlen=self.change_log_max)

    def apply(self, index: int, data: bytes) -> Outcome:
        """Apply the committed command at Raft ``index`` (unused: versions count changes, not
        entries). Never raises on bad input; see the module docstring."""
        try:
            cmd = decode_command(data)
            validate_command(cmd)
        except InvalidArgument as exc:
            return self._reject(str(exc))
        match cmd.WhichOneof("command"):
            case "register_node":
                return self._register(cmd.register_node)
            case "heartbeat":
                return self._heartbeat(cmd.heartbeat)
            case "mark_down":
                return self._mark_down(cmd.mark_down)
            case "leave":
                return self._leave(cmd.leave)
            case "remove_node":
                return self._remove(cmd.remove_node)
            case "set_shard_replicas":
                return self._set_replicas(cmd.set_shard_replicas)
            case "report_leader":
                return self._report_leader(cmd.report_leader)
            case _:  # "init_cluster": validate_command refused an empty command
                return self._init(cmd.init_cluster)

    # -- reads ----------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.state.version

    def cluster_map(self) -> pb.ClusterMap:
        return self.state.to_proto()

    def changes_since(self, version: int) -> list[pb.MapChange] | None:
        """What changed after ``version``, oldest first (empty: the watcher is up to date), or
        None when the change log no longer reaches back to ``version`` (or ``version`` is from
        the future, e.g. a watcher of another cluster): send the whole map."""
        if version == self.state.version:
            return []
        if version > self.state.version or version < 0:
            return None
        if not self._changes or self._changes[0].version > version + 1:
            return None
        return [_copy(c) for c in self._changes if c.version > version]

    # -- commands -------------------------------------------------------------------------------

    def _register(self, c: pb.RegisterNodeCommand) -> Outcome:
        st = self.state
        n = c.node
        old = st.nodes.get(n.id)
        if n.id in st.retired:
            return self._reject(
                f"node {n.name!r} ({n.id}) was drained and removed from the cluster; to add "
                "this machine again, start it under a new name with an empty data dir"
            )
        if old is not None and old.name != n.name:
            return self._reject(f"node id {n.id} is registered as {old.name!r}, not {n.name!r}")
        for other in st.nodes.values():
            if other.name == n.name and other.id != n.id:
                return self._reject(f"node name {n.name!r} is registered by node {other.id}")
        new = _copy(n)
        if old is None:
            new.state = UP
        else:
            # A restart of a draining node must not make it a placement target again.
            new.state = LEAVING if old.state == LEAVING else UP
            new.last_heartbeat_unix_ms = max(old.last_heartbeat_unix_ms, n.last_heartbeat_unix_ms)
        changed = old is None or _visible(old) != _visible(new)
        st.nodes[n.id] = new
        if changed:
            self._commit(nodes=[n.id])
        return Outcome(True, changed, st.version, node=_copy(new))

    def _heartbeat(self, c: pb.HeartbeatCommand) -> Outcome:
        node = self.state.nodes.get(c.node_id)
        if node is None:
            return self._reject(f"unknown node {c.node_id}: register it first")
        node.last_heartbeat_unix_ms = max(node.last_heartbeat_unix_ms, c.unix_ms)
        changed = node.state == DOWN
        if changed:
            node.state = UP
            self._commit(nodes=[c.node_id])
        return Outcome(True, changed, self.state.version, node=_copy(node))

    def _mark_down(self, c: pb.MarkDownCommand) -> Outcome:
        node = self.state.nodes.get(c.node_id)
        if node is None:
            return self._reject(f"unknown node {c.node_id}")
        if node.state != UP:  # already DOWN, or LEAVING (draining goes on either way)
            return Outcome(True, False, self.state.version, node=_copy(node))
        if node.last_heartbeat_unix_ms > c.last_heartbeat_unix_ms:
            return self._reject(
                f"node {c.node_id} heartbeat at {node.last_heartbeat_unix_ms} ms, after the "
                f"{c.last_heartbeat_unix_ms} ms the decision was based on",
                node=node,
            )
        node.state = DOWN
        self._commit(nodes=[c.node_id])
        return Outcome(True, True, self.state.version, node=_copy(node))

    def _leave(self, c: pb.LeaveCommand) -> Outcome:
        node = self.state.nodes.get(c.node_id)
        if node is None:
            return self._reject(f"unknown node {c.node_id}")
        if node.state == LEAVING:
            return Outcome(True, False, self.state.version, node=_copy(node))
        node.state = LEAVING
        self._commit(nodes=[c.node_id])
        return Outcome(True, True, self.state.version, node=_copy(node))

    def _remove(self, c: pb.RemoveNodeCommand) -> Outcome:
        st = self.state
        node = st.nodes.get(c.node_id)
        if node is None:  # idempotent: a repeated removal succeeds
            return Outcome(True, False, st.version)
        if node.state == UP:
            return self._reject(f"node {c.node_id} is UP: make it leave first", node=node)
        holding = sorted(
            s.id for s in st.shards.values() if c.node_id in s.voters or c.node_id in s.learners
        )
        if holding:
            return self._reject(
                f"node {c.node_id} still holds replicas of shards {holding}", node=node
            )
        del st.nodes[c.node_id]
        st.retired.add(c.node_id)
        self._commit(nodes=[c.node_id])
        return Outcome(True, True, st.version, node=_copy(node))

    def _set_replicas(self, c: pb.SetShardReplicasCommand) -> Outcome:
        st = self.state
        shard = st.shards.get(c.shard_id)
        if shard is None:
            return self._reject(f"unknown shard {c.shard_id}")
        if c.expected_epoch != shard.epoch:
            return self._reject(
                f"stale epoch for shard {c.shard_id}: expected {c.expected_epoch}, "
                f"the shard is at {shard.epoch}",
                shard=shard,
            )
        current = {*shard.voters, *shard.learners}
        for nid in (*c.voters, *c.learners):
            node = st.nodes.get(nid)
            if node is None:
                return self._reject(f"shard {c.shard_id}: unknown node {nid}", shard=shard)
            if nid not in current and node.state != UP:
                return self._reject(
                    f"shard {c.shard_id}: node {nid} is {pb.NodeState.Name(node.state)} "
                    "and cannot receive a new replica",
                    shard=shard,
                )
        if list(c.voters) == list(shard.voters) and list(c.learners) == list(shard.learners):
            return Outcome(True, False, st.version, shard=_copy(shard))
        del shard.voters[:]
        del shard.learners[:]
        shard.voters.extend(c.voters)
        shard.learners.extend(c.learners)
        shard.epoch += 1
        self._commit(shards=[c.shard_id])
        return Outcome(True, True, st.version, shard=_copy(shard))

    def _report_leader(self, c: pb.ReportLeaderCommand) -> Outcome:
        st = self.state
        if c.shard_id not in st.shards:
            return self._reject(f"unknown shard {c.shard_id}")
        if c.leader_id not in st.nodes:
            return self._reject(f"unknown node {c.leader_id}")
        known = st.leaders.get(c.shard_id)
        if known is not None:
            if c.term < known.term:
                return self._reject(
                    f"stale leader report for shard {c.shard_id}: term {c.term} < {known.term}",
                    leader=known,
                )
            if c.term == known.term:
                if c.leader_id == known.leader_id:
                    return Outcome(True, False, st.version, leader=_copy(known))
                return self._reject(
                    f"shard {c.shard_id} term {c.term} already has leader {known.leader_id}, "
                    f"not {c.leader_id}",
                    leader=known,
                )
        entry = pb.LeaderEntry(shard_id=c.shard_id, leader_id=c.leader_id, term=c.term)
        st.leaders[c.shard_id] = entry
        self._commit(leaders=[c.shard_id])
        return Outcome(True, True, st.version, leader=_copy(entry))

    def _init(self, c: pb.InitClusterCommand) -> Outcome:
        st = self.state
        if st.initialized:
            return self._reject(f"the cluster is already initialized with {len(st.shards)} shards")
        given = {s.id: s for s in c.shards}
        for s in c.shards:
            for nid in (*s.voters, *s.learners):
                if nid not in st.nodes:
                    return self._reject(f"shard {s.id}: unknown node {nid}")
        for sid in range(1, c.shard_count + 1):
            shard = pb.Shard(id=sid, epoch=1)
            if sid in given:
                shard.voters.extend(given[sid].voters)
                shard.learners.extend(given[sid].learners)
            st.shards[sid] = shard
        st.slot_ranges = slot_table(c.shard_count)
        self._commit(shards=range(1, c.shard_count + 1), slots=True)
        return Outcome(True, True, st.version)

    # -- helpers --------------------------------------------------------------------------------

    def _reject(
        self,
        reason: str,
        node: pb.Node | None = None,
        shard: pb.Shard | None = None,
        leader: pb.LeaderEntry | None = None,
    ) -> Outcome:
        return Outcome(
            False,
            False,
            self.state.version,
            reason,
            node=_copy(node) if node is not None else None,
            shard=_copy(shard) if shard is not None else None,
            leader=_copy(leader) if leader is not None else None,
        )

    def _commit(
        self,
        nodes: Iterable[int] = (),
        shards: Iterable[int] = (),
        leaders: Iterable[int] = (),
        slots: bool = False,
    ) -> None:
        """One change of the map: the next version, and its entry in the bounded change log."""
        self.state.version += 1
        self._changes.append(
            pb.MapChange(
                version=self.state.version,
                node_ids=sorted(nodes),
                shard_ids=sorted(shards),
                leader_shard_ids=sorted(leaders),
                slots=slots,
            )
        )


# -- commands: decoding and validation ----------------------------------------------------------


def decode_command(data: bytes) -> pb.MembershipCommand:
    try:
        return pb.MembershipCommand.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(f"membership command does not decode: {exc}") from exc


def validate_command(cmd: pb.MembershipCommand) -> None:
    """Check the shape of a command (ids present, sets well-formed); raise
    :class:`InvalidArgument` with what is wrong. The map's state is not consulted here."""
    match cmd.WhichOneof("command"):
        case None:
            raise InvalidArgument("empty membership command")
        case "register_node":
            n = cmd.register_node.node
            _check_id("node id", n.id)
            if not n.name:
                raise InvalidArgument(f"node {n.id}: name is required")
            if not n.peer_address or not n.client_address:
                raise InvalidArgument(f"node {n.id}: peer_address and client_address are required")
        case "heartbeat":
            _check_id("node id", cmd.heartbeat.node_id)
        case "mark_down":
            _check_id("node id", cmd.mark_down.node_id)
        case "leave":
            _check_id("node id", cmd.leave.node_id)
        case "remove_node":
            _check_id("node id", cmd.remove_node.node_id)
        case "set_shard_replicas":
            c = cmd.set_shard_replicas
            _check_id("shard id", c.shard_id)
            _check_replicas(c.shard_id, c.voters, c.learners)
        case "report_leader":
            r = cmd.report_leader
            _check_id("shard id", r.shard_id)
            _check_id("leader id", r.leader_id)
            _check_id("term", r.term)
        case _:
            init = cmd.init_cluster
            if not 1 <= init.shard_count <= SLOT_COUNT:
                raise InvalidArgument(
                    f"shard count must be in [1, {SLOT_COUNT}], got {init.shard_count}"
                )
            seen: set[int] = set()
            for s in init.shards:
                if not 1 <= s.id <= init.shard_count:
                    raise InvalidArgument(
                        f"initial shard id {s.id} is outside 1..{init.shard_count}"
                    )
                if s.id in seen:
                    raise InvalidArgument(f"initial shard {s.id} is listed twice")
                seen.add(s.id)
                _check_replicas(s.id, s.voters, s.learners)


def _check_id(what: str, value: int) -> None:
    if value < 1:
        raise InvalidArgument(f"{what} must be >= 1, got {value}")


def _check_replicas(shard_id: int, voters: Sequence[int], learners: Sequence[int]) -> None:
    if not voters:
        raise InvalidArgument(f"shard {shard_id}: at least one voter is required")
    for what, ids in (("voters", voters), ("learners", learners)):
        if len(set(ids)) != len(ids):
            raise InvalidArgument(f"shard {shard_id}: duplicate node in {what} {list(ids)}")
        for nid in ids:
            _check_id(f"shard {shard_id}: node id", nid)
    both = sorted(set(voters) & set(learners))
    if both:
        raise InvalidArgument(f"shard {shard_id}: nodes {both} are both voter and learner")


# -- slot table and placement -------------------------------------------------------------------


def slot_table(shard_count: int) -> list[pb.SlotRange]:
    """Contiguous ranges covering ``0..SLOT_COUNT-1`` once, shard ``i`` (1-based) owning the
    slots :func:`dkv.sharding.static_shard_for_slot` gives it (about ``SLOT_COUNT / N`` each)."""
    ranges: list[pb.SlotRange] = []
    for slot in range(SLOT_COUNT):
        shard = static_shard_for_slot(slot, shard_count)  # validates shard_count
        if ranges and ranges[-1].shard_id == shard:
            ranges[-1].end = slot + 1
        else:
            ranges.append(pb.SlotRange(start=slot, end=slot + 1, shard_id=shard))
    return ranges


def plan_placement(
    state: MembershipState, replication: int = 3, epsilon: float = 0.25
) -> dict[int, tuple[int, ...]]:
    """The replica sets placement wants now: for each shard, ``replication`` node ids (the first
    is the preferred leader), over the UP nodes, keeping current replicas where the load bound
    ``ceil((1 + epsilon) * average)`` allows (:func:`dkv_membership.placement.place` with
    ``previous``). Only a plan: carrying it out (learner, catch up, promote, remove) is the
    leader's job. Empty before the cluster is initialized. Raises :class:`InvalidArgument` when
    there are fewer UP nodes than ``replication``."""
    if not state.shards:
        return {}
    up = sorted((n for n in state.nodes.values() if n.state == UP), key=lambda n: n.id)
    name_of = {n.id: n.name for n in state.nodes.values()}
    id_of = {n.name: n.id for n in up}
    previous = {
        s.id: [name_of[i] for i in (*s.voters, *s.learners) if i in name_of]
        for s in state.shards.values()
    }
    table = place(
        sorted(state.shards),
        [NodeInfo(n.name, n.zone) for n in up],
        replication=replication,
        epsilon=epsilon,
        previous=previous,
    )
    return {sid: tuple(id_of[name] for name in names) for sid, names in table.items()}


# -- protobuf helpers ---------------------------------------------------------------------------

_M = TypeVar("_M", pb.Node, pb.Shard, pb.LeaderEntry, pb.SlotRange, pb.MapChange)


def _copy(msg: _M) -> _M:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def _visible(node: pb.Node) -> pb.Node:
    """``node`` without its heartbeat time: what a watcher of the map sees change."""
    out = _copy(node)
    out.ClearField("last_heartbeat_unix_ms")
    return out
