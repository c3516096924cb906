"""Rotate a development PKI (:mod:`dkv.security.certs`) in place, under running processes.

Every file is written atomically (``os.replace``: a watcher never sees half a file), each key
before its certificate; a process that looks between the two sees a key that does not match
and keeps its previous pair until the certificate follows (:mod:`dkv.security.tls_reload`).

Two kinds of rotation:

- **leaves** (:func:`renew_leaves`): a new key and certificate for every component, same
  subject and SANs, signed by the same CA. Nothing else changes: old and new leaves verify.
- **the CA**, in three steps, each to be picked up by every process before the next:

  1. :func:`start_ca_rotation`: a new CA (``ca-next.crt``/``ca-next.key``), and ``ca.crt``
     becomes a bundle of both: every process then accepts leaves of either CA;
  2. :func:`renew_leaves` with ``signer="next"``: every component gets a leaf signed by the new
     CA (accepted everywhere thanks to the bundle);
  3. :func:`finish_ca_rotation`: ``ca.crt`` holds the new CA only and ``ca.key`` is its key:
     leaves of the old CA are refused from now on.

Done in one go, a process would refuse peers still presenting the old leaf (step 3 before
step 2 is picked up) or present a leaf its peers cannot verify yet (step 2 before step 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dkv.errors import InvalidArgument
from dkv.security.certs import (
    Issued,
    PkiLayout,
    _key_pem,
    _load_ca,
    _write,
    issue_certificate,
    make_ca,
)

__all__ = [
    "finish_ca_rotation",
    "leaf_names",
    "next_ca_paths",
    "renew_leaves",
    "start_ca_rotation",
]

_CA_NAMES = ("ca", "ca-next")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def next_ca_paths(layout: PkiLayout) -> tuple[Path, Path]:
    """``(certificate, key)`` of the CA that a started rotation moves to."""
    return layout.directory / "ca-next.crt", layout.directory / "ca-next.key"


def leaf_names(layout: PkiLayout) -> list[str]:
    """The components with a certificate and key in ``layout`` (CAs excluded), sorted."""
    return sorted(
        p.stem
        for p in layout.directory.glob("*.crt")
        if p.stem not in _CA_NAMES and layout.key(p.stem).exists()
    )


def _load_next(layout: PkiLayout) -> Issued:
    cert_path, key_path = next_ca_paths(layout)
    if not (cert_path.exists() and key_path.exists()):
        raise InvalidArgument(f"no CA rotation under way in {layout.directory}")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(f"{key_path} is not an EC private key")
    return Issued(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))


def _renew(ca: Issued, old: x509.Certificate) -> Issued:
    """A new leaf like ``old`` (common name, DNS, IP and URI SANs), signed by ``ca``."""
    cn = old.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    if not cn:
        raise InvalidArgument(f"certificate {old.subject.rfc4514_string()} has no common name")
    san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return issue_certificate(
        ca,
        str(cn[0].value),
        dns_names=san.get_values_for_type(x509.DNSName),
        ip_addresses=[str(a) for a in san.get_values_for_type(x509.IPAddress)],
        uri=uris[0] if uris else None,
    )


def renew_leaves(
    directory: str | Path,
    names: list[str] | None = None,
    *,
    signer: Literal["current", "next"] = "current",
) -> dict[str, int]:
    """A new key and certificate for each of ``names`` (default: every component), like the
    old one, signed by the current CA or, during a CA rotation, the next one. Returns
    ``{name: new serial}``."""
    layout = PkiLayout(Path(directory))
    ca = _load_ca(layout) if signer == "current" else _load_next(layout)
    serials: dict[str, int] = {}
    for name in names if names is not None else leaf_names(layout):
        old = x509.load_pem_x509_certificate(layout.cert(name).read_bytes())
        leaf = _renew(ca, old)
        _write(layout.key(name), _key_pem(leaf.key), private=True)
        _write(layout.cert(name), _pem(leaf.cert), private=False)
        serials[name] = int(leaf.cert.serial_number)
    return serials


def start_ca_rotation(directory: str | Path) -> Issued:
    """Step 1: a new CA (kept as ``ca-next.*``), trusted beside the old one (``ca.crt`` is a
    bundle of both, the old first). Returns the new CA."""
    layout = PkiLayout(Path(directory))
    old = _load_ca(layout)
    cert_path, key_path = next_ca_paths(layout)
    if cert_path.exists():
        raise InvalidArgument(f"a CA rotation is already under way in {layout.directory}")
    new = make_ca()
    _write(key_path, _key_pem(new.key), private=True)
    _write(cert_path, _pem(new.cert), private=False)
    _write(layout.ca_cert, _pem(old.cert) + _pem(new.cert), private=False)
    return new


def finish_ca_rotation(directory: str | Path) -> Issued:
    """Step 3: only the new CA is trusted (``ca.crt``), and it signs what comes next
    (``ca.key``). Call once every process runs with leaves of the new CA."""
    layout = PkiLayout(Path(directory))
    new = _load_next(layout)
    _write(layout.ca_cert, _pem(new.cert), private=False)
    _write(layout.ca_key, _key_pem(new.key), private=True)
    for p in next_ca_paths(layout):
        p.unlink()
    return new
