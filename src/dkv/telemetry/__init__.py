"""Telemetry shared by every dkv process: Prometheus metrics (:mod:`dkv.telemetry.metrics`),
the HTTP server for ``/metrics``, ``/livez`` and ``/readyz`` (:mod:`dkv.telemetry.http`).

Each process *instance* owns one :class:`prometheus_client.CollectorRegistry` (never the
global one), so tests can run many nodes in one interpreter and each scrape shows one
process's figures.
"""

from dkv.telemetry.metrics import (
    GRPC_CODE_NAMES,
    GrpcClientMetrics,
    GrpcServerMetrics,
    ProcessMetrics,
    new_registry,
)

__all__ = [
    "GRPC_CODE_NAMES",
    "GrpcClientMetrics",
    "GrpcServerMetrics",
    "ProcessMetrics",
    "new_registry",
]
