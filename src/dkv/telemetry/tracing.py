"""OpenTelemetry traces: one trace per client request, from Envoy to the RocksDB fsync.

**Off unless configured.** A process traces only when it is given an OTLP endpoint
(``--otlp-endpoint``, or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``); off, no tracer exists
and the hot paths test one ``None``. On, spans go to a :class:`BatchSpanProcessor`, whose own
thread exports them over OTLP/gRPC (its queue is bounded: spans beyond it are dropped and
counted by the SDK, never waited for), so the event loop only builds spans.

**Sampling** is ``parentbased_traceidratio`` (the OpenTelemetry name): a request that arrives
with a ``traceparent`` follows its caller's decision (Envoy's, or a client's), a request
without one is sampled with ``--trace-sample-ratio``. A request whose caller did not sample it
(``traceparent`` flags ``00``: Envoy sends that for the 99% it does not trace at 0.01) gets no
span at all: the sampler could only say "drop", so the server skips the span and passes the
header on unchanged to the calls it makes (:data:`UNSAMPLED_PARENT`): under 1 µs per hop
instead of about 20 µs for the non-recording spans the SDK would make and end.

**One tracer provider per process instance**, never the global one, so tests can run a
gateway, a membership replica and three nodes in one interpreter, each with its own
``service.name`` (as :mod:`dkv.telemetry.metrics` keeps one registry per instance).

**Where spans come from** (docs/observability.md draws the tree):

- every gRPC server, in the handler wrapper of :mod:`dkv.host.rpc_server` (a SERVER span per
  unary call, its parent read from the W3C ``traceparent`` metadata, status ERROR with the
  gRPC code when the call fails) -- except :data:`UNTRACED_METHOD_PREFIXES`: health checks,
  Raft peer streams (heartbeats), membership heartbeats and the streams that follow the
  cluster map or configure Envoy, which would drown the requests in noise;
- the gateway's router: one CLIENT span per attempt at a node (:func:`start_client_span`),
  whose context travels in the call's metadata (:func:`inject_metadata`);
- the host runtime (:mod:`dkv.host.host`): ``raft.propose`` around a write's replication, with
  ``raft.log.append`` (the group-commit write and its fsync), ``raft.commit`` (waiting for a
  quorum) and ``raft.apply`` as children, and ``raft.read_index`` for linearizable reads.

We hand-write the gRPC spans instead of using ``opentelemetry-instrumentation-grpc``: the
handler wrapper already exists for metrics (one wrapper, not two), and grpc.aio client
interceptors cost an extra task per call, which the gateway's hot path cannot afford.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio, Sampler
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from dkv.errors import InvalidArgument
from dkv.telemetry.metrics import GRPC_CODE_NAMES, split_method

__all__ = [
    "OTLP_ENDPOINT_ENV",
    "SAMPLE_RATIO_ENV",
    "UNSAMPLED_PARENT",
    "UNTRACED_METHOD_PREFIXES",
    "Tracing",
    "TracingConfig",
    "end_rpc_span",
    "extract_context",
    "inject_metadata",
    "is_traced",
    "otlp_host_port",
    "start_client_span",
    "unsampled_parent",
]

log = logging.getLogger("dkv.telemetry.tracing")

OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
SAMPLE_RATIO_ENV = "OTEL_TRACES_SAMPLER_ARG"

UNTRACED_METHOD_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/dkv.v1.RaftPeer/",  # heartbeats and appends between peers: one per tick per peer
    "/dkv.v1.Membership/Heartbeat",
    "/dkv.v1.Membership/WatchClusterMap",
    "/envoy.service.",  # xDS streams
)
"""Methods never traced (see the module docstring)."""

EXPORT_QUEUE_SPANS_MAX = 4096
"""Spans waiting for the exporter's thread; beyond it new ones are dropped, not waited for."""
EXPORT_BATCH_SPANS_MAX = 512
EXPORT_DELAY_MS = 1000

_propagator = TraceContextTextMapPropagator()

UNSAMPLED_PARENT: ContextVar[str | None] = ContextVar("dkv_unsampled_parent", default=None)
"""The ``traceparent`` of the request being served when its caller did not sample it: the
calls it makes carry it on (see the module docstring), instead of spans of their own."""

_TRACEPARENT_CHARS = 55  # version 00: "00-" + 32 hex trace id + "-" + 16 hex span id + "-" + flags
_UNSAMPLED_FLAGS = frozenset(f"{b:02x}" for b in range(0, 256, 2))  # the sampled bit (1) clear


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """``otlp_endpoint``: where spans go (``http://host:port`` of an OTLP/gRPC receiver, as
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` spells it; ``https://`` for TLS); "" is off.
    ``sample_ratio``: the share of requests *without* a sampled parent that are traced."""

    otlp_endpoint: str = ""
    sample_ratio: float = 1.0

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint)

    def validate(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise InvalidArgument(
                f"the trace sample ratio must be between 0 and 1, got {self.sample_ratio}"
            )
        if self.otlp_endpoint:
            otlp_host_port(self.otlp_endpoint)

    @classmethod
    def from_flags(cls, endpoint: str | None, ratio: str | None) -> TracingConfig:
        """From the flags' values, which default to the standard OTEL_* variables.
        Raises InvalidArgument naming what is wrong."""
        endpoint = endpoint if endpoint is not None else os.environ.get(OTLP_ENDPOINT_ENV, "")
        text = ratio if ratio is not None else os.environ.get(SAMPLE_RATIO_ENV, "1.0")
        try:
            value = float(text)
        except ValueError:
            raise InvalidArgument(
                f"the trace sample ratio must be a number, got {text!r}"
            ) from None
        cfg = cls(otlp_endpoint=endpoint.strip(), sample_ratio=value)
        cfg.validate()
        return cfg


def otlp_host_port(endpoint: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of an OTLP endpoint (``http://127.0.0.1:4317``; a bare
    ``host:port`` is plaintext). Raises InvalidArgument for anything else."""
    text = endpoint.strip()
    url = urlsplit(text if "://" in text else f"http://{text}")
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
        raise InvalidArgument(
            f"the OTLP endpoint must be http://host:port or https://host:port, got {endpoint!r}"
        )
    try:
        port = url.port
    except ValueError:
        port = None
    if port is None:
        raise InvalidArgument(f"the OTLP endpoint {endpoint!r} has no valid port")
    return url.hostname, port, url.scheme == "https"


class Tracing:
    """One process instance's tracing: its tracer, or None when tracing is off."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.tracer: Tracer | None = provider.get_tracer("dkv") if provider is not None else None

    @classmethod
    def off(cls) -> Tracing:
        return cls(None)

    @classmethod
    def create(cls, cfg: TracingConfig, service_name: str, instance: str = "") -> Tracing:
        """The tracing ``cfg`` asks for: off, or spans exported over OTLP/gRPC by a batch
        processor (the exporter connects lazily: a receiver that is down costs dropped spans
        and a log line, never a refusal to start)."""
        if not cfg.enabled:
            return cls.off()
        # Imported here: the exporter pulls in its own gRPC stubs, needed only when on.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        host, port, tls = otlp_host_port(cfg.otlp_endpoint)
        exporter = OTLPSpanExporter(endpoint=f"{host}:{port}", insecure=not tls)
        processor = BatchSpanProcessor(
            exporter,
            max_queue_size=EXPORT_QUEUE_SPANS_MAX,
            max_export_batch_size=EXPORT_BATCH_SPANS_MAX,
            schedule_delay_millis=EXPORT_DELAY_MS,
        )
        return cls.with_processor(
            processor, service_name, instance, ParentBasedTraceIdRatio(cfg.sample_ratio)
        )

    @classmethod
    def with_exporter(
        cls,
        exporter: SpanExporter,
        service_name: str,
        instance: str = "",
        sampler: Sampler | None = None,
    ) -> Tracing:
        """Spans handed to ``exporter`` as each ends (tests: the SDK's InMemorySpanExporter)."""
        return cls.with_processor(SimpleSpanProcessor(exporter), service_name, instance, sampler)

    @classmethod
    def with_processor(
        cls,
        processor: SpanProcessor,
        service_name: str,
        instance: str = "",
        sampler: Sampler | None = None,
    ) -> Tracing:
        attrs = {"service.name": service_name}
        if instance:
            attrs["service.instance.id"] = instance
        provider = TracerProvider(
            resource=Resource.create(attrs), sampler=sampler or ParentBasedTraceIdRatio(1.0)
        )
        provider.add_span_processor(processor)
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the SDK's export timeout) and stop the thread.
        Idempotent; no span is recorded after it."""
        provider, self.provider, self.tracer = self.provider, None, None
        if provider is not None:
            provider.shutdown()


# -- gRPC ---------------------------------------------------------------------------------------


def is_traced(full_method: str) -> bool:
    return not full_method.startswith(UNTRACED_METHOD_PREFIXES)


def _rpc_attributes(full_method: str) -> dict[str, str]:
    service, method = split_method(full_method)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def extract_context(metadata: Sequence[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The caller's trace context from a call's metadata (``traceparent``, ``tracestate``)."""
    carrier: dict[str, str] = {}
    for key, value in metadata or ():
        if key in ("traceparent", "tracestate") and isinstance(value, str):
            carrier[key] = value
    return _propagator.extract(carrier)


def unsampled_parent(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The caller's ``traceparent`` if it is well formed and says "not sampled", else None
    (sampled, absent or malformed: the sampler decides, as the propagator would)."""
    for key, value in metadata or ():
        if key == "traceparent":
            if (
                isinstance(value, str)
                and len(value) == _TRACEPARENT_CHARS
                and value.startswith("00-")
                and value[35] == "-"
                and value[52] == "-"
                and value[53:] in _UNSAMPLED_FLAGS
            ):
                return value
            return None
    return None


def inject_metadata(span: Span) -> tuple[tuple[str, str], ...]:
    """Metadata that makes ``span`` the parent of the server's span."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return tuple(carrier.items())


def start_server_span(
    tracer: Tracer, full_method: str, metadata: Sequence[tuple[str, str | bytes]] | None
) -> Span:
    return tracer.start_span(
        full_method.lstrip("/"),
        context=extract_context(metadata),
        kind=SpanKind.SERVER,
        attributes=_rpc_attributes(full_method),
    )


def start_client_span(
    tracer: Tracer, full_method: str, attributes: Mapping[str, str | int] | None = None
) -> Span:
    """A CLIENT span for one call, child of the current span (the server span of the request
    being routed)."""
    attrs: dict[str, str | int] = dict(_rpc_attributes(full_method))
    if attributes:
        attrs.update(attributes)
    return tracer.start_span(full_method.lstrip("/"), kind=SpanKind.CLIENT, attributes=attrs)


def end_rpc_span(span: Span, code: grpc.StatusCode | None, details: str = "") -> None:
    """Record the call's gRPC code and end ``span``: status ERROR, with the code's name and
    the details, for anything but OK (OpenTelemetry's gRPC conventions mark every non-OK
    code an error on the client; a server's NOT_FOUND would be fine, but dkv has none)."""
    code = code or grpc.StatusCode.OK
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        name = GRPC_CODE_NAMES.get(code, code.name)
        span.set_status(Status(StatusCode.ERROR, f"{name}: {details}" if details else name))
    span.end()
