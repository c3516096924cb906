"""The real peer transport: one long-lived gRPC bidirectional stream per peer, mTLS optional.

Sending side: each peer has a bounded queue of batches drained by a task that keeps one
``RaftPeer.Stream`` call open and writes batches in order. While the peer is unreachable the
queue is emptied (Raft retries what matters) and the host is told, so its leaders fall back to
probing. A reconnect waits with jittered exponential backoff.

Receiving side: :class:`RaftPeerService` accepts streams, refuses batches of another cluster,
decodes them and hands them to the host. Errors from grpc are translated here.

Hello: a stream opens with metadata the sender chose (``hello``: for the node, its id, name,
peer and client address); the receiver hands it to ``on_hello``. That is how members learn
each other's addresses without a separate discovery protocol.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from dkv.errors import InvalidArgument
from dkv.host.channels import TlsFiles, client_channel
from dkv.host.members import member_id
from dkv.host.transport import Delivery
from dkv.raft import Message, codec
from dkv.security import tls_reload
from dkv.security.access import CALLER
from dkv.telemetry.peer_metrics import PeerMetrics
from dkv.v1 import raft_pb2 as pb

__all__ = [
    "GrpcTransport",
    "RaftPeerService",
    "TlsFiles",
    "add_raft_peer_service",
    "bind",
    "finish_pending_tasks",
    "with_port",
]

log = logging.getLogger("dkv.host.transport")

_METHOD = "/dkv.v1.RaftPeer/Stream"
ACK_EVERY = 16
"""The receiver acks every this many batches (cumulative): cheap in the reverse direction,
and what the sender times its round trips on."""


def encode(
    cluster_id: str, from_node: int, batch: Sequence[tuple[int, Message]]
) -> pb.MessageBatch:
    out = pb.MessageBatch(from_node=from_node, cluster_id=cluster_id)
    for group_id, m in batch:
        out.group_ids.append(group_id)
        out.messages.append(codec.message_to_proto(m))
    return out


def decode(req: pb.MessageBatch) -> list[tuple[int, Message]]:
    if len(req.group_ids) != len(req.messages):
        raise InvalidArgument(
            f"batch has {len(req.messages)} messages but {len(req.group_ids)} group ids"
        )
    return [
        (g, codec.message_from_proto(m)) for g, m in zip(req.group_ids, req.messages, strict=True)
    ]


class RaftPeerService:
    """Server side of ``dkv.v1.RaftPeer``."""

    def __init__(self, cluster_id: str, deliver: Callable[[], Delivery | None]) -> None:
        self.cluster_id = cluster_id
        self._deliver = deliver
        self.refused_batches = 0
        self.on_hello: Callable[[dict[str, str]], None] | None = None
        # Told the member id of every peer that opens a stream (so we reconnect to it now).
        self.on_peer_stream: Callable[[int], None] | None = None
        # The task serving each open stream, so that close() can end them (see there).
        self._streams: set[asyncio.Task[object]] = set()
        self._closing = False

    async def stream(
        self,
        requests: AsyncIterator[pb.MessageBatch],
        context: grpc.aio.ServicerContext[pb.MessageBatch, pb.StreamAck],
    ) -> AsyncIterator[pb.StreamAck]:
        if self.closing():
            return  # stopping: end at once (OK), the peer retries elsewhere or later
        received = 0
        hello = {
            k: v
            for k, v in (context.invocation_metadata() or ())
            if k.startswith("dkv-") and isinstance(v, str)
        }
        if hello and self.on_hello is not None:
            self.on_hello(hello)
        if self.on_peer_stream is not None and hello.get("dkv-member-id", "").isdigit():
            self.on_peer_stream(int(hello["dkv-member-id"]))
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        # With mTLS the access rules let only our own kind of component in; its certificate
        # names it, and so fixes the member id its batches and messages may claim (a node
        # must not speak for another: a forged vote or append would be believed).
        who = CALLER.get()
        sender = member_id(self.cluster_id, who.name) if who is not None and who.name else 0
        try:
            async for req in requests:
                received += 1
                if req.cluster_id != self.cluster_id:
                    self.refused_batches += 1
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"peer from cluster {req.cluster_id!r} talked to cluster "
                        f"{self.cluster_id!r}",
                    )
                try:
                    pairs = decode(req)
                except InvalidArgument as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                if sender and (req.from_node != sender or any(m.frm != sender for _, m in pairs)):
                    self.refused_batches += 1
                    assert who is not None
                    await context.abort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"{who.subject} (member {sender:x}) sent a batch as member "
                        f"{req.from_node:x}: a peer speaks only for itself",
                    )
                deliver = self._deliver()
                if deliver is not None:
                    deliver(req.from_node, pairs)
                # Cumulative acks let a sender bound what it has in flight; one every 16
                # batches keeps the reverse direction cheap.
                if received % ACK_EVERY == 0:
                    yield pb.StreamAck(batches=received)
        except asyncio.CancelledError:
            if not self.closing():
                raise  # the peer went away (grpc cancels the call): nothing to answer
            task.uncancel()  # close() ended it: a normal end of stream, not an error
        finally:
            self._streams.discard(task)

    def closing(self) -> bool:
        """Whether :meth:`close` was called (streams are ended, new ones refused)."""
        return self._closing

    async def close(self) -> None:
        """End every open stream (OK) and refuse new ones; call before the server stops.

        A stream still open when ``grpc.aio.Server.stop()`` runs is cancelled by it, and grpc
        logs what it finds of that call after the server stopped: "Aborting method
        [/dkv.v1.RaftPeer/Stream] due to server stop" (WARNING) or a CancelledError traceback
        (ERROR), on every graceful stop. Ended here, the handlers are done while the server
        still runs."""
        self._closing = True
        streams = list(self._streams)
        for t in streams:
            t.cancel()
        if streams:
            # Bounded: a handler that does not end (never seen) is left to Server.stop().
            await asyncio.wait(streams, timeout=5.0)


def add_raft_peer_service(server: grpc.aio.Server, service: RaftPeerService) -> None:
    handler = grpc.stream_stream_rpc_method_handler(
        service.stream,
        request_deserializer=pb.MessageBatch.FromString,
        response_serializer=pb.StreamAck.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("dkv.v1.RaftPeer", {"Stream": handler}),)
    )


class _Peer:
    def __init__(self, node_id: int, address: str, queue_batches_max: int) -> None:
        self.node_id = node_id
        self.address = address
        self.queue: asyncio.Queue[pb.MessageBatch] = asyncio.Queue(maxsize=queue_batches_max)
        self.task: asyncio.Task[None] | None = None
        self.connected = False
        # Set when the peer opened a stream to us: it is up, so cut our backoff short.
        self.alive = asyncio.Event()


class GrpcTransport:
    """Client side: see the module docstring. Also owns the receiving service's delivery hook."""

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
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.tls = tls
        # Credentials that follow the files: a stream opened before they changed is rolled
        # over onto a new channel (_run_peer). Bad files at start refuse to start.
        self._creds = (
            None
            if tls is None
            else tls_reload.ReloadingCredentials(
                tls, check_interval_ms=check_interval_ms, user="Raft peer streams"
            )
        )
        # Streams replaced by a rotation, ending in the background (bounded by their grace).
        self._retiring: set[asyncio.Task[None]] = set()
        self.rollovers = 0
        self.queue_batches_max = queue_batches_max
        self.on_unreachable = on_unreachable
        self.rng = rng or random.Random()
        self.hello = tuple(hello)
        self._peers: dict[int, _Peer] = {}
        self._deliver: Delivery | None = None
        self._closed = False
        self.dropped_batches = 0
        # dkv_network_peer_* (set by the process, as Host.disk_metrics); None: not measured.
        self.metrics: PeerMetrics | None = None
        self.service = RaftPeerService(cluster_id, lambda: self._deliver)
        self.service.on_peer_stream = self._peer_stream_opened
        for nid, addr in peers.items():
            self.set_peer(nid, addr)

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
            if old.task is not None:
                old.task.cancel()
        self._peers[node_id] = _Peer(node_id, address, self.queue_batches_max)

    def _peer_stream_opened(self, node_id: int) -> None:
        peer = self._peers.get(node_id)
        if peer is not None and not peer.connected:
            peer.alive.set()

    def remove_peer(self, node_id: int) -> None:
        """Stop talking to a member that left."""
        old = self._peers.pop(node_id, None)
        if old is not None and old.task is not None:
            old.task.cancel()
        if self.metrics is not None:
            self.metrics.forget(node_id)

    def peer_address(self, node_id: int) -> str | None:
        p = self._peers.get(node_id)
        return p.address if p is not None else None

    def send(self, to: int, batch: Sequence[tuple[int, Message]]) -> None:
        peer = self._peers.get(to)
        if peer is None or self._closed:  # closed: no new stream may outlive close()
            self.dropped_batches += 1
            if self.metrics is not None and peer is not None:
                self.metrics.failed(to)
            return
        if peer.task is None or peer.task.done():
            peer.task = asyncio.get_running_loop().create_task(self._run_peer(peer))
        try:
            peer.queue.put_nowait(encode(self.cluster_id, self.node_id, batch))
        except asyncio.QueueFull:
            # The peer is slower than we produce; dropping is safe (Raft retransmits).
            self.dropped_batches += 1
            if self.metrics is not None:
                self.metrics.failed(to)

    def _channel(self, address: str) -> tuple[int, grpc.aio.Channel]:
        """A new channel to ``address`` with the current credentials, and their generation.
        Built like every client channel of ours (dkv.host.channels.CHANNEL_OPTIONS): its
        keepalive is the one the peer server's SERVER_KEEPALIVE_OPTIONS accept."""
        if self._creds is None:
            return 0, client_channel(address, None)
        generation, creds = self._creds.current()
        return generation, client_channel(address, None, creds=creds)

    def _rotated(self, generation: int) -> bool:
        return self._creds is not None and self._creds.current()[0] != generation

    async def _run_peer(self, peer: _Peer) -> None:
        backoff_s = 0.05
        carry: pb.MessageBatch | None = None  # taken from the queue, not yet written
        while True:
            generation, channel = self._channel(peer.address)
            rotated = False
            reader: asyncio.Task[None] | None = None
            call: Any = None
            try:
                call = channel.stream_stream(
                    _METHOD,
                    request_serializer=pb.MessageBatch.SerializeToString,
                    response_deserializer=pb.StreamAck.FromString,
                )(metadata=self.hello or None)
                # Write times of the batches an ack will count (every ACK_EVERY-th), for
                # the round trip (dkv.telemetry.peer_metrics); bounded.
                timed: collections.deque[tuple[int, float]] = collections.deque(maxlen=64)
                rtt = self.metrics.peer(peer.node_id)[1] if self.metrics is not None else None
                reader = asyncio.get_running_loop().create_task(self._drain_acks(call, timed, rtt))
                written = 0
                try:
                    while True:
                        if carry is None:
                            carry = await peer.queue.get()
                        if self._rotated(generation):
                            # New certificate files: go on on a new channel (new handshake,
                            # new credentials) and let this stream end cleanly. The batch
                            # goes first on the new stream; nothing is dropped.
                            rotated = True
                            break
                        try:
                            await call.write(carry)
                        except BaseException:
                            if self.metrics is not None:
                                self.metrics.failed(peer.node_id)
                            raise
                        carry = None
                        written += 1
                        if rtt is not None and written % ACK_EVERY == 0:
                            timed.append((written, time.perf_counter()))
                        if not peer.connected:
                            peer.connected = True
                            backoff_s = 0.05
                finally:
                    if not rotated:
                        reader.cancel()
            except asyncio.CancelledError:
                await channel.close()
                raise
            except grpc.aio.AioRpcError as exc:
                log.debug("peer %d at %s: %s", peer.node_id, peer.address, exc.code())
            except Exception as exc:  # a broken stream surfaces as various grpc errors
                log.debug("peer %d at %s: %r", peer.node_id, peer.address, exc)
            if rotated:
                assert reader is not None
                self.rollovers += 1
                task = asyncio.get_running_loop().create_task(
                    self._retire(peer.node_id, channel, call, reader)
                )
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
                continue
            carry = None  # stale by the time we reconnect, like the queue below
            await channel.close()
            peer.connected = False
            # Whatever was queued is stale by the time we reconnect: drop it, tell Raft.
            stale = peer.queue.qsize()
            while not peer.queue.empty():
                peer.queue.get_nowait()
                self.dropped_batches += 1
            if self.metrics is not None:
                self.metrics.failed(peer.node_id, stale)
            if self.on_unreachable is not None:
                self.on_unreachable(peer.node_id)
            # Back off (jittered, exponential), unless the peer shows it is up meanwhile.
            peer.alive.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer.alive.wait(), backoff_s * (0.5 + self.rng.random()))
            backoff_s = min(backoff_s * 2, 2.0)

    async def _retire(
        self, node_id: int, channel: grpc.aio.Channel, call: Any, reader: asyncio.Task[None]
    ) -> None:
        """End a stream replaced by a rotation: half-close it (the peer reads every batch
        written before, then ends the stream OK), wait for that, then close its channel.
        Bounded: a peer that does not end it within the grace gets it cancelled."""
        try:
            with contextlib.suppress(Exception):
                await call.done_writing()
                await asyncio.wait_for(reader, tls_reload.RETIRE_GRACE_S)
        finally:
            reader.cancel()
            await channel.close()
            log.debug("stream to peer %d rolled over onto new credentials", node_id)

    @staticmethod
    async def _drain_acks(
        call: AsyncIterable[pb.StreamAck],
        timed: collections.deque[tuple[int, float]],
        rtt: Any,
    ) -> None:
        async for ack in call:
            if rtt is None:
                continue
            # Acks are cumulative and in order: the one counting batch n answers its write.
            while timed and timed[0][0] <= ack.batches:
                n, t0 = timed.popleft()
                if n == ack.batches:
                    rtt.observe(time.perf_counter() - t0)

    async def close(self) -> None:
        """Stop sending, and end the streams peers opened to us (:meth:`RaftPeerService.close`):
        then the peer server stops with no call left to cancel."""
        self._closed = True
        tasks = [p.task for p in self._peers.values() if p.task is not None]
        tasks += self._retiring
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.service.close()


async def finish_pending_tasks(timeout_s: float = 1.0) -> set[asyncio.Task[object]]:
    """Wait, at most ``timeout_s``, until every other task of the running loop has finished;
    returns those still pending. For the end of a process's main coroutine, after its servers
    stopped and its clients closed.

    ``grpc.aio.Server.stop()`` returns when gRPC core has no live call, but the asyncio task
    grpc runs for each call (``_schedule_rpc_coro``) still needs a few loop iterations to see
    its call end. If ``asyncio.run`` returns meanwhile it cancels that task, and grpc logs the
    cancellation at ERROR with a traceback ("Exception not handled by _handle_exceptions in
    servicer method [/dkv.v1.RaftPeer/Stream]") on every graceful stop that had a stream
    open. Letting the tasks finish is the graceful stop; the bound keeps a stuck task from
    holding the process (asyncio.run cancels what is left)."""
    me = asyncio.current_task()
    others = {t for t in asyncio.all_tasks() if t is not me}
    if not others:
        return set()
    _, pending = await asyncio.wait(others, timeout=timeout_s)
    return pending


def with_port(address: str, port: int) -> str:
    """``address`` with its port replaced (the port a ``:0`` listener really got)."""
    host, _, _ = address.rpartition(":")
    return f"{host}:{port}"


def bind(
    server: grpc.aio.Server,
    address: str,
    tls: TlsFiles | None,
    *,
    check_interval_ms: int = tls_reload.CHECK_INTERVAL_MS,
) -> int:
    """Listen on ``address`` (mTLS when ``tls`` is given: clients must present a certificate
    signed by a CA of ``tls.trusted_ca_file``); returns the port. Raises InvalidArgument when
    it cannot, or when the TLS files are not a usable set.

    The files are reloaded when they change (looked at, at most every ``check_interval_ms``,
    when a client connects: :func:`dkv.security.tls_reload.server_credentials`): new
    connections get the new certificate and are checked against the new CA bundle."""
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            watcher = tls_reload.TlsWatcher(
                tls, check_interval_ms=check_interval_ms, user=f"the server on {address}"
            )
            creds = tls_reload.server_credentials(watcher, require_client_auth=True)
            port = server.add_secure_port(address, creds)
    except RuntimeError as exc:  # grpcio >= 1.5x raises "Failed to bind" instead of returning 0
        raise InvalidArgument(f"cannot listen on {address} (in use or not an address)") from exc
    if port == 0:
        raise InvalidArgument(f"cannot listen on {address} (in use or not an address)")
    return port
