"""ClusterMapView: a whole map, then deltas (nodes added/changed/removed, replica sets, the
slot table, leaders), and the lookups routers make after each step."""

from __future__ import annotations

from dkv.client.cluster_map import ClusterMapView
from dkv.sharding import SLOT_COUNT, slot_for_key, static_shard_for_slot
from dkv.v1 import membership_pb2 as pb


def node(nid: int, state: int = pb.NODE_STATE_UP) -> pb.Node:
    return pb.Node(
        id=nid,
        name=f"n{nid}",
        peer_address=f"10.0.0.{nid}:2380",
        client_address=f"10.0.0.{nid}:2379",
        state=state,  # type: ignore[arg-type]
    )


def table(shards: int) -> list[pb.SlotRange]:
    out: list[pb.SlotRange] = []
    for slot in range(SLOT_COUNT):
        sid = static_shard_for_slot(slot, shards)
        if out and out[-1].shard_id == sid:
            out[-1].end = slot + 1
        else:
            out.append(pb.SlotRange(start=slot, end=slot + 1, shard_id=sid))
    return out


def key_of_slot_in(view: ClusterMapView, shard: int) -> bytes:
    i = 0
    while view.shard_of_key(b"k%d" % i) != shard:
        i += 1
    return b"k%d" % i


def test_full_map_then_deltas() -> None:
    view = ClusterMapView()
    assert not view.initialized and view.shard_count == 0
    assert view.shard_of_key(b"anything") == 0
    assert view.replicas(1) == [] and view.leader(1) == 0 and view.client_address(1) == ""

    # Nodes registered, no shards yet: still not initialized.
    view.apply(
        pb.WatchClusterMapResponse(
            version=3, full=True, map=pb.ClusterMap(version=3, nodes=[node(1), node(2)])
        )
    )
    assert view.version == 3 and not view.initialized
    assert view.client_address(2) == "10.0.0.2:2379"

    # The whole map: 2 shards, slot table, one leader. Ranges arrive unsorted: still found.
    full = pb.ClusterMap(
        version=7,
        nodes=[node(1), node(2), node(3)],
        shards=[
            pb.Shard(id=1, epoch=1, voters=[1, 2], learners=[3]),
            pb.Shard(id=2, epoch=1, voters=[2, 3]),
        ],
        slot_ranges=list(reversed(table(2))),
        leaders=[pb.LeaderEntry(shard_id=1, leader_id=2, term=5)],
    )
    view.apply(pb.WatchClusterMapResponse(version=7, full=True, map=full))
    assert view.version == 7 and view.initialized and view.shard_count == 2
    for key in (b"a", b"b", b"user/1", b"\xff" * 8):
        assert view.shard_of_key(key) == static_shard_for_slot(slot_for_key(key), 2)
    assert view.shard_of_slot(0) == 1 and view.shard_of_slot(SLOT_COUNT - 1) == 2
    assert view.shard_of_slot(SLOT_COUNT) == 0  # past the table
    assert view.replicas(1) == [1, 2, 3] and view.replicas(2) == [2, 3]
    assert view.leader(1) == 2 and view.leader(2) == 0
    assert set(view.shards_of_node(3)) == {1, 2} and set(view.shards_of_node(1)) == {1}

    # A delta: node 4 joins, node 2 changes address, node 1 leaves; shard 2's replicas and
    # leader change; nothing said about the slot table (it stays).
    moved = node(2)
    moved.client_address = "10.0.1.2:2379"
    delta = pb.WatchClusterMapResponse(
        version=9,
        full=False,
        nodes=[node(4), moved],
        removed_node_ids=[1],
        shards=[pb.Shard(id=2, epoch=2, voters=[3, 4], learners=[2])],
        leaders=[pb.LeaderEntry(shard_id=2, leader_id=3, term=2)],
    )
    view.apply(delta)
    assert view.version == 9
    assert sorted(view.nodes) == [2, 3, 4]
    assert view.client_address(1) == "" and view.client_address(2) == "10.0.1.2:2379"
    assert view.replicas(2) == [3, 4, 2] and view.leader(2) == 3
    assert view.replicas(1) == [1, 2, 3] and view.leader(1) == 2  # untouched
    k1 = key_of_slot_in(view, 1)
    assert view.shard_of_key(k1) == 1  # the slot table stayed

    # A delta with a new slot table (3 shards) and a newer leader of shard 1.
    view.apply(
        pb.WatchClusterMapResponse(
            version=10,
            full=False,
            shards=[pb.Shard(id=3, epoch=1, voters=[4])],
            slot_ranges=table(3),
            leaders=[pb.LeaderEntry(shard_id=1, leader_id=3, term=6)],
        )
    )
    assert view.version == 10 and view.shard_count == 3
    for key in (b"a", b"b", b"user/1", k1):
        assert view.shard_of_key(key) == static_shard_for_slot(slot_for_key(key), 3)
    assert view.leader(1) == 3 and view.replicas(3) == [4]

    # A whole map again (the service forgot our version): it replaces everything.
    view.apply(
        pb.WatchClusterMapResponse(
            version=12,
            full=True,
            map=pb.ClusterMap(version=12, nodes=[node(5, pb.NODE_STATE_DOWN)]),
        )
    )
    assert view.version == 12 and not view.initialized
    assert list(view.nodes) == [5] and view.nodes[5].state == pb.NODE_STATE_DOWN
    assert view.leader(1) == 0 and view.shard_of_key(b"a") == 0


def test_view_does_not_share_state_with_the_messages() -> None:
    """Lookups stay right after the message objects the view was built from are reused."""
    view = ClusterMapView()
    msg = pb.WatchClusterMapResponse(
        version=2,
        full=True,
        map=pb.ClusterMap(
            version=2,
            nodes=[node(1)],
            shards=[pb.Shard(id=1, epoch=1, voters=[1])],
            slot_ranges=table(1),
            leaders=[pb.LeaderEntry(shard_id=1, leader_id=1, term=1)],
        ),
    )
    view.apply(msg)
    msg.map.nodes[0].client_address = "changed:1"
    msg.map.slot_ranges[0].shard_id = 9
    msg.map.shards[0].voters.append(7)
    msg.Clear()
    assert view.client_address(1) == "10.0.0.1:2379"
    assert view.shard_of_slot(0) == 1
    assert view.replicas(1) == [1] and view.leader(1) == 1
