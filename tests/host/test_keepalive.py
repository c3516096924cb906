"""Keepalive: our clients' pings and our servers' ping policy agree (no GOAWAY too_many_pings).

Real grpc.aio servers and channels on 127.0.0.1, with the keepalive period scaled down from
``KEEPALIVE_TIME_MS`` to 1 s by the same function that makes the production options (1 s is
as fast as it goes: gRPC core sends a client ping at most once a second whatever
``grpc.keepalive_time_ms`` says). The same client against gRPC's default server policy, side
by side, is cut off after three early pings: that shows the test can fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from dkv.host.channels import (
    CHANNEL_OPTIONS,
    KEEPALIVE_TIME_MS,
    RECONNECT_OPTIONS,
    SERVER_KEEPALIVE_OPTIONS,
    Options,
    client_channel,
    keepalive_options,
)

TIME_MS = 1_000
# How long an idle connection is watched: gRPC's default policy cuts it at the 3rd early ping
# (about 4 intervals in).
INTERVALS = 8
# Generous: only the ping period matters to the server's policy, and a ping acked late on a
# busy machine must not close the connection by itself (that would look like a GOAWAY here).
TIMEOUT_MS = 5_000


class _Service:
    """Echo (unary) and Hold (server stream: one message, then idle until released)."""

    def __init__(self) -> None:
        self.peers: list[str] = []  # the client address of every call: one per connection
        self.release = asyncio.Event()

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self.peers.append(context.peer())
        return request

    async def hold(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        self.peers.append(context.peer())
        yield b"first"
        await self.release.wait()
        yield b"second"


async def _serve(options: Options) -> tuple[grpc.aio.Server, str, _Service]:
    svc = _Service()
    server = grpc.aio.server(options=list(options))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.T",
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(svc.echo),
                    "Hold": grpc.unary_stream_rpc_method_handler(svc.hold),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", svc


def _client(address: str) -> grpc.aio.Channel:
    """A channel built like ours (client_channel, CHANNEL_OPTIONS' parts), pinging every
    TIME_MS."""
    client_keepalive, _ = keepalive_options(TIME_MS, TIMEOUT_MS)
    return client_channel(address, None, client_keepalive + RECONNECT_OPTIONS)


def _raw(b: bytes) -> bytes:
    return b


async def _echo(ch: grpc.aio.Channel) -> bytes:
    return await ch.unary_unary("/t.T/Echo", _raw, _raw)(b"ping", timeout=10)


async def _left_ready(ch: grpc.aio.Channel, within_s: float) -> bool:
    """Whether the connection stops being READY (GOAWAY, close) within ``within_s``."""
    assert ch.get_state() is grpc.ChannelConnectivity.READY
    try:
        await asyncio.wait_for(ch.wait_for_state_change(grpc.ChannelConnectivity.READY), within_s)
    except TimeoutError:
        return False
    return True


async def _idle_channel(server_options: Options) -> tuple[bool, list[str]]:
    """One call, an idle channel for INTERVALS keepalive periods, another call: whether the
    connection dropped meanwhile, and the client address of each call."""
    server, address, svc = await _serve(server_options)
    try:
        async with _client(address) as ch:
            assert await _echo(ch) == b"ping"
            dropped = await _left_ready(ch, INTERVALS * TIME_MS / 1000)
            assert await _echo(ch) == b"ping"
        return dropped, svc.peers
    finally:
        await server.stop(None)


async def _idle_stream(server_options: Options) -> tuple[bool, str, list[str]]:
    """A server stream that stays idle (first message read, second not yet sent) for
    INTERVALS keepalive periods: whether the connection dropped, how the stream ended, and
    the client address of each call."""
    server, address, svc = await _serve(server_options)
    try:
        async with _client(address) as ch:
            call = ch.unary_stream("/t.T/Hold", _raw, _raw)(b"", timeout=30)
            assert await call.read() == b"first"
            dropped = await _left_ready(ch, INTERVALS * TIME_MS / 1000)
            svc.release.set()
            try:
                ended = repr(await call.read())
            except grpc.aio.AioRpcError as exc:
                ended = f"{exc.code().name}: {exc.details()}"
            assert await _echo(ch) == b"ping"
        return dropped, ended, svc.peers
    finally:
        await server.stop(None)


def test_production_options_come_from_one_function() -> None:
    client, server = keepalive_options(KEEPALIVE_TIME_MS)
    assert set(client) <= set(CHANNEL_OPTIONS)
    assert server == SERVER_KEEPALIVE_OPTIONS
    opts = dict(SERVER_KEEPALIVE_OPTIONS)
    # gRPC core's names (a misspelt argument is silently ignored): the server accepts a ping
    # at least as often as our clients send one, with or without calls.
    assert (
        opts["grpc.http2.min_ping_interval_without_data_ms"]
        <= dict(client)["grpc.keepalive_time_ms"]
    )
    assert opts["grpc.keepalive_permit_without_calls"] == 1


def test_idle_channels_and_streams_keep_their_connection() -> None:
    """An idle channel, and a stream open and silent (a watch with no events), under our
    policy and, side by side with the same client, under gRPC's default one (all four at
    once: the test lasts INTERVALS periods, not four times that)."""
    _, ours = keepalive_options(TIME_MS)

    async def all_four() -> tuple[
        tuple[bool, list[str]],
        tuple[bool, list[str]],
        tuple[bool, str, list[str]],
        tuple[bool, str, list[str]],
    ]:
        return await asyncio.gather(
            _idle_channel(ours), _idle_channel(()), _idle_stream(ours), _idle_stream(())
        )

    channel, default_channel, stream, default_stream = asyncio.run(all_four())

    dropped, peers = channel
    assert not dropped
    assert len(peers) == 2 and peers[0] == peers[1], peers  # the same connection
    # gRPC's default: GOAWAY too_many_pings, and the next call needed a new connection.
    dropped, peers = default_channel
    assert dropped
    assert len(peers) == 2 and peers[0] != peers[1], peers

    dropped, ended, peers = stream
    assert not dropped
    assert ended == repr(b"second")  # the stream went on
    assert len(peers) == 2 and peers[0] == peers[1], peers
    dropped, ended, peers = default_stream
    assert dropped
    assert ended.startswith("UNAVAILABLE"), ended  # the GOAWAY failed it
    assert len(peers) == 2 and peers[0] != peers[1], peers
