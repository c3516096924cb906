"""The development PKI: certificates verify, carry the right SANs, and work for real mTLS."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from dkv.errors import InvalidArgument
from dkv.security import PkiLayout, write_dev_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    d = tmp_path_factory.mktemp("pki")
    write_dev_pki(d, [("node", "n1"), ("node", "n2"), ("client", "admin")])
    return PkiLayout(d)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_leaves_are_signed_by_the_ca_and_carry_sans(pki: PkiLayout) -> None:
    ca = _load(pki.ca_cert)
    leaf = _load(pki.cert("n1"))
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    leaf.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "spiffe://dkv/node/n1" in san.get_values_for_type(x509.UniformResourceIdentifier)
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert oct(pki.key("n1").stat().st_mode & 0o777) == "0o600"


def test_existing_files_are_kept_and_bad_names_refused(pki: PkiLayout) -> None:
    before = pki.cert("n1").read_bytes()
    written = write_dev_pki(pki.directory, [("node", "n1"), ("node", "n3")])
    assert written == [pki.key("n3"), pki.cert("n3")]
    assert pki.cert("n1").read_bytes() == before
    with pytest.raises(InvalidArgument, match="bad component name"):
        write_dev_pki(pki.directory, [("node", "../evil")])


def _serve_once(ctx: ssl.SSLContext, sock: socket.socket, seen: list[str]) -> None:
    conn, _ = sock.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            peer = tls.getpeercert()
            seen.append(dict(x[0] for x in peer["subject"])["commonName"] if peer else "")
            tls.sendall(b"ok")
    except (ssl.SSLError, OSError):
        seen.append("handshake failed")


def _handshake(pki: PkiLayout, client_cert: str | None, ca: Path | None = None) -> list[str]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_cert))
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
    server_ctx.load_cert_chain(pki.cert("n1"), pki.key("n1"))
    seen: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as srv:
        t = threading.Thread(target=_serve_once, args=(server_ctx, srv, seen))
        t.start()
        client_ctx = ssl.create_default_context(cafile=str(ca or pki.ca_cert))
        if client_cert:
            client_ctx.load_cert_chain(pki.cert(client_cert), pki.key(client_cert))
        try:
            with (
                socket.create_connection(srv.getsockname(), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                assert tls.recv(2) == b"ok"
        except (ssl.SSLError, OSError):
            pass
        t.join(timeout=10)
    return seen


def test_real_mtls_handshake_over_loopback(pki: PkiLayout) -> None:
    assert _handshake(pki, "admin") == ["admin"]


def test_client_without_a_certificate_is_refused(pki: PkiLayout) -> None:
    assert _handshake(pki, None) == ["handshake failed"]


def test_client_from_another_ca_is_refused(pki: PkiLayout, tmp_path: Path) -> None:
    other = PkiLayout(tmp_path / "other")
    write_dev_pki(other.directory, [("client", "mallory")])
    # mallory's certificate is issued by a different CA: the server must refuse it.
    mixed = PkiLayout(pki.directory)
    (pki.directory / "mallory.crt").write_bytes(other.cert("mallory").read_bytes())
    (pki.directory / "mallory.key").write_bytes(other.key("mallory").read_bytes())
    assert _handshake(mixed, "mallory") == ["handshake failed"]


def test_cli_writes_a_pki_and_rejects_bad_component(tmp_path: Path) -> None:
    dkv = [sys.executable, "-c", "from dkv.cli.main import app; app()"]
    ok = subprocess.run(
        [*dkv, "certs", "--out", str(tmp_path), "--node", "a"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "a.crt").exists() and (tmp_path / "admin.key").exists()
    bad = subprocess.run(
        [*dkv, "certs", "--out", str(tmp_path), "--component", "nokind"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "kind/name" in bad.stderr


def test_cli_issues_one_user_from_the_existing_ca(tmp_path: Path) -> None:
    """``dkv certs user alice`` beside ``make run``'s PKI: the CA is kept, alice's certificate
    is signed by it and names spiffe://dkv/user/alice (and CN=alice)."""
    dkv = [sys.executable, "-c", "from dkv.cli.main import app; app()"]
    write_dev_pki(tmp_path, [("node", "n1"), ("client", "admin")])
    ca_before = (tmp_path / "ca.crt").read_bytes()
    done = subprocess.run(
        [*dkv, "certs", "--out", str(tmp_path), "user", "alice"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    alice, ca = _load(tmp_path / "alice.crt"), _load(tmp_path / "ca.crt")
    alice.verify_directly_issued_by(ca)
    sans = alice.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://dkv/user/alice"]
    assert alice.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "alice"
    missing = subprocess.run(
        [*dkv, "certs", "--out", str(tmp_path), "user"], check=False, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "dkv certs user alice" in missing.stderr
