"""The node's own metrics (``dkv_node_*``, ``dkv_storage_compaction*``), beside the Raft and
disk ones of :mod:`dkv.telemetry.raft_metrics`.

Cheap on the hot path by construction: the request path only bumps plain ints and dicts
(:class:`NodeStats`); one counter child per rejection reason is made at start. Everything
else is read at scrape time by :class:`NodeCollector`: keys and request ids per shard are
counts each shard's store maintains anyway, watchers and watch events are the ints the watch
streams bump, and compactions are RocksDB's own properties.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dkv.errors import (
    DkvError,
    InvalidArgument,
    NotLeader,
    Overloaded,
    ProposalDropped,
    ReadIndexDropped,
)
from dkv_node.limits import TooLarge

if TYPE_CHECKING:
    from dkv.storage import Engine
    from dkv_node.shard import KvShard

__all__ = ["REJECT_REASONS", "NodeCollector", "NodeStats", "reject_reason"]

REJECT_REASONS = ("too_large", "invalid_argument", "not_leader", "overloaded", "dropped")
"""``dkv_node_requests_rejected_total{reason}``: refused before anything was applied.
``overloaded``: the leader's uncommitted tail is full (:class:`dkv.errors.Overloaded`);
``dropped``: other proposals or reads not taken now (election or transfer under way).
gRPC core's own concurrency limit (RESOURCE_EXHAUSTED past ``CLIENT_RPCS_MAX``) answers
before any Python code runs, so it cannot be counted here."""


def reject_reason(exc: DkvError) -> str | None:
    """The reason label of a rejection, None for errors that are not one (deadlines)."""
    if isinstance(exc, TooLarge):
        return "too_large"
    if isinstance(exc, InvalidArgument):
        return "invalid_argument"
    if isinstance(exc, NotLeader):
        return "not_leader"
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, (ProposalDropped, ReadIndexDropped)):
        return "dropped"
    return None


class NodeStats:
    """What the KV service counts per request (plain ints; see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        rejected = Counter(
            "dkv_node_requests_rejected",
            "Client requests refused before anything was applied, by reason.",
            ["reason"],
            registry=registry,
        )
        # Every reason exists from the first scrape (queries never lack a series).
        self._rejected = {r: rejected.labels(r) for r in REJECT_REASONS}
        self.watchers: dict[int, int] = {}  # shard -> open watch streams following it
        self.watch_events_sent: dict[int, int] = {}  # shard -> events handed to watchers

    def on_error(self, exc: DkvError) -> None:
        reason = reject_reason(exc)
        if reason is not None:
            self._rejected[reason].inc()

    def rejected(self, reason: str) -> float:
        """For tests."""
        return float(self._rejected[reason]._value.get())


class NodeCollector(Collector):
    """Scrape-time ``dkv_node_*`` per shard and RocksDB's compaction figures."""

    def __init__(
        self,
        shards: Mapping[int, KvShard],
        stats: NodeStats,
        engine: Callable[[], Engine | None],
        registry: CollectorRegistry,
    ) -> None:
        self.shards = shards
        self.stats = stats
        self.engine = engine
        registry.register(self)

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # families vary with the shards hosted

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        shard = ["shard"]
        keys = GaugeMetricFamily("dkv_node_keys", "Keys stored in the shard.", labels=shard)
        ids = GaugeMetricFamily(
            "dkv_node_request_ids",
            "Request ids remembered by the shard's dedup table (bounded).",
            labels=shard,
        )
        watchers = GaugeMetricFamily(
            "dkv_node_watchers", "Open watch streams following the shard.", labels=shard
        )
        sent = CounterMetricFamily(
            "dkv_node_watch_events_sent", "Watch events sent to watchers.", labels=shard
        )
        stats = self.stats
        for gid, s in sorted(self.shards.items()):
            label = [str(gid)]
            keys.add_metric(label, s.store.keys)
            ids.add_metric(label, s.store.request_ids)
            watchers.add_metric(label, stats.watchers.get(gid, 0))
        for gid, n in sorted(stats.watch_events_sent.items()):
            sent.add_metric([str(gid)], n)
        yield from (keys, ids, watchers, sent)
        engine = self.engine()
        figures = engine.compaction_figures() if engine is not None else None
        if figures is None:
            return
        running, pending, done = figures
        yield GaugeMetricFamily(
            "dkv_storage_compactions_running",
            "RocksDB compactions running now (rocksdb.num-running-compactions).",
            value=running,
        )
        yield GaugeMetricFamily(
            "dkv_storage_compaction_pending_bytes",
            "Bytes RocksDB estimates compaction must rewrite "
            "(rocksdb.estimate-pending-compaction-bytes, all column families).",
            value=pending,
        )
        if done is not None:
            yield CounterMetricFamily(
                "dkv_storage_compactions",
                "Compactions RocksDB completed since the node opened it (flushes excluded).",
                value=done,
            )
