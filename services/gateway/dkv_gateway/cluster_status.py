"""``dkv.v1.Cluster/Status`` on the gateway: the whole cluster's health through the front door.

The answer is the gateway's copy of the membership map plus every node's own
``Admin.Status``, asked in parallel. A node that does not answer within
:data:`NODE_STATUS_TIMEOUT_MS` (or the caller's deadline, if shorter) is reported with the
reason instead of failing the call: a status command is most useful exactly when part of the
cluster is down. Health is classified by :mod:`dkv.cluster_health` (by the caller), the same
way membership's metrics do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import grpc.aio

from dkv.client.cluster_map import ClusterMapView
from dkv.host.grpc_errors import Ctx
from dkv.v1 import admin_pb2, cluster_pb2
from dkv.v1 import membership_pb2 as mpb
from dkv_gateway.router import Channels

__all__ = ["ClusterStatusService", "NODE_STATUS_TIMEOUT_MS", "add_cluster_status", "snapshot_map"]

# Long enough for a busy node, short enough that one dead node does not stall the command.
NODE_STATUS_TIMEOUT_MS = 1_500


def snapshot_map(view: ClusterMapView) -> mpb.ClusterMap:
    """The view as one ClusterMap message (sorted as membership sorts it)."""
    m = mpb.ClusterMap(version=view.version)
    m.nodes.extend(view.nodes[i] for i in sorted(view.nodes))
    m.shards.extend(view.shards[i] for i in sorted(view.shards))
    m.leaders.extend(view.leaders[i] for i in sorted(view.leaders))
    m.slot_ranges.extend(view.slot_ranges())
    return m


class ClusterStatusService:
    def __init__(
        self,
        view: ClusterMapView,
        channels: Channels,
        map_changed_at: Callable[[], float],
    ) -> None:
        self._view = view
        self._channels = channels
        self._map_changed_at = map_changed_at  # time.monotonic() of the last map change

    async def _report(self, node: mpb.Node, timeout_s: float) -> cluster_pb2.NodeReport:
        out = cluster_pb2.NodeReport(node_id=node.id)
        if not node.client_address:
            out.error = "no client address in the cluster map"
            return out
        stub = self._channels.get(node.client_address).unary_unary(
            "/dkv.v1.Admin/Status",
            request_serializer=admin_pb2.StatusRequest.SerializeToString,
            response_deserializer=admin_pb2.StatusResponse.FromString,
        )
        try:
            out.status.CopyFrom(await stub(admin_pb2.StatusRequest(), timeout=timeout_s))
        except grpc.aio.AioRpcError as exc:
            out.error = f"{node.client_address}: {exc.code().name}: {exc.details() or ''}".rstrip(
                ": "
            )
        return out

    async def status(
        self, request: cluster_pb2.ClusterStatusRequest, context: Ctx
    ) -> cluster_pb2.ClusterStatusResponse:
        timeout_s = NODE_STATUS_TIMEOUT_MS / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            # Leave a little of the caller's budget to assemble and send the answer.
            timeout_s = max(0.05, min(timeout_s, remaining * 0.8))
        cmap = snapshot_map(self._view)
        reports = await asyncio.gather(*(self._report(n, timeout_s) for n in cmap.nodes))
        age_s = max(0.0, time.monotonic() - self._map_changed_at())
        return cluster_pb2.ClusterStatusResponse(
            map=cmap, map_age_ms=int(age_s * 1000), nodes=list(reports)
        )


def add_cluster_status(server: grpc.aio.Server, service: ClusterStatusService) -> None:
    """Serve ``service`` as ``dkv.v1.Cluster`` on ``server``."""
    handler = grpc.unary_unary_rpc_method_handler(
        service.status,
        request_deserializer=cluster_pb2.ClusterStatusRequest.FromString,
        response_serializer=cluster_pb2.ClusterStatusResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("dkv.v1.Cluster", {"Status": handler}),)
    )
