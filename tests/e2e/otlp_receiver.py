"""A minimal OTLP/gRPC trace receiver, for the end-to-end trace test where no Jaeger binary
can be built (no Go toolchain): it implements ``opentelemetry.proto``'s own
``TraceService/Export`` and keeps every span it receives in memory, flattened with its
service name, so the test can check the same tree it checks in Jaeger.

It runs a grpc.aio server on its own thread and event loop, so a test's synchronous code
and the processes under test can both reach it."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

__all__ = ["OtlpReceiver", "ReceivedSpan"]

SPANS_MAX = 100_000  # bounded: a test that floods it keeps the first ones


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # hex, as Jaeger's API spells it
    span_id: str
    parent_span_id: str  # "" for a root
    name: str
    service: str
    attributes: dict[str, Any]
    status_code: int  # OTLP's: 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: list[ReceivedSpan], lock: threading.Lock) -> None:
        self.sink = sink
        self.lock = lock

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        out = []
        for rs in request.resource_spans:
            attrs = {a.key: _value(a.value) for a in rs.resource.attributes}
            service = str(attrs.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            service=service,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            status_code=s.status.code,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                        )
                    )
        with self.lock:
            self.sink.extend(out[: max(0, SPANS_MAX - len(self.sink))])
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """``with OtlpReceiver() as r:`` serves on ``r.endpoint`` (http://127.0.0.1:port)."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()

        async def start() -> int:
            self._server = grpc.aio.server()
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
                _Service(self._spans, self._lock), self._server
            )
            port = self._server.add_insecure_port("127.0.0.1:0")
            await self._server.start()
            return port

        self.port = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                await self._server.stop(None)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
