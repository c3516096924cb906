"""Hosts over the real peer transport (asyncio TLS, framed) on 127.0.0.1, with mTLS from the
dev PKI; and what its listener refuses."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from pathlib import Path

import grpc
import pytest
from dkv_node.shard import KvShard

from dkv.host import Host, HostConfig, peer_transport
from dkv.host.channels import TlsFiles
from dkv.host.peer_transport import PeerListener, PeerTransport
from dkv.host.peer_wire import PREAMBLE, FrameBuffer, Kind, encode_batch, frame
from dkv.raft import ConfState, Message, MessageType, Role
from dkv.security import PkiLayout, write_dev_pki
from dkv.storage import Engine, Identity
from dkv.v1 import kv_pb2
from dkv.v1 import raft_pb2 as pb

NODES = (1, 2, 3)


def test_three_hosts_replicate_over_the_peer_transport_with_mtls(tmp_path: Path) -> None:
    pki = PkiLayout(tmp_path / "pki")
    write_dev_pki(pki.directory, [("node", f"n{n}") for n in NODES])

    async def scenario() -> None:
        listeners: dict[int, PeerListener] = {}
        ports: dict[int, int] = {}
        for n in NODES:
            tls = TlsFiles(str(pki.cert(f"n{n}")), str(pki.key(f"n{n}")), str(pki.ca_cert))
            listeners[n] = PeerListener("c1", tls=tls)
            ports[n] = await listeners[n].listen("127.0.0.1:0")
        addrs = {n: f"localhost:{ports[n]}" for n in NODES}
        hosts: dict[int, Host] = {}
        engines: dict[int, Engine] = {}
        shards: dict[int, KvShard] = {}
        for n in NODES:
            tls = TlsFiles(str(pki.cert(f"n{n}")), str(pki.key(f"n{n}")), str(pki.ca_cert))
            transport = PeerTransport(n, "c1", addrs, tls=tls, listener=listeners[n])
            engines[n] = Engine.open(tmp_path / f"n{n}", Identity("c1", f"n{n}"), create=True)
            hosts[n] = Host(
                HostConfig(node_id=n, tick_interval_ms=10), engines[n], transport, random.Random(n)
            )
            shards[n] = KvShard(engines[n], 1, n)
            hosts[n].add_group(1, shards[n], ConfState.of(NODES))
        for h in hosts.values():
            await h.start()
        try:

            def leader() -> int:
                ls = [n for n, h in hosts.items() if h.groups[1].node.status().role is Role.LEADER]
                return ls[0] if len(ls) == 1 else 0

            await hosts[1].wait_for(lambda: leader() != 0, 20)
            lead = hosts[leader()]
            cmds = [
                kv_pb2.KvCommand(
                    request_id=f"r{i}", put=kv_pb2.PutRequest(key=b"k%d" % i, value=b"v")
                )
                for i in range(50)
            ]
            res = await asyncio.gather(*(lead.propose(1, c.SerializeToString(), 10) for c in cmds))
            assert all(r.succeeded for r in res)
            # Every replica applies everything: wait for it as an event, then compare.
            last = lead.groups[1].storage.applied_index
            for n in NODES:
                await hosts[n].wait_for(
                    lambda n=n: hosts[n].groups[1].storage.applied_index >= last, 20
                )
                got = shards[n].kv.range(kv_pb2.RangeRequest(prefix=b"k", count_only=True))
                assert got.count == 50

            # A peer without a client certificate gets nothing in: TLS itself refuses it (an
            # alert or a closed connection, never a frame), and its heartbeat is not stepped.
            forged = encode_batch(
                "c1", 2, [(1, Message(MessageType.HEARTBEAT, to=1, frm=2, term=98))]
            )
            no_cert = (
                PREAMBLE
                + frame(Kind.HELLO, pb.PeerHello(cluster_id="c1", from_node=2).SerializeToString())
                + frame(Kind.BATCH, forged.SerializeToString())
            )
            try:
                answered = await _exchange(ports[1], _client_ctx(None), no_cert)
            except (ssl.SSLError, ConnectionError):
                answered = None
            assert answered is None

            # A peer of another cluster (right CA, wrong cluster id) is refused, never stepped.
            bogus = encode_batch(
                "other", 2, [(1, Message(MessageType.HEARTBEAT, to=1, frm=2, term=99))]
            )
            hello = pb.PeerHello(cluster_id="c1", from_node=2)
            got = await _exchange(
                ports[1],
                _client_ctx((pki.cert("n2"), pki.key("n2"), pki.ca_cert)),
                PREAMBLE
                + frame(Kind.HELLO, hello.SerializeToString())
                + frame(Kind.BATCH, bogus.SerializeToString()),
            )
            assert got is not None and got.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert "cluster 'other'" in got.message
            assert hosts[1].groups[1].node.status().term < 98
        finally:
            for h in hosts.values():
                await h.stop()
            for e in engines.values():
                e.close()

    asyncio.run(scenario())


def _client_ctx(files: tuple[Path, Path, Path] | None) -> ssl.SSLContext:
    """A client context; without files it presents no certificate (and trusts anything)."""
    if files is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    cert, key, ca = files
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def _exchange(port: int, ctx: ssl.SSLContext | None, data: bytes) -> pb.PeerRefusal | None:
    """Speak the peer protocol by hand (TLS with ``ctx``): write ``data``, then read until the
    listener closes; its refusal, or None."""
    host = "localhost" if ctx is not None else "127.0.0.1"
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ctx, server_hostname=host if ctx is not None else None
    )
    try:
        writer.write(data)
        buf = FrameBuffer(1 << 20)
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            for kind, payload in buf.feed(chunk):
                if kind is Kind.REFUSAL:
                    return pb.PeerRefusal.FromString(payload)
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


HEARTBEAT = Message(MessageType.HEARTBEAT, to=1, frm=2, term=1)


def test_the_listener_refuses_what_is_not_its_protocol_and_frames_over_its_limit() -> None:
    async def scenario() -> None:
        listener = PeerListener("c1", frame_bytes_max=1024)
        delivered: list[int] = []
        listener.deliver = lambda: lambda frm, pairs: delivered.append(frm)
        port = await listener.listen("127.0.0.1:0")
        try:
            # A gRPC (HTTP/2) client at the peer port: told, in one line, and closed.
            got = await _exchange(port, None, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            assert got is not None and got.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "not a dkv peer connection" in got.message
            # A batch before the hello.
            batch = encode_batch("c1", 2, [(1, HEARTBEAT)]).SerializeToString()
            got = await _exchange(port, None, PREAMBLE + frame(Kind.BATCH, batch))
            assert got is not None and "first frame must be a hello" in got.message
            # A frame over the limit is refused before it is buffered.
            hello = frame(
                Kind.HELLO, pb.PeerHello(cluster_id="c1", from_node=2).SerializeToString()
            )
            got = await _exchange(port, None, PREAMBLE + hello + frame(Kind.BATCH, b"x" * 2000))
            assert got is not None and got.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "2000 bytes is over this port's limit of 1024" in got.message
            # A batch that does not decode.
            got = await _exchange(port, None, PREAMBLE + hello + frame(Kind.BATCH, b"\xff\xff"))
            assert got is not None and got.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert delivered == []
            assert listener.refusals == 4
        finally:
            await listener.close()

    asyncio.run(scenario())


def test_a_peer_that_does_not_read_costs_a_bounded_buffer_then_drops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A receiver that accepts and never reads (stuck, or its loop blocked): batches are
    dropped and counted once the connection holds WRITE_BUFFER_BYTES_MAX, never queued
    without bound."""
    monkeypatch.setattr(peer_transport, "WRITE_BUFFER_BYTES_MAX", 256 << 10)

    async def scenario() -> None:
        stuck: list[asyncio.StreamWriter] = []

        async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.transport.pause_reading()
            stuck.append(w)

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sender = PeerTransport(2, "c1", {1: f"127.0.0.1:{port}"})
        big = Message(MessageType.APP, to=1, frm=2, term=1, context=b"x" * (64 << 10))
        try:
            sender.send(1, [(1, big)])
            while not stuck:  # connected (accept ran)
                await asyncio.sleep(0.01)
            for _ in range(2000):  # ~128 MB offered
                sender.send(1, [(1, big)])
                await asyncio.sleep(0)
            assert sender.dropped_batches > 1000
            conn = sender._peers[1].conn
            assert conn is not None and conn.transport is not None
            assert conn.transport.get_write_buffer_size() < (256 << 10) + (128 << 10)
        finally:
            await sender.close()
            for w in stuck:
                w.close()
            server.close()

    asyncio.run(scenario())


def test_an_unreachable_peer_is_reported_and_reached_once_it_listens() -> None:
    async def scenario() -> None:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()  # nothing listens on port now
        sender = PeerTransport(2, "c1", {1: f"127.0.0.1:{port}"}, rng=random.Random(1))
        unreachable = asyncio.Event()
        sender.on_unreachable = lambda node_id: unreachable.set()
        receiver = PeerTransport(1, "c1", {})
        got = asyncio.Event()
        receiver.set_delivery(lambda frm, pairs: got.set())
        try:
            sender.send(1, [(1, HEARTBEAT)])
            await asyncio.wait_for(unreachable.wait(), 10)
            assert sender.dropped_batches >= 1  # what was queued for it is stale: dropped
            await receiver.listener.listen(f"127.0.0.1:{port}")

            # The sender keeps trying (with backoff) and gets through once the peer listens;
            # like a leader, it keeps sending heartbeats meanwhile.
            async def heartbeats() -> None:
                while True:
                    sender.send(1, [(1, HEARTBEAT)])
                    await asyncio.sleep(0.05)

            beating = asyncio.get_running_loop().create_task(heartbeats())
            try:
                await asyncio.wait_for(got.wait(), 20)
            finally:
                beating.cancel()
        finally:
            await sender.close()
            await receiver.close()

    asyncio.run(scenario())
