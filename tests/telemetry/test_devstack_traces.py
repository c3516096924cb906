"""`make run`'s traces (dkv.devstack): Jaeger is started first and every process exports to
it when it is wanted and built; a receiver of the caller's replaces it; without a binary the
banner says how to get one. The stack itself is exercised by tests/e2e/test_traces.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from dkv.devstack import DevLayout, DevStack
from dkv.telemetry import jaeger as jaeger_backend


def _flags(argv: list[str]) -> dict[str, str]:
    return {a: b for a, b in itertools.pairwise(argv) if a.startswith("--")}


def test_jaeger_runs_first_and_every_process_sends_it_traces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jaeger_backend, "find_jaeger", lambda: "/opt/jaeger")
    layout = DevLayout(tmp_path, port_base=12000, jaeger=True, trace_sample_ratio=0.5)
    stack = DevStack(layout)
    procs = stack.plan()
    assert procs[0].name == "jaeger"
    assert procs[0].argv[0] == "/opt/jaeger"
    assert procs[0].log_path == tmp_path / "logs" / "jaeger.log"
    config = json.loads((tmp_path / "jaeger.yaml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "127.0.0.1:12061"
    assert config["extensions"]["jaeger_query"]["http"]["endpoint"] == "127.0.0.1:12062"
    dkv = [p for p in procs if p.name not in ("jaeger", "envoy", "prometheus")]
    assert {p.name for p in dkv} == {"membership m1", "node n1", "node n2", "node n3", "gateway"}
    for p in dkv:
        flags = _flags(p.argv)
        assert flags["--otlp-endpoint"] == "http://127.0.0.1:12061", p.name
        assert flags["--trace-sample-ratio"] == "0.5", p.name
    assert (12061, "Jaeger (OTLP)") in layout.ports() and (12062, "Jaeger") in layout.ports()
    assert len({port for port, _ in layout.ports()}) == len(layout.ports()), "a port used twice"
    banner = stack.banner()
    assert "Jaeger http://127.0.0.1:12062" in banner
    assert "http://127.0.0.1:12062/api/traces?service=dkv-gateway" in banner


def test_a_receiver_of_the_callers_replaces_jaeger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jaeger_backend, "find_jaeger", lambda: "/opt/jaeger")
    layout = DevLayout(tmp_path, port_base=12000, jaeger=True, otlp_endpoint="http://h:4317")
    procs = DevStack(layout).plan()
    assert all(p.name != "jaeger" for p in procs)
    gateway = next(p for p in procs if p.name == "gateway")
    assert _flags(gateway.argv)["--otlp-endpoint"] == "http://h:4317"
    assert all(what != "Jaeger" for _, what in layout.ports())


def test_without_jaeger_nothing_is_traced_and_the_banner_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jaeger_backend, "find_jaeger", lambda: None)
    wanted = DevLayout(tmp_path, port_base=12000, jaeger=True)
    procs = DevStack(wanted).plan()
    assert all(p.name != "jaeger" and "--otlp-endpoint" not in p.argv for p in procs)
    assert "`make jaeger` builds Jaeger" in DevStack(wanted).banner()
    assert all(what != "Jaeger" for _, what in wanted.ports())  # its ports need not be free
    # The tests' default: no tracing, nothing said.
    off = DevLayout(tmp_path, port_base=12000)
    assert off.tracing_flags() == [] and "traces" not in DevStack(off).banner()
