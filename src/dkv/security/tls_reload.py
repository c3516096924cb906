"""Certificates that change under running processes: reload them without a restart.

Every process reads its certificate, key and CA bundle through a :class:`TlsWatcher`, which
notices when the files changed and loads them again -- if, and only if, they make a usable
set. What uses it:

- servers (:func:`server_credentials`): ``grpc.dynamic_ssl_server_credentials``, whose fetcher
  gRPC calls at every new handshake; it hands over a new certificate configuration when the
  watcher has one, so new connections get the new certificate and are verified against the new
  CA bundle, while established connections carry on;
- clients (:class:`ChannelPool`): Python gRPC has no dynamic channel credentials, so a pool
  builds new channels with the new credentials for new calls and retires the old ones: a
  retired channel keeps its calls (and streams) until they end, for at most
  ``retire_grace_s``, then closes (:meth:`ChannelPool.get`);
- the Raft peer transport (:mod:`dkv.host.peer_transport`, asyncio TLS): every new
  connection gets an ``ssl`` context of the current files (:class:`SslContexts`), and a sender
  rolls its long-lived connection over onto a new one when its files changed.

Change detection is cheap and works with the ways files are replaced in practice: at most
every ``check_interval_ms`` (default 1 s, never on every handshake or call) each file is
``stat``-ed through its resolved real path; a change of the real path, inode, size or mtime
is a change. That covers ``os.replace`` (a new inode), an in-place rewrite (mtime, size) and
Kubernetes' Secret volumes, where every file is a symlink through ``..data``, which the kubelet
swaps to a new directory (the real path changes). Files are never half-loaded: a set whose key
does not match its certificate (a rotation caught between writing the key and the
certificate), or that does not parse, is refused -- the previous set stays in use and the
refusal is logged once per distinct content seen; the next change is looked at afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dkv.errors import InvalidArgument

__all__ = [
    "CHECK_INTERVAL_MS",
    "RETIRE_DELAY_S",
    "RETIRE_GRACE_S",
    "ChannelPool",
    "ReloadingCredentials",
    "SslContexts",
    "TlsMaterial",
    "TlsPaths",
    "TlsWatcher",
    "load_material",
    "server_credentials",
    "ssl_context",
]

log = logging.getLogger("dkv.security.tls")

CHECK_INTERVAL_MS = 1000
"""How often, at most, the files are looked at (a few ``stat`` calls): rotations are rare and
a second's delay is nothing next to a certificate's lifetime, while a check per handshake
would cost syscalls on the connection path."""
RETIRE_DELAY_S = 10.0
"""A replaced channel stays fully open this long: a caller that took it from the pool just
before the change may still start calls on it (the gateway's watch asks for the current
revision, up to 5 s, and then opens its stream on the same channel)."""
RETIRE_GRACE_S = 30.0
"""Then it closes to new calls, and its calls in flight get this long to end (unary calls
have shorter deadlines; a stream still open after it is cancelled and resumed by its caller
on a new channel)."""


class TlsPaths(Protocol):
    """Where the PEM files are (``dkv.host.channels.TlsFiles``, ``dkv.client.ClientTls``)."""

    @property
    def cert_file(self) -> str: ...

    @property
    def key_file(self) -> str: ...

    @property
    def trusted_ca_file(self) -> str: ...


@dataclass(frozen=True)
class TlsMaterial:
    """One consistent set of PEM bytes, numbered: ``generation`` grows by one per reload."""

    cert: bytes
    key: bytes
    ca: bytes
    generation: int
    serial: int  # of our certificate (the first in ``cert``): what a peer sees in a handshake


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def check_material(cert: bytes, key: bytes, ca: bytes) -> int:
    """Validate a set of PEM bytes; returns the certificate's serial. Raises InvalidArgument
    when the certificate, key or CA bundle does not parse, or the key is not the
    certificate's."""
    try:
        chain = x509.load_pem_x509_certificates(cert)
    except ValueError as exc:
        raise InvalidArgument(f"certificate does not parse: {exc}") from exc
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"private key does not parse: {exc}") from exc
    try:
        roots = x509.load_pem_x509_certificates(ca)
    except ValueError as exc:
        raise InvalidArgument(f"CA bundle does not parse: {exc}") from exc
    if not chain or not roots:
        raise InvalidArgument("no certificate in the certificate or CA file")
    if _spki(private.public_key()) != _spki(chain[0].public_key()):
        raise InvalidArgument("the private key does not match the certificate")
    return int(chain[0].serial_number)


def load_material(paths: TlsPaths, generation: int = 1) -> TlsMaterial:
    """Read and validate the files now (InvalidArgument when they are not a usable set)."""
    try:
        with (
            open(paths.cert_file, "rb") as c,
            open(paths.key_file, "rb") as k,
            open(paths.trusted_ca_file, "rb") as a,
        ):
            cert, key, ca = c.read(), k.read(), a.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read TLS files: {exc}") from exc
    serial = check_material(cert, key, ca)
    return TlsMaterial(cert, key, ca, generation, serial)


Stamp = tuple[tuple[str, int, int, int, int], ...]


def _stamp(paths: TlsPaths) -> Stamp:
    """What identifies the files' current content without reading it: per file, the resolved
    real path (a swapped ``..data`` symlink changes it), device, inode, size and mtime."""
    out = []
    for p in (paths.cert_file, paths.key_file, paths.trusted_ca_file):
        real = os.path.realpath(p)
        st = os.stat(real)
        out.append((real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class TlsWatcher:
    """The current :class:`TlsMaterial` of some files (see the module docstring).

    :meth:`current` is cheap: it looks at the files only when ``check_interval_ms`` passed
    since the last look. Thread-safe: gRPC calls a server's fetcher from its own threads."""

    def __init__(
        self,
        paths: TlsPaths,
        *,
        check_interval_ms: int = CHECK_INTERVAL_MS,
        clock: Callable[[], float] = time.monotonic,
        user: str = "",
    ) -> None:
        self.paths = paths
        self.user = user or "TLS"  # who reads them, for the log: "the server on ...", ...
        self.check_interval_ms = check_interval_ms
        self._clock = clock
        self._lock = threading.Lock()
        stamp = _stamp_or_none(paths)
        self._material = load_material(paths)  # bad files at start: refuse to start
        self._stamp = stamp
        self._checked_at = clock()
        self._refused: Stamp | None = None  # the last content refused (logged once)
        self.reloads = 0
        self.refusals = 0

    def current(self) -> TlsMaterial:
        with self._lock:
            now = self._clock()
            if (now - self._checked_at) * 1000 >= self.check_interval_ms:
                self._checked_at = now
                self._check()
            return self._material

    def check_now(self) -> bool:
        """Look at the files now; True when a new set was loaded."""
        with self._lock:
            self._checked_at = self._clock()
            return self._check()

    def _check(self) -> bool:
        stamp = _stamp_or_none(self.paths)
        if stamp is not None and stamp == self._stamp:
            return False
        try:
            loaded = load_material(self.paths, self._material.generation + 1)
        except InvalidArgument as exc:
            # Not recorded as the current stamp: the next check looks again, and finds either
            # the same content (quiet) or the rest of a rotation (loaded).
            if stamp is None or stamp != self._refused:
                self._refused = stamp
                self.refusals += 1
                log.warning(
                    "%s: %s not reloaded, keeping the previous certificate: %s",
                    self.user,
                    self.paths.cert_file,
                    exc,
                )
            return False
        self._stamp = stamp
        self._refused = None
        old = self._material
        if (loaded.cert, loaded.key, loaded.ca) == (old.cert, old.key, old.ca):
            return False  # touched, or rewritten with the same bytes: nothing to do
        self._material = loaded
        self.reloads += 1
        log.info(
            "%s: %s reloaded, certificate serial %x (was %x)",
            self.user,
            self.paths.cert_file,
            loaded.serial,
            old.serial,
        )
        return True


def _stamp_or_none(paths: TlsPaths) -> Stamp | None:
    try:
        return _stamp(paths)
    except OSError:
        return None  # a file is missing (mid-swap): loading decides


def server_credentials(
    watcher: TlsWatcher, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """Server credentials that follow ``watcher``'s files (clients must present a certificate
    signed by a CA of the current bundle)."""

    def config(m: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], root_certificates=m.ca)

    first = watcher.current()
    served = [first.generation]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC at every new handshake; None keeps what it has.
        try:
            m = watcher.current()
        except Exception:  # never fail a handshake over a watcher problem
            log.exception("TLS watcher failed")
            return None
        if m.generation == served[0]:
            return None
        served[0] = m.generation
        return config(m)

    # gRPC documents None as "keep the current configuration"; the stubs do not say so.
    fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], fetch)
    return grpc.dynamic_ssl_server_credentials(
        config(first), fetcher, require_client_authentication=require_client_auth
    )


class ReloadingCredentials:
    """Channel credentials of a :class:`TlsWatcher`'s current files, made once per set."""

    def __init__(
        self, paths: TlsPaths, *, check_interval_ms: int = CHECK_INTERVAL_MS, user: str = ""
    ) -> None:
        self.watcher = TlsWatcher(paths, check_interval_ms=check_interval_ms, user=user)
        self._generation = 0
        self._creds: grpc.ChannelCredentials | None = None

    def current(self) -> tuple[int, grpc.ChannelCredentials]:
        """``(generation, credentials)``: a new generation means the files changed."""
        m = self.watcher.current()
        if self._creds is None or m.generation != self._generation:
            self._creds = grpc.ssl_channel_credentials(
                root_certificates=m.ca, private_key=m.key, certificate_chain=m.cert
            )
            self._generation = m.generation
        return self._generation, self._creds


@dataclass
class _Pooled:
    channel: grpc.aio.Channel
    generation: int


class ChannelPool:
    """One channel per address, built with the current credentials (mTLS with ``tls``, else
    plaintext h2c).

    When the files change, every pooled channel is replaced: the next :meth:`get` of an
    address builds a new one, and the old ones are retired in the background -- open for
    ``retire_delay_s`` (a caller may hold one between :meth:`get` and its call), then closed
    to new calls with ``retire_grace_s`` for the calls in flight. No call in flight fails
    because of a rotation."""

    def __init__(
        self,
        tls: TlsPaths | None = None,
        options: Sequence[tuple[str, Any]] = (),
        *,
        check_interval_ms: int = CHECK_INTERVAL_MS,
        retire_delay_s: float = RETIRE_DELAY_S,
        retire_grace_s: float = RETIRE_GRACE_S,
        user: str = "client channels",
    ) -> None:
        self._options = list(options)
        self._creds = (
            None
            if tls is None
            else ReloadingCredentials(tls, check_interval_ms=check_interval_ms, user=user)
        )
        self.retire_delay_s = retire_delay_s
        self.retire_grace_s = retire_grace_s
        self._channels: dict[str, _Pooled] = {}
        self._generation = 0
        # Channels being closed (discarded or retired), closed at once by close().
        self._closing: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self.retired = 0

    @property
    def watcher(self) -> TlsWatcher | None:
        return None if self._creds is None else self._creds.watcher

    def get(self, address: str) -> grpc.aio.Channel:
        creds: grpc.ChannelCredentials | None = None
        if self._creds is not None:
            generation, creds = self._creds.current()
            if generation != self._generation:
                if self._generation:
                    self._retire_all()
                self._generation = generation
        pooled = self._channels.get(address)
        if pooled is None:
            options = self._options
            if creds is None:
                ch = grpc.aio.insecure_channel(address, options=options)
            else:
                ch = grpc.aio.secure_channel(address, creds, options=options)
            pooled = self._channels[address] = _Pooled(ch, self._generation)
        return pooled.channel

    @property
    def addresses(self) -> set[str]:
        return set(self._channels)

    def discard(self, address: str) -> None:
        """Close the channel to ``address`` (in the background; calls on it are cancelled)."""
        pooled = self._channels.pop(address, None)
        if pooled is not None:
            self._background(pooled.channel, pooled.channel.close())

    def _retire_all(self) -> None:
        old, self._channels = self._channels, {}
        for pooled in old.values():
            self.retired += 1
            self._background(pooled.channel, self._retire(pooled.channel))

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        await asyncio.sleep(self.retire_delay_s)
        await channel.close(self.retire_grace_s)

    def _background(self, channel: grpc.aio.Channel, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._closing[task] = channel
        task.add_done_callback(lambda t: self._closing.pop(t, None))

    async def close(self) -> None:
        """Close every channel now, retired ones too (their calls are cancelled)."""
        channels = [p.channel for p in self._channels.values()]
        self._channels.clear()
        closing = dict(self._closing)
        for task in closing:
            task.cancel()
        await asyncio.gather(*closing, return_exceptions=True)
        channels += closing.values()
        for ch in channels:
            with contextlib.suppress(Exception):
                await ch.close()


def _load_chain(ctx: ssl.SSLContext, m: TlsMaterial) -> None:
    """Load ``m``'s certificate and key into ``ctx`` without writing the key to a disk:
    ``ssl`` reads them only from a path, so the path is an anonymous in-memory file's."""
    fd = os.memfd_create("dkv-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, m.cert + b"\n" + m.key)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def ssl_context(m: TlsMaterial, *, server_side: bool) -> ssl.SSLContext:
    """An ``ssl`` context for mTLS with ``m``: a server requires a client certificate signed
    by a CA of ``m.ca``; a client checks that the server's certificate names the host it
    dialled (as gRPC's channels do)."""
    purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
    ctx = ssl.create_default_context(purpose, cadata=m.ca.decode("ascii"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if server_side:
        ctx.verify_mode = ssl.CERT_REQUIRED
    _load_chain(ctx, m)
    return ctx


class SslContexts:
    """``ssl`` contexts of a :class:`TlsWatcher`'s current files, made once per set: what the
    peer transport (plain asyncio TLS, not gRPC) hands each new connection."""

    def __init__(
        self, paths: TlsPaths, *, check_interval_ms: int = CHECK_INTERVAL_MS, user: str = ""
    ) -> None:
        self.watcher = TlsWatcher(paths, check_interval_ms=check_interval_ms, user=user)
        self._made: dict[bool, tuple[int, ssl.SSLContext]] = {}

    def current(self, *, server_side: bool) -> tuple[int, ssl.SSLContext]:
        """``(generation, context)``: a new generation means the files changed."""
        m = self.watcher.current()
        made = self._made.get(server_side)
        if made is None or made[0] != m.generation:
            made = self._made[server_side] = (m.generation, ssl_context(m, server_side=server_side))
        return made

    def generation(self) -> int:
        return self.watcher.current().generation
