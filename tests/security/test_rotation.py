"""Certificate rotation without downtime, on `make run`'s stack of real processes.

Concurrent clients keep writing and reading through the front door (Envoy, gRPC, one call per
operation with a deadline) for the whole run, while the dev PKI is rotated in place
(:mod:`dkv.security.rotation`):

1. every leaf certificate (same CA);
2. the CA: both CAs trusted, then leaves of the new CA, then the old CA removed.

Each step is awaited as an event before the next: a fresh TLS handshake to every port
presents the new certificate's serial (servers reload on handshake,
:mod:`dkv.security.tls_reload`), accepts a client certificate of the new CA (the bundle
changed), or refuses one of the old CA; Envoy's admin ``/certs`` shows its upstream
certificate too. No client call may fail, the history must be linearizable, and afterwards
the old certificates (the first leaves, and the renewed leaves of the old CA) are refused at
every port: the front door, the gateway, the nodes' client and peer ports, membership.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dkv.devstack import ENVOY_NAME, GATEWAY_NAME, NODE_NAMES, DevLayout, DevStack
from dkv.security.certs import PkiLayout, _key_pem, _write, issue_certificate, uri_for
from dkv.security.rotation import (
    finish_ca_rotation,
    renew_leaves,
    start_ca_rotation,
)
from dkv.testing.cluster import History, Workload, check
from dkv.testing.frontdoor import FrontDoorClient

pytestmark = pytest.mark.slow

SHARDS = 2
STEP_TIMEOUT_S = 20.0  # a step is picked up within about a second; this is the failure bound
PROBE_EVERY_S = 0.1
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class Port:
    what: str
    port: int
    owner: str  # whose certificate the port presents


@dataclass(frozen=True)
class ClientCert:
    cert: Path
    key: Path


def free_layout(root: Path) -> DevLayout:
    return DevLayout.with_free_ports(root, shards=SHARDS)


def ports(layout: DevLayout) -> list[Port]:
    out = [
        Port("front door (Envoy)", layout.front_door, ENVOY_NAME),
        Port("gateway", layout.gateway, GATEWAY_NAME),
    ]
    for i, name in enumerate(NODE_NAMES, start=1):
        out.append(Port(f"node {name} (clients)", layout.node_client(i), name))
        out.append(Port(f"node {name} (peers)", layout.node_peer(i), name))
    for i, name in enumerate(layout.membership_names, start=1):
        out.append(Port(f"membership {name} (clients)", layout.membership_client(i), name))
        out.append(Port(f"membership {name} (peers)", layout.membership_peer(i), name))
    if speaks_tls(layout.xds):  # the gateway's xDS port, when it serves mTLS
        out.append(Port("gateway (xDS)", layout.xds, GATEWAY_NAME))
    return out


def speaks_tls(port: int) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost"),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


@dataclass(frozen=True)
class Handshake:
    serial: int  # the server's certificate
    accepted: bool  # the server took our certificate (it spoke HTTP/2 to us)
    error: str = ""


def handshake(port: int, client: ClientCert, ca: Path) -> Handshake:
    """A fresh TLS connection presenting ``client``, trusting ``ca``: the server's serial and
    whether it accepted us. With TLS 1.3 the server checks the client's certificate after the
    client finished its handshake: a refusal is an alert on the first read; an acceptance is
    the server's HTTP/2 SETTINGS frame in answer to ours (every port speaks gRPC)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        serial = x509.load_der_x509_certificate(der).serial_number
        try:
            # The HTTP/2 preface and an empty SETTINGS frame: Envoy answers only once the
            # client spoke (gRPC servers send their SETTINGS at once).
            tls.sendall(H2_PREFACE)
            data = tls.recv(64)
        except (ssl.SSLError, OSError) as exc:
            return Handshake(serial, False, str(exc))
        return Handshake(serial, bool(data), "" if data else "closed")


async def wait_until(
    what: str, missing: Callable[[], list[str]], timeout_s: float = STEP_TIMEOUT_S
) -> float:
    """Poll ``missing`` (in a thread: the workload shares this loop) until it names nothing;
    returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    last: object = None
    while loop.time() - start < timeout_s:
        try:
            last = await asyncio.to_thread(missing)
            if not last:
                return loop.time() - start
        except (OSError, ssl.SSLError) as exc:
            last = exc
        await asyncio.sleep(PROBE_EVERY_S)
    raise AssertionError(f"not within {timeout_s} s: {what}; still: {last!r}")


def envoy_certs(layout: DevLayout) -> list[tuple[set[int], set[int]]]:
    """Per TLS context of Envoy (front door, upstream): (its certificates' serials, its CAs')."""
    url = f"http://127.0.0.1:{layout.envoy_admin}/certs"
    with urllib.request.urlopen(url, timeout=5) as resp:
        data = json.loads(resp.read())
    return [
        (
            {int(c["serial_number"], 16) for c in ctx.get("cert_chain", [])},
            {int(c["serial_number"], 16) for c in ctx.get("ca_cert", [])},
        )
        for ctx in data["certificates"]
    ]


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def snapshot(pki: PkiLayout, into: Path, name: str) -> ClientCert:
    into.mkdir(parents=True, exist_ok=True)
    cert, key = into / f"{name}.crt", into / f"{name}.key"
    shutil.copyfile(pki.cert(name), cert)
    shutil.copyfile(pki.key(name), key)
    return ClientCert(cert, key)


def test_rotate_every_certificate_and_the_ca_under_load(tmp_path: Path) -> None:
    layout = free_layout(tmp_path / ".dkv")
    stack = DevStack(layout)
    stack.start()
    try:
        asyncio.run(stack.wait_ready())
        asyncio.run(scenario(stack, tmp_path / "old"))
    finally:
        stack.stop()


async def scenario(stack: DevStack, old_dir: Path) -> None:
    lay = stack.layout
    pki = lay.certs
    every = ports(lay)
    admin = ClientCert(pki.cert("admin"), pki.key("admin"))
    first_admin = snapshot(pki, old_dir / "first", "admin")
    first_node = snapshot(pki, old_dir / "first", NODE_NAMES[0])
    old_ca = serial_of(pki.ca_cert)
    history = History(seed=11)
    took: dict[str, float] = {}
    t0 = time.monotonic()

    def presenting(expect: dict[str, int]) -> Callable[[], list[str]]:
        def missing() -> list[str]:
            return [
                f"{p.what} presents {h.serial:x}"
                for p in every
                if (h := handshake(p.port, admin, pki.ca_cert)).serial != expect[p.owner]
            ]

        return missing

    def accepting(client: ClientCert, want: bool) -> Callable[[], list[str]]:
        def missing() -> list[str]:
            return [
                f"{p.what} {'refuses' if want else 'accepts'} it ({h.error})"
                for p in every
                if (h := handshake(p.port, client, pki.ca_cert)).accepted != want
            ]

        return missing

    def envoy(certs: set[int] | None, cas: set[int] | None) -> Callable[[], list[str]]:
        """Every TLS context of Envoy (front door, upstream, xDS) has these serials."""

        def missing() -> list[str]:
            return [
                f"Envoy context {i}: certificates {sorted(c)}, CAs {sorted(a)}"
                for i, (c, a) in enumerate(envoy_certs(lay))
                if (certs is not None and c != certs) or (cas is not None and a != cas)
            ]

        return missing

    async def all_present(step: str, expect: dict[str, int]) -> None:
        took[step] = await wait_until(
            f"{step}: every port presents its new certificate", presenting(expect)
        )
        await wait_until(
            f"{step}: Envoy's every context has its new certificate",
            envoy({expect[ENVOY_NAME]}, None),
        )

    async with FrontDoorClient(f"127.0.0.1:{lay.front_door}", SHARDS, lay.client_tls_files()) as c:
        work = Workload(
            c,  # type: ignore[arg-type]
            history,
            workers=4,
            ops_per_worker=1_000_000,  # stopped once the rotation is over
            keys=8,
            prefix=b"rot/",
            op_timeout_s=10.0,
            seed=11,
        )
        task = asyncio.create_task(work.run())
        try:
            await work.wait_succeeded(20, timeout_s=30)

            # 1. Every leaf, same CA.
            renewed = renew_leaves(pki.directory)
            await all_present("leaves", renewed)
            renewed_admin = snapshot(pki, old_dir / "renewed", "admin")

            # 2a. A new CA, trusted beside the old one: a client of the new CA is accepted.
            new_ca = start_ca_rotation(pki.directory)
            probe_leaf = issue_certificate(new_ca, "probe", uri=uri_for("user", "probe"))
            probe_dir = old_dir / "probe"
            probe_dir.mkdir(parents=True)
            _write(probe_dir / "probe.key", _key_pem(probe_leaf.key), private=True)
            _write(
                probe_dir / "probe.crt",
                probe_leaf.cert.public_bytes(serialization.Encoding.PEM),
                private=False,
            )
            new_client = ClientCert(probe_dir / "probe.crt", probe_dir / "probe.key")
            took["bundle"] = await wait_until(
                "bundle: every port accepts a client of the new CA",
                accepting(new_client, True),
            )
            both = {old_ca, new_ca.cert.serial_number}
            await wait_until(
                "bundle: Envoy trusts both CAs in every context",
                envoy(None, both),
            )

            # 2b. Leaves of the new CA.
            reissued = renew_leaves(pki.directory, signer="next")
            await all_present("new-CA leaves", reissued)

            # 2c. The old CA leaves the bundles: its leaves are refused everywhere.
            finish_ca_rotation(pki.directory)
            took["old CA removed"] = await wait_until(
                "old CA removed: every port refuses a leaf of the old CA",
                accepting(renewed_admin, False),
            )
            await wait_until(
                "old CA removed: Envoy trusts the new CA only",
                envoy(None, {new_ca.cert.serial_number}),
            )
            rotation_s = time.monotonic() - t0
            # Traffic after the last step too: connections made from now on use the new CA.
            done = work.succeeded
            await work.wait_succeeded(done + 20, timeout_s=30)
        finally:
            work.stop()
            await task

    assert not history.errors, f"calls failed during the rotation: {history.errors[:10]}"
    assert not history.unknown, f"calls got no answer in time: {history.unknown[:10]}"
    check(history, context="certificate rotation")

    # The old certificates are refused at every port; the current one is accepted.
    for p in every:
        for label, old in (
            ("first leaf", first_admin),
            ("first node leaf", first_node),
            ("renewed leaf of the old CA", renewed_admin),
        ):
            h = await asyncio.to_thread(handshake, p.port, old, pki.ca_cert)
            assert not h.accepted, f"{p.what} accepted the {label} (old CA)"
        ok = await asyncio.to_thread(handshake, p.port, admin, pki.ca_cert)
        assert ok.accepted, f"{p.what} refused the current certificate: {ok.error}"
    print(
        f"\nrotation: {len(every)} ports, {history.summary()}, "
        f"rotation took {rotation_s:.1f} s; pickup per step (s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in took.items())
    )
