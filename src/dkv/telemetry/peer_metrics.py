"""Peer transport metrics, named as etcd names them (``etcd_network_peer_*`` →
``dkv_network_peer_*``), label ``to`` = the peer's member id (bounded by the cluster's size).

- ``dkv_network_peer_sent_failures_total{to}``: Raft message batches that did not reach the
  peer: dropped because its queue was full, dropped when its connection broke (queued ones are
  stale by the reconnect), or lost in a write that failed.
- ``dkv_network_peer_round_trip_time_seconds{to}``: etcd times separate probe requests. Our
  transport (:mod:`dkv.host.peer_transport`) is one long-lived connection per peer whose
  receiver answers a cumulative ``StreamAck`` frame every 16 batches, so the round trip is
  timed on that real traffic instead:
  from writing a batch whose number is a multiple of 16 to the ack that counts it (network
  both ways plus the receiver's decode and hand-off). No extra RPC, one clock read per 16
  batches; an idle pair of peers still exchanges heartbeats, so samples keep coming.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["RTT_BUCKETS_S", "PeerMetrics"]

# etcd's peer RTT buckets: 0.1 ms doubling to ~1.6 s.
RTT_BUCKETS_S = tuple(0.0001 * 2**i for i in range(15))


class PeerMetrics:
    """The metrics of one process's peer transport; children cached per peer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._failures = Counter(
            "dkv_network_peer_sent_failures",
            "Raft message batches that failed to reach the peer.",
            ["to"],
            registry=registry,
        )
        self._rtt = Histogram(
            "dkv_network_peer_round_trip_time_seconds",
            "Round trip of a batch on the peer stream to the acknowledgement that counts it.",
            ["to"],
            buckets=RTT_BUCKETS_S,
            registry=registry,
        )
        self._children: dict[int, tuple[Any, Any]] = {}

    def peer(self, node_id: int) -> tuple[Any, Any]:
        """(failures counter, RTT histogram) of peer ``node_id``, made once."""
        found = self._children.get(node_id)
        if found is None:
            label = str(node_id)
            found = self._children[node_id] = (
                self._failures.labels(label),
                self._rtt.labels(label),
            )
        return found

    def failed(self, node_id: int, batches: int = 1) -> None:
        if batches > 0:
            self.peer(node_id)[0].inc(batches)

    def forget(self, node_id: int) -> None:
        """The peer left: drop its series (keeps the label set bounded by the members)."""
        if self._children.pop(node_id, None) is not None:
            label = str(node_id)
            self._failures.remove(label)
            self._rtt.remove(label)
