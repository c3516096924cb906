"""Every field of every public Admin and Membership request is checked in one place
(dkv.validation), as the KV requests are (tests/test_validation.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dkv.errors import InvalidArgument
from dkv.v1 import admin_pb2 as a
from dkv.v1 import membership_pb2 as m
from dkv.validation import (
    check_add_replica,
    check_change_shard_membership,
    check_heartbeat,
    check_join_node,
    check_leave_node,
    check_member_add,
    check_member_promote,
    check_member_remove,
    check_remove_replica,
)

ADD, PROMOTE, REMOVE = (
    a.MEMBERSHIP_CHANGE_ADD_LEARNER,
    a.MEMBERSHIP_CHANGE_PROMOTE,
    a.MEMBERSHIP_CHANGE_REMOVE,
)
CSM = a.ChangeShardMembershipRequest
LE = m.LeaderEntry


def node(**fields: Any) -> m.Node:
    """What a node registers (dkv_node.registration): fields override a good one."""
    base: dict[str, Any] = {
        "id": 7,
        "name": "n1",
        "peer_address": "127.0.0.1:2491",
        "client_address": "127.0.0.1:2391",
    }
    return m.Node(**{**base, **fields})


BAD = [
    # (request, the words the refusal must contain)
    (a.MemberAddRequest(peer_address="h:1"), "name '' must be 1-63 letters"),
    (a.MemberAddRequest(name="-x", peer_address="h:1"), "name '-x' must be"),
    (a.MemberAddRequest(name="a b", peer_address="h:1"), "name 'a b' must be"),
    (a.MemberAddRequest(name="x\n", peer_address="h:1"), "name 'x\\n' must be"),
    (a.MemberAddRequest(name="x" * 64, peer_address="h:1"), "must be 1-63"),
    (a.MemberAddRequest(name="x"), "peer_address '' is not host:port"),
    (a.MemberAddRequest(name="x", peer_address="nowhere"), "peer_address 'nowhere' is not"),
    (a.MemberAddRequest(name="x", peer_address="h:0"), "port 1-65535"),
    (a.MemberAddRequest(name="x", peer_address="h:65536"), "peer_address 'h:65536'"),
    (a.MemberAddRequest(name="x", peer_address="h:99999"), "peer_address 'h:99999'"),
    (a.MemberAddRequest(name="x", peer_address=":2380"), "peer_address ':2380'"),
    (a.MemberAddRequest(name="x", peer_address="h:"), "peer_address 'h:'"),
    (a.MemberAddRequest(name="x", peer_address="h:²"), "peer_address 'h:²'"),
    (a.MemberAddRequest(name="x", peer_address="::1:2380"), "peer_address '::1:2380'"),
    (a.MemberAddRequest(name="x", peer_address="h:1\n"), "is not host:port"),
    (a.MemberAddRequest(name="x", peer_address="a b:1"), "is not host:port"),
    (a.MemberAddRequest(name="x", peer_address="[]:1"), "is not host:port"),
    (a.MemberPromoteRequest(), "id must be >= 1; got 0"),
    (a.MemberRemoveRequest(), "id must be >= 1; got 0"),
    (CSM(change=REMOVE, member_id=5), "shard_id must be >= 1; got 0"),
    (CSM(shard_id=1, change=99, member_id=5), "change must be one of"),  # type: ignore[arg-type]
    (CSM(shard_id=1, change=3, member_id=5), "got 3"),  # type: ignore[arg-type]
    (CSM(shard_id=1, change=-1, member_id=5), "got -1"),  # type: ignore[arg-type]
    (CSM(shard_id=1, change=REMOVE), "member_id must be >= 1; got 0"),
    (CSM(shard_id=1, change=ADD, member_id=5, name="x"), "peer_address '' is not host:port"),
    (CSM(shard_id=1, change=ADD, member_id=5, peer_address="h:1"), "name must not be empty"),
    (CSM(shard_id=1, change=ADD, member_id=5, name="x", peer_address="h:0"), "peer_address"),
    (m.JoinNodeRequest(), "node is required"),
    (m.JoinNodeRequest(node=node(id=0)), "node.id must be >= 1; got 0"),
    (m.JoinNodeRequest(node=node(name="")), "node.name must not be empty"),
    (m.JoinNodeRequest(node=node(peer_address="")), "node.peer_address '' is not host:port"),
    (m.JoinNodeRequest(node=node(peer_address="x")), "node.peer_address 'x' is not host:port"),
    (m.JoinNodeRequest(node=node(client_address="")), "node.client_address '' is not"),
    (m.JoinNodeRequest(node=node(client_address="h:0")), "node.client_address 'h:0'"),
    (m.JoinNodeRequest(node=node(client_address="h:70000")), "node.client_address"),
    (m.LeaveNodeRequest(), "node_id must be >= 1; got 0"),
    (m.HeartbeatRequest(), "node_id must be >= 1; got 0"),
    (m.HeartbeatRequest(node_id=2, leaders=[LE(term=3)]), "leaders[0].shard_id must be >= 1"),
    (m.HeartbeatRequest(node_id=2, leaders=[LE(shard_id=1)]), "leaders[0].term must be >= 1"),
    (
        m.HeartbeatRequest(node_id=2, leaders=[LE(shard_id=1, term=1), LE(shard_id=2, term=0)]),
        "leaders[1].term must be >= 1; got 0",
    ),
    (
        m.HeartbeatRequest(node_id=2, leaders=[LE(shard_id=1, leader_id=3, term=1)]),
        "leaders[0].leader_id must be 0 or node_id (2); got 3",
    ),
    (
        m.HeartbeatRequest(node_id=2, leaders=[LE(shard_id=4, term=1), LE(shard_id=4, term=2)]),
        "leaders[1].shard_id 4 is listed twice",
    ),
    (m.AddReplicaRequest(peer_address="h:1"), "name '' must be 1-63"),
    (m.AddReplicaRequest(name="m 4", peer_address="h:1"), "name 'm 4' must be"),
    (m.AddReplicaRequest(name="m4"), "peer_address '' is not host:port"),
    (m.AddReplicaRequest(name="m4", peer_address="nowhere"), "the peer address"),
    (m.AddReplicaRequest(name="m4", peer_address="h:0"), "port 1-65535"),
    (m.RemoveReplicaRequest(), "name must not be empty"),
]
GOOD = [
    # What dkvctl, dkv.client, node registration and the node's own forwarding send.
    a.MemberAddRequest(name="n4", peer_address="127.0.0.1:2494"),
    a.MemberAddRequest(name="dkv-3.dkv_x", peer_address="dkv-3.dkv.default.svc:2380"),
    a.MemberAddRequest(name="x" * 63, peer_address="[::1]:65535"),
    a.MemberAddRequest(name="N_1", peer_address="[fe80::1%eth0]:1"),
    a.MemberAddRequest(name="d", peer_address="localhost.:2380"),
    a.MemberPromoteRequest(id=0x1DE765838607EA0A),
    a.MemberRemoveRequest(id=1),
    CSM(shard_id=1, change=ADD, member_id=5, name="d", peer_address="127.0.0.1:1"),
    CSM(shard_id=2, change=PROMOTE, member_id=5, name="d", peer_address="127.0.0.1:1"),
    CSM(shard_id=2, change=PROMOTE, member_id=5),  # the asking node does not know its address
    CSM(shard_id=2, change=PROMOTE, member_id=5, name="d"),  # a name learned without address
    CSM(shard_id=3, change=REMOVE, member_id=5),
    # The membership driver names the node as registered, for every change.
    CSM(shard_id=3, change=REMOVE, member_id=5, name="d", peer_address="127.0.0.1:1"),
    CSM(shard_id=1, change=ADD, member_id=5, name="node 5", peer_address="10.0.0.5:2380"),
    m.JoinNodeRequest(node=node()),
    m.JoinNodeRequest(node=node(peer_address="[::]:2380", client_address="0.0.0.0:2379")),
    m.JoinNodeRequest(node=node(name="dkv-0", zone="z1", labels={"rack": "r1"})),
    # state and last_heartbeat_unix_ms are documented as ignored (the service clears them).
    m.JoinNodeRequest(node=node(state=99, last_heartbeat_unix_ms=5)),
    m.LeaveNodeRequest(node_id=3),
    m.HeartbeatRequest(node_id=2),
    m.HeartbeatRequest(
        node_id=2, leaders=[LE(shard_id=1, leader_id=2, term=4), LE(shard_id=3, term=1)]
    ),
    m.AddReplicaRequest(name="m4", peer_address="127.0.0.1:2483"),
    m.RemoveReplicaRequest(name="m1"),
    m.RemoveReplicaRequest(name="not-a-replica"),  # idempotent: absent is success (state)
]
CHECKS: dict[type, Callable[[Any], None]] = {
    a.MemberAddRequest: check_member_add,
    a.MemberPromoteRequest: check_member_promote,
    a.MemberRemoveRequest: check_member_remove,
    a.ChangeShardMembershipRequest: check_change_shard_membership,
    m.JoinNodeRequest: check_join_node,
    m.LeaveNodeRequest: check_leave_node,
    m.HeartbeatRequest: check_heartbeat,
    m.AddReplicaRequest: check_add_replica,
    m.RemoveReplicaRequest: check_remove_replica,
}


@pytest.mark.parametrize(
    ("req", "words"), BAD, ids=[f"{type(r).__name__}-{i}" for i, (r, _) in enumerate(BAD)]
)
def test_a_request_that_makes_no_sense_is_refused_naming_the_field(req: object, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        CHECKS[type(req)](req)
    assert words in str(info.value)


@pytest.mark.parametrize("req", GOOD, ids=[f"{type(r).__name__}-{i}" for i, r in enumerate(GOOD)])
def test_sensible_requests_pass(req: object) -> None:
    CHECKS[type(req)](req)


def test_every_request_type_with_fields_to_check_has_a_check() -> None:
    """The requests without a function have nothing a request alone can get wrong."""
    unchecked = {
        a.StatusRequest,
        a.MemberListRequest,  # serializable: a bool
        a.TransferLeadershipRequest,  # 0 means every shard / the best voter
        a.SnapshotRequest,  # 0 means every shard
        m.ListNodesRequest,
        m.GetClusterMapRequest,
        m.WatchClusterMapRequest,  # every from_version means something
    }
    requests = {
        getattr(mod, name)
        for mod in (a, m)
        for svc in mod.DESCRIPTOR.services_by_name.values()
        for name in (meth.input_type.name for meth in svc.methods)
    }
    assert requests == set(CHECKS) | unchecked
