"""Bearer tokens (issue 11 item 1, optional): Envoy's jwt_authn checks them against a local
JWKS, the gateway takes the verified ``sub`` as a user only from Envoy.

Unit tests: the tokens ``dkv token`` issues verify against its JWKS; the listener's filters;
whom the gateway's access control believes. Then, on `make run`'s stack with bearer tokens on
(real Envoy, real processes): a token is an identity for a client without a certificate, and
every wrong token, a missing one, and a forged subject header (through Envoy and straight to
the gateway) is refused without changing any data.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from dkv_gateway import envoy_config
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from test_access import Ctx
from test_access_stack import free_layout

from dkv.devstack import DevLayout, DevStack
from dkv.errors import InvalidArgument
from dkv.security import write_dev_pki
from dkv.security.access import Access, AuthMetrics
from dkv.security.authz import write_default_policy
from dkv.security.identity import Identity
from dkv.security.rules import gateway_public_rules
from dkv.security.tokens import SUBJECT_HEADER, TokenKeys, issue_token, write_token_keys
from dkv.v1 import kv_pb2

ALICE_GRANTS = "p, user:alice, app/*, read\np, user:alice, app/*, write\n"


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _public_key(jwk: dict[str, str]) -> ec.EllipticCurvePublicKey:
    x, y = (int.from_bytes(_b64(jwk[c]), "big") for c in ("x", "y"))
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()


# -- unit ------------------------------------------------------------------------------------


def test_a_token_verifies_against_the_jwks_and_says_who_for_how_long(tmp_path: Path) -> None:
    keys = write_token_keys(tmp_path / "jwt")
    assert oct(keys.signing_key.stat().st_mode)[-3:] == "600"
    jwks = json.loads(keys.jwks.read_text())
    [jwk] = jwks["keys"]
    token = issue_token(keys.load_key(), "alice", ttl_s=60, now=1_000_000)
    head, body, sig = token.split(".")
    header, claims = json.loads(_b64(head)), json.loads(_b64(body))
    assert header == {"alg": "ES256", "typ": "JWT", "kid": jwk["kid"]}
    assert claims == {
        "iss": "dkv",
        "aud": "dkv",
        "sub": "alice",
        "iat": 1_000_000,
        "exp": 1_000_060,
    }
    raw = _b64(sig)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    _public_key(jwk).verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    # Kept across runs: the same key, the same JWKS.
    assert write_token_keys(tmp_path / "jwt").jwks.read_text() == keys.jwks.read_text()
    with pytest.raises(InvalidArgument):
        issue_token(keys.load_key(), "not a name")
    with pytest.raises(InvalidArgument, match="a token lives"):
        issue_token(keys.load_key(), "alice", ttl_s=8 * 24 * 3600)


def test_dkv_token_prints_one(tmp_path: Path) -> None:
    dkv = [sys.executable, "-c", "from dkv.cli.main import app; app()"]
    out = subprocess.run(
        [*dkv, "token", "alice", "--dir", str(tmp_path), "--ttl", "120"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    claims = json.loads(_b64(out.split(".")[1]))
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 120
    assert TokenKeys(tmp_path).jwks.exists()
    bad = subprocess.run(
        [*dkv, "token", "node:n1", "--dir", str(tmp_path)], check=False, capture_output=True
    )
    assert bad.returncode == 2


def test_the_listener_sanitizes_then_checks_tokens_and_lets_certificateless_clients_in() -> None:
    tls = envoy_config.TlsFiles("/c.crt", "/c.key", "/ca.crt")
    door = envoy_config.FrontDoor(listen_port=1, gateways=[("127.0.0.1", 2)], listener_tls=tls)
    plain = json.loads(envoy_config.json_format.MessageToJson(envoy_config.listener(door)))
    with_jwt = envoy_config.FrontDoor(
        listen_port=1,
        gateways=[("127.0.0.1", 2)],
        listener_tls=tls,
        jwt=envoy_config.Jwt("/jwt/jwks.json"),
    )
    listener = json.loads(envoy_config.json_format.MessageToJson(envoy_config.listener(with_jwt)))

    def filters(config: dict[str, Any]) -> list[str]:
        [chain] = config["filterChains"]
        return [f["name"] for f in chain["filters"][0]["typedConfig"]["httpFilters"]]

    def requires_cert(config: dict[str, Any]) -> bool:
        [chain] = config["filterChains"]
        return bool(chain["transportSocket"]["typedConfig"]["requireClientCertificate"])

    assert "envoy.filters.http.jwt_authn" not in filters(plain) and requires_cert(plain)
    names = filters(listener)
    assert names.index("envoy.filters.http.header_mutation") + 1 == names.index(
        "envoy.filters.http.jwt_authn"
    )
    assert names.index("envoy.filters.http.local_ratelimit") < names.index(
        "envoy.filters.http.header_mutation"
    )
    assert not requires_cert(listener)
    with pytest.raises(InvalidArgument, match="TLS"):
        envoy_config.listener(
            envoy_config.FrontDoor(
                listen_port=1, gateways=[("h", 2)], jwt=envoy_config.Jwt("/j.json")
            )
        )


class TokenCtx(Ctx):
    def __init__(self, peer_uri: str, xfcc: str | None, subject: str | None) -> None:
        super().__init__(peer_uri, xfcc)
        self.subject = subject

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        md = super().invocation_metadata()
        return md + (((SUBJECT_HEADER, self.subject),) if self.subject is not None else ())


def test_the_gateway_believes_a_token_subject_only_from_envoy() -> None:
    registry = CollectorRegistry()
    acc = Access("gw", gateway_public_rules(), trust_xfcc=True, metrics=AuthMetrics(registry))
    envoy = "spiffe://dkv/envoy"
    assert acc.caller(TokenCtx(envoy, None, "alice")) == Identity.user("alice")
    assert acc.caller(TokenCtx(envoy, None, "not a name")) is None
    assert acc.caller(TokenCtx(envoy, None, None)) is None
    # A certificate wins over a token.
    assert acc.caller(TokenCtx(envoy, "URI=spiffe://dkv/user/bob", "alice")) == Identity.user("bob")
    # Anyone else's header is ignored and counted.
    assert acc.caller(TokenCtx("spiffe://dkv/user/mallory", None, "admin")) == Identity.user(
        "mallory"
    )
    assert registry.get_sample_value("dkv_auth_forged_xfcc_total") == 1
    # A port that does not trust Envoy's headers takes Envoy for itself.
    node = Access("node", {}, trust_xfcc=False)
    assert node.caller(TokenCtx(envoy, None, "admin")) == Identity(
        Identity.parse_subject("envoy").kind
    )


# -- through the real Envoy --------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    root = tmp_path_factory.mktemp("tokens") / ".dkv"
    layout = DevLayout(**{**free_layout(root).__dict__, "bearer_tokens": True})
    write_dev_pki(layout.certs.directory, [("user", "admin"), ("user", "reader")])
    write_default_policy(layout.auth_dir, extra=ALICE_GRANTS)
    stack = DevStack(layout)
    try:
        stack.start()
        asyncio.run(stack.wait_ready())
        yield stack
    finally:
        stack.stop()


class Door:
    """gRPC and HTTPS to a port, with a token and/or a certificate, or neither."""

    def __init__(self, layout: DevLayout, port: int, cert: str | None = None) -> None:
        pki = layout.certs
        key_pem = pki.key(cert).read_bytes() if cert else None
        cert_pem = pki.cert(cert).read_bytes() if cert else None
        creds = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes(), key_pem, cert_pem)
        self.channel = grpc.secure_channel(f"127.0.0.1:{port}", creds)
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        if cert:
            ctx.load_cert_chain(str(pki.cert(cert)), str(pki.key(cert)))
        self.http = httpx.Client(verify=ctx, timeout=10, base_url=f"https://127.0.0.1:{port}")

    def put(self, key: bytes, headers: dict[str, str]) -> grpc.StatusCode:
        call: Any = self.channel.unary_unary(
            "/dkv.v1.KV/Put",
            request_serializer=kv_pb2.PutRequest.SerializeToString,
            response_deserializer=kv_pb2.PutResponse.FromString,
        )
        try:
            call(kv_pb2.PutRequest(key=key, value=b"t"), timeout=10, metadata=list(headers.items()))
        except grpc.RpcError as exc:
            self.details = str(exc.details())  # type: ignore[attr-defined]
            code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
            return code
        self.details = ""
        return grpc.StatusCode.OK

    def http_put(self, key: bytes, headers: dict[str, str]) -> int:
        path = "/v1/kv/" + base64.urlsafe_b64encode(key).decode()
        resp = self.http.put(path, json={"value": "dA=="}, headers=headers)
        self.body = resp.text
        return resp.status_code

    def close(self) -> None:
        self.channel.close()
        self.http.close()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.mark.slow
def test_tokens_through_the_real_envoy(stack: DevStack, tmp_path: Path) -> None:
    layout = stack.layout
    key = TokenKeys(layout.jwt_dir).load_key()
    alice = bearer(issue_token(key, "alice"))
    other_key = write_token_keys(tmp_path / "other").load_key()
    wrong = {
        "signed by another key": issue_token(other_key, "alice"),
        "expired": issue_token(key, "alice", ttl_s=60, now=time.time() - 3600),
        "another audience": issue_token(key, "alice", audience="someone-else"),
        "another issuer": issue_token(key, "alice", issuer="someone-else"),
        "not a token": "eyJub3QiOiJhIHRva2VuIn0.e30.AAAA",
    }
    bare = Door(layout, layout.front_door)  # no certificate
    reader = Door(layout, layout.front_door, "reader")
    admin = Door(layout, layout.front_door, "admin")
    at_gateway = Door(layout, layout.gateway, "reader")
    try:
        # A token is alice, for a client without a certificate: her grant, and no more.
        assert bare.put(b"app/grpc", alice) is grpc.StatusCode.OK
        assert bare.http_put(b"app/http", alice) == 200, bare.body
        got = bare.http.get(
            "/v1/kv/" + base64.urlsafe_b64encode(b"app/http").decode(), headers=alice
        )
        assert got.status_code == 200 and json.loads(got.text)["kvs"][0]["value"] == "dA=="
        assert bare.put(b"other", alice) is grpc.StatusCode.PERMISSION_DENIED
        assert bare.details == "user:alice may not write b'other' (dkv.v1.KV/Put)"
        assert bare.http_put(b"other", alice) == 403

        # Neither a token nor a certificate: nobody.
        assert bare.put(b"app/none", {}) is grpc.StatusCode.UNAUTHENTICATED
        assert bare.http_put(b"app/none", {}) == 401
        # A bad token is refused by Envoy: 401 (UNAUTHENTICATED over gRPC), or 403 for a token
        # meant for another audience (Envoy's "Audiences in Jwt are not allowed").
        for what, token in wrong.items():
            status, code = (
                (403, DENIED)
                if what == "another audience"
                else (401, grpc.StatusCode.UNAUTHENTICATED)
            )
            assert bare.put(b"app/bad", bearer(token)) is code, what
            assert "Jwt" in bare.details, (what, bare.details)  # Envoy's words, not the gateway's
            assert bare.http_put(b"app/bad", bearer(token)) == status, what
            assert reader.put(b"app/bad", bearer(token)) is code, what
        # A forged subject header gains nothing: Envoy removes it, with a token or without.
        assert bare.put(b"app/f", {SUBJECT_HEADER: "admin"}) is grpc.StatusCode.UNAUTHENTICATED
        assert bare.http_put(b"other", {SUBJECT_HEADER: "admin", **alice}) == 403
        assert bare.put(b"other", {SUBJECT_HEADER: "admin", **alice}) is DENIED
        # A certificate wins over a token; certificates work as before.
        assert reader.put(b"app/r", alice) is DENIED and "user:reader" in reader.details
        assert admin.put(b"admin/k", {}) is grpc.StatusCode.OK

        # Straight to the gateway: only Envoy's subject header is believed, and it is counted.
        before = forged(layout)
        assert at_gateway.put(b"other", {SUBJECT_HEADER: "admin"}) is DENIED
        assert "user:reader" in at_gateway.details
        assert forged(layout) == before + 1

        # A certificate of another CA is refused in the handshake all the same.
        foreign = tmp_path / "foreign"
        write_dev_pki(foreign, [("user", "admin")])
        creds = grpc.ssl_channel_credentials(
            layout.certs.ca_cert.read_bytes(),
            (foreign / "admin.key").read_bytes(),
            (foreign / "admin.crt").read_bytes(),
        )
        with grpc.secure_channel(f"127.0.0.1:{layout.front_door}", creds) as channel:
            put = channel.unary_unary("/dkv.v1.KV/Put")
            with pytest.raises(grpc.RpcError) as err:
                put(kv_pb2.PutRequest(key=b"other", value=b"x").SerializeToString(), timeout=10)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]

        # Nothing a refused call named was written.
        rng: Any = admin.channel.unary_unary(
            "/dkv.v1.KV/Range",
            request_serializer=kv_pb2.RangeRequest.SerializeToString,
            response_deserializer=kv_pb2.RangeResponse.FromString,
        )
        keys = {
            kv.key for kv in rng(kv_pb2.RangeRequest(key=b"\0", range_end=b"\0"), timeout=10).kvs
        }
        assert {b"app/grpc", b"app/http", b"admin/k"} <= keys
        assert not keys & {b"other", b"app/none", b"app/bad", b"app/f", b"app/r"}
    finally:
        for d in (bare, reader, admin, at_gateway):
            d.close()


DENIED = grpc.StatusCode.PERMISSION_DENIED


def forged(layout: DevLayout) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{layout.gateway_metrics}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "dkv_auth_forged_xfcc_total"
    )
