"""The ADS servicer driven without Envoy: a test client speaks DiscoveryRequest/Response over a
real grpc.aio channel on 127.0.0.1.

"No response" is never proven by sleeping: the test waits (event-driven, ``AdsServer.wait_for``)
until the server has processed the request, then provokes a response that must come next; any
response the server should not have sent would arrive first on the ordered stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from dkv_gateway import envoy_config
from dkv_gateway.xds import CLUSTER_TYPE, LISTENER_TYPE, AdsServer
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

READ_TIMEOUT_S = 10.0  # a failure guard only; passing tests never wait for it


def _door(gateway_port: int = 5000, listen_port: int = 10000) -> envoy_config.FrontDoor:
    return envoy_config.FrontDoor(listen_port=listen_port, gateways=[("127.0.0.1", gateway_port)])


def _clusters(gateway_port: int = 5000) -> list[cluster_pb2.Cluster]:
    return [envoy_config.gateway_cluster(_door(gateway_port))]


def _listeners(listen_port: int = 10000) -> list[listener_pb2.Listener]:
    return [envoy_config.listener(_door(listen_port=listen_port))]


class Client:
    """One ADS stream, as Envoy would hold it."""

    def __init__(self, call: Any) -> None:
        self.call = call

    async def send(
        self,
        type_url: str,
        *,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
        node_id: str = "",
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, version_info=version, response_nonce=nonce
        )
        if node_id:
            request.node.id = node_id
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(request)

    async def recv(self) -> discovery_pb2.DiscoveryResponse:
        response = await asyncio.wait_for(self.call.read(), READ_TIMEOUT_S)
        assert isinstance(response, discovery_pb2.DiscoveryResponse), response
        return response

    async def ack(self, response: discovery_pb2.DiscoveryResponse) -> None:
        await self.send(response.type_url, version=response.version_info, nonce=response.nonce)

    async def subscribe_both(
        self,
    ) -> tuple[discovery_pb2.DiscoveryResponse, discovery_pb2.DiscoveryResponse]:
        """Subscribe to CDS then LDS, like Envoy; return the two first responses."""
        await self.send(CLUSTER_TYPE, node_id="test-node")
        cds = await self.recv()
        await self.send(LISTENER_TYPE)
        lds = await self.recv()
        return cds, lds

    async def subscribe_and_ack(
        self, ads: AdsServer
    ) -> tuple[discovery_pb2.DiscoveryResponse, discovery_pb2.DiscoveryResponse]:
        """Subscribe to both types and ACK both, once the server counted the ACKs."""
        cds, lds = await self.subscribe_both()
        before = ads.acks
        await self.ack(cds)
        await self.ack(lds)
        await ads.wait_for(lambda: ads.acks == before + 2)
        return cds, lds


@asynccontextmanager
async def running(ads: AdsServer) -> AsyncIterator[Callable[[], Awaitable[Client]]]:
    server = grpc.aio.server()
    ads.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)

    async def connect() -> Client:
        return Client(stub.StreamAggregatedResources())

    try:
        yield connect
    finally:
        await ads.close()
        await channel.close()
        await server.stop(grace=None)


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_first_response_per_type_has_version_nonce_and_resources() -> None:
    async def scenario() -> None:
        ads = AdsServer(clusters=_clusters(), listeners=_listeners())
        async with running(ads) as connect:
            client = await connect()
            cds, lds = await client.subscribe_both()
            assert cds.type_url == CLUSTER_TYPE
            assert cds.version_info == ads.version(CLUSTER_TYPE) != ""
            assert cds.nonce
            [packed] = cds.resources
            cluster = cluster_pb2.Cluster()
            assert packed.Unpack(cluster)
            assert cluster.name == envoy_config.GATEWAY_CLUSTER_NAME
            assert lds.type_url == LISTENER_TYPE
            assert lds.version_info == ads.version(LISTENER_TYPE)
            assert lds.nonce and lds.nonce != cds.nonce
            listener = listener_pb2.Listener()
            assert lds.resources[0].Unpack(listener)
            assert listener.name == envoy_config.LISTENER_NAME
            assert (ads.responses, ads.pushes) == (2, 0)

    _run(scenario)


def test_ack_gets_no_answer() -> None:
    async def scenario() -> None:
        ads = AdsServer(clusters=_clusters(), listeners=_listeners(), debounce_s=0)
        async with running(ads) as connect:
            client = await connect()
            cds, lds = await client.subscribe_and_ack(ads)
            assert ads.responses == 2
            assert ads.acked_versions() == [
                {CLUSTER_TYPE: cds.version_info, LISTENER_TYPE: lds.version_info}
            ]
            # Provoke one push: if the ACKs had been answered, those answers would come first.
            ads.set_resources(listeners=_listeners(listen_port=10001))
            pushed = await client.recv()
            assert pushed.type_url == LISTENER_TYPE
            assert pushed.version_info not in (lds.version_info, "")
            assert (ads.responses, ads.pushes, ads.nacks) == (3, 1, 0)

    _run(scenario)


def test_nack_is_counted_logged_and_not_resent(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        ads = AdsServer(clusters=_clusters(), listeners=_listeners(), debounce_s=0)
        async with running(ads) as connect:
            client = await connect()
            cds, lds = await client.subscribe_both()
            await client.ack(cds)
            # Reject the listeners, keeping the previous (here: no) version, as Envoy does.
            await client.send(LISTENER_TYPE, nonce=lds.nonce, error="bad listener: port in use")
            await ads.wait_for(lambda: ads.nacks == 1)
            assert ads.last_nack is not None
            assert ads.last_nack.type_url == LISTENER_TYPE
            assert ads.last_nack.version_rejected == lds.version_info
            assert ads.last_nack.message == "bad listener: port in use"
            assert ads.last_nack.node_id == "test-node"
            assert ads.acks == 1
            # Nothing resent: the next response is the one the next snapshot causes.
            ads.set_resources(clusters=_clusters(gateway_port=5001))
            pushed = await client.recv()
            assert pushed.type_url == CLUSTER_TYPE
            assert (ads.responses, ads.nacks) == (3, 1)

    with caplog.at_level(logging.WARNING, logger="dkv_gateway.xds"):
        _run(scenario)
    [record] = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert "bad listener: port in use" in record.getMessage()
    assert LISTENER_TYPE in record.getMessage()


def test_changing_only_clusters_pushes_only_cds() -> None:
    async def scenario() -> None:
        ads = AdsServer(clusters=_clusters(), listeners=_listeners(), debounce_s=0)
        async with running(ads) as connect:
            client = await connect()
            _cds, lds = await client.subscribe_and_ack(ads)
            ads.set_resources(clusters=_clusters(gateway_port=6000), listeners=_listeners())
            pushed = await client.recv()
            assert pushed.type_url == CLUSTER_TYPE
            cluster = cluster_pb2.Cluster()
            pushed.resources[0].Unpack(cluster)
            endpoint = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint
            assert endpoint.address.socket_address.port_value == 6000
            assert ads.version(LISTENER_TYPE) == lds.version_info
            await client.ack(pushed)
            await ads.wait_for(lambda: ads.acks == 3)
            # The listeners did not change, so the next response is caused by the next change.
            ads.set_resources(clusters=_clusters(gateway_port=6001))
            assert (await client.recv()).type_url == CLUSTER_TYPE
            assert ads.pushes == 2

    _run(scenario)


def test_clusters_are_pushed_before_listeners() -> None:
    async def scenario() -> None:
        ads = AdsServer(clusters=_clusters(), listeners=_listeners(), debounce_s=0)
        async with running(ads) as connect:
            client = await connect()
            await client.subscribe_and_ack(ads)
            # Listeners given first on purpose: the order of the push does not follow the call.
            ads.set_resources(listeners=_listeners(10002), clusters=_clusters(7000))
            first, second = await client.recv(), await client.recv()
            assert [first.type_url, second.type_url] == [CLUSTER_TYPE, LISTENER_TYPE]
            assert ads.pushes == 2

    _run(scenario)


def test_unchanged_resources_push_nothing() -> None:
    async def scenario() -> None:
        ads = AdsServer(clusters=_clusters(), listeners=_listeners(), debounce_s=0)
        async with running(ads) as connect:
            client = await connect()
            cds, lds = await client.subscribe_and_ack(ads)
            ads.set_resources(clusters=_clusters(), listeners=_listeners())  # equal content
            assert (ads.version(CLUSTER_TYPE), ads.version(LISTENER_TYPE)) == (
                cds.version_info,
                lds.version_info,
            )
            ads.set_resources(listeners=_listeners(10003))
            assert (await client.recv()).type_url == LISTENER_TYPE
            assert (ads.responses, ads.pushes) == (3, 1)

    _run(scenario)


def test_stale_nonce_is_ignored() -> None:
    async def scenario() -> None:
        ads = AdsServer(clusters=_clusters(), listeners=_listeners(), debounce_s=0)
        async with running(ads) as connect:
            client = await connect()
            cds, _ = await client.subscribe_both()
            ads.set_resources(clusters=_clusters(5002))
            newer = await client.recv()
            # A NACK and an ACK of the older CDS response: both stale, neither counts.
            await client.send(CLUSTER_TYPE, nonce=cds.nonce, error="old news")
            await client.ack(cds)
            await client.send(CLUSTER_TYPE, nonce="no-such-nonce")
            await ads.wait_for(lambda: ads.stale_requests == 3)
            assert (ads.acks, ads.nacks) == (0, 0)
            await client.ack(newer)
            await ads.wait_for(lambda: ads.acks == 1)
            assert ads.acked_versions() == [{CLUSTER_TYPE: newer.version_info}]
            ads.set_resources(clusters=_clusters(5003))
            assert (await client.recv()).type_url == CLUSTER_TYPE
            assert ads.responses == 4

    _run(scenario)


def test_quick_changes_are_debounced_into_one_push() -> None:
    async def scenario() -> None:
        ads = AdsServer(clusters=_clusters(), listeners=_listeners(), debounce_s=0.05)
        async with running(ads) as connect:
            client = await connect()
            cds, _lds = await client.subscribe_and_ack(ads)
            for port in (8001, 8002, 8003):
                ads.set_resources(clusters=_clusters(port))
            assert ads.version(CLUSTER_TYPE) == cds.version_info  # not applied before the delay
            pushed = await client.recv()
            cluster = cluster_pb2.Cluster()
            pushed.resources[0].Unpack(cluster)
            endpoint = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint
            assert endpoint.address.socket_address.port_value == 8003
            assert ads.pushes == 1
            ads.set_resources(listeners=_listeners(10004))
            assert (await client.recv()).type_url == LISTENER_TYPE  # no second CDS push between
            assert ads.pushes == 2

    _run(scenario)


def test_every_stream_gets_the_push_and_close_ends_streams() -> None:
    async def scenario() -> None:
        ads = AdsServer(clusters=_clusters(), listeners=_listeners(), debounce_s=0)
        async with running(ads) as connect:
            first, second = await connect(), await connect()
            await first.subscribe_both()
            await second.subscribe_both()
            await ads.wait_for(lambda: ads.stream_count == 2)
            ads.set_resources(clusters=_clusters(9000))
            assert (await first.recv()).type_url == CLUSTER_TYPE
            assert (await second.recv()).type_url == CLUSTER_TYPE
            await ads.close()
            assert ads.stream_count == 0
            assert await first.call.read() is grpc.aio.EOF
            assert await first.call.code() == grpc.StatusCode.OK
            with pytest.raises(RuntimeError):
                ads.set_resources(clusters=[])

    _run(scenario)


def test_subscription_before_resources_waits_for_them() -> None:
    async def scenario() -> None:
        ads = AdsServer(debounce_s=0)
        async with running(ads) as connect:
            client = await connect()
            await client.send(CLUSTER_TYPE)
            await ads.wait_for(lambda: ads.requests == 1)
            assert ads.responses == 0
            ads.set_resources(clusters=_clusters())
            response = await client.recv()
            assert response.type_url == CLUSTER_TYPE and len(response.resources) == 1

    _run(scenario)


def test_bad_resources_are_refused() -> None:
    cluster = _clusters()[0]
    with pytest.raises(ValueError, match="duplicate"):
        AdsServer(clusters=[cluster, cluster])
    with pytest.raises(ValueError, match="expected"):
        AdsServer(clusters=_listeners())
