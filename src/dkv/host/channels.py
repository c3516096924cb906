"""Client channels to other dkv processes: one place that turns PEM files into credentials.

:func:`client_channel` opens one channel (mTLS with :class:`TlsFiles`, else plaintext h2c);
:class:`ChannelPool` keeps one per address, for the processes that talk to many peers by
their client address (the gateway to nodes and membership, a node to membership and to other
nodes' admin ports, the membership leader to nodes); it builds new channels when the
certificate files change (:mod:`dkv.security.tls_reload`).

Keepalive is decided here for both ends (:func:`keepalive_options`): clients are built with
:data:`CHANNEL_OPTIONS`, every server with :data:`SERVER_KEEPALIVE_OPTIONS`, which accepts
their pings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from dkv.security import tls_reload

__all__ = [
    "CHANNEL_OPTIONS",
    "KEEPALIVE_TIME_MS",
    "RECONNECT_OPTIONS",
    "SERVER_KEEPALIVE_OPTIONS",
    "ChannelPool",
    "Options",
    "TlsFiles",
    "client_channel",
    "credentials",
    "keepalive_options",
]

Options = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mTLS: our certificate and key, and the CA that signs our peers."""

    cert_file: str
    key_file: str
    trusted_ca_file: str

    def read(self) -> tuple[bytes, bytes, bytes]:
        with open(self.cert_file, "rb") as c, open(self.key_file, "rb") as k:
            cert, key = c.read(), k.read()
        with open(self.trusted_ca_file, "rb") as ca:
            return cert, key, ca.read()


def keepalive_options(time_ms: int, timeout_ms: int | None = None) -> tuple[Options, Options]:
    """Channel arguments for keepalive, as a (client, server) pair that agree: a client built
    with the first never gets ``GOAWAY too_many_pings`` from a server built with the second.
    ``timeout_ms`` (default: half of ``time_ms``) is how long a ping may go unanswered.

    Semantics (gRPC core, doc/keepalive.md and ``ping_abuse_policy.cc`` of grpc/grpc):

    - A client pings every ``grpc.keepalive_time_ms`` and closes the connection when no ack
      comes within ``grpc.keepalive_timeout_ms`` (gRPC also sets TCP_USER_TIMEOUT to it). That
      is how a half-open connection to a process that vanished without a FIN (host down,
      partition) is noticed, instead of a call or a watch waiting on it forever.
    - Client side, ``grpc.keepalive_permit_without_calls`` = 1 pings even with no call open
      (an idle pooled channel is checked too, so the next call does not hit a dead
      connection), and ``grpc.http2.max_pings_without_data`` = 0 lifts the default cap of 2
      pings in a row while the client sends nothing (a watch stream only receives: with the
      cap, keepalive would stop after two pings on it).
    - Server side, a ping that comes less than ``grpc.http2.min_ping_interval_without_data_ms``
      (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; default 5 min) after the previous
      one, while the server sent no data or headers in between, is a "strike"; and if the
      server's ``grpc.keepalive_permit_without_calls`` is 0 (the default), any ping on a
      connection with no open stream counts against an interval of 2 hours. More than
      ``grpc.http2.max_ping_strikes`` strikes (default 2; 0 = unlimited) and the server sends
      GOAWAY ENHANCE_YOUR_CALM "too_many_pings" and closes the connection, failing its open
      streams. Data or headers sent by the server reset the count.

    So the server permits pings without calls (ours send them), and accepts one every
    ``time_ms // 2``: half of our clients' period leaves room for a timer that fires early or
    a second ping (a BDP probe) near a keepalive one, and still refuses a client that pings
    twice as often as ours. Strikes stay at gRPC's 2 (three early pings in a row): our clients
    never get there, a foreign client that floods pings gets cut off (its own problem), and an
    unlimited count would let any client keep a server busy answering pings.

    Servers ping too, at the same period: a server holding a watch stream for a client that
    vanished (gateway host down) frees it within ``time_ms`` + timeout instead of gRPC's
    default server keepalive of 2 hours. Clients do not police pings, so this cannot cost a
    GOAWAY.
    """
    if timeout_ms is None:
        timeout_ms = max(1, time_ms // 2)
    pings = (
        ("grpc.keepalive_time_ms", time_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    )
    enforcement = (
        ("grpc.http2.min_ping_interval_without_data_ms", max(1, time_ms // 2)),
        ("grpc.http2.max_ping_strikes", 2),
    )
    return pings, pings + enforcement


# Every client of ours (client channels, the Raft peer transport) pings every 10 s: a vanished
# peer or leader is noticed within 15 s (10 s + 5 s without an ack). A ping every 10 s per
# connection costs nothing measurable; Raft's own timeouts are shorter, but the transport needs
# the connection to fail to reconnect to a restarted peer.
KEEPALIVE_TIME_MS = 10_000
_CLIENT_KEEPALIVE, SERVER_KEEPALIVE_OPTIONS = keepalive_options(KEEPALIVE_TIME_MS)

# Reconnect backoff is capped low: a process that restarts is reachable again within ~2 s
# instead of gRPC's default of up to two minutes.
RECONNECT_OPTIONS: Options = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
# What every client channel of ours is built with. Servers made by dkv.host.rpc_server take
# SERVER_KEEPALIVE_OPTIONS, which accept these pings.
CHANNEL_OPTIONS: Options = _CLIENT_KEEPALIVE + RECONNECT_OPTIONS


def credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Our certificate and key, and the CA that signs the servers we call (read now)."""
    cert, key, ca = tls.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def client_channel(
    address: str,
    tls: TlsFiles | None,
    options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
    creds: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """A channel to ``address``: mTLS with ``tls`` (or ready ``creds``), else plaintext."""
    if creds is None and tls is not None:
        creds = credentials(tls)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, creds, options=list(options))


class ChannelPool(tls_reload.ChannelPool):
    """One channel per address, rebuilt when the TLS files change
    (:class:`dkv.security.tls_reload.ChannelPool`), with :data:`CHANNEL_OPTIONS`."""

    def __init__(
        self,
        tls: TlsFiles | None = None,
        options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(tls, options, **kwargs)
