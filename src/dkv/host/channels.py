"""Client channels to other dkv processes: one place that turns PEM files into credentials.

:func:`client_channel` opens one channel (mTLS with :class:`TlsFiles`, else plaintext h2c);
:class:`ChannelPool` keeps one per address, for the processes that talk to many peers by
their client address (the gateway to nodes and membership, a node to membership and to other
nodes' admin ports, the membership leader to nodes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from dkv.host.grpc_transport import TlsFiles

__all__ = ["CHANNEL_OPTIONS", "ChannelPool", "client_channel", "credentials"]

# Keepalive notices a half-open connection to a process that vanished (no FIN). Our servers
# keep gRPC's default ping policy (pings without data at most every 5 min count as strikes),
# and a client sends at most 2 pings without data, so pinging is cheap and never gets us a
# GOAWAY. Reconnect backoff is capped low: a process that restarts is reachable again within
# ~2 s instead of gRPC's default of up to two minutes.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


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


class ChannelPool:
    """One channel per address (credentials read once), closed together."""

    def __init__(
        self,
        tls: TlsFiles | None = None,
        options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
    ) -> None:
        self._options = list(options)
        self._creds = None if tls is None else credentials(tls)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = client_channel(address, None, self._options, self._creds)
            self._channels[address] = ch
        return ch

    @property
    def addresses(self) -> set[str]:
        return set(self._channels)

    def discard(self, address: str) -> None:
        """Close the channel to ``address`` (in the background; calls on it are cancelled)."""
        ch = self._channels.pop(address, None)
        if ch is not None:
            task = asyncio.get_running_loop().create_task(ch.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        for ch in channels:
            await ch.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
