"""Prometheus metrics: one registry per process instance, and the gRPC metrics every server
and client shares.

**Names and labels are go-grpc-prometheus's** (``grpc_server_started_total``,
``grpc_server_handled_total{grpc_code}``, ``grpc_server_handling_seconds``, labels
``grpc_type``, ``grpc_service``, ``grpc_method``; codes spelt as Go spells them: ``OK``,
``InvalidArgument``, ``Unavailable``...), which is what etcd exports, so the queries of
etcd-mixin and of existing gRPC dashboards work on dkv unchanged.

**Cost on the hot path** (issue 10: under 5% of throughput): every label child is created
once per method (and per code on first use) and cached in a dict, so a call does two dict
lookups, two counter increments and one histogram observation, with no label set built per
request. prometheus-client takes an uncontended ``threading.Lock`` per update; the event
loop never waits on it (scrapes run on the same loop, see :mod:`dkv.telemetry.http`).

**Cardinality is bounded**: labels are methods, codes, shards and peers — never a key,
a request id or a client address.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "GRPC_CODE_NAMES",
    "LATENCY_BUCKETS_S",
    "GrpcClientMetrics",
    "GrpcServerMetrics",
    "MethodMetrics",
    "ProcessMetrics",
    "grpc_type",
    "new_registry",
    "split_method",
]

# `_created` series double the series count for no use (FIELD-NOTES: prometheus-client).
disable_created_metrics()  # type: ignore[no-untyped-call]

GRPC_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
"""gRPC codes as go-grpc-prometheus labels them (Go's ``codes.Code.String()``)."""

# Prometheus' default buckets (what go-grpc-prometheus and etcd use), with 1 ms and 2.5 ms
# added below: a serializable read on this machine takes about 0.4 ms.
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def new_registry(*, process: bool = True) -> CollectorRegistry:
    """A registry for one process instance, with the standard ``process_*`` and ``python_*``
    collectors (``process=False`` for a second instance in one interpreter, whose process
    figures would only repeat the first's)."""
    registry = CollectorRegistry(auto_describe=True)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def split_method(full_method: str) -> tuple[str, str]:
    """``("dkv.v1.KV", "Put")`` for ``"/dkv.v1.KV/Put"``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    """go-grpc-prometheus's ``grpc_type``."""
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


class MethodMetrics:
    """The cached label children of one method: what a call touches."""

    __slots__ = ("_handled", "_labels", "_parent_handled", "seconds", "started")

    def __init__(
        self,
        started: Counter,
        handled: Counter,
        seconds: Histogram,
        labels: tuple[str, str, str],
    ) -> None:
        self._labels = labels
        self._parent_handled = handled
        self.started = started.labels(*labels)
        self.seconds = seconds.labels(*labels)
        self._handled: dict[grpc.StatusCode | None, Any] = {}
        for code in (grpc.StatusCode.OK,):  # the common case exists from the first scrape
            self._handled[code] = handled.labels(*labels, GRPC_CODE_NAMES[code])

    def handled(self, code: grpc.StatusCode | None) -> None:
        """Count one call answered with ``code`` (None: OK)."""
        child = self._handled.get(code)
        if child is None:
            name = GRPC_CODE_NAMES.get(code or grpc.StatusCode.OK, "Unknown")
            child = self._handled[code] = self._parent_handled.labels(*self._labels, name)
        child.inc()

    def done(self, code: grpc.StatusCode | None, started_at: float) -> None:
        """A call that began at ``started_at`` (``time.perf_counter()``) ended with ``code``."""
        self.handled(code)
        self.seconds.observe(time.perf_counter() - started_at)


class _GrpcMetrics:
    side = ""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("grpc_type", "grpc_service", "grpc_method")
        side = self.side
        what = "server" if side == "server" else "client"
        self._started = Counter(
            f"grpc_{side}_started_total",
            f"RPCs started on the {what}.",
            labels,
            registry=registry,
        )
        self._handled = Counter(
            f"grpc_{side}_handled_total",
            f"RPCs completed on the {what}, regardless of success or failure.",
            (*labels, "grpc_code"),
            registry=registry,
        )
        self._seconds = Histogram(
            f"grpc_{side}_handling_seconds",
            f"Response latency (seconds) of RPCs as seen by the {what} (streams: until the "
            "stream ends).",
            labels,
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._methods: dict[tuple[str, str], MethodMetrics] = {}

    def method(self, full_method: str, kind: str = "unary") -> MethodMetrics:
        """The metrics of ``full_method`` (``/pkg.Service/Method``) of ``kind`` (cached)."""
        key = (full_method, kind)
        found = self._methods.get(key)
        if found is None:
            service, method = split_method(full_method)
            found = MethodMetrics(
                self._started, self._handled, self._seconds, (kind, service, method)
            )
            self._methods[key] = found
        return found


class GrpcServerMetrics(_GrpcMetrics):
    """``grpc_server_*``: recorded by the handler wrapper of :mod:`dkv.host.rpc_server`."""

    side = "server"


class GrpcClientMetrics(_GrpcMetrics):
    """``grpc_client_*`` (``grpc_client_handling_seconds`` as go-grpc-prometheus names it
    with its histogram on): recorded where a dkv process calls another (the gateway's router),
    not by a client interceptor, which in grpc.aio costs an extra task per call."""

    side = "client"

    def observe(self, full_method: str, code: grpc.StatusCode | None, started_at: float) -> None:
        """One finished unary call (started with :meth:`start`)."""
        self.method(full_method).done(code, started_at)

    def start(self, full_method: str) -> float:
        """Count a unary call as started; returns its start time for :meth:`observe`."""
        self.method(full_method).started.inc()
        return time.perf_counter()


ReadyCheck = Callable[[], "tuple[bool, str]"]
"""``(ready, reason)``: whether the process can serve now, and why not (for ``/readyz``)."""


@dataclass
class ProcessMetrics:
    """Everything one process instance exports: its registry and the gRPC metrics of its
    servers and clients. Components add their own metrics to ``registry``."""

    registry: CollectorRegistry
    grpc_server: GrpcServerMetrics
    grpc_client: GrpcClientMetrics

    @classmethod
    def create(cls, *, process: bool = True) -> ProcessMetrics:
        registry = new_registry(process=process)
        return cls(registry, GrpcServerMetrics(registry), GrpcClientMetrics(registry))
