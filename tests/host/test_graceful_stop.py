"""A graceful stop of the Raft peer transport and its server logs nothing alarming.

Real grpc.aio server and channels on 127.0.0.1. The noise came from grpc: a stream still open
when ``Server.stop()`` cancels it is logged as "Aborting method [/dkv.v1.RaftPeer/Stream] due to
server stop" (WARNING), or, when the process's ``asyncio.run`` cancels grpc's task for it
before it saw its call end, as a CancelledError traceback at ERROR. Here: the transport ends
the streams itself before the server stops. The whole stop of real node processes, logs
included, is tested in tests/node/test_processes.py.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import grpc.aio
import pytest

from dkv.host.grpc_transport import (
    GrpcTransport,
    add_raft_peer_service,
    encode,
    finish_pending_tasks,
)
from dkv.raft import Message, MessageType
from dkv.v1 import raft_pb2 as pb

HEARTBEAT = Message(MessageType.HEARTBEAT, to=1, frm=2, term=1)


def test_closing_the_transport_ends_the_streams_peers_opened_while_the_server_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What keeps grpc quiet at stop: no stream is left for Server.stop() to cancel."""
    caplog.set_level(logging.DEBUG)

    async def scenario() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        receiver = GrpcTransport(1, "c", {})
        delivered = asyncio.Event()
        receiver.set_delivery(lambda _frm, _batch: delivered.set())
        add_raft_peer_service(server, receiver.service)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stream = ch.stream_stream(
                    "/dkv.v1.RaftPeer/Stream",
                    request_serializer=pb.MessageBatch.SerializeToString,
                    response_deserializer=pb.StreamAck.FromString,
                )
                call = stream()
                await call.write(encode("c", 2, [(1, HEARTBEAT)]))
                await asyncio.wait_for(delivered.wait(), 10)  # the stream is open and served
                await receiver.close()
                # Ended by close() with the server still running: OK, not cancelled by stop.
                ended = await asyncio.wait_for(call.code(), 10)
                # A stream opened while stopping ends at once, the same way.
                late = stream()
                await late.done_writing()
                late_ended = await asyncio.wait_for(late.code(), 10)
            # A closed transport opens no new stream (it would outlive the stop).
            closed = GrpcTransport(3, "c", {1: f"127.0.0.1:{port}"})
            await closed.close()
            closed.send(1, [(1, HEARTBEAT)])
            assert closed.dropped_batches == 1
        finally:
            await server.stop(None)
        assert await finish_pending_tasks(timeout_s=5) == set()
        return ended, late_ended

    assert asyncio.run(scenario()) == (grpc.StatusCode.OK, grpc.StatusCode.OK)
    noise = [
        r for r in caplog.records if r.name.startswith("grpc") and r.levelno >= logging.WARNING
    ]
    assert noise == [], [r.getMessage() for r in noise]
