"""The one place that says which public ``dkv.v1.KV`` requests make sense.

The gateway checks every request here before routing it and the node checks it again before
serving it (a node is also reachable directly), so a request is refused the same way at
either. Every refusal is :class:`dkv.errors.InvalidArgument` naming the field, which both
answer as ``INVALID_ARGUMENT``. What is checked is the request's own sense (enum values it
defines, integer ranges, fields that exclude each other, a range whose end is before its
start); sizes are the node's configured limits (``dkv_node.limits``), and shards the cluster
does not have are the router's to refuse.

proto3 enums are open: a ``consistency`` of 2 or 99 arrives as that number and would
otherwise be served as some default. Unknown fields cannot be seen here: Envoy's JSON
transcoder drops them, so a misspelt field arrives as an absent one. Where absence would
silently change what a request does, kv.proto gives the field explicit presence and it is
required here: ``PutRequest.value`` (a misspelt ``"valu"`` would write an empty value) and
``WatchRequest.start_revision`` (a misspelt one would turn a resumed watch into one from now
on, skipping the changes in between); a ``precondition`` that sets no condition is refused
(a misspelt ``"verison"`` inside it would make the write unconditional). docs/http.md lists
the decision for every field.

The other public services are checked here too, by the server that answers them (the node for
``dkv.v1.Admin``, a membership replica for ``dkv.v1.Membership``), before anything else: ids
that must be >= 1, enums against their values, names, ``host:port`` addresses (a port in
1-65535; IPv6 in brackets), fields that exclude each other. Requests with nothing to check
have no function: Status, MemberList, TransferLeadership and Snapshot (shard 0 and target 0
mean "every shard" and "the best voter"; which shards and voters exist is the node's state),
ListNodes, GetClusterMap and WatchClusterMap (every ``from_version`` has a meaning). What
needs the cluster's state (is that a member, a hosted shard, a known node) stays with the
handler.
"""

from __future__ import annotations

import re

from dkv.errors import InvalidArgument
from dkv.keys import prefix_end
from dkv.v1 import admin_pb2, kv_pb2
from dkv.v1 import membership_pb2 as mpb

__all__ = [
    "check_add_replica",
    "check_change_shard_membership",
    "check_delete",
    "check_heartbeat",
    "check_join_node",
    "check_leave_node",
    "check_member_add",
    "check_member_promote",
    "check_member_remove",
    "check_put",
    "check_range",
    "check_remove_replica",
    "check_watch",
    "range_bounds",
]

_CONSISTENCY = {
    value.number: value.name
    for value in kv_pb2.DESCRIPTOR.enum_types_by_name["ReadConsistency"].values
}
_RANGE_END_RULE = "range_end must be greater than key (or \\x00 for every key from key on)"


def _enum(field: str, value: int, names: dict[int, str]) -> None:
    if value not in names:
        allowed = ", ".join(f"{name} ({n})" for n, name in sorted(names.items()))
        raise InvalidArgument(f"{field} must be one of {allowed}; got {value}")


def _at_least_zero(field: str, value: int, meaning: str = "") -> None:
    if value < 0:
        raise InvalidArgument(f"{field} must be >= 0{meaning}; got {value}")


def _key_range(key: bytes, range_end: bytes, prefix: bytes) -> None:
    if prefix and (key or range_end):
        raise InvalidArgument("give either prefix, or key (with an optional range_end), not both")
    if not prefix and not key:
        raise InvalidArgument("key must not be empty (or give a prefix)")
    if range_end and range_end != b"\x00" and range_end <= key:
        raise InvalidArgument(_RANGE_END_RULE)


def _precondition(p: kv_pb2.Precondition) -> None:
    which = p.WhichOneof("condition")
    if which is None:
        raise InvalidArgument(
            "precondition must set one of version, mod_revision or value (it set none: "
            "a misspelt field inside it is dropped, and the write would be unconditional)"
        )
    if which == "version":
        _at_least_zero("precondition.version", p.version, " (0: the key must not exist)")
    elif which == "mod_revision":
        _at_least_zero("precondition.mod_revision", p.mod_revision, " (0: the key must not exist)")


def range_bounds(req: kv_pb2.RangeRequest) -> tuple[bytes, bytes]:
    """``[lo, hi)`` a range or prefix Range covers (``hi`` empty: to the end of the keys)."""
    if req.prefix:
        return req.prefix, prefix_end(req.prefix)
    return req.key, (b"" if req.range_end == b"\x00" else req.range_end)


def check_range(req: kv_pb2.RangeRequest) -> None:
    _key_range(req.key, req.range_end, req.prefix)
    _enum("consistency", req.consistency, _CONSISTENCY)
    _at_least_zero("limit", req.limit, " (0: the server's default page size)")
    if req.continuation:
        if not req.prefix and not req.range_end:
            raise InvalidArgument("continuation applies to a range or prefix, not to one key")
        lo, hi = range_bounds(req)
        if req.continuation < lo or (hi and req.continuation >= hi):
            raise InvalidArgument("continuation does not belong to this range")


def check_put(req: kv_pb2.PutRequest) -> None:
    if not req.key:
        raise InvalidArgument("key must not be empty")
    if not req.HasField("value"):
        raise InvalidArgument('value is required (send "" for an empty value)')
    if req.HasField("precondition"):
        _precondition(req.precondition)


def check_delete(req: kv_pb2.DeleteRequest) -> None:
    _key_range(req.key, req.range_end, b"")
    if req.HasField("precondition"):
        if req.range_end:
            raise InvalidArgument("a precondition applies to one key; drop range_end or it")
        _precondition(req.precondition)
    if req.shard_id and not req.range_end:
        raise InvalidArgument("shard_id applies to range deletes (with range_end) only")


def check_watch(req: kv_pb2.WatchRequest) -> None:
    _key_range(req.key, req.range_end, req.prefix)
    if not req.HasField("start_revision"):
        raise InvalidArgument(
            "start_revision is required (0: changes from now on; N: from revision N on)"
        )
    _at_least_zero("start_revision", req.start_revision, " (0: changes from now on)")


# -- dkv.v1.Admin and dkv.v1.Membership ---------------------------------------------------------

_MEMBERSHIP_CHANGE = {
    value.number: value.name
    for value in admin_pb2.DESCRIPTOR.enum_types_by_name["MembershipChange"].values
}
# A member's or replica's name: what `dkvctl member add` and `cluster replica-add` accept.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,62}")
# host:port: a DNS name or IPv4 address, or an IPv6 address in brackets (zone allowed).
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._\-]*|\[[0-9A-Fa-f:.]+(%[A-Za-z0-9._\-]+)?\]")
_PORT = re.compile(r"[0-9]{1,5}")


def _at_least_one(field: str, value: int) -> None:
    if value < 1:
        raise InvalidArgument(f"{field} must be >= 1; got {value}")


def _name(field: str, value: str) -> None:
    if not _NAME.fullmatch(value):
        raise InvalidArgument(
            f"{field} {value!r} must be 1-63 letters, digits, '.', '_' or '-' (starting with a "
            "letter or digit)"
        )


def _host_port(field: str, value: str, what: str) -> None:
    host, sep, port = value.rpartition(":")
    if not (sep and _HOST.fullmatch(host) and _PORT.fullmatch(port) and 1 <= int(port) <= 65535):
        raise InvalidArgument(f"{field} {value!r} is not host:port ({what}; port 1-65535)")


def check_member_add(req: admin_pb2.MemberAddRequest) -> None:
    _name("name", req.name)
    _host_port("peer_address", req.peer_address, "the peer address the other members dial")


def check_member_promote(req: admin_pb2.MemberPromoteRequest) -> None:
    _at_least_one("id", req.id)


def check_member_remove(req: admin_pb2.MemberRemoveRequest) -> None:
    _at_least_one("id", req.id)


def check_change_shard_membership(req: admin_pb2.ChangeShardMembershipRequest) -> None:
    """One shard's change, as a node (``dkvctl member ...``) or the membership driver sends it
    to that shard's leader. An added learner comes with its name and peer address, which every
    replica learns so that it can reach it; a promotion or removal may carry them too (both
    senders fill them in when they know them). The name is the one the node registered
    (``dkv-node --name`` has no format rule), so only an empty one is refused here."""
    _at_least_one("shard_id", req.shard_id)
    _enum("change", req.change, _MEMBERSHIP_CHANGE)
    _at_least_one("member_id", req.member_id)
    if req.change == admin_pb2.MEMBERSHIP_CHANGE_ADD_LEARNER:
        if not req.name:
            raise InvalidArgument("name must not be empty when adding a learner")
        _host_port("peer_address", req.peer_address, "the peer address the other members dial")


def check_join_node(req: mpb.JoinNodeRequest) -> None:
    """``node.state`` and ``node.last_heartbeat_unix_ms`` are documented as ignored."""
    if not req.HasField("node"):
        raise InvalidArgument("node is required (id, name, peer_address, client_address)")
    n = req.node
    _at_least_one("node.id", n.id)
    if not n.name:
        raise InvalidArgument("node.name must not be empty")
    _host_port("node.peer_address", n.peer_address, "the node's Raft peer address")
    _host_port("node.client_address", n.client_address, "the client address the gateway dials")


def check_leave_node(req: mpb.LeaveNodeRequest) -> None:
    _at_least_one("node_id", req.node_id)


def check_heartbeat(req: mpb.HeartbeatRequest) -> None:
    _at_least_one("node_id", req.node_id)
    seen: set[int] = set()
    for i, e in enumerate(req.leaders):
        _at_least_one(f"leaders[{i}].shard_id", e.shard_id)
        _at_least_one(f"leaders[{i}].term", e.term)
        if e.leader_id not in (0, req.node_id):
            raise InvalidArgument(
                f"leaders[{i}].leader_id must be 0 or node_id ({req.node_id}); got {e.leader_id}: "
                "a node reports only the shards it leads"
            )
        if e.shard_id in seen:
            raise InvalidArgument(f"leaders[{i}].shard_id {e.shard_id} is listed twice")
        seen.add(e.shard_id)


def check_add_replica(req: mpb.AddReplicaRequest) -> None:
    _name("name", req.name)
    _host_port("peer_address", req.peer_address, "the peer address the other replicas dial")


def check_remove_replica(req: mpb.RemoveReplicaRequest) -> None:
    if not req.name:
        raise InvalidArgument("name must not be empty (the replica to remove)")
