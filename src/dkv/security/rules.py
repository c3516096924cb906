"""Who may call what, server by server (the tables :class:`dkv.security.access.Access` reads).

- the gateway's public port (behind Envoy): the KV API for users, by key range and action;
  ``dkv.v1.Cluster/Status`` (nodes' internals) for admins;
- a node's client port: the gateway, other nodes (forwarding) and membership (its placement
  driver's Admin calls), and admin users;
- a node's Raft peer port: nodes only; membership's peer port: membership replicas only;
- membership's client port: writes (join, heartbeat) from nodes only, cluster operations
  (drain, replica changes) from admins only, the map for components and admins;
- the gateway's xDS port: Envoy only.

Health checks are open everywhere (Kubernetes probes and Envoy's checks carry no identity).
"""

from __future__ import annotations

from typing import Any

from dkv.security.access import Admin, Components, Keys, Open, Rule
from dkv.security.authz import Action, KeyRange
from dkv.security.identity import Kind

__all__ = [
    "gateway_public_rules",
    "membership_client_rules",
    "membership_peer_rules",
    "node_client_rules",
    "node_peer_rules",
    "xds_rules",
]

HEALTH: dict[str, Rule] = {
    "/grpc.health.v1.Health/Check": Open(),
    "/grpc.health.v1.Health/Watch": Open(),
}
KV_METHODS = ("Range", "Put", "Delete", "Watch")
ADMIN_METHODS = (
    "Status",
    "MemberList",
    "MemberAdd",
    "MemberPromote",
    "MemberRemove",
    "TransferLeadership",
    "Snapshot",
    "ChangeShardMembership",
)
COMPONENTS = frozenset({Kind.GATEWAY, Kind.NODE, Kind.MEMBERSHIP})


def put_keys(req: Any) -> KeyRange:
    return KeyRange.key(req.key)


def span_keys(req: Any) -> KeyRange:
    """A Range, Delete or Watch: its prefix, else ``[key, range_end)`` as etcd encodes it."""
    prefix = getattr(req, "prefix", b"")
    if prefix:
        return KeyRange.prefix(prefix)
    return KeyRange.of_request(req.key, req.range_end)


def reveals_values(req: Any) -> bool:
    """A write whose answer or outcome shows stored values: ``prev_kv``, or a precondition
    (a compare tells whether the value is what the caller guessed), as etcd asks read for."""
    return bool(req.prev_kv) or req.HasField("precondition")


def _kv(rule_for: dict[str, Rule]) -> dict[str, Rule]:
    return {f"/dkv.v1.KV/{m}": r for m, r in rule_for.items()}


def gateway_public_rules() -> dict[str, Rule]:
    return {
        **_kv(
            {
                "Put": Keys(Action.WRITE, put_keys, reveals_values),
                "Delete": Keys(Action.WRITE, span_keys, reveals_values),
                "Range": Keys(Action.READ, span_keys),
                "Watch": Keys(Action.READ, span_keys),
            }
        ),
        "/dkv.v1.Cluster/Status": Admin(),
        **HEALTH,
    }


def node_client_rules() -> dict[str, Rule]:
    components = Components(COMPONENTS, admin_users=True)
    return {
        **{f"/dkv.v1.KV/{m}": components for m in KV_METHODS},
        **{f"/dkv.v1.Admin/{m}": components for m in ADMIN_METHODS},
        **HEALTH,
    }


def node_peer_rules() -> dict[str, Rule]:
    return {"/dkv.v1.RaftPeer/Stream": Components(frozenset({Kind.NODE})), **HEALTH}


def membership_peer_rules() -> dict[str, Rule]:
    return {"/dkv.v1.RaftPeer/Stream": Components(frozenset({Kind.MEMBERSHIP})), **HEALTH}


def membership_client_rules() -> dict[str, Rule]:
    nodes = Components(frozenset({Kind.NODE}))
    readers = Components(COMPONENTS, admin_users=True)
    m = "/dkv.v1.Membership/"
    return {
        f"{m}JoinNode": nodes,
        f"{m}Heartbeat": nodes,
        f"{m}LeaveNode": Admin(),
        f"{m}AddReplica": Admin(),
        f"{m}RemoveReplica": Admin(),
        f"{m}ListNodes": readers,
        f"{m}GetClusterMap": readers,
        f"{m}WatchClusterMap": readers,
        **HEALTH,
    }


def xds_rules() -> dict[str, Rule]:
    envoy = Components(frozenset({Kind.ENVOY}))
    ads = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
    return {
        f"{ads}StreamAggregatedResources": envoy,
        f"{ads}DeltaAggregatedResources": envoy,
    }
