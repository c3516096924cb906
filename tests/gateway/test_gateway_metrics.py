"""The gateway's metrics in front of a real cluster (``gateway_stack``): its calls to nodes
(``grpc_client_*``), leader hints hit and missed, retries by reason, fan-out, watches and the
cluster map's version and age."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dkv_gateway.metrics import RETRY_REASONS
from gateway_stack import SHARDS, WAIT_S, Stack, key_in_shard, running_stack
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dkv.v1 import kv_pb2

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(st: Stack) -> Samples:
    assert st.gateway is not None
    text = generate_latest(st.gateway.metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def v(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, frozenset(labels.items())), -1.0)


PUT = {"grpc_type": "unary", "grpc_service": "dkv.v1.KV", "grpc_method": "Put"}


def test_gateway_metrics_follow_calls_hints_retries_fanout_and_watches(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_stack(tmp_path) as st:
            s = scrape(st)
            assert v(s, "dkv_gateway_cluster_map_version") >= 1
            assert 0 <= v(s, "dkv_gateway_cluster_map_age_seconds") < WAIT_S
            assert v(s, "dkv_gateway_watches") == 0
            for reason in RETRY_REASONS:
                assert v(s, "dkv_gateway_retries_total", reason=reason) == 0

            key = key_in_shard(1)
            first = await st.put(kv_pb2.PutRequest(key=key, value=b"a"))
            leader = first.header.member_id
            assert st.router.hint(1) == leader
            await st.put(kv_pb2.PutRequest(key=key, value=b"b"))  # straight to the hint
            s = scrape(st)
            assert v(s, "grpc_client_started_total", **PUT) == 2
            assert v(s, "grpc_client_handled_total", **PUT, grpc_code="OK") == 2
            assert v(s, "grpc_client_handling_seconds_count", **PUT) == 2
            assert v(s, "dkv_gateway_leader_hint_hits_total") == 1
            assert v(s, "dkv_gateway_leader_hint_misses_total") == 0

            # A hint naming a follower: it answers NOT_LEADER naming the leader, the router
            # retries there: one miss, one not_leader retry, one more failed client call.
            follower = next(n.id for n in st.running() if n.id != leader)
            st.router.learn_leader(1, follower, term=1 << 40)
            await st.put(kv_pb2.PutRequest(key=key, value=b"c"))
            s = scrape(st)
            assert v(s, "dkv_gateway_leader_hint_misses_total") == 1
            assert v(s, "dkv_gateway_retries_total", reason="not_leader") == 1
            assert v(s, "grpc_client_handled_total", **PUT, grpc_code="Unavailable") == 1
            assert v(s, "grpc_client_started_total", **PUT) == 4

            # A range over every shard fans out to all of them.
            await st.range(kv_pb2.RangeRequest(prefix=b"k/"))
            s = scrape(st)
            assert v(s, "dkv_gateway_fanout_shards_count") == 1
            assert v(s, "dkv_gateway_fanout_shards_sum") == SHARDS

            # A prefix watch is open while the client holds it, and follows every shard.
            call = st.watch(kv_pb2.WatchRequest(prefix=b"k/", start_revision=0))
            await st.put(kv_pb2.PutRequest(key=key, value=b"d"))
            async for resp in call:
                if resp.events:
                    break
            s = scrape(st)
            assert v(s, "dkv_gateway_watches") == 1
            assert v(s, "dkv_gateway_fanout_shards_count") == 2
            watch = {"grpc_type": "server_stream", "grpc_service": "dkv.v1.KV"}
            assert v(s, "grpc_client_started_total", **watch, grpc_method="Watch") == SHARDS
            call.cancel()
            loop = asyncio.get_running_loop()
            give_up = loop.time() + WAIT_S
            while v(scrape(st), "dkv_gateway_watches") != 0:
                assert loop.time() < give_up, "the ended watch is still counted"
                await asyncio.sleep(0.02)
            give_up = loop.time() + WAIT_S
            while (
                v(
                    scrape(st),
                    "grpc_client_handled_total",
                    **watch,
                    grpc_method="Watch",
                    grpc_code="Canceled",
                )
                != SHARDS
            ):
                assert loop.time() < give_up, "the node watch streams were not counted ended"
                await asyncio.sleep(0.02)

    asyncio.run(scenario())


def test_membership_metrics_describe_the_map_its_replica_applied(tmp_path: Path) -> None:
    """The membership replica of the stack reports its nodes by state, its shards by health
    (each with a leader once the nodes' heartbeats named them) and its map's version."""

    async def scenario() -> None:
        async with running_stack(tmp_path) as st:
            assert st.membership is not None and st.membership.sm is not None
            sm = st.membership.sm
            registry = st.membership.metrics.registry

            def samples() -> Samples:
                text = generate_latest(registry).decode()
                return {
                    (s.name, frozenset(s.labels.items())): s.value
                    for family in text_string_to_metric_families(text)
                    for s in family.samples
                }

            loop = asyncio.get_running_loop()
            give_up = loop.time() + WAIT_S
            while v(s := samples(), "dkv_membership_shards", health="healthy") != SHARDS:
                assert loop.time() < give_up, s
                await asyncio.sleep(0.02)
            assert v(s, "dkv_membership_shards", health="no_leader") == 0
            assert v(s, "dkv_membership_shards", health="under_replicated") == 0
            assert v(s, "dkv_membership_nodes", state="up") == len(st.nodes)
            assert v(s, "dkv_membership_nodes", state="down") == 0
            assert v(s, "dkv_membership_nodes", state="leaving") == 0
            assert 0 < v(s, "dkv_membership_map_version") <= sm.version
            # This stack's membership runs no placement driver.
            assert v(s, "dkv_membership_placement_moves_in_flight") == 0
            assert v(s, "dkv_membership_placement_moves_completed_total") == 0

    asyncio.run(scenario())


def test_nodes_time_peer_round_trips_and_count_sends_that_fail(tmp_path: Path) -> None:
    """Three real nodes: each times round trips to the others on their Raft streams; once
    one stops, the others count the batches that no longer reach it."""

    async def scenario() -> None:
        async with running_stack(tmp_path) as st:

            def node_samples(name: str) -> Samples:
                text = generate_latest(st.nodes[name].metrics.registry).decode()
                return {
                    (s.name, frozenset(s.labels.items())): s.value
                    for family in text_string_to_metric_families(text)
                    for s in family.samples
                }

            names = sorted(st.nodes)
            ids = {n: st.nodes[n].id for n in names}
            loop = asyncio.get_running_loop()
            give_up = loop.time() + WAIT_S
            rtt = "dkv_network_peer_round_trip_time_seconds_count"
            # Heartbeats and their answers flow both ways between every pair of voters.
            while not all(
                v(node_samples(a), rtt, to=str(ids[b])) > 0 for a in names for b in names if a != b
            ):
                assert loop.time() < give_up, "no round trip timed between some peers"
                await asyncio.sleep(0.05)
            victim, watcher = names[0], names[1]
            failures = "dkv_network_peer_sent_failures_total"
            assert v(node_samples(watcher), failures, to=str(ids[victim])) <= 0
            await st.stop_node(victim)
            give_up = loop.time() + WAIT_S
            while v(node_samples(watcher), failures, to=str(ids[victim])) <= 0:
                assert loop.time() < give_up, "sends to a stopped peer were not counted"
                await asyncio.sleep(0.05)

    asyncio.run(scenario())


def test_a_call_that_finds_no_replica_counts_shard_unreachable() -> None:
    """A shard whose only replica refuses connections (a real closed port): the router
    retries as UNAVAILABLE until its deadline, then gives up with ShardUnreachable."""
    import socket

    from dkv_gateway.metrics import GatewayMetrics
    from dkv_gateway.router import ChannelPool, Router, ShardUnreachable
    from dkv_membership.state import slot_table

    from dkv.client.cluster_map import ClusterMapView
    from dkv.telemetry import ProcessMetrics
    from dkv.v1 import membership_pb2 as pb

    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def scenario() -> Samples:
        view = ClusterMapView()
        view.apply(
            pb.WatchClusterMapResponse(
                version=1,
                full=True,
                map=pb.ClusterMap(
                    version=1,
                    nodes=[
                        pb.Node(id=7, state=pb.NODE_STATE_UP, client_address=f"127.0.0.1:{port}")
                    ],
                    shards=[pb.Shard(id=1, voters=[7])],
                    slot_ranges=slot_table(1),
                    leaders=[pb.LeaderEntry(shard_id=1, leader_id=7, term=1)],
                ),
            )
        )
        process = ProcessMetrics.create(process=False)
        metrics = GatewayMetrics(process.registry, process.grpc_client)
        pool = ChannelPool(None)
        router = Router(view, pool, metrics=metrics)
        try:
            deadline = router.deadline(1.0)
            try:
                await router.unary(
                    1,
                    "Range",
                    kv_pb2.RangeRequest(key=b"k"),
                    kv_pb2.RangeResponse.FromString,
                    deadline,
                )
            except ShardUnreachable:
                pass
            else:
                raise AssertionError("a refused replica answered")
        finally:
            await pool.close()
        text = generate_latest(process.registry).decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    s = asyncio.run(scenario())
    assert v(s, "dkv_gateway_shard_unreachable_total") == 1
    assert v(s, "dkv_gateway_retries_total", reason="unavailable") >= 1
    rng = {"grpc_type": "unary", "grpc_service": "dkv.v1.KV", "grpc_method": "Range"}
    started = v(s, "grpc_client_started_total", **rng)
    assert started >= 1
    assert v(s, "grpc_client_handled_total", **rng, grpc_code="Unavailable") == started
