"""Raft and disk metrics of a :class:`dkv.host.Host` (every node and membership replica).

Two kinds, chosen for the cost on the hot path:

- **read at scrape time** (:class:`RaftCollector`): per group (label ``shard``), the term,
  whether this member leads and whether it knows a leader, the commit and applied indexes,
  proposals pending, and counters the host keeps as plain ints on each group (leader changes
  seen, entries committed and applied, proposals failed, read-index requests). Nothing is
  done per request for them; a scrape walks the groups once.
- **observed per group commit** (:class:`DiskMetrics`): the duration of the synced write
  (``dkv_disk_wal_fsync_duration_seconds``: RocksDB's WAL append + fsync), of every batch
  write (``dkv_disk_backend_commit_duration_seconds``), and the entries and bytes per batch
  — once per loop iteration, not per request.

Names follow etcd's (``etcd_server_*``/``etcd_disk_*`` → ``dkv_raft_*``/``dkv_disk_*``) so an
etcd operator finds them. ``dkv_storage_db_size_bytes`` comes from RocksDB's own property
(``rocksdb.total-sst-files-size`` + ``rocksdb.cur-size-all-mem-tables``), read at scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dkv.raft import Role

if TYPE_CHECKING:
    from dkv.host.host import Host

__all__ = ["BATCH_ENTRIES_BUCKETS", "DiskMetrics", "RaftCollector"]

# etcd's fsync buckets: 1 ms doubling to ~4 s.
FSYNC_BUCKETS_S = tuple(0.001 * 2**i for i in range(13))
BATCH_ENTRIES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
BATCH_BYTES_BUCKETS = tuple(float(256 * 4**i) for i in range(10))  # 256 B .. 64 MiB


class DiskMetrics:
    """Per group commit: see the module docstring."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.wal_fsync = Histogram(
            "dkv_disk_wal_fsync_duration_seconds",
            "Latency of the synced group-commit write (RocksDB WAL append and fsync).",
            buckets=FSYNC_BUCKETS_S,
            registry=registry,
        )
        self.backend_commit = Histogram(
            "dkv_disk_backend_commit_duration_seconds",
            "Latency of every group-commit batch write to RocksDB (synced or not).",
            buckets=FSYNC_BUCKETS_S,
            registry=registry,
        )
        self.batch_entries = Histogram(
            "dkv_disk_batch_entries",
            "Raft entries appended per group-commit batch (all groups of the host).",
            buckets=BATCH_ENTRIES_BUCKETS,
            registry=registry,
        )
        self.batch_bytes = Histogram(
            "dkv_disk_batch_bytes",
            "Bytes of Raft entry data appended per group-commit batch.",
            buckets=BATCH_BYTES_BUCKETS,
            registry=registry,
        )


class RaftCollector(Collector):
    """Scrape-time Raft gauges and counters of every group of ``host``."""

    def __init__(self, host: Host, registry: CollectorRegistry) -> None:
        self.host = host
        registry.register(self)

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # families vary with the groups hosted; nothing to check at register

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        host = self.host
        shard = ["shard"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=shard)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=shard)

        term = gauge("dkv_raft_term", "The current Raft term of the shard on this member.")
        is_leader = gauge("dkv_raft_is_leader", "1 if this member leads the shard.")
        has_leader = gauge("dkv_raft_has_leader", "1 if this member knows a leader of the shard.")
        commit = gauge("dkv_raft_commit_index", "The highest log index known committed.")
        applied = gauge("dkv_raft_applied_index", "The highest log index applied here.")
        pending = gauge(
            "dkv_raft_proposals_pending", "Proposals of this leader waiting to be applied."
        )
        changes = counter(
            "dkv_raft_leader_changes_seen", "Leader changes this member has seen for the shard."
        )
        committed = counter(
            "dkv_raft_proposals_committed", "Log entries this member saw committed."
        )
        applied_n = counter("dkv_raft_proposals_applied", "Log entries this member applied.")
        failed = counter(
            "dkv_raft_proposals_failed",
            "Proposals answered with an error: dropped (leadership changed) or timed out.",
        )
        reads = counter("dkv_raft_read_indexes", "ReadIndex requests (linearizable reads).")
        for gid, g in list(host.groups.items()):
            label = [str(gid)]
            hs, soft = g.node.hard_state(), g.node.soft_state()
            term.add_metric(label, hs.term)
            is_leader.add_metric(label, 1.0 if soft.role is Role.LEADER else 0.0)
            has_leader.add_metric(label, 1.0 if soft.leader_id else 0.0)
            commit.add_metric(label, hs.commit)
            applied.add_metric(label, g.storage.applied_index)
            pending.add_metric(label, len(g.proposals))
            changes.add_metric(label, g.leader_changes)
            committed.add_metric(label, g.entries_committed)
            applied_n.add_metric(label, g.entries_applied)
            failed.add_metric(label, g.proposals_failed)
            reads.add_metric(label, g.read_indexes)
        yield from (term, is_leader, has_leader, commit, applied, pending)
        yield from (changes, committed, applied_n, failed, reads)
        snaps = CounterMetricFamily(
            "dkv_raft_snapshots", "Snapshots of this host's groups.", labels=["kind"]
        )
        snaps.add_metric(["taken"], host.snapshots_taken)
        snaps.add_metric(["installed"], host.snapshots_installed)
        snaps.add_metric(["sent"], host.snapshots_sent)
        yield snaps
        yield CounterMetricFamily(
            "dkv_raft_entries_persisted",
            "Raft entries written to the log by this host (all groups).",
            value=host.entries_persisted,
        )
        size = host.engine.size_bytes() if hasattr(host.engine, "size_bytes") else None
        if size is not None:
            yield GaugeMetricFamily(
                "dkv_storage_db_size_bytes",
                "RocksDB's size: SST files plus memtables (its own properties).",
                value=size,
            )
