"""The front door's routes as built for Envoy: which calls are retried, and how streams live."""

from __future__ import annotations

from dkv_gateway import envoy_config
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)


def _routes() -> dict[str, object]:
    door = envoy_config.FrontDoor(listen_port=2379, gateways=[("127.0.0.1", 2378)])
    listener = envoy_config.listener(door)
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    routes = hcm.route_config.virtual_hosts[0].routes
    return {r.match.path or r.match.prefix: r.route for r in routes}


def test_reads_retry_on_transient_failures_writes_only_when_never_sent() -> None:
    routes = _routes()
    assert routes["/dkv.v1.KV/Range"].retry_policy.retry_on == envoy_config.READ_RETRY_ON  # type: ignore[attr-defined]
    for write in ("/dkv.v1.KV/Put", "/dkv.v1.KV/Delete", "/dkv.v1.KV/"):
        assert routes[write].retry_policy.retry_on == envoy_config.WRITE_RETRY_ON  # type: ignore[attr-defined]
    assert "unavailable" not in envoy_config.WRITE_RETRY_ON
    assert "reset" not in envoy_config.WRITE_RETRY_ON


def test_watch_is_never_retried_nor_cut_by_a_timeout() -> None:
    watch = _routes()["/dkv.v1.KV/Watch"]
    assert not watch.HasField("retry_policy")  # type: ignore[attr-defined]
    assert watch.timeout.ToMilliseconds() == 0  # type: ignore[attr-defined]
    assert watch.HasField("idle_timeout") and watch.idle_timeout.ToMilliseconds() == 0  # type: ignore[attr-defined]
