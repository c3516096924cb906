"""dkv.telemetry.tracing: configuration from flags and OTEL_* variables, and the SERVER spans
every dkv gRPC server makes (dkv.host.rpc_server) with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.trace import SpanKind, StatusCode

from dkv.errors import InvalidArgument
from dkv.host.rpc_server import new_server
from dkv.telemetry.tracing import (
    OTLP_ENDPOINT_ENV,
    SAMPLE_RATIO_ENV,
    UNSAMPLED_PARENT,
    Tracing,
    TracingConfig,
    inject_metadata,
    otlp_host_port,
    unsampled_parent,
)
from dkv.v1 import kv_pb2


def test_the_otlp_exporter_and_envoys_xds_protos_import_together() -> None:
    """xds-protos ships a stale opentelemetry-proto (FIELD-NOTES): `make setup` reinstalls
    the right one last. Broken, the first import fails on InstrumentationScope."""
    from envoy.service.discovery.v3 import ads_pb2_grpc
    from opentelemetry.exporter.otlp.proto.grpc import trace_exporter

    assert trace_exporter.OTLPSpanExporter is not None
    assert ads_pb2_grpc.AggregatedDiscoveryServiceStub is not None


def test_tracing_is_off_unless_an_endpoint_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OTLP_ENDPOINT_ENV, raising=False)
    monkeypatch.delenv(SAMPLE_RATIO_ENV, raising=False)
    off = TracingConfig.from_flags(None, None)
    assert not off.enabled and Tracing.create(off, "dkv-node").tracer is None

    monkeypatch.setenv(OTLP_ENDPOINT_ENV, "http://127.0.0.1:4317")
    monkeypatch.setenv(SAMPLE_RATIO_ENV, "0.25")
    on = TracingConfig.from_flags(None, None)
    assert on == TracingConfig("http://127.0.0.1:4317", 0.25)
    # A flag beats the variable, and "" turns tracing off even when the variable is set.
    assert TracingConfig.from_flags("", "1").enabled is False
    assert TracingConfig.from_flags("127.0.0.1:9", "0").sample_ratio == 0.0
    tracing = Tracing.create(on, "dkv-node", "n1")
    try:
        assert tracing.tracer is not None
    finally:
        tracing.shutdown()
        tracing.shutdown()  # idempotent
    assert tracing.tracer is None


@pytest.mark.parametrize(
    ("endpoint", "ratio", "message"),
    [
        ("http://127.0.0.1:4317", "1.5", "between 0 and 1"),
        ("http://127.0.0.1:4317", "half", "must be a number"),
        ("grpc://127.0.0.1:4317", "1", "http://host:port"),
        ("http://127.0.0.1", "1", "no valid port"),
        ("http://127.0.0.1:99999", "1", "no valid port"),
        ("http://127.0.0.1:4317/v1/traces", "1", "http://host:port"),
    ],
)
def test_bad_tracing_flags_are_refused_naming_the_problem(
    endpoint: str, ratio: str, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        TracingConfig.from_flags(endpoint, ratio)


def test_otlp_endpoints() -> None:
    assert otlp_host_port("http://127.0.0.1:4317") == ("127.0.0.1", 4317, False)
    assert otlp_host_port("https://collector.example:4317") == ("collector.example", 4317, True)
    assert otlp_host_port("127.0.0.1:4317") == ("127.0.0.1", 4317, False)


class _Svc:
    async def put(self, req: kv_pb2.PutRequest, context: Any) -> kv_pb2.PutResponse:
        if req.key == b"missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such key")
        if req.key == b"boom":
            raise RuntimeError("a bug")
        return kv_pb2.PutResponse()


def _server(tracing: Tracing, put: Any = None) -> tuple[grpc.aio.Server, int]:
    de, se = kv_pb2.PutRequest.FromString, kv_pb2.PutResponse.SerializeToString
    server = new_server(tracer=tracing.tracer)
    handler = grpc.unary_unary_rpc_method_handler(put or _Svc().put, de, se)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("dkv.v1.KV", {"Put": handler}),)
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    return server, server.add_insecure_port("127.0.0.1:0")


def test_a_server_span_per_call_child_of_the_callers_span_with_its_status() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporter(exporter, "dkv-node", "n1")
    caller = Tracing.with_exporter(exporter, "caller")
    assert caller.tracer is not None

    async def scenario() -> None:
        server, port = _server(tracing)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                put = ch.unary_unary(
                    "/dkv.v1.KV/Put",
                    request_serializer=kv_pb2.PutRequest.SerializeToString,
                    response_deserializer=kv_pb2.PutResponse.FromString,
                )
                with caller.tracer.start_as_current_span("call") as root:  # type: ignore[union-attr]
                    await put(kv_pb2.PutRequest(key=b"k"), metadata=inject_metadata(root))
                for key, code in ((b"missing", "NOT_FOUND"), (b"boom", "UNKNOWN")):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await put(kv_pb2.PutRequest(key=key))
                    assert err.value.code().name == code
                # A body that is not a PutRequest: INVALID_ARGUMENT, traced as such.
                raw = ch.unary_unary("/dkv.v1.KV/Put")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await raw(b"\xff")
                assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                check = health_pb2_grpc.HealthStub(ch).Check
                await check(health_pb2.HealthCheckRequest())
        finally:
            await server.stop(None)

    asyncio.run(scenario())
    spans = exporter.get_finished_spans()
    served = [s for s in spans if s.name == "dkv.v1.KV/Put"]
    assert len(served) == 4
    assert all(s.kind is SpanKind.SERVER for s in served)
    ok, missing, boom, malformed = served
    root = next(s for s in spans if s.name == "call")
    assert ok.parent is not None and root.context is not None
    assert ok.parent.span_id == root.context.span_id
    assert ok.context is not None and ok.context.trace_id == root.context.trace_id
    assert ok.status.status_code is StatusCode.UNSET
    assert ok.attributes == {
        "rpc.system": "grpc",
        "rpc.service": "dkv.v1.KV",
        "rpc.method": "Put",
        "rpc.grpc.status_code": 0,
    }
    assert ok.resource.attributes["service.name"] == "dkv-node"
    # Without a traceparent the server starts a trace of its own (ratio 1.0 here).
    assert missing.parent is None
    assert missing.status.status_code is StatusCode.ERROR
    assert missing.status.description == "NotFound: no such key"
    assert boom.status.status_code is StatusCode.ERROR
    assert (boom.status.description or "").startswith("Unknown")
    assert (malformed.status.description or "").startswith("InvalidArgument: the request body")
    # Health checks are never traced.
    assert not [s for s in spans if s.name.startswith("grpc.health")]


def test_unsampled_requests_record_nothing_and_sampled_parents_are_followed() -> None:
    """parentbased_traceidratio at 0: a request without a parent is not traced, a request
    whose caller sampled it is."""
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporter(exporter, "dkv-node", sampler=ParentBasedTraceIdRatio(0.0))
    caller = Tracing.with_exporter(exporter, "caller")
    assert caller.tracer is not None

    async def scenario() -> None:
        server, port = _server(tracing)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                put = ch.unary_unary(
                    "/dkv.v1.KV/Put",
                    request_serializer=kv_pb2.PutRequest.SerializeToString,
                    response_deserializer=kv_pb2.PutResponse.FromString,
                )
                for _ in range(20):
                    await put(kv_pb2.PutRequest(key=b"k"))
                with caller.tracer.start_as_current_span("call") as root:  # type: ignore[union-attr]
                    await put(kv_pb2.PutRequest(key=b"k"), metadata=inject_metadata(root))
        finally:
            await server.stop(None)

    asyncio.run(scenario())
    served = [s for s in exporter.get_finished_spans() if s.name == "dkv.v1.KV/Put"]
    assert len(served) == 1 and served[0].parent is not None


UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


def test_a_caller_that_did_not_sample_gets_no_span_and_its_header_is_passed_on() -> None:
    """At ratio 1.0 a request without a parent is traced; one whose parent says "not sampled"
    is not (parentbased), and the handler sees the header to pass on to its own calls."""
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporter(exporter, "dkv-gateway")
    seen: list[str | None] = []

    class Svc:
        async def put(self, req: kv_pb2.PutRequest, context: Any) -> kv_pb2.PutResponse:
            seen.append(UNSAMPLED_PARENT.get())
            return kv_pb2.PutResponse()

    async def scenario() -> None:
        server, port = _server(tracing, Svc().put)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                put = ch.unary_unary(
                    "/dkv.v1.KV/Put",
                    request_serializer=kv_pb2.PutRequest.SerializeToString,
                    response_deserializer=kv_pb2.PutResponse.FromString,
                )
                await put(kv_pb2.PutRequest(key=b"k"), metadata=(("traceparent", UNSAMPLED),))
                await put(kv_pb2.PutRequest(key=b"k"))
                # Malformed: not a caller's decision; the sampler decides (a root span).
                await put(kv_pb2.PutRequest(key=b"k"), metadata=(("traceparent", "00-zz"),))
        finally:
            await server.stop(None)

    asyncio.run(scenario())
    assert seen == [UNSAMPLED, None, None]
    served = [s for s in exporter.get_finished_spans() if s.name == "dkv.v1.KV/Put"]
    assert len(served) == 2 and all(s.parent is None for s in served)


@pytest.mark.parametrize(
    ("value", "passed_on"),
    [
        (UNSAMPLED, True),
        (UNSAMPLED[:-2] + "01", False),  # sampled
        (UNSAMPLED[:-2] + "02", True),  # another flag, not the sampled bit
        (UNSAMPLED[:-2] + "03", False),
        ("01" + UNSAMPLED[2:], False),  # a version we do not read
        (UNSAMPLED + "-x", False),
        ("", False),
    ],
)
def test_unsampled_parents(value: str, passed_on: bool) -> None:
    got = unsampled_parent((("user-agent", "x"), ("traceparent", value)))
    assert got == (value if passed_on else None)
    assert unsampled_parent(None) is None
