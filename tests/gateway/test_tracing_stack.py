"""Traces across a real stack in one process (``gateway_stack``: real gRPC, real RocksDB):
one trace per request from the caller's span through the gateway, each attempt at a node, the
node's handler and the write's way through Raft, down to the group-commit fsync. Each process
has its own tracer provider; all of them export into one in-memory exporter.

The end-to-end version (Envoy's span, real processes, a real trace backend) is
tests/e2e/test_traces.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from gateway_stack import WAIT_S, key_in_shard, running_stack
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dkv.telemetry.tracing import Tracing, inject_metadata
from dkv.v1 import kv_pb2


def service(s: ReadableSpan) -> str:
    return str(s.resource.attributes.get("service.name"))


def parent_id(s: ReadableSpan) -> int:
    return s.parent.span_id if s.parent is not None else 0


def children(spans: Sequence[ReadableSpan], of: ReadableSpan, name: str) -> list[ReadableSpan]:
    assert of.context is not None
    return [s for s in spans if s.name == name and parent_id(s) == of.context.span_id]


def one(found: list[ReadableSpan], what: str) -> ReadableSpan:
    assert len(found) == 1, f"expected one {what}, got {[s.name for s in found]}"
    return found[0]


async def spans_of(
    exporter: InMemorySpanExporter, trace_id: int, names: set[str]
) -> list[ReadableSpan]:
    """The finished spans of ``trace_id`` once every name in ``names`` is among them."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + WAIT_S
    while True:
        spans = [
            s
            for s in exporter.get_finished_spans()
            if s.context is not None and s.context.trace_id == trace_id
        ]
        if names <= {s.name for s in spans}:
            return spans
        assert loop.time() < give_up, f"missing {names - {s.name for s in spans}}"
        await asyncio.sleep(0.02)


def test_a_put_is_one_trace_from_the_caller_to_the_fsync(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    caller = Tracing.with_exporter(exporter, "test-caller")
    assert caller.tracer is not None

    async def scenario() -> None:
        async with running_stack(tmp_path, spans=exporter) as st:
            key = key_in_shard(2)
            with caller.tracer.start_as_current_span("caller") as root:  # type: ignore[union-attr]
                resp = await st.put(
                    kv_pb2.PutRequest(key=key, value=b"v"), metadata=inject_metadata(root)
                )
            trace_id = root.get_span_context().trace_id
            spans = await spans_of(
                exporter,
                trace_id,
                {"dkv.v1.KV/Put", "raft.propose", "raft.log.append", "raft.commit", "raft.apply"},
            )
            top = one([s for s in spans if s.name == "caller"], "caller span")

            gw = one(children(spans, top, "dkv.v1.KV/Put"), "gateway server span")
            assert service(gw) == "dkv-gateway" and gw.kind is SpanKind.SERVER
            assert gw.status.status_code is StatusCode.UNSET
            assert gw.attributes is not None and gw.attributes["rpc.grpc.status_code"] == 0

            attempts = children(spans, gw, "dkv.v1.KV/Put")
            assert attempts, "no attempt span under the gateway's span"
            for a in attempts:
                assert a.kind is SpanKind.CLIENT and service(a) == "dkv-gateway"
                assert a.attributes is not None and a.attributes["dkv.shard"] == 2
            last = max(attempts, key=lambda a: a.start_time or 0)
            assert last.attributes is not None
            assert last.attributes["dkv.node_id"] == str(resp.header.member_id)
            assert last.status.status_code is StatusCode.UNSET

            node = one(children(spans, last, "dkv.v1.KV/Put"), "node server span")
            assert node.kind is SpanKind.SERVER and service(node) == "dkv-node"
            leader = st.node_by_id(resp.header.member_id)
            assert node.resource.attributes["service.instance.id"] == leader.cfg.name

            propose = one(children(spans, node, "raft.propose"), "raft.propose")
            assert propose.attributes is not None
            assert propose.attributes["dkv.shard"] == 2
            assert propose.attributes["raft.term"] == resp.header.raft_term
            # The shard's revision is the Raft index of the write that made it.
            assert propose.attributes["raft.index"] == resp.header.revision

            append = one(children(spans, propose, "raft.log.append"), "raft.log.append")
            commit = one(children(spans, propose, "raft.commit"), "raft.commit")
            apply = one(children(spans, propose, "raft.apply"), "raft.apply")
            assert append.attributes is not None and append.attributes["dkv.fsync"] is True
            assert int(str(append.attributes["dkv.batch.entries"])) >= 1
            # The order of a write's life at its leader (Raft thesis §3.5): durable locally,
            # committed by a quorum, then applied; all within the proposal.
            assert propose.start_time is not None and propose.end_time is not None
            assert append.end_time is not None and commit.end_time is not None
            assert apply.start_time is not None and apply.end_time is not None
            assert propose.start_time <= (append.start_time or 0) <= append.end_time
            assert append.end_time <= commit.end_time <= apply.start_time + 1
            assert apply.end_time <= propose.end_time

    asyncio.run(scenario())


def test_reads_failures_and_what_is_never_traced(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    caller = Tracing.with_exporter(exporter, "test-caller")
    assert caller.tracer is not None

    async def scenario() -> None:
        async with running_stack(tmp_path, spans=exporter) as st:
            key = key_in_shard(1)
            await st.put(kv_pb2.PutRequest(key=key, value=b"v"))

            # A linearizable read: the node confirms its leadership (ReadIndex) first.
            with caller.tracer.start_as_current_span("read") as root:  # type: ignore[union-attr]
                await st.range(kv_pb2.RangeRequest(key=key), metadata=inject_metadata(root))
            spans = await spans_of(exporter, root.get_span_context().trace_id, {"raft.read_index"})
            read = one([s for s in spans if s.name == "raft.read_index"], "raft.read_index")
            assert read.attributes is not None and read.attributes["dkv.shard"] == 1
            node = next(s for s in spans if s.context and s.context.span_id == parent_id(read))
            assert node.name == "dkv.v1.KV/Range" and service(node) == "dkv-node"

            # A request that fails says so, with its gRPC code, at the gateway.
            bad = caller.tracer.start_as_current_span("bad")  # type: ignore[union-attr]
            with bad as root, pytest.raises(grpc.aio.AioRpcError) as err:
                await st.put(kv_pb2.PutRequest(key=b"", value=b"v"), metadata=inject_metadata(root))
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            spans = await spans_of(exporter, root.get_span_context().trace_id, {"dkv.v1.KV/Put"})
            gw = one([s for s in spans if service(s) == "dkv-gateway"], "gateway span")
            assert gw.status.status_code is StatusCode.ERROR
            assert (gw.status.description or "").startswith("InvalidArgument")
            assert gw.attributes is not None
            assert (
                gw.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            )

            # A caller that did not sample its request: nothing is recorded anywhere (the
            # gateway passes the header on; without it the node would start a trace).
            def kv_spans() -> int:
                kinds = ("dkv.v1.KV/", "raft.")
                return sum(s.name.startswith(kinds) for s in exporter.get_finished_spans())

            before = kv_spans()
            unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
            await st.put(
                kv_pb2.PutRequest(key=key, value=b"w"), metadata=(("traceparent", unsampled),)
            )
            await st.range(
                kv_pb2.RangeRequest(prefix=b"k/"), metadata=(("traceparent", unsampled),)
            )
            assert kv_spans() == before

            # Raft's own traffic and the health and heartbeat calls are never traced, though
            # thousands of them ran while this stack was up (10 ms ticks, 50 ms heartbeats).
            names = {s.name for s in exporter.get_finished_spans()}
            assert not {n for n in names if n.startswith(("dkv.v1.RaftPeer", "grpc.health"))}
            assert "dkv.v1.Membership/Heartbeat" not in names
            assert "dkv.v1.Membership/WatchClusterMap" not in names
            # The nodes' registration is an operation, and traced as its own trace.
            assert "dkv.v1.Membership/JoinNode" in names

    asyncio.run(scenario())
