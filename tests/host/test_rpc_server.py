"""Malformed request bodies answer INVALID_ARGUMENT at every kind of method."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dkv.host.rpc_server import DecodeGuard, RateLimitedLog, new_server
from dkv.v1 import kv_pb2

# Bodies that are not a valid PutRequest, and what each one breaks.
MALFORMED = {
    "one 0xff byte": b"\xff",
    "truncated varint": b"\x08\x80",
    "field number 0": b"\x00\x01",
    "invalid UTF-8 in request_id": b"\x52\x02\xff\xfe",
    "length beyond the body": b"\x0a\x05ab",
}


class _Echo:
    """One handler of each shape gRPC knows, async and sync."""

    async def unary(self, req: kv_pb2.PutRequest, context: Any) -> kv_pb2.PutResponse:
        return kv_pb2.PutResponse(succeeded=req.key == b"k")

    async def server_stream(
        self, req: kv_pb2.PutRequest, context: Any
    ) -> AsyncIterator[kv_pb2.PutResponse]:
        for _ in range(2):
            yield kv_pb2.PutResponse(succeeded=req.key == b"k")

    async def bidi(
        self, requests: AsyncIterator[kv_pb2.PutRequest], context: Any
    ) -> AsyncIterator[kv_pb2.PutResponse]:
        async for req in requests:
            yield kv_pb2.PutResponse(succeeded=req.key == b"k")

    def sync_unary(self, req: kv_pb2.PutRequest, context: Any) -> kv_pb2.PutResponse:
        return kv_pb2.PutResponse(succeeded=req.key == b"k")

    def sync_stream(self, req: kv_pb2.PutRequest, context: Any) -> Iterator[kv_pb2.PutResponse]:
        yield kv_pb2.PutResponse(succeeded=req.key == b"k")


def _handlers(echo: _Echo) -> grpc.GenericRpcHandler:
    de, se = kv_pb2.PutRequest.FromString, kv_pb2.PutResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(echo.unary, de, se),
            "ServerStream": grpc.unary_stream_rpc_method_handler(echo.server_stream, de, se),
            "Bidi": grpc.stream_stream_rpc_method_handler(echo.bidi, de, se),
            "SyncUnary": grpc.unary_unary_rpc_method_handler(echo.sync_unary, de, se),
            "SyncStream": grpc.unary_stream_rpc_method_handler(echo.sync_stream, de, se),
        },
    )


class _Server:
    def __init__(self, guard: DecodeGuard) -> None:
        self.guard = guard
        self.server = new_server(guard=guard)
        self.server.add_generic_rpc_handlers((_handlers(_Echo()),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> grpc.aio.Channel:
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        return self.channel

    async def __aexit__(self, *exc: object) -> None:
        assert self.channel is not None
        await self.channel.close()
        await self.server.stop(None)


async def _unary(ch: grpc.aio.Channel, method: str, body: bytes) -> bytes:
    result: bytes = await ch.unary_unary(f"/test.Echo/{method}")(body, timeout=10)
    return result


async def _server_stream(ch: grpc.aio.Channel, method: str, body: bytes) -> list[bytes]:
    return [m async for m in ch.unary_stream(f"/test.Echo/{method}")(body, timeout=10)]


async def _bidi(ch: grpc.aio.Channel, bodies: list[bytes]) -> list[bytes]:
    call = ch.stream_stream("/test.Echo/Bidi")(iter(bodies), timeout=10)
    return [m async for m in call]


def _ok(raw: bytes) -> bool:
    return kv_pb2.PutResponse.FromString(raw).succeeded


GOOD = kv_pb2.PutRequest(key=b"k", request_id="r").SerializeToString()


@pytest.mark.parametrize("what", sorted(MALFORMED))
def test_malformed_body_is_invalid_argument_at_every_kind_of_method(what: str) -> None:
    body = MALFORMED[what]

    async def main() -> None:
        guard = DecodeGuard()
        async with _Server(guard) as ch:
            calls = {
                "Unary": lambda: _unary(ch, "Unary", body),
                "SyncUnary": lambda: _unary(ch, "SyncUnary", body),
                "ServerStream": lambda: _server_stream(ch, "ServerStream", body),
                "SyncStream": lambda: _server_stream(ch, "SyncStream", body),
                # A good message first: the stream fails at the bad one.
                "Bidi": lambda: _bidi(ch, [GOOD, body]),
            }
            for name, run in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await run()
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, name
                assert "not a valid dkv.v1.PutRequest" in (info.value.details() or ""), name
            assert guard.malformed_total == len(calls)
            # The same server still answers good requests on every method.
            assert _ok(await _unary(ch, "Unary", GOOD))
            assert _ok(await _unary(ch, "SyncUnary", GOOD))
            assert [_ok(m) for m in await _server_stream(ch, "ServerStream", GOOD)] == [True] * 2
            assert [_ok(m) for m in await _server_stream(ch, "SyncStream", GOOD)] == [True]
            assert [_ok(m) for m in await _bidi(ch, [GOOD, GOOD])] == [True, True]

    asyncio.run(main())


def test_library_services_are_guarded_too() -> None:
    """gRPC health (a library servicer) on a server made by new_server."""

    async def main() -> None:
        async with _Server(DecodeGuard()) as ch:
            check = ch.unary_unary("/grpc.health.v1.Health/Check")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await check(b"\x0a\x05ab", timeout=10)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "grpc.health.v1.HealthCheckRequest" in (info.value.details() or "")
            raw = await check(health_pb2.HealthCheckRequest().SerializeToString(), timeout=10)
            assert health_pb2.HealthCheckResponse.FromString(raw).status == (
                health_pb2.HealthCheckResponse.SERVING
            )

    asyncio.run(main())


def test_bad_requests_are_logged_in_one_line_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    limited = RateLimitedLog(logging.getLogger("dkv.rpc.test"), interval_s=10, clock=lambda: now[0])

    async def main() -> None:
        async with _Server(DecodeGuard(limited)) as ch:
            for _ in range(20):
                with pytest.raises(grpc.aio.AioRpcError):
                    await _unary(ch, "Unary", b"\xff")
            now[0] += 11
            with pytest.raises(grpc.aio.AioRpcError):
                await _unary(ch, "Unary", b"\xff")

    with caplog.at_level(logging.WARNING, logger="dkv.rpc.test"):
        asyncio.run(main())
    lines = [r for r in caplog.records if r.name == "dkv.rpc.test"]
    assert len(lines) == 2
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in lines)
    assert "/test.Echo/Unary" in lines[0].getMessage()
    assert "19 more like it not logged" in lines[1].getMessage()
    # gRPC's own traceback logger said nothing.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_port_another_server_holds_is_refused_not_shared() -> None:
    """gRPC's default SO_REUSEPORT would let a second process share a port we listen on."""
    from dkv.errors import InvalidArgument
    from dkv.host.rpc_server import bind

    async def main() -> None:
        first = new_server()
        port = bind(first, "127.0.0.1:0", None)
        await first.start()
        second = new_server()
        try:
            with pytest.raises(InvalidArgument, match="cannot listen"):
                bind(second, f"127.0.0.1:{port}", None)
        finally:
            await second.stop(None)
            await first.stop(None)

    asyncio.run(main())
