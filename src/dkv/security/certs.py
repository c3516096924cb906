"""A local certificate authority for development (``dkv certs``).

In Kubernetes, cert-manager issues the certificates; on a laptop this module makes the same
shape of chain with ``cryptography``: one self-signed CA, and for every component a key and a
certificate signed by it, valid for both TLS server and client use (nodes talk mTLS to each
other, so each is both), with DNS and IP SANs for 127.0.0.1 and a SPIFFE URI SAN that is the
caller's identity for authorization (:mod:`dkv.security.identity`): ``spiffe://dkv/user/<name>``
for users, ``.../node/<name>``, ``.../membership/<name>``, ``.../gateway``, ``.../envoy``.

Keys are ECDSA P-256: fast handshakes, small certificates. Files are PEM; private keys are
written with mode 0600. Nothing here is meant for production: the CA key sits next to the
certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dkv.errors import InvalidArgument
from dkv.security.identity import TRUST_DOMAIN, Kind, spiffe_id

__all__ = ["Issued", "PkiLayout", "issue_certificate", "make_ca", "uri_for", "write_dev_pki"]

CA_DAYS = 3650
LEAF_DAYS = 825
_LOCAL_DNS = ("localhost",)
_LOCAL_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(common_name: str = "dkv development CA", days: int = CA_DAYS) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue_certificate(
    ca: Issued,
    common_name: str,
    *,
    dns_names: Sequence[str] = _LOCAL_DNS,
    ip_addresses: Sequence[str] = _LOCAL_IPS,
    uri: str | None = None,
    days: int = LEAF_DAYS,
) -> Issued:
    """A leaf certificate for server and client use, signed by ``ca``."""
    if not common_name:
        raise InvalidArgument("a certificate needs a common name")
    try:
        ips = [ipaddress.ip_address(a) for a in ip_addresses]
    except ValueError as exc:
        raise InvalidArgument(f"bad IP address for a certificate: {exc}") from exc
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ip) for ip in ips]
    if uri:
        sans.append(x509.UniformResourceIdentifier(uri))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(key, cert)


@dataclass(frozen=True)
class PkiLayout:
    """Where ``write_dev_pki`` puts things: ``<dir>/ca.crt``, ``<dir>/<name>.crt|.key``."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: a watcher never sees half a certificate


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(layout: PkiLayout) -> Issued:
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(f"{layout.ca_key} is not an EC private key")
    return Issued(key, x509.load_pem_x509_certificate(layout.ca_cert.read_bytes()))


def _uri_of(cert_file: Path) -> str | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def uri_for(kind: str, name: str, trust_domain: str = TRUST_DOMAIN) -> str:
    """The SPIFFE ID of component ``kind`` called ``name``: the gateway and Envoy have one
    identity for all their replicas (``spiffe://dkv/gateway``), the others one each."""
    try:
        k = Kind.USER if kind == "client" else Kind(kind)
    except ValueError:
        kinds = ", ".join(k.value for k in Kind)
        raise InvalidArgument(f"unknown kind {kind!r}: want one of {kinds}") from None
    return spiffe_id(k, "" if k in (Kind.GATEWAY, Kind.ENVOY) else name, trust_domain)


def write_dev_pki(
    directory: str | Path,
    names: Sequence[tuple[str, str]],
    *,
    force: bool = False,
    extra_dns: Sequence[str] = (),
    trust_domain: str = TRUST_DOMAIN,
) -> list[Path]:
    """Create (or complete) a development PKI in ``directory``.

    ``names`` are ``(kind, name)`` pairs, e.g. ``("node", "n1")``, ``("user", "admin")``
    (``client`` is an old name of ``user``); each gets ``<name>.crt``/``<name>.key`` with the
    identity's SPIFFE URI SAN (:func:`uri_for`). The CA is reused if present, so adding a
    component later keeps existing certificates valid; files that exist are kept unless
    ``force``. Returns the files written."""
    layout = PkiLayout(Path(directory))
    layout.directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if force or not (layout.ca_cert.exists() and layout.ca_key.exists()):
        ca = make_ca()
        _write(layout.ca_key, _key_pem(ca.key), private=True)
        _write(layout.ca_cert, ca.cert.public_bytes(serialization.Encoding.PEM), private=False)
        written += [layout.ca_key, layout.ca_cert]
        force = True  # leaves signed by an old CA would no longer verify
    else:
        ca = _load_ca(layout)
    for kind, name in names:
        if not name or "/" in name or name.startswith("."):
            raise InvalidArgument(f"bad component name {name!r}")
        uri = uri_for(kind, name, trust_domain)
        if (
            not force
            and layout.cert(name).exists()
            and layout.key(name).exists()
            and _uri_of(layout.cert(name)) == uri  # an older scheme of identities: re-issue
        ):
            continue
        leaf = issue_certificate(
            ca,
            name,
            dns_names=(*_LOCAL_DNS, *extra_dns, name),
            uri=uri,
        )
        _write(layout.key(name), _key_pem(leaf.key), private=True)
        _write(layout.cert(name), leaf.cert.public_bytes(serialization.Encoding.PEM), private=False)
        written += [layout.key(name), layout.cert(name)]
    return written
