"""A local Jaeger v2 trace backend: where its binary is, its config, and when it is ready.

Jaeger ships no Python package and this machine may not download release binaries, so the
binary is built from its Go module by ``tools/jaeger/build.sh`` (``make jaeger``) and cached by
version under ``${DKV_CACHE_DIR:-~/.cache/dkv}/jaeger/<version>/jaeger``.

Jaeger v2 is an OpenTelemetry-collector build, and the collector opens listeners on fixed
ports unless told otherwise: its built-in all-in-one config (used when no ``--config`` is given)
listens on localhost at 4317/4318 (OTLP gRPC/HTTP), 14250/14268 and UDP 6831/6832 (Jaeger
protocols), 9411 (Zipkin), 5778/5779 (remote sampling), 13133/13132 (health check HTTP/gRPC),
27777 (expvar), 27778 (zpages), 8888 (its own Prometheus metrics), and on *all interfaces* at
16686/16685 (query HTTP+UI/gRPC). :func:`jaeger_config` starts only the components dkv needs
and binds each of them to 127.0.0.1 on a port the caller chose, so two instances (two tests, a
test next to ``make run``) can run at once and nothing listens beyond loopback.

The UI: the Go module carries only a placeholder page (the real UI is a separate JavaScript
build that Jaeger's release process embeds), so a binary built here serves the query API
(``/api/traces/<id>``, ``/api/services``) in full but shows "This is not the Jaeger UI you are
looking for" at ``/``. ``jaeger_query.ui.assets_path`` can point at a built jaeger-ui.

The config is written as JSON: YAML is a superset of JSON, Jaeger's file provider parses it as
YAML, and PyYAML is only a dev dependency.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import urllib.request
from pathlib import Path
from typing import Any, Final

__all__ = [
    "JAEGER_VERSION",
    "cached_jaeger_path",
    "find_jaeger",
    "jaeger_argv",
    "jaeger_config",
    "jaeger_ready",
]

JAEGER_VERSION: Final = "v1.75.0"
"""The Jaeger release tools/jaeger/build.sh builds (keep the two in step)."""

_HOST: Final = "127.0.0.1"
# Loopback needs no proxy, and an http_proxy in the environment must not reroute the probe.
_NO_PROXY: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_STORAGE: Final = "dkv_memory"
"""Name of the in-memory backend, shared by the storage extension, exporter and query."""


def cached_jaeger_path() -> Path:
    """Where tools/jaeger/build.sh leaves the binary (it may not exist yet)."""
    root = os.environ.get("DKV_CACHE_DIR") or str(Path.home() / ".cache" / "dkv")
    return Path(root) / "jaeger" / JAEGER_VERSION / "jaeger"


def find_jaeger() -> str | None:
    """The Jaeger binary to run: ``$DKV_JAEGER``, else the build cache, else ``jaeger`` on PATH.

    ``$DKV_JAEGER`` is returned as given even when it does not exist, so a wrong path fails
    loudly when started rather than silently falling back to another binary.
    """
    override = os.environ.get("DKV_JAEGER")
    if override:
        return override
    cached = cached_jaeger_path()
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    return shutil.which("jaeger")


def jaeger_argv(binary: str, config_path: str | os.PathLike[str]) -> list[str]:
    """The command line that runs ``binary`` with the config file at ``config_path``.

    Without ``--config`` Jaeger falls back to its all-in-one config and its fixed ports.
    """
    return [binary, "--config", f"file:{Path(config_path).resolve()}"]


def _endpoint(port: int) -> dict[str, str]:
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return {"endpoint": f"{_HOST}:{port}"}


def jaeger_config(
    otlp_grpc_port: int,
    query_port: int,
    *,
    otlp_http_port: int | None = None,
    max_traces: int = 100_000,
    query_grpc_port: int = 0,
    metrics_port: int | None = None,
) -> str:
    """The text of a Jaeger v2 config (JSON, which Jaeger reads as YAML) for local use.

    In-memory storage holding at most ``max_traces`` traces; an OTLP receiver on
    ``otlp_grpc_port`` (and OTLP/HTTP on ``otlp_http_port`` if given); the query HTTP API and UI
    on ``query_port``. The query extension always opens a gRPC API too and cannot do without
    it: ``query_grpc_port`` 0 lets the kernel pick a free loopback port for it. Jaeger's own
    Prometheus metrics are off unless ``metrics_port`` is given. All bound to 127.0.0.1.
    """
    if max_traces <= 0:
        raise ValueError("max_traces must be positive")
    protocols: dict[str, Any] = {"grpc": _endpoint(otlp_grpc_port)}
    if otlp_http_port is not None:
        protocols["http"] = _endpoint(otlp_http_port)

    # The collector's default telemetry is a Prometheus endpoint on localhost:8888; level
    # "none" is the only way to have no reader (any other level requires one).
    metrics: dict[str, Any] = {"level": "none"}
    if metrics_port is not None:
        _endpoint(metrics_port)
        metrics = {
            "level": "basic",
            "readers": [
                {"pull": {"exporter": {"prometheus": {"host": _HOST, "port": metrics_port}}}}
            ],
        }

    config: dict[str, Any] = {
        "service": {
            # Only the components listed here are started: nothing of the all-in-one set
            # (remote_sampling, healthcheckv2, expvar, zpages, the jaeger and zipkin receivers)
            # opens a port.
            "extensions": ["jaeger_storage", "jaeger_query"],
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["batch"],
                    "exporters": ["jaeger_storage_exporter"],
                }
            },
            "telemetry": {
                "resource": {"service.name": "jaeger"},
                "metrics": metrics,
                "logs": {"level": "info"},
            },
        },
        "extensions": {
            "jaeger_storage": {"backends": {_STORAGE: {"memory": {"max_traces": max_traces}}}},
            "jaeger_query": {
                "storage": {"traces": _STORAGE},
                # v2 turns query's self-tracing on by default; nothing here collects it.
                "enable_tracing": False,
                "http": _endpoint(query_port),
                "grpc": _endpoint(query_grpc_port),
            },
        },
        "receivers": {"otlp": {"protocols": protocols}},
        # Batches spans before the storage write (flushes at least every 200 ms).
        "processors": {"batch": {}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": _STORAGE}},
    }
    return json.dumps(config, indent=2) + "\n"


def _port_open(port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def jaeger_ready(
    query_port: int, otlp_grpc_port: int | None = None, *, timeout: float = 1.0
) -> bool:
    """Whether Jaeger answers its query API (``/api/services``) and, if given, the OTLP port
    accepts connections.

    The collector starts its extensions (the query API) before its pipelines (the OTLP
    receiver), so a query API that answers does not yet mean spans can be sent.
    """
    url = f"http://{_HOST}:{query_port}/api/services"
    try:
        with _NO_PROXY.open(url, timeout=timeout) as answer:
            if answer.status != 200:
                return False
    # URLError (HTTPError for non-2xx) and socket errors are OSErrors; HTTPException is a
    # garbled answer, e.g. from something else listening on the port.
    except (OSError, http.client.HTTPException):
        return False
    return otlp_grpc_port is None or _port_open(otlp_grpc_port, timeout)
