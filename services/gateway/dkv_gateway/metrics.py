"""The gateway's own metrics (``dkv_gateway_*``) beside ``grpc_client_*`` for its calls to
nodes (recorded by the router with :class:`dkv.telemetry.GrpcClientMetrics`).

Per-call cost: label children are made here once (one per retry reason), so the router
bumps cached children and plain ints; the map's version and age and the open watches are
read at scrape time by :class:`GatewayCollector`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dkv.client.cluster_map import ClusterMapView
from dkv.telemetry import GrpcClientMetrics

__all__ = ["FANOUT_BUCKETS", "RETRY_REASONS", "GatewayCollector", "GatewayMetrics", "retry_reason"]

RETRY_REASONS = ("not_leader", "unavailable", "cancelled", "leader_moved")
"""``leader_moved``: an attempt given up because the shard's leadership moved to another node
while it waited (dkv_gateway.router). An attempt that runs out of time is not retried."""
FANOUT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def retry_reason(code: grpc.StatusCode, names_leader: bool) -> str:
    """Why the router retried an attempt that failed with ``code`` (``names_leader``: the
    answer carried a ``dkv-leader-id`` trailer, i.e. NOT_LEADER)."""
    if code is grpc.StatusCode.CANCELLED:
        return "cancelled"
    return "not_leader" if names_leader else "unavailable"


class GatewayMetrics:
    """See the module docstring."""

    def __init__(
        self,
        registry: CollectorRegistry,
        client: GrpcClientMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.clock = clock
        retries = Counter(
            "dkv_gateway_retries",
            "Attempts at a node the router retried elsewhere, by reason.",
            ["reason"],
            registry=registry,
        )
        self.retries = {r: retries.labels(r) for r in RETRY_REASONS}
        self.hint_hits = Counter(
            "dkv_gateway_leader_hint_hits",
            "Calls whose first attempt went to the hinted leader and was answered there.",
            registry=registry,
        )
        self.hint_misses = Counter(
            "dkv_gateway_leader_hint_misses",
            "Calls whose first attempt went to the hinted leader and had to go elsewhere.",
            registry=registry,
        )
        self.shard_unreachable = Counter(
            "dkv_gateway_shard_unreachable",
            "Calls that gave up because no replica of the shard answered usefully in time.",
            registry=registry,
        )
        self.fanout_shards = Histogram(
            "dkv_gateway_fanout_shards",
            "Shards touched per request that fans out (ranges, range deletes, prefix watches).",
            buckets=FANOUT_BUCKETS,
            registry=registry,
        )
        self.watches = 0  # open client watch streams
        self.map_changed_at: float | None = None  # clock() when the map last moved or was confirmed

    def map_seen(self) -> None:
        """The WatchClusterMap stream delivered a message (a change or a confirmation)."""
        self.map_changed_at = self.clock()


class GatewayCollector(Collector):
    """Scrape-time ``dkv_gateway_cluster_map_version``, ``..._age_seconds`` (absent until a
    map was received) and ``dkv_gateway_watches``."""

    def __init__(
        self, view: ClusterMapView, metrics: GatewayMetrics, registry: CollectorRegistry
    ) -> None:
        self.view = view
        self.metrics = metrics
        registry.register(self)

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        m = self.metrics
        yield GaugeMetricFamily(
            "dkv_gateway_cluster_map_version",
            "Version of the cluster map this gateway routes by.",
            value=self.view.version,
        )
        if m.map_changed_at is not None:
            yield GaugeMetricFamily(
                "dkv_gateway_cluster_map_age_seconds",
                "Seconds since the cluster map was last updated or confirmed by membership.",
                value=max(0.0, m.clock() - m.map_changed_at),
            )
        yield GaugeMetricFamily(
            "dkv_gateway_watches", "Open client watch streams.", value=m.watches
        )
