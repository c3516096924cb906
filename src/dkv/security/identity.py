"""Who is calling: identities from certificates (and, through Envoy, from its XFCC header).

A caller's identity is the SPIFFE URI SAN of its client certificate, as a service mesh names
workloads: ``spiffe://<trust-domain>/user/<name>`` for people and tools,
``.../node/<name>``, ``.../membership/<name>``, ``.../gateway`` and ``.../envoy`` for dkv's own
components. A certificate without such a URI falls back to its Common Name, taken as a user
(``CN=alice`` is ``user:alice``), as etcd's ``--client-cert-auth`` takes the CN as the user.
A URI of another trust domain is no identity at all: a certificate from a foreign CA cannot
pass the TLS handshake, and one from our CA naming another domain was not made by us.

The *subject* (:attr:`Identity.subject`) is what the authorization policy names:
``user:alice``, ``node:n1``, ``membership:m1``, ``gateway``, ``envoy``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from dkv.errors import InvalidArgument

__all__ = [
    "TRUST_DOMAIN",
    "check_trust_domain",
    "Identity",
    "Kind",
    "identity_from_auth_context",
    "identity_from_uri",
    "spiffe_id",
]

TRUST_DOMAIN = "dkv"
"""The trust domain of dkv's development PKI (``dkv certs``) and the chart's default."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")


class Kind(StrEnum):
    USER = "user"
    NODE = "node"
    MEMBERSHIP = "membership"
    GATEWAY = "gateway"
    ENVOY = "envoy"


_UNNAMED = frozenset({Kind.GATEWAY, Kind.ENVOY})  # one identity for every replica


@dataclass(frozen=True, slots=True)
class Identity:
    kind: Kind
    name: str = ""  # "" for the gateway and Envoy

    def __post_init__(self) -> None:
        if (self.kind in _UNNAMED) != (self.name == ""):
            raise InvalidArgument(
                f"a {self.kind} identity {'has no' if self.kind in _UNNAMED else 'needs a'} name"
            )
        if self.name and not _NAME.match(self.name):
            raise InvalidArgument(f"bad identity name {self.name!r}")

    @property
    def subject(self) -> str:
        """The name the authorization policy uses: ``user:alice``, ``gateway``."""
        return f"{self.kind}:{self.name}" if self.name else str(self.kind)

    def spiffe_id(self, trust_domain: str = TRUST_DOMAIN) -> str:
        return spiffe_id(self.kind, self.name, trust_domain)

    @classmethod
    def user(cls, name: str) -> Identity:
        return cls(Kind.USER, name)

    @classmethod
    def parse_subject(cls, subject: str) -> Identity:
        """``user:alice`` -> Identity(USER, "alice"); ``gateway`` -> Identity(GATEWAY).
        InvalidArgument for anything else."""
        kind, _, name = subject.partition(":")
        try:
            return cls(Kind(kind), name)
        except ValueError:
            raise InvalidArgument(
                f"{subject!r} is not a subject (user:NAME, node:NAME, membership:NAME, "
                "gateway, envoy)"
            ) from None

    def __str__(self) -> str:
        return self.subject


def check_trust_domain(trust_domain: str) -> None:
    """InvalidArgument unless ``trust_domain`` is a SPIFFE trust domain name."""
    if not _TRUST_DOMAIN.match(trust_domain):
        raise InvalidArgument(
            f"bad trust domain {trust_domain!r}: lower-case letters, digits, '.', '-', '_'"
        )


def spiffe_id(kind: str, name: str = "", trust_domain: str = TRUST_DOMAIN) -> str:
    """``spiffe://dkv/user/alice``, ``spiffe://dkv/gateway``."""
    check_trust_domain(trust_domain)
    ident = Identity(Kind(kind), name)
    tail = f"/{ident.name}" if ident.name else ""
    return f"spiffe://{trust_domain}/{ident.kind}{tail}"


def identity_from_uri(uri: str, trust_domain: str = TRUST_DOMAIN) -> Identity | None:
    """The identity a SPIFFE URI names, or None (another scheme, trust domain or shape)."""
    prefix = f"spiffe://{trust_domain}/"
    if not uri.startswith(prefix):
        return None
    parts = uri[len(prefix) :].split("/")
    try:
        if len(parts) == 1:
            return Identity(Kind(parts[0]))
        if len(parts) == 2:
            return Identity(Kind(parts[0]), parts[1])
    except (ValueError, InvalidArgument):
        return None
    return None


def _texts(values: Iterable[bytes | str] | None) -> list[str]:
    out = []
    for v in values or ():
        out.append(v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
    return out


def identity_from_auth_context(
    auth: Mapping[str, Iterable[bytes | str]], trust_domain: str = TRUST_DOMAIN
) -> Identity | None:
    """The identity of a gRPC peer from ``context.auth_context()``: its SPIFFE URI SAN (gRPC
    reports it as ``peer_spiffe_id`` when there is exactly one, and among
    ``x509_subject_alternative_name`` otherwise), else its CN as a user; None without a
    verified client certificate (plaintext, or TLS without one)."""
    sans = _texts(auth.get("x509_subject_alternative_name"))
    uris = _texts(auth.get("peer_spiffe_id")) + [s for s in sans if s.startswith("spiffe://")]
    for uri in uris:
        found = identity_from_uri(uri, trust_domain)
        if found is not None:
            return found
    if uris:
        return None  # a SPIFFE identity, but not one of ours: no CN fallback
    for cn in _texts(auth.get("x509_common_name")):
        try:
            return Identity.user(cn)
        except InvalidArgument:
            return None
    return None
