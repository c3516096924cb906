"""Replica placement: consistent hashing with bounded loads (DESIGN.md "Keys, shards, placement").

The membership leader decides, for every shard, which ``R`` nodes hold its replicas. This module
is that decision as a pure function: no I/O, no clock, no global randomness. The only source of
"randomness" is BLAKE2b of names and ids, so every membership replica, on any machine and any
Python version, computes the same table from the same inputs.

The algorithm is *consistent hashing with bounded loads* from V. Mirrokni, M. Thorup and
M. Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA 2018 (arXiv:1608.01350), cited
as "MTZ". In their terms the balls are our replica slots and the bins are our nodes:

1. Every node sits on a 64-bit hash ring at ``VNODES_PER_NODE`` points
   (``blake2b("node", name, i)``); many points per node make each node's share of the ring,
   and so its expected load, close to ``1/n``.
2. There are ``m = len(shards) * R`` balls: slot ``j`` of shard ``s`` hashes to the point
   ``blake2b("shard", s, j)``. Every node gets the capacity ``c = ceil((1 + epsilon) * m / n)``.
3. Balls are placed one by one in a fixed order (shard ids ascending, then slot 0..R-1). A ball
   walks clockwise from its point and takes the first node that (a) does not already hold a
   replica of the same shard and (b) holds fewer than ``c`` balls. Plain consistent hashing is
   this walk without (b); (b) is MTZ's bound: a ball that lands on a full node "overflows" to
   the next node on the ring.

No bin ever exceeds ``ceil((1 + epsilon) * average)``: that holds by construction. What MTZ
prove is that the price is small: in expectation a ball's walk is short and inserting or
removing a ball or a bin moves only O(1/eps^2) times what that update must move anyway (one
ball; a bin's average load), for any number of balls and bins. Our additions, and what they
guarantee here (they are outside MTZ's analysis, so tests/membership measures them):

- **Distinct nodes** per shard (rule (a)). Greedy walking could then, in rare tight cases, find
  every node that lacks the shard full while the free room sits on nodes that already have it.
  We then make room with one *swap*: take the first such full node ``x`` and the first non-full
  node ``y`` on the walk, move some other shard's replica from ``x`` to ``y`` (one exists:
  ``x`` holds ``c`` shards, ``y`` at most ``c - 2`` besides this one) and put the ball on
  ``x``. Hence, whenever ``1 <= R <= n``, the result ALWAYS has ``R`` distinct nodes per shard
  and no node above ``c``: the bound is a guarantee, not an expectation.
- **Stability** (``previous``). Re-running the walk from scratch after a membership change would
  move, besides the replicas the change must move, every ball whose walk crossed a node whose
  fullness changed (MTZ's cascades). Instead phase 1 *keeps* each previous replica whose node is
  still a member and still below ``c`` (shards ascending, so every replica of membership drops
  the same ones), and phase 2 walks only for the slots left empty. Alone, that would leave a
  newly added node empty, so in phase 1 a *newcomer* (a member that ``previous`` does not
  mention) claims its place in every shard whose capacity-free walk (plain consistent hashing)
  includes it, taking the slot of a previous replica that walk no longer includes. Those are
  exactly the replicas plain consistent hashing hands to a new bin: about ``1/(n+1)`` of all
  replicas (``R/(n+1)`` of the shards gain the newcomer), and nothing else moves unless a node is
  over the new, lower capacity. Removing a node moves only its replicas (capacity only grows),
  unless a member that held nothing takes its share. Kept replicas keep their slot, so an
  untouched shard keeps its preferred leader. The result is a fixed point: fed back as
  ``previous`` with the same members it comes back unchanged (see the end of :func:`place`).
- **Zones** (``NodeInfo.zone``), best effort: a walk takes the first eligible node whose zone
  holds the fewest replicas of the shard among the zones that still have an eligible node, so
  with ``Z`` zones of equal size a shard normally spans ``min(R, Z)`` zones (full nodes can
  prevent it). A claim never makes a shard's zone spread worse; kept replicas are not moved for
  zones alone.

Changing ``VNODES_PER_NODE`` or the hashing changes every placement: like the slot count, they
are fixed for the life of a cluster.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from dkv.errors import InvalidArgument, InvariantViolation

__all__ = ["VNODES_PER_NODE", "NodeInfo", "capacity", "moves", "place"]

VNODES_PER_NODE = 128
"""Ring points per node. The spread of a node's ring share is about 1/sqrt(VNODES_PER_NODE)."""

_PERSON = b"dkv-placement"  # BLAKE2b personalization: these hashes mean nothing elsewhere


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node as placement sees it: a unique name and an optional failure-domain label."""

    name: str
    zone: str = ""


def capacity(total_replicas: int, nodes: int, epsilon: float) -> int:
    """The most replicas any one node may hold: ``ceil((1 + epsilon) * total_replicas / nodes)``.

    Computed exactly: ``epsilon`` is read as the decimal it prints as, so ``0.1`` means 1/10 and
    ``capacity(30, 3, 0.1)`` is 11, not 12 as float rounding would give.
    """
    _check_epsilon(epsilon)
    if nodes < 1:
        raise InvalidArgument(f"capacity needs at least one node, got {nodes}")
    if total_replicas < 0:
        raise InvalidArgument(f"total replicas must be >= 0, got {total_replicas}")
    return math.ceil((1 + Fraction(str(epsilon))) * total_replicas / nodes)


def moves(before: Mapping[int, Sequence[str]], after: Mapping[int, Sequence[str]]) -> int:
    """How many replicas ``after`` puts on a node that did not hold that shard in ``before``.

    This counts data copies (each is one "add learner, catch up" step); a replica that only
    changes slot within its shard (say, becomes the preferred leader) is not a move. Shards
    missing from ``before`` count all their replicas; shards missing from ``after`` count none.
    """
    return sum(len(set(nodes) - set(before.get(shard, ()))) for shard, nodes in after.items())


def place(
    shards: Sequence[int],
    nodes: Sequence[NodeInfo | str],
    replication: int = 3,
    epsilon: float = 0.25,
    previous: Mapping[int, Sequence[str]] | None = None,
) -> dict[int, tuple[str, ...]]:
    """Place ``replication`` replicas of every shard on distinct nodes (see the module docstring).

    ``nodes`` are the live members, as names or :class:`NodeInfo`; their order does not matter.
    ``previous`` is the table in force (entries for unknown shards and names of departed nodes
    are ignored). Returns, for each shard id, ``replication`` distinct node names; the first is
    the preferred leader. Every node holds at most
    ``capacity(len(shards) * replication, len(nodes), epsilon)`` replicas.

    Raises :class:`InvalidArgument` on duplicate shard ids or node names, ``replication`` outside
    ``[1, len(nodes)]``, or an ``epsilon`` that is not a finite number above 0.
    """
    infos = _normalize_nodes(nodes)
    shard_ids = _check_shards(shards)
    if isinstance(replication, bool) or not isinstance(replication, int) or replication < 1:
        raise InvalidArgument(f"replication must be an integer >= 1, got {replication!r}")
    if replication > len(infos):
        raise InvalidArgument(
            f"replication {replication} needs at least {replication} nodes, got {len(infos)}"
        )
    _check_epsilon(epsilon)
    if previous is not None:
        for shard, names in previous.items():
            if isinstance(names, str):
                raise InvalidArgument(
                    f"previous[{shard}] must be a sequence of node names, got the string {names!r}"
                )
    cap = capacity(len(shard_ids) * replication, len(infos), epsilon)
    table = _Placer(infos, shard_ids, replication, cap).run(previous or {})
    # A member left with no replica is a newcomer to the next run, which could claim for it
    # what this one did not (its claims and the walk see different neighbours). Run again
    # until nothing changes: then the result is a fixed point. Each further run only makes
    # claims, and each claim puts one more replica where plain consistent hashing wants it,
    # so this ends within m runs; in practice one, and none when every member holds something.
    for _ in range(len(shard_ids) * replication + 1):
        holding = {name for names in table.values() for name in names}
        if all(info.name in holding for info in infos):
            return table
        again = _Placer(infos, shard_ids, replication, cap).run(table)
        if again == table:
            return table
        table = again
    raise InvariantViolation("placement: claims did not converge")  # pragma: no cover


# --- validation ------------------------------------------------------------------------------


def _check_epsilon(epsilon: float) -> None:
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, int | float)
        or not math.isfinite(epsilon)
        or epsilon <= 0
    ):
        raise InvalidArgument(f"epsilon must be a finite number > 0, got {epsilon!r}")


def _normalize_nodes(nodes: Sequence[NodeInfo | str]) -> list[NodeInfo]:
    infos = [NodeInfo(n) if isinstance(n, str) else n for n in nodes]
    for info in infos:
        if not isinstance(info, NodeInfo) or not isinstance(info.name, str) or not info.name:
            raise InvalidArgument(f"a node must be a non-empty name or a NodeInfo, got {info!r}")
    dups = sorted(name for name, k in Counter(i.name for i in infos).items() if k > 1)
    if dups:
        raise InvalidArgument(f"duplicate node names: {', '.join(dups)}")
    return sorted(infos, key=lambda i: i.name)  # input order must not matter


def _check_shards(shards: Sequence[int]) -> list[int]:
    for s in shards:
        if isinstance(s, bool) or not isinstance(s, int):
            raise InvalidArgument(f"shard ids must be integers, got {s!r}")
    dups = sorted(s for s, k in Counter(shards).items() if k > 1)
    if dups:
        raise InvalidArgument(f"duplicate shard ids: {', '.join(map(str, dups))}")
    return sorted(shards)  # the processing order every membership replica agrees on


# --- the ring ----------------------------------------------------------------------------------


def _point(*parts: object) -> int:
    """A 64-bit ring position; stable across processes (Python's ``hash()`` is salted)."""
    key = "\x00".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, person=_PERSON).digest(), "big")


@functools.lru_cache(maxsize=1 << 16)
def _slot_point(shard: int, slot: int) -> int:
    return _point("shard", shard, slot)


@functools.lru_cache(maxsize=1024)
def _node_points(name: str) -> tuple[int, ...]:
    return tuple(_point("node", name, i) for i in range(VNODES_PER_NODE))


class _Ring:
    """Nodes (as indices into the name-sorted member list) at their points on the ring."""

    def __init__(self, names: Sequence[str]) -> None:
        # Ties between two nodes' 64-bit points break by name order: still input-order free.
        pairs = sorted((p, i) for i, name in enumerate(names) for p in _node_points(name))
        self._points = [p for p, _ in pairs]
        self._owners = [i for _, i in pairs]
        self._nodes = len(names)

    def walk(self, point: int) -> Iterator[int]:
        """Every node once, in clockwise order of its first ring point after ``point``."""
        total = len(self._points)
        start = bisect.bisect_left(self._points, point)
        seen: set[int] = set()
        for k in range(total):
            owner = self._owners[(start + k) % total]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == self._nodes:
                    return


# --- the placement -----------------------------------------------------------------------------


class _Placer:
    """One run of :func:`place`. Nodes are indices into the name-sorted member list."""

    def __init__(self, infos: list[NodeInfo], shard_ids: list[int], r: int, cap: int) -> None:
        self.names = [i.name for i in infos]
        self.index = {name: k for k, name in enumerate(self.names)}
        self.zones = [i.zone for i in infos]
        self.zoned = len(set(self.zones)) > 1
        self.shard_ids = shard_ids
        self.r = r
        self.cap = cap
        self.ring = _Ring(self.names)
        self.load = [0] * len(infos)
        self.table: dict[int, list[int | None]] = {s: [None] * r for s in shard_ids}
        self.held: Counter[int] = Counter()  # replicas each member holds in ``previous``

    def run(self, previous: Mapping[int, Sequence[str]]) -> dict[int, tuple[str, ...]]:
        # Phase 1 for every shard before phase 2 for any: a fresh placement must never take the
        # room a kept replica of a later shard needs, or it would push that replica off.
        known = {name for s in self.shard_ids for name in previous.get(s, ())}
        newcomers = {k for k, name in enumerate(self.names) if name not in known}
        for s in self.shard_ids:
            holders, _ = self._previous_holders(previous.get(s, ()))
            self.held.update(k for k in holders if k is not None)
        for s in self.shard_ids:
            self._keep(s, previous.get(s, ()), newcomers)
        for s in self.shard_ids:
            row = self.table[s]
            for j in range(self.r):
                if row[j] is None:
                    row[j] = self._walk(s, j)
        return self._result()

    def _keep(self, s: int, old: Sequence[str], newcomers: set[int]) -> None:
        """Phase 1: keep the previous replicas of ``s`` that may stay; newcomers claim theirs."""
        row = self.table[s]
        holders, spares = self._previous_holders(old)
        claimed: set[int] = set()  # slots taken by newcomers
        # A shard with no surviving replica is left to phase 2's walk, like a brand-new shard.
        if newcomers and any(k is not None for k in holders):
            fresh = self._fresh(s)
            for q in fresh:
                if q not in newcomers or self.load[q] >= self.cap:
                    continue
                slot = self._claim_slot(fresh, q, holders, claimed)
                if slot is None:
                    continue
                displaced = holders[slot]
                if displaced is not None:
                    spares.insert(0, displaced)
                    self.held[displaced] -= 1
                holders[slot] = q
                claimed.add(slot)
                self.load[q] += 1
        for j, p in enumerate(holders):
            if j in claimed:
                row[j] = p
            elif p is not None and self.load[p] < self.cap:
                row[j] = p
                self.load[p] += 1
        # An empty slot is better filled by a previous member than by a copy to a new node.
        for j in range(self.r):
            if row[j] is not None:
                continue
            for k in spares:
                if k not in row and self.load[k] < self.cap:
                    row[j] = k
                    self.load[k] += 1
                    break

    def _previous_holders(self, old: Sequence[str]) -> tuple[list[int | None], list[int]]:
        """The previous holder of each slot if still a member (first occurrence only), and the
        members ``old`` lists beyond slot ``r - 1`` (spares)."""
        holders: list[int | None] = [None] * self.r
        spares: list[int] = []
        seen: set[int] = set()
        for j, name in enumerate(old):
            k = self.index.get(name)
            if k is None or k in seen:
                continue
            seen.add(k)
            if j < self.r:
                holders[j] = k
            else:
                spares.append(k)
        return holders, spares

    def _claim_slot(
        self, fresh: list[int], q: int, holders: list[int | None], claimed: set[int]
    ) -> int | None:
        """The slot newcomer ``q`` takes in a shard whose fresh placement includes it, if any.

        The victim is a previous holder that the fresh placement no longer wants, preferably in
        the slot where the fresh placement puts ``q`` (so leadership spreads to new nodes too);
        failing that, an empty slot. A claim must not make the shard's zone spread worse.
        """
        free = [j for j in range(self.r) if j not in claimed]
        # A victim keeps at least one replica somewhere: a member emptied by a claim would be a
        # newcomer to the next run and claim back elsewhere, for nothing.
        victims = [
            j for j in free if (p := holders[j]) is not None and p not in fresh and self.held[p] > 1
        ]
        at = fresh.index(q)
        if victims:
            j = at if at in victims else victims[-1]
        else:
            empty = [j for j in free if holders[j] is None]
            if not empty:
                return None
            j = at if at in empty else empty[0]
        if self.zoned:
            others = [k for i, k in enumerate(holders) if k is not None and i != j]
            p = holders[j]
            limit = (
                self._zone_count(others, p)
                if p is not None
                else min(
                    self._zone_count(others, k) for k in range(len(self.names)) if k not in others
                )
            )
            if self._zone_count(others, q) > limit:
                return None
        return j

    def _fresh(self, s: int) -> list[int]:
        """The walk for every slot of ``s`` ignoring capacity: plain consistent hashing's answer."""
        chosen: list[int] = []
        for j in range(self.r):
            target: int | None = None
            counts: Counter[str] = Counter()
            if self.zoned:
                counts = Counter(self.zones[k] for k in chosen)
                target = min(
                    counts[self.zones[k]] for k in range(len(self.names)) if k not in chosen
                )
            for k in self.ring.walk(_slot_point(s, j)):
                if k not in chosen and (target is None or counts[self.zones[k]] == target):
                    chosen.append(k)
                    break
        return chosen

    def _zone_count(self, members: list[int], node: int) -> int:
        zone = self.zones[node]
        return sum(1 for k in members if self.zones[k] == zone)

    def _walk(self, s: int, j: int) -> int:
        """Phase 2: MTZ's walk for slot ``j`` of shard ``s``, with distinctness and zones."""
        row = self.table[s]
        held = {k for k in row if k is not None}
        point = _slot_point(s, j)
        target: int | None = None
        counts: Counter[str] = Counter()
        if self.zoned:
            counts = Counter(self.zones[k] for k in held)
            open_zones = {
                self.zones[k]
                for k in range(len(self.names))
                if k not in held and self.load[k] < self.cap
            }
            if open_zones:
                target = min(counts[z] for z in open_zones)
        for k in self.ring.walk(point):
            if k in held or self.load[k] >= self.cap:
                continue
            if target is not None and counts[self.zones[k]] != target:
                continue
            self.load[k] += 1
            return k
        return self._swap(s, point, held)

    def _swap(self, s: int, point: int, held: set[int]) -> int:
        """Every node without ``s`` is full: free one by moving another shard's replica.

        There are ``m <= n * cap`` balls and fewer than ``m`` are placed, so some node ``y`` is
        below ``cap``; it holds ``s``. A node ``x`` without ``s`` exists (``|held| < r <= n``)
        and is full: it holds ``cap`` shards, ``y`` at most ``cap - 2`` besides ``s``, so some
        shard ``t`` is on ``x`` and not on ``y``. Moving that replica keeps every invariant.
        """
        order = list(self.ring.walk(point))
        x = next(k for k in order if k not in held)
        y = next(k for k in order if self.load[k] < self.cap)
        for t in self.shard_ids:
            trow = self.table[t]
            if x in trow and y not in trow:
                trow[trow.index(x)] = y
                self.load[y] += 1
                self.load[x] -= 1
                break
        else:  # pragma: no cover - impossible by the counting argument above
            raise InvariantViolation(f"placement: no replica can move from node {x} to {y}")
        self.load[x] += 1
        return x

    def _result(self) -> dict[int, tuple[str, ...]]:
        out: dict[int, tuple[str, ...]] = {}
        for s in self.shard_ids:
            row = self.table[s]
            nodes = [k for k in row if k is not None]
            if len(nodes) != self.r or len(set(nodes)) != self.r:
                raise InvariantViolation(f"placement: shard {s} got {row}")
            out[s] = tuple(self.names[k] for k in nodes)
        if self.load and max(self.load) > self.cap:
            raise InvariantViolation(f"placement: a node holds {max(self.load)} > {self.cap}")
        return out
