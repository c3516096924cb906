"""grpc_server_* metrics as go-grpc-prometheus names them, recorded by every dkv server,
and the HTTP server that exports them (/metrics, /livez, /readyz)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dkv.errors import InvalidArgument
from dkv.host.rpc_server import new_server
from dkv.telemetry import ProcessMetrics
from dkv.telemetry.http import MetricsServer, parse_listen
from dkv.v1 import kv_pb2

PUT = kv_pb2.PutRequest(key=b"k").SerializeToString()


class _Svc:
    async def put(self, req: kv_pb2.PutRequest, context: Any) -> kv_pb2.PutResponse:
        if req.key == b"missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such key")
        if req.key == b"boom":
            raise RuntimeError("a bug")
        if req.key == b"slow":
            await asyncio.sleep(30)
        return kv_pb2.PutResponse()

    async def watch(
        self, req: kv_pb2.PutRequest, context: Any
    ) -> AsyncIterator[kv_pb2.PutResponse]:
        for _ in range(3):
            yield kv_pb2.PutResponse()


def _server(metrics: ProcessMetrics) -> tuple[grpc.aio.Server, int]:
    svc = _Svc()
    de, se = kv_pb2.PutRequest.FromString, kv_pb2.PutResponse.SerializeToString
    server = new_server(metrics=metrics.grpc_server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "dkv.v1.KV",
                {
                    "Put": grpc.unary_unary_rpc_method_handler(svc.put, de, se),
                    "Watch": grpc.unary_stream_rpc_method_handler(svc.watch, de, se),
                },
            ),
        )
    )
    return server, server.add_insecure_port("127.0.0.1:0")


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_every_call_is_counted_with_its_code_method_and_type() -> None:
    async def main() -> None:
        metrics = ProcessMetrics.create(process=False)
        server, port = _server(metrics)
        http = MetricsServer(metrics.registry, "127.0.0.1:0")
        await server.start()
        mport = await http.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            put = ch.unary_unary("/dkv.v1.KV/Put")
            await put(PUT, timeout=10)
            await put(PUT, timeout=10)
            for key, code in (
                (b"missing", grpc.StatusCode.NOT_FOUND),
                (b"boom", grpc.StatusCode.UNKNOWN),
                (b"slow", grpc.StatusCode.DEADLINE_EXCEEDED),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await put(kv_pb2.PutRequest(key=key).SerializeToString(), timeout=0.3)
                assert info.value.code() is code
            with pytest.raises(grpc.aio.AioRpcError):
                await put(b"\xff", timeout=10)  # malformed: InvalidArgument
            assert len([m async for m in ch.unary_stream("/dkv.v1.KV/Watch")(PUT, timeout=10)]) == 3
        async with httpx.AsyncClient() as client:
            # The slow call ends at its deadline on the server too: wait for it to be counted.
            for _ in range(200):
                text = (await client.get(f"http://127.0.0.1:{mport}/metrics")).text
                s = _samples(text)
                if _value(
                    s,
                    "grpc_server_handled_total",
                    grpc_type="unary",
                    grpc_service="dkv.v1.KV",
                    grpc_method="Put",
                    grpc_code="DeadlineExceeded",
                ):
                    break
                await asyncio.sleep(0.05)
        await http.stop()
        await server.stop(None)

        unary = {"grpc_type": "unary", "grpc_service": "dkv.v1.KV", "grpc_method": "Put"}
        assert _value(s, "grpc_server_started_total", **unary) == 6
        handled = {
            code: _value(s, "grpc_server_handled_total", **unary, grpc_code=code)
            for code in ("OK", "NotFound", "Unknown", "InvalidArgument", "DeadlineExceeded")
        }
        # gRPC cancels the slow handler at the caller's deadline: DeadlineExceeded, as Go's
        # servers count it, not Canceled.
        assert handled == {
            "OK": 2,
            "NotFound": 1,
            "Unknown": 1,
            "InvalidArgument": 1,
            "DeadlineExceeded": 1,
        }
        assert _value(s, "grpc_server_handling_seconds_count", **unary) == 6
        assert _value(s, "grpc_server_handling_seconds_bucket", **unary, le="+Inf") == 6
        stream = {"grpc_type": "server_stream", "grpc_service": "dkv.v1.KV", "grpc_method": "Watch"}
        assert _value(s, "grpc_server_handled_total", **stream, grpc_code="OK") == 1
        # No _created series (FIELD-NOTES), one registry per instance (no process collectors
        # asked for here).
        assert not any(name.endswith("_created") for name, _ in s)
        assert not any(name.startswith("process_") for name, _ in s)

    asyncio.run(main())


def test_two_instances_in_one_interpreter_have_their_own_registries() -> None:
    a, b = ProcessMetrics.create(), ProcessMetrics.create(process=False)
    a.grpc_client.observe("/dkv.v1.KV/Range", None, a.grpc_client.start("/dkv.v1.KV/Range"))
    labels = {"grpc_type": "unary", "grpc_service": "dkv.v1.KV", "grpc_method": "Range"}
    assert a.registry.get_sample_value("grpc_client_started_total", labels) == 1
    assert b.registry.get_sample_value("grpc_client_started_total", labels) is None
    assert a.registry.get_sample_value("process_resident_memory_bytes") is not None


def test_probes_say_why_not_ready() -> None:
    async def main() -> None:
        state = {"ready": False}

        def ready() -> tuple[bool, str]:
            return (True, "ok") if state["ready"] else (False, "shard 3 has no leader")

        http = MetricsServer(ProcessMetrics.create(process=False).registry, "127.0.0.1:0", ready)
        port = await http.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/livez")).status_code == 200
            r = await client.get("/readyz")
            assert (r.status_code, r.text.strip()) == (503, "shard 3 has no leader")
            state["ready"] = True
            assert (await client.get("/readyz")).status_code == 200
            r = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
            assert r.headers["content-type"].startswith("application/openmetrics-text")
            assert (await client.get("/nope")).status_code == 404
        # A second server on the same port is refused with the reason.
        other = MetricsServer(http.registry, f"127.0.0.1:{port}")
        with pytest.raises(InvalidArgument, match="cannot listen for metrics"):
            await other.start()
        await http.stop()

    asyncio.run(main())


@pytest.mark.parametrize("text", ["nohost", ":80", "h:99999", "h:x"])
def test_a_bad_metrics_address_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="--listen-metrics"):
        parse_listen(text)
    assert parse_listen("off") is None
    assert parse_listen("") is None


def test_every_process_serves_metrics_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """--listen-metrics is on unless turned off (etcd's ports + 1: 2381, 2481; the gateway 2375,
    beside the front door); tests/conftest.py sets the environment to port 0, so clear it."""
    from dkv_gateway.main import parse_args as gateway
    from dkv_membership.main import parse_args as membership
    from dkv_node.main import parse_args as node

    for var in (
        "DKV_LISTEN_METRICS",
        "DKV_MEMBERSHIP_LISTEN_METRICS",
        "DKV_GATEWAY_LISTEN_METRICS",
    ):
        monkeypatch.delenv(var, raising=False)
    processes: dict[str, tuple[Callable[[list[str]], Any], list[str]]] = {
        "127.0.0.1:2381": (node, ["--name", "n1", "--initial-cluster", "n1=127.0.0.1:2380"]),
        "127.0.0.1:2481": (membership, ["--name", "m1", "--initial-cluster", "m1=127.0.0.1:2480"]),
        "127.0.0.1:2375": (gateway, ["--membership", "127.0.0.1:2479"]),
    }
    for default, (parse, argv) in processes.items():
        assert parse(argv).listen_metrics == default, parse
        assert parse([*argv, "--listen-metrics", "off"]).listen_metrics == "", parse
