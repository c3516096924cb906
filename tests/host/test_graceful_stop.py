"""A graceful stop of the Raft peer transport: it ends the connections peers opened, opens no
new one, and logs nothing alarming.

Real listeners and connections on 127.0.0.1. The whole stop of real node processes, logs
included, is tested in tests/node/test_processes.py.
"""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from dkv.host.peer_transport import PeerTransport
from dkv.host.rpc_server import finish_pending_tasks
from dkv.raft import Message, MessageType

HEARTBEAT = Message(MessageType.HEARTBEAT, to=1, frm=2, term=1)


def test_closing_the_transport_ends_the_connections_peers_opened(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        receiver = PeerTransport(1, "c", {})
        delivered = asyncio.Event()
        receiver.set_delivery(lambda _frm, _batch: delivered.set())
        port = await receiver.listener.listen("127.0.0.1:0")
        sender = PeerTransport(2, "c", {1: f"127.0.0.1:{port}"}, rng=random.Random(2))
        gone = asyncio.Event()
        sender.on_unreachable = lambda node_id: gone.set()
        try:
            sender.send(1, [(1, HEARTBEAT)])
            await asyncio.wait_for(delivered.wait(), 10)  # connected and served
            assert receiver.listener.connections == 1
            await receiver.close()
            # The sender sees its connection end (and says the peer is unreachable) ...
            await asyncio.wait_for(gone.wait(), 10)
            assert receiver.listener.connections == 0
            # ... and nobody listens any more: a new connection is refused by the kernel.
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)
            # A closed transport opens no new connection (it would outlive the stop).
            closed = PeerTransport(3, "c", {1: f"127.0.0.1:{port}"})
            await closed.close()
            closed.send(1, [(1, HEARTBEAT)])
            assert closed.dropped_batches == 1
        finally:
            await sender.close()
            await receiver.close()
        assert await finish_pending_tasks(timeout_s=5) == set()

    asyncio.run(scenario())
    noise = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert noise == [], [r.getMessage() for r in noise]
