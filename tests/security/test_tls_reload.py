"""Reloading certificates under running servers and clients (dkv.security.tls_reload) and
rotating the dev PKI (dkv.security.rotation), with real mTLS handshakes over loopback."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import socket
import ssl
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509

from dkv.errors import InvalidArgument
from dkv.host.channels import TlsFiles
from dkv.host.peer_transport import PeerTransport
from dkv.host.rpc_server import bind
from dkv.raft import Message, MessageType
from dkv.security import tls_reload
from dkv.security.certs import PkiLayout, write_dev_pki
from dkv.security.rotation import (
    finish_ca_rotation,
    leaf_names,
    next_ca_paths,
    renew_leaves,
    start_ca_rotation,
)
from dkv.security.tls_reload import ChannelPool, TlsWatcher

FAST_MS = 20  # a check interval for tests: rotations are picked up at once


def make_pki(root: Path) -> PkiLayout:
    pki = PkiLayout(root / "pki")
    write_dev_pki(pki.directory, [("node", "n1"), ("node", "n2"), ("user", "admin")])
    return pki


def files(pki: PkiLayout, name: str) -> TlsFiles:
    return TlsFiles(str(pki.cert(name)), str(pki.key(name)), str(pki.ca_cert))


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- the watcher -----------------------------------------------------------------------------


def test_watcher_reloads_a_replaced_set_at_most_every_interval(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    clock = Clock()
    w = TlsWatcher(files(pki, "n1"), check_interval_ms=1000, clock=clock)
    first = w.current()
    assert first.serial == serial(pki.cert("n1")) and first.generation == 1
    new = renew_leaves(pki.directory, ["n1"])["n1"]
    clock.now = 0.5
    assert w.current() is first, "looked at the files before the interval passed"
    clock.now = 1.0
    m = w.current()
    assert (m.serial, m.generation, w.reloads) == (new, 2, 1)
    clock.now = 5.0
    assert w.current() is m, "nothing changed: no new generation"


def test_watcher_follows_a_kubernetes_style_symlink_swap(tmp_path: Path) -> None:
    """A Secret volume: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>; the kubelet writes
    a new timestamped directory and renames a new ..data link over the old one."""
    pki = make_pki(tmp_path)
    vol = tmp_path / "vol"
    vol.mkdir()

    def publish(version: str) -> None:
        d = vol / f"..{version}"
        d.mkdir()
        for src, dst in ((pki.cert("n1"), "tls.crt"), (pki.key("n1"), "tls.key")):
            shutil.copyfile(src, d / dst)
        shutil.copyfile(pki.ca_cert, d / "ca.crt")
        tmp = vol / "..data_tmp"
        tmp.symlink_to(d.name)
        os.replace(tmp, vol / "..data")

    publish("v1")
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (vol / name).symlink_to(f"..data/{name}")
    paths = TlsFiles(str(vol / "tls.crt"), str(vol / "tls.key"), str(vol / "ca.crt"))
    w = TlsWatcher(paths, check_interval_ms=0)
    assert w.current().serial == serial(pki.cert("n1"))
    new = renew_leaves(pki.directory, ["n1"])["n1"]
    assert not w.check_now()  # the volume did not change yet
    publish("v2")
    assert w.check_now()
    assert w.current().serial == new


def test_a_key_that_does_not_match_is_refused_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = make_pki(tmp_path)
    w = TlsWatcher(files(pki, "n1"), check_interval_ms=0)
    before = w.current()
    other = make_pki(tmp_path / "other")
    shutil.copyfile(other.key("n1"), pki.key("n1"))  # a rotation caught half-way
    with caplog.at_level(logging.WARNING, logger="dkv.security.tls"):
        for _ in range(3):
            assert w.current() is before, "a mismatched key was loaded"
    refusals = [r for r in caplog.records if "not reloaded" in r.getMessage()]
    assert len(refusals) == 1 and "does not match" in refusals[0].getMessage()
    assert w.refusals == 1
    shutil.copyfile(other.cert("n1"), pki.cert("n1"))  # the rest of the rotation
    assert w.current().serial == serial(other.cert("n1"))


def test_same_bytes_rewritten_are_not_a_new_generation(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    w = TlsWatcher(files(pki, "n1"), check_interval_ms=0)
    data = pki.cert("n1").read_bytes()
    tmp = pki.cert("n1").with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, pki.cert("n1"))  # a new inode, the same content
    assert w.current().generation == 1 and w.reloads == 0


def test_bad_files_at_start_are_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with pytest.raises(InvalidArgument, match="cannot read"):
        TlsWatcher(TlsFiles(str(tmp_path / "missing.crt"), str(pki.key("n1")), str(pki.ca_cert)))
    with pytest.raises(InvalidArgument, match="does not match"):
        TlsWatcher(TlsFiles(str(pki.cert("n1")), str(pki.key("n2")), str(pki.ca_cert)))


# -- the dev PKI's rotation ------------------------------------------------------------------


def test_renewed_leaves_keep_their_names_and_the_ca_rotates_in_three_steps(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path)
    old = x509.load_pem_x509_certificate(pki.cert("n1").read_bytes())
    old_ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert leaf_names(pki) == ["admin", "n1", "n2"]
    renew_leaves(pki.directory)
    new = x509.load_pem_x509_certificate(pki.cert("n1").read_bytes())
    assert new.serial_number != old.serial_number
    assert new.subject == old.subject and new.issuer == old_ca.subject

    def sans(c: x509.Certificate) -> x509.SubjectAlternativeName:
        return c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert sans(new) == sans(old)

    new_ca = start_ca_rotation(pki.directory)
    bundle = x509.load_pem_x509_certificates(pki.ca_cert.read_bytes())
    assert [c.serial_number for c in bundle] == [
        old_ca.serial_number,
        new_ca.cert.serial_number,
    ]
    with pytest.raises(InvalidArgument, match="already under way"):
        start_ca_rotation(pki.directory)
    renew_leaves(pki.directory, signer="next")
    leaf = x509.load_pem_x509_certificate(pki.cert("admin").read_bytes())
    leaf.verify_directly_issued_by(new_ca.cert)
    finish_ca_rotation(pki.directory)
    assert [c.serial_number for c in x509.load_pem_x509_certificates(pki.ca_cert.read_bytes())] == [
        new_ca.cert.serial_number
    ]
    assert not any(p.exists() for p in next_ca_paths(pki))
    # The new CA signs what comes next.
    renew_leaves(pki.directory, ["n2"])
    x509.load_pem_x509_certificate(pki.cert("n2").read_bytes()).verify_directly_issued_by(
        new_ca.cert
    )
    with pytest.raises(InvalidArgument, match="no CA rotation"):
        finish_ca_rotation(pki.directory)


# -- servers ---------------------------------------------------------------------------------


def probe(port: int, cert: Path, key: Path, ca: Path) -> tuple[int, bool]:
    """(the server's serial, whether it accepted our certificate): TLS 1.3 clients learn of a
    refusal on their first read; an accepting gRPC server sends its HTTP/2 SETTINGS."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        got = x509.load_der_x509_certificate(der).serial_number
        try:
            return got, bool(tls.recv(64))
        except (ssl.SSLError, OSError):
            return got, False


async def until(what: str, cond: object, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await asyncio.to_thread(cond):  # type: ignore[arg-type]
        assert loop.time() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.02)


def test_a_server_presents_and_trusts_the_new_files_without_a_restart(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    keep = tmp_path / "old"
    keep.mkdir()
    old_admin = (keep / "admin.crt", keep / "admin.key")
    shutil.copyfile(pki.cert("admin"), old_admin[0])
    shutil.copyfile(pki.key("admin"), old_admin[1])
    admin = (pki.cert("admin"), pki.key("admin"))

    async def scenario() -> None:
        server = grpc.aio.server()
        port = bind(server, "127.0.0.1:0", files(pki, "n1"), check_interval_ms=FAST_MS)
        await server.start()
        try:
            assert await asyncio.to_thread(probe, port, *admin, pki.ca_cert) == (
                serial(pki.cert("n1")),
                True,
            )
            new = renew_leaves(pki.directory)
            await until(
                "the new leaf is presented",
                lambda: probe(port, *admin, pki.ca_cert) == (new["n1"], True),
            )
            start_ca_rotation(pki.directory)
            renew_leaves(pki.directory, signer="next")
            await until(
                "a leaf of the new CA is presented and accepted",
                lambda: probe(port, *admin, pki.ca_cert) == (serial(pki.cert("n1")), True),
            )
            assert (await asyncio.to_thread(probe, port, *old_admin, pki.ca_cert))[1], (
                "the bundle still holds the old CA"
            )
            finish_ca_rotation(pki.directory)
            await until(
                "a leaf of the old CA is refused",
                lambda: not probe(port, *old_admin, pki.ca_cert)[1],
            )
            assert (await asyncio.to_thread(probe, port, *admin, pki.ca_cert))[1]
        finally:
            await server.stop(0)

    asyncio.run(scenario())


# -- clients ---------------------------------------------------------------------------------

_SLOW = "/test.Slow/Call"


async def _slow_server(pki: PkiLayout) -> tuple[grpc.aio.Server, int]:
    async def call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await asyncio.sleep(float(request.decode()))
        return b"done"

    handler = grpc.unary_unary_rpc_method_handler(call)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Slow", {"Call": handler}),)
    )
    port = bind(server, "127.0.0.1:0", files(pki, "n1"), check_interval_ms=FAST_MS)
    await server.start()
    return server, port


def test_a_pool_builds_new_channels_and_lets_calls_in_flight_finish(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)

    async def scenario() -> None:
        server, port = await _slow_server(pki)
        address = f"localhost:{port}"
        pool = ChannelPool(
            files(pki, "admin"), check_interval_ms=FAST_MS, retire_delay_s=0.0, retire_grace_s=5
        )
        try:
            old = pool.get(address)
            in_flight = asyncio.ensure_future(old.unary_unary(_SLOW)(b"0.5", timeout=5))
            await asyncio.sleep(0.1)  # the call is on the wire
            start_ca_rotation(pki.directory)
            renew_leaves(pki.directory, signer="next")
            finish_ca_rotation(pki.directory)  # the old credentials are now useless
            await asyncio.sleep(FAST_MS / 1000 * 2)
            new = pool.get(address)
            assert new is not old and pool.retired == 1
            # The new channel speaks with the new files (the server took them meanwhile).
            assert await new.unary_unary(_SLOW)(b"0", timeout=5) == b"done"
            assert await in_flight == b"done", "a call in flight failed over the rotation"
            await until(
                "the old channel is closed once its call ended",
                lambda: old.get_state() is grpc.ChannelConnectivity.SHUTDOWN,
                timeout_s=5,
            )
        finally:
            await pool.close()
            await server.stop(0)

    asyncio.run(scenario())


def test_the_raft_transport_rolls_its_stream_over_without_dropping_batches(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path)

    async def scenario() -> None:
        got: list[int] = []
        receiver = PeerTransport(2, "c", {}, tls=files(pki, "n2"), check_interval_ms=FAST_MS)
        receiver.set_delivery(lambda frm, pairs: got.extend(m.index for _, m in pairs))
        port = await receiver.listener.listen("127.0.0.1:0")
        sender = PeerTransport(
            1,
            "c",
            {2: f"localhost:{port}"},
            tls=files(pki, "n1"),
            rng=random.Random(1),
            check_interval_ms=FAST_MS,
        )
        try:

            def send(i: int) -> None:
                sender.send(2, [(1, Message(MessageType.HEARTBEAT, to=2, frm=1, index=i))])

            for i in range(1, 51):
                send(i)
            await until("the first batches arrive", lambda: len(got) == 50)
            start_ca_rotation(pki.directory)
            renew_leaves(pki.directory, signer="next")
            finish_ca_rotation(pki.directory)
            await asyncio.sleep(FAST_MS / 1000 * 2)
            for i in range(51, 101):
                send(i)
                await asyncio.sleep(0.002)
            await until("every batch arrives", lambda: len(got) == 100)
            assert sorted(got) == list(range(1, 101))
            assert sender.rollovers >= 1 and sender.dropped_batches == 0
        finally:
            await sender.close()
            await receiver.close()

    asyncio.run(scenario())


def test_pool_without_tls_is_plaintext_and_never_rotates(tmp_path: Path) -> None:
    async def scenario() -> None:
        pool = tls_reload.ChannelPool(None)
        ch = pool.get("127.0.0.1:1")
        assert pool.get("127.0.0.1:1") is ch and pool.watcher is None
        await pool.close()

    asyncio.run(scenario())
