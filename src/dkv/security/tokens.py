"""Bearer tokens for HTTP clients that cannot hold a client certificate (``dkv token``).

Envoy validates them, never the gateway: its ``jwt_authn`` filter checks a token's signature
against a local JWKS file, its issuer, audience and expiry, and passes only the token's
``sub`` on to the gateway in :data:`SUBJECT_HEADER` (a header a client sent itself is removed
first). The gateway believes that header only on a connection from Envoy's own certificate,
as it does XFCC (:mod:`dkv.security.access`), and takes ``sub`` as a *user* name:
``{"sub": "alice"}`` is ``user:alice``. A token never names a component (nodes, gateways,
Envoy and membership hold certificates).

This module makes the development signing key and its JWKS (``jwks.json``, the public half
Envoy reads) and issues tokens: ES256 (ECDSA P-256, SHA-256), as short-lived as you like
(``exp`` is required). In production, point Envoy at your identity provider's JWKS instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from dkv.errors import InvalidArgument
from dkv.security.identity import Identity

__all__ = [
    "AUDIENCE",
    "ISSUER",
    "SUBJECT_HEADER",
    "TokenKeys",
    "issue_token",
    "jwks",
    "write_token_keys",
]

SUBJECT_HEADER = "x-dkv-jwt-subject"
"""The header Envoy sets to a verified token's ``sub`` (and removes from clients' requests)."""

ISSUER = "dkv"
AUDIENCE = "dkv"
TTL_S_MAX = 7 * 24 * 3600  # Envoy refuses tokens meant to live longer (max_lifetime)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _coordinate(n: int) -> str:
    return _b64url(n.to_bytes(32, "big"))


def _jwk(public: ec.EllipticCurvePublicKey) -> dict[str, str]:
    nums = public.public_numbers()
    core = {"crv": "P-256", "kty": "EC", "x": _coordinate(nums.x), "y": _coordinate(nums.y)}
    # RFC 7638 thumbprint: the required members, sorted, no whitespace.
    thumb = hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode())
    return {**core, "kid": _b64url(thumb.digest()), "alg": "ES256", "use": "sig"}


def jwks(*public_keys: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """A JWKS holding ``public_keys`` (several while a signing key is being replaced)."""
    return {"keys": [_jwk(k) for k in public_keys]}


@dataclass(frozen=True, slots=True)
class TokenKeys:
    """The signing key and the JWKS file of a directory (``dkv token``'s ``--dir``)."""

    directory: Path

    @property
    def signing_key(self) -> Path:
        return self.directory / "signing.key"

    @property
    def jwks(self) -> Path:
        return self.directory / "jwks.json"

    def load_key(self) -> ec.EllipticCurvePrivateKey:
        try:
            key = serialization.load_pem_private_key(self.signing_key.read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read the signing key {self.signing_key}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise InvalidArgument(f"{self.signing_key} is not an EC P-256 private key")
        return key


def write_token_keys(directory: Path) -> TokenKeys:
    """A signing key (0600) and its ``jwks.json`` in ``directory``, unless they exist."""
    keys = TokenKeys(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not keys.signing_key.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(keys.signing_key, pem, 0o600)
    if not keys.jwks.exists():
        text = json.dumps(jwks(keys.load_key().public_key()), indent=2) + "\n"
        _write(keys.jwks, text.encode(), 0o644)
    return keys


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def issue_token(
    key: ec.EllipticCurvePrivateKey,
    user: str,
    *,
    ttl_s: int = 3600,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    now: float | None = None,
) -> str:
    """A compact ES256 JWT naming ``user`` (``sub``), valid for ``ttl_s`` seconds from
    ``now``. InvalidArgument for a name that is no user name or a lifetime out of range."""
    Identity.user(user)  # a valid name, or InvalidArgument
    if not 1 <= ttl_s <= TTL_S_MAX:
        raise InvalidArgument(f"a token lives 1 s to {TTL_S_MAX} s, not {ttl_s}")
    issued = int(time.time() if now is None else now)
    header = {"alg": "ES256", "typ": "JWT", "kid": _jwk(key.public_key())["kid"]}
    claims = {"iss": issuer, "aud": audience, "sub": user, "iat": issued, "exp": issued + ttl_s}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
