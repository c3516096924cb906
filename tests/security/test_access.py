"""dkv.security.access.Access in isolation: whose XFCC is believed, the bounded cache of
parsed headers, forgeries counted, and every denial logged (subject, action, resource, method)
and counted by reason."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from dkv.security.access import XFCC_CACHE_MAX, Access, AuthMetrics
from dkv.security.authz import PolicyStore, write_default_policy
from dkv.security.identity import Identity, Kind
from dkv.security.rules import gateway_public_rules
from dkv.v1 import kv_pb2


class Ctx:
    def __init__(self, peer_uri: str, xfcc: str | None) -> None:
        self.peer_uri = peer_uri
        self.xfcc = xfcc

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"peer_spiffe_id": [self.peer_uri.encode()]}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        md: tuple[tuple[str, str], ...] = (("user-agent", "t"),)
        if self.xfcc is not None:
            md += (("x-forwarded-client-cert", self.xfcc),)
        return md

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def access(registry: CollectorRegistry | None = None) -> Access:
    metrics = AuthMetrics(registry) if registry is not None else None
    return Access("gw", gateway_public_rules(), trust_xfcc=True, metrics=metrics)


def test_only_envoys_xfcc_is_believed_and_forgeries_are_counted() -> None:
    registry = CollectorRegistry()
    acc = access(registry)
    alice = "URI=spiffe://dkv/user/alice"
    assert acc.caller(Ctx("spiffe://dkv/envoy", alice)) == Identity.user("alice")
    assert acc.caller(Ctx("spiffe://dkv/envoy", None)) is None
    assert acc.caller(Ctx("spiffe://dkv/envoy", 'Subject="CN=x')) is None  # malformed
    mallory = Identity.user("mallory")
    assert acc.caller(Ctx("spiffe://dkv/user/mallory", alice)) == mallory
    node = Identity(Kind.NODE, "n1")
    assert acc.caller(Ctx("spiffe://dkv/node/n1", alice)) == node
    assert registry.get_sample_value("dkv_auth_forged_xfcc_total") == 2


def test_parsed_headers_are_remembered_within_a_bound() -> None:
    acc = access()
    for i in range(XFCC_CACHE_MAX + 100):
        who = acc.caller(Ctx("spiffe://dkv/envoy", f"URI=spiffe://dkv/user/u{i}"))
        assert who == Identity.user(f"u{i}")
    assert len(acc._xfcc) == XFCC_CACHE_MAX
    # A remembered header answers the same.
    last = f"URI=spiffe://dkv/user/u{XFCC_CACHE_MAX + 99}"
    assert acc.caller(Ctx("spiffe://dkv/envoy", last)) == Identity.user(f"u{XFCC_CACHE_MAX + 99}")


def test_envoys_xfcc_is_not_believed_where_the_port_does_not_trust_it() -> None:
    acc = Access("node", {}, trust_xfcc=False)
    envoy = Identity(Kind.ENVOY)
    assert acc.caller(Ctx("spiffe://dkv/envoy", "URI=spiffe://dkv/user/admin")) == envoy


class Refused(Exception):
    pass


class CallCtx(Ctx):
    """A call's context whose abort raises, as grpc.aio's does, keeping the status."""

    def __init__(self, peer_uri: str | None, xfcc: str | None = None) -> None:
        super().__init__(peer_uri or "", xfcc)
        self.anonymous = peer_uri is None
        self.status: tuple[grpc.StatusCode, str] | None = None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {} if self.anonymous else super().auth_context()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Refused(details)


def test_every_denial_is_logged_with_its_fields_and_counted_by_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    files = write_default_policy(tmp_path)
    acc = Access(
        "gw",
        gateway_public_rules(),
        policy=PolicyStore(files),
        trust_xfcc=True,
        metrics=AuthMetrics(registry),
    )
    times = iter(range(0, 1000, 10))  # every denial a fresh interval: each one logged
    acc._denials.clock = lambda: float(next(times))
    put = kv_pb2.PutRequest(key=b"app/x", value=b"v")

    def refused(ctx: CallCtx, method: str = "/dkv.v1.KV/Put", req: object = put) -> str:
        with pytest.raises(Refused):
            asyncio.run(acc.check(method, req, ctx))
        assert ctx.status is not None
        return f"{ctx.status[0].name}: {ctx.status[1]}"

    def denied(reason: str) -> float | None:
        return registry.get_sample_value("dkv_auth_denied_total", {"reason": reason})

    caplog.set_level(logging.WARNING, logger="dkv.security.access")
    # The reader may not write: through Envoy (XFCC) as directly.
    got = refused(CallCtx("spiffe://dkv/envoy", "URI=spiffe://dkv/user/reader"))
    assert got == "PERMISSION_DENIED: user:reader may not write b'app/x' (dkv.v1.KV/Put)"
    assert (
        "denied: subject=user:reader action=write resource=b'app/x' method=dkv.v1.KV/Put "
        "server=gw reason=not_permitted"
    ) in caplog.messages
    assert denied("not_permitted") == 1
    # A range straddling nothing the caller holds, by someone the policy does not name.
    scan = kv_pb2.RangeRequest(prefix=b"ap")
    refused(CallCtx("spiffe://dkv/user/mallory"), "/dkv.v1.KV/Range", scan)
    assert (
        "denied: subject=user:mallory action=read resource=[b'ap', b'aq') "
        "method=dkv.v1.KV/Range server=gw reason=not_permitted"
    ) in caplog.messages
    assert denied("not_permitted") == 2
    # A component on the users' port.
    refused(CallCtx("spiffe://dkv/node/n1"))
    assert any("subject=node:n1" in m and "reason=component_only" in m for m in caplog.messages)
    assert denied("component_only") == 1
    # No identity at all (Envoy forwarded no client certificate; or no certificate).
    assert refused(CallCtx("spiffe://dkv/envoy")).startswith("UNAUTHENTICATED: ")
    assert refused(CallCtx(None)).startswith("UNAUTHENTICATED: ")
    assert denied("unauthenticated") == 2
    # A method the table does not name: denied by default.
    refused(CallCtx("spiffe://dkv/user/admin"), "/dkv.v1.KV/Compact")
    assert any("method=dkv.v1.KV/Compact" in m and "reason=no_rule" in m for m in caplog.messages)
    assert denied("no_rule") == 1
    # An allowed call is neither logged nor counted.
    n = len(caplog.messages)
    admin = asyncio.run(acc.check("/dkv.v1.KV/Put", put, CallCtx("spiffe://dkv/user/admin")))
    assert admin == Identity.user("admin") and len(caplog.messages) == n
