"""The cluster's own PKI: one CA, a certificate per control-plane client and server, the
service-account key pair, and a kubeconfig per client.

The names and groups are the ones Kubernetes' bootstrap RBAC policy already binds (kubeadm makes
the same set): ``system:kube-controller-manager``, ``system:kube-scheduler``,
``system:kube-proxy``, ``system:node:<node>`` in ``system:nodes`` (the Node authorizer), and an
admin in ``system:masters``. One CA signs them all, serving certificates included: this is a
throwaway single-node cluster, and a second CA would buy nothing here.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dkv.security.certs import make_ca

CA_DAYS = 3650
LEAF_DAYS = 365


@dataclass(frozen=True)
class Leaf:
    """What one certificate is for."""

    name: str  # file stem: pki/<name>.crt, pki/<name>.key
    common_name: str
    groups: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    server: bool = False
    client: bool = True


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca_crt(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(pki: Pki) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{pki.ca_key}: not an EC key")
    return key, x509.load_pem_x509_certificate(pki.ca_crt.read_bytes())


def _make_ca(pki: Pki) -> None:
    # The same shape of CA as dkv's development PKI (self-signed, EC P-256, signs leaves only).
    ca = make_ca("dkv-kube CA", CA_DAYS)
    _write(pki.ca_key, _key_pem(ca.key), private=True)
    _write(pki.ca_crt, ca.cert.public_bytes(serialization.Encoding.PEM))


def _issue(pki: Pki, leaf: Leaf) -> None:
    ca_key, ca_cert = _load_ca(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in leaf.groups]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, leaf.common_name))
    usages = []
    if leaf.server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if leaf.client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in leaf.dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in leaf.ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(pki.key(leaf.name), _key_pem(key), private=True)
    _write(pki.crt(leaf.name), cert.public_bytes(serialization.Encoding.PEM))


def ensure(pki: Pki, leaves: list[Leaf]) -> None:
    """Make the CA, the service-account key pair and every leaf that does not exist yet (a
    second `kube-up` keeps what the running cluster trusts)."""
    pki.dir.mkdir(parents=True, exist_ok=True)
    if not pki.ca_crt.exists() or not pki.ca_key.exists():
        _make_ca(pki)
    if not pki.sa_key.exists() or not pki.sa_pub.exists():
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write(pki.sa_key, _key_pem(sa), private=True)
        _write(
            pki.sa_pub,
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
    for leaf in leaves:
        if not pki.crt(leaf.name).exists() or not pki.key(leaf.name).exists():
            _issue(pki, leaf)


def kubeconfig(pki: Pki, name: str, server: str, cluster: str = "dkv-kube") -> str:
    """A kubeconfig for client certificate NAME, its certificates embedded (so it can be
    copied elsewhere and used as it is). JSON is YAML: kubectl and Helm read it."""

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_crt)},
            }
        ],
        "users": [
            {
                "name": name,
                "user": {
                    "client-certificate-data": b64(pki.crt(name)),
                    "client-key-data": b64(pki.key(name)),
                },
            }
        ],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": name}}],
        "current-context": cluster,
    }
    return json.dumps(config, indent=2) + "\n"
