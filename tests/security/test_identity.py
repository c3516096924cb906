"""Identities: SPIFFE IDs of dkv's PKI, what gRPC's auth context says about a real mTLS peer,
and Envoy's x-forwarded-client-cert header."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from dkv.errors import InvalidArgument
from dkv.security import PkiLayout, write_dev_pki
from dkv.security.certs import issue_certificate, make_ca, uri_for
from dkv.security.identity import (
    Identity,
    Kind,
    identity_from_auth_context,
    identity_from_uri,
    spiffe_id,
)
from dkv.security.xfcc import identity_from_xfcc, parse_xfcc


def test_spiffe_ids_of_every_kind() -> None:
    assert uri_for("user", "alice") == "spiffe://dkv/user/alice"
    assert uri_for("client", "admin") == "spiffe://dkv/user/admin"  # the old kind name
    assert uri_for("node", "n1") == "spiffe://dkv/node/n1"
    assert uri_for("membership", "m2") == "spiffe://dkv/membership/m2"
    assert uri_for("gateway", "gw-7") == "spiffe://dkv/gateway"  # one identity for all
    assert uri_for("envoy", "envoy") == "spiffe://dkv/envoy"
    with pytest.raises(InvalidArgument, match="unknown kind 'dkv'"):
        uri_for("dkv", "x")
    assert spiffe_id("user", "bob", "prod.example") == "spiffe://prod.example/user/bob"
    with pytest.raises(InvalidArgument):
        spiffe_id("user", "bob", "Bad Domain")


@pytest.mark.parametrize(
    ("uri", "subject"),
    [
        ("spiffe://dkv/user/alice", "user:alice"),
        ("spiffe://dkv/node/n1", "node:n1"),
        ("spiffe://dkv/membership/m1", "membership:m1"),
        ("spiffe://dkv/gateway", "gateway"),
        ("spiffe://dkv/envoy", "envoy"),
        ("spiffe://other/user/alice", None),  # another trust domain
        ("spiffe://dkv/root/alice", None),  # no such kind
        ("spiffe://dkv/user", None),  # a user needs a name
        ("spiffe://dkv/gateway/gw1", None),  # the gateway has none
        ("spiffe://dkv/user/a/b", None),
        ("spiffe://dkv/user/../admin", None),
        ("https://dkv/user/alice", None),
    ],
)
def test_identities_from_uris(uri: str, subject: str | None) -> None:
    found = identity_from_uri(uri)
    assert (found.subject if found else None) == subject


def test_subjects_parse_back() -> None:
    for s in ("user:alice", "node:n1", "membership:m1", "gateway", "envoy"):
        assert Identity.parse_subject(s).subject == s
    for bad in ("alice", "user:", "gateway:x", "root:x", "user:a b"):
        with pytest.raises(InvalidArgument):
            Identity.parse_subject(bad)


def test_auth_context_shapes() -> None:
    ours = {"peer_spiffe_id": [b"spiffe://dkv/user/alice"], "x509_common_name": [b"alice"]}
    assert identity_from_auth_context(ours) == Identity(Kind.USER, "alice")
    sans = {"x509_subject_alternative_name": [b"localhost", b"spiffe://dkv/node/n2"]}
    assert identity_from_auth_context(sans) == Identity(Kind.NODE, "n2")
    cn_only = {"x509_common_name": [b"carol"]}
    assert identity_from_auth_context(cn_only) == Identity.user("carol")
    # A SPIFFE ID of another domain does not fall back to the CN.
    foreign = {"peer_spiffe_id": [b"spiffe://evil/user/admin"], "x509_common_name": [b"admin"]}
    assert identity_from_auth_context(foreign) is None
    assert identity_from_auth_context({}) is None
    assert identity_from_auth_context({"transport_security_type": [b"ssl"]}) is None


def test_a_real_mtls_peer_is_known_by_its_certificates_uri(tmp_path: Path) -> None:
    """What grpc.aio's auth_context really holds for our certificates, and for one with a CN
    and no URI."""
    pki = PkiLayout(tmp_path)
    write_dev_pki(pki.directory, [("node", "n1"), ("user", "alice")])
    seen: list[Identity | None] = []

    async def whoami(request: bytes, context: Any) -> bytes:
        seen.append(identity_from_auth_context(context.auth_context()))
        return b""

    async def scenario() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "t.T", {"W": grpc.unary_unary_rpc_method_handler(whoami)}
                ),
            )
        )
        creds = grpc.ssl_server_credentials(
            [(pki.key("n1").read_bytes(), pki.cert("n1").read_bytes())],
            root_certificates=pki.ca_cert.read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        try:
            ca = pki.ca_cert.read_bytes()
            for key, cert in (
                (pki.key("alice").read_bytes(), pki.cert("alice").read_bytes()),
                cn_only_pair(pki),
            ):
                ch_creds = grpc.ssl_channel_credentials(ca, key, cert)
                async with grpc.aio.secure_channel(
                    f"127.0.0.1:{port}",
                    ch_creds,
                    options=(("grpc.ssl_target_name_override", "n1"),),
                ) as ch:
                    await ch.unary_unary("/t.T/W")(b"")
        finally:
            await server.stop(None)

    asyncio.run(scenario())
    assert seen == [Identity.user("alice"), Identity.user("dave")]


def cn_only_pair(pki: PkiLayout) -> tuple[bytes, bytes]:
    """A certificate of our CA with CN=dave and no URI SAN."""
    from cryptography.hazmat.primitives import serialization

    from dkv.security.certs import Issued, _load_ca

    ca: Issued = _load_ca(pki)
    leaf = issue_certificate(ca, "dave", uri=None)
    key = leaf.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key, leaf.cert.public_bytes(serialization.Encoding.PEM)


def test_xfcc_elements_quotes_and_identities() -> None:
    one = (
        'By=spiffe://dkv/gateway;Hash=abc123;Subject="CN=alice,O=dkv";'
        "URI=spiffe://dkv/user/alice;DNS=localhost;DNS=alice"
    )
    [el] = parse_xfcc(one)
    assert el["subject"] == ["CN=alice,O=dkv"]
    assert el["dns"] == ["localhost", "alice"]
    assert identity_from_xfcc(one) == Identity.user("alice")
    # Several hops: the last is the one the nearest proxy (Envoy) set.
    two = 'URI=spiffe://dkv/user/mallory,By=x;URI=spiffe://dkv/user/bob;Subject="CN=bob"'
    assert [e["uri"] for e in parse_xfcc(two)] == [
        ["spiffe://dkv/user/mallory"],
        ["spiffe://dkv/user/bob"],
    ]
    assert identity_from_xfcc(two) == Identity.user("bob")
    # Escaped quotes and separators inside quotes.
    tricky = r'Subject="CN=e\"ve;x=1,O=a";Hash=1'
    assert parse_xfcc(tricky)[0]["subject"] == ['CN=e"ve;x=1,O=a']
    # No URI: the Subject's CN is a user.
    assert identity_from_xfcc('Hash=1;Subject="O=dkv,CN=carol"') == Identity.user("carol")
    # A foreign SPIFFE ID is no identity, not a CN fallback.
    assert identity_from_xfcc('URI=spiffe://evil/user/admin;Subject="CN=admin"') is None
    assert identity_from_xfcc("") is None
    for bad in ('Subject="CN=x', "NoEquals", "a=1;=2"):
        with pytest.raises(InvalidArgument):
            parse_xfcc(bad)
    with pytest.raises(InvalidArgument, match="longer than"):
        parse_xfcc("Hash=" + "a" * 20_000)


def test_ca_signed_certificates_for_every_component_carry_their_ids(tmp_path: Path) -> None:
    from cryptography import x509

    write_dev_pki(tmp_path, [("gateway", "gateway"), ("envoy", "envoy"), ("user", "alice")])
    pki = PkiLayout(tmp_path)
    for name, uri in (
        ("gateway", "spiffe://dkv/gateway"),
        ("envoy", "spiffe://dkv/envoy"),
        ("alice", "spiffe://dkv/user/alice"),
    ):
        cert = x509.load_pem_x509_certificate(pki.cert(name).read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert make_ca() is not None


@pytest.mark.parametrize("prog", ["dkv_gateway.main", "dkv_node.main", "dkv_membership.main"])
def test_a_bad_trust_domain_is_refused_in_one_line(prog: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    args = {
        "dkv_gateway.main": ["--membership", "127.0.0.1:1"],
        "dkv_node.main": ["--membership", "127.0.0.1:1", "--name", "n1"],
        "dkv_membership.main": ["--name", "m1", "--initial-cluster", "m1=127.0.0.1:1"],
    }[prog]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            prog,
            *args,
            "--data-dir",
            str(tmp_path),
            "--trust-domain",
            "Evil Corp",
        ]
        if prog != "dkv_gateway.main"
        else [sys.executable, "-m", prog, *args, "--trust-domain", "Evil Corp"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    # The reason on one line (dkv-membership, an argparse usage error, prints the usage first).
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert "bad trust domain 'Evil Corp'" in lines[-1], out.stderr
    assert prog == "dkv_membership.main" or len(lines) == 1, out.stderr


def test_identities_of_another_trust_domain() -> None:
    from dkv.security.identity import check_trust_domain

    check_trust_domain("prod.example")
    with pytest.raises(InvalidArgument, match="bad trust domain"):
        check_trust_domain("Prod")
    ours = {"peer_spiffe_id": [b"spiffe://prod.example/user/alice"]}
    assert identity_from_auth_context(ours, "prod.example") == Identity.user("alice")
    assert identity_from_auth_context(ours) is None  # not the default domain's
