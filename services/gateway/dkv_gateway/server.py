"""One gateway process assembled from its configuration (DESIGN.md "gateway").

Two gRPC servers:

- the client server on ``listen_client``: the public ``dkv.v1.KV`` service
  (:mod:`dkv_gateway.kv_gateway`) and gRPC health. Health says NOT_SERVING until the cluster
  map is initialized (it has shards), so neither Envoy nor Kubernetes sends traffic to a
  gateway that could only answer "not initialized";
- the xDS server on ``listen_xds``: :class:`dkv_gateway.xds.AdsServer`, which tells Envoy to
  listen on ``envoy_port`` (the front door users hit) and to send KV calls to this gateway
  (:func:`dkv_gateway.envoy_config.resources`).

Both bind before anything is announced, so port 0 works and Envoy is told the bound port.
A background task keeps the cluster map current from the membership service
(:func:`dkv.client.cluster_map.follow_cluster_map`); the gateway holds no other state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dkv.client.cluster_map import ClusterMapView, follow_cluster_map
from dkv.errors import InvalidArgument
from dkv.host.channels import TlsFiles
from dkv.host.rpc_server import bind, new_server, with_port
from dkv.security.access import ProcessAccess
from dkv.security.identity import TRUST_DOMAIN, check_trust_domain
from dkv.security.rules import gateway_public_rules, xds_rules
from dkv.security.tokens import AUDIENCE, ISSUER
from dkv.sizes import VALUE_BYTES_MAX, message_limits
from dkv.telemetry import ProcessMetrics
from dkv.telemetry.http import MetricsServer
from dkv.telemetry.tracing import Tracing, TracingConfig, otlp_host_port
from dkv_gateway.cluster_status import ClusterStatusService, add_cluster_status
from dkv_gateway.envoy_config import FrontDoor, Jwt, resources, write_sds_files
from dkv_gateway.envoy_config import TlsFiles as EnvoyTlsFiles
from dkv_gateway.envoy_config import Tracing as EnvoyTracing
from dkv_gateway.kv_gateway import WATCHES_PER_CALLER_MAX, KvGateway, add_kv_gateway
from dkv_gateway.metrics import GatewayCollector, GatewayMetrics
from dkv_gateway.router import (
    CHANNELS_PER_NODE,
    DEFAULT_TIMEOUT_S,
    ChannelPool,
    NodeChannels,
    Router,
)
from dkv_gateway.xds import AdsServer

__all__ = ["GatewayConfig", "GatewayServer", "split_host_port"]

log = logging.getLogger("dkv.gateway")

KV_SERVICE = "dkv.v1.KV"

# As on the node: answer RESOURCE_EXHAUSTED beyond this many calls in progress (watches
# count), and raise gRPC core's pending-call queue above it so it never drops calls silently.
CLIENT_RPCS_MAX = 4096
CLIENT_SERVER_OPTIONS = (
    ("grpc.server.max_pending_requests", 2 * CLIENT_RPCS_MAX),
    ("grpc.server.max_pending_requests_hard_limit", 4 * CLIENT_RPCS_MAX),
)


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) as (host, port); InvalidArgument when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgument(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class GatewayConfig:
    # Client addresses (host:port) of the membership replicas.
    membership: tuple[str, ...]
    listen_client: str = "127.0.0.1:2378"
    # What Envoy dials (default: --listen-client with the bound port).
    advertise_client: str = ""
    listen_xds: str = "127.0.0.1:2377"
    # The port Envoy's front-door listener opens (what users hit).
    envoy_port: int = 2379
    # The address it listens on: loopback for a local stack, 0.0.0.0 in a pod (a Kubernetes
    # Service reaches the pod's IP, never its loopback).
    envoy_listen_host: str = "127.0.0.1"
    # mTLS: the gateway's own KV port (clients, i.e. Envoy, must present a certificate signed
    # by the CA) and its calls to the nodes' and membership's client ports.
    tls: TlsFiles | None = None
    # Envoy's certificate, key and CA, as paths Envoy reads: its front-door listener serves
    # TLS with them (clients must present a certificate signed by the CA), and it presents
    # them to the gateway when ``tls`` is set. None: a plaintext front door.
    envoy_tls: TlsFiles | None = None
    # A directory Envoy can read where the gateway writes Envoy's SDS files (they name the
    # ``envoy_tls`` files): Envoy then reloads its certificates when they change. "": Envoy
    # reads the files once, at start.
    envoy_sds_dir: str = ""
    # The deadline of a call that carries none.
    default_timeout_ms: int = int(DEFAULT_TIMEOUT_S * 1000)
    # The nodes' --max-value-bytes: the gateway's and Envoy's message limits follow from it
    # (dkv.sizes), so that what the nodes take is not refused on its way to them.
    value_bytes_max: int = VALUE_BYTES_MAX
    # host:port of /metrics, /livez and /readyz; "" serves none (the CLI's default is on).
    listen_metrics: str = ""
    # OpenTelemetry traces (the gateway's and Envoy's spans); off without an OTLP endpoint.
    tracing: TracingConfig = field(default_factory=TracingConfig)
    # model.conf and policy.csv (dkv.security.authz): who may read, write, administer.
    # "": users are not checked (components still are, whenever ``tls`` is on).
    auth_policy_dir: str = ""
    # The SPIFFE trust domain of every identity this process accepts (spiffe://DOMAIN/...).
    trust_domain: str = TRUST_DOMAIN
    # Watch streams one caller (identity) may hold open here (RESOURCE_EXHAUSTED beyond).
    watches_per_caller_max: int = WATCHES_PER_CALLER_MAX
    # HTTP/2 connections to each node (dkv_gateway.router.NodeChannels).
    channels_per_node: int = CHANNELS_PER_NODE
    # A JWKS file (a path Envoy reads): Envoy then also takes bearer tokens signed by its keys,
    # issued by ``envoy_jwt_issuer`` for ``envoy_jwt_audience``, as the identity of clients
    # without a certificate (dkv.security.tokens). "": certificates only.
    envoy_jwks_file: str = ""
    envoy_jwt_issuer: str = ISSUER
    envoy_jwt_audience: str = AUDIENCE

    def validate(self) -> None:
        self.tracing.validate()
        check_trust_domain(self.trust_domain)
        if not self.membership:
            raise InvalidArgument("--membership is required (host:port,... of membership)")
        for address in (*self.membership, self.listen_client, self.listen_xds):
            split_host_port(address)
        if self.advertise_client:
            split_host_port(self.advertise_client)
        if not 1 <= self.envoy_port <= 65535:
            raise InvalidArgument(f"--envoy-port must be in 1..65535, got {self.envoy_port}")
        if self.channels_per_node < 1:
            raise InvalidArgument("--channels-per-node must be >= 1")
        if self.watches_per_caller_max < 1:
            raise InvalidArgument("--watches-per-caller-max must be >= 1")
        if self.default_timeout_ms < 1:
            raise InvalidArgument("--default-timeout-ms must be >= 1")
        if self.value_bytes_max < 1:
            raise InvalidArgument("--max-value-bytes must be >= 1")
        if self.envoy_jwks_file and self.envoy_tls is None:
            raise InvalidArgument(
                "--envoy-jwks-file needs a TLS front door (--envoy-cert-file ...): bearer "
                "tokens would travel in clear"
            )


class GatewayServer:
    """See the module docstring."""

    def __init__(
        self,
        cfg: GatewayConfig,
        rng: random.Random | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """``tracing``: the spans' destination (tests); by default what ``cfg.tracing`` says."""
        cfg.validate()
        self.cfg = cfg
        self.tracing = tracing or Tracing.create(cfg.tracing, "dkv-gateway")
        self.metrics = ProcessMetrics.create()  # one registry per gateway instance
        # A bad policy refuses to start (InvalidArgument naming the file and the line).
        self.access = ProcessAccess(cfg.auth_policy_dir, self.metrics.registry, cfg.trust_domain)
        self.rng = rng or random.Random()
        self.view = ClusterMapView()
        self.initialized = asyncio.Event()  # set once the map has shards
        self.client_server: grpc.aio.Server | None = None
        self.xds_server: grpc.aio.Server | None = None
        self.health: health.HealthServicer | None = None
        self.ads: AdsServer | None = None
        self.router: Router | None = None
        self._node_channels: NodeChannels | None = None
        self._membership_channels: ChannelPool | None = None
        self._follow: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self.gateway_metrics = GatewayMetrics(self.metrics.registry, self.metrics.grpc_client)
        GatewayCollector(self.view, self.gateway_metrics, self.metrics.registry)
        self.metrics_server: MetricsServer | None = None
        self.client_port = 0
        self.xds_port = 0
        self.metrics_port = 0
        self.advertise_client = ""
        self.map_changed_at = time.monotonic()

    async def start(self) -> None:
        try:
            await self._assemble()
        except BaseException:
            await self.stop(grace_s=0)
            raise

    async def _assemble(self) -> None:
        cfg = self.cfg
        # With --listen-metrics off nothing is recorded on the hot paths either.
        recording = bool(cfg.listen_metrics)
        grpc_metrics = self.metrics.grpc_server if recording else None
        limits = message_limits(value_bytes_max=cfg.value_bytes_max)
        # Bind first, so that port 0 works and what we announce is where we listen.
        self.client_server = new_server(
            options=(*CLIENT_SERVER_OPTIONS, *limits.grpc_options()),
            maximum_concurrent_rpcs=CLIENT_RPCS_MAX,
            metrics=grpc_metrics,
            tracer=self.tracing.tracer,
            access=self.access.access(
                "the gateway", gateway_public_rules(), tls=cfg.tls is not None, trust_xfcc=True
            ),
        )
        self.client_port = bind(self.client_server, cfg.listen_client, cfg.tls)
        # mTLS like the KV port when the gateway has a certificate: only Envoy's identity may
        # subscribe (the configuration names every gateway and certificate path).
        self.xds_server = new_server(
            metrics=grpc_metrics,
            access=self.access.access("the xDS server", xds_rules(), tls=cfg.tls is not None),
        )
        self.xds_port = bind(self.xds_server, cfg.listen_xds, cfg.tls)
        if cfg.listen_metrics:
            self.metrics_server = MetricsServer(
                self.metrics.registry, cfg.listen_metrics, self.readiness
            )
            self.metrics_port = await self.metrics_server.start()
        self.advertise_client = cfg.advertise_client or with_port(
            cfg.listen_client, self.client_port
        )
        envoy_files = (
            None
            if cfg.envoy_tls is None
            else EnvoyTlsFiles(
                cfg.envoy_tls.cert_file, cfg.envoy_tls.key_file, cfg.envoy_tls.trusted_ca_file
            )
        )
        door = FrontDoor(
            listen_port=cfg.envoy_port,
            listen_host=cfg.envoy_listen_host,
            gateways=[split_host_port(self.advertise_client)],
            listener_tls=envoy_files,
            upstream_tls=envoy_files if cfg.tls is not None else None,
            tracing=self._envoy_tracing(),
            grpc_request_bytes_max=limits.request_bytes_max,
            sds_dir=cfg.envoy_sds_dir if envoy_files is not None else "",
            jwt=(
                Jwt(cfg.envoy_jwks_file, cfg.envoy_jwt_issuer, cfg.envoy_jwt_audience)
                if cfg.envoy_jwks_file
                else None
            ),
        )
        # Before the resources are served: Envoy loads them once the listener names them.
        write_sds_files(door)
        clusters, listeners = resources(door)
        self.ads = AdsServer(clusters=clusters, listeners=listeners)
        self.ads.add_to_server(self.xds_server)

        self._node_channels = NodeChannels(cfg.tls, cfg.channels_per_node)
        self._membership_channels = ChannelPool(cfg.tls)
        self.router = Router(
            self.view,
            self._node_channels,
            default_timeout_s=cfg.default_timeout_ms / 1000,
            rng=self.rng,
            metrics=self.gateway_metrics if recording else None,
            tracer=self.tracing.tracer,
        )
        add_kv_gateway(
            self.client_server,
            KvGateway(self.router, self._closing, cfg.watches_per_caller_max),
        )
        add_cluster_status(
            self.client_server,
            ClusterStatusService(self.view, self._node_channels, lambda: self.map_changed_at),
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.client_server)
        for service in ("", KV_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.access.start()  # the policy's reload on change
        await self.xds_server.start()
        await self.client_server.start()
        self._follow = asyncio.get_running_loop().create_task(
            follow_cluster_map(
                self._membership_channels.get,
                list(cfg.membership),
                self.view,
                self._on_map_change,
                self.rng,
            )
        )
        log.info(
            "gateway serving clients on %s, xDS on %s",
            self.advertise_client,
            with_port(cfg.listen_xds, self.xds_port),
        )

    def _envoy_tracing(self) -> EnvoyTracing | None:
        """Envoy traces to the gateway's OTLP receiver, at the gateway's ratio."""
        t = self.cfg.tracing
        if not t.enabled:
            return None
        host, port, _ = otlp_host_port(t.otlp_endpoint)
        return EnvoyTracing(host, port, sample_percent=100.0 * t.sample_ratio)

    def readiness(self) -> tuple[bool, str]:
        """``/readyz``: the gateway can route once it has a cluster map with shards."""
        if self._closing.is_set():
            return False, "shutting down"
        if not self.initialized.is_set():
            return False, "no cluster map yet (membership not reached, or not initialized)"
        return True, f"ok: cluster map version {self.view.version}"

    def _on_map_change(self, view: ClusterMapView) -> None:
        assert self.router is not None
        self.map_changed_at = time.monotonic()  # dkv.v1.Cluster/Status's map age
        self.gateway_metrics.map_seen()
        self.router.on_map_change(view)
        if view.initialized and not self.initialized.is_set():
            self.initialized.set()
            if self.health is not None:
                for service in ("", KV_SERVICE):
                    self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
            log.info(
                "cluster map initialized: %d shards, %d nodes (version %d)",
                view.shard_count,
                len(view.nodes),
                view.version,
            )

    async def stop(self, grace_s: float = 2.0) -> None:
        """Graceful: health goes NOT_SERVING, watches end cleanly (callers resume
        elsewhere), calls in flight get ``grace_s`` to finish, then every channel closes."""
        self._closing.set()
        await self.access.stop()
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
            self._follow = None
        if self.ads is not None:
            await self.ads.close()
        if self.client_server is not None:
            await self.client_server.stop(grace_s)
        if self.xds_server is not None:
            await self.xds_server.stop(None)
        for pool in (self._node_channels, self._membership_channels):
            if pool is not None:
                await pool.close()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None
        # Export the spans still queued (bounded by the exporter's timeout), off the loop.
        await asyncio.to_thread(self.tracing.shutdown)
