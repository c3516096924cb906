"""dkv.security.access.Access.caller in isolation: whose XFCC is believed, the bounded cache of
parsed headers, and forgeries counted."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from dkv.security.access import XFCC_CACHE_MAX, Access, AuthMetrics
from dkv.security.identity import Identity, Kind
from dkv.security.rules import gateway_public_rules


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
