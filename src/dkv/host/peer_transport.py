"""The real peer transport: one long-lived TLS connection per peer, framed, on asyncio.

Why not gRPC: Raft batches between two nodes are one ordered stream that needs no RPC
semantics, and a grpc.aio stream write cost the leader ~20% of its CPU (issue 12's profile:
each write is a coroutine, a completion-queue round trip and a copy into gRPC core). Here a
send encodes the batch once and writes it to the connection's TLS transport there and then:
no queue hop, no task switch. Frames and their meaning: :mod:`dkv.host.peer_wire`.

**Sending** (:class:`PeerTransport`): per peer, at most one live connection. While it
connects, batches wait in a bounded queue; once connected they go straight to the socket, and
a batch is dropped (and counted) when the connection already holds more than
:data:`WRITE_BUFFER_BYTES_MAX` unsent bytes -- a slow peer costs us memory up to that bound,
then Raft retries what matters. When a connection breaks, what was queued is dropped (stale
by the reconnect), the host is told the peer is unreachable (its leaders fall back to
probing), and a reconnect waits with jittered exponential backoff, cut short when the peer
opens a connection to us. When the TLS files change (:class:`~dkv.security.tls_reload.SslContexts`)
the next send rolls over onto a new connection and ends the old one with an ``END`` frame: no
batch is dropped. Dead peers (no RST, e.g. a partition) are found by the kernel: TCP
keepalive and ``TCP_USER_TIMEOUT`` close a connection whose data stays unacknowledged.

**Receiving** (:class:`PeerListener`): accepts connections and upgrades each to TLS with a
context of the current files (new certificates and CA bundles apply to new connections
without a restart). The access rules of the port (:mod:`dkv.security.access`, the same
:class:`~dkv.security.access.Access` as on gRPC ports, so denials are logged and counted
alike) decide who may speak: the verified certificate names the caller. The hello must come
from this cluster and from the member the certificate names, and so must every batch and
message (a node must not speak for another: a forged vote or append would be believed). A
refusal is a ``REFUSAL`` frame with a gRPC status code and a reason, then the connection
closes.

**Hello**: a connection opens with what the sender chose to say about itself (the node's id,
name, peer and client address); the receiver hands it to ``on_hello``. That is how members
learn each other's addresses without a separate discovery protocol.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import grpc

from dkv.errors import InvalidArgument
from dkv.host.channels import TlsFiles
from dkv.host.members import member_id
from dkv.host.peer_wire import (
    ACK_EVERY,
    PREAMBLE,
    FrameBuffer,
    FrameTooLarge,
    Kind,
    decode_batch,
    encode_batch,
    frame,
)
from dkv.host.transport import Delivery
from dkv.limited_log import RateLimitedLog
from dkv.raft import Message
from dkv.security import tls_reload
from dkv.security.access import Access
from dkv.security.identity import Identity
from dkv.sizes import PEER_MESSAGE_LIMITS
from dkv.telemetry.peer_metrics import PeerMetrics
from dkv.v1 import raft_pb2 as pb

__all__ = ["PEER_METHOD", "PeerListener", "PeerTransport", "Refused", "split_address"]

log = logging.getLogger("dkv.host.transport")

PEER_METHOD = "/dkv.v1.RaftPeer/Stream"
"""The name the access rules know the peer port's only operation by (dkv.security.rules)."""

WRITE_BUFFER_BYTES_MAX = 32 << 20
"""Unsent bytes a connection may hold before batches to that peer are dropped: a few
snapshot chunks' worth, far more than a healthy peer ever lets pile up."""
CONNECT_TIMEOUT_S = 5.0
HANDSHAKE_TIMEOUT_S = 10.0
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
USER_TIMEOUT_MS = 15_000
"""TCP_USER_TIMEOUT: a connection whose sent data stays unacknowledged this long is closed by
the kernel (a peer that vanished without a reset); keepalive probes find it when idle."""
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 5, 2, 3
REFUSAL_LOG_INTERVAL_S = 1.0
CLOSE_GRACE_S = 2.0


class Refused(Exception):
    """A receiver's reason to close a connection: a gRPC status code and a message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port); InvalidArgument when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def _tune(transport: asyncio.BaseTransport) -> None:
    """No Nagle delay (a heartbeat must not wait for the next write), and dead-peer detection
    by the kernel (see USER_TIMEOUT_MS)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


# -- receiving ---------------------------------------------------------------------------------


class _CallContext:
    """What :meth:`Access.check` reads of a gRPC call, for a peer connection: the verified
    certificate, the hello as metadata, and abort as :class:`Refused`."""

    def __init__(self, peercert: dict[str, Any] | None, peer: str) -> None:
        self._peercert = peercert
        self._peer = peer

    def auth_context(self) -> dict[str, list[str]]:
        if not self._peercert:
            return {}
        sans = [v for k, v in self._peercert.get("subjectAltName", ()) if k == "URI"]
        cns = [v for rdn in self._peercert.get("subject", ()) for k, v in rdn if k == "commonName"]
        return {"x509_subject_alternative_name": sans, "x509_common_name": cns}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Refused(code, details)


class _Inbound(asyncio.Protocol):
    """One connection a peer opened to us."""

    def __init__(self, listener: PeerListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.frames = FrameBuffer(listener.frame_bytes_max, PREAMBLE)
        self.who: Identity | None = None
        self.sender = 0  # the member id the certificate allows (0: not checked, no TLS)
        self.hello_seen = False
        self.received = 0
        self.ready = False  # TLS done and the caller allowed: frames may be read
        self.peer = "?"
        self.task: asyncio.Task[None] | None = None
        self.early = bytearray()  # received before the caller was checked
        self.refused = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance check)
        self.transport = transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"
        _tune(transport)
        self.listener._inbound.add(self)
        if self.listener.closing:
            transport.close()
            return
        self.task = asyncio.get_running_loop().create_task(self._accept(transport))

    async def _accept(self, transport: asyncio.Transport) -> None:
        """Check the caller (the TLS handshake is done: the listener's context made it)."""
        listener = self.listener
        obj = transport.get_extra_info("ssl_object")
        peercert: dict[str, Any] | None = obj.getpeercert() if obj is not None else None
        try:
            if listener.access is not None:
                self.who = await listener.access.check(
                    PEER_METHOD, None, _CallContext(peercert, self.peer)
                )
                if self.who is not None and self.who.name:
                    self.sender = member_id(listener.cluster_id, self.who.name)
        except Refused as exc:
            self.refuse(exc)
            return
        self.ready = True
        early, self.early = self.early, bytearray()
        if early:
            self.data_received(bytes(early))

    def data_received(self, data: bytes) -> None:
        if not self.ready:
            # What the sender wrote right after its handshake arrives before _accept has
            # looked at the certificate: keep it (bounded) until then.
            if self.task is not None and not self.task.done() and not self.refused:
                if len(self.early) + len(data) > self.listener.frame_bytes_max:
                    assert self.transport is not None
                    self.transport.abort()
                    return
                self.early += data
            return
        try:
            for kind, payload in self.frames.feed(data):
                self._frame(kind, payload)
        except Refused as exc:
            self.refuse(exc)
        except FrameTooLarge as exc:
            self.refuse(Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)))
        except InvalidArgument as exc:
            self.refuse(Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))

    def _frame(self, kind: Kind, payload: bytes) -> None:
        listener = self.listener
        if kind is Kind.END:
            self.ready = False
            assert self.transport is not None
            self.transport.close()  # the sender rolled over: everything before END was read
            return
        if not self.hello_seen:
            if kind is not Kind.HELLO:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be a hello")
            self._hello(pb.PeerHello.FromString(payload))
            return
        if kind is not Kind.BATCH:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind.name} frame")
        try:
            req = pb.MessageBatch.FromString(payload)
            pairs = decode_batch(req)
        except InvalidArgument:
            raise
        except Exception as exc:  # protobuf's DecodeError and friends
            raise InvalidArgument(f"a batch does not decode: {exc}") from None
        if req.cluster_id != listener.cluster_id:
            listener.refused_batches += 1
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"peer from cluster {req.cluster_id!r} talked to cluster {listener.cluster_id!r}",
            )
        sender = self.sender
        if sender and (req.from_node != sender or any(m.frm != sender for _, m in pairs)):
            listener.refused_batches += 1
            assert self.who is not None
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{self.who.subject} (member {self.sender:x}) sent a batch as member "
                f"{req.from_node:x}: a peer speaks only for itself",
            )
        deliver = listener.deliver()
        if deliver is not None:
            deliver(req.from_node, pairs)
        self.received += 1
        if self.received % ACK_EVERY == 0:
            assert self.transport is not None
            ack = pb.StreamAck(batches=self.received).SerializeToString()
            self.transport.write(frame(Kind.ACK, ack))

    def _hello(self, hello: pb.PeerHello) -> None:
        listener = self.listener
        if hello.cluster_id != listener.cluster_id:
            listener.refused_batches += 1
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"peer from cluster {hello.cluster_id!r} talked to cluster {listener.cluster_id!r}",
            )
        if self.sender and hello.from_node != self.sender:
            assert self.who is not None
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{self.who.subject} (member {self.sender:x}) said hello as member "
                f"{hello.from_node:x}: a peer speaks only for itself",
            )
        self.hello_seen = True
        meta = dict(hello.metadata)
        if meta and listener.on_hello is not None:
            listener.on_hello(meta)
        if listener.on_peer_stream is not None and hello.from_node:
            listener.on_peer_stream(hello.from_node)

    def refuse(self, exc: Refused) -> None:
        """Say why, then close (what was written is flushed first)."""
        self.ready = False
        self.refused = True
        self.early.clear()
        self.listener.refusals += 1
        self.listener._refusal_log.warning(
            "%s: refused %s (%s): %s", self.listener.name, self.peer, self.who or "no identity", exc
        )
        if self.transport is not None and not self.transport.is_closing():
            body = pb.PeerRefusal(code=exc.code.value[0], message=exc.message)
            self.transport.write(frame(Kind.REFUSAL, body.SerializeToString()))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ready = False
        self.listener._inbound.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)


class PeerListener:
    """The receiving side: a listening socket whose connections deliver batches to the host
    (see the module docstring)."""

    def __init__(
        self,
        cluster_id: str,
        *,
        tls: TlsFiles | None = None,
        access: Access | None = None,
        name: str = "the peer port",
        frame_bytes_max: int = PEER_MESSAGE_LIMITS.request_bytes_max,
        check_interval_ms: int = tls_reload.CHECK_INTERVAL_MS,
    ) -> None:
        self.cluster_id = cluster_id
        self.access = access
        self.name = name
        self.frame_bytes_max = frame_bytes_max
        # Bad files at start refuse to start (InvalidArgument from the watcher).
        self.contexts = (
            None
            if tls is None
            else tls_reload.SslContexts(tls, check_interval_ms=check_interval_ms, user=name)
        )
        self.deliver: Callable[[], Delivery | None] = lambda: None
        self.on_hello: Callable[[dict[str, str]], None] | None = None
        # Told the member id of every peer that says hello (so we reconnect to it now).
        self.on_peer_stream: Callable[[int], None] | None = None
        self.refused_batches = 0
        self.refusals = 0
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._inbound: set[_Inbound] = set()
        self._refusal_log = RateLimitedLog(log, REFUSAL_LOG_INTERVAL_S)

    async def listen(self, address: str) -> int:
        """Listen on ``address``; returns the port (useful with port 0). InvalidArgument when
        it cannot (in use, not an address)."""
        host, port = split_address(address)
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _Inbound(self),
                host or None,
                port,
                reuse_address=True,
                ssl=self._front_context(),
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if self.contexts is not None else None,
            )
        except OSError as exc:
            raise InvalidArgument(f"cannot listen on {address}: {exc.strerror or exc}") from exc
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    def _front_context(self) -> ssl.SSLContext | None:
        """The context the listening socket hands every handshake. Its server-name callback,
        which OpenSSL runs early in every handshake (with or without SNI), swaps in the
        context of the current files: their certificate is presented and the client's is
        verified against their CA bundle -- new files apply to new connections, no restart.
        (Failed handshakes -- no certificate, another CA's, expired -- never reach
        :class:`_Inbound`: TLS itself refused them, with an alert.)"""
        contexts = self.contexts
        if contexts is None:
            return None
        front = tls_reload.ssl_context(contexts.watcher.current(), server_side=True)

        def swap(obj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            try:
                obj.context = contexts.current(server_side=True)[1]
            except Exception:  # never fail a handshake over a watcher problem
                log.exception("%s: TLS watcher failed", self.name)

        front.sni_callback = swap
        return front

    @property
    def connections(self) -> int:
        return len(self._inbound)

    async def close(self) -> None:
        """Stop accepting and close every connection peers opened to us (they reconnect
        elsewhere or later)."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        inbound = list(self._inbound)
        for conn in inbound:
            if conn.task is not None:
                conn.task.cancel()
            if conn.transport is not None:
                conn.transport.close()
        await _closed(inbound)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None


async def _closed(conns: Sequence[_Inbound | _Outbound]) -> None:
    """Wait, bounded, until ``conns`` (being closed) are gone: a TLS close takes a few loop
    passes, and a loop that ends first leaves their sockets to the garbage collector (a
    ResourceWarning). What is still open after the bound is aborted."""
    pending = [c for c in conns if not _lost(c).done()]
    if not pending:
        return
    _, late = await asyncio.wait([_lost(c) for c in pending], timeout=CLOSE_GRACE_S)
    for c in pending:
        if _lost(c) in late and c.transport is not None:
            c.transport.abort()


def _lost(conn: _Inbound | _Outbound) -> asyncio.Future[None]:
    return conn.lost if isinstance(conn, _Inbound) else conn.closed


# -- sending -----------------------------------------------------------------------------------


class _Outbound(asyncio.Protocol):
    """One connection we opened to a peer."""

    def __init__(self, owner: PeerTransport, peer: _Peer) -> None:
        self.owner = owner
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.frames = FrameBuffer(1 << 20)
        self.written = 0
        # Write times of the batches an ack will count (every ACK_EVERY-th), bounded.
        self.timed: collections.deque[tuple[int, float]] = collections.deque(maxlen=64)
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.refusal: pb.PeerRefusal | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def write_batch(self, data: bytes) -> bool:
        """Write one framed batch now; False when the connection holds too much already."""
        t = self.transport
        if t is None or t.is_closing() or t.get_write_buffer_size() > WRITE_BUFFER_BYTES_MAX:
            return False
        t.write(data)
        self.written += 1
        if self.written % ACK_EVERY == 0 and self.owner.metrics is not None:
            self.timed.append((self.written, time.perf_counter()))
        return True

    def data_received(self, data: bytes) -> None:
        try:
            for kind, payload in self.frames.feed(data):
                if kind is Kind.ACK:
                    self._ack(pb.StreamAck.FromString(payload).batches)
                elif kind is Kind.REFUSAL:
                    self.refusal = pb.PeerRefusal.FromString(payload)
        except Exception as exc:  # garbage from the peer: drop the connection, reconnect
            log.debug("peer %d: bad frame: %r", self.peer.node_id, exc)
            if self.transport is not None:
                self.transport.abort()

    def _ack(self, batches: int) -> None:
        metrics = self.owner.metrics
        if metrics is None:
            return
        rtt = metrics.peer(self.peer.node_id)[1]
        # Acks are cumulative and in order: the one counting batch n answers its write.
        while self.timed and self.timed[0][0] <= batches:
            n, t0 = self.timed.popleft()
            if n == batches:
                rtt.observe(time.perf_counter() - t0)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Peer:
    def __init__(self, node_id: int, address: str, queue_batches_max: int) -> None:
        self.node_id = node_id
        self.address = address
        # Batches written while no connection is up yet (bounded; dropped if it fails).
        self.pending: collections.deque[bytes] = collections.deque()
        self.queue_batches_max = queue_batches_max
        self.conn: _Outbound | None = None
        self.generation = 0  # of the TLS files the connection was made with
        self.task: asyncio.Task[None] | None = None
        # Set when the peer said hello to us: it is up, so cut our backoff short.
        self.alive = asyncio.Event()


class PeerTransport:
    """The sending side and its :class:`PeerListener` (see the module docstring)."""

    def __init__(
        self,
        node_id: int,
        cluster_id: str,
        peers: dict[int, str],
        tls: TlsFiles | None = None,
        queue_batches_max: int = 1024,
        on_unreachable: Callable[[int], None] | None = None,
        rng: random.Random | None = None,
        hello: Sequence[tuple[str, str]] = (),
        check_interval_ms: int = tls_reload.CHECK_INTERVAL_MS,
        listener: PeerListener | None = None,
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.queue_batches_max = queue_batches_max
        self.on_unreachable = on_unreachable
        self.rng = rng or random.Random()
        self.hello = tuple(hello)
        # Contexts that follow the files; bad files at start refuse to start.
        self._contexts = (
            None
            if tls is None
            else tls_reload.SslContexts(
                tls, check_interval_ms=check_interval_ms, user="Raft peer connections"
            )
        )
        self.listener = listener or PeerListener(
            cluster_id, tls=tls, check_interval_ms=check_interval_ms
        )
        self.listener.deliver = lambda: self._deliver
        self.listener.on_peer_stream = self._peer_said_hello
        self._deliver: Delivery | None = None
        self._peers: dict[int, _Peer] = {}
        self._closed = False
        # Connections replaced by a rotation, ending in the background (bounded).
        self._retiring: set[asyncio.Task[None]] = set()
        self.rollovers = 0
        self.dropped_batches = 0
        # dkv_network_peer_* (set by the process, as Host.disk_metrics); None: not measured.
        self.metrics: PeerMetrics | None = None
        self._refusal_log = RateLimitedLog(log, REFUSAL_LOG_INTERVAL_S)
        for nid, addr in peers.items():
            self.set_peer(nid, addr)

    # -- membership of the peer set ------------------------------------------------------------

    def set_delivery(self, deliver: Delivery) -> None:
        self._deliver = deliver

    def set_peer(self, node_id: int, address: str) -> None:
        """Add a peer or change its address (membership changes)."""
        if node_id == self.node_id:
            return
        old = self._peers.get(node_id)
        if old is not None:
            if old.address == address:
                return
            self._stop_peer(old)
        self._peers[node_id] = _Peer(node_id, address, self.queue_batches_max)

    def remove_peer(self, node_id: int) -> None:
        """Stop talking to a member that left."""
        old = self._peers.pop(node_id, None)
        if old is not None:
            self._stop_peer(old)
        if self.metrics is not None:
            self.metrics.forget(node_id)

    def peer_address(self, node_id: int) -> str | None:
        p = self._peers.get(node_id)
        return p.address if p is not None else None

    def _stop_peer(self, peer: _Peer) -> None:
        if peer.task is not None:
            peer.task.cancel()
        if peer.conn is not None and peer.conn.transport is not None:
            peer.conn.transport.close()
        peer.conn = None

    def _peer_said_hello(self, node_id: int) -> None:
        peer = self._peers.get(node_id)
        if peer is not None and peer.conn is None:
            peer.alive.set()

    # -- sending -------------------------------------------------------------------------------

    def _drop(self, to: int, batches: int = 1) -> None:
        self.dropped_batches += batches
        if self.metrics is not None and batches:
            self.metrics.failed(to, batches)

    def send(self, to: int, batch: Sequence[tuple[int, Message]]) -> None:
        peer = self._peers.get(to)
        if peer is None or self._closed:  # closed: no new connection may outlive close()
            self.dropped_batches += 1
            if self.metrics is not None and peer is not None:
                self.metrics.failed(to)
            return
        data = frame(
            Kind.BATCH, encode_batch(self.cluster_id, self.node_id, batch).SerializeToString()
        )
        conn = peer.conn
        contexts = self._contexts
        if conn is not None and contexts is not None and contexts.generation() != peer.generation:
            # New certificate files: go on on a new connection (new handshake, new
            # credentials); the old one ends cleanly after what it was given.
            self._retire(peer, conn)
            conn = None
        if conn is not None:
            if not conn.write_batch(data):
                self._drop(to)  # the peer is slower than we produce (Raft retransmits)
            return
        if len(peer.pending) >= peer.queue_batches_max:
            self._drop(to)
        else:
            peer.pending.append(data)
        if peer.task is None or peer.task.done():
            peer.task = asyncio.get_running_loop().create_task(self._run_peer(peer))

    def _retire(self, peer: _Peer, conn: _Outbound) -> None:
        """Move ``conn`` aside to end in the background; the next send connects anew. Its
        task returns once it closes (it is no longer the peer's connection)."""
        peer.conn = None
        self.rollovers += 1
        loop = asyncio.get_running_loop()
        for task in (loop.create_task(self._end(peer.node_id, conn)), peer.task):
            if task is not None:
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
        peer.task = None

    async def _end(self, node_id: int, conn: _Outbound) -> None:
        """End a connection replaced by a rotation: ``END`` (the peer reads every batch
        before it, then closes), wait for that, bounded by the grace, then close."""
        t = conn.transport
        try:
            if t is not None and not t.is_closing():
                t.write(frame(Kind.END))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(conn.closed), tls_reload.RETIRE_GRACE_S)
        finally:
            if t is not None:
                t.abort() if not conn.closed.done() else t.close()
            log.debug("connection to peer %d rolled over onto new credentials", node_id)

    async def _connect(self, peer: _Peer) -> _Outbound:
        host, port = split_address(peer.address)
        ctx: ssl.SSLContext | None = None
        generation = 0
        if self._contexts is not None:
            generation, ctx = self._contexts.current(server_side=False)
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                lambda: _Outbound(self, peer),
                host,
                port,
                ssl=ctx,
                server_hostname=host if ctx is not None else None,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if ctx is not None else None,
            ),
            CONNECT_TIMEOUT_S + HANDSHAKE_TIMEOUT_S,
        )
        assert conn.transport is not None
        _tune(conn.transport)
        hello = pb.PeerHello(cluster_id=self.cluster_id, from_node=self.node_id)
        hello.metadata.update(dict(self.hello))
        conn.transport.write(PREAMBLE + frame(Kind.HELLO, hello.SerializeToString()))
        peer.generation = generation
        return conn

    async def _run_peer(self, peer: _Peer) -> None:
        backoff_s = BACKOFF_FIRST_S
        while not self._closed:
            conn: _Outbound | None = None
            try:
                conn = await self._connect(peer)
                peer.conn = conn
                backoff_s = BACKOFF_FIRST_S
                while peer.pending:
                    if not conn.write_batch(peer.pending.popleft()):
                        self._drop(peer.node_id)
                await asyncio.shield(conn.closed)
            except (OSError, ssl.SSLError, TimeoutError, InvalidArgument) as exc:
                log.debug("peer %d at %s: %r", peer.node_id, peer.address, exc)
            except asyncio.CancelledError:
                if conn is not None and conn.transport is not None:
                    conn.transport.abort()
                raise
            if conn is not None and conn.refusal is not None:
                r = conn.refusal
                code = next((c.name for c in grpc.StatusCode if c.value[0] == r.code), r.code)
                self._refusal_log.warning(
                    "peer %d at %s refused us: %s: %s", peer.node_id, peer.address, code, r.message
                )
            if conn is not None and peer.conn is not conn:
                return  # retired by a rotation: a new task runs the new connection
            peer.conn = None
            # Whatever was queued is stale by the time we reconnect: drop it, tell Raft.
            stale = len(peer.pending)
            peer.pending.clear()
            self._drop(peer.node_id, stale)
            if self.on_unreachable is not None:
                self.on_unreachable(peer.node_id)
            # Back off (jittered, exponential), unless the peer shows it is up meanwhile.
            peer.alive.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer.alive.wait(), backoff_s * (0.5 + self.rng.random()))
            backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)

    async def close(self) -> None:
        """Stop sending, and close the connections peers opened to us."""
        self._closed = True
        tasks = [p.task for p in self._peers.values() if p.task is not None]
        tasks += self._retiring
        for t in tasks:
            t.cancel()
        outbound = [p.conn for p in self._peers.values() if p.conn is not None]
        for conn in outbound:
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _closed(outbound)
        await self.listener.close()
