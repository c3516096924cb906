"""Membership metrics (``dkv_membership_*``), read at scrape time from this replica's own
state machine view (every replica applies the same map, so any replica can be scraped) and,
for placement, from the driver, which only the leader runs passes of.

- ``dkv_membership_nodes{state}``: nodes per state, every state always present (0 when none),
  so queries never lack a series;
- ``dkv_membership_shards{health}``: classified by :mod:`dkv.cluster_health` (``no_leader``,
  ``under_replicated``, ``healthy``; the same as ``dkvctl status``), every value always present;
- ``dkv_membership_placement_moves_in_flight`` and ``..._moves_completed_total``: shards the
  driver's last pass was moving, and moves it saw finish (0 on followers, whose driver does
  not run passes);
- ``dkv_membership_map_version``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dkv.cluster_health import ShardHealth, health_counts
from dkv.v1 import membership_pb2 as pb
from dkv_membership.driver import PlacementDriver
from dkv_membership.state import MembershipState

__all__ = ["HEALTH", "NODE_STATES", "MembershipCollector"]

NODE_STATES = {
    value: name.removeprefix("NODE_STATE_").lower()
    for name, value in pb.NodeState.items()
    if value != pb.NODE_STATE_UNSPECIFIED
}
HEALTH = tuple(h.value for h in ShardHealth)


class MembershipCollector(Collector):
    """See the module docstring. ``state`` returns the replica's current map (the state
    machine replaces it on restore); ``driver`` the placement driver, if this replica has
    one; ``replication`` the replication factor."""

    def __init__(
        self,
        state: Callable[[], MembershipState],
        driver: Callable[[], PlacementDriver | None],
        replication: int,
        registry: CollectorRegistry,
    ) -> None:
        self.state = state
        self.driver = driver
        self.replication = replication
        registry.register(self)

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        st = self.state()
        by_state = dict.fromkeys(NODE_STATES.values(), 0)
        for n in st.nodes.values():
            name = NODE_STATES.get(n.state)
            if name is not None:
                by_state[name] += 1
        nodes = GaugeMetricFamily(
            "dkv_membership_nodes", "Nodes in the cluster map, by state.", labels=["state"]
        )
        for name, count in by_state.items():
            nodes.add_metric([name], count)
        yield nodes
        health = health_counts(st.shards, st.nodes, st.leaders, self.replication)
        shards = GaugeMetricFamily(
            "dkv_membership_shards", "Shards in the cluster map, by health.", labels=["health"]
        )
        for h, count in health.items():
            shards.add_metric([h.value], count)
        yield shards
        driver = self.driver()
        yield GaugeMetricFamily(
            "dkv_membership_placement_moves_in_flight",
            "Shards the placement driver is moving (between two replica sets); 0 on followers.",
            value=driver.moves_in_flight if driver is not None else 0,
        )
        yield CounterMetricFamily(
            "dkv_membership_placement_moves_completed",
            "Shard moves the placement driver of this replica saw reach their plan.",
            value=driver.moves_completed if driver is not None else 0,
        )
        yield GaugeMetricFamily(
            "dkv_membership_map_version",
            "Version of the cluster map this replica has applied.",
            value=st.version,
        )
