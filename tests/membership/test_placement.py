"""dkv_membership.placement: consistent hashing with bounded loads (Mirrokni, Thorup,
Zadimoghaddam, SODA 2018) for shard replicas.

What is checked, in the order of the module docstring: every shard gets ``R`` distinct members;
no node holds more than ``ceil((1 + eps) * average)``, for every shape (property-based); the
answer is a pure function of the inputs (not of their order, not of the process); with
``previous``, adding a node moves about its fair share ``m / (n + 1)`` of the ``m`` replicas and
removing one moves exactly its replicas; zones spread replicas; bad input is refused.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import math
import random
import statistics
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from unittest import mock

import pytest
from dkv_membership import placement
from dkv_membership.placement import NodeInfo, capacity, moves, place
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dkv.errors import InvalidArgument

Table = Mapping[int, Sequence[str]]


def loads(table: Table) -> Counter[str]:
    return Counter(name for names in table.values() for name in names)


def bound(shards: int, nodes: int, r: int, eps: float) -> int:
    """The load bound, computed independently of the module: ceil((1 + eps) * m / n)."""
    return math.ceil((1 + Fraction(str(eps))) * shards * r / nodes)


def check_valid(
    table: Table, shards: Sequence[int], nodes: Sequence[str], r: int, eps: float
) -> None:
    assert sorted(table) == sorted(shards)
    members = set(nodes)
    for shard, names in table.items():
        assert len(names) == r, f"shard {shard} has {names}"
        assert len(set(names)) == r, f"shard {shard} repeats a node: {names}"
        assert set(names) <= members, f"shard {shard} uses a non-member: {names}"
    if table:
        assert max(loads(table).values()) <= bound(len(shards), len(nodes), r, eps)


def names(n: int, prefix: str = "node") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def naive(shards: Sequence[int], nodes: Sequence[str], r: int) -> dict[int, tuple[str, ...]]:
    """What consistent hashing replaces: replicas at hash(shard) mod n and the next r-1 nodes."""
    ordered = sorted(nodes)
    out = {}
    for s in shards:
        h = int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=8).digest(), "big")
        out[s] = tuple(ordered[(h + j) % len(ordered)] for j in range(r))
    return out


@contextlib.contextmanager
def counting_swaps() -> Iterator[list[int]]:
    """Record the shards for which placement had to swap a replica to make room."""
    swaps: list[int] = []
    real_swap = placement._Placer._swap

    def counting_swap(self: placement._Placer, s: int, point: int, held: set[int]) -> int:
        swaps.append(s)
        return real_swap(self, s, point, held)

    with mock.patch.object(placement._Placer, "_swap", counting_swap):
        yield swaps


# --- every shape -------------------------------------------------------------------------------

EPSILONS = [0.01, 0.1, 0.25, 0.5, 1.0, 3.0]


Shape = tuple[list[int], list[NodeInfo], int, float]


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    """1..64 nodes (in 1..4 zones, or none), 0..1024 shards, R in 1..5, eps from EPSILONS."""
    n = draw(st.integers(1, 64))
    r = draw(st.integers(1, min(5, n)))
    count = draw(st.integers(0, 1024))
    first = draw(st.integers(0, 10**6))
    shards = list(range(first, first + count))
    zones = draw(st.integers(0, 4))
    prefix = draw(st.sampled_from(["node", "dkv-node", "10.0.0"]))
    nodes = [
        NodeInfo(name, f"z{i % zones}" if zones else "") for i, name in enumerate(names(n, prefix))
    ]
    return shards, nodes, r, draw(st.sampled_from(EPSILONS))


def member_names(nodes: Sequence[NodeInfo]) -> list[str]:
    return [node.name for node in nodes]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes(), seed=st.integers(0, 2**32))
def test_every_shape_gets_r_distinct_nodes_within_the_bound(shape: Shape, seed: int) -> None:
    shards, nodes, r, eps = shape
    table = place(shards, nodes, r, eps)
    check_valid(table, shards, member_names(nodes), r, eps)
    # Neither the order of the nodes nor that of the shards matters.
    rng = random.Random(seed)
    shuffled_nodes, shuffled_shards = nodes[:], shards[:]
    rng.shuffle(shuffled_nodes)
    rng.shuffle(shuffled_shards)
    assert place(shuffled_shards, shuffled_nodes, r, eps) == table
    # The answer is a fixed point: feeding it back changes nothing.
    assert place(shards, nodes, r, eps, previous=table) == table


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes(),
    gone=st.integers(0, 3),
    new=st.integers(0, 3),
    new_r=st.integers(1, 5),
)
def test_after_any_membership_change_the_table_is_valid_and_moves_are_accounted_for(
    shape: Shape, gone: int, new: int, new_r: int
) -> None:
    shards, nodes, r, eps = shape
    before = place(shards, nodes, r, eps)
    members = nodes[gone:] + [NodeInfo(f"added-{i}", f"z{i}") for i in range(new)]
    if not members:
        return
    r2 = min(new_r, len(members))
    with counting_swaps() as swaps:
        after = place(shards, members, r2, eps, previous=before)
    check_valid(after, shards, member_names(members), r2, eps)
    # Every copy (1) replaces a replica lost with a departed node, (2) lands on a node that held
    # nothing before (or nothing in the first r2 slots, when replication shrank), (3) fills a
    # slot that a higher replication factor added, (4) makes room under the new capacity, or
    # (5) is the one extra move of a swap (tight eps only).
    held_before = set(loads({s: names[:r2] for s, names in before.items()}))
    newcomer_load = sum(k for name, k in loads(after).items() if name not in held_before)
    live = set(member_names(members))
    lost = sum(len([x for x in before[s] if x not in live]) for s in shards)
    grown = max(0, r2 - r) * len(shards)
    overflow = sum(
        max(0, k - bound(len(shards), len(members), r2, eps)) for k in loads(before).values()
    )
    assert moves(before, after) <= lost + newcomer_load + grown + overflow + len(swaps)


# --- determinism -------------------------------------------------------------------------------


def test_placement_is_the_same_in_every_process() -> None:
    # Golden: BLAKE2b, never Python's salted hash(). If this changes, every cluster reshuffles.
    assert place([1, 2, 3, 4, 5, 6], ["a", "b", "c", "d", "e"], 3) == {
        1: ("a", "e", "d"),
        2: ("e", "d", "c"),
        3: ("d", "a", "e"),
        4: ("a", "b", "c"),
        5: ("d", "a", "e"),
        6: ("d", "e", "c"),
    }


def test_node_infos_and_names_place_alike() -> None:
    shards = range(100)
    assert place(shards, names(7), 3) == place(shards, [NodeInfo(n) for n in names(7)], 3)


def test_the_module_is_pure() -> None:
    tree = ast.parse(Path(placement.__file__).read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    impure = {"asyncio", "datetime", "os", "random", "secrets", "socket", "time", "uuid", "grpc"}
    assert not roots & impure


# --- balance -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "shards", "r"), [(3, 1024, 3), (8, 1024, 3), (32, 1024, 3), (64, 1024, 5), (5, 7, 2)]
)
@pytest.mark.parametrize("eps", [0.05, 0.25, 1.0])
def test_max_load_over_average_is_at_most_1_plus_eps(
    n: int, shards: int, r: int, eps: float
) -> None:
    table = place(range(shards), names(n), r, eps)
    average = shards * r / n
    peak = max(loads(table).values())
    # ceil() can add at most one replica above (1 + eps) * average.
    assert peak <= (1 + eps) * average + 1
    if average * eps >= 1:
        assert peak / average <= 1 + eps + 1 / average


def test_a_tight_bound_is_still_met_when_greedy_walking_gets_stuck() -> None:
    # With eps = 0.01 and R close to n, greedy walking can run out of nodes that both lack the
    # shard and have room; a swap makes room. These shapes are ones that need it.
    for n, r, count in [(3, 2, 34), (4, 3, 5), (5, 4, 6), (6, 5, 7)]:
        with counting_swaps() as swaps:
            table = place(range(count), names(n), r, 0.01)
        assert swaps, (n, r, count)
        check_valid(table, range(count), names(n), r, 0.01)


def test_no_shards_and_a_single_node() -> None:
    assert place([], names(3), 3) == {}
    assert place([7, 3], ["only"], 1) == {3: ("only",), 7: ("only",)}


# --- stability ---------------------------------------------------------------------------------


def test_adding_a_node_moves_about_its_fair_share() -> None:
    """Adding node n+1 must move at least its fair share m/(n+1) of the m replicas; consistent
    hashing moves about that much (the new node's ring share), a naive rehash nearly everything.

    Measured (256 shards, R=3, eps=0.25, n = 3..32, five naming schemes, 150 cases): moved /
    (m/(n+1)) has mean 1.005, standard deviation 0.15, maximum 1.31; the two schemes below give
    mean 1.010, maximum 1.29, minimum 0.64. The spread is the new node's share of the ring (128
    points: about 1/sqrt(128) = 9%) plus sampling. So we assert a mean below 1.25 (more than 7
    standard errors above what we measure) and every case below 2x the fair share. Copies that
    do not go to the new node (made to get under the lower capacity): 54 of 3,489; the bound
    below is 2%. Naive mod-n placement moves 25..90% of all replicas.
    """
    shards, r = range(1, 257), 3
    m = len(shards) * r
    ratios, cascades, ours, rehash = [], 0, 0, 0
    for prefix in ["node", "dkv-node"]:
        for n in range(3, 33):
            nodes = names(n, prefix)
            added = f"{prefix}-{n}"
            before = place(shards, nodes, r)
            after = place(shards, [*nodes, added], r, previous=before)
            check_valid(after, shards, [*nodes, added], r, 0.25)
            moved = moves(before, after)
            assert moved <= 2 * m / (n + 1), (n, prefix, moved)
            ratios.append(moved / (m / (n + 1)))
            cascade = moved - loads(after)[added]
            cascades += cascade
            # A shard that did not gain the new node keeps its replicas, in their slots, unless
            # one of them had to make room.
            untouched = [s for s in shards if added not in after[s]]
            assert sum(after[s] != before[s] for s in untouched) <= cascade
            ours += moved
            rehash += moves(naive(shards, nodes, r), naive(shards, [*nodes, added], r))
    assert statistics.mean(ratios) < 1.25, statistics.mean(ratios)
    assert min(ratios) > 0.3  # the new node really takes load
    assert cascades <= 0.02 * ours, (cascades, ours)
    assert ours * 5 < rehash


def test_removing_a_node_moves_exactly_its_replicas() -> None:
    shards, r = range(512), 3
    for n in range(4, 33, 3):
        nodes = names(n)
        before = place(shards, nodes, r)
        for gone in (nodes[0], nodes[n // 2], nodes[-1]):
            rest = [x for x in nodes if x != gone]
            after = place(shards, rest, r, previous=before)
            check_valid(after, shards, rest, r, 0.25)
            assert moves(before, after) == loads(before)[gone]
            for s in shards:
                if gone not in before[s]:
                    assert after[s] == before[s]


def test_a_history_of_changes_moves_no_more_than_recomputing() -> None:
    # Keeping what may stay copies less than recomputing from scratch, clearly so when eps is
    # small (measured at eps=0.05, 16 nodes, 20 random joins and leaves: 10..16% fewer copies;
    # at eps=0.25 the two are within 2%, as MTZ's cascades are rare there).
    shards, r, eps = range(256), 3, 0.05
    rng = random.Random(7)
    members, serial = names(16), 16
    kept = fresh = place(shards, members, r, eps)
    kept_moves = fresh_moves = 0
    for _ in range(20):
        if len(members) > 8 and rng.random() < 0.5:
            members.remove(rng.choice(members))
        else:
            members.append(f"node-{serial}")
            serial += 1
        k2 = place(shards, members, r, eps, previous=kept)
        f2 = place(shards, members, r, eps)
        check_valid(k2, shards, members, r, eps)
        kept_moves += moves(kept, k2)
        fresh_moves += moves(fresh, f2)
        kept, fresh = k2, f2
    assert kept_moves < fresh_moves


def test_changing_replication_copies_only_the_difference() -> None:
    shards, nodes = range(300), names(10)
    three = place(shards, nodes, 3)
    four = place(shards, nodes, 4, previous=three)
    assert moves(three, four) == len(shards)
    assert all(four[s][:3] == three[s] for s in shards)
    two = place(shards, nodes, 2, previous=three)
    assert moves(three, two) == 0


def test_previous_may_name_departed_nodes_and_unknown_shards() -> None:
    nodes = names(5)
    before = {
        1: ("gone", "node-1", "node-1"),  # a departed node and a repeated one: two slots to fill
        2: ("node-0", "node-2", "node-3"),
        3: ("node-4", "node-0", "node-2"),
        99: ("node-0", "gone"),  # not a shard any more
    }
    after = place([1, 2, 3], nodes, 3, previous=before)
    check_valid(after, [1, 2, 3], nodes, 3, 0.25)
    assert after[1][1] == "node-1"
    assert after[2] == before[2] and after[3] == before[3]
    assert moves(before, after) == 2


# --- zones -------------------------------------------------------------------------------------


def zoned(n: int, zones: int) -> list[NodeInfo]:
    return [NodeInfo(f"node-{i}", f"zone-{i % zones}") for i in range(n)]


def spread(table: Table, infos: Sequence[NodeInfo]) -> Counter[int]:
    zone = {i.name: i.zone for i in infos}
    return Counter(len({zone[x] for x in names}) for names in table.values())


def test_replicas_spread_over_zones() -> None:
    shards = range(512)
    infos = zoned(12, 3)
    table = place(shards, infos, 3)
    check_valid(table, shards, [i.name for i in infos], 3, 0.25)
    assert spread(table, infos) == {3: len(shards)}
    assert spread(place(shards, zoned(12, 2), 3), zoned(12, 2)) == {2: len(shards)}

    # Adding a node keeps the spread; so does losing one.
    grown = [*infos, NodeInfo("node-new", "zone-1")]
    after = place(shards, grown, 3, previous=table)
    check_valid(after, shards, [i.name for i in grown], 3, 0.25)
    assert spread(after, grown) == {3: len(shards)}
    assert moves(table, after) <= 2 * len(shards) * 3 / 13
    shrunk = infos[1:]
    after = place(shards, shrunk, 3, previous=table)
    assert spread(after, shrunk) == {3: len(shards)}
    assert moves(table, after) == loads(table)["node-0"]


# --- moves() and errors ------------------------------------------------------------------------


def test_moves_counts_copies_not_reorderings() -> None:
    before = {1: ("a", "b", "c"), 2: ("a", "b", "c")}
    assert moves(before, before) == 0
    assert moves(before, {1: ("c", "b", "a"), 2: ("a", "b", "c")}) == 0
    assert moves(before, {1: ("a", "b", "d"), 2: ("e", "f", "c")}) == 3
    assert moves(before, {**before, 3: ("a", "b", "c")}) == 3
    assert moves(before, {1: ("a", "b", "c")}) == 0


def test_capacity_is_exact() -> None:
    assert capacity(30, 3, 0.1) == 11  # float arithmetic would say 12
    assert capacity(12, 4, 0.25) == 4
    assert capacity(0, 4, 0.25) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"replication": 4}, "replication 4 needs at least 4 nodes, got 3"),
        ({"replication": 0}, "replication must be an integer >= 1"),
        ({"epsilon": 0}, "epsilon must be a finite number > 0"),
        ({"epsilon": -0.5}, "epsilon must be a finite number > 0"),
        ({"epsilon": math.nan}, "epsilon must be a finite number > 0"),
        ({"epsilon": math.inf}, "epsilon must be a finite number > 0"),
        ({"nodes": ["a", "b", "a", "c"]}, "duplicate node names: a"),
        ({"nodes": ["a", NodeInfo("b"), NodeInfo("a", "z")]}, "duplicate node names: a"),
        ({"nodes": ["a", ""]}, "a node must be a non-empty name"),
        ({"shards": [1, 2, 1]}, "duplicate shard ids: 1"),
        ({"shards": [1, "2"]}, "shard ids must be integers, got '2'"),
        ({"previous": {1: "abc"}}, "must be a sequence of node names"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"shards": [1, 2], "nodes": ["a", "b", "c"], **kwargs}
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")):
        place(**args)  # type: ignore[arg-type]


def test_capacity_refuses_bad_input() -> None:
    with pytest.raises(InvalidArgument, match="at least one node"):
        capacity(3, 0, 0.25)
    with pytest.raises(InvalidArgument, match="epsilon"):
        capacity(3, 1, 0.0)
