"""One request, one trace, end to end: `make run`'s stack (real processes, Envoy, mTLS)
exporting to a real trace backend, and a put through the front door followed from Envoy's
span to the RocksDB fsync.

The backend is **Jaeger** (built from its Go module by ``make jaeger``; ``make test`` builds it
when a Go toolchain is here), queried through its own HTTP API, as `make run` starts it. Where
Jaeger cannot be had, the backend is a minimal OTLP/gRPC receiver (``otlp_receiver.py``, built
on opentelemetry-proto's service definitions): the test's id says which one ran
(``[jaeger]`` or ``[otlp-receiver]``; ``DKV_TRACE_BACKEND`` chooses).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_receiver import OtlpReceiver
from test_dev_stack import free_layout

from dkv.devstack import DevLayout, DevStack
from dkv.telemetry.jaeger import find_jaeger, jaeger_ready
from dkv.telemetry.tracing import Tracing, inject_metadata
from dkv.v1 import kv_pb2

pytestmark = pytest.mark.slow

# DKV_TRACE_BACKEND=otlp-receiver runs the fallback where Jaeger is built.
BACKEND = os.environ.get("DKV_TRACE_BACKEND") or ("jaeger" if find_jaeger() else "otlp-receiver")
WAIT_S = 30.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Span:
    span_id: str
    parent_id: str  # "" for a root
    name: str
    service: str
    attributes: dict[str, Any]
    error: bool


def jaeger_trace(query_port: int, trace_id: str) -> list[Span]:
    """The spans of ``trace_id`` as Jaeger's HTTP API returns them (empty: not there yet)."""
    url = f"http://127.0.0.1:{query_port}/api/traces/{trace_id}"
    try:
        with _NO_PROXY.open(url, timeout=5) as answer:
            body = json.load(answer)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise
    out = []
    for t in body.get("data") or []:
        processes = {k: p["serviceName"] for k, p in t["processes"].items()}
        for s in t["spans"]:
            parents = [r["spanID"] for r in s.get("references", []) if r["refType"] == "CHILD_OF"]
            tags = {tag["key"]: tag["value"] for tag in s.get("tags", [])}
            out.append(
                Span(
                    span_id=s["spanID"],
                    parent_id=parents[0] if parents else "",
                    name=s["operationName"],
                    service=processes[s["processID"]],
                    attributes=tags,
                    error=tags.get("otel.status_code") == "ERROR" or tags.get("error") is True,
                )
            )
    return out


@contextlib.contextmanager
def traced_stack(root: Path) -> Iterator[tuple[DevLayout, Any]]:
    """The stack exporting to the backend; yields (layout, a function trace id -> spans)."""
    layout = free_layout(root)
    with contextlib.ExitStack() as stack:
        if BACKEND == "jaeger":
            layout = DevLayout(root, port_base=layout.port_base, shards=4, jaeger=True)

            def spans(trace_id: str) -> list[Span]:
                return jaeger_trace(layout.jaeger_query_port, trace_id)

        else:
            receiver = stack.enter_context(OtlpReceiver())
            layout = DevLayout(
                root, port_base=layout.port_base, shards=4, otlp_endpoint=receiver.endpoint
            )

            def spans(trace_id: str) -> list[Span]:
                return [
                    Span(
                        s.span_id,
                        s.parent_span_id,
                        s.name,
                        s.service,
                        s.attributes,
                        s.status_code == 2,
                    )
                    for s in receiver.spans(trace_id)
                ]

        dev = DevStack(layout)
        try:
            dev.start()
            asyncio.run(dev.wait_ready())
            if BACKEND == "jaeger":
                give_up = time.monotonic() + WAIT_S
                while not jaeger_ready(layout.jaeger_query_port, layout.jaeger_otlp_port):
                    assert time.monotonic() < give_up, "Jaeger did not get ready (logs/jaeger.log)"
                    time.sleep(0.1)
            yield layout, spans
        finally:
            dev.stop()


def wait_for_trace(spans: Any, trace_id: str, names: set[str]) -> list[Span]:
    give_up = time.monotonic() + WAIT_S
    while True:
        found = spans(trace_id)
        if names <= {s.name for s in found}:
            return list(found)
        assert time.monotonic() < give_up, (
            f"{BACKEND}: trace {trace_id} lacks {names - {s.name for s in found}}; "
            f"has {sorted((s.service, s.name) for s in found)}"
        )
        time.sleep(0.2)


def child(spans: list[Span], parent: Span, name: str, service: str) -> Span:
    found = [s for s in spans if s.parent_id == parent.span_id and s.name == name]
    assert len(found) == 1, f"one {name} under {parent.name}, got {found}"
    assert found[0].service == service
    return found[0]


@pytest.mark.parametrize("backend", [BACKEND])
def test_one_put_is_one_trace_from_envoy_to_the_fsync(tmp_path: Path, backend: str) -> None:
    caller = Tracing.with_exporter(InMemorySpanExporter(), "test-caller")
    assert caller.tracer is not None
    with traced_stack(tmp_path) as (layout, spans):
        tls = layout.client_tls_files()
        assert tls is not None
        creds = grpc.ssl_channel_credentials(
            *(Path(p).read_bytes() for p in (tls.trusted_ca_file, tls.key_file, tls.cert_file))
        )

        async def calls() -> tuple[str, str, kv_pb2.PutResponse]:
            target = f"127.0.0.1:{layout.front_door}"
            async with grpc.aio.secure_channel(target, creds) as ch:
                put = ch.unary_unary(
                    "/dkv.v1.KV/Put",
                    request_serializer=kv_pb2.PutRequest.SerializeToString,
                    response_deserializer=kv_pb2.PutResponse.FromString,
                )
                with caller.tracer.start_as_current_span("put") as root:  # type: ignore[union-attr]
                    resp = await put(
                        kv_pb2.PutRequest(key=b"traced", value=b"v"),
                        metadata=inject_metadata(root),
                        timeout=10,
                    )
                bad = caller.tracer.start_as_current_span("bad")  # type: ignore[union-attr]
                with bad as failing, pytest.raises(grpc.aio.AioRpcError) as err:
                    await put(
                        kv_pb2.PutRequest(key=b"", value=b"v"), metadata=inject_metadata(failing)
                    )
                assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            return (
                format(root.get_span_context().trace_id, "032x"),
                format(failing.get_span_context().trace_id, "032x"),
                resp,
            )

        trace_id, failed_id, resp = asyncio.run(calls())
        # Envoy's span ("ingress") arrives last: Envoy flushes its spans every 5 s.
        names = {"ingress", "raft.propose", "raft.log.append", "raft.commit", "raft.apply"}
        found = wait_for_trace(spans, trace_id, names)
        by_service = {(s.service, s.name) for s in found}
        # Envoy's own span is the root here (the caller's span was never exported).
        envoy = [s for s in found if s.service == "dkv-envoy"]
        assert len(envoy) == 1 and envoy[0].name == "ingress", by_service
        gateway = child(found, envoy[0], "dkv.v1.KV/Put", "dkv-gateway")
        attempts = [s for s in found if s.parent_id == gateway.span_id]
        assert attempts and all(s.name == "dkv.v1.KV/Put" for s in attempts)
        ok = [a for a in attempts if not a.error]
        assert len(ok) == 1 and ok[0].attributes["dkv.node_id"] == str(resp.header.member_id)
        node = child(found, ok[0], "dkv.v1.KV/Put", "dkv-node")
        propose = child(found, node, "raft.propose", "dkv-node")
        assert int(propose.attributes["raft.index"]) == resp.header.revision
        assert int(propose.attributes["raft.term"]) == resp.header.raft_term
        assert int(propose.attributes["dkv.shard"]) == resp.header.shard_id
        append = child(found, propose, "raft.log.append", "dkv-node")
        assert append.attributes["dkv.fsync"] is True
        child(found, propose, "raft.commit", "dkv-node")
        child(found, propose, "raft.apply", "dkv-node")
        # Nothing failed but attempts at a follower (NOT_LEADER is UNAVAILABLE with a leader
        # hint; the router retries at the leader), and their node spans say why.
        retried = {a.span_id for a in attempts if a.error}
        failed_spans = [s for s in found if s.error]
        assert all(s.span_id in retried or s.parent_id in retried for s in failed_spans)

        # The failing request's trace says so at Envoy and at the gateway.
        failed = wait_for_trace(spans, failed_id, {"ingress", "dkv.v1.KV/Put"})
        gw = [s for s in failed if s.service == "dkv-gateway"]
        assert gw and gw[0].error, failed
        # Envoy saw grpc-status 3 in the trailers, and records it.
        envoy = [s for s in failed if s.service == "dkv-envoy"]
        assert len(envoy) == 1 and str(envoy[0].attributes.get("grpc.status_code")) == "3"
