"""A real Jaeger v2 (built from its Go module by tools/jaeger/build.sh) receives a trace sent by
the OpenTelemetry SDK over OTLP/gRPC, and its query API returns it with both spans linked.

The only skip is a machine without Go, where the binary cannot be built.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dkv.telemetry.jaeger import find_jaeger, jaeger_argv, jaeger_config, jaeger_ready

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "tools" / "jaeger" / "build.sh"
NO_GO = 3
"""build.sh's exit code when there is no Go toolchain."""

READY_S = 60.0
TRACE_S = 30.0
BUILD_S = 1800.0
"""A cold build downloads and compiles ~1,000 Go packages (minutes on 2 cores)."""


def _jaeger_binary() -> str:
    if os.environ.get("DKV_JAEGER"):
        found = find_jaeger()
        assert found is not None
        return found
    out = subprocess.run(
        ["bash", str(BUILD)],
        check=False,
        capture_output=True,
        text=True,
        timeout=BUILD_S,
    )
    if out.returncode == NO_GO:
        pytest.skip(f"no Go toolchain to build Jaeger: {out.stderr.strip()}")
    assert out.returncode == 0, f"tools/jaeger/build.sh failed:\n{out.stderr[-4000:]}"
    path = out.stdout.strip().splitlines()[-1]
    assert find_jaeger() == path, "find_jaeger() does not see the binary build.sh made"
    return path


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class _Jaeger:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, otlp: int, query: int) -> None:
        self.proc = proc
        self.log = log
        self.otlp_grpc_port = otlp
        self.query_port = query

    def get(self, path: str) -> tuple[int, Any]:
        """Status and JSON body of the query API at ``path`` (no proxy: it is loopback)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://127.0.0.1:{self.query_port}{path}"
        try:
            with opener.open(url, timeout=5) as answer:
                return int(answer.status), json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None


@pytest.fixture
def jaeger(tmp_path: Path) -> Iterator[_Jaeger]:
    binary = _jaeger_binary()
    otlp, query = _free_ports(2)
    config = tmp_path / "jaeger.yaml"
    config.write_text(jaeger_config(otlp, query))
    log = tmp_path / "jaeger.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            jaeger_argv(binary, config),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + READY_S
        while not jaeger_ready(query, otlp, timeout=1.0):
            if proc.poll() is not None:
                pytest.fail(f"Jaeger exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"Jaeger not ready after {READY_S}s:\n{log.read_text()}")
            time.sleep(0.05)
        yield _Jaeger(proc, log, otlp, query)
    finally:
        _stop(proc)


def test_jaeger_config_binds_only_loopback_on_given_ports() -> None:
    config = json.loads(
        jaeger_config(4317, 16686, otlp_http_port=4318, max_traces=10, metrics_port=8888)
    )
    endpoints = [
        config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"],
        config["receivers"]["otlp"]["protocols"]["http"]["endpoint"],
        config["extensions"]["jaeger_query"]["http"]["endpoint"],
        config["extensions"]["jaeger_query"]["grpc"]["endpoint"],
    ]
    assert endpoints == ["127.0.0.1:4317", "127.0.0.1:4318", "127.0.0.1:16686", "127.0.0.1:0"]
    reader = config["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]
    assert reader["prometheus"] == {"host": "127.0.0.1", "port": 8888}
    assert config["service"]["extensions"] == ["jaeger_storage", "jaeger_query"]
    assert config["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]

    default = json.loads(jaeger_config(1, 2))
    assert "http" not in default["receivers"]["otlp"]["protocols"]
    assert default["service"]["telemetry"]["metrics"] == {"level": "none"}
    with pytest.raises(ValueError, match="out of range"):
        jaeger_config(70000, 2)


def _listening_ports(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP listener of ``pid``, from /proc (no ss needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            assert len(address) == width
            found.add((address, int(port, 16)))
    return found


def test_trace_round_trip(jaeger: _Jaeger) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    # Jaeger listens on loopback only, on the ports it was given plus the query gRPC API's
    # kernel-chosen one: none of the collector's fixed defaults (8888, 13133, 4318, ...).
    loopback = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it
    listeners = _listening_ports(jaeger.proc.pid)
    assert {address for address, _ in listeners} == {loopback}, listeners
    ports = {port for _, port in listeners}
    assert {jaeger.otlp_grpc_port, jaeger.query_port} <= ports
    assert len(ports) == 3, listeners

    # A provider of its own (never the global one), flushed span by span.
    provider = TracerProvider(resource=Resource.create({"service.name": "dkv-test-jaeger"}))
    exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{jaeger.otlp_grpc_port}", insecure=True)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests.telemetry.test_jaeger")
    try:
        # The child starts while the parent is the current span, so it is the parent's child.
        with (
            tracer.start_as_current_span("parent", attributes={"dkv.test": "round-trip"}) as p,
            tracer.start_as_current_span("child", attributes={"dkv.shard": 7}) as c,
        ):
            pass
    finally:
        provider.shutdown()
    trace_id = f"{p.get_span_context().trace_id:032x}"
    parent_id = f"{p.get_span_context().span_id:016x}"
    child_id = f"{c.get_span_context().span_id:016x}"

    deadline = time.monotonic() + TRACE_S
    status, body = jaeger.get(f"/api/traces/{trace_id}")
    while not (status == 200 and len(body["data"][0]["spans"]) == 2):
        assert time.monotonic() < deadline, (
            f"trace {trace_id} not found (last answer {status} {body}):\n{jaeger.log.read_text()}"
        )
        time.sleep(0.1)
        status, body = jaeger.get(f"/api/traces/{trace_id}")

    (trace,) = body["data"]
    spans = {s["operationName"]: s for s in trace["spans"]}
    assert set(spans) == {"parent", "child"}
    parent, child = spans["parent"], spans["child"]
    assert parent["traceID"] == child["traceID"] == trace_id
    assert (parent["spanID"], child["spanID"]) == (parent_id, child_id)
    assert parent["references"] == []
    assert child["references"] == [
        {"refType": "CHILD_OF", "traceID": trace_id, "spanID": parent_id}
    ]
    assert trace["processes"][parent["processID"]]["serviceName"] == "dkv-test-jaeger"
    tags = {t["key"]: t["value"] for t in parent["tags"]}
    assert tags["dkv.test"] == "round-trip"
    assert {t["key"]: t["value"] for t in child["tags"]}["dkv.shard"] == 7

    status, services = jaeger.get("/api/services")
    assert status == 200
    assert "dkv-test-jaeger" in services["data"]
