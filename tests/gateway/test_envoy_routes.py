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
    return {r.match.path or r.match.prefix: r.route for r in routes if r.HasField("route")}


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


def test_only_local_origin_failures_and_health_checks_take_a_gateway_out() -> None:
    door = envoy_config.FrontDoor(listen_port=2379, gateways=[("127.0.0.1", 2378)])
    cluster = envoy_config.gateway_cluster(door)
    od = cluster.outlier_detection
    assert od.split_external_local_origin_errors
    assert od.enforcing_consecutive_local_origin_failure.value == 100
    # Unset enforcing_* fields default to 100% in Envoy: each must be explicitly 0.
    for name in (
        "enforcing_consecutive_5xx",
        "enforcing_consecutive_gateway_failure",
        "enforcing_success_rate",
        "enforcing_local_origin_success_rate",
        "enforcing_failure_percentage",
        "enforcing_failure_percentage_local_origin",
    ):
        assert od.HasField(name) and getattr(od, name).value == 0, name
    # Panic (send to every gateway) only once none is healthy.
    assert 0 < cluster.common_lb_config.healthy_panic_threshold.value < 100 / 2
    (check,) = cluster.health_checks
    assert check.grpc_health_check.service_name == envoy_config.KV_SERVICE


def test_grpc_routes_take_only_grpc_and_the_client_deadline_is_not_enforced_by_envoy() -> None:
    for path, route in _routes().items():
        assert not route.HasField("max_stream_duration"), path  # type: ignore[attr-defined]
    door = envoy_config.FrontDoor(listen_port=2379, gateways=[("127.0.0.1", 2378)])
    hcm = hcm_pb2.HttpConnectionManager()
    envoy_config.listener(door).filter_chains[0].filters[0].typed_config.Unpack(hcm)
    for r in hcm.route_config.virtual_hosts[0].routes:
        if r.HasField("route"):
            assert [h.name for h in r.match.headers] == ["content-type"]
        else:
            assert r.HasField("direct_response")
            assert "envoy.filters.http.buffer" in r.typed_per_filter_config
