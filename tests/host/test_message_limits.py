"""Every server made by ``new_server`` bounds its messages (dkv.sizes): an oversize request or
answer is RESOURCE_EXHAUSTED with gRPC's own message, which names both sizes, and the server
goes on serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
import pytest

from dkv.host.rpc_server import new_server
from dkv.sizes import (
    GRPC_DEFAULT_MESSAGE_BYTES,
    PEER_MESSAGE_LIMITS,
    MessageLimits,
    message_limits,
    request_bytes_max,
    response_bytes_max,
)

REQUEST_MAX = request_bytes_max()
RESPONSE_MAX = response_bytes_max()


def test_the_derivation_from_the_node_limits() -> None:
    """The numbers docs/http.md quotes; bigger values give bigger messages."""
    assert REQUEST_MAX == 4096 + 2 * (1 << 20) + 128 + 1024 == 2_102_400
    assert RESPONSE_MAX == GRPC_DEFAULT_MESSAGE_BYTES == 4_194_304
    bigger = message_limits(value_bytes_max=4 << 20)
    assert bigger.request_bytes_max == 4096 + 2 * (4 << 20) + 128 + 1024
    # A Put answer (prev_kv and current) and a watch revision (kv and prev_kv) of two 4 MiB
    # values must fit.
    assert bigger.response_bytes_max > 2 * (4 << 20) + 2 * 4096
    assert PEER_MESSAGE_LIMITS.request_bytes_max > GRPC_DEFAULT_MESSAGE_BYTES


def _echo_server(server: grpc.aio.Server) -> None:
    """Echo: the answer is the request's bytes, ``times`` times (its first byte)."""

    async def echo(request: bytes, context: Any) -> bytes:
        return request * (request[0] if request else 1)

    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )


@asynccontextmanager
async def _serving(options: tuple[tuple[str, Any], ...] = ()) -> AsyncIterator[Any]:
    server = new_server(options=options)
    _echo_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)]
    )
    try:
        yield channel.unary_unary("/test.Echo/Echo")
    finally:
        await channel.close()
        await server.stop(None)


async def _refused(call: Any, body: bytes) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(body, timeout=30)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    return info.value.details() or ""


def test_requests_and_answers_over_the_limits_are_resource_exhausted() -> None:
    async def scenario() -> None:
        async with _serving() as echo:
            # The largest request passes; one byte more is refused before any handler.
            assert len(await echo(b"\x01" + b"x" * (REQUEST_MAX - 1), timeout=30)) == REQUEST_MAX
            details = await _refused(echo, b"\x01" + b"x" * REQUEST_MAX)
            assert details == (
                f"SERVER: Received message larger than max ({REQUEST_MAX + 1} vs. {REQUEST_MAX})"
            )
            # An answer over the send limit: 2 x 2.1 MB.
            details = await _refused(echo, b"\x02" + b"x" * (REQUEST_MAX - 1))
            assert details == (
                f"SERVER: Sent message larger than max ({2 * REQUEST_MAX} vs. {RESPONSE_MAX})"
            )
            # Still serving.
            assert await echo(b"\x01ok", timeout=30) == b"\x01ok"

    asyncio.run(scenario())


def test_options_override_the_limits() -> None:
    """A node with bigger values, and the peer ports (Raft batches), pass their own."""

    async def scenario() -> None:
        async with _serving(PEER_MESSAGE_LIMITS.grpc_options()) as echo:
            big = b"\x01" + b"x" * (5 << 20)  # over gRPC's default 4 MiB
            assert len(await echo(big, timeout=30)) == len(big)
        small = MessageLimits(request_bytes_max=100, response_bytes_max=100)
        async with _serving(small.grpc_options()) as echo:
            assert "(101 vs. 100)" in await _refused(echo, b"\x01" + b"x" * 100)

    asyncio.run(scenario())
