"""The gateway in front of a real cluster (``gateway_stack``): single-key operations, ranges
and range deletes across shards, watches across shards, a leader that stops mid-traffic.

Clients talk only to the gateway: ``dkv.client.Client([gateway])`` for ordinary calls and a
raw channel where a test needs the exact status, details or trailers.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from dkv_gateway.router import CallerDeadline
from gateway_stack import (
    SHARDS,
    WAIT_S,
    Stack,
    eventually,
    host_of,
    key_in_shard,
    keys_by_shard,
    running_stack,
)

from dkv.sharding import shard_for_key
from dkv.v1 import kv_pb2


def test_single_key_operations_and_idempotent_writes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_stack(tmp_path) as st:
            kv = st.kv
            put = await kv.put(b"greeting", b"hello")
            # The gateway learned the shard's leader from the write's header.
            assert st.router.hint(put.header.shard_id) == put.header.member_id != 0
            assert put.succeeded and put.header.revision > 0
            assert put.header.shard_id == shard_for_key(b"greeting", SHARDS)
            got = await kv.get(b"greeting")
            assert [(x.key, x.value, x.version) for x in got.kvs] == [(b"greeting", b"hello", 1)]
            stale = await kv.get(b"greeting", serializable=True)
            assert stale.header.shard_id == put.header.shard_id

            # Compare-and-swap on version, then on mod_revision.
            cas = kv_pb2.PutRequest(
                key=b"greeting", value=b"v2", precondition=kv_pb2.Precondition(version=1)
            )
            ok = await st.put(cas)  # no request_id: the gateway gives it one
            assert ok.succeeded
            lost = await st.put(cas)  # version is 2 now
            assert not lost.succeeded and lost.current.version == 2
            assert lost.current.value == b"v2"
            mod = lost.current.mod_revision
            by_rev = kv_pb2.PutRequest(
                key=b"greeting", value=b"v3", precondition=kv_pb2.Precondition(mod_revision=mod)
            )
            assert (await st.put(by_rev)).succeeded
            assert not (await st.put(by_rev)).succeeded
            # Compare-and-delete.
            wrong = kv_pb2.DeleteRequest(
                key=b"greeting", precondition=kv_pb2.Precondition(version=1), prev_kv=True
            )
            refused = await st.delete(wrong)
            assert not refused.succeeded and refused.deleted == 0
            assert refused.current.value == b"v3"
            right = kv_pb2.DeleteRequest(
                key=b"greeting", precondition=kv_pb2.Precondition(version=3)
            )
            gone = await st.delete(right)
            assert gone.succeeded and gone.deleted == 1
            assert not (await kv.get(b"greeting")).kvs

            # The same request id twice applies once: same answer, version stays 1.
            first = await kv.put(b"idem", b"x", request_id="req-1")
            again = await kv.put(b"idem", b"x", request_id="req-1")
            assert again.header.revision == first.header.revision
            got = await kv.get(b"idem")
            assert got.kvs[0].version == 1 and got.kvs[0].mod_revision == first.header.revision
            d1 = await kv.delete(b"idem", request_id="del-1")
            await kv.put(b"idem", b"back")
            d2 = await kv.delete(b"idem", request_id="del-1")  # the first answer, not a delete
            assert d1.deleted == d2.deleted == 1 and d2.header.revision == d1.header.revision
            assert (await kv.get(b"idem")).kvs[0].value == b"back"

    asyncio.run(scenario())


def test_ranges_and_range_deletes_span_every_shard(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_stack(tmp_path) as st:
            kv = st.kv
            by_shard = keys_by_shard(b"p/", 50)
            assert all(by_shard[s] for s in range(1, SHARDS + 1)), by_shard
            want = sorted(k for ks in by_shard.values() for k in ks)
            await asyncio.gather(*(kv.put(k, b"v" + k) for k in want))
            await kv.put(b"p0", b"outside")  # just past the prefix
            await kv.put(b"p.", b"outside")  # just before it

            # Pages of 7 in key order, every key exactly once; `more` is false only at the end.
            keys: list[bytes] = []
            cont = b""
            pages = 0
            while True:
                page = await kv.range(kv_pb2.RangeRequest(prefix=b"p/", limit=7, continuation=cont))
                pages += 1
                assert page.count == len(page.kvs) <= 7
                assert all(x.value == b"v" + x.key for x in page.kvs)
                keys += [x.key for x in page.kvs]
                assert page.header.shard_id == 0 and page.header.revision > 0
                if not page.more:
                    break
                assert page.continuation == page.kvs[-1].key + b"\x00"
                cont = page.continuation
            assert keys == want and pages == -(-len(want) // 7)
            # The header's revision is the largest shard revision.
            revisions = [
                (await kv.get(key_in_shard(s, b"p/"))).header.revision for s in range(1, SHARDS + 1)
            ]
            whole = await kv.range(kv_pb2.RangeRequest(prefix=b"p/"))
            assert [x.key for x in whole.kvs] == want and not whole.more
            assert whole.header.revision == max(revisions)

            counted = await kv.range(kv_pb2.RangeRequest(prefix=b"p/", count_only=True))
            assert counted.count == len(want) and not counted.kvs and not counted.more
            first7 = await kv.range(kv_pb2.RangeRequest(prefix=b"p/", count_only=True, limit=7))
            assert first7.count == 7 and first7.more and not first7.kvs
            assert first7.continuation == want[6] + b"\x00"
            names = await kv.range(kv_pb2.RangeRequest(prefix=b"p/", keys_only=True))
            assert [x.key for x in names.kvs] == want and all(not x.value for x in names.kvs)
            # key/range_end, serializable.
            part = await kv.range(
                kv_pb2.RangeRequest(
                    key=b"p/10",
                    range_end=b"p/20",
                    consistency=kv_pb2.READ_CONSISTENCY_SERIALIZABLE,
                )
            )
            assert [x.key for x in part.kvs] == [b"p/%02d" % i for i in range(10, 20)]

            # A range delete across shards: the sum of each shard's part, prev_kvs in order.
            dropped = await st.delete(
                kv_pb2.DeleteRequest(key=b"p/40", range_end=b"p/50", prev_kv=True)
            )
            assert dropped.deleted == 10 and dropped.succeeded
            assert [x.key for x in dropped.prev_kvs] == [b"p/%02d" % i for i in range(40, 50)]
            everything = await kv.delete(b"p/", range_end=b"p0")
            assert everything.deleted == 40
            assert (await kv.range(kv_pb2.RangeRequest(prefix=b"p/", count_only=True))).count == 0
            outside = await kv.range(kv_pb2.RangeRequest(key=b"p.", range_end=b"p1"))
            assert [x.key for x in outside.kvs] == [b"p.", b"p0"]
            # A precondition with a range: the nodes refuse it, the refusal passes through.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await st.delete(
                    kv_pb2.DeleteRequest(
                        key=b"a", range_end=b"b", precondition=kv_pb2.Precondition(version=1)
                    )
                )
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "precondition applies to one key" in (err.value.details() or "")

    asyncio.run(scenario())


async def _collect(call: Any, seen: list[kv_pb2.WatchResponse], changed: asyncio.Condition) -> None:
    async for resp in call:
        async with changed:
            seen.append(resp)
            changed.notify_all()


async def _until(
    seen: list[kv_pb2.WatchResponse], changed: asyncio.Condition, n: int, what: str
) -> None:
    """Wait (on the collector's notifications) until ``n`` events arrived."""

    def count() -> int:
        return sum(len(r.events) for r in seen)

    async with changed:
        try:
            await asyncio.wait_for(changed.wait_for(lambda: count() >= n), WAIT_S)
        except TimeoutError:
            raise AssertionError(f"{what}: {count()} of {n} events arrived") from None


def test_watch_by_prefix_merges_every_shard_and_resumes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_stack(tmp_path) as st:
            kv = st.kv
            by_shard = keys_by_shard(b"w/", 30)
            assert all(len(ks) >= 4 for ks in by_shard.values()), by_shard
            before = [ks[0] for ks in by_shard.values()]
            for k in before:  # written before the watch starts: replayed from revision 1
                await kv.put(k, b"before")
            seen: list[kv_pb2.WatchResponse] = []
            changed = asyncio.Condition()
            call = st.watch(kv_pb2.WatchRequest(prefix=b"w/", start_revision=1))
            collector = asyncio.get_running_loop().create_task(_collect(call, seen, changed))
            try:
                await _until(seen, changed, len(before), "history replayed")
                after = [k for ks in by_shard.values() for k in ks[1:3]]
                for k in after:
                    await kv.put(k, b"after")
                await kv.put(b"x/elsewhere", b"not watched")
                await _until(seen, changed, len(before) + len(after), "live events")

                # The leader of shard 1 (where the watch of shard 1 runs first) stops: each
                # shard's stream resumes at another replica after its last revision.
                stopped = await st.leader_of(1)
                name = next(n for n, node in st.nodes.items() if node is stopped)
                await st.stop_node(name)
                later = [k for ks in by_shard.values() for k in ks[3:]]
                for k in later:
                    await kv.put(k, b"later")
                total = len(before) + len(after) + len(later)
                await _until(seen, changed, total, "events after a node stopped")
                assert st.router.watch_streams_opened > SHARDS  # at least one resumption
                await kv.put(by_shard[1][0], b"last")
                await _until(seen, changed, total + 1, "the last event")
            finally:
                call.cancel()
                collector.cancel()
                await asyncio.gather(collector, return_exceptions=True)

            events = [(r.header.shard_id, e) for r in seen for e in r.events]
            got = [(e.kv.key, e.kv.value) for _, e in events]
            want = (
                [(k, b"before") for k in before]
                + [(k, b"after") for k in after]
                + [(k, b"later") for k in later]
                + [(by_shard[1][0], b"last")]
            )
            assert sorted(got) == sorted(want), "every change once, nothing else"
            for shard, e in events:
                assert shard == shard_for_key(e.kv.key, SHARDS)
            for s in range(1, SHARDS + 1):  # in revision order per shard
                revs = [e.kv.mod_revision for shard, e in events if shard == s]
                assert revs == sorted(revs) and len(set(revs)) == len(revs)

    asyncio.run(scenario())


def test_watch_from_now_and_of_one_key(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_stack(tmp_path) as st:
            kv = st.kv
            await kv.put(b"n/old", b"old")
            seen: list[kv_pb2.WatchResponse] = []
            changed = asyncio.Condition()
            prefix_call = st.watch(kv_pb2.WatchRequest(prefix=b"n/", start_revision=0))
            one: list[kv_pb2.WatchResponse] = []
            key_call = st.watch(kv_pb2.WatchRequest(key=b"n/one", prev_kv=True, start_revision=0))
            tasks = [
                asyncio.get_running_loop().create_task(_collect(prefix_call, seen, changed)),
                asyncio.get_running_loop().create_task(_collect(key_call, one, changed)),
            ]
            try:
                # "From now" is each shard's revision when its stream was set up: once every
                # stream is open, every later write is reported.
                await eventually(
                    lambda: st.router.watch_streams_opened >= SHARDS + 1, "streams opened"
                )
                by_shard = keys_by_shard(b"n/", 60)
                assert all(len(ks) >= 2 for ks in by_shard.values()), by_shard
                fresh = [k for ks in by_shard.values() for k in ks[:2]]
                for k in fresh:
                    await kv.put(k, b"new")
                await kv.put(b"n/one", b"1")
                await kv.put(b"n/one", b"2")
                await _until(seen, changed, len(fresh) + 2, "prefix events")
                await _until(one, changed, 2, "key events")
            finally:
                for c in (prefix_call, key_call):
                    c.cancel()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            keys = sorted(e.kv.key for r in seen for e in r.events)
            assert keys == sorted([*fresh, b"n/one", b"n/one"])  # n/old is history
            pairs = [(e.kv.value, e.prev_kv.value) for r in one for e in r.events]
            assert pairs == [(b"1", b""), (b"2", b"1")]

    asyncio.run(scenario())


def test_writes_go_on_while_a_shard_leader_stops(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_stack(tmp_path) as st:
            kv = st.kv
            old = await st.leader_of(1)
            written: dict[bytes, bytes] = {}
            half = asyncio.Event()

            async def writer() -> None:
                for i in range(60):
                    key = b"s/%02d" % i
                    value = b"v%d" % i
                    # Raw (no client-side retries), no request id (the gateway sets one).
                    resp = await st.put(kv_pb2.PutRequest(key=key, value=value), 10)
                    assert resp.succeeded
                    written[key] = value
                    if i == 20:
                        half.set()

            task = asyncio.get_running_loop().create_task(writer())
            await asyncio.wait_for(half.wait(), WAIT_S)
            name = next(n for n, node in st.nodes.items() if node is old)
            await st.stop_node(name)
            await asyncio.wait_for(task, 60)
            assert len(written) == 60
            new = await st.leader_of(1)
            assert new is not old
            assert st.router.retries > 0
            for key, value in written.items():
                got = await kv.get(key)
                assert [(x.value, x.version) for x in got.kvs] == [(value, 1)]  # applied once
            # Writes to shard 1 now land at its new leader, which the gateway learned.
            resp = await kv.put(key_in_shard(1), b"after")
            assert resp.header.member_id == st.router.hint(1) != old.id

    asyncio.run(scenario())


def test_errors_pass_through_or_name_the_shard(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_stack(tmp_path) as st:
            for req, method in (
                (kv_pb2.PutRequest(key=b"", value=b"x"), st.put),
                (kv_pb2.RangeRequest(key=b""), st.range),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await method(req)  # type: ignore[operator]
                assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert (err.value.details() or "").startswith("key must not be empty")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in st.watch(kv_pb2.WatchRequest(key=b"", start_revision=0)):
                    pass
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith("key must not be empty")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await st.range(kv_pb2.RangeRequest(prefix=b"a", shard_id=SHARDS + 1))
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert f"shard {SHARDS + 1} does not exist" in (err.value.details() or "")

            # Two of shard 2's three replicas stop: no quorum. The answer comes before the
            # caller's deadline, names the shard and says when to retry.
            leader = await st.leader_of(2)
            other = next(n for n in st.nodes.values() if n is not leader)
            for node in (leader, other):
                name = next(n for n, x in st.nodes.items() if x is node)
                await st.stop_node(name)
            survivor = st.running()[0]
            h = host_of(survivor)
            await h.wait_for(lambda: h.leader(2) != survivor.id, WAIT_S)
            deadline_s = 2.0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await st.put(kv_pb2.PutRequest(key=key_in_shard(2), value=b"x"), deadline_s)
            # UNAVAILABLE, not DEADLINE_EXCEEDED: the gateway answered before the caller's
            # deadline ran out (no wall-clock bound needed to show it).
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE, err.value
            details = err.value.details() or ""
            assert details.startswith("shard 2 has no reachable leader (no quorum?): "), details
            trailers = dict(err.value.trailing_metadata() or ())
            assert trailers.get("grpc-retry-pushback-ms") == "500"
            # The id the gateway gave the write: a retry with it cannot apply twice.
            assert len(str(trailers.get("dkv-request-id", ""))) == 32
            assert st.router.retries > 0

    asyncio.run(scenario())


def test_a_deadline_too_short_to_try_a_replica_is_deadline_exceeded(tmp_path: Path) -> None:
    """Nothing is wrong with the shard: "no quorum" would send the caller chasing a fault."""

    async def scenario() -> None:
        async with running_stack(tmp_path) as st:
            key = key_in_shard(1)
            await st.put(kv_pb2.PutRequest(key=key, value=b"v"))  # the shard is healthy
            loop = asyncio.get_running_loop()
            # No time left at all when the router looks. (A budget of 100 us was racy: gRPC's
            # timers are coarser, and an attempt sent with 50 us left once came back OK.)
            with pytest.raises(CallerDeadline) as info:
                await st.router.unary(
                    1,
                    "Put",
                    kv_pb2.PutRequest(key=key, value=b"v"),
                    kv_pb2.PutResponse.FromString,
                    loop.time(),
                    write=True,
                )
            assert "deadline" in str(info.value) and "shard 1" in str(info.value)
            # Through the gateway's port, with deadlines around the time an attempt takes:
            # each call succeeds or is DEADLINE_EXCEEDED, never UNAVAILABLE.
            codes: Counter[str] = Counter()
            for i in range(120):
                try:
                    await st.put(kv_pb2.PutRequest(key=key, value=b"x"), 0.0005 + i % 6 * 0.0005)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
            assert set(codes) <= {"OK", "DEADLINE_EXCEEDED"}, codes

    asyncio.run(scenario())


def test_uninitialized_cluster_is_unavailable_and_not_ready(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def scenario() -> None:
        st = Stack(tmp_path)
        try:
            await st.start_membership()
            await st.start_gateway()
            assert st.channel is not None and st.gateway is not None
            assert st.membership is not None
            health = health_pb2_grpc.HealthStub(st.channel)
            check = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # The Kubernetes probes say the same: alive, not ready, and why (membership, whose
            # group has its leader, is ready).
            gateway_web = f"http://127.0.0.1:{st.gateway.metrics_port}"
            membership_web = f"http://127.0.0.1:{st.membership.metrics_port}"
            async with httpx.AsyncClient() as web:
                assert (await web.get(f"{gateway_web}/livez")).status_code == 200
                r = await web.get(f"{gateway_web}/readyz")
                assert (r.status_code, r.text) == (
                    503,
                    "no cluster map yet (membership not reached, or not initialized)\n",
                )
                r = await web.get(f"{membership_web}/readyz")
                assert r.status_code == 200 and r.text.startswith("ok: leader"), r.text
            for call in (
                st.put(kv_pb2.PutRequest(key=b"k", value=b"v")),
                st.range(kv_pb2.RangeRequest(prefix=b"k")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() is grpc.StatusCode.UNAVAILABLE
                assert err.value.details() == (
                    "the cluster is not initialized yet (waiting for nodes to register)"
                )
            watch = st.watch(kv_pb2.WatchRequest(prefix=b"k", start_revision=0))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in watch:
                    pass
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE

            # Shards without replicas yet: the gateway is ready, but a shard has no one to ask.
            await st.init_cluster(with_replicas=False)
            await asyncio.wait_for(st.gateway.initialized.wait(), WAIT_S)
            check = await health.Check(health_pb2.HealthCheckRequest(service="dkv.v1.KV"))
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            async with httpx.AsyncClient() as web:
                r = await web.get(f"{gateway_web}/readyz")
                assert r.status_code == 200 and r.text.startswith("ok: cluster map version"), r
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await st.range(kv_pb2.RangeRequest(key=b"k"), timeout_s=1)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            shard = shard_for_key(b"k", SHARDS)
            assert err.value.details() == (
                f"shard {shard} has no reachable leader (no quorum?): "
                f"no replica of shard {shard} has a known address"
            )
        finally:
            await st.close()

    asyncio.run(scenario())


def test_mtls_to_nodes_and_membership(tmp_path: Path) -> None:
    """Nodes, membership and the gateway's own KV port require client certificates: the
    gateway presents its own to nodes and membership, and refuses a client without one."""

    async def scenario() -> None:
        async with running_stack(tmp_path, tls=True) as st:
            kv = st.kv
            for i in range(6):
                await kv.put(b"t/%d" % i, b"secure")
            got = await kv.range(kv_pb2.RangeRequest(prefix=b"t/"))
            assert [x.key for x in got.kvs] == [b"t/%d" % i for i in range(6)]
            # A client without a certificate cannot talk to a node directly.
            node = st.running()[0]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{node.client_port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary(
                        "/dkv.v1.KV/Range",
                        request_serializer=kv_pb2.RangeRequest.SerializeToString,
                        response_deserializer=kv_pb2.RangeResponse.FromString,
                    )(kv_pb2.RangeRequest(key=b"t/0"), timeout=2)
                assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            async with grpc.aio.insecure_channel(st.gateway_address) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary(
                        "/dkv.v1.KV/Range",
                        request_serializer=kv_pb2.RangeRequest.SerializeToString,
                        response_deserializer=kv_pb2.RangeResponse.FromString,
                    )(kv_pb2.RangeRequest(key=b"t/0"), timeout=2)
                assert err.value.code() is grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())
