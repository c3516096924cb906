"""A Python client for the ``dkv.v1.Membership`` service (read side).

``MembershipClient(endpoints)`` asks any membership replica; the reads are linearizable
(ReadIndex on the replica that answers). A replica that cannot serve a read now answers
UNAVAILABLE, with the leader's ``dkv-leader-address`` in the trailers when it knows it: the
call follows that hint, else tries the next endpoint, within ``timeout_s``. This is
:meth:`dkv.client.Client._call` with the Membership service name, so errors surface as the
same :mod:`dkv.errors` types (``ProposalDropped`` / ``NotLeader`` when no replica answered,
``DeadlineExceeded``, ``InvalidArgument``, ``DkvError`` for the rest).
"""

from __future__ import annotations

from dkv.client import Client, ClientTls
from dkv.v1 import membership_pb2 as pb

__all__ = ["MEMBERSHIP_SERVICE", "MembershipClient"]

MEMBERSHIP_SERVICE = "dkv.v1.Membership"


class MembershipClient:
    def __init__(
        self, endpoints: list[str], tls: ClientTls | None = None, timeout_s: float = 5.0
    ) -> None:
        self._client = Client(endpoints, tls, timeout_s)
        self.endpoints = self._client.endpoints
        self.timeout_s = timeout_s

    async def get_cluster_map(self) -> pb.ClusterMap:
        """The whole cluster map (nodes, shards, slot table, leaders) with its version."""
        resp = await self._client._call(
            "GetClusterMap",
            pb.GetClusterMapRequest(),
            pb.GetClusterMapResponse,
            service=MEMBERSHIP_SERVICE,
        )
        return resp.map

    async def describe(self) -> pb.GetClusterMapResponse:
        """The map plus which replica answered and which one leads the membership group."""
        resp: pb.GetClusterMapResponse = await self._client._call(
            "GetClusterMap",
            pb.GetClusterMapRequest(),
            pb.GetClusterMapResponse,
            service=MEMBERSHIP_SERVICE,
        )
        return resp

    async def list_nodes(self) -> tuple[list[pb.Node], int]:
        """Every registered node, sorted by id, and the map version they are from."""
        resp = await self._client._call(
            "ListNodes", pb.ListNodesRequest(), pb.ListNodesResponse, service=MEMBERSHIP_SERVICE
        )
        return list(resp.nodes), resp.version

    async def leave_node(self, node_id: int) -> pb.Node:
        """Start draining ``node_id`` (LEAVING): placement moves its replicas elsewhere, then
        removes it from the map. Returns the node as the map now has it."""
        resp = await self._client._call(
            "LeaveNode",
            pb.LeaveNodeRequest(node_id=node_id),
            pb.LeaveNodeResponse,
            service=MEMBERSHIP_SERVICE,
        )
        return resp.node

    async def add_replica(self, name: str, peer_address: str) -> list[pb.Replica]:
        """Add a membership replica (learner, caught up, then voter); see membership.proto."""
        resp = await self._client._call(
            "AddReplica",
            pb.AddReplicaRequest(name=name, peer_address=peer_address),
            pb.AddReplicaResponse,
            service=MEMBERSHIP_SERVICE,
        )
        return list(resp.replicas)

    async def remove_replica(self, name: str) -> list[pb.Replica]:
        """Remove a membership replica (leadership moves away first if it leads)."""
        resp = await self._client._call(
            "RemoveReplica",
            pb.RemoveReplicaRequest(name=name),
            pb.RemoveReplicaResponse,
            service=MEMBERSHIP_SERVICE,
        )
        return list(resp.replicas)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> MembershipClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
