"""Speak the Raft peer protocol (dkv.host.peer_wire) by hand, as an attacker would: for the
tests that check what a peer port refuses. Synchronous (plain sockets), so it runs beside a
stack in another thread or process."""

from __future__ import annotations

import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

from dkv.host.peer_wire import ACK_EVERY, PREAMBLE, FrameBuffer, Kind, frame
from dkv.v1 import raft_pb2

__all__ = ["PeerAnswer", "hello_frame", "peer_exchange"]


@dataclass(frozen=True)
class PeerAnswer:
    """What the port did: ``code`` OK when it read our batches (it acked them), the refusal's
    code, or UNAVAILABLE when the connection (or the TLS handshake) ended without a frame."""

    code: grpc.StatusCode
    details: str


def hello_frame(cluster: str, frm: int, name: str = "") -> bytes:
    hello = raft_pb2.PeerHello(cluster_id=cluster, from_node=frm)
    hello.metadata.update({"dkv-member-id": str(frm), "dkv-name": name})
    return frame(Kind.HELLO, hello.SerializeToString())


def _context(ca_pem: bytes, pem: tuple[bytes, bytes] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca_pem.decode())
    ctx.check_hostname = False  # 127.0.0.1: the attacker does not care who answers
    if pem is not None:
        key, cert = pem
        with tempfile.TemporaryDirectory() as d:
            k, c = Path(d) / "k.pem", Path(d) / "c.pem"
            k.write_bytes(key)
            c.write_bytes(cert)
            ctx.load_cert_chain(str(c), str(k))
    return ctx


def peer_exchange(
    port: int,
    batch: raft_pb2.MessageBatch,
    hello: bytes,
    *,
    ca_pem: bytes = b"",
    pem: tuple[bytes, bytes] | None = None,
    plaintext: bool = False,
    timeout_s: float = 10.0,
) -> PeerAnswer:
    """Connect to 127.0.0.1:``port`` (TLS unless ``plaintext``; a client certificate when
    ``pem`` = (key, cert)), say ``hello`` and write ``batch`` :data:`ACK_EVERY` times (so a
    port that serves it answers with an ack), then read until an answer or the end."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock: socket.socket = raw
    try:
        if not plaintext:
            try:
                sock = _context(ca_pem, pem).wrap_socket(raw)
            except (ssl.SSLError, OSError) as exc:
                return PeerAnswer(grpc.StatusCode.UNAVAILABLE, f"TLS handshake failed: {exc}")
        body = frame(Kind.BATCH, batch.SerializeToString())
        buf = FrameBuffer(1 << 20)
        try:
            sock.sendall(PREAMBLE + hello + body * ACK_EVERY)
            while data := sock.recv(65536):
                for kind, payload in buf.feed(data):
                    if kind is Kind.REFUSAL:
                        r = raft_pb2.PeerRefusal.FromString(payload)
                        code = next(c for c in grpc.StatusCode if c.value[0] == r.code)
                        return PeerAnswer(code, r.message)
                    if kind is Kind.ACK:
                        return PeerAnswer(grpc.StatusCode.OK, "served: batches acked")
        except (ssl.SSLError, OSError) as exc:
            # TLS 1.3: a refused client certificate is seen after the handshake, as an alert.
            return PeerAnswer(grpc.StatusCode.UNAVAILABLE, f"connection ended: {exc}")
        return PeerAnswer(grpc.StatusCode.UNAVAILABLE, "closed without an answer")
    finally:
        sock.close()
        raw.close()
